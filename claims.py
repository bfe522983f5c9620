"""
claims.py -- the statistics over seeds behind evaluate.py's summary.md and check.md, and its plots.

Rows are results rows (evaluate.py's results.jsonl, or toy_categorical.py's): one per checkpoint, with
run, method, beta, seed, step, fraction, win_rate, kl (and, where known, true_win_rate, true_score).
  * group_runs: {(method, beta): {seed: [rows by step]}}; mean_curve: a seed-averaged curve;
  * summary_table: per method and beta, peak and final win-rate and final KL, mean +- std over seeds;
  * mean_ci, claims, check_table: the lesson's claims, each over the seeds with a 95% confidence interval
    (Student t), paired by seed where two methods are compared;
  * plot: tradeoff.png (win-rate against KL) and dynamics.png (win-rate and KL over training);
  * report, check: what evaluate.py writes for its summary and for --check.
"""
import os
from collections import defaultdict
from typing import NamedTuple

import numpy as np

from stage import fail


def group_runs(rows):
    """{(method, beta): {seed: [rows sorted by step]}}"""
    groups = defaultdict(lambda: defaultdict(list))
    for r in rows:
        groups[(r["method"], r["beta"])][r["seed"]].append(r)
    for g in groups.values():
        for seed in g:
            g[seed].sort(key=lambda r: r["step"])
    return groups


LAST = 3  # a run's win-rate at a point of training: the mean of LAST checkpoints in a row (one is noisy)


def window(run, key="win_rate"):
    """The means of `key` over every LAST checkpoints in a row of a run (fewer if the run has fewer)."""
    x, k = np.array([r.get(key, np.nan) for r in run], dtype=float), min(LAST, len(run))  # nan: not measured
    return np.convolve(x, np.ones(k) / k, mode="valid")


def peak(run):
    """A run's best win-rate: its best mean of LAST checkpoints in a row."""
    return float(window(run).max())


def final(run, key="win_rate"):
    """A run's final value of `key`: the mean over its last LAST checkpoints."""
    return float(window(run, key)[-1])


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
        peaks, finals = [peak(run) for run in runs], [final(run) for run in runs]
        line = (f"| {method} | {beta:g} | {len(runs)} | {ms(peaks)} | {ms(finals)} | "
                f"{ms([p - f for p, f in zip(peaks, finals)])} | {ms([final(run, 'kl') for run in runs])} |")
        if has_gold:
            line += f" {ms([final(run, 'true_win_rate') for run in runs])} |"
        if has_score:
            start = np.mean([run[0]['true_score'] for run in runs])
            line += f" {start:.2f}, {ms([final(run, 'true_score') for run in runs])} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


# Student t quantiles t_{0.975, df} for df = 1..30 (beyond, the normal 1.96 is within 4%)
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042]


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
    """A run's peak win-rate minus its final one (each a mean of LAST checkpoints in a row)."""
    return peak(run) - final(run)


