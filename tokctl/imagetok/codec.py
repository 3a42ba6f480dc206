"""`tokctl tokenize-image encode IMG... --out DIR` and `decode TOKFILE... --out DIR`.

An image of any size is encoded as tiles of the tokenizer's input size (tokfile version 2), each
tile's ids arithmetic-coded under the tokenizer's token prior (prior.py) when there is one;
decode reassembles the tiles at the image's size.

Each input is handled on its own: a file that will not open, a truncated token file or one made
by another tokenizer is reported in one line, the others are still written, and the exit status
is 1 when any input failed (2 for a usage mistake, such as a missing --out).
"""

from __future__ import annotations

import glob
import io
import math
from contextlib import nullcontext
from pathlib import Path
from typing import List, Optional

import click
import numpy as np
import torch
import typer
from PIL import Image

from tokctl.console import console, err_console, progress_bar
from tokctl.errors import UserError
from tokctl.imagetok import prior as prior_mod
from tokctl.imagetok import rdo, refine, tokfile
from tokctl.imagetok.checkpoint import EMBEDDED, LoadedTokenizer, load_tokenizer
from tokctl.imagetok.data import IMAGE_SUFFIXES, open_rgb, to_image

BATCH = 32


def _unique(out: Path, stem: str, suffix: str, taken: set[str]) -> Path:
    name, i = f"{stem}{suffix}", 1
    while name in taken:
        i += 1
        name = f"{stem}-{i}{suffix}"
    taken.add(name)
    return out / name


def _report(path, message: str) -> None:
    err_console.print(f"[bold red]error:[/] {path}: {message}", soft_wrap=True, markup=True)


def check_budget(tok: LoadedTokenizer, tokens: Optional[int]) -> int:
    model = tok.model
    if tokens is None:
        return model.max_tokens
    if not 1 <= tokens <= model.max_tokens:
        raise UserError(f"--tokens {tokens}: this tokenizer ({tok.name}) makes 1 to "
                        f"{model.max_tokens} tokens per image")
    if not model.variable_length and tokens != model.max_tokens:
        raise UserError(f"--tokens {tokens}: {tok.name} is a fixed-length tokenizer "
                        f"({model.max_tokens} tokens); use a variable-length one (onedpiece, "
                        f"flexnested) for fewer")
    return tokens


def image_tiles(im: Image.Image, size: int) -> torch.Tensor:
    """(T, 3, size, size): the image padded to whole tiles (its last row and column repeated, so
    no tile sees an artificial edge), cut row by row."""
    arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    cols, rows = tokfile.tile_grid(im.size[0], im.size[1], size)
    arr = np.pad(arr, ((0, rows * size - arr.shape[0]), (0, cols * size - arr.shape[1]), (0, 0)),
                 mode="edge")
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255
    return x.view(3, rows, size, cols, size).permute(1, 3, 0, 2, 4).reshape(-1, 3, size, size)


def assemble(tiles: torch.Tensor, width: int, height: int) -> Image.Image:
    """The inverse of :func:`image_tiles`: tiles (T, 3, S, S) -> the width x height image."""
    size = tiles.shape[-1]
    cols, rows = tokfile.tile_grid(width, height, size)
    x = tiles.view(rows, cols, 3, size, size).permute(2, 0, 3, 1, 4).reshape(3, rows * size,
                                                                              cols * size)
    return to_image(x[:, :height, :width])


