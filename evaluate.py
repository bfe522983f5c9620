"""
evaluate.py -- win-rate and KL of every checkpoint, the trade-off plots, and the lesson's claims.

For each checkpoint of each run (the paper's App. D; METHOD.md, section 7):
  * win_rate: a summary sampled at temperature 0.01 for each of N eval prompts; the share of prompts where
    the judge scores it above the prompt's reference, a tie counting half (--ties loss: none, the paper's).
    The judge: the toy's true scorer (--judge true, the default) or a gold RM (--judge rm, as on real data);
  * true_win_rate, true_score (toy only): the true scorer's verdict, also beside a gold RM's (gold_win_rate)
  * kl: y ~ pi_theta at temperature 1, and the sum over its tokens of the full next-token KL
    sum_v pi_theta(v|x,y<t) (log pi_theta - log pi_ref)(v|x,y<t), averaged over prompts; mean_length.
One row per checkpoint goes to out/eval/results.jsonl (a re-run skips the rows there); then claims.py
draws out/plots/tradeoff.png and dynamics.png and writes out/eval/summary.md (mean +- std over seeds).

Run (after dpo.py / is_dpo.py):
    python evaluate.py                                    # every run in out/runs/
    python evaluate.py --plots_only                       # redraw from results.jsonl
    python evaluate.py --check                            # the claims over the seeds, with 95% CIs
    torchrun --standalone --nproc_per_node 2 evaluate.py   # 2 processes (or: --shard 0/2, --shard 1/2)
"""
import contextlib
import fcntl
import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

import lm
import reward
import stage
from stage import fail


