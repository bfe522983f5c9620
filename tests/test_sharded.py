"""Many processes (torchrun, here CPU processes talking through gloo): the labelling and the evaluation
share their work by rank, and run.sh spreads its side-by-side jobs over the GPUs.

The labelling under 2 processes: one row per kept prompt in prompt order, the columns and types of one
process's rows, each process its own random stream, and behaviour log-probs that teacher forcing gives
back. The evaluation under 2 processes: the rows of --shard 0/2 + --shard 1/2 + --plots_only, and of one
process. run.sh: read through a stand-in python and nvidia-smi that only record how they were started."""
import json
import os
import subprocess
import sys

import pytest
import torch

import evaluate
import dpo
import distributed
import policy
import reward
import sft
import toy_tldr
from test_toy_tldr import cli_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPERATURE = 0.8  # not 1: the behaviour log-prob must be of the tempered distribution


# One torchrun command runs the labelling, then the evaluation, each as `python <script> <flags>` would
# (runpy): the 2 processes pay for their interpreters and imports once.
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
    """A tiny world, pi_ref, a gold RM and two DPO runs; then, at once, in 2 processes (torchrun): the
    labelling of prompts in twins (p, p + " ": the same token ids) and the evaluation of the runs; and in
    this one: the same labelling, and the evaluation by two --shard commands and by one process."""
    root = tmp_path_factory.mktemp("sharded")
    toy_tldr.main(toy_tldr.Args(out_dir=str(root / "w"), num_sft=200, num_human_pairs=60, num_eval=8))
    sft.main(sft.Args(data=str(root / "w"), out_dir=str(root / "sft"), steps=40, lr=1e-2, warmup_steps=0,
                      batch_size=8, val_size=8, num_sample_eval=0, n_layer=1, n_embd=32, n_head=2))
    reward.main(reward.Args(mode="train", sft_path=str(root / "sft"), data=str(root / "w"),
                            out_dir=str(root / "rm"), steps=3, batch_size=8, val_size=8))
    for seed in (0, 1):
        dpo.train(dpo.Args(sft_path=str(root / "sft"), data=str(root / "w" / "prefs_human.jsonl"),
                           runs_dir=str(root / "runs"), seed=seed, num_epochs=1, batch_size=8,
                           num_checkpoints=2))
    prompts = list(dict.fromkeys(json.loads(line)["prompt"] for line in open(root / "w" / "sft.jsonl")))[:36]
    toy_tldr.write_jsonl(root / "twins.jsonl", [{"prompt": p + end} for p in prompts for end in ("", " ")])
    label = dict(mode="label", judge="rm", sft_path=str(root / "sft"), gold_path=str(root / "rm"),
                 data=str(root / "twins.jsonl"), temperature=TEMPERATURE, seed=3)
    common = dict(runs=str(root / "runs" / "*"), data=str(root / "w"), judge="rm", gold_path=str(root / "rm"),
                  num_prompts=6)
    (root / "commands.py").write_text(COMMANDS)
    commands = [command("reward.py", **label, out_dir=root / "prefs2"),
                command("evaluate.py", **common, out_dir=root / "e2", plots_dir=root / "p2")]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two = subprocess.Popen(torchrun + [root / "commands.py", json.dumps(commands)], cwd=ROOT, text=True,
                           env=cli_env(root / "hf"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    reward.main(reward.Args(**label, out_dir=str(root / "prefs1")))
    for shard in ("1/2", "0/2"):  # run.sh's way (it then draws the plots with --plots_only)
        evaluate.main(evaluate.Args(**common, out_dir=str(root / "es"), plots_dir=str(root / "ps"),
                                    shard=shard))
    evaluate.main(evaluate.Args(**common, out_dir=str(root / "e1"), plots_dir=str(root / "p1")))
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
    tokenizer = policy.load_tokenizer(str(root / "sft"))
    assert policy.encode_prompts(tokenizer, prompts, 64) == policy.encode_prompts(
        tokenizer, [p + " " for p in prompts], 64)
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
    tokenizer = policy.load_tokenizer(str(root / "sft"))
    pi_ref = policy.load_policy(str(root / "sft")).eval()
    banned = list(policy.banned_ids(tokenizer, pi_ref))
    rows = read_rows(root / "prefs2" / "train.jsonl")
    twins = [p + end for p in prompts for end in ("", " ")]
    by_rank = [[r for r in rows if twins.index(r["prompt"]) % 2 == rank][:3] for rank in (0, 1)]
    checked = 0
    for r in by_rank[0] + by_rank[1]:
        prompt_ids = policy.encode_prompts(tokenizer, [r["prompt"]], 64)[0]
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


def results(path):
    return {(r["run"], r["step"]): r for r in evaluate.read_results(path)}


def test_two_processes_evaluate_as_the_shards_and_one_process(world):
    root, _, printed = world
    # the main process had 3 of the 6 checkpoints to do (the other prints nothing: init_distributed)
    assert (f"evaluate: 3 checkpoints to do (0 already in {root / 'e2' / 'results.jsonl'}), 6 prompts "
            f"each (process 0 of 2)") in printed
    assert "(process 1 of 2)" not in printed
    two, shards, one = results(root / "e2" / "results.jsonl"), results(root / "es" / "results.jsonl"), \
        results(root / "e1" / "results.jsonl")
    assert len(two) == len(list(root.glob("runs/*/ckpt-*"))) == 6
    assert len(evaluate.read_results(root / "e2" / "results.jsonl")) == 6  # each checkpoint once
    assert two == shards == one  # every number, not just close: a checkpoint's evaluation is seeded
    assert any(r["kl"] > 0 for r in two.values())
    assert (root / "p2" / "tradeoff.png").is_file() and (root / "p2" / "dynamics.png").is_file()
    assert (root / "e2" / "summary.md").read_text() == (root / "e1" / "summary.md").read_text()


# ---------------------------------------------------------------------------------------------
# run.sh on a machine with GPUs: a stand-in python records each command line and the GPU it was given


FAKE_PYTHON = """#!/usr/bin/env bash
gpu=${CUDA_VISIBLE_DEVICES-unset}
echo "$gpu|$*" >> "$RECORD"
if [[ $gpu != unset && -n $gpu ]]; then  # a GPU held by two jobs at once is a clash
  if mkdir "$RECORD.gpu$gpu" 2>/dev/null; then sleep 0.3; rmdir "$RECORD.gpu$gpu"
  else echo "$gpu|$*" >> "$RECORD.clashes"; sleep 0.3; fi
fi
"""


def run_sh(tmp_path, gpus_listed, **env):
    """bash run.sh with the stand-ins: ([(gpu, command line)] in the order they started, those started on
    a GPU another job held)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python").write_text(FAKE_PYTHON)
    smi = "printf '%s\\n' " + " ".join(gpus_listed) if gpus_listed else "echo 'No devices were found'; exit 6"
    (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\n{smi}\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    record = tmp_path / "record.txt"
    base = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    base.update(PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=str(bin_dir / "python"), RECORD=str(record),
                OUT=str(tmp_path / "out"), SEEDS="0 1", JUDGE="rm")
    proc = subprocess.run(["bash", "run.sh"], cwd=ROOT, env={**base, **env}, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines, clashes = ([line.split("|") for line in path.read_text().splitlines()] if path.exists() else []
                      for path in (record, tmp_path / "record.txt.clashes"))
    return lines, clashes


def test_run_sh_spreads_side_by_side_jobs_over_the_gpus(tmp_path):
    lines, clashes = run_sh(tmp_path, ["0", "1"], JOBS="2", NPROC="2")
    assert not clashes  # two jobs never shared a GPU
    daa = [gpu for gpu, cmd in lines if cmd.startswith(("dpo.py", "is_dpo.py"))]
    assert len(daa) == 4 and set(daa) == {"0", "1"}
    shards = {cmd.split("--shard ")[1].split()[0]: gpu for gpu, cmd in lines if "--shard" in cmd}
    assert shards == {"0/2": "0", "1/2": "1"}
    launch = "-m torch.distributed.run --standalone --nproc_per_node 2 "
    single = [(gpu, cmd[len(launch):].replace("--mode ", "").split()[:2])
              for gpu, cmd in lines if cmd.startswith(launch)]  # (torchrun gives each process its GPU)
    assert single == [("unset", ["sft.py", "--data"]), ("unset", ["reward.py", "train"]),
                      ("unset", ["reward.py", "label"])]
    assert all(gpu == "unset" for gpu, cmd in lines if cmd.startswith(("toy_tldr.py", "toy_categorical.py")))


def test_run_sh_takes_the_gpus_of_cuda_visible_devices_in_turn(tmp_path):
    lines, _ = run_sh(tmp_path, ["0", "1", "2"], JOBS="3", FROM="6", CUDA_VISIBLE_DEVICES="4,6")
    shards = {cmd.split("--shard ")[1].split()[0]: gpu for gpu, cmd in lines if "--shard" in cmd}
    assert shards == {"0/3": "4", "1/3": "6", "2/3": "4"}  # slot i on GPU i mod 2 of those listed


@pytest.mark.parametrize("hidden", [True, False])
def test_run_sh_without_gpus_changes_nothing(tmp_path, hidden):
    """No GPU (nvidia-smi finds none), or GPUs hidden (CUDA_VISIBLE_DEVICES="", as the tests do): no job
    is given one, and no stage runs under torchrun unless NPROC asks."""
    hide = {"CUDA_VISIBLE_DEVICES": ""} if hidden else {}
    lines, _ = run_sh(tmp_path, ["0", "1"] if hidden else [], **hide)
    assert len(lines) > 10
    assert {gpu for gpu, _ in lines} == {"" if hidden else "unset"}
    assert not [cmd for _, cmd in lines if "torch.distributed" in cmd]


def test_shard_flag_and_torchrun_are_one_or_the_other(monkeypatch, tmp_path):
    """Under torchrun (here: a World of 2 processes set by hand; init_distributed keeps it) --shard is
    refused with one error line, before any work."""
    monkeypatch.setattr(distributed, "WORLD", distributed.World(rank=0, size=2))
    with pytest.raises(SystemExit) as stop:
        evaluate.main(evaluate.Args(shard="0/2", runs=str(tmp_path / "none*"), out_dir=str(tmp_path / "e")))
    assert str(stop.value) == ("error: --shard splits the checkpoints between separate commands, torchrun "
                               "between its processes: use one or the other")
