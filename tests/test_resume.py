"""A run cannot be fooled: --resume checks the run's record (its settings, paths compared as paths, and the
fingerprints of its inputs) and refuses a finished run; Ctrl-C and a full disk end in one line that keeps
the saved state; evaluate.py keeps one pi_ref per results file; damaged results and odd flags get a line.
In-process, at tiny sizes (reward.py --mode train and dpo.py on the session pipeline's outputs)."""
import json
import os
import shutil

import pytest
from safetensors import SafetensorError
import torch
import transformers

import dpo
import evaluate
import lm
import reward
import sft
import stage
from test_outputs import result_row, stopped_at_step, weights
from test_toy_tldr import pipeline_stage, read_jsonl


def copies(tmp_path_factory, root):
    """Copies of the pipeline's world, pi_ref and pairs: inputs a test may change in place."""
    for name, stage_name in (("world", "world"), ("sft", "sft"), ("prefs", "prefs")):
        shutil.copytree(pipeline_stage(tmp_path_factory, stage_name), root / name, copy_function=shutil.copy2)
    return root / "world", root / "sft", root / "prefs"


def rm_args(root, world, pi_ref, name, **kw):
    return reward.Args(**{**dict(mode="train", sft_path=str(pi_ref), data=str(world),
                                 out_dir=str(root / name), steps=12, batch_size=8, val_size=20,
                                 save_every=5), **kw})


PAIRS = {}  # the pairs each copy holds as it was made


def dpo_args(root, pi_ref, prefs, **kw):
    epochs = 47.5 / PAIRS.setdefault(prefs, len(read_jsonl(prefs / "train.jsonl")))  # 12 steps of 4 pairs
    return dpo.Args(**{**dict(sft_path=str(pi_ref), data=str(prefs), runs_dir=str(root / "runs"),
                              run_name="run", batch_size=4, num_epochs=epochs, num_checkpoints=3,
                              save_every=5), **kw})


def changed_in_place(path, change):
    """Change the file `path` in place, check that --resume is refused, and put it back (times too)."""
    shutil.copy2(path, f"{path}.orig")
    change(path)
    return lambda: shutil.move(f"{path}.orig", path)


def halve(path):
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:len(lines) // 2]))


def relabel(path):  # chosen and rejected swapped in every row: the same size, other labels
    rows = read_jsonl(path)
    swap = {"chosen": "rejected", "rejected": "chosen",
            "chosen_ids": "rejected_ids", "rejected_ids": "chosen_ids"}
    path.write_text("".join(json.dumps({swap.get(k, k): v for k, v in r.items()}) + "\n" for r in rows))


def retrain(path):  # the same weights saved again: another time
    path.write_bytes(path.read_bytes())


