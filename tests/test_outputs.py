"""Nothing lost: a run killed with SIGKILL and resumed equals a run never interrupted; two runs on one
output (the second fails at once, the first publishes a clean run); a failed run leaves the old output
whole; a torn last line of results.jsonl is dropped, reported and cut off before the next row.

The killed and the concurrent runs need processes of their own (fresh interpreters, ~5 s of imports
each). They start before the other tests, in threads that drive them, and are checked after the rest.
"""
import json
import math
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import evaluate
import stage
import toy_tldr
from test_toy_tldr import ROOT, TINY_MODEL, cli_env, pipeline_stage, read_jsonl, start_pipeline, submit_cli

# ----------------------------------------------------------------------------------------------
# the runs with processes of their own, started before the other tests


def start_process(argv, log):
    """`python <argv>` in a fresh interpreter, its output in `log` (a pipe nobody reads could fill up)."""
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, *map(str, argv)], cwd=ROOT, stdout=f,
                                stderr=subprocess.STDOUT, env=cli_env(log.parent / "hf_home"))


def wait_for(path, process, log):
    while not path.exists():
        assert process.poll() is None, f"the run ended before {path} appeared:\n{log.read_text()[-3000:]}"
        time.sleep(0.01)


def resumable_command(tmp_path_factory, script, root):
    """A few hundred tiny steps of sft.py or dpo.py, a state saved every 10: argv without its output, the
    flags naming an output (a function of a name), and where that output is."""
    world, pi_ref, prefs = (pipeline_stage(tmp_path_factory, s) for s in ("world", "sft", "prefs"))
    if script == "sft":
        argv = ["sft.py", "--data", world, "--steps", 200, "--batch_size", 4, "--val_size", 20,
                "--num_sample_eval", 0, "--lr", 1e-3, "--warmup_steps", 10, *TINY_MODEL, "--save_every", 10]
        return argv, lambda name: ["--out_dir", root / name], lambda name: root / name
    epochs = math.ceil(200 / len(read_jsonl(prefs / "train.jsonl")))
    argv = ["dpo.py", "--sft_path", pi_ref, "--data", prefs, "--batch_size", 1, "--num_epochs", epochs,
            "--num_checkpoints", 4, "--warmup_steps", 10, "--lr", 1e-3, "--run_name", "run",
            "--save_every", 10]
    return argv, lambda name: ["--runs_dir", root / name], lambda name: root / name / "run"


def kill_and_resume(tmp_path_factory, root, script):
    """A run never interrupted (on the runner); the same run in a process of its own, killed with SIGKILL soon
    after it saved its first state, then resumed (on the runner)."""
    argv, output_flag, output = resumable_command(tmp_path_factory, script, root)
    whole = submit_cli(tmp_path_factory, *argv, *output_flag("whole"))
    log = root / "killed.log"
    process = start_process([*argv, *output_flag("killed")], log)
    state = Path(stage.scratch_path(output("killed"), "partial")) / "state.pt"
    wait_for(state, process, log)
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved = torch.load(state, weights_only=True)
    published = output("killed").exists()
    resumed = submit_cli(tmp_path_factory, *argv, *output_flag("killed"), "--resume")
    return {"whole": whole.result(timeout=600), "resumed": resumed.result(timeout=600),
            "saved_step": saved["step"], "published_when_killed": published, "output": output}


def two_runs_on_one_output(tmp_path_factory, root):
    """The issue's example: two DPO runs of one run name at once. The first is frozen (SIGSTOP) as soon as it
    holds the output, while the second, with another seed, tries the same output; then the first goes on."""
    pi_ref, prefs = pipeline_stage(tmp_path_factory, "sft"), pipeline_stage(tmp_path_factory, "prefs")
    argv = ["dpo.py", "--sft_path", pi_ref, "--data", prefs, "--runs_dir", root / "runs",
            "--run_name", "same", "--batch_size", 1, "--num_checkpoints", 2]
    log = root / "first.log"
    first = start_process([*argv, "--seed", 1], log)
    wait_for(root / "runs" / ".same.partial" / stage.MARKER, first, log)  # it holds the lock
    first.send_signal(signal.SIGSTOP)
    try:
        t0 = time.time()
        second = submit_cli(tmp_path_factory, *argv, "--seed", 2).result(timeout=600)
        waited = time.time() - t0
    finally:
        first.send_signal(signal.SIGCONT)
    first.wait(timeout=600)
    return {"first": first.returncode, "first_pid": first.pid, "log": log.read_text(), "second": second,
            "second_seconds": waited, "runs": root / "runs"}


