#!/usr/bin/env bash
# recipes/pythia_tldr.sh -- the paper's TL;DR setting (arXiv 2506.08681, Sec. 5.1 and App. D), stage by stage.
#
# Pythia policy on Reddit TL;DR: SFT on trl-lib/tldr, a larger Pythia gold reward model on the human pairs of
# trl-lib/tldr-preference, two pi_ref samples per training prompt labelled by the gold RM, then DPO and IS-DPO
# (clipped weights) over three betas and three seeds, then the gold win-rate and KL of every checkpoint.
# recipes/README.md lists every value with the paper's and where it comes from; a value the paper does not
# state is marked so there (and "# departs:" / "# not stated:" below). tests/test_recipes.py checks that the
# table and the defaults here agree.
#
#   bash recipes/pythia_tldr.sh                          # needs a GPU machine with the hub (or local copies)
#   NPROC=8 OUT=out/pythia bash recipes/pythia_tldr.sh   # every stage but the data's under torchrun
#   MODEL=/models/pythia-1b GOLD_MODEL=/models/pythia-6.9b TLDR=/data/tldr TLDR_PREF=/data/tldr-preference ...
#
# Every size is an environment variable (the test runs this file end to end at a tiny size on the CPU).
# Extra flags per stage, as run.sh takes them: SFT_FLAGS (both SFTs), RM_FLAGS (the gold RM's training and
# the labelling), DAA_FLAGS (dpo.py and is_dpo.py), EVAL_FLAGS. The 6.9B gold RM trains under --fsdp with
# --gradient_checkpointing (GOLD_FSDP=1: its float32 weights, gradients and AdamW moments, 16 bytes a
# parameter, are 110 GB: no single GPU holds them), so the recipe wants NPROC >= 2 unless GOLD_FSDP=0.
# Re-running continues: a stage whose output exists is skipped (the stages refuse to overwrite).
set -euo pipefail
cd "$(dirname "$0")/.."

# models and data (hub ids, or local directories / snapshots)
MODEL=${MODEL:-EleutherAI/pythia-1b}
GOLD_MODEL=${GOLD_MODEL:-EleutherAI/pythia-6.9b}
TLDR=${TLDR:-trl-lib/tldr}
TLDR_PREF=${TLDR_PREF:-trl-lib/tldr-preference}
OUT=${OUT:-out/pythia_tldr}
NPROC=${NPROC:-1}
PYTHON=${PYTHON:-python}

# lengths
MAX_PROMPT_LEN=${MAX_PROMPT_LEN:-512}
MAX_RESPONSE_LEN=${MAX_RESPONSE_LEN:-53}
# optimiser and schedule, shared by every training stage
WARMUP_STEPS=${WARMUP_STEPS:-150}
MIN_LR_RATIO=${MIN_LR_RATIO:-0.1}
GRAD_CLIP=${GRAD_CLIP:-1.0}
# SFT (policy and gold RM's base)
SFT_LR=${SFT_LR:-3e-6}
SFT_BATCH=${SFT_BATCH:-16}
SFT_ACCUM=${SFT_ACCUM:-8}
SFT_STEPS=${SFT_STEPS:-908}          # 1 epoch: (116,722 rows - 500 held out) / 128
SFT_VAL=${SFT_VAL:-500}
# gold reward model
RM_LR=${RM_LR:-3e-6}                 # not stated: we use the SFT rate
RM_BATCH=${RM_BATCH:-16}
RM_ACCUM=${RM_ACCUM:-8}
RM_STEPS=${RM_STEPS:-717}            # 1 epoch: (92,858 pairs - 1,000 held out) / 128
RM_VAL=${RM_VAL:-1000}
# offline pairs from pi_ref
LABEL_PROMPTS=${LABEL_PROMPTS:-92000}
LABEL_TEMPERATURE=${LABEL_TEMPERATURE:-1.0}
# DAAs
DAA_LR=${DAA_LR:-1e-6}
DAA_BATCH=${DAA_BATCH:-16}
DAA_ACCUM=${DAA_ACCUM:-8}
DAA_EPOCHS=${DAA_EPOCHS:-1}
BETAS=${BETAS:-"0.01 0.05 0.1"}
SEEDS=${SEEDS:-"1 2 3"}
LOG_W_MAX=${LOG_W_MAX:-2.0}
IS_LOSS=${IS_LOSS:-dpo}              # ipo: the authors' IS trainer (summed log-probs; recipes/README.md)
NUM_CHECKPOINTS=${NUM_CHECKPOINTS:-10}
# evaluation
EVAL_PROMPTS=${EVAL_PROMPTS:-512}
KL_PROMPTS=${KL_PROMPTS:-512}        # the KL on as many prompts as the win-rate (evaluate.py's default: 128)
EVAL_TEMPERATURE=${EVAL_TEMPERATURE:-0.01}
SAMPLE_BATCH=${SAMPLE_BATCH:-64}
# hardware: the gold RM sharded, and the checkpoints' sizes on disk (in the dtype the models are stored in)
GOLD_FSDP=${GOLD_FSDP:-1}
POLICY_GB=${POLICY_GB:-2.0}          # Pythia-1B in float16: 1.01e9 x 2 bytes
GOLD_GB=${GOLD_GB:-13.7}             # Pythia-6.9B in float16: 6.86e9 x 2 bytes

