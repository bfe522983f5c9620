"""
evaluate.py -- win-rate and KL of every checkpoint, the trade-off plots, and the lesson's claims.

For each checkpoint of each run (the paper's App. D; METHOD.md, section 7):
  * win_rate: sample a summary at temperature 0.01 for N eval prompts; the share of prompts where the
    judge scores it higher than the human reference, a tie counting half. The judge is the toy's
    hidden true scorer (--judge true, the default) or a gold reward model (--judge rm, as on real data);
  * true_win_rate, true_score (toy world only): the true scorer's verdict, also beside a gold RM's
    (gold_win_rate) -- when the two part ways, the policy is exploiting the gold model;
  * kl: sample y ~ pi_theta at temperature 1 and sum over its tokens the full next-token KL
    sum_v pi_theta(v|x,y<t) (log pi_theta - log pi_ref)(v|x,y<t); average over prompts;
  * mean_length: response tokens, EOS included.
One row per checkpoint goes to out/eval/results.jsonl (a re-run skips rows already there), then
out/plots/tradeoff.png (win-rate vs KL) and dynamics.png (win-rate and KL vs fraction of training)
and out/eval/summary.md (peak and final win-rate, final KL, mean +- std over seeds).

Run (after dpo.py / is_dpo.py):
    python evaluate.py                                    # every run in out/runs/
    python evaluate.py --runs "out/runs/ais-dpo_*" --num_prompts 512
    python evaluate.py --plots_only                       # redraw from results.jsonl
    python evaluate.py --check                            # the claims over the seeds, with 95% CIs
    python evaluate.py --shard 0/2 --threads 1 & python evaluate.py --shard 1/2 --threads 1; wait; python
    evaluate.py --plots_only
    torchrun --standalone --nproc_per_node 2 evaluate.py   # the same in one command: one process a GPU
"""
import contextlib
import fcntl
import glob
import hashlib
import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

import distributed
import policy
import reward
import stage
import toy_tldr
from stage import fail

# ----------------------------------------------------------------------------------------------
# config


