#!/usr/bin/env bash
# The whole experiment on the embedded toy world, stage by stage: read it as the table of contents.
#
#   bash run.sh                           # both toys, 5 seeds each; about 9 minutes on 2 cores
#   SEEDS="5 6 7 8 9" FROM=5 bash run.sh  # other seeds of the DAA runs, reusing stages 1-4
#   WORLD_FLAGS="--seed 3" OUT=out_w3 bash run.sh   # another world (posts, pi_ref, pairs: everything)
#   RUNS="dpo:0.01 ais-dpo:0.01" bash run.sh   # the language toy without DPO at beta 0.1 (3 minutes less)
#   RUNS="dpo:0.01 ais-dpo:0.01 is-dpo:0.01 ais-sn-dpo:0.01" bash run.sh   # other methods (see below)
#   DAA_FLAGS="--label_smoothing 0 --lr 3e-4 --warmup_steps 20 --lr_schedule constant" bash run.sh  # before
#   FROM=8 bash run.sh                    # only the categorical toy and the analytic toys: under a minute
#   FROM=8 CAT_FLAGS="--world_seed 3" SEEDS="5 6 7 8 9" bash run.sh   # the categorical toy elsewhere
#   NPROC=4 JOBS=4 bash run.sh           # a machine with 4 GPUs (see GPUs below)
#
# Stages (FROM=n starts at stage n and reuses the earlier stages' outputs in $OUT):
#   1 the toy world   2 SFT: pi_ref   3 the gold reward model (only with JUDGE=rm)
#   4 offline pairs: two pi_ref samples a prompt, labelled by the judge
#   5 log pi_ref of the pairs (once, saved beside them), then the DAA runs
#   6 evaluation of every checkpoint   7 the claims with their confidence intervals
#   8 the categorical toy (the same claims, computed exactly; SEEDS apply) and the analytic toys
#
# RUNS lists method:beta pairs, each trained once per seed. Methods: dpo, ais-dpo (adaptive weights),
# is-dpo (clipped weights), ais-sn-dpo (adaptive weights divided by their batch mean: a control),
# wpo-dpo (WPO's weights: the policy's own probabilities, no ratio; extras/wpo.py).
# METHODS="..." and BETAS="..." instead build every method x beta pair.
# JUDGE=true (default): the toy's hidden true scorer labels the pairs and judges the win-rate.
# JUDGE=rm: a gold reward model is trained on the "human" pairs and plays both parts, as on real data.
# Extra flags per stage: WORLD_FLAGS, SFT_FLAGS, RM_FLAGS, LABEL_FLAGS, DAA_FLAGS, EVAL_FLAGS, CAT_FLAGS
# (the categorical toy: CAT_FLAGS="--world_seed 3" for another of its worlds), GAUSS_FLAGS.
# GPUs: the jobs side by side take turns on them (job slot i on GPU i mod their number), and NPROC=4 runs
# SFT, the gold RM and the labelling each in 4 processes (torchrun), one a GPU: other samples and batches
# than one process's, so other numbers.
set -euo pipefail
cd "$(dirname "$0")"

OUT=${OUT:-out}
SEEDS=${SEEDS:-0 1 2 3 4}
RUNS=${RUNS:-dpo:0.01 ais-dpo:0.01 dpo:0.1}  # the language toy's runs (the categorical toy: its own)
if [[ -n "${METHODS:-}${BETAS:-}" ]]; then
  RUNS=$(for m in ${METHODS:-dpo ais-dpo}; do for b in ${BETAS:-0.01 0.1}; do echo -n "$m:$b "; done; done)
fi
JUDGE=${JUDGE:-true}
# The toy's DAA recipe (docs/toys.md): its judge is deterministic, so each label counts as wrong with
# probability 0.35 (cDPO, METHOD.md 5: each pair's margin gets an optimum, 1/beta out); the lr drives
# beta 0.01 far in four passes, then falls over the last 20% of the steps (wsd) so that every run settles
# where its loss holds it before its last checkpoints. DAA_FLAGS come after it and win ("--label_smoothing
# 0": DPO's hard labels; needed with another --loss_type; "--lr_schedule constant": no decay).
TOY_DAA="--label_smoothing 0.35 --lr 8e-4 --warmup_steps 60 --lr_schedule wsd --decay_fraction 0.2"
TOY_DAA+=" --min_lr_ratio 0.1"
JOBS=${JOBS:-2}    # DAA runs (and evaluation shards) side by side, one CPU thread each
NPROC=${NPROC:-1}  # processes of each single-job stage (SFT, gold RM, labelling): torchrun, one a GPU
PY=${PYTHON:-python}
PYN=$PY            # how a single-job stage starts
if (( NPROC > 1 )); then PYN="$PY -m torch.distributed.run --standalone --nproc_per_node $NPROC"; fi
# GPUs: those CUDA_VISIBLE_DEVICES names if it is set, else every one nvidia-smi finds (none: nothing
# changes). The jobs side by side take turns on them: the job in slot i (0 .. JOBS-1) sees GPU i mod GPUs.
GPU_IDS=${CUDA_VISIBLE_DEVICES-$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null \
                                  | grep -x '[0-9][0-9]*' || true)}