def stopped_by_signals(tmp_path_factory, root):
    """dpo.py sent SIGTERM and sft.py SIGINT (Ctrl-C), each soon after it saved a state; then --resume."""
    out = {}
    for script, sig in (("dpo", signal.SIGTERM), ("sft", signal.SIGINT)):
        argv, output_flag, output = resumable_command(tmp_path_factory, script, root)
        with open(root / f"{script}.out", "w") as o, open(root / f"{script}.err", "w") as e:
            process = subprocess.Popen([sys.executable, *map(str, argv + output_flag(script))], cwd=ROOT,
                                       stdout=o, stderr=e, env=cli_env(root / "hf_home"))
        state = Path(stage.scratch_path(output(script), "partial")) / "state.pt"
        wait_for(state, process, root / f"{script}.err")
        process.send_signal(sig)
        process.wait()
        out[script] = {"returncode": process.returncode, "stderr": (root / f"{script}.err").read_text(),
                       "state_kept": state.exists(), "output": output(script)}
        out[script]["resumed"] = submit_cli(tmp_path_factory, *argv, *output_flag(script),
                                            "--resume").result(600)
    return out


@pytest.fixture(scope="session")
def process_runs(tmp_path_factory):
    start_pipeline(tmp_path_factory)
    root = tmp_path_factory.mktemp("outputs")
    for name in ("sft", "dpo", "concurrent", "signals"):
        (root / name).mkdir()
    threads = ThreadPoolExecutor(max_workers=4)
    runs = {"sft": threads.submit(kill_and_resume, tmp_path_factory, root / "sft", "sft"),
            "dpo": threads.submit(kill_and_resume, tmp_path_factory, root / "dpo", "dpo"),
            "concurrent": threads.submit(two_runs_on_one_output, tmp_path_factory, root / "concurrent"),
            "signals": threads.submit(stopped_by_signals, tmp_path_factory, root / "signals")}
    threads.shutdown(wait=False)
    return runs


@pytest.mark.before_the_rest
def test_the_runs_with_processes_of_their_own_start_first(process_runs):
    assert set(process_runs) == {"sft", "dpo", "concurrent", "signals"}


def weights(directory):
    return load_file(os.path.join(directory, "model.safetensors"))


@pytest.mark.after_the_rest
@pytest.mark.parametrize("script", ["sft", "dpo"])
def test_a_run_killed_and_resumed_equals_a_run_never_interrupted(process_runs, script):
    run = process_runs[script].result(timeout=600)
    for name in ("whole", "resumed"):
        assert run[name].returncode == 0, run[name].stderr[-3000:]
    whole, resumed = run["output"]("whole"), run["output"]("killed")
    steps = len(read_jsonl(whole / "train_log.jsonl"))
    assert not run["published_when_killed"] and 10 <= run["saved_step"] < steps  # killed mid-training
    assert f"resumed from the state saved at step {run['saved_step']}" in run["resumed"].stdout
    assert (whole / "train_log.jsonl").read_bytes() == (resumed / "train_log.jsonl").read_bytes()
    assert [r["step"] for r in read_jsonl(resumed / "train_log.jsonl")] == list(range(1, steps + 1))
    models = ["."] if script == "sft" else sorted(p.name for p in whole.glob("ckpt-*"))
    assert models == (["."] if script == "sft" else sorted(p.name for p in resumed.glob("ckpt-*")))
    for model in models:
        a, b = weights(whole / model), weights(resumed / model)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), model
    if script == "sft":
        val = [json.loads((d / "metrics.json").read_text())["val_loss"] for d in (whole, resumed)]
        assert val[0] == val[1]
    assert "state.pt" not in os.listdir(resumed)  # the state is not part of the output
    assert not [name for name in os.listdir(resumed.parent) if name.startswith(".")]  # no lock or copy left


