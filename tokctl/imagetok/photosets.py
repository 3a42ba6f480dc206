"""Photo sets that Debian packages ship: wider training photos, and a held-out textured set.

The shipped tokenizer was first trained on desktop wallpapers alone (smooth, large photos with
few textures) and fell below JPEG's floor on textured photos it had never seen. Two kinds of
package hold photos of what people photograph (animals, fruit, plants, buildings, objects):

- training (``TOKCTL_PHOTOS=1 bash scripts/setup.sh`` installs them): GCompris's activity data
  (``gcompris-qt-data``; the photos sit inside compiled Qt resource files, so setup extracts them
  with ``python -m tokctl.imagetok.photosets extract DEST``) and Tux Paint's photographic animal
  and plant stamps (``tuxpaint-stamps-default``, cut-outs on transparency, read in place);
- held out, never trained on (``tokenize-image eval data.photos=textured``): the photos of two
  jigsaw games, ``jigzo-data`` (JPEGs inside its ``.pzl`` puzzle files) and ``palapeli-data``;
- a second held-out set (``data.photos=opencv``), the colour photographs among the example data
  of ``opencv-doc``, a documentation package: gathered after every shipped tokenizer was made,
  so that no choice of theirs saw it.

Each file's package and licence are listed in ``tokctl/imagetok/weights/training_photos.md``.
"""

from __future__ import annotations

import fnmatch
import io
import struct
import sys
import zlib
from pathlib import Path

from PIL import Image

from tokctl.errors import UserError, one_line_error

# GCompris activities whose large images are photographs (the others hold drawings, cartoons,
# paintings, planets or interface art).
GCOMPRIS_ACTIVITIES = ("categorization", "explore_monuments", "erase", "explore_world_animals",
                       "explore_farm_animals", "explore_world_music", "leftright", "clickgame")
GCOMPRIS_RCC = Path("/usr/share/gcompris-qt/rcc")
# where setup.sh puts them, and the Tux Paint stamp folders whose PNGs are photographs
PHOTOS_DIR = Path("/usr/local/share/tokctl/photos")
TUXPAINT_STAMPS = Path("/usr/share/tuxpaint/stamps")
TRAINING_FOLDERS = (PHOTOS_DIR / "gcompris", TUXPAINT_STAMPS / "animals",
                    TUXPAINT_STAMPS / "plants")
MIN_SIDE = 192  # smaller images in GCompris are icons and thumbnails

# The held-out textured set: (name, file). jigzo's four smooth puzzles (clouds, helicopter,
# train, toboggan) are left out: the set is about texture (fur, fruit, foliage, buildings).
JIGZO = Path("/usr/share/games/jigzo/puzzles/00_default")
PALAPELI = Path("/usr/share/palapeli/collection")
TEXTURED = (
    ("bike", JIGZO / "bike-3x4.pzl"), ("bird", JIGZO / "bird-2x3.pzl"),
    ("blackberry", JIGZO / "blackberry-3x3.pzl"), ("castle", JIGZO / "castle-6x3.pzl"),
    ("gorilla", JIGZO / "gorilla2-3x3.pzl"), ("horse", JIGZO / "horse-4x3.pzl"),
    ("penguin", JIGZO / "penguin-3x2.pzl"), ("windmill", JIGZO / "windmill-4x4.pzl"),
    ("castle_maintenon", PALAPELI / "castle-maintenon.jpg"),
    ("cincinnati_bridge", PALAPELI / "cincinnati-bridge.jpg"),
    ("citrus_fruits", PALAPELI / "citrus-fruits.jpg"),
    ("honey_bee", PALAPELI / "european-honey-bee.jpg"),
    ("chameleon", PALAPELI / "panther-chameleon-female.jpg"),
)
INSTALL_HINT = "TOKCTL_PHOTOS=1 bash scripts/setup.sh installs them (root)"

