"""
bench/logps.py -- time and peak memory of the per-token log-prob gather: naive vs fused (lm.py).

    python bench/logps.py                                # naive vs ours at dpo.py's default chunk, 3 rounds
    python bench/logps.py --chunks 128 512 2048          # three chunk sizes (0: dpo.py's default, by bytes)
    python bench/logps.py --chunks 128 --prototypes      # also the two prototypes below
    python bench/logps.py --vocab 8192 --length 128 --chunks 64 --reps 1   # a quick smoke run

Defaults: V 50,304, N = batch 4 x length 512 = 2,048 tokens, H 512, CPU, float32, no bias.
Each variant runs forward AND backward (upstream gradient of ones; gradients w.r.t. the hidden
states and the output weight):
  naive  lm.gather_logps_naive: the full [N, V] logits, log_softmax, gather;
  ours   lm.ChunkedLogProbs.apply(h, W, None, targets, chunk): [chunk, V] logits at a time, the
         forward keeps only the logsumexp, the backward recomputes each chunk's logits;
  lean   (--prototypes) the same algorithm with every [chunk, V] step done in place;
  vocab  (--prototypes) chunks over the vocabulary: [N, vc] blocks of as many numbers as [chunk, V].

Memory. Each (variant, chunk) runs in a FRESH PROCESS (the script re-invokes itself with --variant;
the child prints one JSON line) with MALLOC_MMAP_THRESHOLD_=65536 in its environment, so that freed
blocks go back to the OS and RSS sees every saving. The child creates the inputs, warms the kernels
up on a tiny input, reads RSS (the baseline), resets the high-water mark (writes "5" to
/proc/self/clear_refs; where that is refused VmHWM counts from process start) and runs ONE forward
+ backward: peak extra = VmHWM - baseline; 'held' = RSS between the forward and the backward.

Time. Then, in the same process, --time_malloc default (the default) puts glibc's allocator back to
its usual regime (mmap threshold 32 MiB, glibc's dynamic ceiling, trim threshold 64 MiB) so that the
[chunk, V] temporaries are reused as in a training run; with a 64 KiB threshold every temporary is
fresh pages, page-faulted and unmapped again, which costs the chunked variants far more than naive
(use --time_malloc mmap to see it). A warm-up call, then --reps calls of forward + backward: the
medians of the forward and of forward + backward wall time, and of the process CPU time, are
reported. The parent first checks in-process, on a small size, that every variant agrees with naive.

Rounds. --rounds times, naive and then every (variant, chunk) run one after the other, each in its own
process; a ratio (time, CPU time, memory) is taken to the naive row of the same round, and the table
gives each ratio's median over the rounds and the min-max of the time ratios. Timings depend on the
machine's load: on a busy machine compare ratios taken side by side, not rows across runs.
"""
import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import dpo  # noqa: E402
import lm  # noqa: E402

MB = 2 ** 20


