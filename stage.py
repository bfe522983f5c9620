"""
stage.py -- what every stage shares: flags, one-line errors, and outputs that never lose anything.

Every script (toy_tldr.py, sft.py, reward.py, dpo.py, is_dpo.py, evaluate.py, toy_gaussian.py) parses its
flags with `parse_args`, checks them with `check_args`, stops with one `error:` line through `fail`, and
writes its output through `start_output` / `finish_output`: into a hidden, locked sibling directory that is
renamed into place only when complete, never over a directory the stage did not write (README, "Outputs,
inputs, interruptions"). Nothing here is about alignment: read it when you need to, not first.
"""
import dataclasses
import functools
import json
import math
import os
import shutil
import time


MARKER = ".stage.json"  # in every output a stage writes: which stage and run wrote it


def fail(message):
    """Stop with one clear line (tests catch SystemExit)."""
    raise SystemExit(f"error: {message}")


def one_process_only(what):
    """Refuse to run `what` as several processes (torchrun --nproc_per_node N): it does not split its work."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        fail(f"{what} runs in one process: start it with python, not with torchrun and several processes")


def parse_args(config_class, doc):
    """Flags from a config dataclass (every field's help and default show in --help), doc on top.

    An unknown or misspelt flag is refused as argparse refuses one: usage, one error line, exit 2
    (HfArgumentParser alone raises a ValueError; allow_abbrev=False: --lr must not stand for --lr_x)."""
    import argparse

    from transformers import HfArgumentParser

    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    parser = HfArgumentParser(config_class, description=doc, formatter_class=Formatter, allow_abbrev=False)
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
    for name in positive:
        if not getattr(args, name) > 0:
            fail(f"--{name} must be > 0, got {getattr(args, name)}")
    for name in non_negative:
        if not getattr(args, name) >= 0:
            fail(f"--{name} must be >= 0, got {getattr(args, name)}")
    if hasattr(args, "seed") and not 0 <= args.seed < 2 ** 32:  # numpy's seeds are 32-bit
        fail(f"--seed must be in [0, 2^32), got {args.seed}")
    if hasattr(args, "threads") and args.threads < 0:
        fail(f"--threads must be >= 0 (0 = torch's default), got {args.threads}")


def scratch_path(out_dir, kind):
    """A hidden sibling of out_dir, .<name>.<kind>: its lock, its unfinished copy. Hidden, so that a
    glob such as out/runs/* never takes one for an output."""
    parent, name = os.path.split(os.path.abspath(out_dir))
    return os.path.join(parent, f".{name}.{kind}")


def read_marker(path):
    """The marker of a directory a stage wrote, or None."""
    try:
        with open(os.path.join(path, MARKER)) as f:
            marker = json.load(f)
        return marker if isinstance(marker, dict) else None
    except (OSError, ValueError):
        return None


def check_output(out_dir, stage, inputs=(), own_files=()):
    """Refuse, before any work, an output whose replacement would lose something: one of the run's
    inputs (or a directory holding one, or one inside one), a file, or a non-empty directory that
    this stage did not write (no marker naming it, and files other than `own_files`)."""
    out = os.path.realpath(out_dir)
    if os.path.dirname(out) == out:
        fail(f"--out_dir {out_dir} is the root directory")
    for path in inputs:
        if path and os.path.exists(path):
            real = os.path.realpath(path)
            if out == real or real.startswith(out + os.sep) or out.startswith(real + os.sep):
                fail(f"--out_dir {out_dir} is or overlaps an input of this run ({path}): "
                     f"it would be overwritten")
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        fail(f"--out_dir {out_dir} exists and is not a directory")
    if os.path.isdir(out_dir) and not set(os.listdir(out_dir)) <= set(own_files):
        marker = read_marker(out_dir)
        if marker is None:  # (an output of this project written before the markers: remove it, or mark it)
            fail(f"--out_dir {out_dir} is a non-empty directory no stage of this project wrote (it has no "
                 f"{MARKER}): choose another, or empty it")
        if marker.get("stage") != stage:
            fail(f"--out_dir {out_dir} holds the output of another stage ({marker.get('stage')}), "
                 f"not of {stage}")


def take_lock(path, what):
    """An exclusive fcntl lock on the file `path` (created), or one error line naming its holder.
    The kernel drops the lock when its process ends, however it ends: a lock is never stale."""
    import fcntl

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip()
            os.close(fd)
            fail(f"{what} is being written by another run ({holder or 'starting'}); "
                 f"wait for it or choose another")
        try:  # the file we locked must still be the one at `path` (its last holder removes it)
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()}".encode())
    return fd


def release_lock(fd, path):
    os.unlink(path)  # before unlocking: a run waiting on this file sees it gone and takes a new one
    os.close(fd)


def missing_parents(out_dir):
    """The directories above out_dir that do not exist yet, deepest first."""
    missing, path = [], os.path.dirname(os.path.abspath(out_dir))
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def remove_empty(dirs):
    for path in dirs:  # deepest first; one that holds anything (another run's output) stays
        try:
            os.rmdir(path)
        except OSError:
            return


class Output:
    """One stage's output directory, written so that nothing is lost and nothing is half written.

    * a lock, <parent>/.<name>.lock, held to the end: a second run on the same output fails at once;
    * the stage writes into a new hidden directory: .<name>.tmp-<pid>-<random>, or for a training
      stage .<name>.partial, which outlives a kill so that --resume can continue from its saved state;
    * publish: the old output is renamed aside, the new one renamed in, then the old one deleted, so a
      kill at any moment leaves out_dir whole (old or new) or absent, and the other copy beside it;
    * abandon (any failure): the new directory is removed -- unless it holds the saved state of a
      run that was interrupted (not stopped by an error), which --resume continues.
    Every directory it writes holds the marker naming the stage and the run.
    """

    def __init__(self, out_dir, stage, inputs=(), resumable=False, resume=False):
        check_output(out_dir, stage, inputs)
        self.out_dir, self.stage, self.resumable = out_dir, stage, resumable
        self.made = missing_parents(out_dir)  # made here, and removed again if the run fails
        os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
        self.lock_path = scratch_path(out_dir, "lock")
        self.lock = take_lock(self.lock_path, f"--out_dir {out_dir}")
        try:
            self._clear_leftovers()
            check_output(out_dir, stage, inputs)  # again, under the lock: another run may have published
            unique = f"tmp-{os.getpid()}-{os.urandom(4).hex()}"
            self.work = scratch_path(out_dir, "partial" if resumable else unique)
            marker = read_marker(self.work) if os.path.isdir(self.work) else None
            saved = os.path.exists(os.path.join(self.work, "state.pt"))
            if marker and marker.get("stage") == stage and saved:
                if not resume:
                    fail(f"{self.work} holds the saved state of an interrupted run of {out_dir}: "
                         f"pass --resume to continue it, or remove it to start over")
                self.run = marker.get("run", "")
                return
            if os.path.lexists(self.work):  # not ours, or nothing saved yet: nothing to continue
                if marker is None or marker.get("stage") != stage:
                    fail(f"{self.work} is in the way and no run of {stage} wrote it: remove it")
                shutil.rmtree(self.work)
            if resume:
                print(f"note: nothing to resume for {out_dir}: starting from the beginning")
            self.run = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{os.urandom(2).hex()}"
            os.makedirs(self.work)
            with open(os.path.join(self.work, MARKER), "w") as f:
                json.dump({"stage": stage, "run": self.run}, f)
        except BaseException:
            release_lock(self.lock, self.lock_path)
            remove_empty(self.made)
            raise

    def _clear_leftovers(self):
        """Copies left by a killed run of this output (we hold the lock: no one is writing them). The old
        output that a publish killed between its two renames had moved aside is put back."""
        parent, name = os.path.split(scratch_path(self.out_dir, ""))
        for entry in sorted(os.listdir(parent)):
            path = os.path.join(parent, entry)
            if entry.startswith(f"{name}old-") and not os.path.lexists(self.out_dir):
                print(f"note: putting back {self.out_dir}, moved aside by an interrupted run")
                os.replace(path, self.out_dir)
            elif entry.startswith((f"{name}tmp-", f"{name}old-")):
                print(f"note: removing {path}, left by an interrupted run")
                shutil.rmtree(path, ignore_errors=True)

    def publish(self):
        aside = None
        if os.path.lexists(self.out_dir):
            aside = scratch_path(self.out_dir, f"old-{os.getpid()}-{os.urandom(4).hex()}")
            os.replace(self.out_dir, aside)
        os.replace(self.work, self.out_dir)
        if aside:
            shutil.rmtree(aside)
        release_lock(self.lock, self.lock_path)

    def abandon(self, interrupted):
        """interrupted: stopped from outside (Ctrl-C, a crash, a full disk), not by an error of the run."""
        state = os.path.join(self.work, "state.pt")
        if interrupted and self.resumable and os.path.exists(state):
            print(f"note: {self.work} keeps the state of this run: --resume continues from it")
        else:
            shutil.rmtree(self.work, ignore_errors=True)
        release_lock(self.lock, self.lock_path)
        remove_empty(self.made)


_unfinished = {}  # work dir -> Output: started in this process, not yet published


def start_output(out_dir, stage, inputs=(), resumable=False, resume=False):
    """The directory to write the stage's output into (see Output); finish_output publishes it."""
    output = Output(out_dir, stage, inputs, resumable, resume)
    _unfinished[output.work] = output
    return output.work


def finish_output(work, out_dir):
    output = _unfinished.pop(work)
    assert output.out_dir == out_dir
    output.publish()


def cleans_up(stage_main):
    """Decorates a stage's main function: whatever way it stops early, the outputs it started are
    abandoned (their unfinished copies removed, their locks released), and a failure to read or
    write a file (a full or read-only disk) ends in one error line instead of a traceback."""
    @functools.wraps(stage_main)
    def wrapper(*args, **kwargs):
        before = set(_unfinished)
        try:
            return stage_main(*args, **kwargs)
        except OSError as e:
            _abandon(before, interrupted=True)
            fail(f"{e.strerror or e}: {e.filename}" if e.filename else str(e))
        except SystemExit:
            _abandon(before, interrupted=False)
            raise
        finally:
            _abandon(before, interrupted=True)
    return wrapper


def _abandon(before, interrupted):
    for work in set(_unfinished) - before:
        _unfinished.pop(work).abandon(interrupted)


def prepare_dir(path, stage, inputs=(), own_files=()):
    """A directory a stage adds files to without replacing it (evaluate.py's results and plots):
    created with a marker, or refused if it holds other files than `own_files` and no marker of this stage."""
    check_output(path, stage, inputs, own_files)
    os.makedirs(path, exist_ok=True)
    if read_marker(path) is None:
        with open(os.path.join(path, MARKER), "w") as f:
            json.dump({"stage": stage}, f)
