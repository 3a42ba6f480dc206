#!/usr/bin/env bash
# The decode figures of the closing note: every training-free method against `ar` on Spec-Bench
# (4 prompts per category, 128 new tokens), greedy and at temperature 0.7, in float32 and
# bfloat16: one `-m` sweep (one point per temperature and dtype; all methods of a point run in
# the same process, interleaved sample by sample), then `tokctl report` on the sweep folder.
# Usage: bash bench/decode_specbench.sh [QUESTIONS.jsonl] [OUT_DIR] [THREADS]
# A shorter pass: PER_CATEGORY=2 TEMPS=0.0 DTYPES=float32 MAX_NEW_TOKENS=32 bash bench/decode_specbench.sh
# (more overrides after the third argument go to every point, e.g. data.limit=3)
# A stopped sweep continues with the same command plus +resume=true (finished points are kept).
set -euo pipefail
SB=${1:-../shared/data/spec_bench/question.jsonl}
OUT=${2:-runs/bench}
THREADS=${3:-1}
list() { echo "$1" | xargs | tr ' ' ','; }  # "0.0 0.7" -> 0.0,0.7
# recycling-80: the paper-sized recycling tree (80 nodes), for its acceptance figure.
tokctl decode -m method=hybrid "also=[recycling,lookup,{method:recycling,budget:80,label:recycling-80}]" \
  baseline=ar data=jsonl data.path="$SB" data.per_category="${PER_CATEGORY:-4}" max_new_tokens="${MAX_NEW_TOKENS:-128}" \
  model.dtype="$(list "${DTYPES:-bfloat16 float32}")" temperature="$(list "${TEMPS:-0.0 0.7}")" \
  threads="$THREADS" verify_cost=measure hydra.sweep.dir="$OUT/sweep" "${@:4}"
tokctl report "$OUT/sweep" --out "$OUT/report"
