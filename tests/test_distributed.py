"""Many processes: `torchrun --nproc_per_node 2` (CPU processes talking through gloo), under DDP and under
--fsdp, writes the train_log and the weights that one process writes with the same global batch
(2 x --batch_size), and the same reference log-probs beside the pairs (the main process alone writing them);
a run whose processes do not average their gradients does not; a run of 2 processes stopped after a saved
state and resumed writes what the run never stopped writes, under DDP and under --fsdp (each process's
shards, whole or not at all, gone from a finished output); gradient checkpointing changes no number;
fp16's loss scale survives --resume; --fsdp in one process and the stages that do not split their work
refuse in one line."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import dpo
import is_dpo
import lm
import reward
import sft
import stage
import toy_tldr
from test_outputs import stopped_at_step
from test_toy_tldr import assert_clean_error, cli_env, no_partial_copy, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("sft.py", "reward.py", "dpo.py", "is_dpo.py")
DAA = ("dpo.py", "is_dpo.py")
RESUMED = ("sft.py", "reward.py", "dpo.py")

# One torchrun command runs every stage, one after the other, as `python <script> <flags>` would (runpy):
# its 2 processes pay for their interpreters and imports once, and keep their process group from stage to
# stage. An entry that must fail prints its error line and the next one runs; "unsynced" runs the stage
# with stage.parallel's module replaced by the bare Forward: no DDP, so no gradient is ever averaged;
# "stopped" stops every process as Ctrl-C would, at step 3 just after its save_state (a state saved at 2);
# "torn" (--fsdp) stops them at step 3 inside it, after every process wrote its shards and before the main
# one writes state.pt, as a kill at that moment would, and reports what the partial copy holds then.
# Every file a process renames into place as the reference log-probs is reported with its rank, and every
# state a process restores. torchrun writes each process's stdout and stderr into files of their own
# (--log_dir, --redirects): a test reads each process's lines whole, never cut by the other's.
DRIVER = """
import json, os, runpy, sys
import torch
sys.path.insert(0, os.getcwd())  # the repository root, where the scripts are
import stage
import scale.fsdp
parallel, rank, replace, save_state = stage.parallel, int(os.environ["RANK"]), os.replace, stage.save_state
restore_state, save_whole, save_shards = stage.restore_state, stage.save_whole, scale.fsdp.save_shards


def unsynced(model, fn, *_):
    return stage.Forward(fn, model)


def stopping_save_state(work, args, step, *rest):
    save_state(work, args, step, *rest)
    if step == 3:
        raise KeyboardInterrupt


def unwritten(obj, path):  # the kill comes just before state.pt
    raise KeyboardInterrupt


def torn_save_shards(work, step, *rest):
    if step != 3:
        return save_shards(work, step, *rest)
    stage.save_whole = unwritten
    try:
        save_shards(work, step, *rest)
    except KeyboardInterrupt:
        pass
    finally:
        stage.save_whole = save_whole
    if rank == 0:
        names = " ".join(sorted(name for name in os.listdir(work) if name.startswith("state")))
        named = torch.load(os.path.join(work, "state.pt"), weights_only=True)["shards"]
        print(f"rank 0: torn at step 3: {names}; state.pt names {named}", file=sys.stderr, flush=True)
    raise KeyboardInterrupt


def reported_restore_state(work, *rest):
    done, order, cursor = restore_state(work, *rest)
    if done:
        print(f"rank {rank}: restored step {done} in {work}", file=sys.stderr, flush=True)
    return done, order, cursor


def reported_replace(src, dst):
    if os.path.basename(dst) == "reference_logps.pt":
        print(f"rank {rank}: wrote {dst}", file=sys.stderr, flush=True)
    return replace(src, dst)


