"""stage.py -- the lines every stage's loop shares, none of them about alignment: flags, one-line errors,
seeds and devices, the optimizer step and its schedule, outputs that never lose anything, the state that
--resume continues from, and the few lines that let torchrun run a stage as several processes. Read a stage
(sft.py, dpo.py, ...) first; come here when it calls something you want to see."""
import dataclasses
import fcntl
import functools
import glob
import hashlib
import json
import math
import os
import random
import shutil
import signal
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext, suppress

import numpy as np
import torch
from safetensors import SafetensorError

MARKER = ".stage.json"  # in every output a stage writes: which stage and which run wrote it


def fail(message):
    """Stop with one clear line (tests catch SystemExit)."""
    raise SystemExit(f"error: {message}")


def parse_args(config_class, doc):
    """Flags from a config dataclass (every field's help and default show in --help), doc on top. An unknown
    or misspelt flag is refused with usage and one error line (allow_abbrev=False: --lr is not --lr_x)."""
    import argparse

    from transformers import HfArgumentParser

    formatter = type("F", (argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter), {})
    parser = HfArgumentParser(config_class, description=doc, formatter_class=formatter, allow_abbrev=False)
    args, unknown = parser.parse_args_into_dataclasses(return_remaining_strings=True)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def check_args(args, positive=(), non_negative=()):
    """Every float flag finite; the named flags > 0 or >= 0; --seed and --threads in range."""
    for f in dataclasses.fields(args):
        value = getattr(args, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            fail(f"--{f.name} must be a finite number, got {value}")
    for name in [*positive, *non_negative]:
        if not (getattr(args, name) > 0 or name in non_negative and getattr(args, name) == 0):
            fail(f"--{name} must be {'>= 0' if name in non_negative else '> 0'}, got {getattr(args, name)}")
    if hasattr(args, "seed") and not 0 <= args.seed < 2 ** 32:  # numpy's seeds are 32-bit
        fail(f"--seed must be in [0, 2^32), got {args.seed}")
    if hasattr(args, "threads") and args.threads < 0:
        fail(f"--threads must be >= 0 (0 = torch's default), got {args.threads}")


# ----------------------------------------------------------------------------------------------
# several processes: `torchrun --nproc_per_node N script.py` runs N copies of a stage (one a GPU, or CPU
# processes on gloo); the rank picks the GPU and the share of the work. One process: every call a no-op.


@dataclasses.dataclass
class World:
    rank: int = 0  # this process, 0 .. size - 1
    size: int = 1  # processes in all
    local_rank: int = 0  # this process on its machine: its GPU

    main = property(lambda self: self.rank == 0)  # the process that writes files and prints


WORLD = World()


def init_distributed():
    """Join torchrun's processes (RANK, WORLD_SIZE, LOCAL_RANK): NCCL between GPUs, gloo between CPU ones."""
    global WORLD
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size > 1 and not torch.distributed.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        WORLD = World(torch.distributed.get_rank(), size, local_rank)
        if not WORLD.main:  # one copy of every printed line (errors still show)
            sys.stdout = open(os.devnull, "w")
    return WORLD


def one_process_only(what):
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        fail(f"{what} runs in one process: start it with python, not with torchrun and several processes")


def shard(items):
    """This process's share of a list: items[rank::size]."""
    return items[WORLD.rank::WORLD.size]


def unshard(mine):
    """Every process's shard() back in the original order, on every process."""
    if WORLD.size == 1:
        return list(mine)
    parts = [None] * WORLD.size
    torch.distributed.all_gather_object(parts, list(mine))
    out = [None] * sum(map(len, parts))
    for rank, part in enumerate(parts):
        out[rank::WORLD.size] = part
    return out


def barrier():  # wait until every process is here (e.g. until the main one has written a file)
    if WORLD.size > 1:
        torch.distributed.barrier()


def gather_live(mine):
    """Every process's [B, ...] tensor in shard() order, on every process: [N * B, ...]. This process's own
    entries keep their gradient, the others' are constants: a loss F of them is the same number everywhere,
    and the processes' gradients sum to F's (DDP averages: a loop backpropagates N * F; METHOD.md, 12)."""
    if WORLD.size == 1:
        return mine
    parts = [torch.empty_like(mine) for _ in range(WORLD.size)]
    torch.distributed.all_gather(parts, mine.detach().contiguous())
    parts[WORLD.rank] = mine
    return torch.stack(parts, dim=1).reshape(-1, *mine.shape[1:])  # entry j * N + r: process r's j-th


class Forward(torch.nn.Module):
    """fn(model, ...) as a module's forward: DDP and FSDP act only through one (our losses read layers)."""

    def __init__(self, fn, model):
        super().__init__()
        self.fn, self.model = fn, model

    def forward(self, *inputs, **kwargs):
        return self.fn(self.model, *inputs, **kwargs)


def parallel(model, fn, fsdp=False, gradient_checkpointing=False):
    """What a loop calls for fn(model, ...): Forward(fn, model) in one process, wrapped in DDP over several
    (or sharded by FSDP: scale/fsdp.py). gradient_checkpointing: layers recompute their activations."""
    if gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if fsdp:
        if WORLD.size == 1:
            fail("--fsdp shards the weights over several processes: start the stage with torchrun")
        from scale.fsdp import shard_model
        return shard_model(Forward(fn, model))
    if WORLD.size == 1:
        return Forward(fn, model)
    return torch.nn.parallel.DistributedDataParallel(
        Forward(fn, model), device_ids=[WORLD.local_rank] if torch.cuda.is_available() else None)


@contextmanager
def sync_gradients(module, now):
    """Around a micro-batch's forward and backward: average gradients over the processes only `now`."""
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP
        module.set_requires_gradient_sync(now)
    with module.no_sync() if isinstance(module, torch.nn.parallel.DistributedDataParallel) and not now \
            else nullcontext():  # DDP
        yield


def save_pretrained(model, path, tokenizer=None):
    """save_pretrained by the main process (FSDP's shards are gathered first: every process takes part), in
    the dtype its files had (lm.load_pretrained's stored_dtype: the float32 weights rounded; else float32)."""
    dtype, state = getattr(model, "stored_dtype", torch.float32), model.state_dict()
    if any(hasattr(p, "full_tensor") for p in model.parameters()):
        from scale.fsdp import full_state_dict
        state = full_state_dict(model)
    if WORLD.main:
        model.save_pretrained(path, state_dict={k: v.to("cpu", dtype if v.is_floating_point() else v.dtype)
                                                for k, v in state.items()})
        with open(os.path.join(path, "config.json")) as f:  # the files' dtype, not the float32 run's
            save_json(os.path.join(path, "config.json"), {**json.load(f), "dtype": str(dtype)[6:]})
        if tokenizer is not None:
            tokenizer.save_pretrained(path)


# ----------------------------------------------------------------------------------------------
# seeds, devices, the optimizer step


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PRECISION_HELP = ("auto (bf16 autocast on CUDA, float32 on the CPU) | fp32 | bf16 | fp16 (fp16 autocast with "
                  "a gradient scaler); the weights and the optimizer stay float32")


def device_and_autocast(precision="auto", threads=0):
    """(device, autocast): CUDA when present, else the CPU; autocast runs matrix products in bf16/fp16 while
    the weights stay float32 (METHOD.md, section 2). threads: torch's CPU threads (0: its default)."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(f"cuda:{WORLD.local_rank}" if torch.cuda.is_available() else "cpu")
    if precision not in PRECISIONS:
        fail(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return device, nullcontext()
    if precision == "fp16" and device.type == "cpu":
        print("note: --precision fp16 on the CPU: float16 autocast and a loss scaler there too (slow)")
    return device, torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def check_finite(step, **values):  # a NaN never heals: stop at the first, publish nothing
    for name, value in values.items():
        if not math.isfinite(value := float(value.detach() if torch.is_tensor(value) else value)):
            fail(f"non-finite {name} ({value}) at step {step}: training stopped, nothing saved")


def optimizer_step(step, model, optimizer, scheduler, scaler, grad_clip, loss):
    """Unscale, clip, stop at a non-finite loss or gradient norm, step, schedule. Under fp16 a non-finite norm
    is the scaler's overflow: it skips the update and lowers its scale. Returns the norm before clipping."""
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP's
    check_finite(step, loss=loss, **({} if scaler.is_enabled() else {"grad_norm": grad_norm}))
    scaler.step(optimizer)
    scaler.update()
    with warnings.catch_warnings():  # the schedule counts a step the fp16 scaler skipped too: no news
        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def parameter_norm(model):
    """The norm of all weights, checked finite when training ends (no loss checks the last update)."""
    squares = sum(p.detach().float().pow(2).sum() for p in model.parameters())
    return torch.sqrt(squares.full_tensor() if hasattr(squares, "full_tensor") else squares)  # FSDP's


def lr_schedule(optimizer, warmup_steps, total_steps, shape="cosine", min_lr_ratio=0.0, decay_fraction=0.2):
    """Linear warm-up, the peak, then a half cosine to min_lr_ratio x peak at total_steps, from the warm-up's
    end (cosine: transformers', to the last bit), never (constant) or decay_fraction from the end (wsd)."""
    if shape not in ("cosine", "constant", "wsd") or not (0 <= min_lr_ratio <= 1 and 0 < decay_fraction <= 1):
        fail(f"--lr_schedule must be cosine, constant or wsd, --min_lr_ratio in [0, 1], --decay_fraction "
             f"in (0, 1]; got {shape!r}, {min_lr_ratio}, {decay_fraction}")
    if warmup_steps >= total_steps:
        print(f"note: --warmup_steps {warmup_steps} >= the run's {total_steps} steps: the lr never peaks")
    start = {"cosine": warmup_steps, "constant": math.inf,
             "wsd": total_steps - max(1, round(decay_fraction * total_steps))}[shape]

    def factor(step):  # the warm-up's ramp, the peak until the decay starts, then the half cosine
        if step < max(warmup_steps, start):
            return step / warmup_steps if step < warmup_steps else 1.0
        progress = (step - start) / max(1, total_steps - start)
        return 0.5 * (1.0 + math.cos(math.pi * progress)) * (1 - min_lr_ratio) + min_lr_ratio
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------------------------
# files


def save_json(path, obj):  # whole or not at all
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


def append_jsonl(path, row):
    """One row, one write() to a file opened for appending: rows never interleave, a stop tears the last."""
    line = (json.dumps(row) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if os.write(fd, line) != len(line):
            raise OSError(28, "short write (disk full?)", path)
    finally:
        os.close(fd)


def fingerprint(path):
    """What identifies a file or a directory's files cheaply: names, sizes, times, and a hash of each head."""
    key = hashlib.sha256()
    files = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs] if os.path.isdir(path) else [path]
    for name in sorted(files):
        info = os.stat(name)
        with open(name, "rb") as f:
            key.update(f"{os.path.relpath(name, path)} {info.st_size} {info.st_mtime_ns}".encode())
            key.update(f.read(1 << 16))
    return key.hexdigest()[:20]


def record(args, **files):
    """What --resume checks: the flags but --resume, --save_every (paths as paths); inputs' fingerprints."""
    flags = {f"--{k}": os.path.realpath(v) if isinstance(v, str) and v and os.path.exists(v) else v
             for k, v in dataclasses.asdict(args).items() if k not in ("resume", "save_every")}
    return flags | {f"the contents of --{k}": fingerprint(p) for k, p in files.items() if os.path.exists(p)} \
        | {"processes": WORLD.size}  # a global batch is --batch_size x processes


def read_marker(path):  # the {stage, run} of a directory a stage wrote, or None
    try:
        with open(os.path.join(path, MARKER)) as f:
            return (lambda m: m if isinstance(m, dict) else None)(json.load(f))
    except (OSError, ValueError):
        return None


def check_output(out_dir, stage, inputs=(), own_files=()):
    """Refuse, before any work, an output overlapping an input, a file, or a folder this stage never wrote."""
    out = os.path.realpath(out_dir)
    if os.path.dirname(out) == out or not out_dir.strip():
        fail(f"--out_dir {out_dir!r} is the root or empty")
    for path in filter(os.path.exists, filter(None, inputs)):
        real = os.path.realpath(path)
        if out == real or real.startswith(out + os.sep) or out.startswith(real + os.sep):
            fail(f"--out_dir {out_dir} is or overlaps an input of this run ({path}): it would be overwritten")
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        fail(f"--out_dir {out_dir} exists and is not a directory")
    if os.path.isdir(out_dir) and not set(os.listdir(out_dir)) <= set(own_files):
        marker = read_marker(out_dir)
        if marker is None:
            fail(f"--out_dir {out_dir} is a non-empty directory no stage of this project wrote (it has no "
                 f"{MARKER}): choose another, or empty it")
        if marker.get("stage") != stage:
            fail(f"--out_dir {out_dir} holds the output of another stage ({marker['stage']}), not of {stage}")


def scratch_path(out_dir, kind):  # a hidden sibling .<name>.<kind>: a glob such as out/runs/* never takes it
    parent, name = os.path.split(os.path.abspath(out_dir))
    return os.path.join(parent, f".{name}.{kind}")


def take_lock(path, out_dir):
    """An exclusive flock on the file `path` (dropped by the kernel when the process ends, however it ends),
    or one error line naming its holder. A lock on a file its holder has removed is taken again."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 100).decode(errors="replace").strip() or "starting"
            os.close(fd)
            fail(f"--out_dir {out_dir} is being written by another run ({holder}): wait, or choose another")
        if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()}".encode())
            return fd
        os.close(fd)


class Output:
    """A stage's output directory, never half written and never lost. One writer: a lock on .<name>.lock
    (take_lock). The stage writes into .<name>.partial; publish() renames the old output aside, the new one
    in, then deletes the old (a kill in between leaves the old beside it, and the next run puts it back). A
    partial copy holding a saved state (state.pt; --fsdp's shards: state-<step>/) is kept for --resume.
    Every output holds MARKER: {stage, run, record}."""

    def __init__(self, out_dir, stage, inputs=(), resume=False, record=None):
        check_output(out_dir, stage, inputs)
        self.out_dir, self.work = out_dir, scratch_path(out_dir, "partial")
        self.aside, self.lock_path = scratch_path(out_dir, "old"), scratch_path(out_dir, "lock")
        self.made, parent = [], os.path.dirname(self.work)  # made here, removed again if the run fails
        while not os.path.exists(parent):
            self.made, parent = self.made + [parent], os.path.dirname(parent)
        os.makedirs(os.path.dirname(self.work), exist_ok=True)
        self.lock = take_lock(self.lock_path, out_dir)
        try:
            self._start(stage, inputs, resume, record)
        except BaseException:
            self._release()
            raise

    def _start(self, stage, inputs, resume, record):
        if os.path.isdir(self.aside) and not os.path.lexists(self.out_dir):
            print(f"note: putting back {self.out_dir}, moved aside by an interrupted run")
            os.replace(self.aside, self.out_dir)
        elif os.path.lexists(self.aside):
            print(f"note: removing {self.aside}, left by an interrupted run")
            shutil.rmtree(self.aside, ignore_errors=True)
        check_output(self.out_dir, stage, inputs)  # again, under the lock
        marker = read_marker(self.work) if os.path.isdir(self.work) else None
        if marker and marker.get("stage") == stage and os.path.exists(os.path.join(self.work, "state.pt")):
            if not resume:
                fail(f"{self.work} holds the saved state of an interrupted run of {self.out_dir}: pass "
                     f"--resume to continue it, or remove it to start over")
            changed = ", ".join(k for k in record or {} if (marker.get("record") or {}).get(k) != record[k])
            if changed:
                fail(f"--resume with other settings or inputs than the interrupted run ({changed}): use the "
                     f"same, or remove {self.work} to start over")
            self.run = marker.get("run", "")
            return
        if resume and (read_marker(self.out_dir) or {}).get("stage") == stage:
            fail(f"--resume: {self.out_dir} holds a finished run, nothing to resume: train again without it")
        if os.path.lexists(self.work):
            if marker is None or marker.get("stage") != stage:
                fail(f"{self.work} is in the way and no run of {stage} wrote it: remove it")
            print(f"note: removing {self.work}, left by an interrupted run")
            shutil.rmtree(self.work)
        if resume:
            print(f"note: nothing to resume for {self.out_dir}: starting from the beginning")
        self.run = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{os.urandom(2).hex()}"
        os.makedirs(self.work)
        save_json(os.path.join(self.work, MARKER), {"stage": stage, "run": self.run, "record": record})

    def publish(self):
        for path in glob.glob(os.path.join(self.work, "state[.-]*")):  # state.pt, --fsdp's state-<step>/
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)  # for --resume, not output
        if os.path.lexists(self.out_dir):
            os.replace(self.out_dir, self.aside)
        os.replace(self.work, self.out_dir)
        shutil.rmtree(self.aside, ignore_errors=True)
        self.made = []
        self._release()

    def _release(self):
        os.unlink(self.lock_path)  # before unlocking: a run waiting on this file sees it gone
        os.close(self.lock)
        for path in (p for p in self.made if not os.listdir(p)):  # deepest first
            os.rmdir(path)

    def abandon(self):  # the partial copy is kept if it holds a state (cleans_up's error line says so)
        if not os.path.exists(os.path.join(self.work, "state.pt")):
            shutil.rmtree(self.work, ignore_errors=True)
        self._release()


_unfinished = []  # the Outputs this process started and has not published


def start_output(out_dir, stage, inputs=(), resume=False, record=None):  # one cleans_up abandons if need be
    _unfinished.append(Output(out_dir, stage, inputs, resume, record))
    return _unfinished[-1]


def cleans_up(stage_main):
    """A stage's main: an early stop (Ctrl-C, SIGTERM, a full disk) abandons its outputs; one error line."""
    @functools.wraps(stage_main)
    def wrapper(*args, **kwargs):
        try:
            with suppress(ValueError):  # SIGTERM as Ctrl-C (ValueError: not in the main thread)
                signal.signal(signal.SIGTERM, signal.default_int_handler)
            return stage_main(*args, **kwargs)
        except (KeyboardInterrupt, OSError, SafetensorError) as e:  # safetensors' own error for a full disk
            why = "stopped by Ctrl-C or SIGTERM" if isinstance(e, KeyboardInterrupt) else \
                f"{e.strerror or e}: {e.filename}" if getattr(e, "filename", None) else str(e)
            kept = [o.work for o in _unfinished if os.path.exists(os.path.join(o.work, "state.pt"))]
            fail(why + (f"; {kept[0]} keeps the last saved state: the same command with --resume continues it"
                        if kept else ""))
        finally:
            while _unfinished:
                output = _unfinished.pop()
                if os.path.isdir(output.work):
                    output.abandon()
    return wrapper


def prepare_dir(path, stage, inputs=(), own_files=()):
    """A directory a stage adds files to (evaluate.py's results): made with a marker, or refused."""
    check_output(path, stage, inputs, own_files)
    if read_marker(path) is None:  # made whole beside it and renamed: a shard beside never sees it half-made
        os.makedirs(new := scratch_path(path, f"new{os.getpid()}"), exist_ok=True)
        save_json(os.path.join(new, MARKER), {"stage": stage})
        with suppress(OSError):  # onto nothing or an empty folder; fails onto another shard's, which is kept
            os.rename(new, path)
        shutil.rmtree(new, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# --resume: what a loop needs to go on as if never stopped, every --save_every steps in the partial copy


def save_whole(obj, path):
    """torch.save into path.tmp, renamed into place: whole or not at all; a full disk, one error line."""
    try:
        torch.save(obj, path + ".tmp")
    except RuntimeError as e:  # torch reports a full disk so, leaving a torn .tmp
        with suppress(OSError):
            os.remove(path + ".tmp")
        raise OSError(f"could not write {path}: {e}") from e
    os.replace(path + ".tmp", path)


def save_state(work, args, step, total, model, optimizer, scheduler, order, cursor, scaler):
    """Weights, AdamW, schedule, loss scale, data order, log size, each process's RNGs: main writes it."""
    if not args.save_every or step % args.save_every or step == total:
        return
    numpy_rng = np.random.get_state()
    rng = unshard([{"python": random.getstate(), "torch": torch.get_rng_state(),  # a list by rank
                    "numpy": [numpy_rng[0], numpy_rng[1].tolist(), *numpy_rng[2:]],
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}])
    state = {"step": step, "order": order, "cursor": cursor, "rng": rng, "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict(),
             "log_bytes": os.path.getsize(os.path.join(work, "train_log.jsonl"))}
    if args.fsdp:  # every process writes its shards of the weights and AdamW moments; state.pt names them
        from scale.fsdp import save_shards
        return save_shards(work, step, model, optimizer, state)
    if WORLD.main:
        save_whole({**state, "model": model.state_dict(), "optimizer": optimizer.state_dict()},
                   os.path.join(work, "state.pt"))


def restore_state(work, args, model, optimizer, scheduler, scaler):
    """(last step done, data order, cursor) of the saved state in `work`, restored in place; (0, [], 0)."""
    path = os.path.join(work, "state.pt")
    if not os.path.exists(path):
        return 0, [], 0
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torn by a full disk
        fail(f"could not read the saved state {path} ({type(e).__name__}): remove {work} to start over")
    if "shards" in state:  # --fsdp: every process reads its shards of the weights and AdamW moments
        from scale.fsdp import load_shards
        load_shards(os.path.join(work, state["shards"]), model, optimizer)
    else:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])  # nothing to load, and nothing done, without fp16
    rng = state["rng"][WORLD.rank]
    random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
    np.random.set_state((rng["numpy"][0], np.array(rng["numpy"][1], dtype=np.uint32), *rng["numpy"][2:]))
    torch.set_rng_state(rng["torch"])
    torch.cuda.set_rng_state_all(rng["cuda"])  # [] on the CPU: nothing
    if WORLD.main:  # every process reads the state, the main one writes the log
        with open(os.path.join(work, "train_log.jsonl"), "r+b") as f:
            f.truncate(state["log_bytes"])  # the rows of steps after the save are written again
    print(f"resumed from the state saved at step {state['step']}")
    return state["step"], state["order"], state["cursor"]
