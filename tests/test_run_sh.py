"""run.sh, read through a stand-in python and nvidia-smi that only record how they were started: its stages
in order (the reference log-probs once, before the DAA runs), its methods, and its side-by-side jobs spread
over the GPUs."""
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# a stand-in python: records each command line and the GPU it was given
FAKE_PYTHON = """#!/usr/bin/env bash
gpu=${CUDA_VISIBLE_DEVICES-unset}
echo "$gpu|$*" >> "$RECORD"
if [[ $gpu != unset && -n $gpu ]]; then  # a GPU held by two jobs at once is a clash
  if mkdir "$RECORD.gpu$gpu" 2>/dev/null; then sleep 0.3; rmdir "$RECORD.gpu$gpu"
  else echo "$gpu|$*" >> "$RECORD.clashes"; sleep 0.3; fi
fi
"""


def run_sh(tmp_path, gpus_listed, check=True, **env):
    """bash run.sh with the stand-ins: ([(gpu, command line)] in the order they started, those started on
    a GPU another job held), or the CompletedProcess when check is False."""
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
    if not check:
        return proc
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines, clashes = ([line.split("|") for line in path.read_text().splitlines()] if path.exists() else []
                      for path in (record, tmp_path / "record.txt.clashes"))
    return lines, clashes


def daa_runs(lines):
    return [(gpu, cmd) for gpu, cmd in lines
            if cmd.startswith(("dpo.py", "is_dpo.py", "extras/")) and "--reference_only" not in cmd]


def test_run_sh_parses():
    assert subprocess.run(["bash", "-n", "run.sh"], cwd=ROOT).returncode == 0


def test_the_stages_in_order_and_the_reference_log_probs_once_before_the_daa_runs(tmp_path):
    lines, _ = run_sh(tmp_path, [], RUNS="dpo:0.01 ais-dpo:0.01 wpo-dpo:0.1")
    commands = [cmd for _, cmd in lines]
    first = [cmd.replace("--mode ", "").split()[:2] for cmd in commands[:5]]
    assert first == [["toy_tldr.py", "--out_dir"], ["sft.py", "--data"], ["reward.py", "train"],
                     ["reward.py", "label"], ["dpo.py", "--reference_only"]]
    out = tmp_path / "out"
    assert commands[4] == f"dpo.py --reference_only --sft_path {out}/sft --data {out}/prefs --threads 2"
    assert [c for c in commands if "--reference_only" in c] == [commands[4]]
    assert not [c for c in commands if "--reference_cache" in c]
    daa = [cmd for _, cmd in daa_runs(lines)]
    assert commands[5:5 + len(daa)] == daa and len(daa) == 6  # 3 methods x 2 seeds, right after
    for cmd in daa:
        assert f"--sft_path {out}/sft --data {out}/prefs --runs_dir {out}/runs --threads 1" in cmd
    scripts = sorted({tuple(cmd.split(" --sft_path")[0].split()) for cmd in daa})
    assert scripts == [("dpo.py",), ("extras/wpo.py",), ("is_dpo.py", "--weight", "adaptive")]
    assert any(c.startswith("evaluate.py") and "--shard" in c for c in commands[5 + len(daa):])


def test_from_6_skips_the_reference_log_probs_and_an_unknown_method_is_refused(tmp_path):
    lines, _ = run_sh(tmp_path, [], FROM="6")
    assert not [cmd for _, cmd in lines if "dpo.py" in cmd]
    (tmp_path / "bad").mkdir()
    proc = run_sh(tmp_path / "bad", [], check=False, FROM="5", RUNS="kto:0.1")
    assert proc.returncode == 2 and "error: unknown method kto in RUNS" in proc.stderr


def test_run_sh_spreads_side_by_side_jobs_over_the_gpus(tmp_path):
    lines, clashes = run_sh(tmp_path, ["0", "1"], JOBS="2", NPROC="2")
    assert not clashes  # two jobs never shared a GPU
    daa = [gpu for gpu, _ in daa_runs(lines)]
    assert len(daa) == 6 and set(daa) == {"0", "1"}  # 3 runs x 2 seeds
    shards = {cmd.split("--shard ")[1].split()[0]: gpu for gpu, cmd in lines if "--shard" in cmd}
    assert shards == {"0/2": "0", "1/2": "1"}
    launch = "-m torch.distributed.run --standalone --nproc_per_node 2 "
    single = [(gpu, cmd[len(launch):].replace("--mode ", "").split()[:2])
              for gpu, cmd in lines if cmd.startswith(launch)]  # (torchrun gives each process its GPU)
    assert single == [("unset", ["sft.py", "--data"]), ("unset", ["reward.py", "train"]),
                      ("unset", ["reward.py", "label"])]
    assert all(gpu == "unset" for gpu, cmd in lines
               if cmd.startswith(("toy_tldr.py", "toy_categorical.py")) or "--reference_only" in cmd)


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


def test_the_daa_runs_take_the_toys_recipe_and_daa_flags_after_it_win(tmp_path, monkeypatch):
    """The toy's recipe (cDPO labels, its lr and warm-up) is on every DAA run's command line, before
    DAA_FLAGS: the parser keeps a flag's last value, so DAA_FLAGS="--label_smoothing 0" gives DPO's labels."""
    import sys

    import dpo
    import is_dpo
    import stage
    recipe = ("--label_smoothing 0.35 --lr 8e-4 --warmup_steps 60 --lr_schedule wsd --decay_fraction 0.2 "
              "--min_lr_ratio 0.1")
    for flags, smoothing, lr in (("", 0.35, 8e-4), ("--label_smoothing 0 --lr 1e-3", 0.0, 1e-3)):
        (tmp_path / str(lr)).mkdir()
        lines, _ = run_sh(tmp_path / str(lr), [], RUNS="dpo:0.01 ais-dpo:0.01", DAA_FLAGS=flags)
        for _, cmd in daa_runs(lines):
            assert cmd.endswith(f"{recipe} {flags}".strip())  # the recipe, then DAA_FLAGS, last
            monkeypatch.setattr(sys, "argv", cmd.split())
            args = stage.parse_args(is_dpo.Args if cmd.startswith("is_dpo.py") else dpo.Args, "")
            assert (args.label_smoothing, args.lr, args.warmup_steps) == (smoothing, lr, 60)
            assert (args.lr_schedule, args.decay_fraction, args.min_lr_ratio) == ("wsd", 0.2, 0.1)