os.replace, stage.restore_state = reported_replace, reported_restore_state
for argv, how in json.loads(sys.argv[1]):
    stage.parallel = parallel if how != "unsynced" else unsynced
    stage.save_state = save_state if how != "stopped" else stopping_save_state
    scale.fsdp.save_shards = save_shards if how != "torn" else torn_save_shards
    sys.argv = argv
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        if how not in ("fails", "stopped", "torn"):
            raise
        print(f"rank {rank}: {argv[0]} stopped: {e}", file=sys.stderr, flush=True)
    assert torch.distributed.is_initialized(), argv
    world = stage.World(rank, 2, int(os.environ["LOCAL_RANK"]))
    assert stage.WORLD == world, (argv, stage.WORLD)
    print(f"rank {rank}: {argv[0]} {how} -> {stage.WORLD}", file=sys.stderr, flush=True)
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A toy world, a 3-step pi_ref and its human pairs as DAA data (prefs.jsonl)."""
    root = tmp_path_factory.mktemp("distributed")
    toy_tldr.main(toy_tldr.Args(out_dir=str(root / "world"), num_sft=120, num_human_pairs=48, num_eval=8))
    sft.main(sft.Args(data=str(root / "world"), out_dir=str(root / "sft"), steps=3, batch_size=8, val_size=8,
                      num_sample_eval=0, n_layer=1, n_embd=32, n_head=2))
    shutil.copyfile(root / "world" / "prefs_human.jsonl", root / "prefs.jsonl")
    return root


def pairs_dir(root, name, script, tiny=None):
    """A DAA run's own copy of tiny's pairs: the reference log-probs it saves beside them are its own, so no
    run reads another's (one process's numbers would hide a difference of two processes')."""
    path = root / "data" / name / script
    if tiny is not None and not path.exists():  # made once: a copy made again would have another key
        path.mkdir(parents=True)
        shutil.copyfile(tiny / "prefs.jsonl", path / "train.jsonl")
    return path


def stage_flags(tiny, script, out, batch_size, data=None):
    """Each stage's flags (its Args fields) for a tiny run: 2 micro-batches a step (no sync on the first)."""
    common = dict(threads=1, warmup_steps=1, grad_accum=2, batch_size=batch_size)
    if script == "sft.py":
        return dict(data=str(tiny / "world"), out_dir=str(out), steps=4, val_size=8, num_sample_eval=0,
                    n_layer=1, n_embd=32, n_head=2, **common)
    if script == "reward.py":
        return dict(mode="train", sft_path=str(tiny / "sft"), data=str(tiny / "world"), out_dir=str(out),
                    steps=4, val_size=8, lr=1e-2, **common)
    daa = dict(sft_path=str(tiny / "sft"), data=str(data), runs_dir=str(out), run_name="r",
               num_epochs=1, num_checkpoints=1, lr=1e-2, beta=0.5, **common)
    return {**daa, "weight": "adaptive", "self_normalise": True} if script == "is_dpo.py" else daa


def one_process(script, flags):
    """The stage run in this process, as `python <script> <flags>` would run it."""
    main = {"sft.py": sft.main, "reward.py": reward.main, "dpo.py": dpo.train, "is_dpo.py": is_dpo.main}
    config = {"sft.py": sft.Args, "reward.py": reward.Args, "dpo.py": dpo.Args, "is_dpo.py": is_dpo.Args}
    return main[script](config[script](**flags))


def argv(script, flags):
    return [script] + [str(x) for k, v in flags.items() for x in (f"--{k}", v)]