@dataclass
class Args:
    vocab: int = field(default=50304, metadata={"help": "vocabulary size V"})
    batch: int = field(default=4, metadata={"help": "sequences per batch"})
    length: int = field(default=512, metadata={"help": "tokens per sequence (N = batch * length)"})
    hidden: int = field(default=512, metadata={"help": "hidden size H"})
    chunks: list = field(default_factory=lambda: [dpo.Args.logit_chunk],
                         metadata={"help": "chunk sizes (tokens) of the fused gather, e.g. 128 512 2048; 0: "
                                           "sized by bytes (lm.ChunkedLogProbs.tokens), dpo.py's default",
                                   "nargs": "+", "type": int})
    reps: int = field(default=3, metadata={
        "help": "timed repetitions of forward + backward after the warm-up (median reported)"})
    rounds: int = field(default=3, metadata={
        "help": "rounds of fresh processes, naive then every chunk in each: a ratio is taken within a round "
                "(side by side), its median and min-max over the rounds reported"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0 = torch's default)"})
    prototypes: bool = field(default=False, metadata={
        "help": "also run the prototypes `lean` and `vocab` at every chunk size"})
    time_malloc: str = field(default="default", metadata={
        "help": "allocator while timing: default (glibc's usual reuse) | mmap (64 KiB threshold, as for "
                "memory)"})
    seed: int = field(default=0, metadata={"help": "seed of the random inputs"})
    variant: str = field(default="", metadata={
        "help": "internal: run one variant in this process and print one JSON line"})
    chunk: int = field(default=128, metadata={"help": "internal: the chunk size of --variant"})


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Args):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        extra = {k: v for k, v in f.metadata.items() if k != "help"}
        if f.type in (bool, "bool"):
            parser.add_argument(f"--{f.name}", action="store_true", help=f.metadata["help"])
        else:
            parser.add_argument(f"--{f.name}", default=default,
                                type=extra.pop("type", f.type if callable(f.type) else str),
                                help=f.metadata["help"], **extra)
    args = Args(**vars(parser.parse_args(argv)))
    for name in ("vocab", "batch", "length", "hidden", "reps", "rounds", "chunk"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.time_malloc not in ("default", "mmap"):
        parser.error(f"--time_malloc must be default or mmap, got {args.time_malloc!r}")
    if any(c < 0 for c in args.chunks):
        parser.error(f"--chunks must all be >= 0, got {args.chunks}")
    return args


# ----------------------------------------------------------------------------------------------
# a prototype, for comparison only: the algorithm of lm.ChunkedLogProbs (float32/float64 inputs,
# no bias, no dtype casts) with every [chunk, V] step done in place, so a chunk costs ONE
# [chunk, V] buffer in each pass instead of two, and each element is touched fewer times.


class LeanLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):
        n = len(targets)
        logps, lse = hidden.new_empty(n), hidden.new_empty(n)
        for s in range(0, n, chunk):
            logits = hidden[s:s + chunk] @ weight.T  # [c, V], the only [c, V] buffer
            tgt = logits.gather(-1, targets[s:s + chunk, None]).squeeze(-1)
            m = logits.amax(-1, keepdim=True)
            lse[s:s + chunk] = logits.sub_(m).exp_().sum(-1).log_().add_(m.squeeze(-1))
            logps[s:s + chunk] = tgt - lse[s:s + chunk]
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk = chunk
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        hidden, weight, targets, lse = ctx.saved_tensors
        c = ctx.chunk
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for s in range(0, len(targets), c):
            h, g, t = hidden[s:s + c], grad_logps[s:s + c], targets[s:s + c]
            gl = h @ weight.T  # recompute the logits, then in place: -g * softmax + g * onehot
            gl.sub_(lse[s:s + c, None]).exp_().mul_(-g[:, None])
            gl[torch.arange(len(t), device=t.device), t] += g
            if grad_hidden is not None:
                torch.mm(gl, weight, out=grad_hidden[s:s + c])
            if grad_weight is not None:
                grad_weight.addmm_(gl.T, h)
        return grad_hidden, grad_weight, None, None


class VocabChunkedLogProbs(torch.autograd.Function):
    """A prototype: chunks over the VOCABULARY instead of the tokens, [N, vc] logits at a time.

    Every matmul then has the full N = 2048 as a dimension ([N, H] x [H, vc], [N, vc] x [vc, H],
    [vc, N] x [N, H]) instead of 128 rows, and each slice of grad_weight is written once instead of
    being read and rewritten once per token chunk. The forward keeps a running max and sum per token
    (online logsumexp). `vc` is given in columns; make_fn picks it so that one [N, vc] block holds
    as many numbers as one [chunk, V] block of the token-chunked versions (same memory).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, vc):
        n, v = len(targets), len(weight)
        run_max = hidden.new_full((n,), float("-inf"))
        run_sum, tgt = hidden.new_zeros(n), hidden.new_zeros(n)
        for s in range(0, v, vc):
            logits = hidden @ weight[s:s + vc].T  # [N, vc]
            rows = ((targets >= s) & (targets < s + vc)).nonzero().squeeze(1)
            tgt[rows] = logits[rows, targets[rows] - s]
            new_max = torch.maximum(run_max, logits.amax(-1))
            shifted = logits.sub_(new_max[:, None]).exp_().sum(-1)
            run_sum = run_sum.mul_((run_max - new_max).exp_()).add_(shifted)
            run_max = new_max
        lse = run_sum.log_().add_(run_max)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.vc = vc
        return tgt - lse

    @staticmethod
    def backward(ctx, grad_logps):
        hidden, weight, targets, lse = ctx.saved_tensors
        vc, g = ctx.vc, grad_logps
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        for s in range(0, len(weight), vc):
            w = weight[s:s + vc]
            gl = hidden @ w.T  # recompute, then in place: -g * softmax + g * onehot
            gl.sub_(lse[:, None]).exp_().mul_(-g[:, None])
            rows = ((targets >= s) & (targets < s + vc)).nonzero().squeeze(1)
            gl[rows, targets[rows] - s] += g[rows]
            if grad_hidden is not None:
                grad_hidden.addmm_(gl, w)
            if grad_weight is not None:
                torch.mm(gl.T, hidden, out=grad_weight[s:s + vc])
        return grad_hidden, grad_weight, None, None


def vocab_columns(chunk, n, v):
    """Columns of an [n, vc] block holding as many numbers as a [chunk, v] block."""
    return max(1, min(v, -(-chunk * v // n)))


def make_fn(variant, chunk):
    if variant == "naive":
        return lambda h, w, t: lm.gather_logps_naive(h, w, None, t)
    if variant == "ours":
        return lambda h, w, t: lm.ChunkedLogProbs.apply(h, w, None, t, chunk)
    if variant == "lean":
        return lambda h, w, t: LeanLogProbs.apply(h, w, t, chunk)
    if variant == "vocab":
        return lambda h, w, t: VocabChunkedLogProbs.apply(h, w, t, vocab_columns(chunk, len(t), len(w)))
    raise SystemExit(f"unknown --variant {variant!r} (naive | ours | lean | vocab)")


def make_inputs(n, v, hdim, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, hdim, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, hdim, generator=g, dtype=dtype) / hdim ** 0.5).requires_grad_()
    targets = torch.randint(v, (n,), generator=g)
    return hidden, weight, targets


def fwd_bwd(fn, hidden, weight, targets):
    out = fn(hidden, weight, targets)
    return out, torch.autograd.grad(out, (hidden, weight), torch.ones_like(out))


# ----------------------------------------------------------------------------------------------
# the child: one variant, one process


def status_kb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def reset_hwm():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def usual_malloc():
    """glibc's usual regime after MALLOC_MMAP_THRESHOLD_=65536: blocks under 32 MiB come from the heap and are
    reused."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
        return bool(libc.mallopt(-3, 32 * MB) and libc.mallopt(-1, 64 * MB))
    except (OSError, AttributeError):
        return False


def child(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    fn = make_fn(args.variant, args.chunk)
    n = args.batch * args.length
    hidden, weight, targets = make_inputs(n, args.vocab, args.hidden, args.seed)
    fwd_bwd(fn, *make_inputs(8, 64, 8, 1))  # load and initialise the kernels, nothing big

    base = status_kb("VmRSS")
    reset = reset_hwm()
    out = fn(hidden, weight, targets)
    fwd_peak = status_kb("VmHWM")
    held = status_kb("VmRSS")  # what the forward keeps for the backward (plus the output)
    grads = torch.autograd.grad(out, (hidden, weight), torch.ones_like(out))
    peak = status_kb("VmHWM")
    del out, grads

    malloc = args.time_malloc == "default" and usual_malloc()
    fwd_bwd(fn, hidden, weight, targets)  # the timing warm-up
    fwd, total, cpu = [], [], []
    for _ in range(args.reps):
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn(hidden, weight, targets)
        t1 = time.perf_counter()
        grads = torch.autograd.grad(out, (hidden, weight), torch.ones_like(out))
        t2, c2 = time.perf_counter(), time.process_time()
        fwd.append(t1 - t0)
        total.append(t2 - t0)
        cpu.append(c2 - c0)
        del out, grads
    print(json.dumps({"variant": args.variant, "chunk": None if args.variant == "naive" else args.chunk,
                      "fwd_s": statistics.median(fwd), "total_s": statistics.median(total),
                      "cpu_s": statistics.median(cpu),
                      "fwd_runs": fwd, "total_runs": total, "threads": torch.get_num_threads(),
                      "hwm_reset": reset, "time_malloc": "default" if malloc else "mmap",
                      "vocab_cols": vocab_columns(args.chunk, n,
                                                  args.vocab) if args.variant == "vocab" else None,
                      "base_mb": base / 1024, "peak_extra_mb": (peak - base) / 1024,
                      "fwd_peak_extra_mb": (fwd_peak - base) / 1024, "fwd_held_mb": (held - base) / 1024}))


def run_child(args, variant, chunk):
    cmd = [sys.executable, os.path.abspath(__file__), "--variant", variant, "--chunk", str(chunk),
           "--vocab", str(args.vocab), "--batch", str(args.batch), "--length", str(args.length),
           "--hidden", str(args.hidden), "--reps", str(args.reps), "--threads", str(args.threads),
           "--seed", str(args.seed), "--time_malloc", args.time_malloc]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"child {variant} chunk {chunk} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# the parent


def check_agreement(variants, chunks, n=300, v=1000, hdim=64):
    """Max abs differences of every variant against naive, random upstream gradient; exits if they
    disagree."""
    print(f"agreement with naive (N {n}, V {v}, H {hdim}, random upstream): max |diff| of logps, grad "
          "hidden, grad weight")
    for dtype, tol in ((torch.float32, 1e-4), (torch.float64, 1e-10)):
        hidden, weight, targets = make_inputs(n, v, hdim, seed=1, dtype=dtype)
        upstream = torch.randn(n, generator=torch.Generator().manual_seed(2), dtype=dtype)

        def run(fn):
            out = fn(hidden, weight, targets)
            return (out.detach(), *torch.autograd.grad(out, (hidden, weight), upstream))

        ref = run(make_fn("naive", 1))
        for variant in variants:
            for chunk in chunks + [7]:
                d = [(a - b).abs().max().item() for a, b in zip(run(make_fn(variant, chunk)), ref)]
                print(f"  {str(dtype)[6:]:7s} {variant:5s} chunk {chunk:5d}: "
                      f"{d[0]:.1e} {d[1]:.1e} {d[2]:.1e}")
                if max(d) > tol:
                    sys.exit(f"{variant} chunk {chunk} disagrees with naive by {max(d):.1e} in {dtype}")


def main(args):
    if args.variant:
        return child(args)
    n = args.batch * args.length
    variants = ["ours"] + (["lean", "vocab"] if args.prototypes else [])
    args.chunks = [lm.ChunkedLogProbs.tokens(c, args.vocab) for c in args.chunks]  # 0: by bytes
    check_agreement(variants, args.chunks)
    print(f"\nV {args.vocab}, N {n} ({args.batch} x {args.length}), H {args.hidden}, float32, CPU, "
          f"{args.reps} reps; one fresh process per row, {args.rounds} rounds", flush=True)
    keys = [("naive", None)] + [(variant, chunk) for chunk in args.chunks for variant in variants]
    runs = {key: [] for key in keys}  # a row per round
    for r in range(args.rounds):
        for variant, chunk in keys:
            runs[variant, chunk].append(run_child(args, variant, chunk or 1))  # (naive has no chunk)
            print(f"  round {r + 1}: {variant}" + (f" chunk {chunk}" if chunk else "")
                  + f": {runs[variant, chunk][-1]['total_s']:.2f} s", flush=True)
    naive = runs["naive", None]
    hwm = "" if naive[0]["hwm_reset"] else ", clear_refs refused: VmHWM from process start"
    print(f"\nthreads {naive[0]['threads']}, allocator while timing: {naive[0]['time_malloc']}, "
          f"RSS before the call {naive[0]['base_mb']:.0f} MB" + hwm)
    head = (f"{'variant':7s} {'chunk':>5s} {'fwd s':>6s} {'fwd+bwd s':>9s} {'cpu s':>6s} "
            f"{'peak extra MB':>13s} "
            f"{'held MB':>7s} {'time ratio':>10s} {'cpu ratio':>9s} {'mem ratio':>9s}  "
            f"min-max over rounds: time, cpu ratio")
    print(head)
    print("-" * len(head))
    med = statistics.median
    for (variant, chunk), rows in runs.items():
        ratios = {k: [r[k] / max(b[k], 1e-9) for r, b in zip(rows, naive)]
                  for k in ("total_s", "cpu_s", "peak_extra_mb")}
        print(f"{variant:7s} {'-' if chunk is None else chunk:>5} {med(r['fwd_s'] for r in rows):6.3f} "
              f"{med(r['total_s'] for r in rows):9.3f} {med(r['cpu_s'] for r in rows):6.3f} "
              f"{med(r['peak_extra_mb'] for r in rows):13.0f} {med(r['fwd_held_mb'] for r in rows):7.0f} "
              f"{med(ratios['total_s']):10.2f} {med(ratios['cpu_s']):9.2f} "
              f"{med(ratios['peak_extra_mb']):9.2f}  "
              f"{min(ratios['total_s']):.2f}-{max(ratios['total_s']):.2f}, "
              f"{min(ratios['cpu_s']):.2f}-{max(ratios['cpu_s']):.2f}")
    print("ratios: variant / naive of the same round, median over the rounds (time: forward + backward wall "
          "time; cpu: its\nprocess CPU time, both threads, steadier on a busy machine; memory: peak extra "
          "RSS); target: memory <= 0.25,\ntime <= 1.5. 'held': RSS kept from forward to backward.")
    default = lm.ChunkedLogProbs.tokens(dpo.Args.logit_chunk, args.vocab)
    print(f"dpo.py's default --logit_chunk {dpo.Args.logit_chunk}: chunks of {default} tokens at V "
          f"{args.vocab} (at most {default * args.vocab * 4 / MB:.0f} MiB of float32 logits each; see "
          "bench/README.md)")
    if any(variant == "vocab" for variant, _ in keys):
        cols = sorted({(c, runs["vocab", c][0]["vocab_cols"]) for v, c in keys if v == "vocab"})
        print("vocab: chunk c means [N, vc] blocks with vc = " + ", ".join(f"{vc} (c {c})" for c, vc in cols))


if __name__ == "__main__":
    main(parse_args())