# The second held-out set: every colour photograph in opencv-doc's example data, the first frame
# of each stereo or optical-flow pair; left out are renders and drawings (HappyFish, smarties,
# Blender_Suzanne), the painting (starry_night), chessboards, text, logos and grey images.
OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")
OPENCV = tuple((Path(f).stem.lower(), OPENCV_DATA / f) for f in (
    "aero1.jpg", "aloeL.jpg", "apple.jpg", "baboon.jpg", "board.jpg", "building.jpg",
    "butterfly.jpg", "chicky_512.png", "ela_original.jpg", "fruits.jpg", "graf1.png", "home.jpg",
    "leuvenA.jpg", "messi5.jpg", "orange.jpg", "rubberwhale1.png", "squirrel_cls.jpg",
    "stuff.jpg"))


def rcc_files(path: Path | str):
    """(name, bytes) of every file in a compiled Qt resource file (``rcc`` format 1-3): a header
    (``qres``, version, offsets of the tree, the data and the names), a tree of 14- or 22-byte
    nodes, data blobs with a 4-byte length (zlib ones led by their 4-byte unpacked size)."""
    b = Path(path).read_bytes()
    if b[:4] != b"qres":
        raise ValueError(f"{path}: not a Qt resource file")
    version, tree, data, names = struct.unpack(">4I", b[4:20])
    node = 14 if version == 1 else 22

    def name(off: int) -> str:
        n = struct.unpack(">H", b[names + off:names + off + 2])[0]
        return b[names + off + 6:names + off + 6 + 2 * n].decode("utf-16-be")

    def walk(i: int, prefix: str):
        o = tree + i * node
        name_off, flags = struct.unpack(">IH", b[o:o + 6])
        here = name(name_off) if i else ""
        if flags & 2:  # a directory: its children are consecutive nodes
            count, first = struct.unpack(">II", b[o + 6:o + 14])
            for c in range(first, first + count):
                yield from walk(c, f"{prefix}{here}/" if i else "")
            return
        off = data + struct.unpack(">I", b[o + 10:o + 14])[0]
        size = struct.unpack(">I", b[off:off + 4])[0]
        blob = b[off + 4:off + 4 + size]
        if flags & 1:
            blob = zlib.decompress(blob[4:])
        elif flags & 4:  # zstd: not used by Debian's GCompris build; skip rather than fail
            return
        yield prefix + here, blob

    yield from walk(0, "")


def extract_gcompris(dest: Path | str, rcc_dir: Path | str = GCOMPRIS_RCC) -> int:
    """Write GCompris's photographs (at least MIN_SIDE on the short side) under ``dest`` at their
    path in the resource file, in their own format; returns how many."""
    dest, n = Path(dest), 0
    for act in GCOMPRIS_ACTIVITIES:
        rcc = Path(rcc_dir) / f"{act}.rcc"
        if not rcc.exists():
            raise UserError(f"{rcc}: not there; apt-get install gcompris-qt-data")
        for name, blob in rcc_files(rcc):
            if not name.lower().endswith((".jpg", ".jpeg", ".png", ".webp")):
                continue
            try:
                with Image.open(io.BytesIO(blob)) as im:
                    if min(im.size) < MIN_SIDE:
                        continue
            except OSError:
                continue
            out = dest / name  # gcompris/src/activities/...: the path the copyright file names
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(blob)
            n += 1
    return n


def _open(path: Path) -> Image.Image:
    if path.suffix == ".pzl":  # a text header, then the puzzle's JPEG, then its piece mask
        b = path.read_bytes()
        start = b.find(b"\xff\xd8\xff")
        if start < 0:
            raise OSError("no JPEG inside")
        path = io.BytesIO(b[start:])
    with Image.open(path) as im:
        im.load()
        return im.convert("RGB")


def held_out_set(which: str) -> tuple[list[tuple[str, Image.Image]], dict[str, str]]:
    """A held-out set (``textured`` or ``opencv``) as (name, RGB image), and those missing,
    name -> why."""
    out, skipped = [], {}
    photos, hint = {"textured": (TEXTURED, INSTALL_HINT),
                    "opencv": (OPENCV, "apt-get install opencv-doc (root) installs them")}[which]
    for name, path in photos:
        try:
            out.append((name, _open(path)))
        except FileNotFoundError:
            skipped[name] = f"{path} is not installed ({hint})"
        except OSError as exc:
            skipped[name] = f"{path}: {one_line_error(exc)}"
    return out, skipped