def torchrun_entries(tiny, root):
    """[(argv, how)]: every stage in 2 processes with --batch_size 4 (DDP; reward.py and is_dpo.py with
    --gradient_checkpointing; dpo.py's reference log-probs first by --reference_only, then read from
    beside the pairs), dpo.py with a global batch too big for the pairs (refused), dpo.py again without
    gradient averaging ("unsynced"), then every stage under --fsdp; then sft.py, reward.py and dpo.py as
    in "two" but a state saved every 2 steps, stopped at step 3 and resumed; an sft.py run stopped so and
    left; every stage as in "fsdp", stopped so and resumed ("fsdp_resumed"); sft.py as in "fsdp", a state
    saved every step, stopped at step 3 between its shards and its state.pt ("torn") and resumed; an sft.py
    run as in "fsdp_resumed" stopped and left."""
    def flags(name, script, batch_size=4, **extra):
        data = pairs_dir(root, name, script, tiny) if script in DAA else None
        return {**stage_flags(tiny, script, root / name / script, batch_size, data), **extra}

    checkpointing = {"gradient_checkpointing": True}
    as_two = {"reward.py": checkpointing}  # the resumed runs' flags: those of "two"
    return [(argv("sft.py", flags("two", "sft.py")), "synced"),
            (argv("reward.py", flags("two", "reward.py", **checkpointing)), "synced"),
            (argv("dpo.py", flags("too_big", "dpo.py", 40)), "fails"),
            (argv("dpo.py", flags("two", "dpo.py", reference_only=True)), "reference"),
            (argv("dpo.py", flags("two", "dpo.py")), "synced"),
            (argv("is_dpo.py", flags("two", "is_dpo.py", reference_only=True)), "reference"),
            (argv("is_dpo.py", flags("two", "is_dpo.py", **checkpointing)), "synced"),
            (argv("dpo.py", flags("unsynced", "dpo.py")), "unsynced")] + \
        [(argv(s, flags("fsdp", s, fsdp=True, reference_only=True)), "reference") for s in DAA] + \
        [(argv(s, flags("fsdp", s, fsdp=True)), "fsdp") for s in STAGES] + \
        [(argv(s, flags("resumed", s, save_every=2, resume=r, **as_two.get(s, {}))), how)
         for s in RESUMED for r, how in ((False, "stopped"), (True, "synced"))] + \
        [(argv("sft.py", flags("left", "sft.py", save_every=2)), "stopped")] + \
        [(argv(s, flags("fsdp_resumed", s, fsdp=True, save_every=2, resume=r)), how)
         for s in STAGES for r, how in ((False, "stopped"), (True, "fsdp"))] + \
        [(argv("sft.py", flags("fsdp_torn", "sft.py", fsdp=True, save_every=1, resume=r)), how)
         for r, how in ((False, "torn"), (True, "fsdp"))] + \
        [(argv("sft.py", flags("fsdp_left", "sft.py", fsdp=True, save_every=2)), "stopped")]


