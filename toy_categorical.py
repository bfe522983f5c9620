"""
toy_categorical.py -- over-optimisation without sampling noise: DPO and the importance weights on a policy
over a finite set of responses, where every probability, KL and win-rate is an exact sum.

The formulas are in METHOD.md, section 10. The language toy (run.sh stages 1-7) is the honest, noisy
version of the experiment: its effects are a few points of win-rate and vary with the seed and the
world. Here the same mechanism is laid bare.

The world. A response is a summary y = (length l, quality q): l = 1..max_len words, q one of
num_qualities levels in [-3, 3]. pi_ref writes short summaries of middling quality, long ones rarely:

    log pi_ref(y) = -(l - ref_len)^2 / (2 ref_sd^2) - q^2 / 2 + ref_noise * e_y  (+ a constant)
    true reward    r(y) = quality_weight * q - length_weight * (l - best_len)^2 + reward_noise * e'_y

Quality always helps; length helps up to best_len words and hurts after. e, e' ~ N(0, 1) per response
are the world's idiosyncrasies (--world_seed draws them). The offline data are num_pairs pairs, both
responses drawn from pi_ref, labelled by Bradley-Terry on r: P(y1 preferred) = sigmoid(r(y1) - r(y2)).

The policy has two knobs shared by every response, as a language model's weights are shared:

    log pi_theta(y) = log pi_ref(y) + theta . phi(y) - log Z(theta),   phi(y) = (l, q)

so r_theta(y) = log pi_theta(y) - log pi_ref(y) moves for responses the data never shows, too.

Why DPO over-optimises here. Delta = r_theta(y_w) - r_theta(y_l) = theta . (phi(y_w) - phi(y_l)): log Z
cancels, and DPO's loss -log sigmoid(beta Delta) is a logistic regression of the preferences on the
feature differences with coefficients beta theta. Its minimiser is theta* = u / beta, u the fitted slope.
Among pi_ref's short summaries longer is better, so u's length slope is positive (about
2 length_weight (best_len - ref_len)), and DPO tilts pi_ref toward longer summaries 1/beta times as far:
at beta 0.1 to about best_len (the world's length_weight is set so: beta 0.1 is the right strength here);
at beta 0.01 ten times as far, to the longest summaries, which no pair contains. On the way the
win-rate rises, then falls while the KL keeps growing.

What the weights do. w = exp(log w) of is_dpo.py, with r_theta and alpha = 1/l (AIS) or the clip
log w <= 2 (IS-DPO). Pairs of responses the policy has moved away from lose weight, pairs where the
policy now is gain it: the preferences count where the policy writes, and there longer stops being
better. The weights of the paper are not normalised: as the policy leaves the data their mean falls,
which also slows the drift; ais-sn-dpo divides w by its mean (a control) to show what is left
without that.

Exact: the win-rate sum_{y,y'} pi_theta(y) pi_ref(y') (1[r(y) > r(y')] + 1[r(y) = r(y')] / 2), the KL
sum_y pi_theta(y) (log pi_theta(y) - log pi_ref(y)), the mass on responses no pair contains. Training is
full-batch Adam on the empirical loss (no minibatch noise). Only the data are random: each seed draws
new pairs and labels. The claims are those of evaluate.py --check (claims.py), over the seeds.

Other methods (--runs): any weight of is_dpo.py on DPO, IPO or RPO, named as is_dpo.py names its runs
(a0.2-dpo, sqrtis-dpo, ais-ipo, rpo, ...); --data_theta draws the pairs from a shifted policy.
experiments/ablations.py runs the paper's other experiments on this toy.

Run:  python toy_categorical.py                # 5 seeds x 5 runs, 15-30 s on a laptop CPU
      python toy_categorical.py --world_seed 3 --seeds 5 6 7 8 9
See:  out/toy_categorical/check.md       the claims with their 95% confidence intervals
      out/toy_categorical/summary.md     peak and final win-rates, KL and true reward per method and beta
      out/toy_categorical/dynamics.png   win-rate and KL over training; where each policy's mass ends up
      out/toy_categorical/results.jsonl  one row per checkpoint
Exit status 1 when a claim does not hold (after writing everything).
"""
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

import claims
import dpo
import is_dpo
import stage

