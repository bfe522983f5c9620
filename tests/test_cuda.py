"""The CUDA path (bf16 autocast), on a machine with a GPU; skipped elsewhere, CI included.

The rest of the suite hides the GPU (tests/conftest.py); these tests give it back to the command
lines they start: the whole tiny main job runs on CUDA, and the fused log-probs and the reward scores
under bf16 autocast on CUDA agree with float32 on the CPU to bf16's precision."""
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, VISIBLE_GPUS

# run.sh at a tiny size: every stage, the toy world to the claims, in a few minutes
TINY = {
    "WORLD_FLAGS": "--num_sft 240 --num_human_pairs 96 --num_eval 12",
    "SFT_FLAGS": "--steps 20 --lr 0.01 --warmup_steps 0 --batch_size 16 --val_size 16 --num_sample_eval 4 "
                 "--n_layer 1 --n_embd 32 --n_head 2",
    "RM_FLAGS": "--steps 3 --batch_size 8 --val_size 16",
    "LABEL_FLAGS": "--num_prompts 48",
    "DAA_FLAGS": "--num_epochs 4 --batch_size 2 --num_checkpoints 2 --warmup_steps 0 --lr 1e-2",
    "EVAL_FLAGS": "--num_prompts 6",
    "GAUSS_FLAGS": "--n_theta 5 --n_samples 100 --t_max 3 --n_mc 200",
}


def gpu_env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    if VISIBLE_GPUS is not None:
        env["CUDA_VISIBLE_DEVICES"] = VISIBLE_GPUS
    return {**env, **extra}


def cuda_available():
    if shutil.which("nvidia-smi") is None:
        return False
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                           env=gpu_env(), capture_output=True, text=True, timeout=120)
    return probe.stdout.strip() == "True"


pytestmark = pytest.mark.skipif(not cuda_available(), reason="no CUDA GPU on this machine")


def test_the_tiny_main_job_runs_on_cuda(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "run.sh"], cwd=ROOT,
                          env=gpu_env(**TINY, OUT=str(out), PYTHON=sys.executable),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"^sft: .* rows, cuda", proc.stdout, re.M)  # sft.py says where it trains
    rows = [json.loads(line) for line in open(out / "eval" / "results.jsonl")]
    assert len(rows) == len(list(out.glob("runs/*/ckpt-*"))) >= 6
    assert all(math.isfinite(r["kl"]) and 0 <= r["win_rate"] <= 1 for r in rows)
    for log in out.glob("runs/*/train_log.jsonl"):
        assert all(math.isfinite(json.loads(line)["loss"]) for line in open(log))
    assert (out / "plots" / "dynamics.png").is_file()


COMPARE = r"""
import random, torch, lm, reward, stage, toy_tldr
tokenizer = toy_tldr.build_tokenizer()
torch.manual_seed(0)
model = lm.new_model(tokenizer, n_layer=2, n_embd=64, n_head=4, max_len=88)
rng = random.Random(0)
rows = []
for _ in range(6):
    facts, prompt = toy_tldr.make_post(rng)
    for _ in range(2):
        summary = toy_tldr.reference_summary(facts, rng)
        rows.append({"prompt": prompt, "response": summary[: rng.randint(1, 60)]})
examples = lm.encode(tokenizer, rows, "response", 64, 24)
pairs = list(zip(examples[0::2], examples[1::2]))
device, autocast = stage.device_and_autocast()
assert device.type == "cuda", device
cpu = lm.pair_logps(model, pairs, tokenizer.pad_token_id, torch.device("cpu"), 1024)
with autocast:
    gpu = lm.pair_logps(model.to(device), pairs, tokenizer.pad_token_id, device, 1024)
for a, b in zip(cpu[:2], gpu[:2]):
    torch.testing.assert_close(b.detach().float().cpu(), a.detach().float(), rtol=2e-2, atol=0.5)
batch = lm.collate_grouped([ex for pair in pairs for ex in pair], tokenizer.pad_token_id, k=2)
from transformers import GPTNeoXConfig, GPTNeoXForSequenceClassification
torch.manual_seed(1)
config = {k: v for k, v in model.config.to_dict().items() if k not in ("id2label", "label2id")}
scorer = GPTNeoXForSequenceClassification(GPTNeoXConfig(**config, num_labels=1)).eval()
with torch.no_grad():
    s_cpu = reward.reward_scores(scorer, batch)
    with autocast:
        s_gpu = reward.reward_scores(scorer.to(device), lm.to_device(batch, device))
torch.testing.assert_close(s_gpu.cpu(), s_cpu, rtol=5e-2, atol=5e-2)
logps_gap = float((gpu[0].detach().float().cpu() - cpu[0].detach()).abs().max())
print("ok", logps_gap, float((s_gpu.cpu() - s_cpu).abs().max()))
"""


def test_bf16_on_cuda_agrees_with_float32_on_the_cpu():
    proc = subprocess.run([sys.executable, "-c", COMPARE], cwd=ROOT, env=gpu_env(PYTHONPATH=ROOT),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stdout[-2000:] + proc.stderr[-3000:]