def process_output(logs, rank):
    """What one process of the torchrun command printed: its stdout, then its stderr (torchrun's files)."""
    return "".join(path.read_text() for name in ("stdout", "stderr")
                   for path in sorted(logs.glob(f"*/attempt_*/{rank}/{name}.log")))


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    """The torchrun command (DRIVER, torchrun_entries); meanwhile, in this process, every stage with
    --batch_size 8 ("one"). Returns (root, {rank: what that process printed})."""
    root = tmp_path_factory.mktemp("runs")
    entries = torchrun_entries(tiny, root)
    (root / "driver.py").write_text(DRIVER)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "--log_dir", str(root / "logs"), "--redirects", "3"]  # each process's streams: files apart
    two = subprocess.Popen(torchrun + [root / "driver.py", json.dumps(entries)], cwd=ROOT, text=True,
                           env=cli_env(root / "hf"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        for script in STAGES:
            data = pairs_dir(root, "one", script, tiny) if script in DAA else None
            if script in DAA:  # the reference log-probs first, saved beside the pairs
                one_process(script, {**stage_flags(tiny, script, root / "one" / script, 8, data),
                                     "reference_only": True})
            one_process(script, stage_flags(tiny, script, root / "one" / script, 8, data))
        out, _ = two.communicate(timeout=300)
    finally:
        two.kill()
    outs = {rank: process_output(root / "logs", rank) for rank in (0, 1)}
    assert two.returncode == 0, out[-2000:] + "".join(f"\n--- rank {r}: {o[-3000:]}" for r, o in outs.items())
    assert len(list((root / "logs").glob("*/attempt_*/*/std*.log"))) == 4  # one stdout, one stderr a process
    return root, outs


def output_dir(out, script):
    return out / "r" if script in DAA else out


def read_log(directory):
    return [json.loads(line) for line in open(directory / "train_log.jsonl")]


def weights(directory):
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


def saved_model(directory, script):
    """The weights a stage saved: its output's, a DAA run's last checkpoint's."""
    if script not in DAA:
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


def reference_file(root, name, script):
    return pairs_dir(root, name, script) / "reference_logps.pt"


@pytest.mark.parametrize("how", ["two", "fsdp"])
@pytest.mark.parametrize("script", STAGES)
def test_two_processes_write_what_one_process_writes_with_the_same_global_batch(tiny, runs, script, how):
    """--batch_size 4 in each of 2 processes == --batch_size 8 in one, under DDP ("two") and under --fsdp
    (each process holding half of every weight): every train_log number (losses, margins, accuracies,
    importance-weight statistics and the ESS, the self-normalised weights' loss, gradient norms) and the saved
    weights, to float rounding; a DAA run's reference log-probs, saved beside its pairs, too."""
    root, _ = runs
    a, b = (output_dir(root / name / script, script) for name in ("one", how))
    assert differences(a, b, script) == []
    if script == "is_dpo.py":
        log = read_log(a)
        assert {"weight_mean", "weight_max", "ess"} <= log[0].keys()
        assert any(row["ess"] < 7.99 for row in log)  # the weights differ: their global statistics count
    if script in DAA:
        saved = [torch.load(reference_file(root, name, script))["logps"] for name in ("one", how)]
        assert len(saved[0][0]) == 48
        for x, y in zip(*saved):
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)
    trained, start = weights(saved_model(a, script)), weights(tiny / "sft")
    assert any(not torch.equal(trained[k], start[k]) for k in trained if k in start)
    # the main process alone wrote its outputs, and cleaned up (no lock file, no partial copy left)
    assert sorted(os.listdir(root / how)) == sorted(STAGES)
    assert script not in DAA or sorted(os.listdir(root / how / script)) == ["r"]


def test_only_the_main_process_writes_the_reference_log_probs_and_every_process_reads_them(runs):
    """Under torchrun the reference log-probs are computed in shards and saved by --reference_only's main
    process alone; a later run on the same pairs reads them on every process; a training run writes none."""
    root, outs = runs  # each process's lines apart: the other's never cut one
    assert not re.findall(r"rank 1: wrote", outs[1])
    wrote = re.findall(r"rank 0: wrote (\S+)", outs[0])
    saved = [(name, script) for name in ("two", "fsdp") for script in DAA]
    assert sorted(wrote) == sorted(str(reference_file(root, name, script)) for name, script in saved)
    for name, script in saved:  # the main process prints (the others' stdout is /dev/null)
        assert f"reference log-probs: read from {reference_file(root, name, script)}\n" in outs[0]
    assert outs[0].count("reference log-probs: read from") == len(saved)
    assert not reference_file(root, "unsynced", "dpo.py").exists()


def test_processes_that_do_not_average_their_gradients_write_another_run(runs):
    """The check above can fail: without DDP each process steps on the gradient of its own half of the
    batch. The first step's loss is still the global batch's (gathered), but its gradient norm is not,
    and the weights go apart."""
    root, _ = runs
    found = differences(root / "one" / "dpo.py" / "r", root / "unsynced" / "dpo.py" / "r", "dpo.py")
    assert (1, "grad_norm") in found and (1, "loss") not in found
    assert any(isinstance(k, str) for k in found)  # saved weights


def test_the_processes_keep_their_group_and_their_world_from_stage_to_stage(runs):
    """Several stages in one interpreter (DRIVER): after each, on both processes, the process group is up
    and stage.WORLD is this process's; a stage's one-line error stops that stage only, before it writes."""
    root, outs = runs
    for rank in (0, 1):  # (a line may follow this process's progress bar on the same line)
        world = rf"World\(rank={rank}, size=2, local_rank={rank}\)"
        done = re.findall(rf"rank {rank}: (\S+) (\S+) -> {world}", outs[rank])
        assert done == [("sft.py", "synced"), ("reward.py", "synced"), ("dpo.py", "fails"),
                        ("dpo.py", "reference"), ("dpo.py", "synced"), ("is_dpo.py", "reference"),
                        ("is_dpo.py", "synced"), ("dpo.py", "unsynced")] + \
            [(script, "reference") for script in DAA] + [(script, "fsdp") for script in STAGES] + \
            [(script, how) for script in RESUMED for how in ("stopped", "synced")] + \
            [("sft.py", "stopped")] + [(script, how) for script in STAGES for how in ("stopped", "fsdp")] + \
            [("sft.py", "torn"), ("sft.py", "fsdp"), ("sft.py", "stopped")]
        assert f"rank {rank}: dpo.py stopped: error: --batch_size 40 x 2 processes is more than the 48" in \
            outs[rank]
    assert not (root / "too_big").exists()
    assert os.listdir(root / "data" / "too_big" / "dpo.py") == ["train.jsonl"]


def assert_resumed(runs, name, script, never_stopped):
    """The run `name` of script, every process stopped at step 3 with a state saved at step 2 (the main
    process's error line says it keeps it), resumed from it by every process, ends where the run
    never_stopped ends: the same train_log and weights, to float rounding; no lock, no partial copy left."""
    root, outs = runs
    out = output_dir(root / name / script, script)
    partial = stage.scratch_path(str(out), "partial")
    assert f"rank 0: {script} stopped: error: stopped by Ctrl-C or SIGTERM; {partial} keeps the last saved " \
           "state: the same command with --resume continues it\n" in outs[0]
    assert f"rank 1: {script} stopped: error: stopped by Ctrl-C or SIGTERM\n" in outs[1]
    for rank in (0, 1):
        assert f"rank {rank}: restored step 2 in {partial}\n" in outs[rank]
    a = output_dir(root / never_stopped / script, script)
    assert differences(a, out, script) == []
    assert [row["step"] for row in read_log(out)] == [row["step"] for row in read_log(a)] == [1, 2, 3] + \
        [4] * (script not in DAA)
    assert not [name for name in os.listdir(out.parent) if name.startswith(".")]  # no lock, no partial copy


@pytest.mark.parametrize("script", RESUMED)
def test_two_processes_stopped_after_a_saved_state_and_resumed_write_the_run_never_stopped(runs, script):
    """--save_every 2, every process stopped at step 3 (after the main process logged it), then --resume:
    every process reads the state of step 2 (its own generators, the shared weights, AdamW moments, schedule
    and data order), the main process cuts the log back to step 2, and the run ends where the 2-process run
    never stopped ("two") ends: the same train_log and weights, to float rounding."""
    assert_resumed(runs, "resumed", script, "two")


@pytest.mark.parametrize("script", STAGES)
def test_fsdp_processes_stopped_after_a_saved_state_and_resumed_write_the_run_never_stopped(runs, script):
    """--fsdp: the same, each process reading its own shards of the weights and AdamW moments from the
    directory state.pt names (state-2/), and the run ends where the --fsdp run never stopped ("fsdp")
    ends."""
    assert_resumed(runs, "fsdp_resumed", script, "fsdp")


def test_fsdp_stopped_between_its_shards_and_its_state_pt_resumes_the_state_before(runs):
    """Whole or nothing under --fsdp (--save_every 1): every process stopped at step 3 after writing its
    shards into state-3/, before the main process wrote state.pt, as a kill then would. state.pt still
    names state-2/ (state-1/ was removed once state.pt named state-2/); --resume reads it on every process,
    writes state-3/ anew, and the run ends where the --fsdp run never stopped ends."""
    root, outs = runs
    assert "rank 0: torn at step 3: state-2 state-3 state.pt; state.pt names state-2\n" in outs[0]
    partial = stage.scratch_path(str(root / "fsdp_torn" / "sft.py"), "partial")
    for rank in (0, 1):
        assert f"rank {rank}: restored step 2 in {partial}\n" in outs[rank]
    assert differences(root / "fsdp" / "sft.py", root / "fsdp_torn" / "sft.py", "sft.py") == []
    assert [row["step"] for row in read_log(root / "fsdp_torn" / "sft.py")] == [1, 2, 3, 4]


def test_a_finished_fsdp_output_holds_no_saved_state(runs):
    """A --fsdp run's saved state, state.pt and its shard directories state-<step>/, is for --resume only:
    the output a resumed run publishes holds none of it (its partial copy held state.pt and state-2/)."""
    root, _ = runs
    for name, scripts in (("fsdp_resumed", STAGES), ("fsdp_torn", ["sft.py"])):
        for script in scripts:
            out = output_dir(root / name / script, script)
            assert stage.read_marker(str(out)) and "train_log.jsonl" in os.listdir(out)
            assert [n for n in os.listdir(out) if n.startswith("state")] == []


def test_an_fsdp_state_holds_each_process_s_shards_and_is_not_resumed_by_one_process(tiny, runs):
    """An --fsdp run stopped at step 3 (--save_every 2) leaves state.pt (step, data order, every process's
    generators, no weights) naming state-2/, where each of the 2 processes wrote its own shards of the
    weights and AdamW moments; one process with the same flags is refused in one line, and the state kept."""
    root, _ = runs
    left = root / "fsdp_left" / "sft.py"
    work = stage.scratch_path(str(left), "partial")
    saved = torch.load(os.path.join(work, "state.pt"), weights_only=True)
    assert saved["step"] == 2 and saved["shards"] == "state-2" and len(saved["rng"]) == 2
    assert "model" not in saved and "optimizer" not in saved
    assert sorted(n for n in os.listdir(work) if n.startswith("state")) == ["state-2", "state.pt"]
    shards = sorted(os.listdir(os.path.join(work, "state-2")))
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    with pytest.raises(SystemExit, match=r"^error: --resume with other settings or inputs than the "
                                         r"interrupted run \(processes\)"):
        sft.main(sft.Args(**stage_flags(tiny, "sft.py", left, 4), fsdp=True, save_every=2, resume=True))
    assert torch.load(os.path.join(work, "state.pt"), weights_only=True)["shards"] == "state-2"
    assert sorted(os.listdir(os.path.join(work, "state-2"))) == shards and not left.exists()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one process: no process group
def test_a_save_of_fsdp_shards_that_cannot_be_written_leaves_the_state_before_whole(tmp_path, monkeypatch):
    """scale/fsdp.py's save_shards and load_shards on one process's weights (torch.distributed.checkpoint
    needs no process group for one): each save names its directory in state.pt and removes the older one;
    a save whose shards cannot be written (a full disk) stops with an OSError (cleans_up's one error line)
    and leaves state.pt naming the last whole directory, which load_shards reads back exactly."""
    from torch.distributed.checkpoint import FileSystemWriter

    from scale import fsdp

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)

    def train_step():
        model(torch.randn(4, 3)).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()

    for step in (1, 2):
        train_step()
        fsdp.save_shards(str(tmp_path), step, model, optimizer, {"step": step})
    assert sorted(os.listdir(tmp_path)) == ["state-2", "state.pt"]
    kept = [{k: v.clone() for k, v in model.state_dict().items()},
            {k: v.clone() for k, v in optimizer.state_dict()["state"][0].items()}]
    train_step()

    def full_disk(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(FileSystemWriter, "write_data", full_disk)
    with pytest.raises(OSError, match=r"^could not write \S+state-3: \[Errno 28\] No space left on device$"):
        fsdp.save_shards(str(tmp_path), 3, model, optimizer, {"step": 3})
    assert torch.load(tmp_path / "state.pt", weights_only=True) == {"step": 2, "shards": "state-2"}
    model = torch.nn.Linear(3, 2)  # another start
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    fsdp.load_shards(str(tmp_path / "state-2"), model, optimizer)
    for a, b in ((kept[0], model.state_dict()), (kept[1], optimizer.state_dict()["state"][0])):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_state_of_two_processes_is_not_resumed_by_one(tiny, runs):
    """A global batch is --batch_size x processes: the state left by 2 processes, resumed by one process with
    the same flags, is refused in one line naming the processes, and kept."""
    root, outs = runs
    resumed = len(RESUMED) + len(STAGES) + 1  # DDP's, --fsdp's, the torn one
    assert [out.count("restored step 2 in") for out in outs.values()] == [resumed, resumed]
    assert outs[0].count("resumed from the state saved at step 2") == resumed
    left = root / "left" / "sft.py"
    state = os.path.join(stage.scratch_path(str(left), "partial"), "state.pt")
    saved = torch.load(state, weights_only=True)
    assert saved["step"] == 2 and len(saved["rng"]) == 2  # every process's generators
    with pytest.raises(SystemExit, match=r"^error: --resume with other settings or inputs than the "
                                         r"interrupted run \(processes\)"):
        sft.main(sft.Args(**stage_flags(tiny, "sft.py", left, 4), save_every=2, resume=True))
    assert torch.load(state, weights_only=True)["step"] == 2 and not left.exists()


def test_gradient_checkpointing_changes_neither_the_log_probs_nor_their_gradients(tiny):
    """Under gradient checkpointing a layer keeps no KV cache, so lm.response_hidden runs prompt + response
    whole: through stage.parallel's module, in float64, the same log-probs, reward scores and gradients as
    the cached path (the runs above with --gradient_checkpointing match one process's without it)."""
    torch.manual_seed(0)
    tokenizer = lm.load_tokenizer(str(tiny / "sft"))
    rows = lm.read_jsonl(str(tiny / "prefs.jsonl"))[:6]
    pairs = list(zip(*(lm.encode(tokenizer, rows, c, 64, 24) for c in ("chosen", "rejected"))))
    batch = lm.collate_grouped([e for pair in pairs for e in pair], tokenizer.pad_token_id, k=2)
    head = torch.randn(32, 1, dtype=torch.float64)
    results = []
    for checkpointing in (False, True):
        model = lm.load_model(str(tiny / "sft")).double().train()
        forward = stage.parallel(model, lm.sequence_logps, gradient_checkpointing=checkpointing)
        logps, _ = forward(batch, 16)
        score = lm.response_hidden(model.base_model, batch)[:, -1] @ head  # a reward-model-like read
        (logps.sum() + score.sum()).backward()
        results.append((logps.detach(), score.detach(), [p.grad for p in model.parameters()]))
        assert model.base_model.is_activation_checkpointing == checkpointing
    (l0, s0, g0), (l1, s1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s1, s0, rtol=1e-10, atol=1e-10)
    assert all(g is not None for g in g0 + g1)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-10)