DATA=$OUT/data
mkdir -p "$DATA"
LENS=(--max_prompt_len "$MAX_PROMPT_LEN" --max_response_len "$MAX_RESPONSE_LEN")
OPT=(--warmup_steps "$WARMUP_STEPS" --min_lr_ratio "$MIN_LR_RATIO" --grad_clip "$GRAD_CLIP")

source recipes/common.sh  # run (under torchrun when NPROC > 1), todo, prepare, per_process
per_process SFT_ACCUM RM_ACCUM DAA_ACCUM
GOLD=()
if [ "$GOLD_FSDP" = 1 ]; then
  GOLD=(--fsdp --gradient_checkpointing)
  if [ "$NPROC" -lt 2 ]; then
    echo "error: GOLD_FSDP=1 shards the gold RM over GPUs: NPROC=8 (GOLD_FSDP=0: a small GOLD_MODEL)" >&2
    exit 2
  fi
fi
read -r -a betas <<< "$BETAS"
read -r -a seeds <<< "$SEEDS"
RUNS=$((2 * ${#betas[@]} * ${#seeds[@]})) CKPTS=$((NUM_CHECKPOINTS + 1))  # each run saves step 0 too
gb() { awk "BEGIN { printf \"%.0f\", $1 }"; }
echo "== disk: $RUNS runs x $CKPTS checkpoints x $POLICY_GB GB = $(gb "$RUNS * $CKPTS * $POLICY_GB") GB," \
  "+ pi_ref $POLICY_GB GB + the gold SFT and RM 2 x $GOLD_GB GB" \
  "= $(gb "$RUNS * $CKPTS * $POLICY_GB + $POLICY_GB + 2 * $GOLD_GB") GB (a running stage also keeps its" \
  "--resume state: 16 bytes a parameter)"

# 0. data: the canonical form (scale/prepare.py: the text and the policy's token ids), prompts cut at
# paragraph level to MAX_PROMPT_LEN tokens (App. D). The Pythias share one tokenizer: the gold RM's too.
PREPARE=(--tokenizer_path "$MODEL" --max_prompt_len "$MAX_PROMPT_LEN" --tldr_truncation)
prepare "$DATA/tldr_train" --kind sft --data "$TLDR" --split train "${PREPARE[@]}"
prepare "$DATA/tldr_test" --kind eval --data "$TLDR" --split test "${PREPARE[@]}" \
  --reference_column completion
prepare "$DATA/tldr_pref_train" --kind prefs --data "$TLDR_PREF" --split train "${PREPARE[@]}"

# 1. SFT of the policy (pi_ref) and of the gold RM's base, on the reference summaries
for spec in "$MODEL sft" "$GOLD_MODEL gold_sft"; do  # not stated: the gold RM's start (we: its own SFT)
  read -r model name <<< "$spec"
  extra=()
  [ "$name" = gold_sft ] && extra=("${GOLD[@]}")
  todo "$OUT/$name" && run sft.py --model_name_or_path "$model" --data "$DATA/tldr_train" \
    "${LENS[@]}" --lr "$SFT_LR" "${OPT[@]}" --batch_size "$SFT_BATCH" \
    --grad_accum "$(($SFT_ACCUM / NPROC))" \
    --steps "$SFT_STEPS" --val_size "$SFT_VAL" --out_dir "$OUT/$name" "${extra[@]}" ${SFT_FLAGS:-}
done

# 2. the gold reward model (Bradley-Terry) on the human pairs
todo "$OUT/gold_rm" && run reward.py --mode train --sft_path "$OUT/gold_sft" \
  --data "$DATA/tldr_pref_train/train.jsonl" "${LENS[@]}" --lr "$RM_LR" "${OPT[@]}" \
  --batch_size "$RM_BATCH" --grad_accum "$(($RM_ACCUM / NPROC))" --steps "$RM_STEPS" --val_size "$RM_VAL" \
  --out_dir "$OUT/gold_rm" "${GOLD[@]}" ${RM_FLAGS:-}

# 3. two pi_ref samples per training prompt, labelled by the gold RM (argmax; ties and unfinished dropped)
todo "$OUT/prefs" && run reward.py --mode label --judge rm --sft_path "$OUT/sft" \
  --gold_path "$OUT/gold_rm" --data "$DATA/tldr_train/sft.jsonl" "${LENS[@]}" \
  --num_prompts "$LABEL_PROMPTS" --temperature "$LABEL_TEMPERATURE" --sample_batch_size "$SAMPLE_BATCH" \
  --out_dir "$OUT/prefs" ${RM_FLAGS:-}

# 4. log pi_ref of the pairs, once, saved beside them ($OUT/prefs/reference_logps.pt, keyed by pi_ref, the
# pairs and the lengths): every DAA run reads them there (a run that finds them stale computes its own)
todo "$OUT/prefs/reference_logps.pt" && run dpo.py --reference_only --sft_path "$OUT/sft" \
  --data "$OUT/prefs" "${LENS[@]}" --batch_size "$DAA_BATCH" ${DAA_FLAGS:-}

# 5. DPO and IS-DPO (weights clipped at log w <= LOG_W_MAX; IS_LOSS=ipo: the authors' IS trainer's loss) for
# every beta and seed
for beta in $BETAS; do
  for seed in $SEEDS; do
    common=(--sft_path "$OUT/sft" --data "$OUT/prefs" "${LENS[@]}" --beta "$beta" --seed "$seed"
            --lr "$DAA_LR" "${OPT[@]}" --batch_size "$DAA_BATCH" --grad_accum "$(($DAA_ACCUM / NPROC))"
            --num_epochs "$DAA_EPOCHS" --num_checkpoints "$NUM_CHECKPOINTS" --runs_dir "$OUT/runs"
            ${DAA_FLAGS:-})
    todo "$OUT/runs/dpo_beta${beta}_seed$seed" && run dpo.py "${common[@]}" \
      --run_name "dpo_beta${beta}_seed$seed"
    todo "$OUT/runs/is-${IS_LOSS}_beta${beta}_seed$seed" && run is_dpo.py "${common[@]}" --weight clipped \
      --log_w_max "$LOG_W_MAX" --loss_type "$IS_LOSS" --run_name "is-${IS_LOSS}_beta${beta}_seed$seed"
  done
done

# 6. gold win-rate against the reference summaries, and KL to pi_ref, of every checkpoint
run evaluate.py --runs "$OUT/runs/*" --data "$DATA/tldr_test/eval.jsonl" --judge rm \
  --gold_path "$OUT/gold_rm" "${LENS[@]}" --num_prompts "$EVAL_PROMPTS" --kl_prompts "$KL_PROMPTS" \
  --temperature "$EVAL_TEMPERATURE" --sample_batch_size "$SAMPLE_BATCH" \
  --out_dir "$OUT/eval" --plots_dir "$OUT/plots" ${EVAL_FLAGS:-}
echo "== done: $OUT/eval/summary.md, $OUT/plots/tradeoff.png"