@dataclass
class Args:
    runs: str = field(default="out/runs/*", metadata={
        "help": "glob of run directories (dpo.py / is_dpo.py outputs)"})
    data: str = field(default="out/toy_tldr", metadata={
        "help": "toy_tldr dir (eval.jsonl), a local .json/.jsonl/.parquet file, or a hub id"})
    split: str = field(default="test", metadata={"help": "split to read when --data is a hub id"})
    prompt_column: str = field(default="prompt", metadata={"help": "column holding the prompt"})
    reference_column: str = field(default="reference", metadata={
        "help": "column holding the human reference summary"})
    judge: str = field(default="true", metadata={
        "help": "who judges the win-rate: true (the toy's hidden scorer) or rm (the gold RM at --gold_path)"})
    gold_path: str = field(default="out/gold_rm", metadata={
        "help": "--judge rm: the gold reward model (reward.py --mode train)"})
    sft_path: str = field(default="", metadata={
        "help": "pi_ref for the KL; default: the sft_path each run was trained from"})
    num_prompts: int = field(default=256, metadata={"help": "eval prompts per checkpoint (the paper: 512)"})
    kl_prompts: int = field(default=128, metadata={
        "help": "the first N eval prompts also give the KL (0 = all): a mean over fewer prompts, for a "
                "faster evaluation"})
    temperature: float = field(default=0.01, metadata={
        "help": "sampling temperature for the win-rate (the paper: 0.01)"})
    max_prompt_len: int = field(default=64, metadata={"help": "prompt tokens kept"})
    max_response_len: int = field(default=24, metadata={"help": "response tokens sampled, EOS included"})
    truncate_prompts: bool = field(default=False, metadata={
        "help": "cut over-long prompts from the left instead of refusing"})
    sample_batch_size: int = field(default=64, metadata={
        "help": "prompts per sampling / scoring batch (64 is the fastest on a small CPU)"})
    seed: int = field(default=0, metadata={
        "help": "sampling seed (the same for every checkpoint: common random numbers)"})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch (0 = torch's default)"})
    out_dir: str = field(default="out/eval", metadata={"help": "results.jsonl and summary.md go here"})
    shard: str = field(default="0/1", metadata={
        "help": "i/n: only every n-th checkpoint, from the i-th, and no plots; run.sh runs n shards side "
                "by side (one thread each), then --plots_only. (Under torchrun the processes share the "
                "checkpoints themselves, and the main one draws the plots.)"})
    plots_dir: str = field(default="out/plots", metadata={"help": "tradeoff.png and dynamics.png go here"})
    plots_only: bool = field(default=False, metadata={
        "help": "skip evaluation; redraw plots and summary from results.jsonl"})
    check: bool = field(default=False, metadata={
        "help": "skip evaluation; print the lesson's claims over the seeds in results.jsonl, each with "
                "its 95%% CI (also to check.md); exit 1 if one fails"})


# ----------------------------------------------------------------------------------------------
# the metrics


def win_rate(policy_scores, reference_scores):
    """Share of prompts where the policy's summary scores higher than the reference; a tie counts half.

    The toy's true scorer gives discrete scores, so ties are common (the same facts covered): a tie
    is neither a win nor a loss. A reward model's continuous scores almost never tie.
    """
    ours, reference = np.asarray(policy_scores), np.asarray(reference_scores)
    return float(np.mean((ours > reference) + 0.5 * (ours == reference)))


@torch.no_grad()
def sequence_kl(model, ref, examples, pad_id, batch_size=64):
    """Per sequence, sum over response tokens of KL(pi_theta(.|x,y<t) || pi_ref(.|x,y<t)) over the full
    vocabulary.

    examples: (prompt_ids, response_ids) with responses sampled from the policy. Returns [N].
    Its mean over y ~ pi_theta is the sequence-level KL(pi_theta || pi_ref) (chain rule), with
    far less variance than the mean of log pi_theta(y) - log pi_ref(y).
    """
    device = next(model.parameters()).device
    out = []
    for s in range(0, len(examples), batch_size):
        batch = policy.to_device(policy.collate_grouped(examples[s:s + batch_size], pad_id), device)
        mask = batch["response_mask"].bool()
        # logits at response positions only: h[:, t] predicts response token t
        h_p = policy.response_hidden(model.base_model, batch)[:, :-1][mask]
        h_q = policy.response_hidden(ref.base_model, batch)[:, :-1][mask]
        logits_p, logits_q = model.get_output_embeddings()(h_p), ref.get_output_embeddings()(h_q)
        # BEGIN SOLUTION
        acc = torch.promote_types(logits_p.dtype, torch.float32)  # bf16 logits are compared in float32
        logp, logq = logits_p.to(acc).log_softmax(-1), logits_q.to(acc).log_softmax(-1)
        kl_token = (logp.exp() * (logp - logq)).sum(-1)
        # END SOLUTION
        rows = mask.nonzero()[:, 0]
        out.append(torch.zeros(len(mask), dtype=kl_token.dtype, device=device).index_add(0, rows, kl_token))
    return torch.cat(out).cpu()


def evaluate_checkpoint(model, ref, setup, args):
    """One results row's metrics for one policy (model); ref is pi_ref for the KL (METHOD.md, section 7)."""
    tokenizer = setup.tokenizer
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    # common random numbers for every ckpt
    generator = torch.Generator(device=setup.device).manual_seed(args.seed)
    prompts, banned = setup.prompts, policy.banned_ids(tokenizer, model)
    # --- the algorithm: samples at --temperature for the win-rate, at 1 for the KL ---
    with setup.autocast:
        outs, _ = policy.sample(model, prompts, eos, pad, args.max_response_len, args.temperature,
                                args.sample_batch_size, generator, suppress_ids=banned)
        texts = [policy.decode_response(tokenizer, o) for o in outs]
        kl_prompts = prompts[:args.kl_prompts or len(prompts)]  # the KL needs fewer prompts than a win-rate
        kl_outs, _ = policy.sample(model, kl_prompts, eos, pad, args.max_response_len, 1.0,
                                   args.sample_batch_size,
                                   generator, suppress_ids=banned)
        kl = sequence_kl(model, ref, list(zip(kl_prompts, kl_outs)), pad, args.sample_batch_size)
    metrics = {"kl": kl.mean().item(), "mean_length": float(np.mean([len(o) for o in outs])),
               "finished": float(np.mean([f for _, f in texts])), "example": texts[0][0]}
    metrics.update(judge_samples(setup, args, texts))
    metrics["win_rate"] = metrics["true_win_rate" if args.judge == "true" else "gold_win_rate"]
    return metrics


def judge_samples(setup, args, texts):
    """The true scorer's and (with a gold RM) the gold model's verdicts on the samples [(text, finished)]."""
    metrics, rows = {}, setup.eval_rows
    if setup.toy:  # the hidden scorer: an unfinished summary is scored as such
        true = [toy_tldr.true_score(r["prompt"], t, f) for r, (t, f) in zip(rows, texts)]
        metrics.update(true_win_rate=win_rate(true, setup.ref_scores["true"]),
                       true_score=float(np.mean(true)))
    if setup.gold is not None:
        with setup.autocast:
            scores = reward.score_texts(setup.gold, setup.tokenizer, [r["prompt"] for r in rows],
                                        [t for t, _ in texts], args, setup.device, setup.autocast,
                                        finished=[f for _, f in texts])  # unfinished: no EOS added
        metrics.update(gold_win_rate=win_rate(scores, setup.ref_scores["gold"]),
                       gold_score=float(np.mean(scores)))
    return metrics


# ----------------------------------------------------------------------------------------------
# runs, checkpoints, results rows


class Run(NamedTuple):
    """A dpo.py / is_dpo.py run directory, its args.json, and its checkpoints [(step, ckpt_dir)] by step."""
    dir: str
    args: dict
    checkpoints: list


class Checkpoint(NamedTuple):
    """One checkpoint to evaluate: its run's args.json, its step and its directory."""
    run_args: dict
    step: int
    path: str


def find_checkpoints(pattern):
    """[Run] for every run directory matching the glob."""
    # (unfinished runs are hidden directories, which * does not match; .tmp: what older versions left)
    runs = sorted(d for d in glob.glob(pattern) if os.path.isdir(d) and not d.endswith(".tmp"))
    if not runs:
        fail(f"--runs {pattern!r} matches no run directory (train with dpo.py / is_dpo.py first)")
    found = []
    for run in runs:
        path = os.path.join(run, "args.json")
        if not os.path.isfile(path):
            fail(f"{run} has no args.json: not a dpo.py / is_dpo.py run")
        ckpts = run_checkpoints(run)
        found.append(Run(run, read_run_args(path), ckpts))
    return found


def run_checkpoints(run):
    """[(step, ckpt_dir)] of a run, sorted by step; a run without one, or a checkpoint without a model, is
    refused."""
    ckpts = []
    for d in glob.glob(os.path.join(run, "ckpt-*")):
        m = re.fullmatch(r"ckpt-(\d+)", os.path.basename(d))
        if m:
            if not os.path.isfile(os.path.join(d, "config.json")):
                fail(f"checkpoint {d} holds no model (no config.json)")
            ckpts.append((int(m.group(1)), d))
    if not ckpts:
        fail(f"{run} has no ckpt-<step> directories")
    return sorted(ckpts)


def read_run_args(path):
    """A run's args.json, with every key evaluate.py reads."""
    try:
        with open(path) as f:
            run_args = json.load(f)
    except ValueError as e:
        fail(f"{path} is not valid JSON ({e}): a damaged run; train it again")
    needed = ["run_name", "method", "beta", "seed", "total_steps", "num_epochs", "sft_path"]
    lacks = [k for k in needed if k not in run_args] if isinstance(run_args, dict) else needed
    if lacks:
        fail(f"{path} lacks {lacks}: not the args.json of a dpo.py / is_dpo.py run")
    return run_args


@contextlib.contextmanager
def locked(path):
    """Hold an exclusive lock on <path>.lock: shards running side by side share one results file."""
    with open(path + ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def read_results(path, repair=False):
    """The rows of results.jsonl. A last line cut short (a stop or a full disk while it was written)
    is dropped and reported, and with repair (under the lock, before appending) cut from the file;
    any other line that is not a JSON object is refused with its number."""
    if not os.path.isfile(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    lines, rows = data.split(b"\n"), []  # the last item is what follows the last newline: b"" in a whole file
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        elif n == len(lines):  # the last line, and no newline after it: its write was cut short
            print(f"note: {path}: dropped a torn last line ({len(line)} bytes; an interrupted write)")
            if repair:
                with open(path, "r+b") as f:
                    f.truncate(len(data) - len(line))
                return rows
        else:
            fail(f"{path} line {n} is not a JSON object: fix or remove that line")
    if repair and lines[-1].strip():  # a whole last row without its newline: the next row must not join it
        with open(path, "ab") as f:
            f.write(b"\n")
    return rows


def eval_settings(args, eval_rows):
    """Everything a row's numbers depend on but the checkpoint: a row is reused only under equal settings,
    and one results file holds rows of one setting. (Thread count and batch size move only the last bits.)"""
    data = json.dumps([[r["prompt"], r["reference"]] for r in eval_rows])
    data = hashlib.sha256(data.encode()).hexdigest()[:16]
    if args.judge == "rm":
        gold = stage.read_marker(args.gold_path) or {}
        judge = f"{os.path.realpath(args.gold_path)} (run {gold.get('run')})"
    else:
        judge = "the true scorer"
    return {"num_prompts": len(eval_rows), "kl_prompts": args.kl_prompts, "temperature": args.temperature,
            "max_prompt_len": args.max_prompt_len, "max_response_len": args.max_response_len,
            "truncate_prompts": args.truncate_prompts, "seed": args.seed, "judge": judge, "data": data,
            "kl_ref": os.path.realpath(args.sft_path) if args.sft_path else "each run's sft_path"}


def current_results(path, runs, settings):
    """The rows of results.jsonl that describe the runs as they are now, read under its lock: a torn last
    line is cut off, rows of runs trained again since are dropped from the file, and rows of other settings
    are refused (one file holds one setting: a re-run with others must not silently keep or mix old rows)."""
    rows = read_results(path, repair=True)
    current = {run.args["run_name"]: run.args.get("run_id") for run in runs}
    fresh = [r for r in rows if r["run"] not in current or r.get("run_id") == current[r["run"]]]
    if len(fresh) < len(rows):  # a run was trained again: its old rows no longer describe it
        print(f"evaluate: dropping {len(rows) - len(fresh)} rows of retrained runs")
        toy_tldr.write_jsonl(path + ".tmp", fresh)
        os.replace(path + ".tmp", path)
    other = [r for r in fresh if r.get("settings") != settings]
    if other:
        theirs = other[0].get("settings") or {}
        changed = [k for k in settings if theirs.get(k) != settings[k]]
        fail(f"{path} holds {len(other)} rows evaluated with other settings ({', '.join(changed)}): "
             f"evaluate into another --out_dir, or move that file aside")
    return fresh


# ----------------------------------------------------------------------------------------------
# summary table and plots


def group_runs(rows):
    """{(method, beta): {seed: [rows sorted by step]}}"""
    groups = defaultdict(lambda: defaultdict(list))
    for r in rows:
        groups[(r["method"], r["beta"])][r["seed"]].append(r)
    for g in groups.values():
        for seed in g:
            g[seed].sort(key=lambda r: r["step"])
    return groups


def summary_table(rows):
    """Markdown: per method and beta, mean +- std over seeds of peak / final win-rates, final KL and, on the
    toy, the true score of pi_ref's samples (step 0) and of the final ones."""
    def ms(values):
        return f"{np.mean(values):.2f} ± {np.std(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"

    # a gold RM judged: show the truth's win-rate beside it
    has_gold = any("gold_win_rate" in r for r in rows)
    has_score = all("true_score" in r for r in rows)
    head = ("| method | beta | seeds | peak win-rate | final win-rate | peak - final | final KL |"
            + (" final true win-rate |" if has_gold else "")
            + (" true score: start, final |" if has_score else ""))
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for (method, beta), seeds in sorted(group_runs(rows).items(), key=lambda kv: (kv[0][1], kv[0][0])):
        runs = list(seeds.values())
        peak = [max(r["win_rate"] for r in run) for run in runs]
        final = [run[-1]["win_rate"] for run in runs]
        line = (f"| {method} | {beta:g} | {len(runs)} | {ms(peak)} | {ms(final)} | "
                f"{ms([p - f for p, f in zip(peak, final)])} | {ms([run[-1]['kl'] for run in runs])} |")
        if has_gold:
            line += f" {ms([run[-1].get('true_win_rate', float('nan')) for run in runs])} |"
        if has_score:
            start = np.mean([run[0]['true_score'] for run in runs])
            line += f" {start:.2f}, {ms([run[-1]['true_score'] for run in runs])} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


# Student t quantiles t_{0.975, df} for df = 1..30 (beyond, the normal 1.96 is within 4%)
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045,
        2.042]


class CI(NamedTuple):
    """A mean and its 95% confidence interval."""
    mean: float
    low: float
    high: float


class Claim(NamedTuple):
    """One line of the claims table: holds is None for a comparison reported beside the claims."""
    text: str
    replicates: int
    ci: CI
    holds: object
    values: list  # by seed


def mean_ci(values):
    """Mean and 95% confidence interval (Student t) of independent replicates: CI(mean, low, high)."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return CI(float(x.mean()), float("nan"), float("nan"))
    half = (T975[len(x) - 2] if len(x) <= 31 else 1.96) * x.std(ddof=1) / np.sqrt(len(x))
    return CI(float(x.mean()), float(x.mean() - half), float(x.mean() + half))


def make_claim(text, values, test=None):
    """A Claim over the replicates `values`; test(ci) says whether it holds (None: reported, not claimed)."""
    ci = mean_ci(values)
    return Claim(text, len(values), ci, None if test is None else test(ci), values)


def hump(run):
    """A run's peak win-rate minus its final one."""
    return max(r["win_rate"] for r in run) - run[-1]["win_rate"]


def claims(rows, beta_low=0.01, beta_high=0.1):
    """The lesson's claims, each over replicates (seeds), paired by seed where two methods are compared.

    Returns [Claim]: a claim whose runs are missing is left out; other methods at the low beta (is-dpo,
    the ais-sn-dpo control) are compared with DPO too, holds None. KL is the final checkpoint's.
    """
    groups = group_runs(rows)
    dpo_low, ais_low = groups.get(("dpo", beta_low), {}), groups.get(("ais-dpo", beta_low), {})
    dpo_high = groups.get(("dpo", beta_high), {})
    paired = sorted(set(dpo_low) & set(ais_low))
    out = []
    if dpo_low:
        out.append(make_claim(f"DPO at beta {beta_low:g} over-optimises: peak - final win-rate >= 0.10, "
                              f"CI above 0.05", [hump(dpo_low[s]) for s in sorted(dpo_low)],
                              lambda ci: ci.mean >= 0.10 and ci.low > 0.05))
    if paired:
        out.append(make_claim(f"AIS-DPO ends above DPO at beta {beta_low:g}: final win-rate difference >= "
                              "0.10, "
                              f"CI above 0",
                              [ais_low[s][-1]["win_rate"] - dpo_low[s][-1]["win_rate"] for s in paired],
                              lambda ci: ci.mean >= 0.10 and ci.low > 0))
        out.append(make_claim(f"AIS-DPO drifts less at beta {beta_low:g}: final KL / DPO's final KL <= 0.5",
                              [ais_low[s][-1]["kl"] / dpo_low[s][-1]["kl"] for s in paired],
                              lambda ci: ci.mean <= 0.5))
    for method in sorted(m for m, b in groups if b == beta_low and m not in ("dpo", "ais-dpo")):
        other = groups[(method, beta_low)]  # e.g. is-dpo, or the ais-sn-dpo control: reported, not claimed
        common = sorted(set(dpo_low) & set(other))
        if common:
            out.append(make_claim(f"(beside the claims) {method} final win-rate - DPO's at beta {beta_low:g}",
                                  [other[s][-1]["win_rate"] - dpo_low[s][-1]["win_rate"] for s in common]))
            out.append(make_claim(f"(beside the claims) {method} final KL / DPO's at beta {beta_low:g}",
                                  [other[s][-1]["kl"] / dpo_low[s][-1]["kl"] for s in common]))
    if dpo_high:
        out.append(make_claim(f"stronger regularisation holds DPO: at beta {beta_high:g} "
                              f"peak - final <= 0.05",
                              [hump(dpo_high[s]) for s in sorted(dpo_high)], lambda ci: ci.mean <= 0.05))
    return out


def check_table(rows):
    """Markdown table of claims(rows), and whether all of them hold."""
    lines = ["| claim | replicates | mean [95% CI] | by seed | holds |", "|---|---|---|---|---|"]
    for c in claims(rows):
        verdict = "-" if c.holds is None else "yes" if c.holds else "NO"
        by_seed = " ".join(f"{v:+.2f}" for v in c.values)
        lines.append(f"| {c.text} | {c.replicates} | {c.ci.mean:+.3f} [{c.ci.low:+.3f}, {c.ci.high:+.3f}] "
                     f"| {by_seed} | {verdict} |")
    return "\n".join(lines) + "\n", all(c.holds for c in claims(rows) if c.holds is not None)


def mean_curve(seeds, key):
    """Seed-averaged curve of `key` over the fraction of training (runs share their checkpoint grid)."""
    runs = list(seeds.values())
    n = min(len(run) for run in runs)
    x = np.array([r["fraction"] for r in runs[0][:n]])
    y = np.array([[r[key] for r in run[:n]] for run in runs])
    return x, y.mean(0), y.std(0)


def save_figure(fig, path):
    tmp = f"{path}.{os.getpid()}.tmp.png"  # its own name: --plots_only side by side must not share one
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)


def plot(rows, plots_dir):
    """tradeoff.png (win-rate against KL) and dynamics.png (win-rate and KL against training) in plots_dir."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stage.prepare_dir(plots_dir, "evaluate", own_files=OWN_FILES)
    groups = group_runs(rows)
    colors = {m: plt.cm.tab10(i) for i, m in enumerate(sorted({m for m, _ in groups}))}
    # a gold RM judged and the truth is known (the toy): show the truth beside it
    has_true = all("gold_win_rate" in r and "true_win_rate" in r for r in rows)
    for draw, name in ((plot_tradeoff, "tradeoff.png"), (plot_dynamics, "dynamics.png")):
        fig = draw(plt, groups, colors, has_true)
        save_figure(fig, os.path.join(plots_dir, name))
        plt.close(fig)


def plot_tradeoff(plt, groups, colors, has_true):
    """Win-rate against KL: one panel per beta, one seed-averaged curve per method."""
    betas = sorted({beta for _, beta in groups})
    fig, axes = plt.subplots(1, len(betas), figsize=(5 * len(betas), 4), squeeze=False)
    for ax, beta in zip(axes[0], betas):
        for method in colors:
            if (method, beta) not in groups:
                continue
            seeds = groups[(method, beta)]
            _, kl, _ = mean_curve(seeds, "kl")
            _, wr, _ = mean_curve(seeds, "win_rate")
            ax.plot(kl, wr, "o-", color=colors[method], label=f"{method} (judge)", ms=4)
            if has_true:
                _, tw, _ = mean_curve(seeds, "true_win_rate")
                ax.plot(kl, tw, "x--", color=colors[method], alpha=0.6, label=f"{method} (true)", ms=4)
        ax.set(title=f"beta = {beta:g}", xlabel="KL(pi_theta || pi_ref)", ylabel="win-rate vs reference")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Win-rate against KL budget (mean over seeds"
                 + ("; solid: the gold RM's win-rate, dashed: the true scorer's)" if has_true else ")"))
    return fig


def plot_dynamics(plt, groups, colors, has_true):
    """Win-rate (the judge's, the truth's) and KL against the fraction of training, mean ± std over seeds."""
    betas = sorted({beta for _, beta in groups})
    keys = ["win_rate"] + (["true_win_rate"] if has_true else []) + ["kl"]
    labels = {"win_rate": "win-rate (judge)", "true_win_rate": "true win-rate", "kl": "KL"}
    fig, axes = plt.subplots(len(keys), len(betas), figsize=(5 * len(betas), 3 * len(keys)), squeeze=False,
                             sharex=True)
    for j, beta in enumerate(betas):
        for i, key in enumerate(keys):
            ax = axes[i][j]
            for method in colors:
                if (method, beta) not in groups:
                    continue
                x, mean, std = mean_curve(groups[(method, beta)], key)
                ax.plot(x, mean, "o-", color=colors[method], label=method, ms=3)
                ax.fill_between(x, mean - std, mean + std, color=colors[method], alpha=0.15)
            ax.set(ylabel=labels[key])
            ax.grid(alpha=0.3)
            if i == 0:
                ax.set_title(f"beta = {beta:g}")
                ax.legend(fontsize=7)
            if i == len(keys) - 1:
                ax.set_xlabel("fraction of training")
    fig.suptitle("Training dynamics (mean ± std over seeds)")
    return fig


# what evaluate.py writes in --out_dir and --plots_dir, which it adds to and never replaces: a directory
# holding other files and no marker of evaluate.py is refused (these alone: an older version's output)
OWN_FILES = {"results.jsonl", "results.jsonl.lock", "summary.md", "tradeoff.png", "dynamics.png"}


# ----------------------------------------------------------------------------------------------


def check(results_path, out_dir):
    """--check: the claims table of results.jsonl, printed and written to check.md; exit 1 if a claim
    fails."""
    rows = read_results(results_path)
    if not rows:
        fail(f"no results in {results_path} (run evaluate.py first)")
    table, holds = check_table(rows)
    if not claims(rows):
        fail(f"{results_path} has no runs of the claims (dpo and ais-dpo at beta 0.01, dpo at beta 0.1)")
    with open(os.path.join(out_dir, "check.md.tmp"), "w") as f:
        f.write(table)
    os.replace(os.path.join(out_dir, "check.md.tmp"), os.path.join(out_dir, "check.md"))
    print(table)
    print("every claim holds" if holds else "some claims do not hold (NO above)")
    if not holds:
        raise SystemExit(1)


@dataclass
class Setup:
    """What the evaluation of every checkpoint shares."""
    runs: list  # [Run]
    inputs: list  # the paths the outputs must not overlap
    eval_rows: list  # {"prompt", "reference"} of the eval prompts
    prompts: list  # their token ids
    tokenizer: object
    toy: bool  # the toy world: its true scorer can judge
    gold: object = None  # the gold reward model (--judge rm), else None
    # the references' scores: "true" (toy), "gold" (--judge rm)
    ref_scores: dict = field(default_factory=dict)
    device: object = None
    autocast: object = None


def parse_shard(shard):
    """--shard i/n -> (i, n)."""
    match = re.fullmatch(r"(\d+)/(\d+)", shard)
    if not match or not int(match.group(1)) < int(match.group(2)):
        fail(f"--shard must be i/n with 0 <= i < n, got {shard!r}")
    return int(match.group(1)), int(match.group(2))


def check_inputs(args):
    """Flags, runs and outputs checked before any work: (runs, inputs, toy)."""
    stage.check_args(args,
                     positive=("num_prompts", "sample_batch_size", "max_prompt_len", "max_response_len"),
                     non_negative=("temperature", "kl_prompts"))
    runs = find_checkpoints(args.runs)
    inputs = [args.gold_path, args.data, args.sft_path] + [run.dir for run in runs]
    for path in (args.out_dir, args.plots_dir):  # checked before any work, written to after it
        stage.check_output(path, "evaluate", inputs, OWN_FILES)
    if args.judge not in ("true", "rm"):
        fail(f"--judge must be true or rm, got {args.judge!r}")
    toy = policy.is_toy(args.data)
    if args.judge == "true" and not toy:
        fail(f"--judge true needs the toy world's hidden scorer; {args.data} is not a toy_tldr dir "
             f"(use --judge rm)")
    if args.judge == "rm" and not os.path.isdir(args.gold_path):
        fail(f"--gold_path {args.gold_path} not found (run reward.py --mode train first)")
    return runs, inputs, toy


def prepare(args):
    """The Setup: eval prompts, the tokenizer every policy must share, the judge and its reference scores."""
    runs, inputs, toy = check_inputs(args)
    columns = {"prompt": args.prompt_column, "reference": args.reference_column}
    eval_rows = policy.load_rows(args.data, "eval.jsonl", args.split, columns)[:args.num_prompts]
    policy.seed_everything(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, autocast = policy.device_and_autocast()
    judge_path = args.gold_path if args.judge == "rm" else runs[0].checkpoints[0][1]
    tokenizer = policy.load_tokenizer(judge_path)
    prompts = policy.encode_prompts(tokenizer, [r["prompt"] for r in eval_rows], args.max_prompt_len,
                                    args.truncate_prompts)
    references = [policy.encode(tokenizer, r["prompt"], r["reference"], args.max_prompt_len,
                                args.max_response_len, args.truncate_prompts)[1] for r in eval_rows]
    policy.report_shaping("evaluate", tokenizer, prompts, references)
    setup = Setup(runs, inputs, eval_rows, prompts, tokenizer, toy, device=device, autocast=autocast)
    score_references(args, setup)
    for run in runs:  # every policy must speak the judge's (and the first run's) vocabulary
        first = run.checkpoints[0][1]
        if policy.load_tokenizer(first).get_vocab() != tokenizer.get_vocab():
            fail(f"the tokenizer of {first} differs from the judge's ({judge_path})")
    return setup


def score_references(args, setup):
    """The references' scores, once: by the gold RM (--judge rm) and, on the toy, by the true scorer."""
    rows = setup.eval_rows
    if args.judge == "rm":
        setup.gold = reward.load_reward_model(args.gold_path, setup.tokenizer).to(setup.device).eval()
        with setup.autocast:
            setup.ref_scores["gold"] = reward.score_texts(
                setup.gold, setup.tokenizer, [r["prompt"] for r in rows], [r["reference"] for r in rows],
                args,
                setup.device, setup.autocast)
    if setup.toy:
        setup.ref_scores["true"] = [toy_tldr.true_score(r["prompt"], r["reference"]) for r in rows]


def checkpoints_to_do(args, setup, results_path, settings, shard, num_shards):
    """[Checkpoint]: this process's share of the checkpoints that results.jsonl has no row of yet.

    --shard i/n (separate commands, each reading the file whenever it starts): every n-th of all the
    checkpoints from the i-th, less those done -- a share the runs alone fix, however the commands overlap.
    Under torchrun the processes read the file together (between barriers) and take every n-th of the
    checkpoints not yet done (distributed.shard): even shares, also when an interrupted evaluation resumes."""
    distributed.barrier()  # every process has checked the outputs (in prepare) before the main one marks them
    if distributed.WORLD.main:
        stage.prepare_dir(args.out_dir, "evaluate", setup.inputs, OWN_FILES)
    distributed.barrier()
    with locked(results_path):
        fresh = current_results(results_path, setup.runs, settings)
    distributed.barrier()  # every process has read the file before one appends to it
    done = {(r["run"], r["step"]) for r in fresh}
    every = [Checkpoint(run.args, step, path) for run in setup.runs for step, path in run.checkpoints]
    if distributed.WORLD.size > 1:
        todo = distributed.shard([c for c in every if (c.run_args["run_name"], c.step) not in done])
        part = f" (process {distributed.WORLD.rank} of {distributed.WORLD.size})"
    else:
        todo = [c for c in every[shard::num_shards] if (c.run_args["run_name"], c.step) not in done]
        part = f" (shard {shard}/{num_shards})" if num_shards > 1 else ""
    print(f"evaluate: {len(todo)} checkpoints to do ({len(done)} already in {results_path}), "
          f"{len(setup.eval_rows)} prompts each" + part)
    return todo


def results_row(ckpt, metrics, num_prompts, settings):
    a = ckpt.run_args
    return {"run": a["run_name"], "run_id": a.get("run_id"), "method": a["method"], "beta": a["beta"],
            "seed": a["seed"], "step": ckpt.step, "fraction": ckpt.step / a["total_steps"],
            "epoch": ckpt.step / a["total_steps"] * a["num_epochs"], **metrics, "num_prompts": num_prompts,
            "settings": settings}


def evaluate_all(args, setup, todo, results_path, settings):
    """Evaluate every checkpoint of todo and append its row to results.jsonl (a stop loses nothing done)."""
    refs, starts = {}, {}
    for ckpt in tqdm(todo, desc="checkpoints"):
        sft_path = args.sft_path or ckpt.run_args["sft_path"]
        if sft_path not in refs:
            refs[sft_path] = policy.load_policy(sft_path).to(setup.device).eval()
        start = (ckpt.run_args["sft_path"], sft_path) if ckpt.step == 0 else None
        if start in starts:  # step 0 is the starting policy itself (dpo.py saves it before the first
            metrics = starts[start]  # update) and the evaluation is seeded: the same row for every run
        else:
            model = policy.load_policy(ckpt.path).to(setup.device).eval()
            metrics = evaluate_checkpoint(model, refs[sft_path], setup, args)
            if start:
                starts[start] = metrics
        row = results_row(ckpt, metrics, len(setup.eval_rows), settings)
        with locked(results_path):  # done meanwhile by an evaluation beside this one? then not twice
            if any((r["run"], r.get("run_id"), r["step"]) == (row["run"], row["run_id"], ckpt.step)
                   for r in current_results(results_path, setup.runs, settings)):
                print(f"evaluate: {row['run']} step {ckpt.step} was written meanwhile by another evaluation")
            else:
                policy.append_jsonl(results_path, row)  # a line per checkpoint: a stop loses nothing done


def write_summary(args, results_path):
    """Plots and summary.md from every row of results.jsonl."""
    rows = read_results(results_path)
    if not rows:
        fail(f"no results in {results_path}")
    for path in (args.out_dir, args.plots_dir):
        stage.check_output(path, "evaluate", own_files=OWN_FILES)
    stage.prepare_dir(args.out_dir, "evaluate", own_files=OWN_FILES)
    plot(rows, args.plots_dir)
    table = summary_table(rows)
    summary = os.path.join(args.out_dir, "summary.md")
    with open(f"{summary}.{os.getpid()}.tmp", "w") as f:
        f.write(table)
    os.replace(f"{summary}.{os.getpid()}.tmp", summary)
    print(table)
    print(f"evaluate: {len(rows)} rows in {results_path}; plots in {args.plots_dir}/tradeoff.png and "
          "dynamics.png")


@stage.cleans_up
def main(args):
    results_path = os.path.join(args.out_dir, "results.jsonl")
    shard, num_shards = parse_shard(args.shard)
    world = distributed.init_distributed()  # under torchrun the processes share the checkpoints
    if world.size > 1 and num_shards > 1:
        fail("--shard splits the checkpoints between separate commands, torchrun between its processes: "
             "use one or the other")
    if args.check:
        return check(results_path, args.out_dir) if world.main else None
    if not args.plots_only:
        setup = prepare(args)
        settings = eval_settings(args, setup.eval_rows)
        todo = checkpoints_to_do(args, setup, results_path, settings, shard, num_shards)
        evaluate_all(args, setup, todo, results_path, settings)
        if num_shards > 1:
            print(f"evaluate: shard {shard}/{num_shards} done; draw the plots with --plots_only when every "
                  "shard is")
            return
        distributed.barrier()  # under torchrun: every process's rows are in results.jsonl
    if world.main:
        write_summary(args, results_path)


if __name__ == "__main__":
    main(stage.parse_args(Args, __doc__))