def test_fp16_resume_restores_the_loss_scale(tiny, tmp_path, monkeypatch):
    """--precision fp16: the GradScaler's scale is part of the saved state. A scaler that doubles its scale
    every step overflows every few steps (that update skipped, the scale halved); a resumed run that started
    over at the initial scale skips other steps and writes another log (checked: it fails without the fix)."""
    grad_scaler = torch.amp.GradScaler

    def scaler(device_type, enabled):
        return grad_scaler(device_type, init_scale=2.0 ** 18, growth_interval=1, enabled=enabled)

    monkeypatch.setattr(torch.amp, "GradScaler", scaler)

    def args(name, **kw):
        return sft.Args(data=str(tiny / "world"), out_dir=str(tmp_path / name), steps=10, batch_size=8,
                        val_size=8, num_sample_eval=0, n_layer=1, n_embd=32, n_head=2, warmup_steps=1,
                        precision="fp16", save_every=3, **kw)

    sft.main(args("whole"))
    stopped_at_step(monkeypatch, 6, lambda: sft.main(args("stopped")))
    assert os.path.exists(os.path.join(stage.scratch_path(str(tmp_path / "stopped"), "partial"), "state.pt"))
    sft.main(args("stopped", resume=True))
    whole = read_log(tmp_path / "whole")
    assert not all(map(torch.isfinite, torch.tensor([r["grad_norm"] for r in whole[:4]])))  # skips happened
    assert (tmp_path / "whole" / "train_log.jsonl").read_bytes() == \
        (tmp_path / "stopped" / "train_log.jsonl").read_bytes()