@dataclass
class Args:
    runs: str = field(default="out/runs/*", metadata={"help": "glob of run directories (dpo.py / is_dpo.py)"})
    data: str = field(default="out/toy_tldr", metadata={"help": "eval prompts: eval.jsonl or its directory"})
    judge: str = field(default="true", metadata={"help": "true (the toy's hidden scorer) | rm (--gold_path)"})
    ties: str = field(default="half", metadata={"help": "half (a tie counts 1/2) | loss (the paper's >)"})
    gold_path: str = field(default="out/gold_rm", metadata={"help": "--judge rm: the gold reward model"})
    sft_path: str = field(default="", metadata={"help": "pi_ref for the KL; default: each run's sft_path"})
    num_prompts: int = field(default=256, metadata={"help": "eval prompts per checkpoint (the paper: 512)"})
    kl_prompts: int = field(default=128, metadata={"help": "the first N eval prompts give the KL (0 = all)"})
    temperature: float = field(default=0.01, metadata={"help": "sampling temperature of the win-rate"})
    max_prompt_len: int = field(default=64, metadata={"help": "longest prompt in tokens (longer: error)"})
    max_response_len: int = field(default=24, metadata={"help": "response tokens sampled, EOS included"})
    sample_batch_size: int = field(default=64, metadata={"help": "prompts per sampling / scoring batch"})
    seed: int = field(default=0, metadata={"help": "sampling seed, the same for every checkpoint"})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch (0 = torch's default)"})
    out_dir: str = field(default="out/eval", metadata={"help": "results.jsonl and summary.md go here"})
    shard: str = field(default="0/1", metadata={"help": "i/n: every n-th checkpoint from the i-th, no plots"})
    plots_dir: str = field(default="out/plots", metadata={"help": "tradeoff.png and dynamics.png go here"})
    plots_only: bool = field(default=False, metadata={"help": "redraw plots and summary from results.jsonl"})
    check: bool = field(default=False, metadata={"help": "the claims, 95%% CIs: check.md; exit 1: one fails"})


OWN_FILES = {"results.jsonl", "results.jsonl.lock", "summary.md", "tradeoff.png", "dynamics.png"}  # added

# ----------------------------------------------------------------------------------------------
# 1. the metrics


def win_rate(policy_scores, reference_scores, ties="half"):
    """Share of prompts where the sample scores above the reference; a tie counts half (ties="loss": none)."""
    ours, reference = np.asarray(policy_scores), np.asarray(reference_scores)
    return float(np.mean((ours > reference) + (0.5 if ties == "half" else 0.0) * (ours == reference)))


@torch.no_grad()
def sequence_kl(model, ref, examples, pad_id, batch_size=64):
    """[N]: per (prompt_ids, response_ids) sampled from the policy, the sum over its tokens of KL(pi_theta ||
    pi_ref) of the next token: its mean over y ~ pi_theta is the sequence KL, less noisy than r(y)'s."""
    device, out = next(model.parameters()).device, []
    for s in range(0, len(examples), batch_size):
        batch = lm.to_device(lm.collate_grouped(examples[s:s + batch_size], pad_id), device)
        mask = batch["response_mask"].bool()  # h[:, t] predicts response token t
        with torch.autocast(device.type, enabled=False):  # float32: bf16's rounding would add to a KL near 0
            h_p = lm.response_hidden(model.base_model, batch)[:, :-1][mask]
            h_q = lm.response_hidden(ref.base_model, batch)[:, :-1][mask]
            logits_p, logits_q = model.get_output_embeddings()(h_p), ref.get_output_embeddings()(h_q)
        # BEGIN SOLUTION
        logp, logq = logits_p.log_softmax(-1), logits_q.log_softmax(-1)
        kl_token = (logp.exp() * (logp - logq)).sum(-1)
        # END SOLUTION
        rows = mask.nonzero()[:, 0]
        out.append(torch.zeros(len(mask), dtype=kl_token.dtype, device=device).index_add(0, rows, kl_token))
    return torch.cat(out).cpu()


def evaluate_checkpoint(model, ref, setup, args):
    """One results row's metrics for one policy; ref: pi_ref for the KL (METHOD.md, section 7)."""
    tokenizer, prompts = setup.tokenizer, setup.prompts
    pad, eos, banned = tokenizer.pad_token_id, tokenizer.eos_token_id, lm.banned_ids(tokenizer, model)
    generator = torch.Generator(device=setup.device).manual_seed(args.seed)  # the same for every checkpoint
    # --- the algorithm: samples at --temperature for the win-rate, at 1 for the KL ---
    with setup.autocast:
        outs, _ = lm.sample(model, prompts, eos, pad, args.max_response_len, args.temperature,
                            args.sample_batch_size, generator, suppress_ids=banned)
        texts = [lm.decode_response(tokenizer, o) for o in outs]
        kl_prompts = prompts[:args.kl_prompts or len(prompts)]  # the KL needs fewer prompts than a win-rate
        kl_outs, _ = lm.sample(model, kl_prompts, eos, pad, args.max_response_len, 1.0,
                               args.sample_batch_size, generator, suppress_ids=banned)
        kl = sequence_kl(model, ref, list(zip(kl_prompts, kl_outs)), pad, args.sample_batch_size)
    metrics = {"kl": kl.mean().item(), "mean_length": float(np.mean([len(o) for o in outs])),
               "finished": float(np.mean([f for _, f in texts])), "example": texts[0][0]}
    metrics.update(judge_samples(setup, args, texts, outs))
    metrics["win_rate"] = metrics["true_win_rate" if args.judge == "true" else "gold_win_rate"]
    return metrics


def judge_samples(setup, args, texts, outs=None):
    """The true scorer's (toy) and the gold RM's verdicts on the samples [(text, finished)], ids `outs`."""
    metrics, rows = {}, setup.rows
    if setup.toy:  # the hidden scorer: an unfinished summary is scored as such
        import toy_tldr
        true = [toy_tldr.true_score(r["prompt"], t, f) for r, (t, f) in zip(rows, texts)]
        metrics.update(true_win_rate=win_rate(true, setup.ref_true, args.ties), true_score=np.mean(true))
    if setup.gold is not None:
        rows = [{**r, "sample": t, **({"sample_ids": outs[i]} if outs else {})}
                for i, (r, (t, _)) in enumerate(zip(rows, texts))]
        scores = gold_scores(setup, args, rows, "sample", [f for _, f in texts])
        metrics.update(gold_win_rate=win_rate(scores, setup.ref_gold, args.ties), gold_score=np.mean(scores))
    return metrics


@torch.no_grad()
def gold_scores(setup, args, rows, column, finished=None):
    """The gold RM's scores (reward.score_examples) of each row's prompt and response in `column`: its C_ids
    where the row has them, else ' ' + text + EOS; where `finished` says a sample did not end, without EOS."""
    examples = lm.encode(setup.tokenizer, rows, column, args.max_prompt_len, args.max_response_len)
    eos = setup.tokenizer.eos_token_id
    examples = [(p, r[:-1] if finished is not None and not finished[i] and r[-1] == eos else r)
                for i, (p, r) in enumerate(examples)]
    return reward.score_examples(setup.gold, examples, setup.tokenizer.pad_token_id, args.sample_batch_size,
                                 setup.device, setup.autocast)


# ----------------------------------------------------------------------------------------------
# 2. runs, checkpoints, the results file


# a dpo.py / is_dpo.py run: its directory, its args.json, and its checkpoints [(step, ckpt_dir)] by step
Run = NamedTuple("Run", [("dir", str), ("args", dict), ("checkpoints", list)])


def find_runs(pattern):
    """[Run] of every run directory the glob matches (an unfinished run is hidden: * does not match it). A
    run without args.json or checkpoints, a checkpoint without a model, a damaged args.json: refused."""
    dirs = sorted(d for d in glob.glob(pattern) if os.path.isdir(d))
    if not dirs:
        fail(f"--runs {pattern!r} matches no run directory (train with dpo.py / is_dpo.py first)")
    runs = []
    for run in dirs:
        path = os.path.join(run, "args.json")
        if not os.path.isfile(path):
            fail(f"{run} has no args.json: not a dpo.py / is_dpo.py run")
        ckpts = sorted((int(m.group(1)), d) for d in glob.glob(os.path.join(run, "ckpt-*"))
                       if (m := re.fullmatch(r"ckpt-(\d+)", os.path.basename(d))))
        if not ckpts or not all(os.path.isfile(os.path.join(d, "config.json")) for _, d in ckpts):
            fail(f"{run} has no ckpt-<step> directories, or one that holds no model (no config.json)")
        try:
            with open(path) as f:
                run_args = json.load(f)
        except ValueError as e:
            fail(f"{path} is not valid JSON ({e}): a damaged run; train it again")
        needed = ["run_name", "method", "beta", "seed", "total_steps", "num_epochs", "sft_path"]
        lacks = [k for k in needed if k not in run_args] if isinstance(run_args, dict) else needed
        if lacks:
            fail(f"{path} lacks {lacks}: not the args.json of a dpo.py / is_dpo.py run")
        runs.append(Run(run, run_args, ckpts))
    return runs


@contextlib.contextmanager
def locked(path):
    """An exclusive lock on <path>.lock: evaluations side by side (--shard) share one results file."""
    with open(path + ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def read_results(path, repair=False):
    """The rows of results.jsonl. A torn last line (an interrupted write) is dropped and reported, and with
    repair (under the lock, before appending) cut off; any other line not a JSON object is refused."""
    if not os.path.isfile(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    lines, rows, seen = data.split(b"\n"), [], {}  # the last item follows the last newline: b"" if whole
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line) if line.strip() else {}
        except ValueError:
            row = None
        if isinstance(row, dict):
            key = (row.get("run"), row.get("run_id"), row.get("step"), row.get("pi_ref"))
            if row and (key in seen or not np.isfinite(row.get("kl", 0.0))):
                fail(f"{path} line {n} " + (f"repeats line {seen[key]}" if key in seen else "has a KL not "
                                            "finite") + ": a damaged file; fix or remove that line")
            seen[key], rows = n, rows + ([row] if row else [])
        elif n < len(lines):
            fail(f"{path} line {n} is not a JSON object: fix or remove that line")
        else:  # the last line, and no newline after it: its write was cut short
            print(f"note: {path}: dropped a torn last line ({len(line)} bytes; an interrupted write)")
            if repair:
                with open(path, "r+b") as f:
                    f.truncate(len(data) - len(line))
            return rows
    if repair and lines[-1].strip():  # a whole last row without its newline: the next must not join it
        with open(path, "ab") as f:
            f.write(b"\n")
    return rows


def eval_settings(args, rows):
    """All a row's numbers depend on but the checkpoint: rows are reused only under equal settings, and one
    results file holds one setting. (Thread count and batch size move only the last bits.)"""
    data = [[r["prompt"], r["reference"]] + [r[k] for k in ("prompt_ids", "reference_ids") if k in r]
            for r in rows]
    gold = f"{os.path.realpath(args.gold_path)} (run {(stage.read_marker(args.gold_path) or {}).get('run')})"
    return {"num_prompts": len(rows), "kl_prompts": args.kl_prompts, "temperature": args.temperature,
            "max_prompt_len": args.max_prompt_len, "max_response_len": args.max_response_len,
            "seed": args.seed, "ties": args.ties, "judge": gold if args.judge == "rm" else "the true scorer",
            "data": hashlib.sha256(json.dumps(data).encode()).hexdigest()[:16],
            "kl_ref": os.path.realpath(args.sft_path) if args.sft_path else "each run's sft_path"}


def current_results(path, runs, settings):
    """The rows of the runs as they are (under the lock): rows of a run or pi_ref trained again since are
    dropped from the file; rows of other settings, or of two pi_refs, refused (never mixed)."""
    rows = read_results(path, repair=True)
    trained = lambda r: (r.get("run_id"), r.get("pi_ref"))  # noqa: E731 -- which training, which pi_ref
    current = {run.args["run_name"]: trained(run.args) for run in runs}
    fresh = [r for r in rows if current.get(r["run"], trained(r)) == trained(r)]
    if len(fresh) < len(rows):
        print(f"evaluate: dropping {len(rows) - len(fresh)} rows of runs or pi_refs (KL) trained again")
        with open(f"{path}.tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in fresh)
        os.replace(f"{path}.tmp", path)
    other = [r for r in fresh if r.get("settings") != settings]
    if other:
        theirs = other[0].get("settings") or {}
        fail(f"{path} holds {len(other)} rows evaluated with other settings "
             f"({', '.join(k for k in settings if theirs.get(k) != settings[k])}): evaluate into another "
             f"--out_dir, or move that file aside")
    if len(refs := {r.get("pi_ref") for r in fresh}) > 1:
        fail(f"{path} holds rows whose KL was measured against {len(refs)} different pi_refs (sft_path): "
             f"evaluate into another --out_dir, or move that file aside")
    return fresh


# ----------------------------------------------------------------------------------------------
# 3. the evaluation


def prepare(args):
    """Flags, runs and outputs checked before any work; then what every evaluation shares: the eval rows and
    prompt ids, the tokenizer, the judge and the references' scores (ref_true: toy, ref_gold: --judge rm)."""
    stage.check_args(args, non_negative=("temperature", "kl_prompts"), positive=(
        "num_prompts", "sample_batch_size", "max_prompt_len", "max_response_len"))
    runs = find_runs(args.runs)
    for run in runs:  # the pi_ref each run's KL is measured against, as it is now: in each of its rows
        run.args["pi_ref"] = stage.fingerprint(args.sft_path or run.args["sft_path"])
    inputs = [args.gold_path, args.data, args.sft_path] + [run.dir for run in runs]
    for path in (args.out_dir, args.plots_dir):  # checked before any work, written to after it
        stage.check_output(path, "evaluate", inputs, OWN_FILES)
    if args.judge not in ("true", "rm") or args.ties not in ("half", "loss"):
        fail(f"--judge is true or rm, --ties half or loss: got {args.judge!r}, {args.ties!r}")
    toy = os.path.isdir(args.data) and (stage.read_marker(args.data) or {}).get("stage") == "toy_tldr"
    if args.judge == "true" and not toy:
        fail(f"--judge true needs the toy world's hidden scorer; {args.data} is no toy_tldr dir: --judge rm")
    if args.judge == "rm" and not os.path.isdir(args.gold_path):
        fail(f"--gold_path {args.gold_path} not found (run reward.py --mode train first)")
    rows = lm.load_rows(args.data, "eval.jsonl", ["prompt", "reference"])[:args.num_prompts]
    stage.seed_everything(args.seed)
    device, autocast = stage.device_and_autocast("auto", args.threads)
    judge_path = args.gold_path if args.judge == "rm" else runs[0].checkpoints[0][1]
    tokenizer = lm.load_tokenizer(judge_path)
    for run in runs:  # every policy must speak the judge's (and the first run's) vocabulary
        if lm.load_tokenizer(run.checkpoints[0][1]).get_vocab() != tokenizer.get_vocab():
            fail(f"the tokenizer of {run.checkpoints[0][1]} differs from the judge's ({judge_path})")
    setup = SimpleNamespace(runs=runs, inputs=inputs, rows=rows, tokenizer=tokenizer, toy=toy, gold=None,
                            prompts=lm.encode_prompts(tokenizer, rows, args.max_prompt_len), device=device,
                            autocast=autocast)
    if args.judge == "rm":
        setup.gold = reward.load_reward_model(args.gold_path, tokenizer).to(device).eval()
        setup.ref_gold = gold_scores(setup, args, rows, "reference")
    if toy:
        import toy_tldr
        setup.ref_true = [toy_tldr.true_score(r["prompt"], r["reference"]) for r in rows]
    return setup


def checkpoints_to_do(args, setup, results_path, settings, shard, num_shards):
    """[(run args, step, ckpt dir)]: this process's share of the checkpoints without a row. --shard i/n: every
    n-th of all checkpoints from the i-th, less those done (a share the runs alone fix, however the commands
    overlap). Under torchrun the processes read the file together and share the checkpoints not done."""
    stage.barrier()  # every process has checked the outputs before the main one marks them
    if stage.WORLD.main:
        stage.prepare_dir(args.out_dir, "evaluate", setup.inputs, OWN_FILES)
    stage.barrier()
    with locked(results_path):
        done = {(r["run"], r["step"]) for r in current_results(results_path, setup.runs, settings)}
    stage.barrier()  # every process has read the file before one appends to it
    every = [(run.args, step, path) for run in setup.runs for step, path in run.checkpoints]
    if stage.WORLD.size > 1:
        todo = stage.shard([c for c in every if (c[0]["run_name"], c[1]) not in done])
        part = f" (process {stage.WORLD.rank} of {stage.WORLD.size})"
    else:
        todo = [c for c in every[shard::num_shards] if (c[0]["run_name"], c[1]) not in done]
        part = f" (shard {shard}/{num_shards})" if num_shards > 1 else ""
    print(f"evaluate: {len(todo)} checkpoints to do ({len(done)} already in {results_path}), "
          f"{len(setup.rows)} prompts each" + part)
    return todo


def evaluate_all(args, setup, todo, results_path, settings):
    """Evaluate every checkpoint of todo, appending its row to results.jsonl (a stop loses nothing done)."""
    refs, starts = {}, {}
    for a, step, path in tqdm(todo, desc="checkpoints"):
        sft_path = args.sft_path or a["sft_path"]
        if sft_path not in refs:
            refs[sft_path] = lm.load_model(sft_path).to(setup.device).eval()
        start = (a["sft_path"], sft_path) if step == 0 else None
        metrics = starts.get(start) if start else None  # step 0 is the start (dpo.py saves it before the
        if metrics is None:  # first update), and the evaluation is seeded: one row for every run from it
            model = lm.load_model(path).to(setup.device).eval()
            metrics = starts[start] = evaluate_checkpoint(model, refs[sft_path], setup, args)
        row = {"run": a["run_name"], "run_id": a.get("run_id"), "pi_ref": a["pi_ref"], "method": a["method"],
               "beta": a["beta"], "seed": a["seed"], "step": step, "fraction": step / a["total_steps"],
               "epoch": step / a["total_steps"] * a["num_epochs"], **metrics, "num_prompts": len(setup.rows),
               "settings": settings}
        with locked(results_path):  # done meanwhile by an evaluation beside this one? then not twice
            if any((r["run"], r.get("run_id"), r["step"]) == (row["run"], row["run_id"], step)
                   for r in current_results(results_path, setup.runs, settings)):
                print(f"evaluate: {row['run']} step {step} was written meanwhile by another evaluation")
            else:
                stage.append_jsonl(results_path, row)


@stage.cleans_up
def main(args):
    results_path = os.path.join(args.out_dir, "results.jsonl")
    match = re.fullmatch(r"(\d+)/(\d+)", args.shard)
    shard, num_shards = map(int, match.groups()) if match else (1, 0)
    if not shard < num_shards:
        fail(f"--shard must be i/n with 0 <= i < n, got {args.shard!r}")
    world = stage.init_distributed()  # under torchrun the processes share the checkpoints
    if world.size > 1 and num_shards > 1:
        fail("--shard splits the checkpoints between separate commands, torchrun between its processes: "
             "use one or the other")
    if not (args.check or args.plots_only):
        setup = prepare(args)
        settings = eval_settings(args, setup.rows)
        todo = checkpoints_to_do(args, setup, results_path, settings, shard, num_shards)
        evaluate_all(args, setup, todo, results_path, settings)
        if num_shards > 1:
            return print(f"evaluate: shard {shard}/{num_shards} done; --plots_only when every shard is")
        stage.barrier()  # under torchrun: every process's rows are in results.jsonl
    if world.main:
        import claims
        rows = read_results(results_path)
        if not rows:
            fail(f"no results in {results_path} (run evaluate.py first)")
        for path in [] if args.check else [args.out_dir, args.plots_dir]:
            stage.check_output(path, "evaluate", own_files=OWN_FILES)
            stage.prepare_dir(path, "evaluate", own_files=OWN_FILES)
        (claims.check if args.check else claims.report)(rows, args.out_dir, args.plots_dir)


if __name__ == "__main__":
    main(stage.parse_args(Args, __doc__))