def claims(rows, beta_low=0.01, beta_high=0.1, weights=False):
    """The lesson's claims, each over replicates (seeds), paired by seed where two methods are compared.
    weights: AIS-DPO's two claims are made (the categorical toy), else AIS-DPO is compared with DPO like
    the other methods (the language toy, where the replicates do not support a claim on every world).

    Returns [Claim]: a claim whose runs are missing is left out; other methods at the low beta (is-dpo,
    the ais-sn-dpo control) are compared with DPO too, holds None. Peak and final are means of LAST
    checkpoints in a row.
    """
    groups = group_runs(rows)
    dpo_low, ais_low = groups.get(("dpo", beta_low), {}), groups.get(("ais-dpo", beta_low), {})
    dpo_high = groups.get(("dpo", beta_high), {})
    paired = sorted(set(dpo_low) & set(ais_low)) if weights else []
    out = []
    if dpo_low:
        out.append(make_claim(f"DPO at beta {beta_low:g} over-optimises: peak - final win-rate >= 0.10, "
                              f"CI above 0.05", [hump(dpo_low[s]) for s in sorted(dpo_low)],
                              lambda ci: ci.mean >= 0.10 and ci.low > 0.05))
    if paired:
        out.append(make_claim(f"AIS-DPO ends above DPO at beta {beta_low:g}: final win-rate difference >= "
                              f"0.10, CI above 0",
                              [final(ais_low[s]) - final(dpo_low[s]) for s in paired],
                              lambda ci: ci.mean >= 0.10 and ci.low > 0))
        out.append(make_claim(f"AIS-DPO drifts less at beta {beta_low:g}: final KL / DPO's final KL <= 0.5",
                              [final(ais_low[s], "kl") / final(dpo_low[s], "kl") for s in paired],
                              lambda ci: ci.mean <= 0.5))
    claimed = ("dpo", "ais-dpo") if weights else ("dpo",)
    for method in sorted(m for m, b in groups if b == beta_low and m not in claimed):
        other = groups[(method, beta_low)]  # e.g. is-dpo, or the ais-sn-dpo control: reported, not claimed
        common = sorted(set(dpo_low) & set(other))
        if common:
            out.append(make_claim(f"(beside the claims) {method} final win-rate - DPO's at beta {beta_low:g}",
                                  [final(other[s]) - final(dpo_low[s]) for s in common]))
            out.append(make_claim(f"(beside the claims) {method} final KL / DPO's at beta {beta_low:g}",
                                  [final(other[s], "kl") / final(dpo_low[s], "kl") for s in common]))
    if dpo_high:
        out.append(make_claim(f"stronger regularisation holds DPO: at beta {beta_high:g} peak - final "
                              f"<= 0.05",
                              [hump(dpo_high[s]) for s in sorted(dpo_high)], lambda ci: ci.mean <= 0.05))
    return out


def check_table(rows, weights=False):
    """Markdown table of claims(rows, weights=weights), and whether all of them hold."""
    lines = ["| claim | replicates | mean [95% CI] | by seed | holds |", "|---|---|---|---|---|"]
    for c in claims(rows, weights=weights):
        verdict = "-" if c.holds is None else "yes" if c.holds else "NO"
        by_seed = " ".join(f"{v:+.2f}" for v in c.values)
        lines.append(f"| {c.text} | {c.replicates} | {c.ci.mean:+.3f} [{c.ci.low:+.3f}, {c.ci.high:+.3f}] "
                     f"| {by_seed} | {verdict} |")
    holds = all(c.holds for c in claims(rows, weights=weights) if c.holds is not None)
    return "\n".join(lines) + "\n", holds



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


def write_text(path, text):
    """path, written whole: through a temporary file of this process's own, then renamed."""
    with open(f"{path}.{os.getpid()}.tmp", "w") as f:
        f.write(text)
    os.replace(f"{path}.{os.getpid()}.tmp", path)


TIES = {"half": "a tie with the reference counts half", "loss": "a tie counts as a loss (the paper's >)"}


def report(rows, out_dir, plots_dir):
    """evaluate.py's summary: tradeoff.png and dynamics.png in plots_dir, summary.md in out_dir."""
    plot(rows, plots_dir)
    ties = sorted({(r.get("settings") or {}).get("ties", "half") for r in rows})  # evaluate.py --ties
    table = summary_table(rows) + "\nwin-rate: " + "; ".join(TIES[t] for t in ties) + "\n"
    write_text(os.path.join(out_dir, "summary.md"), table)
    print(table)
    print(f"evaluate: {len(rows)} rows in {out_dir}/results.jsonl; plots in {plots_dir}/tradeoff.png and "
          "dynamics.png")


def check(rows, out_dir, plots_dir=None):
    """evaluate.py --check: the claims table, printed and written to check.md; exit 1 if a claim fails."""
    if not claims(rows):
        fail(f"{out_dir}/results.jsonl has no runs of the claims (dpo at beta 0.01 or 0.1)")
    table, holds = check_table(rows)
    write_text(os.path.join(out_dir, "check.md"), table)
    print(table)
    print("every claim holds" if holds else "some claims do not hold (NO above)")
    if not holds:
        raise SystemExit(1)