@pytest.mark.after_the_rest
@pytest.mark.parametrize("script", ["dpo", "sft"])
def test_sigterm_and_ctrl_c_end_in_one_line_that_says_what_was_kept_and_resume_continues(
        process_runs, script):
    run = process_runs["signals"].result(timeout=600)[script]
    assert run["returncode"] == 1 and "Traceback" not in run["stderr"], run["stderr"][-3000:]
    assert run["stderr"].strip().splitlines()[-1].startswith("error: stopped by Ctrl-C or SIGTERM; ")
    assert run["stderr"].strip().endswith(".partial keeps the last saved state: the same command with "
                                          "--resume continues it"), run["stderr"][-3000:]
    assert run["state_kept"] and run["resumed"].returncode == 0, run["resumed"].stderr[-3000:]
    steps = [r["step"] for r in read_jsonl(run["output"] / "train_log.jsonl")]
    assert steps == list(range(1, len(steps) + 1))


@pytest.mark.after_the_rest
def test_a_second_run_on_the_same_output_fails_at_once_and_the_first_publishes_a_clean_run(process_runs):
    run = process_runs["concurrent"].result(timeout=600)
    second = run["second"].stderr.strip().splitlines()
    assert run["second"].returncode == 1 and second[-1].startswith("error:"), run["second"].stderr[-3000:]
    assert f"being written by another run (pid {run['first_pid']})" in second[-1]
    assert run["second_seconds"] < 60  # it did not wait for the first (frozen) run
    assert run["first"] == 0, run["log"][-3000:]
    out = run["runs"] / "same"
    args = json.loads((out / "args.json").read_text())
    assert args["seed"] == 1 and args["run_id"] == stage.read_marker(out)["run"]
    log = read_jsonl(out / "train_log.jsonl")
    assert [r["step"] for r in log] == list(range(1, args["total_steps"] + 1))  # steps 1, 2, ... once each
    assert sorted(os.listdir(run["runs"])) == ["same"]  # no lock, no unfinished copy left


# ----------------------------------------------------------------------------------------------
# in-process: a failed run keeps the old output; leftovers; resume refused without --resume


def small_world(out_dir, seed=0):
    toy_tldr.main(toy_tldr.Args(out_dir=str(out_dir), seed=seed, num_sft=20, num_human_pairs=20, num_eval=5))


def test_a_run_that_fails_while_writing_leaves_the_old_output_whole(tmp_path, monkeypatch):
    small_world(tmp_path / "world")
    before = {p: p.read_bytes() for p in (tmp_path / "world").rglob("*") if p.is_file()}

    def full_disk(path, rows):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(toy_tldr, "write_jsonl", full_disk)
    with pytest.raises(SystemExit, match=r"^error: No space left on device: .*sft\.jsonl$"):
        small_world(tmp_path / "world", seed=1)
    assert {p: p.read_bytes() for p in (tmp_path / "world").rglob("*") if p.is_file()} == before
    assert os.listdir(tmp_path) == ["world"]  # the unfinished copy and the lock are gone