GPU_IDS=$(echo ${GPU_IDS//,/ })  # e.g. "0 1 2 3"
gpu_of() {  # gpu_of SLOT: "CUDA_VISIBLE_DEVICES=<the slot's GPU>", or nothing without GPUs
  local ids=($GPU_IDS)
  if (( ${#ids[@]} > 0 )); then echo "CUDA_VISIBLE_DEVICES=${ids[$1 % ${#ids[@]}]}"; fi
}
side_by_side() {  # side_by_side < FILE: FILE's command lines, JOBS at a time
  if [[ -n "$GPU_IDS" ]]; then  # xargs numbers the slots of the lines it runs in $SLOT
    export GPU_IDS; export -f gpu_of
    xargs -P "$JOBS" --process-slot-var=SLOT -I{} bash -c 'export $(gpu_of "$SLOT"); {}'
  else
    xargs -P "$JOBS" -I{} bash -c "{}"
  fi
}
FROM=${FROM:-1}
start=$(date +%s)
say() { echo "[run.sh $(( $(date +%s) - start ))s] $*"; }

if (( FROM <= 1 )); then
  say "1/8 the toy world"
  $PY toy_tldr.py --out_dir "$OUT/toy_tldr" ${WORLD_FLAGS:-}
fi
if (( FROM <= 2 )); then
  say "2/8 SFT: pi_ref"
  $PYN sft.py --data "$OUT/toy_tldr" --out_dir "$OUT/sft" ${SFT_FLAGS:-}
fi
if (( FROM <= 3 )) && [[ "$JUDGE" == rm ]]; then
  say "3/8 the gold reward model"
  $PYN reward.py --mode train --sft_path "$OUT/sft" --data "$OUT/toy_tldr" --out_dir "$OUT/gold_rm" \
    ${RM_FLAGS:-}
fi
if (( FROM <= 4 )); then
  say "4/8 offline pairs: pi_ref samples labelled by the judge ($JUDGE)"
  $PYN reward.py --mode label --judge "$JUDGE" --sft_path "$OUT/sft" --gold_path "$OUT/gold_rm" \
    --data "$OUT/toy_tldr" --out_dir "$OUT/prefs" ${LABEL_FLAGS:-}
fi

mkdir -p "$OUT/logs"
if (( FROM <= 5 )); then
  say "5/8 reference log-probs: log pi_ref of the pairs, once, saved beside them ($OUT/prefs)"
  # every DAA run starts from this pi_ref on these pairs and reads them (a run with other
  # --max_prompt_len/--max_response_len in DAA_FLAGS computes its own)
  $PY dpo.py --reference_only --sft_path "$OUT/sft" --data "$OUT/prefs" --threads "$JOBS"  # alone: every core
  say "5/8 DAA runs {$RUNS} x seeds {$SEEDS} ($JOBS at a time, one thread each; logs in $OUT/logs)"
  common="--sft_path $OUT/sft --data $OUT/prefs --runs_dir $OUT/runs --threads 1"
  jobs_file="$OUT/logs/jobs.txt"
  : > "$jobs_file"
  for seed in $SEEDS; do
    for run in $RUNS; do
      method=${run%%:*} beta=${run##*:}
      case $method in
        dpo)        cmd="dpo.py" ;;
        ais-dpo)    cmd="is_dpo.py --weight adaptive" ;;
        is-dpo)     cmd="is_dpo.py --weight clipped" ;;
        ais-sn-dpo) cmd="is_dpo.py --weight adaptive --self_normalise" ;;
        wpo-dpo)    cmd="extras/wpo.py" ;;
        *) echo "error: unknown method $method in RUNS (dpo, ais-dpo, is-dpo, ais-sn-dpo, wpo-dpo)" >&2
           exit 2 ;;
      esac
      log="$OUT/logs/${method}_${beta}_${seed}.log"
      echo "$PY $cmd $common --beta $beta --seed $seed $TOY_DAA ${DAA_FLAGS:-} > $log 2>&1" >> "$jobs_file"
    done
  done
  if ! side_by_side < "$jobs_file"; then
    echo "error: a training run failed; see the logs in $OUT/logs" >&2
    exit 1
  fi
fi

if (( FROM <= 6 )); then
  say "6/8 evaluation of every checkpoint: win-rate (judge: $JUDGE) and KL ($JOBS shards side by side)"
  eval_args=(--runs "$OUT/runs/*" --data "$OUT/toy_tldr" --judge "$JUDGE" --gold_path "$OUT/gold_rm"
             --out_dir "$OUT/eval" --plots_dir "$OUT/plots")
  pids=()
  for (( i = 0; i < JOBS; i++ )); do
    env $(gpu_of "$i") $PY evaluate.py "${eval_args[@]}" --shard "$i/$JOBS" --threads 1 ${EVAL_FLAGS:-} \
      > "$OUT/logs/eval_$i.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do
    wait "$pid" || { echo "error: evaluation failed; see $OUT/logs/eval_*.log" >&2; exit 1; }
  done
  $PY evaluate.py "${eval_args[@]}" --plots_only ${EVAL_FLAGS:-} > "$OUT/logs/plots.log"
fi
if (( FROM <= 7 )); then
  say "7/8 the claims over the seeds ($OUT/eval/check.md)"
  $PY evaluate.py --out_dir "$OUT/eval" --check || echo "(some claims do not hold in this run: see above)"
fi

say "8/8 the categorical toy: the same claims, computed exactly; the analytic toys"
# shellcheck disable=SC2086
$PY toy_categorical.py --out_dir "$OUT/toy_categorical" --seeds $SEEDS ${CAT_FLAGS:-} \
  || echo "(some claims of the categorical toy do not hold in this run: see above)"
$PY toy_gaussian.py --out_dir "$OUT/toy_gaussian" ${GAUSS_FLAGS:-}

say "done. Figures and tables:"
for f in "$OUT"/plots/{dynamics,tradeoff}.png "$OUT"/eval/{summary,check}.md \
         "$OUT"/toy_categorical/{dynamics.png,summary.md,check.md} \
         "$OUT"/toy_gaussian/{correlation,variance}.png; do
  if [[ -e "$f" ]]; then echo "  $f"; fi
done
