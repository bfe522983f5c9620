"""Many processes: `torchrun --nproc_per_node 2` (CPU processes talking through gloo) writes the train_log and
the weights that one process writes with the same global batch (2 x --batch_size); gradient checkpointing
changes no number; fp16's loss scale survives --resume; the stages that do not split their work refuse
several processes in one line."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import dpo
import policy
import sft
import toy_tldr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_layer", "1", "--n_embd", "32", "--n_head", "2"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A toy world, a 3-step pi_ref and its human pairs as DAA data."""
    root = tmp_path_factory.mktemp("distributed")
    toy_tldr.main(toy_tldr.Args(out_dir=str(root / "world"), num_sft=120, num_human_pairs=48, num_eval=8))
    sft.main(sft.Args(data=str(root / "world"), out_dir=str(root / "sft"), steps=3, batch_size=8, val_size=8,
                      num_sample_eval=0, n_layer=1, n_embd=32, n_head=2))
    rows = [json.loads(line) for line in open(root / "world" / "prefs_human.jsonl")]
    toy_tldr.write_jsonl(root / "prefs.jsonl", rows)
    return root


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(script, argv, processes):
    """argv of `python script` (one process) or of `torchrun --nproc_per_node <processes> script`."""
    if processes == 1:
        return [sys.executable, script, *argv]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
            "--master_port", str(free_port()), script, *argv]


def run(script, argv, processes=1):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command(script, [str(a) for a in argv], processes), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def stage_argv(tiny, script, out):
    """Each stage's flags for a tiny run: 2 micro-batches a step (no_sync on the first)."""
    common = ["--threads", 1, "--warmup_steps", 1, "--grad_accum", 2]
    if script == "sft.py":
        return ["--data", tiny / "world", "--out_dir", out, "--steps", 4, "--val_size", 8,
                "--num_sample_eval", 0, *TINY, *common]
    if script == "reward.py":
        return ["--mode", "train", "--sft_path", tiny / "sft", "--data", tiny / "world", "--out_dir", out,
                "--steps", 4, "--val_size", 8, "--lr", 1e-2, *common]
    daa = ["--sft_path", tiny / "sft", "--data", tiny / "prefs.jsonl", "--runs_dir", out, "--run_name", "r",
           "--num_epochs", 1, "--num_checkpoints", 1, "--lr", 1e-2, "--beta", 0.5, *common]
    return daa + (["--weight", "adaptive", "--self_normalise"] if script == "is_dpo.py" else [])


def output_dir(out, script):
    return out / "r" if script in ("dpo.py", "is_dpo.py") else out


def read_log(directory):
    return [json.loads(line) for line in open(directory / "train_log.jsonl")]


def weights(directory):
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


@pytest.mark.parametrize("script", ["sft.py", "reward.py", "dpo.py", "is_dpo.py"])
def test_two_processes_write_what_one_process_writes_with_the_same_global_batch(tiny, tmp_path, script):
    """--batch_size 4 in each of 2 processes == --batch_size 8 in one: every train_log number (losses,
    margins, accuracies, importance-weight statistics, the self-normalised weights' loss, gradient norms)
    and the saved weights, to float rounding. A process whose gradients were not averaged with the other's
    (a forward that bypasses DDP, a missed sync) would train on half the data and fail both."""
    one = run(script, stage_argv(tiny, script, tmp_path / "one") + ["--batch_size", 8])
    assert one.returncode == 0, one.stderr[-3000:]
    two = run(script, stage_argv(tiny, script, tmp_path / "two") + ["--batch_size", 4], processes=2)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (output_dir(tmp_path / name, script) for name in ("one", "two"))
    log_a, log_b = read_log(a), read_log(b)
    assert len(log_a) == len(log_b) > 1
    for row_a, row_b in zip(log_a, log_b):
        assert row_a.keys() == row_b.keys()
        for key in row_a:
            assert row_b[key] == pytest.approx(row_a[key], rel=1e-4, abs=1e-5), (row_a["step"], key)
    if script == "is_dpo.py":
        assert {"weight_mean", "weight_max", "ess"} <= log_a[0].keys()
        assert any(row["ess"] < 7.99 for row in log_a)  # the weights differ: their global statistics count
    model = max(a.glob("ckpt-*"), key=lambda p: int(p.name[5:])) if script in ("dpo.py", "is_dpo.py") else a
    w_a, w_b = weights(model), weights(b / model.relative_to(a))
    assert w_a.keys() == w_b.keys()
    for k in w_a:
        torch.testing.assert_close(w_b[k], w_a[k], rtol=1e-3, atol=1e-4)  # Adam: rounding, amplified
    assert any(not torch.equal(w_a[k], weights(tiny / "sft")[k]) for k in w_a if k in weights(tiny / "sft"))
    assert sorted(os.listdir(tmp_path)) == ["one", "two"]  # the main process alone wrote, and cleaned up