@pytest.mark.parametrize("script", ["reward", "dpo"])
def test_resume_refuses_changed_inputs_and_settings_and_a_finished_run(tmp_path_factory, monkeypatch, script):
    """A run stopped by Ctrl-C at step 8 (state at step 5): --resume after the pairs were relabelled or halved
    in place, or pi_ref retrained in place, is refused in one line naming what changed, and keeps the state;
    other settings are named; a path with a trailing slash is the same path; the resumed run equals one never
    stopped; --resume of the finished run is refused and leaves it as it is."""
    root = tmp_path_factory.mktemp(f"record_{script}")
    world, pi_ref, prefs = copies(tmp_path_factory, root)
    if script == "reward":
        data, run = world / "prefs_human.jsonl", lambda name, **kw: reward.main(rm_args(root, world, pi_ref,
                                                                                         name, **kw))
        out, partial = (lambda name: root / name), (lambda name: root / f".{name}.partial")
        slash = {"data": str(world) + "/"}
    else:
        data, out, partial = prefs / "train.jsonl", (lambda name: root / name / "run"), \
            (lambda name: root / name / ".run.partial")
        run = lambda name, **kw: dpo.train(  # noqa
            dpo_args(root, pi_ref, prefs, runs_dir=str(root / name), **kw))
        slash = {"sft_path": str(pi_ref) + "/"}
    run("whole")
    stopped_at_step(monkeypatch, 8, lambda: run("stopped"))
    state = partial("stopped") / "state.pt"
    saved = state.read_bytes()
    for path, change, what in ((data, relabel, "--data"), (data, halve, "--data"),
                               (pi_ref / "model.safetensors", retrain, "--sft_path")):
        put_back = changed_in_place(path, change)
        with pytest.raises(SystemExit, match=f"^error: --resume with other settings or inputs than the "
                                             f"interrupted run \\(the contents of {what}\\)"):
            run("stopped", resume=True)
        put_back()
        assert state.read_bytes() == saved and not out("stopped").exists()
    with pytest.raises(SystemExit,
                       match=r"other settings or inputs than the interrupted run \(--lr, --seed\)"):
        run("stopped", resume=True, lr=0.5, seed=3)
    assert state.read_bytes() == saved
    run("stopped", resume=True, **slash)  # prefs/ is prefs
    assert ((out("whole") / "train_log.jsonl").read_bytes()
            == (out("stopped") / "train_log.jsonl").read_bytes())
    a, b = (weights(out(n) / ("" if script == "reward" else "ckpt-12")) for n in ("whole", "stopped"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    before = {p: p.read_bytes() for p in out("whole").rglob("*") if p.is_file()}
    with pytest.raises(SystemExit, match="^error: --resume: .* holds a finished run, nothing to resume"):
        run("whole", resume=True)
    assert {p: p.read_bytes() for p in out("whole").rglob("*") if p.is_file()} == before
    assert not partial("whole").exists()


def full_disk_at(monkeypatch, target, name, when):
    """target.name fails as a full disk makes it fail when when(*args) holds, else does what it does:
    save_pretrained with safetensors' own error, torch.save with a RuntimeError (as they do on a full
    tmpfs)."""
    real = getattr(target, name)

    def full(*args, **kwargs):
        if when(*args):
            if name == "save_pretrained":
                raise SafetensorError("Error while serializing: I/O error: "
                                      "No space left on device (os error 28)")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, full)
    return lambda: monkeypatch.setattr(target, name, real)


@pytest.mark.parametrize("where", ["checkpoint", "state"])
def test_a_full_disk_while_dpo_saves_is_one_line_and_resume_continues(tmp_path_factory, monkeypatch, where):
    """The disk fills while dpo.py writes ckpt-8 (or the state of step 10): one error line; the published run
    of an earlier seed and the state of step 5 are intact; with space back --resume ends as a run never
    stopped."""
    root = tmp_path_factory.mktemp(f"full_{where}")
    _, pi_ref, prefs = copies(tmp_path_factory, root)
    dpo.train(dpo_args(root, pi_ref, prefs, runs_dir=str(root / "whole")))
    dpo.train(dpo_args(root, pi_ref, prefs, seed=1))
    before = {p: p.read_bytes() for p in (root / "runs" / "run").rglob("*") if p.is_file()}
    if where == "checkpoint":
        space_back = full_disk_at(monkeypatch, transformers.PreTrainedModel, "save_pretrained",
                                  lambda model, path, *a: path.endswith("ckpt-8"))
    else:
        space_back = full_disk_at(monkeypatch, torch, "save",
                                  lambda obj, *a: isinstance(obj, dict) and obj.get("step") == 10)
    with pytest.raises(SystemExit, match=r"^error: .*(No space left on device|unexpected pos).*; "
                                         r".*partial keeps the last saved state"):
        dpo.train(dpo_args(root, pi_ref, prefs))
    space_back()
    assert {p: p.read_bytes() for p in (root / "runs" / "run").rglob("*") if p.is_file()} == before
    state = torch.load(root / "runs" / ".run.partial" / "state.pt", weights_only=True)
    assert state["step"] == 5
    dpo.train(dpo_args(root, pi_ref, prefs, resume=True))
    whole, resumed = root / "whole" / "run", root / "runs" / "run"
    assert (whole / "train_log.jsonl").read_bytes() == (resumed / "train_log.jsonl").read_bytes()
    a, b = weights(whole / "ckpt-12"), weights(resumed / "ckpt-12")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_full_disk_while_sft_saves_its_model_is_one_line_and_resume_continues(tmp_path_factory,
                                                                                 monkeypatch):
    root = tmp_path_factory.mktemp("full_sft")
    world = pipeline_stage(tmp_path_factory, "world")

    def args(**kw):
        return sft.Args(data=str(world), out_dir=str(root / "sft"), steps=12, batch_size=4, val_size=20,
                        num_sample_eval=0, n_layer=1, n_embd=32, n_head=2, save_every=5, **kw)

    space_back = full_disk_at(monkeypatch, transformers.PreTrainedModel, "save_pretrained", lambda *a: True)
    with pytest.raises(SystemExit, match=r"^error: .*(No space left on device|unexpected pos).*; "
                                         r".*partial keeps the last saved state"):
        sft.main(args())
    space_back()
    assert os.path.exists(root / ".sft.partial" / "state.pt") and not (root / "sft").exists()
    sft.main(args(resume=True))
    assert [r["step"] for r in read_jsonl(root / "sft" / "train_log.jsonl")] == list(range(1, 13))


def test_a_results_file_holds_the_rows_of_one_pi_ref(tmp_path):
    """Each row names the pi_ref its KL was measured against: rows of a pi_ref trained again since are dropped
    (as those of a retrained run); rows of another run with another pi_ref are refused, never mixed."""
    path = str(tmp_path / "results.jsonl")
    settings = {"num_prompts": 256}
    rows = [result_row(0, settings=settings, pi_ref="old"), result_row(1, settings=settings, pi_ref="old")]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    run = evaluate.Run("runs/r", {"run_name": "dpo_beta0.1_seed0", "run_id": "a", "pi_ref": "old"}, [])
    assert evaluate.current_results(path, [run], settings) == rows
    retrained = evaluate.Run("runs/r", {**run.args, "pi_ref": "new"}, [])
    assert evaluate.current_results(path, [retrained], settings) == []
    other = {**result_row(0, settings=settings, pi_ref="other"), "run": "ipo_beta0.1_seed0"}
    stage.append_jsonl(path, result_row(0, settings=settings, pi_ref="new"))
    stage.append_jsonl(path, other)
    with pytest.raises(SystemExit, match="measured against 2 different pi_refs"):
        evaluate.current_results(path, [retrained], settings)


@pytest.mark.parametrize("damage, words", [("repeat", "line 3 repeats line 2"),
                                           ("nan", "line 2 has a KL not finite")])
def test_a_damaged_results_file_is_refused_in_one_line(tmp_path, damage, words):
    path = tmp_path / "eval" / "results.jsonl"
    path.parent.mkdir()
    rows = [result_row(0), result_row(1, kl=float("nan")) if damage == "nan" else result_row(1),
            result_row(1)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:3 if damage == "repeat" else 2]))
    with pytest.raises(SystemExit, match=words):
        evaluate.main(evaluate.Args(out_dir=str(path.parent), plots_dir=str(tmp_path / "plots"), check=True))


def test_odd_flags_get_a_note(capsys):
    """--precision fp16 on a CPU and a warm-up longer than the run are accepted with a note saying so."""
    stage.device_and_autocast("fp16")
    assert "note: --precision fp16 on the CPU" in capsys.readouterr().out
    optimizer = torch.optim.AdamW(torch.nn.Linear(1, 1).parameters())
    stage.lr_schedule(optimizer, 30, 10)
    assert "note: --warmup_steps 30 >= the run's 10 steps" in capsys.readouterr().out


def test_a_tokenizer_without_eos_is_refused(tmp_path_factory, tmp_path):
    tokenizer = lm.load_tokenizer(str(pipeline_stage(tmp_path_factory, "sft")))
    tokenizer.save_pretrained(tmp_path)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (tmp_path / name).exists():
            saved = json.loads((tmp_path / name).read_text())
            saved.pop("eos_token", None)
            (tmp_path / name).write_text(json.dumps(saved))
    with pytest.raises(SystemExit, match="^error: .*EOS"):
        lm.load_tokenizer(str(tmp_path))