def test_fsdp_in_one_process_is_refused_in_one_line(tiny, tmp_path):
    """--fsdp shards over torchrun's processes: without torchrun every training stage stops with one error
    line and writes nothing (no output, no partial copy, no reference log-probs), with --resume too (there
    is nothing to resume); so does the command line."""
    fsdp_line = "error: --fsdp shards the weights over several processes: start the stage with torchrun"
    for script, resume in ((script, resume) for script in STAGES for resume in (False, True)):
        data = pairs_dir(tmp_path, "fsdp", script, tiny) if script in DAA else None
        flags = stage_flags(tiny, script, tmp_path / script, 8, data)
        with pytest.raises(SystemExit) as e:
            one_process(script, {**flags, "fsdp": True, "resume": resume})
        assert str(e.value) == fsdp_line
        out = output_dir(tmp_path / script, script)
        assert not out.exists() and no_partial_copy(str(out))
        assert script not in DAA or os.listdir(data) == ["train.jsonl"]
    result = run_cli("sft.py", *argv("sft.py", {**stage_flags(tiny, "sft.py", tmp_path / "cli", 8),
                                                "fsdp": True})[1:], home=tmp_path / "hf")
    assert_clean_error(result, tmp_path / "cli", "--fsdp", "torchrun")


def test_stages_that_do_not_split_their_work_refuse_several_processes(tmp_path, monkeypatch):
    """extras/rloo.py, extras/online_dpo.py and the toys in one error line under WORLD_SIZE > 1, before any
    output is made."""
    from extras import online_dpo, rloo
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
    assert not os.listdir(tmp_path)
