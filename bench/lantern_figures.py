"""Speed and quality of image sampling from the token prior: `ar`, lossless drafting methods and
LANTERN settings, interleaved image by image in one process (so that a shared machine's load
hits every method alike), then FID of each method's images against held-out training-photo
crops (Inception pool features, tokctl/imagetok/fid.py) and a PNG grid per method.

    OMP_NUM_THREADS=1 nice -n 19 python bench/lantern_figures.py --images 200 --refs 500 \
        --out runs/lantern-figures [--rows ar ar:2 lookup draft lantern:0.2,4 ...] [--no-fid]

Writes figures.json (one row per method) and grid_<label>.png to --out. Speedups are ratios of
images per second to `ar`'s in the same run; ``cpu_speedup_vs_ar`` is the same ratio in this
process's CPU time (time.process_time, one thread), which a shared machine's other work
disturbs less than wall-clock time. "ar (seed 2)" is `ar` again from another seed: the
FID difference between the two `ar` rows is the noise of FID at this sample size. Precision and
recall (Kynkaanniemi et al.'s k-NN manifolds) are in the same Inception feature space.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tokctl.decode.methods.ar import Autoregressive
from tokctl.decode.methods.draft import DraftChain
from tokctl.decode.methods.lantern import Lantern
from tokctl.decode.methods.lookup import PromptLookup
from tokctl.decode.methods.recycling import TokenRecycling
from tokctl.decode.sampling import Sampling, Settings
from tokctl.imagetok import fid
from tokctl.imagetok.sample import engine, load_draft, load_pair, sample_batch, save_grid

# The shipped prior's training folders (weights/README.md): held-out crops come from the same
# photos with a seed neither its training (0) nor its validation crops (12345) used.
FOLDERS = ["/usr/share/backgrounds", "/usr/share/wallpapers"]


def method_for(spec: str):
    """A row: ``ar`` or ``ar:SEED``, ``recycling``, ``lookup``, ``draft`` or ``draft:N`` (a
    smaller prior drafting chains of at most N), ``lantern:DELTA,K[,BASE[,probs][,budgetN]]``
    (BASE recycling by default; ``probs``: draft_probs=true; ``budgetN``: the base drafts N nodes
    a step, a draft model's chains N long, instead of its ``auto`` budget, whose choice follows
    the measured costs: LANTERN's decoded law depends on the drafts' shape, so figures of quality
    need it fixed). Returns (label, method, seed)."""
    name, _, arg = spec.partition(":")
    if name == "ar":
        return (f"ar (seed {arg})" if arg else "ar"), Autoregressive(), int(arg or 1)
    if name == "recycling":
        return "recycling", TokenRecycling(), 1
    if name == "lookup":
        return "lookup", PromptLookup(), 1
    if name == "draft":
        n = int(arg) if arg else None
        return (f"draft (chain {n})" if n else "draft"), (DraftChain(max_tokens=n, budget=n)
                                                         if n else DraftChain()), 1
    if name == "lantern":
        delta, k, *rest = arg.split(",")
        base = rest[0] if rest else "recycling"
        probs = "probs" in rest[1:]
        budget = next((int(r[6:]) for r in rest[1:] if r.startswith("budget")), None)
        base_args = None if budget is None else {"budget": budget, **(
            {"max_tokens": budget} if base == "draft" else {})}
        label = f"lantern d={delta} k={k}" + ("" if base == "recycling" else f" {base}") + \
            (" probs" if probs else "") + ("" if budget is None else f" budget {budget}")
        return label, Lantern(base=base, k=int(k), delta=float(delta), draft_probs=probs,
                              base_args=base_args), 1
    raise SystemExit(f"unknown row {spec!r}")


def slow_down(target, seconds: float) -> None:
    """Every forward of ``target`` (prefill, step, verification) takes ``seconds`` longer, as a
    larger model's would on an accelerator that leaves the CPU free meanwhile."""
    run = target._run

    def slower(*a, **k):
        out = run(*a, **k)
        time.sleep(seconds)
        return out

    target._run = slower


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--refs", type=int, default=500)
    ap.add_argument("--rows", nargs="*",
                    default=["ar", "ar:2", "recycling", "lookup", "lantern:0.05,4", "lantern:0.1,4",
                             "lantern:0.2,4", "lantern:0.1,2", "lantern:0.1,8"],
                    help="methods (see method_for)")
    ap.add_argument("--no-fid", action="store_true", help="speed and acceptance only")
    ap.add_argument("--pr-k", type=int, default=3, help="k of precision/recall's k-NN balls")
    ap.add_argument("--batch-ar", type=int, default=0,
                    help="draw the ar rows N sequences at a time (sample.sample_batch: the same "
                         "law, much faster; their speed is then not comparable): for FID runs")
    ap.add_argument("--extra-forward-ms", type=float, default=0.0,
                    help="wait this long after every forward of the target (not the draft's): "
                         "a stand-in for a larger target, to find the forward cost at which "
                         "drafting pays")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--out", default="runs/lantern-figures")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok, prior = load_pair(None, None)
    draft = load_draft(tok, None)
    settings = Settings(max_new_tokens=prior.model.max_tokens,
                        sampling=Sampling(args.temperature, args.top_k))
    runs = []
    for label, method, seed in map(method_for, args.rows):
        target = engine(method, tok, prior, draft if method.needs_draft else None)
        if args.extra_forward_ms:
            slow_down(target, args.extra_forward_ms / 1000)
        gen = torch.Generator().manual_seed(seed)
        method.generate([target.bos], settings, torch.Generator().manual_seed(99))  # warm-up
        runs.append({"label": label, "method": method, "target": target, "gen": gen,
                     "ids": [], "seconds": 0.0, "cpu": 0.0, "steps": 0})
    batched = [r for r in runs if args.batch_ar and isinstance(r["method"], Autoregressive)]
    for r in batched:
        start = time.perf_counter()
        while len(r["ids"]) < args.images:
            b = min(args.batch_ar, args.images - len(r["ids"]))
            r["ids"].extend(sample_batch(prior.model, b, settings.sampling, r["gen"]).tolist())
        r["seconds"], r["steps"] = time.perf_counter() - start, args.images * prior.model.max_tokens
        r["label"] += " [batched]"
    for i in range(args.images):  # interleaved: image i of every method, then image i + 1
        for r in (r for r in runs if not any(r is b for b in batched)):
            start, cpu = time.perf_counter(), time.process_time()
            g = r["method"].generate([r["target"].bos], settings, r["gen"])
            r["seconds"] += time.perf_counter() - start
            r["cpu"] += time.process_time() - cpu
            r["ids"].append(g.tokens)
            r["steps"] += len(g.accepted_per_step)
        if (i + 1) % 20 == 0:
            print(f"{i + 1}/{args.images} images per method", flush=True)
    base_rate = base_cpu = None
    for r in runs:  # speed first (written before the long FID part)
        rate = len(r["ids"]) / r["seconds"]
        base_rate = base_rate or rate
        cpu_rate = len(r["ids"]) / r["cpu"] if r["cpu"] else None  # None: a batched row
        base_cpu = base_cpu or cpu_rate
        r["row"] = {"method": r["label"], "images": len(r["ids"]), "images_per_s": rate,
                    "tokens_per_s": len(r["ids"]) * prior.model.max_tokens / r["seconds"],
                    "speedup_vs_ar": rate / base_rate,
                    "cpu_ms_per_image": 1000 * r["cpu"] / len(r["ids"]) if cpu_rate else None,
                    "cpu_speedup_vs_ar": cpu_rate / base_cpu if cpu_rate and base_cpu else None,
                    "mean_accepted_per_step": len(r["ids"]) * prior.model.max_tokens / r["steps"],
                    "info": r["method"].run_info()}
        print(json.dumps({k: v for k, v in r["row"].items() if k != "info"}), flush=True)
        torch.save(torch.tensor(r["ids"]), out / f"ids_{r['label'].replace(' ', '_')}.pt")
    rows = [r["row"] for r in runs]
    dump = lambda: (out / "figures.json").write_text(json.dumps(  # noqa: E731
        {"args": vars(args), "rows": rows}, indent=1, default=str))
    dump()
    if args.no_fid:
        return
    from tokctl.imagetok.data import CropSampler, to_image

    folders = [f for f in FOLDERS if Path(f).is_dir()]
    t0 = time.perf_counter()
    crops = CropSampler(folders, tok.model.image_size, seed=777).batch(args.refs)
    ref = fid.features(crops)
    print(f"reference features: {len(crops)} crops of {folders} in {time.perf_counter() - t0:.0f} s",
          flush=True)
    for r in runs:
        ids = torch.tensor(r["ids"])
        images = torch.cat([tok.model.decode(ids[s:s + 64]) for s in range(0, len(ids), 64)])
        save_grid([to_image(im) for im in images[:64]], out / f"grid_{r['label'].replace(' ', '_')}.png", 8)
        feats = fid.features(images)
        precision, recall = fid.precision_recall(ref, feats, args.pr_k)
        r["row"].update(fid=fid.frechet_distance(feats, ref), precision=precision, recall=recall,
                        refs=len(ref))
        print(json.dumps({k: v for k, v in r["row"].items() if k != "info"}), flush=True)
        dump()  # after every row: a cut run keeps what it finished


if __name__ == "__main__":
    main()