# A method is named as is_dpo.py names its runs: [weight prefix-][sn-]loss, e.g. dpo, ais-dpo, is-dpo,
# ais-sn-dpo, a0.1-dpo (fixed alpha 0.1), sqrtis-dpo, ais-ipo, rpo.
PREFIXES = {"ais": "adaptive", "is": "clipped", "fullis": "full", "sqrtis": "sqrt",  # -> is_dpo.py's --weight
            "shufais": "shuffled"}  # a control, this toy's only: AIS with another pair's lengths
LOSSES = ("dpo", "ipo", "rpo")
METHOD_HELP = ("dpo, ipo or rpo, optionally after a weight: ais- (alpha = 1/|y|), is- (clipped), fullis-, "
               "sqrtis-, a<alpha>- (fixed alpha), shufais- (alpha = 1/|y| of another pair's responses), "
               "and -sn- for the self-normalised control: ais-sn-dpo")


def parse_method(name):
    """(loss, is_dpo.py's weight mode, alpha, self_normalise) of a method name, or None if it is not one."""
    parts = name.split("-")
    loss, sn = parts.pop(), len(parts) == 2 and parts[1] == "sn"
    if loss not in LOSSES or len(parts) > 1 + sn:
        return None
    if not parts:
        return loss, "none", 0.0, False
    prefix = parts[0]
    if prefix in PREFIXES:
        return loss, PREFIXES[prefix], 0.0, sn
    try:
        alpha = float(prefix[1:]) if prefix.startswith("a") else float("nan")
    except ValueError:
        return None
    return (loss, "fixed", alpha, sn) if 0 <= alpha <= 1 else None


