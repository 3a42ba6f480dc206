"""What one decode step costs, per engine variant: ms per target forward of n tree tokens, eager
against compiled, in each dtype and weight format, interleaved in one process; the machine's copy
bandwidth and the weight bytes a step reads (the memory-bound floor of a one-token step).

    python bench/engine_cost.py [--model smollm2-135m | --arch tiny] [--dtypes float32 bfloat16]
        [--quant none int8 packed] [--variants eager compiled exact] [--sizes 1 2 4 8 16 32 64]
        [--json F]

Sizes round-robin inside each round and variants alternate inside each size, so the drift of a
shared machine hits all alike; the median of ``--rounds`` after one warm-up round (which also
compiles every block size). Run with the thread count chosen on purpose (``--threads``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def copy_bandwidth(device, mb: int = 512, repeats: int = 5) -> float:
    """GB/s of a large tensor copy (bytes read plus bytes written), best of ``repeats``."""
    import torch

    src = torch.ones(mb * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best / 1e9


def sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def load(args, dtype: str, quant: str):
    import torch

    from tokctl.models.quant import prepack, quantize

    if args.arch:
        sys.path.insert(0, str(ROOT / "bench"))
        from gpu_decode import build

        model = build(args.arch, getattr(torch, dtype), args.device)
        source = f"random {args.arch}"
    else:
        from omegaconf import OmegaConf

        from tokctl.config import conf_dir
        from tokctl.models.loading import load_causal_lm

        cfg = OmegaConf.load(conf_dir("decode") / "model" / f"{args.model}.yaml")
        cfg.dtype, cfg.device = dtype, args.device
        loaded = load_causal_lm(cfg)
        model, source = loaded.model, loaded.source
    if quant == "packed":  # bf16 weights in oneDNN's layout (model.prepack)
        return prepack(model), source
    return quantize(model, quant), source


def time_variants(targets: dict, sizes, prefix: int, rounds: int, device) -> dict:
    import torch

    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(10, 1000, (prefix,), generator=gen).tolist()
    for t in targets.values():
        t.prefill(prompt, capacity=prefix + max(sizes) + 8)
    times = {name: {n: [] for n in sizes} for name in targets}
    for r in range(rounds + 1):
        for n in sizes:
            toks = torch.randint(10, 1000, (n,), generator=gen).tolist()
            parents = [-1 if i < max(1, n // 4) else i % max(1, n // 4) for i in range(n)]
            for name, t in targets.items():
                sync(device)
                t0 = time.perf_counter()
                t.forward(toks, parents)
                sync(device)
                dt = time.perf_counter() - t0
                t.commit([])
                if r:
                    times[name][n].append(dt)
    return {name: {n: 1e3 * statistics.median(ts) for n, ts in by_n.items()}
            for name, by_n in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--arch", default=None, help="a random architecture from bench/gpu_decode.py")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--quant", nargs="+", default=["none"],
                    help="weight formats: none, int8, packed (bf16 prepacked, model.prepack)")
    ap.add_argument("--variants", nargs="+", default=["eager", "compiled"],
                    help="eager, compiled (compile=true), exact (exact=true)")
    ap.add_argument("--sizes", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--prefix", type=int, default=160)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    import torch

    from tokctl.decode.target import FastTarget
    from tokctl.models.quant import weight_bytes

    torch.set_num_threads(args.threads)
    bw = copy_bandwidth(args.device)
    results = {"threads": args.threads, "device": args.device, "copy_GBps": bw,
               "torch": torch.__version__, "cases": []}
    print(f"copy bandwidth {bw:.1f} GB/s (read + write), {args.threads} threads")
    for dtype in args.dtypes:
        for quant in args.quant:
            if quant == "packed" and dtype != "bfloat16":
                continue  # prepacking is for bf16 weights (model.prepack)
            model, source = load(args, dtype, quant)
            wb = weight_bytes(model)
            # Inductor packs the weights itself when it freezes them, and cannot take weights
            # packed beforehand: the compiled variant of a packed case runs on plain bf16 ones.
            plain = (load(args, dtype, "none")[0] if quant == "packed" and "compiled" in args.variants
                     else model)
            targets = {v: FastTarget(plain if v == "compiled" else model, None,
                                     compile=v == "compiled", exact=v == "exact")
                       for v in args.variants}
            t0 = time.perf_counter()
            ms = time_variants(targets, args.sizes, args.prefix, args.rounds, args.device)
            # A one-token step can go no faster than reading the weights once at the memory's
            # rate, taken as the copy's (bytes read plus written, per second).
            floor_ms = 1e3 * wb / (bw * 1e9)
            case = {"model": source, "dtype": dtype, "quant": quant, "weight_bytes": wb,
                    "floor_ms": floor_ms, "ms": ms, "wall_s": time.perf_counter() - t0}
            results["cases"].append(case)
            print(f"{dtype} quant={quant}: {wb / 1e6:.0f} MB of weights a step, "
                  f"floor {floor_ms:.1f} ms at the copy read rate")
            for v, row in ms.items():
                print(f"  {v:9s} " + "  ".join(f"n={n}:{row[n]:.1f}ms({row[n] / row[args.sizes[0]]:.2f}x)"
                                               for n in args.sizes))
            del targets, model, plain
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
