"""The labelling under torchrun (here 2 CPU processes talking through gloo): one row per kept prompt in
prompt order, the columns and types of one process's rows, each process its own random stream, and
behaviour log-probs that teacher forcing gives back. (The evaluation under torchrun: test_evaluate.py.)"""
import json
import os
import subprocess
import sys

import pytest
import torch

import lm
import reward
import sft
import toy_tldr
from test_toy_tldr import cli_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPERATURE = 0.8  # not 1: the behaviour log-prob must be of the tempered distribution


# One torchrun command runs the labelling as `python reward.py <flags>` would (runpy).
COMMANDS = """
import json, os, runpy, sys
sys.path.insert(0, os.getcwd())  # the repository root, where the scripts are
for argv in json.loads(sys.argv[1]):
    sys.argv = argv
    runpy.run_path(argv[0], run_name="__main__")
"""


def command(script, **fields):
    return [script] + [str(x) for k, v in fields.items() for x in (f"--{k}", v)] + ["--threads", "1"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny world, pi_ref and a gold RM; then, at once, the labelling of prompts in twins (p, p + " ": the
    same token ids) in 2 processes (torchrun) and in this one."""
    root = tmp_path_factory.mktemp("sharded")
    toy_tldr.main(toy_tldr.Args(out_dir=str(root / "w"), num_sft=200, num_human_pairs=60, num_eval=8))
    sft.main(sft.Args(data=str(root / "w"), out_dir=str(root / "sft"), steps=40, lr=1e-2, warmup_steps=0,
                      batch_size=8, val_size=8, num_sample_eval=0, n_layer=1, n_embd=32, n_head=2))
    reward.main(reward.Args(mode="train", sft_path=str(root / "sft"), data=str(root / "w"),
                            out_dir=str(root / "rm"), steps=3, batch_size=8, val_size=8))
    prompts = list(dict.fromkeys(json.loads(line)["prompt"] for line in open(root / "w" / "sft.jsonl")))[:36]
    toy_tldr.write_jsonl(root / "twins.jsonl", [{"prompt": p + end} for p in prompts for end in ("", " ")])
    label = dict(mode="label", judge="rm", sft_path=str(root / "sft"), gold_path=str(root / "rm"),
                 data=str(root / "twins.jsonl"), temperature=TEMPERATURE, seed=3)
    (root / "commands.py").write_text(COMMANDS)
    commands = [command("reward.py", **label, out_dir=root / "prefs2")]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two = subprocess.Popen(torchrun + [root / "commands.py", json.dumps(commands)], cwd=ROOT, text=True,
                           env=cli_env(root / "hf"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    reward.main(reward.Args(**label, out_dir=str(root / "prefs1")))
    out, _ = two.communicate(timeout=300)
    assert two.returncode == 0, out[-4000:]
    return root, prompts, out


def read_rows(path):
    return [json.loads(line) for line in open(path)]


def test_two_processes_label_one_row_per_kept_prompt_in_order(world):
    root, prompts, _ = world
    twins = [p + end for p in prompts for end in ("", " ")]
    rows = read_rows(root / "prefs2" / "train.jsonl")
    metrics = json.load(open(root / "prefs2" / "metrics.json"))
    order = [twins.index(r["prompt"]) for r in rows]
    assert order == sorted(set(order))  # each kept prompt once, in the prompts' order
    assert metrics["pairs"] == len(rows) == len(twins) - sum(metrics["dropped"].values())
    assert metrics["processes"] == 2
    assert {i % 2 for i in order} == {0, 1}  # both processes' prompts kept rows (rank r: every 2nd from r)
    one = read_rows(root / "prefs1" / "train.jsonl")
    assert "processes" not in json.load(open(root / "prefs1" / "metrics.json"))
    kinds = {k: type(v) for k, v in one[0].items()}
    assert kinds["chosen_ids"] is list and kinds["chosen_behaviour_logp"] is float
    for r in rows:  # the same columns, of the same types, as one process writes
        assert {k: type(v) for k, v in r.items()} == kinds
        assert all(type(t) is int for t in r["chosen_ids"] + r["rejected_ids"])


def test_two_processes_draw_from_two_streams(world):
    """The twins p and p + " " are the same token ids, and process 0 samples every p, process 1 every
    p + " ", in the same batches: with one random stream the two would draw the same samples."""
    root, prompts, _ = world
    tokenizer = lm.load_tokenizer(str(root / "sft"))
    assert lm.encode_prompts(tokenizer, [{"prompt": p} for p in prompts], 64) == lm.encode_prompts(
        tokenizer, [{"prompt": p + " "} for p in prompts], 64)
    drawn = {r["prompt"]: sorted([r["chosen_ids"], r["rejected_ids"]])
             for r in read_rows(root / "prefs2" / "train.jsonl")}
    first, second = [drawn.get(p) for p in prompts], [drawn.get(p + " ") for p in prompts]
    assert any(first) and any(second)
    assert sum(a == b for a, b in zip(first, second) if a or b) < len(prompts) / 4


def test_behaviour_logps_are_the_tempered_teacher_forced_logps(world):
    """Each row's stored behaviour log-prob is log pi_ref(ids | prompt) at the sampling temperature (with
    the sampler's banned tokens removed), computed here by one teacher-forced pass: rows of both
    processes, so a row whose ids and log-prob came from different samples would fail."""
    root, prompts, _ = world
    tokenizer = lm.load_tokenizer(str(root / "sft"))
    pi_ref = lm.load_model(str(root / "sft")).eval()
    banned = list(lm.banned_ids(tokenizer, pi_ref))
    rows = read_rows(root / "prefs2" / "train.jsonl")
    twins = [p + end for p in prompts for end in ("", " ")]
    by_rank = [[r for r in rows if twins.index(r["prompt"]) % 2 == rank][:3] for rank in (0, 1)]
    checked = 0
    for r in by_rank[0] + by_rank[1]:
        prompt_ids = lm.encode_prompts(tokenizer, [r], 64)[0]
        for side in ("chosen", "rejected"):
            ids = r[f"{side}_ids"]
            with torch.no_grad():
                logits = pi_ref(input_ids=torch.tensor([prompt_ids + ids])).logits[0].float()
            logits = logits[len(prompt_ids) - 1:-1]
            logits[:, banned] = float("-inf")
            logp = (logits / TEMPERATURE).log_softmax(-1).gather(-1, torch.tensor(ids)[:, None]).sum().item()
            assert r[f"{side}_behaviour_logp"] == pytest.approx(logp, abs=1e-4)
            checked += 1
    assert checked >= 8
