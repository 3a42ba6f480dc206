"""FID and precision/recall of sampled images (token ids saved by bench/lantern_figures.py as
ids_<label>.pt) against held-out crops, with the Inception features extracted in round-robin
chunks (a chunk of crops, then a chunk of each method's images, ...) and saved after each, so
that a run cut short by a busy machine still scores every set on the same number of images.

    OMP_NUM_THREADS=1 nice -n 19 python bench/lantern_fid.py extract --ids runs/fid1000 \\
        --sets ar "lantern_d=0.2_k=4" --refs 1000 --chunk 50
    python bench/lantern_fid.py score --ids runs/fid1000 --sets ar "lantern_d=0.2_k=4"

``score`` uses the first n images of every set, n the smallest count extracted so far, and the
Frechet distance by SVD (fid.frechet_distance_svd: exact, and quick with fewer images than
features).

The crops are sharp photos and every sampled image is a tokenizer reconstruction, so FID against
the crops mixes the tokenizer's loss with the prior's. ``extract --recon`` extracts the same crops
encoded and decoded by the tokenizer ('recon'), and ``score --against refs recon`` scores every
set against both: against 'recon' a perfect prior would score what two samples of the
reconstructions score, whatever the tokenizer loses.

    python bench/lantern_fid.py extract --ids runs/fid1000 --refs 1000 --recon
    python bench/lantern_fid.py score --ids runs/fid1000 --against refs recon --sets ar ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from tokctl.imagetok import fid
from tokctl.imagetok.sample import load_pair

FOLDERS = ["/usr/share/backgrounds", "/usr/share/wallpapers"]  # as lantern_figures.py


def extract(args) -> None:
    from tokctl.imagetok.data import CropSampler, to_image
    from tokctl.imagetok.sample import save_grid

    torch.set_num_threads(1)
    folder = Path(args.ids)
    tok, _ = load_pair(None, None)
    sources = {} if not args.refs else {"refs": CropSampler(  # --refs 0: crops extracted before
        [f for f in FOLDERS if Path(f).is_dir()], tok.model.image_size, seed=777).batch(args.refs)}
    if args.recon:  # the same crops through the tokenizer: the best any prior of its tokens can do
        with torch.no_grad():
            sources["recon"] = torch.cat([tok.model.decode(tok.model.encode(c))
                                          for c in sources.pop("refs").split(64)])
    for name in args.sets:
        ids = torch.load(folder / f"ids_{name}.pt")
        sources[name] = ids
    feats = {name: [] for name in sources}
    done = 0
    while any(done < len(src) for src in sources.values()):
        for name, src in sources.items():
            part = src[done:done + args.chunk]
            if not len(part):
                continue
            images = part if name in ("refs", "recon") else tok.model.decode(part)
            if not done:  # the first chunk's images (at most 64) as the set's PNG grid
                save_grid([to_image(im) for im in images[:64]], folder / f"grid_{name}.png", 8)
            feats[name].append(fid.features(images))
            np.save(folder / f"feats_{name}.npy", np.concatenate(feats[name]))
        done += args.chunk
        print(f"{done} images a set", flush=True)


def _feats(folders: list[Path], name: str) -> Path:
    """feats_<name>.npy in the first of ``folders`` that has it."""
    for f in folders:
        if (f / f"feats_{name}.npy").exists():
            return f / f"feats_{name}.npy"
    raise SystemExit(f"no feats_{name}.npy in {', '.join(map(str, folders))}")


def score(args) -> None:
    folder = Path(args.ids)
    folders = [folder, *map(Path, args.also)]
    feats = {name: np.load(_feats(folders, name)) for name in [*args.against, *args.sets]}
    n = min(len(f) for f in feats.values())
    refs = {name: feats.pop(name)[:n] for name in args.against}
    rows = []
    for name, f in feats.items():
        row = {"set": name, "images": n, "refs": n}
        for against, ref in refs.items():
            suffix = "" if against == "refs" else f"_vs_{against}"
            precision, recall = fid.precision_recall(ref, f[:n], args.pr_k)
            row.update({f"fid{suffix}": fid.frechet_distance_svd(f[:n], ref),
                        f"precision{suffix}": precision, f"recall{suffix}": recall})
        rows.append(row)
        print(json.dumps(rows[-1]), flush=True)
    first, *others = list(feats)
    for b in others:  # each generated set against the first (ar): ar vs ar is the noise floor
        d = fid.frechet_distance_svd(feats[first][:n], feats[b][:n])
        rows.append({"set": f"{first} vs {b}", "images": n, "fid": d})
        print(json.dumps(rows[-1]), flush=True)
    (folder / f"fid_{n}.json").write_text(json.dumps(rows, indent=1))


def plot(args) -> None:
    """speedup_vs_ar (a lantern_figures.py figures.json) against FID and recall (a score's
    fid_N.json): one point per set, the `ar` sets as the reference lines."""
    from tokctl.plots import _pyplot, _save

    speed = {r["method"].replace(" ", "_"): r for r in json.loads(Path(args.speed).read_text())["rows"]}
    scores = [r for r in json.loads(Path(args.fid).read_text()) if "precision" in r]
    suffix = "" if args.against == "refs" else f"_vs_{args.against}"
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, name in zip(axes, ("fid", "recall"), ("FID", "recall")):
        refs = []
        for r in scores:
            label = r["set"].replace("_[batched]", "")
            if label.startswith("ar"):
                refs.append((label.replace("_", " "), r[key + suffix]))
                continue
            row = speed.get(label)
            if row is None:
                continue
            ax.scatter(row["speedup_vs_ar"], r[key + suffix], s=18)
            ax.annotate(label.replace("lantern_", "").replace("_budget", "").replace("_", " "),
                        (row["speedup_vs_ar"], r[key + suffix]), fontsize=6)
        for label, y in refs:  # after the points, so that the axis spans them
            ax.axhline(y, color="grey", ls="--", lw=1)
            ax.annotate(label, (ax.get_xlim()[0], y), fontsize=7, color="grey")
        ax.set_xlabel("speedup over ar (images/s, same run)")
        ax.set_ylabel(f"{name} against {'the crops' if not suffix else 'their reconstructions'}")
    fig.suptitle(f"LANTERN: speed against quality ({scores[0]['images']} images a set)")
    _save(fig, Path(args.out))
    print(args.out)


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("extract")
    e.add_argument("--ids", required=True)
    e.add_argument("--sets", nargs="*", default=[])
    e.add_argument("--refs", type=int, default=1000)
    e.add_argument("--recon", action="store_true",
                   help="extract the tokenizer's reconstructions of the --refs crops (as 'recon')"
                        " instead of the crops themselves")
    e.add_argument("--chunk", type=int, default=50)
    s = sub.add_parser("score")
    s.add_argument("--ids", required=True)
    s.add_argument("--sets", nargs="+", required=True, help="the first is compared with the rest")
    s.add_argument("--pr-k", type=int, default=3)
    s.add_argument("--against", nargs="+", default=["refs"],
                   help="reference feature sets: refs (the crops), recon (their reconstructions)")
    s.add_argument("--also", nargs="*", default=[],
                   help="more folders to read feats_<set>.npy from (sets extracted elsewhere)")
    pl = sub.add_parser("plot")
    pl.add_argument("--speed", required=True, help="figures.json of bench/lantern_figures.py")
    pl.add_argument("--fid", required=True, help="fid_N.json of score")
    pl.add_argument("--against", default="refs", choices=["refs", "recon"])
    pl.add_argument("--out", required=True)
    args = ap.parse_args()
    {"extract": extract, "score": score, "plot": plot}[args.cmd](args)


if __name__ == "__main__":
    main()