def test_gradient_checkpointing_changes_neither_the_log_probs_nor_their_gradients(tiny):
    """Under gradient checkpointing a layer keeps no KV cache, so response_hidden runs prompt + response
    whole (response_hidden_whole): the same log-probs, reward scores and gradients as the cached path."""
    torch.manual_seed(0)
    tokenizer = policy.load_tokenizer(str(tiny / "sft"))
    rows = [json.loads(line) for line in open(tiny / "prefs.jsonl")][:6]
    pairs = [((tokenizer.encode(r["prompt"]), tokenizer.encode(" " + r[c]) + [tokenizer.eos_token_id])
              for c in ("chosen", "rejected")) for r in rows]
    batch = policy.collate_grouped([e for pair in pairs for e in pair], tokenizer.pad_token_id, k=2)
    head = torch.randn(32, 1, dtype=torch.float64)
    results = []
    for checkpointing in (False, True):
        model = policy.load_policy(str(tiny / "sft")).double().train()
        forward = policy.parallel(model, dpo.sequence_logps, gradient_checkpointing=checkpointing)
        logps, _ = forward(batch, 16)
        score = policy.response_hidden(model.base_model, batch)[:, -1] @ head  # a reward-model-like read
        (logps.sum() + score.sum()).backward()
        results.append((logps.detach(), score.detach(), [p.grad for p in model.parameters()]))
        assert model.base_model.is_activation_checkpointing == checkpointing
    (l0, s0, g0), (l1, s1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s1, s0, rtol=1e-10, atol=1e-10)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-10)


def test_fp16_resume_restores_the_loss_scale(tiny, tmp_path, monkeypatch):
    """--precision fp16: the GradScaler's scale is part of the saved state. A scaler that doubles its scale
    every step overflows every few steps (that update skipped, the scale halved); a resumed run that started
    over at the initial scale skips other steps and writes another log (checked: it fails without the fix)."""
    def scaler(precision, device):
        return torch.amp.GradScaler(device.type, init_scale=2.0 ** 18, growth_interval=1,
                                    enabled=precision == "fp16")

    monkeypatch.setattr(policy, "grad_scaler", scaler)

    def args(name, **kw):
        return sft.Args(data=str(tiny / "world"), out_dir=str(tmp_path / name), steps=10, batch_size=8,
                        val_size=8, num_sample_eval=0, n_layer=1, n_embd=32, n_head=2, warmup_steps=1,
                        precision="fp16", save_every=3, **kw)

    sft.main(args("whole"))
    append = policy.append_jsonl

    def interrupted_at_step_6(path, row):
        if row.get("step") == 6:
            raise KeyboardInterrupt
        append(path, row)

    monkeypatch.setattr(policy, "append_jsonl", interrupted_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        sft.main(args("stopped"))
    monkeypatch.setattr(policy, "append_jsonl", append)
    sft.main(args("stopped", resume=True))
    whole = read_log(tmp_path / "whole")
    assert not all(map(torch.isfinite, torch.tensor([r["grad_norm"] for r in whole[:4]])))  # skips happened
    assert (tmp_path / "whole" / "train_log.jsonl").read_bytes() == \
        (tmp_path / "stopped" / "train_log.jsonl").read_bytes()


def test_stages_that_do_not_split_their_work_refuse_several_processes(tiny, tmp_path, monkeypatch):
    """rloo.py, online_dpo.py and the toys in one error line under WORLD_SIZE > 1; --resume too."""
    import online_dpo
    import rloo
    import toy_categorical
    import toy_gaussian

    monkeypatch.setenv("WORLD_SIZE", "2")
    calls = [lambda: rloo.train(rloo.Args(), rloo.rloo_step, "rloo"),
             lambda: online_dpo.main(online_dpo.Args()),
             lambda: toy_tldr.main(toy_tldr.Args(out_dir=str(tmp_path / "w"))),
             lambda: toy_gaussian.main(toy_gaussian.Args(out_dir=str(tmp_path / "g"))),
             lambda: toy_categorical.main(toy_categorical.Args())]
    for call in calls:
        with pytest.raises(SystemExit, match="runs in one process: start it with python"):
            call()
    with pytest.raises(SystemExit, match="--resume works in one process only"):
        sft.main(sft.Args(data=str(tiny / "world"), out_dir=str(tmp_path / "s"), resume=True))
    assert not os.listdir(tmp_path)
