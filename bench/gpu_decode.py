"""Speculative verification on a GPU: the Triton tree-attention kernel inside the lean Llama
forward, against PyTorch SDPA, at full model sizes.

    python bench/gpu_decode.py --json verify.json

For SmolLM2-135M's and a Llama-3.2-1B-sized architecture (random weights: verification cost does
not depend on them), in bf16 and fp32, after a 1024-token prefill:

- agreement: a 64-node tree forward with Triton attention against the same forward with SDPA
  (max abs logit difference, fraction of equal argmaxes);
- verify cost: seconds for one target forward of n tree tokens, n = 1..128, eager with each
  attention and compiled (``tokctl.decode.budget.measure``, the table the tree methods size their
  drafts from), and the ratio to one token.

Needs a CUDA device; on a CPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

ARCHITECTURES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         max_position_embeddings=8192, tie_word_embeddings=True, rope_theta=100000.0),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                     max_position_embeddings=8192, tie_word_embeddings=True, rope_theta=500000.0),
    # For dry runs of the scripts on a CPU.
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, max_position_embeddings=1024,
                 tie_word_embeddings=True),
}


def build(arch: str, dtype, device):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**ARCHITECTURES[arch]))
    return model.to(dtype).eval()


def agreement(model, prefix: int = 1024, nodes: int = 64) -> dict:
    import torch

    from tokctl.decode.target import FastTarget
    from tokctl.kernels.tree_attention import tree_attention, tree_attention_ref

    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(10, 1000, (prefix,), generator=g).tolist()
    tokens = torch.randint(10, 1000, (nodes,), generator=g).tolist()
    parents = [-1 if i < 8 else (i - 8) // 2 for i in range(nodes)]  # 8 roots, binary below
    out = {}
    for name, attention in (("triton", tree_attention), ("sdpa", tree_attention_ref)):
        target = FastTarget(model, None, attention=attention)
        target.prefill(prompt, capacity=prefix + nodes + 8)
        out[name] = target.forward(tokens, parents).float()
        target.commit([])
    diff = (out["triton"] - out["sdpa"]).abs().max().item()
    same = (out["triton"].argmax(-1) == out["sdpa"].argmax(-1)).float().mean().item()
    return {"max_abs_logit_diff": diff, "argmax_agreement": same,
            "logit_scale": out["sdpa"].abs().max().item()}


def verify_cost(model, prefix: int) -> dict:
    """Eager steps with each attention, and the compiled step (CUDA graphs; SDPA in the graph)."""
    from tokctl.decode.budget import measure
    from tokctl.decode.target import FastTarget
    from tokctl.kernels.tree_attention import tree_attention, tree_attention_ref

    out = {}
    for name, attention, compiled in (("triton", tree_attention, False),
                                      ("sdpa", tree_attention_ref, False),
                                      ("compiled", None, True)):
        target = FastTarget(model, None, attention=attention, compile=compiled)
        cost = measure(target, max_n=128, prefix=prefix, rounds=5)
        out[name] = {"ms": {n: 1e3 * s for n, s in zip(cost.sizes, cost.seconds)},
                     "relative": cost.relative()}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--prefix", type=int, default=1024)
    ap.add_argument("--arch", nargs="*", default=["smollm2-135m", "llama-1b"])
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch

    if not torch.cuda.is_available():
        print("bench/gpu_decode.py: no CUDA device here; nothing to measure.")
        return 0
    results = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cases": []}
    for arch in args.arch:
        for dtype in (torch.bfloat16, torch.float32):
            model = build(arch, dtype, "cuda")
            case = {"arch": arch, "dtype": str(dtype).replace("torch.", ""),
                    "agreement": agreement(model, args.prefix), "cost": verify_cost(model, args.prefix)}
            results["cases"].append(case)
            a, c = case["agreement"], case["cost"]
            print(f"{arch} {case['dtype']}: triton vs sdpa max |dlogit| {a['max_abs_logit_diff']:.3g} "
                  f"(logits up to {a['logit_scale']:.3g}), argmax agreement {a['argmax_agreement']:.3f}")
            for name in c:
                ms, rel = c[name]["ms"], c[name]["relative"]
                print(f"  {name:6s} ms per forward: " + "  ".join(
                    f"n={n}:{ms[n]:.2f}({rel[n]:.2f}x)" for n in sorted(ms)))
            del model
            torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
