#!/usr/bin/env bash
# recipes/llama3_ultrafeedback.sh -- the paper's instruction-following setting (arXiv 2506.08681, Sec. 5.2 and
# App. D), stage by stage: Llama-3.2-3B, SFT on UltraChat-200k, then DPO and IS-DPO (clipped weights) on the
# UltraFeedback pairs themselves (offline: no gold RM, no relabelling).
#
#   bash recipes/llama3_ultrafeedback.sh                      # a GPU machine with the hub (or local copies)
#   NPROC=8 bash recipes/llama3_ultrafeedback.sh              # the training stages under torchrun
#
# Conversational data: scale/prepare.py renders the message lists (columns `messages`, `chosen`,
# `rejected`) through a chat template into the canonical form (text and token ids) before any stage runs.
# A base model ships none, so CHAT_TEMPLATE (a .jinja file; default recipes/llama3.jinja, the
# Llama-3-Instruct format) gives one; it is saved with the prepared data's tokenizer, its <|eot_id|> as
# EOS, which sft.py reads there and saves with pi_ref for the later stages. It replaces any template the
# model's tokenizer has: CHAT_TEMPLATE= (empty) keeps the model's own instead. tests/test_recipes.py runs
# this script end to end on stand-ins.
#
# Not in this recipe: the paper evaluates on AlpacaEval 2, Arena-Hard and MT-Bench, whose judges are GPT-4
# models behind an API; run their own harnesses on the checkpoints in $OUT/runs/*/ckpt-*.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:-meta-llama/Llama-3.2-3B}
ULTRACHAT=${ULTRACHAT:-HuggingFaceH4/ultrachat_200k}
ULTRAFEEDBACK=${ULTRAFEEDBACK:-HuggingFaceH4/ultrafeedback_binarized}
CHAT_TEMPLATE=${CHAT_TEMPLATE-recipes/llama3.jinja}   # '-', not ':-': set empty, it is empty
OUT=${OUT:-out/llama3_ultrafeedback}
NPROC=${NPROC:-1}
PYTHON=${PYTHON:-python}

# optimiser and schedule, shared by both training stages
WARMUP_STEPS=${WARMUP_STEPS:-150}
MIN_LR_RATIO=${MIN_LR_RATIO:-0.1}
GRAD_CLIP=${GRAD_CLIP:-1.0}
# SFT on UltraChat (train_sft; 207,865 conversations)
SFT_LR=${SFT_LR:-1e-5}
SFT_BATCH=${SFT_BATCH:-16}
SFT_ACCUM=${SFT_ACCUM:-8}
SFT_STEPS=${SFT_STEPS:-1620}         # 1 epoch: (207,865 - 500 held out) / 128
SFT_VAL=${SFT_VAL:-500}
SFT_PROMPT_LEN=${SFT_PROMPT_LEN:-1024}
SFT_RESPONSE_LEN=${SFT_RESPONSE_LEN:-1024}   # the authors' code: 2048 tokens in all, 1024 of prompt
# DAAs on UltraFeedback (train_prefs; 61,135 pairs)
DAA_LR=${DAA_LR:-1e-6}
DAA_BATCH=${DAA_BATCH:-16}
DAA_ACCUM=${DAA_ACCUM:-8}
DAA_EPOCHS=${DAA_EPOCHS:-1}
DAA_PROMPT_LEN=${DAA_PROMPT_LEN:-512}
DAA_RESPONSE_LEN=${DAA_RESPONSE_LEN:-128}    # the authors' code: 640 tokens in all, 512 of prompt
BETAS=${BETAS:-"0.05"}
SEEDS=${SEEDS:-"1 2 3"}
LOG_W_MAX=${LOG_W_MAX:-2.0}
NUM_CHECKPOINTS=${NUM_CHECKPOINTS:-10}

source recipes/common.sh  # run (under torchrun when NPROC > 1), todo, prepare, per_process
per_process SFT_ACCUM DAA_ACCUM
OPT=(--warmup_steps "$WARMUP_STEPS" --min_lr_ratio "$MIN_LR_RATIO" --grad_clip "$GRAD_CLIP")

# 0. data: UltraChat's conversations and UltraFeedback's pairs in the canonical form, prompts cut inside
# their oldest turns to the stages' prompt budgets; the pairs through the SFT data's tokenizer (its template)
DATA=$OUT/data
prepare "$DATA/ultrachat" --kind sft --data "$ULTRACHAT" --split train_sft --completion_column messages \
  --tokenizer_path "$MODEL" ${CHAT_TEMPLATE:+--chat_template "$CHAT_TEMPLATE"} \
  --max_prompt_len "$SFT_PROMPT_LEN" --truncate_prompts
prepare "$DATA/ultrafeedback" --kind prefs --data "$ULTRAFEEDBACK" --split train_prefs \
  --tokenizer_path "$DATA/ultrachat/tokenizer" --max_prompt_len "$DAA_PROMPT_LEN" --truncate_prompts

# 1. SFT: the assistant turns of UltraChat's conversations
todo "$OUT/sft" && run sft.py --model_name_or_path "$MODEL" --data "$DATA/ultrachat" \
  --max_prompt_len "$SFT_PROMPT_LEN" --max_response_len "$SFT_RESPONSE_LEN" \
  --lr "$SFT_LR" "${OPT[@]}" --batch_size "$SFT_BATCH" --grad_accum "$(($SFT_ACCUM / NPROC))" \
  --steps "$SFT_STEPS" --val_size "$SFT_VAL" --out_dir "$OUT/sft"

# 2. log pi_ref of the pairs, once, saved beside them ($DATA/ultrafeedback/reference_logps.pt, keyed by
# pi_ref, the pairs and the lengths): every DAA run reads them there
PAIRS=$DATA/ultrafeedback/train.jsonl
DAA_LENS=(--max_prompt_len "$DAA_PROMPT_LEN" --max_response_len "$DAA_RESPONSE_LEN")
todo "$DATA/ultrafeedback/reference_logps.pt" && run dpo.py --reference_only --sft_path "$OUT/sft" \
  --data "$PAIRS" "${DAA_LENS[@]}" --batch_size "$DAA_BATCH"

# 3. DPO and IS-DPO (weights clipped at log w <= LOG_W_MAX) on UltraFeedback's own chosen / rejected pairs
for beta in $BETAS; do
  for seed in $SEEDS; do
    common=(--sft_path "$OUT/sft" --data "$PAIRS" "${DAA_LENS[@]}" --beta "$beta" --seed "$seed"
            --lr "$DAA_LR" "${OPT[@]}" --batch_size "$DAA_BATCH" --grad_accum "$(($DAA_ACCUM / NPROC))"
            --num_epochs "$DAA_EPOCHS" --num_checkpoints "$NUM_CHECKPOINTS" --runs_dir "$OUT/runs")
    todo "$OUT/runs/dpo_beta${beta}_seed$seed" && run dpo.py "${common[@]}" \
      --run_name "dpo_beta${beta}_seed$seed"
    todo "$OUT/runs/is-dpo_beta${beta}_seed$seed" && run is_dpo.py "${common[@]}" --weight clipped \
      --log_w_max "$LOG_W_MAX" --run_name "is-dpo_beta${beta}_seed$seed"
  done
done
echo "== done: checkpoints in $OUT/runs/*/ckpt-*"
