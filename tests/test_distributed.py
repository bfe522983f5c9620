"""Many processes: `torchrun --nproc_per_node 2` (CPU processes talking through gloo), under DDP and under
--fsdp, writes the train_log and the weights that one process writes with the same global batch
(2 x --batch_size); a run whose processes do not average their gradients does not; gradient checkpointing
changes no number; fp16's loss scale survives --resume; the stages that do not split their work refuse
several processes in one line."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import dpo
import is_dpo
import distributed
import policy
import reward
import sft
import toy_tldr
from test_outputs import stopped_at_step
from test_toy_tldr import cli_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("sft.py", "reward.py", "dpo.py", "is_dpo.py")

# One torchrun command runs every stage, one after the other, as `python <script> <flags>` would (runpy):
# its 2 processes pay for their interpreters and imports once, and keep their process group from stage to
# stage. An entry that must fail prints its error line and the next one runs; "unsynced" runs the stage
# with distributed.parallel's module replaced by the bare Forward: no DDP, so no gradient is ever averaged.
DRIVER = """
import json, os, runpy, sys
import torch
sys.path.insert(0, os.getcwd())  # the repository root, where the scripts are
import distributed
parallel, rank = distributed.parallel, int(os.environ["RANK"])


def unsynced(model, fn, *_):
    return distributed.Forward(fn, model)


for argv, how in json.loads(sys.argv[1]):
    distributed.parallel = parallel if how != "unsynced" else unsynced
    sys.argv = argv
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        if how != "fails":
            raise
        print(f"rank {rank}: {argv[0]} stopped: {e}", file=sys.stderr, flush=True)
    assert torch.distributed.is_initialized(), argv
    world = distributed.World(rank, 2, int(os.environ["LOCAL_RANK"]))
    assert distributed.WORLD == world, (argv, distributed.WORLD)
    print(f"rank {rank}: {argv[0]} {how} -> {distributed.WORLD}", file=sys.stderr, flush=True)
"""


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


def stage_flags(tiny, script, out, batch_size):
    """Each stage's flags (its Args fields) for a tiny run: 2 micro-batches a step (no sync on the first)."""
    common = dict(threads=1, warmup_steps=1, grad_accum=2, batch_size=batch_size)
    if script == "sft.py":
        return dict(data=str(tiny / "world"), out_dir=str(out), steps=4, val_size=8, num_sample_eval=0,
                    n_layer=1, n_embd=32, n_head=2, **common)
    if script == "reward.py":
        return dict(mode="train", sft_path=str(tiny / "sft"), data=str(tiny / "world"), out_dir=str(out),
                    steps=4, val_size=8, lr=1e-2, **common)
    daa = dict(sft_path=str(tiny / "sft"), data=str(tiny / "prefs.jsonl"), runs_dir=str(out), run_name="r",
               num_epochs=1, num_checkpoints=1, lr=1e-2, beta=0.5, **common)
    return {**daa, "weight": "adaptive", "self_normalise": True} if script == "is_dpo.py" else daa


def one_process(script, flags):
    """The stage run in this process, as `python <script> <flags>` would run it."""
    main = {"sft.py": sft.main, "reward.py": reward.main, "dpo.py": dpo.train, "is_dpo.py": is_dpo.main}
    config = {"sft.py": sft.Args, "reward.py": reward.Args, "dpo.py": dpo.Args, "is_dpo.py": is_dpo.Args}
    main[script](config[script](**flags))


