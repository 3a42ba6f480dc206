#!/usr/bin/env bash
# The GPU check, run once on a lent GPU machine (whose python3 already has torch, triton,
# transformers, typer and rich): every Triton kernel against its torch reference with timings,
# verification cost with the tree-attention kernel at full model sizes, and the decode and
# compress-vit commands end to end on the GPU.
#
#   bash bench/gpu_check.sh OUT_DIR [SITE_DIR] [TINY_LM_DIR]
#
# SITE_DIR holds the pure-Python packages the machine lacks (hydra, omegaconf, antlr4), TINY_LM_DIR
# a tiny random Llama folder (tests/conftest.py's build_tiny_lm) for the decode smoke run.
set -uo pipefail
out=${1:?usage: gpu_check.sh OUT_DIR [SITE_DIR] [TINY_LM_DIR]}
site=${2:-}
tiny=${3:-}
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
        q, k, v, m, p = tri.__defaults__
        row = [f"{label}: ref {tt.do_bench(ref) * 1e3:.1f} us"]
        for bm, bn in [(16, 32), (16, 64), (32, 64), (64, 64), (16, 128)]:
            f = lambda: tree_attention_triton(q, k, v, p, m, block_m=bm, block_n=bn)
            row.append(f"{bm}x{bn} {tt.do_bench(f) * 1e3:.1f} us")
        print("; ".join(row))
EOF

step "verification cost at full model sizes"
$py bench/gpu_decode.py --json "$out/verify_cost.json"

# Run folders stay on the machine; their metrics come back as flat files (the device tool returns
# at most 8 files, two folders down).
runs=$(mktemp -d)
if [ -n "$tiny" ]; then
  for dtype in float32 bfloat16; do
    step "tokctl decode on the GPU: tiny random Llama, hybrid vs ar, $dtype"
    $py -m tokctl.cli decode model=hf model.path="$tiny" model.device=cuda model.dtype=$dtype \
        method=hybrid baseline=ar also=[recycling,lookup] max_new_tokens=64 threads=4 \
        hydra.run.dir="$runs/decode-$dtype" 2>&1 | tail -25
    cp "$runs/decode-$dtype/metrics.json" "$out/decode-$dtype.json" 2>/dev/null
  done
fi

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
