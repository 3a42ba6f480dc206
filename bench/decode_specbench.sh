#!/usr/bin/env bash
# The decode figures of the closing note: every training-free method against `ar` on Spec-Bench
# (4 prompts per category, 128 new tokens), greedy and at temperature 0.7, in float32 and
# bfloat16. All methods of one configuration run in the same process, interleaved sample by sample.
# Usage: bash bench/decode_specbench.sh [QUESTIONS.jsonl] [OUT_DIR] [THREADS]
# A shorter pass: PER_CATEGORY=2 TEMPS=0.0 DTYPES=float32 bash bench/decode_specbench.sh ...
set -euo pipefail
SB=${1:-../shared/data/spec_bench/question.jsonl}
OUT=${2:-runs/bench}
THREADS=${3:-1}
for temp in ${TEMPS:-0.0 0.7}; do
  for dtype in ${DTYPES:-bfloat16 float32}; do
    # The paper-sized recycling tree (80 nodes) for its acceptance figure, greedy only.
    extra=$([ "$temp" = 0.0 ] && echo ",{method:recycling,budget:80,label:recycling-80}" || true)
    tokctl decode method=hybrid "also=[recycling,lookup$extra]" \
      baseline=ar data=jsonl data.path="$SB" data.per_category=${PER_CATEGORY:-4} max_new_tokens=128 \
      model.dtype=$dtype temperature=$temp threads="$THREADS" verify_cost=measure \
      hydra.run.dir="$OUT/$dtype-t$temp"
  done
done