def argv(script, flags):
    return [script] + [str(x) for k, v in flags.items() for x in (f"--{k}", v)]


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    """Every stage in 2 processes with --batch_size 4 (one torchrun command: DRIVER), then dpo.py with a
    global batch too big for the pairs (refused), dpo.py again without gradient averaging ("unsynced"),
    every stage again under --fsdp;
    meanwhile, in this process, every stage with --batch_size 8. Returns (root, the command's output)."""
    root = tmp_path_factory.mktemp("runs")
    entries = [(argv(s, stage_flags(tiny, s, root / "two" / s, 4)), "synced") for s in STAGES]
    entries.insert(2, (argv("dpo.py", stage_flags(tiny, "dpo.py", root / "too_big", 40)), "fails"))
    entries.append((argv("dpo.py", stage_flags(tiny, "dpo.py", root / "unsynced", 4)), "unsynced"))
    entries += [(argv(s, {**stage_flags(tiny, s, root / "fsdp" / s, 4), "fsdp": True}), "fsdp")
                for s in STAGES]
    (root / "driver.py").write_text(DRIVER)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two = subprocess.Popen(torchrun + [root / "driver.py", json.dumps(entries)], cwd=ROOT, text=True,
                           env=cli_env(root / "hf"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        for script in STAGES:
            one_process(script, stage_flags(tiny, script, root / "one" / script, 8))
        out, _ = two.communicate(timeout=300)
    finally:
        two.kill()
    assert two.returncode == 0, out[-4000:]
    return root, out


def output_dir(out, script):
    return out / "r" if script in ("dpo.py", "is_dpo.py") else out


def read_log(directory):
    return [json.loads(line) for line in open(directory / "train_log.jsonl")]


def weights(directory):
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


def saved_model(directory, script):
    """The weights a stage saved: its output's, a DAA run's last checkpoint's."""
    if script not in ("dpo.py", "is_dpo.py"):
        return directory
    return max(directory.glob("ckpt-*"), key=lambda p: int(p.name[5:]))


def differences(a, b, script):
    """Where the outputs a and b of a stage differ beyond float rounding: [(step, train_log key)] and
    the names of the saved weights."""
    log_a, log_b = read_log(a), read_log(b)
    assert len(log_a) == len(log_b) > 1
    out = []
    for row_a, row_b in zip(log_a, log_b):
        assert row_a.keys() == row_b.keys()
        out += [(row_a["step"], k) for k in row_a if row_b[k] != pytest.approx(row_a[k], rel=1e-4, abs=1e-5)]
    w_a, w_b = weights(saved_model(a, script)), weights(saved_model(b, script))
    assert w_a.keys() == w_b.keys()
    # Adam amplifies rounding: a looser tolerance for the weights
    return out + [k for k in w_a if not torch.allclose(w_b[k], w_a[k], rtol=1e-3, atol=1e-4)]


@pytest.mark.parametrize("how", ["two", "fsdp"])
@pytest.mark.parametrize("script", STAGES)
def test_two_processes_write_what_one_process_writes_with_the_same_global_batch(tiny, runs, script, how):
    """--batch_size 4 in each of 2 processes == --batch_size 8 in one, under DDP ("two") and under --fsdp
    (each process holding half of every weight): every train_log number (losses, margins, accuracies,
    importance-weight statistics, the self-normalised weights' loss, gradient norms) and the saved weights,
    to float rounding."""
    root, _ = runs
    a, b = (output_dir(root / name / script, script) for name in ("one", how))
    assert differences(a, b, script) == []
    if script == "is_dpo.py":
        log = read_log(a)
        assert {"weight_mean", "weight_max", "ess"} <= log[0].keys()
        assert any(row["ess"] < 7.99 for row in log)  # the weights differ: their global statistics count
    trained, start = weights(saved_model(a, script)), weights(tiny / "sft")
    assert any(not torch.equal(trained[k], start[k]) for k in trained if k in start)
    assert sorted(os.listdir(root / how)) == sorted(STAGES)  # the main process alone wrote, and cleaned up
    assert script in ("sft.py", "reward.py") or os.listdir(root / how / script) == ["r"]


def test_processes_that_do_not_average_their_gradients_write_another_run(runs):
    """The check above can fail: without DDP each process steps on the gradient of its own half of the
    batch. The first step's loss is still the global batch's (gathered), but its gradient norm is not,
    and the weights go apart."""
    root, _ = runs
    found = differences(root / "one" / "dpo.py" / "r", root / "unsynced" / "r", "dpo.py")
    assert (1, "grad_norm") in found and (1, "loss") not in found
    assert any(isinstance(k, str) for k in found)  # saved weights


def test_the_processes_keep_their_group_and_their_world_from_stage_to_stage(runs):
    """Several stages in one interpreter (DRIVER): after each, on both processes, the process group is up
    and distributed.WORLD is this process's; a stage's one-line error stops that stage only."""
    root, out = runs
    for rank in (0, 1):  # (a line may follow the other process's progress bar on the same line)
        world = rf"World\(rank={rank}, size=2, local_rank={rank}\)"
        done = re.findall(rf"rank {rank}: (\S+) (\S+) -> {world}", out)
        assert done == [("sft.py", "synced"), ("reward.py", "synced"), ("dpo.py", "fails"),
                        ("dpo.py", "synced"), ("is_dpo.py", "synced"), ("dpo.py", "unsynced")] + \
            [(script, "fsdp") for script in STAGES]
        assert f"rank {rank}: dpo.py stopped: error: --batch_size 40 x 2 processes is more than the" in out
    assert not (root / "too_big").exists()


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
        forward = distributed.parallel(model, dpo.sequence_logps, gradient_checkpointing=checkpointing)
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
    stopped_at_step(monkeypatch, 6, lambda: sft.main(args("stopped")))
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
