"""compress-vit on a GPU: images/s of the uncompressed ViT-B/16 against ToMe r=8/13/16.

    python bench/gpu_vit.py --json vit.json             # ViT-B/16 (random weights), on cuda
    python bench/gpu_vit.py --cpu-dry-run               # the same code end to end, tiny, on the CPU

Per setting (dtype, eager or compiled, batch) and r: the uncompressed model and the ToMe model
run interleaved (their order alternating per round) after a warm-up that also compiles, each
round timing ``--iters`` forwards between synchronisations; reported: median images/s of each,
the speedup (median of the per-round ratios, with quartiles), GFLOPs per image (the analytic
count of tokctl.vit.flops from the layers' token counts) and how far the ToMe logits are from
the eager torch-merge ones (a correctness check of the Triton kernels and of the compiled graphs).

Compiled: both models' blocks through torch.compile (Patch(compile=True): ToMe's block as one
static-shape graph per layer, the baseline's own blocks likewise), so the baseline is the compiled
SDPA model. Every (dtype, batch, r) compiles 12 layers, so settings run by priority within
``--budget-s`` seconds and the rest are listed as skipped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tokctl.vit import flops  # noqa: E402
from tokctl.vit.methods.tome import ToMe  # noqa: E402
from tokctl.vit.model import build_hf_random, describe  # noqa: E402
from tokctl.vit.patch import Patch  # noqa: E402

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def settings(dtypes, batches):
    """(dtype, compiled, batch) in priority order: eager before compiled, large batches first,
    batch 1 compiled last (launch-bound, and the slowest to pay back its compile)."""
    big = [b for b in sorted(batches, reverse=True) if b > 1]
    small = [b for b in batches if b <= 1]
    order = []
    for dtype in dtypes:
        order += [(dtype, False, b) for b in big + small]
        order += [(dtype, True, b) for b in big]
    order += [(dtype, True, b) for dtype in dtypes for b in small]
    return order


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, x, iters, device) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn(x)
    _sync(device)
    return (time.perf_counter() - start) / iters


def measure(model, info, r, dtype, batch, compiled, args, device, reference) -> dict:
    g = torch.Generator(device=device).manual_seed(batch)
    x = torch.randn(batch, info.num_channels, info.image_size, info.image_size, device=device,
                    generator=g).to(dtype)
    with torch.inference_mode():
        want = reference(r, x)
    method = ToMe(r=r)
    backend = args.backend if compiled else False
    patch = Patch(model, info, method, compile=backend).apply()

    def base(inp):
        with patch.disabled():
            return info.forward(inp)

    def tome(inp):
        return info.forward(inp)

    try:
        with torch.inference_mode():
            start = time.perf_counter()
            for _ in range(args.warmup):
                base(x)
                out = tome(x)
            _sync(device)
            warm_s = time.perf_counter() - start
            tokens = list(zip(patch.last_state.tokens_attn, patch.last_state.tokens_mlp))
            # Against the eager torch-merge logits of the same input (the reference forward).
            diff = float((out.float() - want.float()).abs().max())
            t_base, t_tome, ratios = [], [], []
            for k in range(args.rounds):
                pair = {}
                for which in (("base", "tome") if k % 2 == 0 else ("tome", "base")):
                    pair[which] = _time(base if which == "base" else tome, x, args.iters, device)
                t_base.append(pair["base"])
                t_tome.append(pair["tome"])
                ratios.append(pair["base"] / pair["tome"])
    finally:
        patch.remove()
    q = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else [ratios[0]] * 3
    full = [(info.num_tokens, info.num_tokens)] * info.depth
    return {"dtype": str(dtype).replace("torch.", ""), "mode": "compiled" if compiled else "eager",
            "batch": batch, "r": r, "r_per_layer": method.r_per_layer,
            "baseline_images_per_s": batch / statistics.median(t_base),
            "tome_images_per_s": batch / statistics.median(t_tome),
            "speedup": statistics.median(ratios), "speedup_q1": q[0], "speedup_q3": q[2],
            "baseline_gflops": flops.gflops(info, full), "tome_gflops": flops.gflops(info, tokens),
            "max_abs_logit_diff_vs_eager_torch_merge": diff, "warmup_s": warm_s,
            "merge": "torch (in the compiled graph)" if compiled else (
                "triton" if device.type == "cuda" else "torch")}


def fused_attention_check(model, info, dtype, device) -> str:
    """Whether ToMe's attention (log(size) as SDPA's additive mask) runs on a fused SDPA kernel:
    the math fallback is switched off, so a forward that needs it raises."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    x = torch.randn(8, info.num_channels, info.image_size, info.image_size, device=device).to(dtype)
    patch = Patch(model, info, ToMe(r=13)).apply()
    try:
        with torch.inference_mode(), sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                                  SDPBackend.CUDNN_ATTENTION]):
            info.forward(x)
        return "yes"
    except RuntimeError as exc:
        return f"no ({str(exc).splitlines()[0][:200]})"
    finally:
        patch.remove()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="a tiny ViT on the CPU (fp32/bf16, batches 1 and 4): checks the script end to end")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--dtypes", default="float16,bfloat16")
    p.add_argument("--batches", default="1,64,256")
    p.add_argument("--r", default="8,13,16")
    p.add_argument("--iters", type=int, default=10, help="forwards per timed round")
    p.add_argument("--rounds", type=int, default=6, help="timed rounds per model, interleaved")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="stop starting new settings after this many seconds")
    p.add_argument("--backend", default=None,
                   help="torch.compile backend: inductor (the CPU dry run: aot_eager, quicker to compile)")
    args = p.parse_args(argv)
    if args.cpu_dry_run:
        device = torch.device("cpu")
        torch.set_num_threads(2)
        # 8x8 patches + [CLS], 4 layers: r=16 is lowered in the last layers, as on ViT-B/16.
        model = build_hf_random("vit", 64, 4, 2, 64, 8, 10)
        args.dtypes, args.batches = "float32,bfloat16", "1,4"
        args.iters, args.rounds, args.warmup, args.budget_s = 2, 2, 1, float("inf")
        args.backend = args.backend or "aot_eager"
    else:
        if not torch.cuda.is_available():
            print("gpu_vit: no CUDA device here (use --cpu-dry-run)")
            return 0
        device = torch.device("cuda")
        args.backend = args.backend or "inductor"
        torch.backends.cuda.matmul.allow_tf32 = True
        model = build_hf_random("vit", 768, 12, 12, 224, 16, 1000)
    info = describe(model)
    model.eval()
    dtypes = [DTYPES[d] for d in args.dtypes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    rs = [int(r) for r in args.r.split(",")]
    print(f"gpu_vit: {info.family} {info.num_tokens} tokens, {info.depth} layers, hidden {info.hidden_size}; "
          f"torch {torch.__version__}; device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")
    rows, skipped, started = [], [], time.perf_counter()
    current, fused = None, {}
    for dtype, compiled, batch in settings(dtypes, batches):
        label = f"{str(dtype).replace('torch.', '')} {'compiled' if compiled else 'eager'} batch {batch}"
        if time.perf_counter() - started > args.budget_s:
            skipped.append(label)
            continue
        if current != dtype:
            model.to(device=device, dtype=dtype)
            current = dtype
            if device.type == "cuda":
                fused[str(dtype)] = fused_attention_check(model, info, dtype, device)
                print(f"  {dtype}: proportional attention on a fused SDPA kernel: {fused[str(dtype)]}")

        def reference(r, x, dtype=dtype):
            # Eager ToMe with the torch merge: what the kernels and the compiled graphs must give.
            method = ToMe(r=r)
            method.kernel = False
            patch = Patch(model, info, method).apply()
            try:
                return info.forward(x)
            finally:
                patch.remove()

        for r in rs:
            try:
                row = measure(model, info, r, dtype, batch, compiled, args, device, reference)
            except Exception as exc:  # noqa: BLE001 - one failed setting must not hide the others
                row = {"dtype": str(dtype).replace("torch.", ""), "mode": "compiled" if compiled else "eager",
                       "batch": batch, "r": r, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
                print(f"  {label} r={r}: FAILED {row['error']}")
                rows.append(row)
                continue
            rows.append(row)
            print(f"  {label:28s} r={r:2d}: baseline {row['baseline_images_per_s']:9.1f} img/s, "
                  f"tome {row['tome_images_per_s']:9.1f} img/s, speedup {row['speedup']:.2f}x "
                  f"({row['speedup_q1']:.2f}-{row['speedup_q3']:.2f}), GFLOPs {row['tome_gflops']:.2f} of "
                  f"{row['baseline_gflops']:.2f}, max |logit diff| {row['max_abs_logit_diff_vs_eager_torch_merge']:.1e}, "
                  f"warm-up {row['warmup_s']:.0f} s", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if skipped:
        print(f"skipped (over --budget-s {args.budget_s:.0f}): {'; '.join(skipped)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "skipped": skipped, "fused_attention": fused}, indent=1))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