@dataclass
class Args:
    out_dir: str = field(default="out/toy_categorical", metadata={"help": "where the results and figure go"})
    runs: str = field(default="dpo:0.01 ais-dpo:0.01 is-dpo:0.01 ais-sn-dpo:0.01 dpo:0.1",
                      metadata={"help": "method:beta pairs, each trained once per seed. Methods: "
                                        + METHOD_HELP})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4],
                             metadata={"help": "replicates: each seed draws new pairs and labels"})
    world_seed: int = field(default=0, metadata={"help": "draws the world's per-response noise e, e'"})
    num_pairs: int = field(default=3000, metadata={"help": "offline pairs drawn from pi_ref (identical pairs "
                                                                  "dropped)"})
    steps: int = field(default=200, metadata={"help": "full-batch Adam steps"})
    lr: float = field(default=0.05, metadata={"help": "Adam learning rate on theta"})
    num_checkpoints: int = field(default=21, metadata={"help": "evaluations, evenly spaced from the first "
                                                                     "step to the last"})
    log_w_max: float = field(default=2.0, metadata={"help": "is-dpo: upper clip of log w"})
    rpo_eta: float = field(default=0.01, metadata={"help": "rpo: weight of the NLL term (times beta, as "
                                                             "dpo.py)"})
    data_theta: list[float] = field(default_factory=lambda: [0.0, 0.0],
                                    metadata={"help": "the pairs come from pi_ref tilted by this "
                                                      "(length, quality) theta: 0 0 is pi_ref itself "
                                                      "(distribution shift)"})
    weigh_against: str = field(default="ref", metadata={"help": "ref: w = pi_theta / pi_ref, as the papers; "
                                                                 "behaviour: pi_theta / the policy the pairs "
                                                                 "came from"})
    max_len: int = field(default=40, metadata={"help": "the longest response, in words"})
    num_qualities: int = field(default=21, metadata={"help": "quality levels, evenly spaced in [-3, 3]"})
    ref_len: float = field(default=8.0, metadata={"help": "pi_ref's typical length"})
    ref_sd: float = field(default=2.5, metadata={"help": "spread of pi_ref's lengths"})
    best_len: float = field(default=12.0, metadata={"help": "the length the true reward likes best"})
    length_weight: float = field(default=0.008, metadata={"help": "r's penalty per squared word away from "
                                                                      "best_len"})
    quality_weight: float = field(default=0.5, metadata={"help": "r's reward per quality point"})
    ref_noise: float = field(default=0.5, metadata={"help": "sd of the per-response noise in log pi_ref"})
    reward_noise: float = field(default=0.3, metadata={"help": "sd of the per-response noise in r"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads (0 = torch's default)"})


# ----------------------------------------------------------------------------------------------
# 1. the world and its data


def make_world(args):
    """Every response's features phi [K, 2] = (length, quality), log pi_ref [K] and true reward r [K]."""
    rng = np.random.default_rng([args.world_seed])
    length = np.repeat(np.arange(1, args.max_len + 1), args.num_qualities).astype(float)
    quality = np.tile(np.linspace(-3, 3, args.num_qualities), args.max_len)
    log_ref = (-(length - args.ref_len) ** 2 / (2 * args.ref_sd ** 2) - quality ** 2 / 2
               + args.ref_noise * rng.standard_normal(len(length)))
    log_ref -= np.logaddexp.reduce(log_ref)
    reward = (args.quality_weight * quality - args.length_weight * (length - args.best_len) ** 2
              + args.reward_noise * rng.standard_normal(len(length)))
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    world = {"phi": t(np.stack([length, quality], 1)), "log_ref": t(log_ref), "reward": t(reward)}
    world["beats"] = beats_matrix(world["reward"])  # built once: every win-rate of every run uses it
    return world


def sample_pairs(world, num_pairs, world_seed, seed, data_theta=(0.0, 0.0)):
    """(chosen, rejected) response indices [N]: two draws from the behaviour policy (pi_ref tilted by
    data_theta; pi_ref itself by default), a Bradley-Terry label on r."""
    rng = np.random.default_rng([world_seed, seed])
    p_data = policy_logps(torch.tensor(data_theta, dtype=torch.float64), world).exp().numpy()
    y1 = rng.choice(len(p_data), size=num_pairs, p=p_data / p_data.sum())
    y2 = rng.choice(len(p_data), size=num_pairs, p=p_data / p_data.sum())
    y1, y2 = y1[y1 != y2], y2[y1 != y2]
    r = world["reward"].numpy()
    first_wins = rng.random(len(y1)) < 1 / (1 + np.exp(-(r[y1] - r[y2])))
    return torch.tensor(np.where(first_wins, y1, y2)), torch.tensor(np.where(first_wins, y2, y1))


def policy_logps(theta, world):
    """log pi_theta(y) [K] = log pi_ref(y) + theta . phi(y) - log Z(theta)."""
    logits = world["log_ref"] + world["phi"] @ theta
    return logits - torch.logsumexp(logits, 0)


# ----------------------------------------------------------------------------------------------
# 2. exact measurements


def beats_matrix(reward):
    """G [K, K]: 1 where r(y) > r(y'), 1/2 on ties, so that win-rate = pi_theta^T G pi_ref."""
    return (reward[:, None] > reward[None, :]).double() + 0.5 * (reward[:, None] == reward[None, :]).double()


def measure(logp, world, unseen):
    """Exact win-rate against pi_ref, KL(pi_theta || pi_ref), expected r and length, and the mass on
    responses that no pair contains."""
    p = logp.exp()
    return {"win_rate": float(p @ world["beats"] @ world["log_ref"].exp()),
            "kl": float((p * (logp - world["log_ref"])).sum()),
            "true_score": float(p @ world["reward"]),
            "mean_length": float(p @ world["phi"][:, 0]),
            "unseen_mass": float(p[unseen].sum())}


# ----------------------------------------------------------------------------------------------
# 3. training: dpo.py's loss, is_dpo.py's weights, on the whole data at every step


def pair_losses(logp, world, chosen, rejected, loss, beta, args):
    """Per-pair loss [N] of dpo.py's DPO, IPO (the paper's summed form) or RPO, from log pi_theta [K]."""
    log_ref, length = world["log_ref"], world["phi"][:, 0]
    pi_w, pi_l, ref_w, ref_l = logp[chosen], logp[rejected], log_ref[chosen], log_ref[rejected]
    if loss == "ipo":
        return dpo.ipo_loss(pi_w, pi_l, ref_w, ref_l, length[chosen], length[rejected], beta, summed=True)
    if loss == "rpo":
        return dpo.rpo_loss(pi_w, pi_l, ref_w, ref_l, beta, args.rpo_eta)
    return dpo.dpo_loss(pi_w, pi_l, ref_w, ref_l, beta)


def pair_log_weights(logp, base, world, chosen, rejected, weight, alpha, args, perm=None):
    """log w [N] of is_dpo.py (detached, not normalised), against base = log pi_ref or log behaviour.
    weight "shuffled" (a control): AIS's log w, but pair i's exponents 1/|y_w|, 1/|y_l| are those of pair
    perm[i] (shuffle_permutation): the same exponents in the batch, not tied to the pair's own lengths."""
    len_w, len_l = world["phi"][chosen, 0], world["phi"][rejected, 0]
    if weight == "shuffled":
        weight, len_w, len_l = "adaptive", len_w[perm], len_l[perm]
    return is_dpo.log_importance_weights(weight, logp[chosen] - base[chosen], logp[rejected] - base[rejected],
                                         len_w, len_l, alpha, args.log_w_max).detach()


def shuffle_permutation(num_pairs, world_seed, seed):
    """The "shuffled" weight's fixed permutation of the pairs, one per (world, seed)."""
    return torch.tensor(np.random.default_rng([world_seed, seed, 1]).permutation(num_pairs))


def train(world, chosen, rejected, method, beta, args, seed=0):
    """One run: rows {step, fraction, win_rate, kl, ...} at num_checkpoints evenly spaced steps, and the
    final policy's probabilities [K]. seed: the data's seed (draws the shuffled weight's permutation)."""
    loss_type, weight, alpha, self_normalise = parse_method(method)
    perm = shuffle_permutation(len(chosen), args.world_seed, seed) if weight == "shuffled" else None
    theta = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([theta], lr=args.lr)
    base = world["log_ref"]
    if args.weigh_against == "behaviour":
        base = policy_logps(torch.tensor(args.data_theta, dtype=torch.float64), world)
    unseen = torch.ones(len(base), dtype=torch.bool)
    unseen[chosen] = unseen[rejected] = False
    checkpoints = {round(i * args.steps / (args.num_checkpoints - 1)) for i in range(args.num_checkpoints)}
    rows = []
    for step in range(args.steps + 1):
        logp = policy_logps(theta, world)
        if step in checkpoints:
            rows.append({"step": step, "fraction": step / args.steps, "theta_length": theta[0].item(),
                         "theta_quality": theta[1].item(), **measure(logp.detach(), world, unseen)})
        if step == args.steps:
            return rows, logp.detach().exp().numpy()
        # --- the algorithm: the DAA loss per pair, times a detached importance weight ---
        losses = pair_losses(logp, world, chosen, rejected, loss_type, beta, args)
        log_w = pair_log_weights(logp, base, world, chosen, rejected, weight, alpha, args, perm)
        stats = is_dpo.weight_stats(log_w)  # of the paper's weights, before any normalisation
        if self_normalise:  # the control: w divided by its mean over the data
            log_w = log_w - torch.logsumexp(log_w, 0) + math.log(len(log_w))
        weighted = log_w.exp() * losses
        loss = weighted.mean()
        # ---
        if step in checkpoints:  # at this theta: the loss, the weights, the loss's top 10% of pairs
            top = weighted.detach().sort(descending=True).values[:max(1, len(weighted) // 10)]
            rows[-1].update(loss=loss.item(), weight_mean=stats["weight_mean"], ess=stats["ess"] / len(log_w),
                            log_weight_mean=stats["log_weight_mean"],
                            top10_loss_share=(top.sum() / weighted.detach().sum()).item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


# ----------------------------------------------------------------------------------------------
# 4. the figure


def plot(rows, finals, world, runs, best_len, path):
    """Win-rate and KL over training (mean +- std over seeds), and the final policies' length distribution."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = claims.group_runs(rows)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    length = world["phi"][:, 0].numpy()
    lengths = np.arange(1, int(length.max()) + 1)
    by_length = lambda p: np.bincount(length.astype(int) - 1, weights=p, minlength=len(lengths))  # noqa: E731
    axes[2].fill_between(lengths, by_length(world["log_ref"].exp().numpy()), color="grey", alpha=0.3,
                         label="pi_ref (where the pairs come from)")
    for i, (method, beta) in enumerate(runs):
        color = plt.cm.tab10(i)
        label = f"{method}, beta {beta:g}"
        for ax, key in zip(axes[:2], ["win_rate", "kl"]):
            x, mean, std = claims.mean_curve(groups[(method, beta)], key)
            ax.plot(x, mean, "o-", ms=3, color=color, label=label)
            low, high = (0, 1) if key == "win_rate" else (0, None)
            ax.fill_between(x, np.clip(mean - std, low, high), np.clip(mean + std, low, high), color=color,
                            alpha=0.15)
        axes[2].plot(lengths, by_length(np.mean(finals[(method, beta)], 0)), color=color, label=label)
    axes[2].axvline(best_len, color="k", ls=":", label="the length r likes best")
    for ax, title, ylabel in zip(axes, ["exact win-rate against pi_ref", "KL(pi_theta || pi_ref)",
                                        "where the final policy puts its mass"],
                                 ["win-rate", "KL (nats)", "probability of a length"]):
        ax.set(title=title, ylabel=ylabel,
               xlabel="fraction of training" if ax is not axes[2] else "length (words)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=7)
    fig.suptitle("The categorical toy: exact values, mean ± std over seeds (each seed draws new pairs)")
    claims.save_figure(fig, path)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------


def parse_runs(text):
    runs = []
    for item in text.split():
        method, _, beta = item.partition(":")
        if parse_method(method) is None:
            stage.fail(f"--runs: unknown method {method!r} in {item!r} (methods: {METHOD_HELP})")
        try:
            beta = float(beta)
        except ValueError:
            stage.fail(f"--runs: {item!r} is not method:beta")
        if not (math.isfinite(beta) and beta > 0):
            stage.fail(f"--runs: beta must be a finite number > 0 in {item!r}")
        runs.append((method, beta))
    if not runs or len(set(runs)) < len(runs):
        stage.fail(f"--runs must list distinct method:beta pairs, got {text!r}")
    return runs


def check(args):
    stage.check_args(args, positive=("num_pairs", "steps", "lr", "max_len", "ref_sd", "quality_weight"),
                     non_negative=("length_weight", "ref_noise", "reward_noise", "threads"))
    if not args.seeds or len(set(args.seeds)) < len(args.seeds):
        stage.fail(f"--seeds must list distinct seeds, got {args.seeds}")
    for seed in args.seeds + [args.world_seed]:
        if not 0 <= seed < 2 ** 32:
            stage.fail(f"seeds must be in [0, 2^32), got {seed}")
    if len(args.data_theta) != 2:
        stage.fail(f"--data_theta takes two numbers (length, quality), got {args.data_theta}")
    if args.weigh_against not in ("ref", "behaviour"):
        stage.fail(f"--weigh_against must be ref or behaviour, got {args.weigh_against!r}")
    if args.num_qualities < 2:
        stage.fail(f"--num_qualities must be >= 2, got {args.num_qualities}")
    if not 2 <= args.num_checkpoints <= args.steps + 1:
        stage.fail(f"--num_checkpoints must be in [2, steps + 1 = {args.steps + 1}], "
                   f"got {args.num_checkpoints}")
    return parse_runs(args.runs)


def write_outputs(work, rows, finals, world, runs, args):
    """config.json, results.jsonl, summary.md, check.md and dynamics.png into work; the two tables."""
    with open(os.path.join(work, "config.json"), "w") as f:
        json.dump(vars(args), f, indent=2)
    plot(rows, finals, world, runs, args.best_len, os.path.join(work, "dynamics.png"))
    with open(os.path.join(work, "results.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    table, holds = claims.check_table(rows, weights=True)
    summary = claims.summary_table(rows)
    with open(os.path.join(work, "check.md"), "w") as f:
        f.write(table)
    with open(os.path.join(work, "summary.md"), "w") as f:
        f.write(summary)
    return summary, table, holds


def run_all(world, runs, args, desc="toy_categorical runs"):
    """Every (method, beta) of runs on every seed's pairs: all rows, and the final policies by run."""
    rows, finals = [], {run: [] for run in runs}
    with tqdm(total=len(args.seeds) * len(runs), desc=desc) as bar:
        for seed in args.seeds:
            chosen, rejected = sample_pairs(world, args.num_pairs, args.world_seed, seed, args.data_theta)
            for method, beta in runs:
                run_rows, final = train(world, chosen, rejected, method, beta, args, seed)
                finals[(method, beta)].append(final)
                for row in run_rows:
                    row.update(run=f"{method}_beta{beta:g}_seed{seed}", method=method, beta=beta, seed=seed,
                               world_seed=args.world_seed, pairs=len(chosen))
                rows += run_rows
                bar.update()
    return rows, finals


@stage.cleans_up
def main(args):
    stage.one_process_only("toy_categorical.py")
    runs = check(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    world = make_world(args)
    output = stage.start_output(args.out_dir, "toy_categorical")
    rows, finals = run_all(world, runs, args)
    summary, table, holds = write_outputs(output.work, rows, finals, world, runs, args)
    output.publish()
    print(summary)
    print(table)
    print("every claim holds" if holds else "some claims do not hold (NO above)")
    if not holds:
        raise SystemExit(1)


if __name__ == "__main__":
    main(stage.parse_args(Args, __doc__))
