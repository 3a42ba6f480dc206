"""Speed and quality of image sampling from the token prior: `ar`, lossless drafting methods and
LANTERN settings, interleaved image by image in one process (so that a shared machine's load
hits every method alike), then FID of each method's images against held-out training-photo
crops (Inception pool features, tokctl/imagetok/fid.py) and a PNG grid per method.

    OMP_NUM_THREADS=1 nice -n 19 python bench/lantern_figures.py --images 200 --refs 500 \
        --out runs/lantern-figures

Writes figures.json (one row per method) and grid_<label>.png to --out. Speedups are ratios of
images per second to `ar`'s in the same run. "ar (seed 2)" is `ar` again from another seed: the
FID difference between the two `ar` rows is the noise of FID at this sample size.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tokctl.decode.methods.ar import Autoregressive
from tokctl.decode.methods.lantern import Lantern
from tokctl.decode.methods.lookup import PromptLookup
from tokctl.decode.methods.recycling import TokenRecycling
from tokctl.decode.sampling import Sampling, Settings
from tokctl.imagetok import fid
from tokctl.imagetok.sample import engine, load_pair, save_grid

# The shipped prior's training folders (weights/README.md): held-out crops come from the same
# photos with a seed neither its training (0) nor its validation crops (12345) used.
FOLDERS = ["/usr/share/backgrounds", "/usr/share/wallpapers"]


def methods(settings: list[str]) -> list[tuple[str, object, int]]:
    """(label, method, seed)."""
    out = [("ar", Autoregressive(), 1), ("ar (seed 2)", Autoregressive(), 2),
           ("recycling", TokenRecycling(), 1), ("lookup", PromptLookup(), 1)]
    for s in settings:
        delta, k = s.split(",")
        out.append((f"lantern d={delta} k={k}",
                    Lantern(base="recycling", k=int(k), delta=float(delta)), 1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--refs", type=int, default=500)
    ap.add_argument("--lantern", nargs="*", default=["0.05,4", "0.1,4", "0.2,4", "0.1,2", "0.1,8"],
                    help="delta,k pairs")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--out", default="runs/lantern-figures")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok, prior = load_pair(None, None)
    settings = Settings(max_new_tokens=prior.model.max_tokens,
                        sampling=Sampling(args.temperature, args.top_k))
    runs = []
    for label, method, seed in methods(args.lantern):
        target = engine(method, tok, prior)
        gen = torch.Generator().manual_seed(seed)
        method.generate([target.bos], settings, torch.Generator().manual_seed(99))  # warm-up
        runs.append({"label": label, "method": method, "target": target, "gen": gen,
                     "ids": [], "seconds": 0.0, "steps": 0})
    for i in range(args.images):  # interleaved: image i of every method, then image i + 1
        for r in runs:
            start = time.perf_counter()
            g = r["method"].generate([r["target"].bos], settings, r["gen"])
            r["seconds"] += time.perf_counter() - start
            r["ids"].append(g.tokens)
            r["steps"] += len(g.accepted_per_step)
        if (i + 1) % 20 == 0:
            print(f"{i + 1}/{args.images} images per method", flush=True)
    from tokctl.imagetok.data import CropSampler, to_image

    folders = [f for f in FOLDERS if Path(f).is_dir()]
    t0 = time.perf_counter()
    crops = CropSampler(folders, tok.model.image_size, seed=777).batch(args.refs)
    ref = fid.features(crops)
    print(f"reference features: {len(crops)} crops of {folders} in {time.perf_counter() - t0:.0f} s",
          flush=True)
    base_rate = None
    rows = []
    for r in runs:
        ids = torch.tensor(r["ids"])
        images = torch.cat([tok.model.decode(ids[s:s + 64]) for s in range(0, len(ids), 64)])
        save_grid([to_image(im) for im in images[:64]], out / f"grid_{r['label'].replace(' ', '_')}.png", 8)
        rate = len(ids) / r["seconds"]
        base_rate = base_rate or rate
        row = {"method": r["label"], "images": len(ids), "images_per_s": rate,
               "tokens_per_s": ids.numel() / r["seconds"], "speedup_vs_ar": rate / base_rate,
               "mean_accepted_per_step": ids.numel() / r["steps"],
               "fid": fid.frechet_distance(fid.features(images), ref),
               "info": r["method"].run_info()}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "info"}), flush=True)
    (out / "figures.json").write_text(json.dumps({"args": vars(args), "refs": len(ref),
                                                  "rows": rows}, indent=1, default=str))


if __name__ == "__main__":
    main()
