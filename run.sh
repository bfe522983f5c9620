#!/usr/bin/env bash
# The whole experiment on the embedded toy world, stage by stage: read it as the table of contents.
#
#   bash run.sh                      # one seed, 8-10 minutes on a 2-core laptop CPU
#   FROM=5 SEEDS="1 2" bash run.sh   # then two more seeds: the README's table (another 10 minutes)
#   OUT=/tmp/x BETAS=0.01 bash run.sh
#
# Every stage also runs alone (python <stage>.py --help). Extra flags per stage can be passed in
# WORLD_FLAGS, SFT_FLAGS, RM_FLAGS, LABEL_FLAGS, DAA_FLAGS, EVAL_FLAGS, GAUSS_FLAGS (the tests use
# them to run everything at a tiny size).
set -euo pipefail
cd "$(dirname "$0")"

OUT=${OUT:-out}
SEEDS=${SEEDS:-0}
BETAS=${BETAS:-0.01 0.05 0.1}
JOBS=${JOBS:-2}   # DAA runs (and evaluation shards) side by side, one CPU thread each
PY=${PYTHON:-python}
FROM=${FROM:-1}   # first stage to run; the earlier stages' outputs in $OUT are reused
start=$(date +%s)
say() { echo "[run.sh $(( $(date +%s) - start ))s] $*"; }

if (( FROM <= 1 )); then
  say "1/7 the toy world"
  $PY toy_tldr.py --out_dir "$OUT/toy_tldr" ${WORLD_FLAGS:-}
fi
if (( FROM <= 2 )); then
  say "2/7 SFT: pi_ref"
  $PY sft.py --data "$OUT/toy_tldr" --out_dir "$OUT/sft" ${SFT_FLAGS:-}
fi
if (( FROM <= 3 )); then
  say "3/7 the gold reward model"
  $PY reward.py --mode train --sft_path "$OUT/sft" --data "$OUT/toy_tldr" --out_dir "$OUT/gold_rm" ${RM_FLAGS:-}
fi
if (( FROM <= 4 )); then
  say "4/7 offline pairs: pi_ref samples labelled by the gold RM"
  $PY reward.py --mode label --sft_path "$OUT/sft" --gold_path "$OUT/gold_rm" --data "$OUT/toy_tldr" --out_dir "$OUT/prefs" ${LABEL_FLAGS:-}
fi

say "5/7 DPO, AIS-DPO and clipped IS-DPO for beta in {$BETAS}, seeds {$SEEDS} ($JOBS at a time; logs in $OUT/logs)"
mkdir -p "$OUT/logs"
# the nine runs share pi_ref and the pairs: the first to need the reference log-probs saves them for the rest
common="--sft_path $OUT/sft --data $OUT/prefs --runs_dir $OUT/runs --reference_cache $OUT/reference_logps --threads 1 ${DAA_FLAGS:-}"
jobs_file="$OUT/logs/jobs.txt"
: > "$jobs_file"
for seed in $SEEDS; do
  for beta in $BETAS; do
    echo "$PY dpo.py    $common --beta $beta --seed $seed                    > $OUT/logs/dpo_${beta}_${seed}.log 2>&1" >> "$jobs_file"
    echo "$PY is_dpo.py $common --beta $beta --seed $seed --weight adaptive > $OUT/logs/ais_${beta}_${seed}.log 2>&1" >> "$jobs_file"
    echo "$PY is_dpo.py $common --beta $beta --seed $seed --weight clipped  > $OUT/logs/is_${beta}_${seed}.log 2>&1" >> "$jobs_file"
  done
done
if ! xargs -P "$JOBS" -I{} bash -c "{}" < "$jobs_file"; then
  echo "a training run failed; see the logs in $OUT/logs" >&2
  exit 1
fi

say "6/7 evaluation: gold win-rate, true win-rate and KL of every checkpoint ($JOBS shards side by side, one thread each)"
eval_args=(--runs "$OUT/runs/*" --data "$OUT/toy_tldr" --gold_path "$OUT/gold_rm" --out_dir "$OUT/eval" --plots_dir "$OUT/plots")
pids=()
for (( i = 0; i < JOBS; i++ )); do
  $PY evaluate.py "${eval_args[@]}" --shard "$i/$JOBS" --threads 1 ${EVAL_FLAGS:-} > "$OUT/logs/eval_$i.log" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do
  wait "$pid" || { echo "evaluation failed; see $OUT/logs/eval_*.log" >&2; exit 1; }
done
$PY evaluate.py "${eval_args[@]}" --plots_only ${EVAL_FLAGS:-}
say "7/7 the two analytic toys"
$PY toy_gaussian.py --out_dir "$OUT/toy_gaussian" ${GAUSS_FLAGS:-}

say "done. Figures: $OUT/plots/tradeoff.png, $OUT/plots/dynamics.png, $OUT/toy_gaussian/*.png; table: $OUT/eval/summary.md"