def dep5_licences(copyright_file: Path | str) -> list[tuple[list[str], str, str]]:
    """(file patterns, licence, copyright holder) of each ``Files:`` stanza of a Debian
    machine-readable copyright file, in order (the last stanza that matches a file is its)."""
    stanzas, cur, key = [], {}, None
    for line in Path(copyright_file).read_text(errors="replace").splitlines() + [""]:
        if not line.strip():
            if "files" in cur:
                stanzas.append((cur["files"].split(), cur.get("license", "").split("\n")[0],
                                cur.get("copyright", "").split("\n")[0]))
            cur, key = {}, None
        elif line[0] in " \t" and key:
            cur[key] += "\n" + line.strip()
        elif ":" in line:
            key, value = line.split(":", 1)
            key = key.lower()
            cur[key] = value.strip()
    return stanzas


def licence_of(path: str, stanzas) -> tuple[str, str]:
    # GCompris's build turns its JPEGs and PNGs into WebP: the copyright file names the sources
    stem = path.rsplit(".", 1)[0]
    names = {path} | {stem + ext for ext in (".jpg", ".jpeg", ".png", ".svg", ".JPG")}
    found = ("unknown", "")
    for patterns, licence, holder in stanzas:
        if any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names):
            found = (licence.strip(), holder.strip())
    return found


def manifest(gcompris_dir: Path | str = PHOTOS_DIR / "gcompris") -> str:
    """A markdown table of every training photo outside the wallpapers: file, package, licence
    and copyright holder (from the package's Debian copyright file); and the held-out set."""
    def image_files(folder: Path) -> list[Path]:  # (data.image_files would import in a circle)
        return sorted(f for f in folder.rglob("*") if f.is_file()
                      and f.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))

    rows = []
    sources = [(Path(gcompris_dir), "gcompris-qt-data", "gcompris/"),
               (TUXPAINT_STAMPS / "animals", "tuxpaint-stamps-default", ""),
               (TUXPAINT_STAMPS / "plants", "tuxpaint-stamps-default", "")]
    for folder, package, strip in sources:
        stanzas = dep5_licences(f"/usr/share/doc/{package}/copyright")
        for f in image_files(folder):
            rel = str(f.relative_to(folder))
            upstream = rel[len(strip):] if strip and rel.startswith(strip) else \
                str(f.relative_to(TUXPAINT_STAMPS.parent)) if package.startswith("tux") else rel
            licence, holder = licence_of(upstream, stanzas)
            rows.append(f"| `{f}` | {package} | {licence} | {holder.replace('|', '/')} |")
    held = []
    for name, path in TEXTURED + OPENCV:
        package = ("jigzo-data" if path.is_relative_to(JIGZO) else "opencv-doc"
                   if path.is_relative_to(OPENCV_DATA) else "palapeli-data")
        stanzas = dep5_licences(f"/usr/share/doc/{package}/copyright")
        rel = {"jigzo-data": "puzzles/00_default/", "palapeli-data": "collection/",
               "opencv-doc": "samples/data/"}[package] + path.name
        licence, holder = licence_of(rel, stanzas)
        held.append(f"| {name} | `{path}` | {package} | {licence} | {holder.replace('|', '/')} |")
    return "\n".join(["| file | package | licence | copyright |", "|---|---|---|---|", *rows,
                      "", "Held out (`tokenize-image eval data.photos=textured`, and the "
                      "second set `data.photos=opencv`; never trained on):",
                      "", "| name | file | package | licence | copyright |",
                      "|---|---|---|---|---|", *held])


if __name__ == "__main__":  # python -m tokctl.imagetok.photosets extract DEST | manifest
    if len(sys.argv) == 3 and sys.argv[1] == "extract":
        print(f"{extract_gcompris(sys.argv[2])} GCompris photos under {sys.argv[2]}")
    elif len(sys.argv) == 2 and sys.argv[1] == "manifest":
        print(manifest())
    else:
        sys.exit("usage: python -m tokctl.imagetok.photosets extract DEST | manifest")