@torch.no_grad()
def image_ids(tok: LoadedTokenizer, images: list[Image.Image], tokens: int, prior=None,
              rate_lambda: float = 0.0, refine_steps: int = 0, refine_rate: float = 0.0,
              progress=None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """RGB images of any size -> each image's nearest ids and its chosen ids (tiles, ``tokens``
    each), tiles of the tokenizer's input size. With ``refine_steps`` > 0 the encoder's latents
    are first refined for the decoder that keeps ``tokens`` (refine.py; for distortion +
    ``refine_rate`` x coded bits a token under ``prior`` when that is > 0); the nearest ids are
    those latents' own codes, and with ``rate_lambda`` > 0 (and a prior) the chosen ids are the
    codes chosen for distortion + rate_lambda * coded bits under ``prior`` (rdo.py); otherwise
    the chosen ids are the nearest (the same arrays). ``progress(n)``, when given, is told of
    every batch of n tiles done."""
    rdo.check_rate_aware(tok.model, prior, rate_lambda)
    refine.check_refine_rate(tok.model, prior, refine_steps, refine_rate)
    model = tok.model
    size = model.image_size
    keep = -(-tokens // model.quantizer.depth)
    per_image = [image_tiles(im, size) for im in images]
    flat = torch.cat(per_image) if per_image else torch.zeros(0, 3, size, size)

    def ids_of(batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        latents = refine.refine_latents(model, batch, model.encode_latents(batch), keep,
                                        refine_steps, prior=prior and prior.model,
                                        rate=refine_rate)
        if rate_lambda > 0:
            return rdo.choose_ids(model, prior.model, latents, tokens, rate_lambda)
        ids = model.quantizer(latents).ids.reshape(len(batch), -1)[:, :tokens].numpy()
        return ids, ids

    def done(pair):
        if progress is not None:
            progress(len(pair[0]))
        return pair

    pairs = [done(ids_of(flat[i:i + BATCH])) for i in range(0, len(flat), BATCH)]
    if not pairs:
        return [], []
    near_all, chosen_all = (np.concatenate(side) for side in zip(*pairs))
    nearest, chosen, start = [], [], 0
    for tiles in per_image:
        stop = start + len(tiles)
        nearest.append(near_all[start:stop])
        chosen.append(chosen_all[start:stop] if rate_lambda > 0 else nearest[-1])
        start = stop
    return nearest, chosen


def encode_images(tok: LoadedTokenizer, images: list[Image.Image], tokens: int,
                  prior=None, rate_lambda: float = 0.0, refine_steps: int = 0,
                  refine_rate: float = 0.0, progress=None) -> list[bytes]:
    """RGB images of any size -> token file bytes (version 2): each image as tiles of the
    tokenizer's input size, ``tokens`` ids a tile (:func:`image_ids`), arithmetic-coded under
    ``prior`` (a LoadedPrior) when one is given and that makes the file smaller, else plain
    bits."""
    nearest, chosen = image_ids(tok, images, tokens, prior, rate_lambda, refine_steps,
                                refine_rate, progress)
    return [rate_aware_file(tok, prior, im.size[0], im.size[1], near, ids)[0]
            for im, near, ids in zip(images, nearest, chosen)]


def rate_aware_file(tok: LoadedTokenizer, prior, width: int, height: int, nearest: np.ndarray,
                    chosen: np.ndarray, payload: Optional[bytes] = None
                    ) -> tuple[bytes, np.ndarray]:
    """The token file of the rate-aware ids ``chosen`` (:func:`smaller_file`), unless it comes
    out plain: then their distortion would buy no bytes, and the file holds the ``nearest``
    ids, plain. Returns the file and the ids it holds."""
    blob = smaller_file(tok, prior, width, height, chosen, payload)
    if chosen is nearest or tokfile.read_header(blob)[0].prior_hash is not None:
        return blob, chosen
    return smaller_file(tok, None, width, height, nearest), nearest


def smaller_file(tok: LoadedTokenizer, prior, width: int, height: int, ids: np.ndarray,
                 payload: Optional[bytes] = None) -> bytes:
    """The token file of ``ids`` (tiles, n): coded under ``prior`` when that makes it smaller,
    else plain. A coded file's header is 3 bytes longer (the prior's hash) and the range coder
    ends on a 32-bit word, so a few short tiles can cost less plain. ``payload``: the coded
    bytes when already made."""
    kind = tokfile.KINDS.get(tok.name, tokfile.OTHER_KIND)
    plain = tokfile.dumps(tokfile.TokenFile(kind, tok.hash, width, height, ids),
                          tok.model.codebook_size)
    if prior is None:
        return plain
    if payload is None:
        payload = prior_mod.encode_ids(prior.model, ids)
    coded = tokfile.dumps(tokfile.TokenFile(kind, tok.hash, width, height, ids, prior.hash),
                          tok.model.codebook_size, payload)
    return coded if len(coded) < len(plain) else plain


@torch.no_grad()
def decode_files(tok: LoadedTokenizer, files: list[tokfile.TokenFile]) -> list[Image.Image]:
    """Parsed token files -> RGB images at their original sizes (tiles reassembled; tiles with
    the same token count decoded in batches)."""
    tiles = [tf.tokens.reshape(-1, tf.tokens_per_tile) for tf in files]
    decoded: list[list] = [[None] * len(t) for t in tiles]
    by_count: dict[int, list[tuple[int, int]]] = {}
    for i, t in enumerate(tiles):
        for j in range(len(t)):
            by_count.setdefault(t.shape[1], []).append((i, j))
    for idx in by_count.values():
        for start in range(0, len(idx), BATCH):
            part = idx[start:start + BATCH]
            ids = torch.from_numpy(np.stack([tiles[i][j] for i, j in part]).astype(np.int64))
            for (i, j), img in zip(part, tok.model.decode(ids)):
                decoded[i][j] = img
    out = []
    for tf, imgs in zip(files, decoded):
        if tf.version == 1:  # one resized image
            im = to_image(imgs[0])
            size = (tf.width, tf.height)
            out.append(im if im.size == size else im.resize(size, Image.BICUBIC))
        else:
            out.append(assemble(torch.stack(imgs), tf.width, tf.height))
    return out


class PriorLookup:
    """decode_coded for tokfile.loads: the prior a coded file names, found once (the one given
    with --prior, else a shipped one), or one line saying it is not here."""

    def __init__(self, given: Optional[Path] = None):
        self.given, self.found = given, {}

    def __call__(self, hash24: int, payload: bytes, tiles: int, n: int) -> np.ndarray:
        if hash24 not in self.found:
            self.found[hash24] = prior_mod.prior_by_hash(hash24, self.given)
        prior = self.found[hash24]
        if prior is None:
            raise tokfile.TokenFileError(
                f"coded under token prior {hash24:06x}, which this tokctl does not have "
                f"(give --prior FILE, the prior.pt that coded it)")
        if n > prior.model.max_tokens:
            raise tokfile.TokenFileError(f"holds {n} tokens a tile; its prior models at most "
                                         f"{prior.model.max_tokens}")
        return prior_mod.decode_ids(prior.model, payload, tiles, n)


def read_token_bytes(tok: LoadedTokenizer, data: bytes,
                     priors: Optional[PriorLookup] = None) -> tokfile.TokenFile:
    """A token file's bytes -> its parsed, checked tokens (coded ids decoded under their prior)."""
    return check_tokens(tok, tokfile.loads(data, tok.model.codebook_size, expect_hash=tok.hash,
                                           tile_size=tok.model.image_size,
                                           decode_coded=priors or PriorLookup()))


def parse_token_file(tok: LoadedTokenizer, path: Path,
                     priors: Optional[PriorLookup] = None) -> tokfile.TokenFile:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise tokfile.TokenFileError(f"cannot read ({exc.strerror or exc})") from None
    return read_token_bytes(tok, data, priors)


def check_tokens(tok: LoadedTokenizer, tf: tokfile.TokenFile) -> tokfile.TokenFile:
    n = tf.tokens_per_tile
    if n == 0 or n > tok.model.max_tokens:
        raise tokfile.TokenFileError(f"holds {n} tokens a tile; this tokenizer decodes 1 to "
                                     f"{tok.model.max_tokens}")
    if not tok.model.variable_length and n != tok.model.max_tokens:
        raise tokfile.TokenFileError(f"holds {n} tokens a tile; {tok.name} needs all "
                                     f"{tok.model.max_tokens}")
    if (tf.tokens >= tok.model.codebook_size).any():
        raise tokfile.TokenFileError("holds ids beyond this tokenizer's codebook")
    return tf


# ------------------------------------------------------------------------------------ commands
TOKENIZER_HELP = ("Tokenizer file (.pt), train run folder, TiTok release folder, or a shipped "
                  "tokenizer by name: default (1D, One-D-Piece, 64 tokens), onedpiece128 (1D, "
                  "128 tokens), vq2d (2D grid, 9 bits a token), vq2d24 (2D grid, 24 bits a "
                  "token) or vq2d32 (vq2d24 on a finer grid, 32 bits a token, coded digit by "
                  "digit).")


PRIOR_HELP = ("Token prior (prior.pt from `tokctl tokenize-image prior train`, or its run "
              "folder) that arithmetic-codes the ids; default: the shipped one for the tokenizer.")


def encode_command(images: List[Path] = typer.Argument(..., help="Images to encode."),
                   out: Path = typer.Option(..., "--out", "-o", help="Folder for the .tok files."),
                   tokens: Optional[int] = typer.Option(None, "--tokens", "-n",
                                                        help="Tokens per tile (a prefix); "
                                                             "default: all."),
                   tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", "-t",
                                                            help=TOKENIZER_HELP),
                   prior: Optional[Path] = typer.Option(None, "--prior", "-p", help=PRIOR_HELP),
                   raw: bool = typer.Option(False, "--raw",
                                            help="Plain ids (fixed bits each), no prior."),
                   rate_lambda: float = typer.Option(
                       0.0, "--rate-lambda", "-l",
                       help="Rate-aware encoding: each token may take a code one level away "
                            "from the nearest when that saves coded bits, minimising the "
                            "distortion the decoder sees + LAMBDA x bits under the prior "
                            "(0: nearest codes; README: figures)."),
                   refine_steps: int = typer.Option(
                       0, "--refine", "-r",
                       help="Refine each tile's latents for the decoder with this many gradient "
                            "steps before choosing codes (semi-amortised encoding: far better "
                            "images at the same bytes on photos unlike the training crops; a "
                            "step of a 64x64 tile takes about 13 ms on one CPU thread with the "
                            "default, 36 with vq2d24; 0: the encoder's guess, 100: a good "
                            "start; README: figures)."),
                   refine_rate: float = typer.Option(
                       0.0, "--refine-rate",
                       help="With --refine: also weigh the coded bits a token under the prior, "
                            "minimising distortion + RATE x bits (0.03: about 7 bits a token "
                            "on textured crops; README: figures).")) -> None:
    """Encode images of any size into token files (one IMAGE.tok per image): each image as tiles
    of the tokenizer's input size, their ids arithmetic-coded under the token prior when there
    is one for the tokenizer (else, or with --raw, plain bits)."""
    tok = load_tokenizer(tokenizer)
    n = check_budget(tok, tokens)
    if raw and prior is not None:
        raise UserError("--raw and --prior: choose one (plain ids, or ids coded under a prior)")
    rate_lambda = rdo.check_rate_lambda(rate_lambda, "--rate-lambda")
    refine_steps = refine.check_refine_steps(refine_steps, "--refine")
    if raw and rate_lambda > 0:
        raise UserError("--raw and --rate-lambda: rate-aware encoding weighs the prior's coded "
                        "bits; plain ids have none to save")
    if raw and refine_rate > 0:
        raise UserError("--raw and --refine-rate: the rate term weighs the prior's coded bits; "
                        "plain ids have none to save")
    coder = None if raw else prior_mod.prior_for(tok.hash, prior)
    rdo.check_rate_aware(tok.model, coder, rate_lambda, "--rate-lambda")
    refine_rate = refine.check_refine_rate(tok.model, coder, refine_steps, refine_rate,
                                           "--refine-rate")
    if coder is not None and n > coder.model.max_tokens:
        raise UserError(f"--tokens {n}: the prior models at most {coder.model.max_tokens} tokens")
    _make_out(out)
    opened, failed = [], 0
    for path in images:
        try:
            opened.append((path, open_rgb(path)))
        except UserError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
            failed += 1
    taken: set[str] = set()
    size = tok.model.image_size
    tiles = sum(math.prod(tokfile.tile_grid(im.size[0], im.size[1], size)) for _, im in opened)
    # refinement takes about a second a tile: show it (plain encoding is done in a blink)
    with (progress_bar("refining tiles", tiles) if refine_steps else nullcontext()) as advance:
        for start in range(0, len(opened), BATCH):
            chunk = opened[start:start + BATCH]
            for (path, _), data in zip(chunk, encode_images(
                    tok, [im for _, im in chunk], n, coder, rate_lambda, refine_steps,
                    refine_rate, advance)):
                target = _unique(out, path.stem, ".tok", taken)
                _write(target, data)
                console.print(f"{target}  {len(data)} bytes", soft_wrap=True, highlight=False)
    _finish("encoded", len(opened), failed)


def _maker_of(files: List[Path]) -> LoadedTokenizer:
    """The shipped tokenizer whose hash the first readable token file carries (else the default)."""
    for path in files:
        try:
            tf, _, _ = tokfile.read_header(path.read_bytes())
        except (OSError, tokfile.TokenFileError):
            continue
        for name, weights in EMBEDDED.items():
            if weights.exists():
                tok = load_tokenizer(name)
                if tok.hash == tf.tokenizer_hash:
                    return tok
        break
    return load_tokenizer(None)


def _original(folder: Path, stem: str) -> Optional[Path]:
    hits = sorted(p for p in folder.glob(f"{glob.escape(stem)}.*")
                  if p.suffix.lower() in IMAGE_SUFFIXES)
    return hits[0] if hits else None


def side_by_side(original: Image.Image, decoded: Image.Image, gap: int = 4) -> Image.Image:
    """The original on the left, the decoded image on the right, on white."""
    w, h = decoded.size
    canvas = Image.new("RGB", (2 * w + gap, h), (255, 255, 255))
    canvas.paste(original if original.size == (w, h) else original.resize((w, h), Image.BICUBIC),
                 (0, 0))
    canvas.paste(decoded, (w + gap, 0))
    return canvas


def decode_command(files: List[Path] = typer.Argument(..., help="Token files to decode."),
                   out: Path = typer.Option(..., "--out", "-o", help="Folder for the PNGs."),
                   tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", "-t",
                                                            help=TOKENIZER_HELP),
                   prior: Optional[Path] = typer.Option(None, "--prior", "-p",
                                                        help="Token prior that coded the files "
                                                             "(default: the shipped ones, found "
                                                             "by the hash in each file)."),
                   originals: Optional[Path] = typer.Option(
                       None, "--side-by-side", metavar="FOLDER",
                       help="Write each result beside its original: FOLDER/NAME.* for "
                            "NAME.tok.")) -> None:
    """Decode token files into PNG images at their original sizes (one FILE.png per token
    file). Without --tokenizer, the shipped tokenizer that made the first file decodes them
    all."""
    tok = load_tokenizer(tokenizer) if tokenizer is not None else _maker_of(files)
    if prior is not None:
        prior_mod.load_prior(prior)  # a missing or unreadable --prior: one line, before any work
    if originals is not None and not originals.is_dir():
        raise UserError(f"--side-by-side {originals}: no such folder (give the folder of the "
                        f"original images)")
    _make_out(out)
    lookup = PriorLookup(prior)
    parsed, failed = [], 0
    for path in files:
        try:
            parsed.append((path, parse_token_file(tok, path, lookup)))
        except tokfile.TokenFileError as exc:
            _report(path, str(exc))
            failed += 1
    taken: set[str] = set()
    for start in range(0, len(parsed), BATCH):
        chunk = parsed[start:start + BATCH]
        for (path, _), im in zip(chunk, decode_files(tok, [tf for _, tf in chunk])):
            if originals is not None:
                source = _original(originals, path.stem)
                if source is None:
                    _report(path, f"--side-by-side: no original {path.stem}.* in {originals}; "
                                  f"wrote the decoded image alone")
                    failed += 1
                else:
                    try:
                        im = side_by_side(open_rgb(source), im)
                    except UserError as exc:
                        _report(path, str(exc))
                        failed += 1
            target = _unique(out, path.stem, ".png", taken)
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            _write(target, buf.getvalue())
            console.print(str(target), soft_wrap=True, highlight=False)
    _finish("decoded", len(parsed), failed)


def _make_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot create the folder ({exc.strerror or exc})") from None


def _write(path: Path, data: bytes) -> None:
    from tokctl.runs import atomic_write_bytes

    try:
        atomic_write_bytes(path, data)
    except OSError as exc:
        raise UserError(f"cannot write {path} ({exc.strerror or exc})") from None


def _finish(verb: str, done: int, failed: int) -> None:
    if failed:
        err_console.print(f"{verb} {done}, [bold red]{failed} failed[/]", soft_wrap=True)
        raise typer.Exit(1)


def _main(fn, prog: str, argv: list[str]) -> int:
    cmd = typer.main.get_command(_single(fn))
    try:
        # without standalone mode click returns an Exit's code instead of raising it
        code = cmd.main(argv, prog_name=prog, standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return 2
    except click.exceptions.Abort:
        return 130
    except UserError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
        return 2
    return code if isinstance(code, int) else 0


def _single(fn) -> typer.Typer:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(fn)
    return app


def encode_main(argv: list[str]) -> int:
    return _main(encode_command, "tokctl tokenize-image encode", argv)


def decode_main(argv: list[str]) -> int:
    return _main(decode_command, "tokctl tokenize-image decode", argv)
