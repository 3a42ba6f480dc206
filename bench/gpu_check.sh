#!/usr/bin/env bash
# The GPU check, run once on a lent GPU machine (whose python3 already has torch, triton,
# transformers, typer and rich): every Triton kernel against its torch reference with timings,
# verification cost with the tree-attention kernel at full model sizes, and the decode and
# compress-vit commands end to end on the GPU.
#
#   bash bench/gpu_check.sh [--cpu-dry-run] OUT_DIR [SITE_DIR] [TINY_LM_DIR]
#
# SITE_DIR holds the pure-Python packages the machine lacks (hydra, omegaconf, antlr4), TINY_LM_DIR
# a tiny random Llama folder (tests/conftest.py's build_tiny_lm) for the decode smoke run.
# --cpu-dry-run: the same steps on the CPU at tiny sizes, to check the script end to end before
# GPU time is spent; GPU-only steps say so and are skipped.
set -uo pipefail
dry=0
if [ "${1:-}" = --cpu-dry-run ]; then dry=1; shift; fi
out=${1:?usage: gpu_check.sh [--cpu-dry-run] OUT_DIR [SITE_DIR] [TINY_LM_DIR]}
site=${2:-}
tiny=${3:-}
dev=$([ $dry = 1 ] && echo cpu || echo cuda)
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="${site:+$site:}$PWD"
py=${PYTHON:-python3}
step() { echo; echo "=== $* ($(date +%T))"; }

step environment
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
$py -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"

step "kernels against their torch references"
$py bench/kernels.py --repeats 50 --json "$out/kernels.json"

step "tree attention block sizes (smollm2 heads, 2048-token prefix)"
$py - <<'EOF'
import torch
from tokctl.kernels.tree_attention import bench_cases, tree_attention_triton
if torch.cuda.is_available():
    import triton.testing as tt
    for label, tri, ref in bench_cases("cuda"):
        q, k, v, m = tri.__defaults__
        row = [f"{label}: ref {tt.do_bench(ref) * 1e3:.1f} us"]
        for bm, bn in [(16, 32), (16, 64), (32, 64), (64, 64), (16, 128)]:
            f = lambda: tree_attention_triton(q, k, v, m, block_m=bm, block_n=bn)
            row.append(f"{bm}x{bn} {tt.do_bench(f) * 1e3:.1f} us")
        print("; ".join(row))
else:
    print("no GPU: skipped")
EOF

# --- decode engine (section owned by the decode-engine work) ---
# Verification cost at full model sizes: eager (Triton / SDPA attention) against compiled.
step "verification cost at full model sizes, eager and compiled"
if [ $dry = 1 ]; then
  $py bench/gpu_decode.py --json "$out/verify_cost.json"  # says there is no GPU
else
  timeout 240 $py bench/gpu_decode.py --arch smollm2-135m --json "$out/verify_cost.json"
fi
# ms per forward for n = 1..64, eager against compiled, bf16 / fp32 (random SmolLM2-135M-sized
# weights: the cost does not depend on them), with the copy bandwidth.
step "ms per forward, eager vs compiled, by dtype and weights"
if [ $dry = 1 ]; then
  $py bench/engine_cost.py --arch tiny --device cpu --dtypes float32 --quant none int8 \
      --sizes 1 2 --rounds 1 --threads 2 --json "$out/engine_cost.json"
else
  timeout 240 $py bench/engine_cost.py --arch smollm2-135m --device cuda --dtypes bfloat16 float32 \
      --sizes 1 2 4 8 16 32 64 --rounds 10 --json "$out/engine_cost.json"
fi

# Run folders stay on the machine; their metrics come back as flat files (the device tool returns
# at most 8 files, two folders down).
runs=$(mktemp -d)
if [ -z "$tiny" ] && [ $dry = 1 ]; then
  tiny="$runs/tiny-lm"
  $py -c "import sys; sys.path.insert(0, 'tests'); from conftest import build_tiny_lm; build_tiny_lm('$tiny')"
fi
if [ -n "$tiny" ]; then
  max_new=$([ $dry = 1 ] && echo 16 || echo 64)
  for dtype in $([ $dry = 1 ] && echo float32 || echo float32 bfloat16); do
    # `ar` on the compiled engine against HF generate (its dynamic cache, and its static cache
    # compiled by transformers), then the Spec-Bench methods against compiled `ar`.
    step "tokctl decode on $dev: tiny random Llama, compiled ar vs HF generate, $dtype"
    $py -m tokctl.cli decode model=hf model.path="$tiny" model.device=$dev model.dtype=$dtype \
        method=ar baseline=hf "also=[{method:hf,cache:static,label:hf-static}]" compile=true \
        max_new_tokens=$max_new data.limit=4 threads=4 hydra.run.dir="$runs/ar-$dtype" 2>&1 | tail -12
    cp "$runs/ar-$dtype/metrics.json" "$out/ar-vs-hf-$dtype.json" 2>/dev/null
    step "tokctl decode on $dev: tiny random Llama, hybrid/recycling/lookup vs compiled ar, $dtype"
    $py -m tokctl.cli decode model=hf model.path="$tiny" model.device=$dev model.dtype=$dtype \
        method=hybrid baseline=ar also=[recycling,lookup] compile=true max_new_tokens=$max_new \
        data.limit=4 threads=4 hydra.run.dir="$runs/decode-$dtype" 2>&1 | tail -25
    cp "$runs/decode-$dtype/metrics.json" "$out/decode-$dtype.json" 2>/dev/null
  done
fi
# --- end of the decode engine section ---

# ToMe's r=13 on ViT-B/16 at a batch that fills the GPU, with the Triton merge and with the torch
# reference merge (TOKCTL_TRITON=0), interleaved against the uncompressed model in each run.
for kernel in triton torch; do
  step "tokctl compress-vit on the GPU: ViT-B/16 random, fp16, batch 256, ToMe r=13, $kernel merge"
  TOKCTL_TRITON=$([ $kernel = torch ] && echo 0 || echo auto) \
  $py -m tokctl.cli compress-vit model=vit_b16_random data=synthetic data.num_images=2048 \
      batch_size=256 device=cuda dtype=float16 method=tome method.r=13 warmup=3 threads=4 \
      fidelity_images=16 vis.images=2 hydra.run.dir="$runs/vit-tome-$kernel" 2>&1 | tail -6
  cp "$runs/vit-tome-$kernel/metrics.json" "$out/vit-tome-$kernel.json" 2>/dev/null
done
step "compress-vit: ViT-B/16 uncompressed vs ToMe r=8/13/16, batch 1/64/256, fp16/bf16, eager/compiled"
$py bench/gpu_vit.py --budget-s 420 --json "$out/vit.json"
step done