def test_copies_left_by_a_killed_publish_are_cleared_by_the_next_run(tmp_path, capsys, monkeypatch):
    small_world(tmp_path / "world")
    for leftover in (".world.partial", ".world.old"):  # a killed run (no state saved), a killed publish
        (tmp_path / leftover).mkdir()
    (tmp_path / ".world.partial" / stage.MARKER).write_text(json.dumps({"stage": "toy_tldr", "run": "x"}))
    small_world(tmp_path / "world", seed=1)
    assert "left by an interrupted run" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["world"]
    assert json.loads((tmp_path / "world" / "config.json").read_text())["seed"] == 1
    # a publish killed between its two renames: the old output aside, none in place. The next run puts it
    # back first, so that it is there even when that run fails
    os.rename(tmp_path / "world", tmp_path / ".world.old")
    monkeypatch.setattr(toy_tldr, "write_jsonl", lambda path, rows: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        small_world(tmp_path / "world", seed=2)
    assert "putting back" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["world"]
    assert json.loads((tmp_path / "world" / "config.json").read_text())["seed"] == 1


def test_a_saved_state_is_never_thrown_away_without_resume(tmp_path):
    partial = tmp_path / ".run.partial"
    partial.mkdir()
    (partial / stage.MARKER).write_text(json.dumps({"stage": "sft", "run": "x"}))
    (partial / "state.pt").write_bytes(b"")
    with pytest.raises(SystemExit, match="pass --resume to continue it"):
        stage.start_output(str(tmp_path / "run"), "sft")
    assert sorted(os.listdir(tmp_path)) == [".run.partial"] and (partial / "state.pt").exists()


def test_a_lock_is_held_by_one_output_at_a_time(tmp_path):
    output = stage.start_output(str(tmp_path / "out"), "toy_tldr")
    try:
        with pytest.raises(SystemExit, match=f"being written by another run \\(pid {os.getpid()}\\)"):
            stage.Output(str(tmp_path / "out"), "toy_tldr")
    finally:
        output.publish()
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(tmp_path / "out") == [stage.MARKER]


def stopped_at_step(monkeypatch, step, run):
    """run() stopped as by Ctrl-C (a KeyboardInterrupt) just when it would log `step` to its train_log."""
    append = stage.append_jsonl

    def interrupted(path, row):
        if row.get("step") == step:
            raise KeyboardInterrupt
        append(path, row)

    monkeypatch.setattr(stage, "append_jsonl", interrupted)
    with pytest.raises(SystemExit, match="^error: stopped by Ctrl-C or SIGTERM; .*partial keeps the last "
                                         "saved state: the same command with --resume continues it$"):
        run()
    monkeypatch.setattr(stage, "append_jsonl", append)


def test_a_gold_rm_run_stopped_by_ctrl_c_keeps_its_state_and_resumes_exactly(tmp_path_factory, monkeypatch):
    """In-process, reward.py --mode train: a KeyboardInterrupt at step 8 (a state was saved at step 5) keeps
    the state; a new run without --resume refuses to throw it away, one with other flags refuses to go on;
    --resume ends where an uninterrupted run does."""
    import reward

    world, pi_ref = pipeline_stage(tmp_path_factory, "world"), pipeline_stage(tmp_path_factory, "sft")
    root = tmp_path_factory.mktemp("rm_resume")

    def args(name, **kw):
        return reward.Args(mode="train", sft_path=str(pi_ref), data=str(world), out_dir=str(root / name),
                           steps=12, batch_size=8, val_size=20, save_every=5, **kw)

    reward.main(args("whole"))
    stopped_at_step(monkeypatch, 8, lambda: reward.main(args("stopped")))
    assert not (root / "stopped").exists() and (root / ".stopped.partial" / "state.pt").exists()
    with pytest.raises(SystemExit, match="pass --resume to continue it"):
        reward.main(args("stopped"))
    with pytest.raises(SystemExit, match=r"other settings or inputs than the interrupted run \(--lr\)"):
        reward.main(args("stopped", resume=True, lr=0.5))
    assert (root / ".stopped.partial" / "state.pt").exists()  # the refusal keeps the state
    reward.main(args("stopped", resume=True))
    whole, resumed = root / "whole", root / "stopped"
    assert (whole / "train_log.jsonl").read_bytes() == (resumed / "train_log.jsonl").read_bytes()
    a, b = weights(whole), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(os.listdir(root)) == ["stopped", "whole"]


# ----------------------------------------------------------------------------------------------
# results.jsonl: a torn last line


def result_row(step, **extra):
    return {"run": "dpo_beta0.1_seed0", "run_id": "a", "method": "dpo", "beta": 0.1, "seed": 0, "step": step,
            "fraction": step / 2, "epoch": step / 2, "kl": 0.1 * step, "win_rate": 0.5, "mean_length": 9.0,
            **extra}


def test_a_torn_last_line_of_results_is_dropped_reported_and_cut_before_the_next_row(tmp_path, capsys):
    path = tmp_path / "eval" / "results.jsonl"
    path.parent.mkdir()
    rows = [result_row(0), result_row(1)]
    whole = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_text(whole + json.dumps(result_row(2))[:40])  # the disk filled while the third row was written
    assert evaluate.read_results(path) == rows
    assert "dropped a torn last line" in capsys.readouterr().out
    # --plots_only reads it too: plots and summary of the whole rows, the file left as it is
    evaluate.main(evaluate.Args(out_dir=str(path.parent), plots_dir=str(tmp_path / "plots"), plots_only=True))
    assert "dropped a torn last line" in capsys.readouterr().out
    assert (tmp_path / "plots" / "tradeoff.png").is_file()
    assert "| dpo | 0.1 | 1 |" in (path.parent / "summary.md").read_text()
    # before a row is appended (under the lock) the torn line is cut off: the new row starts a line of its own
    assert evaluate.read_results(path, repair=True) == rows and path.read_text() == whole
    stage.append_jsonl(path, result_row(2))
    assert evaluate.read_results(path) == rows + [result_row(2)]
    path.write_text(whole.replace("}\n", "\n", 1) + json.dumps(result_row(2)) + "\n")  # damaged inside
    with pytest.raises(SystemExit, match="line 1 is not a JSON object"):
        evaluate.read_results(path)


def test_rows_of_other_settings_are_refused_not_silently_kept(tmp_path):
    path = str(tmp_path / "results.jsonl")
    settings = {"num_prompts": 256, "temperature": 0.01}
    # the run as it is now
    run = [evaluate.Run("runs/r", {"run_name": "dpo_beta0.1_seed0", "run_id": "a"}, [])]
    toy_tldr.write_jsonl(path, [result_row(0, settings=settings)])
    assert evaluate.current_results(path, run, settings) == [result_row(0, settings=settings)]
    with pytest.raises(SystemExit, match=r"1 rows evaluated with other settings \(num_prompts\)"):
        evaluate.current_results(path, run, {**settings, "num_prompts": 6})
    # rows of a run trained again are dropped first: a whole new job (run.sh again) is not refused
    retrained = [evaluate.Run("runs/r", {"run_name": "dpo_beta0.1_seed0", "run_id": "b"}, [])]
    assert evaluate.current_results(path, retrained, {**settings, "num_prompts": 6}) == []
    assert evaluate.read_results(path) == []


def test_two_shards_starting_together_both_get_the_results_folder(tmp_path, monkeypatch):
    """run.sh starts its evaluation shards at once on a new folder: the second may look while the first is
    writing the folder's marker (it saw a folder with a stray .tmp and no marker, or lost the .tmp under the
    first's rename). Here the second shard runs whole at the worst moment: between the first's write and
    its rename."""
    out, real_replace, calls = tmp_path / "eval", os.replace, []

    def replace(src, dst):
        if not calls:  # the first shard's first rename: the second shard (another process) runs now
            calls.append(src)
            with monkeypatch.context() as m:
                m.setattr(os, "getpid", lambda: 99999)
                stage.prepare_dir(str(out), "evaluate", own_files=evaluate.OWN_FILES)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    stage.prepare_dir(str(out), "evaluate", own_files=evaluate.OWN_FILES)
    assert calls and stage.read_marker(str(out)) == {"stage": "evaluate"}
    assert sorted(os.listdir(out)) == [stage.MARKER] and os.listdir(tmp_path) == ["eval"]  # nothing left
    stage.prepare_dir(str(out), "evaluate", own_files=evaluate.OWN_FILES)  # and again: it is its own
    (out / stage.MARKER).unlink()
    (out / "results.jsonl").write_text("{}\n")  # its own file without a marker: taken as it is
    stage.prepare_dir(str(out), "evaluate", own_files=evaluate.OWN_FILES)
    assert os.listdir(out) == ["results.jsonl"] and os.listdir(tmp_path) == ["eval"]
    (out / "x.txt").write_text("")  # a file it never wrote, and no marker: refused, nothing touched
    with pytest.raises(SystemExit, match="no stage of this project wrote"):
        stage.prepare_dir(str(out), "evaluate", own_files=evaluate.OWN_FILES)
