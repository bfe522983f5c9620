"""
experiments/ablations.py -- the rest of the Adaptive-IS paper's experiments, on the categorical toy
(toy_categorical.py: exact win-rates and KLs, seconds per run), one command each:

    python experiments/ablations.py alpha     # App. F (Figs. 8-10): fixed alpha, sqrt and 1/|y| at beta 0.01
    python experiments/ablations.py ipo       # Sec. 4.2 (Fig. 2): IPO and AIS-IPO, win-rate against KL
    python experiments/ablations.py shift     # Sec. 4.3 (Figs. 4-5), App. G: pairs from policies further away
    python experiments/ablations.py rpo       # App. I (Fig. 12): RPO, beta x eta
    python experiments/ablations.py weights   # the weights during training: log w, ESS, top 10% of the loss
    python experiments/ablations.py controls  # is it 1/|y|? AIS against shuffled lengths, alpha 1/8, IS
    python experiments/ablations.py quality   # a world where DPO drifts along quality, not length
    python experiments/ablations.py knobs     # which knobs remove DPO's fall, and what the weights cost then
    python experiments/ablations.py all       # all eight, about three minutes on a laptop CPU

Each writes out/experiments/<name>/: results.jsonl (every checkpoint of every run), summary.md (mean
over seeds) and <name>.png. --seeds and --world_seed work as in toy_categorical.py. The README's
section "More of the paper" shows each figure and reads it.
"""
import argparse
import dataclasses
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import claims  # noqa: E402
import stage  # noqa: E402
import toy_categorical as tc  # noqa: E402

ALPHAS = ["dpo", "a0.05-dpo", "a0.1-dpo", "a0.2-dpo", "a0.4-dpo", "sqrtis-dpo", "ais-dpo"]
IPO_BETAS = [0.01, 0.03, 0.1, 0.3, 1.0]
SHIFTS = [0.0, 0.25, 0.5, 1.0]  # the pairs' policy: pi_ref tilted by SHIFT * SHIFT_THETA
SHIFT_THETA = (0.6, 1.0)  # toward what DPO at beta 0.1 learns: longer (to about 12 words) and better
RPO = [(beta, eta) for beta in (0.01, 0.05, 0.1) for eta in (0.001, 0.005, 0.01)]
# shufais: AIS's exponents 1/|y| taken from another pair (a fixed permutation per seed); a0.125: 1/8, the
# exponent of pi_ref's typical length
CONTROLS = ["dpo", "ais-dpo", "ais-sn-dpo", "shufais-dpo", "shufais-sn-dpo", "a0.125-dpo", "fullis-dpo",
            "is-dpo"]
QUALITY = ["dpo", "ais-dpo", "ais-sn-dpo", "a0.125-dpo"]
QUALITY_BEST, QUALITY_CURVATURE = 1.0, 0.25  # r's quality term: -0.25 (q - 1)^2, slope 0.5 at q = 0
# knobs: one of toy_categorical's world or training settings at a time (the rest at their defaults), on
# values that bracket where DPO's fall at beta 0.01 disappears; "default" changes nothing
KNOBS = [("default", {})] + [(f"{name} {value:g}", {name: value}) for name, value in
                             [("length_weight", 0.006), ("length_weight", 0.004), ("length_weight", 0.002),
                              ("ref_sd", 2.0), ("ref_sd", 1.5), ("best_len", 10.0), ("best_len", 9.0),
                              ("lr", 0.02), ("lr", 0.01), ("lr", 0.005)]]
KNOB_METHODS = ["dpo", "ais-dpo", "is-dpo"]
VIEW_KNOBS = ["default", "length_weight 0.004"]  # the per-seed view: these knobs in five more worlds
VIEW_WORLDS = 5  # the view's other worlds: world_seed + 1 .. world_seed + 5
FELL = 0.10  # DPO fell: peak - final win-rate >= 0.10 (the bound of the toy's over-optimisation claim)


# ----------------------------------------------------------------------------------------------
# each experiment: its runs -> rows (every checkpoint, every seed), with an "arm" naming the setting


def tag(rows, **fields):
    for row in rows:
        row.update(fields)
    return rows


def alpha(args):
    world = tc.make_world(args)
    rows, _ = tc.run_all(world, [(m, 0.01) for m in ALPHAS], args, desc="alpha")
    return [dict(r, arm=r["method"]) for r in rows]


def ipo(args):
    world = tc.make_world(args)
    runs = [(m, b) for b in IPO_BETAS for m in ("ipo", "ais-ipo")]
    rows, _ = tc.run_all(world, runs, args, desc="ipo")
    return [dict(r, arm=f"{r['method']} beta {r['beta']:g}") for r in rows]


def shift(args):
    """Pairs from pi_ref tilted toward longer and better summaries; AIS weighs against pi_ref (as the
    papers) or against the policy that really produced the pairs."""
    rows = []
    world = tc.make_world(args)  # one world; only the policy the pairs come from moves
    for s in SHIFTS:
        shifted = dataclasses.replace(args, data_theta=[s * SHIFT_THETA[0], s * SHIFT_THETA[1]])
        kl = tc.measure(tc.policy_logps(torch.tensor(shifted.data_theta, dtype=torch.float64), world), world,
                        torch.zeros(len(world["reward"]), dtype=torch.bool))
        for against in ("ref", "behaviour"):
            methods = ["dpo", "ais-dpo"] if against == "ref" else ["ais-dpo"]
            run_rows, _ = tc.run_all(world, [(m, 0.01) for m in methods],
                                     dataclasses.replace(shifted, weigh_against=against), desc=f"shift {s:g}")
            for r in run_rows:
                name = r["method"] + (" (w against the data's policy)" if against == "behaviour" else "")
                rows.append(dict(r, arm=f"{name}, shift {s:g}", label=name, shift=s, data_kl=kl["kl"],
                                 data_win_rate=kl["win_rate"]))
    return rows


def rpo(args):
    rows = []
    world = tc.make_world(args)
    for beta, eta in RPO:
        run_rows, _ = tc.run_all(world, [("rpo", beta)], dataclasses.replace(args, rpo_eta=eta),
                                 desc=f"rpo beta {beta:g} eta {eta:g}")
        rows += [dict(r, arm=f"beta {beta:g} eta {eta:g}", eta=eta) for r in run_rows]
    return rows


def weights(args):
    world = tc.make_world(args)
    runs = [(m, 0.01) for m in ("ais-dpo", "is-dpo", "fullis-dpo")]
    rows, _ = tc.run_all(world, runs, args, desc="weights")
    return [dict(r, arm=r["method"]) for r in rows]


def controls(args):
    world = tc.make_world(args)
    rows, _ = tc.run_all(world, [(m, 0.01) for m in CONTROLS], args, desc="controls")
    return [dict(r, arm=r["method"]) for r in rows]


def quality_world(args):
    """The categorical world with its drift moved to the quality axis: r's linear quality term becomes a
    peak at quality QUALITY_BEST (one sd of pi_ref above its mean; the best responses, quality 3, are as
    bad as pi_ref's quality -1), and r likes pi_ref's own length best (best_len = ref_len), so that
    length gives DPO no slope to follow. pi_ref and the noise are make_world's."""
    world = tc.make_world(dataclasses.replace(args, best_len=args.ref_len))
    q = world["phi"][:, 1]
    world["reward"] = (world["reward"] - args.quality_weight * q
                       - QUALITY_CURVATURE * (q - QUALITY_BEST) ** 2)
    world["beats"] = tc.beats_matrix(world["reward"])
    return world


def quality(args):
    rows, _ = tc.run_all(quality_world(args), [(m, 0.01) for m in QUALITY], args, desc="quality")
    return [dict(r, arm=r["method"]) for r in rows]


def dpo_endpoint(world, chosen, rejected, beta):
    """Where DPO's training goes: its loss's minimiser theta* = u / beta, u the fitted preference, i.e. the
    logistic regression (no intercept) of "chosen beats rejected" on phi(y_w) - phi(y_l) (Newton's method;
    finite because the Bradley-Terry labels leave no direction that separates the pairs)."""
    d = world["phi"][chosen] - world["phi"][rejected]
    u = torch.zeros(d.shape[1], dtype=torch.float64)
    for _ in range(100):
        s = torch.sigmoid(d @ u)
        gradient = -((1 - s)[:, None] * d).mean(0)
        hessian = ((s * (1 - s))[:, None, None] * d[:, :, None] * d[:, None, :]).mean(0)
        step = torch.linalg.solve(hessian, gradient)
        u = u - step
        if step.abs().max() < 1e-10:
            return u / beta
    raise RuntimeError("dpo_endpoint: Newton's method did not converge (do the pairs separate?)")


def knobs(args):
    """KNOB_METHODS at beta 0.01 with one knob turned at a time (KNOBS: (label, changes of args)), in args'
    world; the VIEW_KNOBS also in VIEW_WORLDS more worlds. Every row carries DPO's endpoint on its seed's
    pairs (dpo_endpoint: its theta, the exact mean length and win-rate of that policy)."""
    settings, view_knobs, view_worlds, methods = KNOBS, VIEW_KNOBS, VIEW_WORLDS, KNOB_METHODS
    jobs = [(label, changes, args.world_seed) for label, changes in settings]
    jobs += [(label, changes, args.world_seed + i) for label, changes in settings if label in view_knobs
             for i in range(1, view_worlds + 1)]
    rows = []
    for label, changes, world_seed in jobs:
        knob_args = dataclasses.replace(args, world_seed=world_seed, **changes)
        world = tc.make_world(knob_args)
        run_rows, _ = tc.run_all(world, [(m, 0.01) for m in methods], knob_args,
                                 desc=f"knobs: {label}, world {world_seed}")
        ends = {}
        for seed in knob_args.seeds:
            chosen, rejected = tc.sample_pairs(world, knob_args.num_pairs, world_seed, seed)
            theta = dpo_endpoint(world, chosen, rejected, 0.01)
            none_unseen = torch.zeros(len(world["reward"]), dtype=torch.bool)
            end = tc.measure(tc.policy_logps(theta, world), world, none_unseen)
            ends[seed] = {"endpoint_theta_length": theta[0].item(),
                          "endpoint_mean_length": end["mean_length"], "endpoint_win_rate": end["win_rate"]}
        rows += [dict(r, arm=f"{label}, world {world_seed}: {r['method']}", knob=label,
                      best_len=knob_args.best_len, **ends[r["seed"]]) for r in run_rows]
    return rows


# ----------------------------------------------------------------------------------------------
# tables and figures


def by_arm(rows):
    """{arm: {seed: [rows by step]}}"""
    out = {}
    for r in rows:
        out.setdefault(r["arm"], {}).setdefault(r["seed"], []).append(r)
    return out


def summary(rows, extra=("ess",)):
    """Markdown: per arm, over the seeds, the mean peak win-rate, the final win-rate and KL as mean [95% CI]
    (claims.mean_ci), and the mean of the extra columns (at the last checkpoint that has them: the loss
    and the weights are measured before a step)."""
    head = ("| run | seeds | peak win-rate | final win-rate [95% CI] | final KL [95% CI] | "
            + " | ".join(f"final {e}" for e in extra))
    lines = [head + " |", "|" + "---|" * (head.count("|"))]
    for arm, seeds in by_arm(rows).items():
        runs = list(seeds.values())
        peak = np.mean([max(r["win_rate"] for r in run) for run in runs])
        final = {k: [[r[k] for r in run if k in r][-1] for run in runs] for k in ("win_rate", "kl", *extra)}
        wr, kl = claims.mean_ci(final["win_rate"]), claims.mean_ci(final["kl"])
        lines.append(f"| {arm} | {len(runs)} | {peak:.2f} | {wr[0]:.2f} [{wr[1]:.2f}, {wr[2]:.2f}] | "
                     f"{kl[0]:.1f} [{kl[1]:.1f}, {kl[2]:.1f}] | "
                     + " | ".join(f"{np.mean(final[e]):.3g}" for e in extra) + " |")
    return "\n".join(lines) + "\n"


def paired(rows, reference):
    """Markdown: each other arm's final win-rate minus the reference arm's, paired by seed (the same pairs),
    mean [95% CI] over the seeds, and the differences seed by seed."""
    finals = {arm: {seed: run[-1]["win_rate"] for seed, run in seeds.items()}
              for arm, seeds in by_arm(rows).items()}
    lines = [f"| run | final win-rate minus {reference}'s, paired by seed [95% CI] | per seed |",
             "|---|---|---|"]
    for arm, final in finals.items():
        if arm != reference:
            diffs = [final[seed] - finals[reference][seed] for seed in final]
            ci = claims.mean_ci(diffs)
            lines.append(f"| {arm} | {ci[0]:+.3f} [{ci[1]:+.3f}, {ci[2]:+.3f}] | "
                         + " ".join(f"{d:+.2f}" for d in diffs) + " |")
    return "\n".join(lines) + "\n"


def knob_runs(rows):
    """{(knob, world, method): {seed: {peak, final, fall, final_length, endpoint_*}}}, in the rows' order."""
    out = {}
    for seeds in by_arm(rows).values():
        first = next(iter(seeds.values()))[0]
        out[(first["knob"], first["world_seed"], first["method"])] = {
            seed: {"peak": max(r["win_rate"] for r in run), "final": run[-1]["win_rate"],
                   "fall": max(r["win_rate"] for r in run) - run[-1]["win_rate"],
                   "final_length": run[-1]["mean_length"], "best_len": run[0]["best_len"],
                   **{k: v for k, v in run[0].items() if k.startswith("endpoint_")}}
            for seed, run in seeds.items()}
    return out


def ci_text(values, digits=2):
    ci = claims.mean_ci(values)
    return f"{ci[0]:+.{digits}f} [{ci[1]:+.{digits}f}, {ci[2]:+.{digits}f}]"


def by_seed(values):
    return " ".join(f"{v:+.2f}" for v in values)


def knob_tables(rows):
    """Markdown, four tables. Per knob, in the first world: (1) DPO's peak, final and fall (peak - final,
    mean [95% CI] and by seed; "fell": seeds with fall >= FELL) beside DPO's endpoint (dpo_endpoint: the
    mean length and win-rate of the policy it converges to) and DPO's final mean length; (2) each weighted
    method's final win-rate minus DPO's, paired by seed ("cost": seeds where it is below DPO's). The view
    over worlds: (3) per knob and world, the same by seed; (4) per knob over all its runs, the weights'
    gain where DPO fell and where it did not, and how often DPO's endpoint was far past its peak (the
    endpoint's win-rate below DPO's peak by >= FELL) in each."""
    runs = knob_runs(rows)
    home = rows[0]["world_seed"]
    weighted = [m for m in dict.fromkeys(m for _, _, m in runs) if m != "dpo"]
    labels = list(dict.fromkeys(k for k, w, _ in runs if w == home))
    worlds = {k: list(dict.fromkeys([home] + [w for kk, w, _ in runs if kk == k])) for k in labels}
    view = [k for k in labels if len(worlds[k]) > 1]

    def diffs(knob, world, method):
        dpo, other = runs[(knob, world, "dpo")], runs[(knob, world, method)]
        return [other[s]["final"] - dpo[s]["final"] for s in dpo]

    def fell(dpo):
        return f"{sum(r['fall'] >= FELL for r in dpo)}/{len(dpo)}"

    def endpoint_win_rates(dpo):
        return " ".join(f"{r['endpoint_win_rate']:.2f}" for r in dpo)

    lines = ["| knobs | DPO peak | DPO final | DPO fall [95% CI] | fell | fall by seed | r's best length | "
             "endpoint length | endpoint win-rate by seed | DPO's final length |", "|" + "---|" * 10]
    for knob in labels:
        dpo = list(runs[(knob, home, "dpo")].values())
        peak, final, end, length = (np.mean([r[k] for r in dpo])
                                    for k in ("peak", "final", "endpoint_mean_length", "final_length"))
        falls = [r["fall"] for r in dpo]
        lines.append(f"| {knob} | {peak:.2f} | {final:.2f} | {ci_text(falls)} | {fell(dpo)} | "
                     f"{by_seed(falls)} | {dpo[0]['best_len']:g} | {end:.1f} | {endpoint_win_rates(dpo)} | "
                     f"{length:.1f} |")
    lines += ["", "| knobs | " + " | ".join(f"{m} - dpo, final [95% CI] | by seed | cost" for m in weighted)
              + " |", "|" + "---|" * (1 + 3 * len(weighted))]
    for knob in labels:
        cells = []
        for m in weighted:
            d = diffs(knob, home, m)
            cells.append(f"{ci_text(d, 3)} | {by_seed(d)} | {sum(x < 0 for x in d)}/{len(d)}")
        lines.append(f"| {knob} | " + " | ".join(cells) + " |")
    if not view:
        return "\n".join(lines) + "\n"
    lines += ["", "| knobs | world | DPO fall by seed | fell | endpoint win-rate by seed | "
              + " | ".join(f"{m} - dpo by seed" for m in weighted) + " |", "|" + "---|" * (5 + len(weighted))]
    for knob in view:
        for world in worlds[knob]:
            dpo = list(runs[(knob, world, "dpo")].values())
            lines.append(f"| {knob} | {world} | {by_seed([r['fall'] for r in dpo])} | {fell(dpo)} | "
                         f"{endpoint_win_rates(dpo)} | "
                         + " | ".join(by_seed(diffs(knob, world, m)) for m in weighted) + " |")
    lines += ["", "| knobs | runs | DPO fell | endpoint far past: where DPO fell, where not | "
              + " | ".join(f"{m} - dpo where DPO fell [95% CI] | where it did not [95% CI] | "
                           "cost where it did not" for m in weighted) + " |",
              "|" + "---|" * (4 + 3 * len(weighted))]
    for knob in view:
        dpo = [r for world in worlds[knob] for r in runs[(knob, world, "dpo")].values()]
        falls = [r["fall"] >= FELL for r in dpo]
        far = [r["peak"] - r["endpoint_win_rate"] >= FELL for r in dpo]
        n_fell = sum(falls)
        cells = [f"{sum(f and p for f, p in zip(falls, far))}/{n_fell}, "
                 f"{sum(p and not f for f, p in zip(falls, far))}/{len(dpo) - n_fell}"]
        for m in weighted:
            d = [x for world in worlds[knob] for x in diffs(knob, world, m)]
            yes, no = [x for x, f in zip(d, falls) if f], [x for x, f in zip(d, falls) if not f]
            cells.append(f"{ci_text(yes, 3) if yes else '-'} | {ci_text(no, 3) if no else '-'} | "
                         f"{sum(x < 0 for x in no)}/{len(no)}")
        lines.append(f"| {knob} | {len(dpo)} | {n_fell} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def curves(ax, rows, key, ylabel):
    for arm, seeds in by_arm(rows).items():
        x, mean, _ = claims.mean_curve(seeds, key)
        ax.plot(x, mean, "o-", ms=2, label=arm)
    ax.set(xlabel="fraction of training", ylabel=ylabel)
    ax.grid(alpha=0.3)


def figure(name, rows, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if name in ("alpha", "weights"):
        keys = [("win_rate", "win-rate"), ("kl", "KL"), ("ess", "ESS / N"),
                ("loss" if name == "alpha" else "top10_loss_share",
                 "training loss" if name == "alpha" else "loss share of the top 10% of pairs")]
        fig, axes = plt.subplots(1, 4 + (name == "weights"), figsize=(5 * (4 + (name == "weights")), 4))
        for ax, (key, label) in zip(axes, keys):
            curves(ax, [r for r in rows if key in r], key, label)
        if name == "weights":
            log_w_histograms(axes[4], rows, args)
        axes[0].legend(fontsize=7)
    elif name == "ipo":
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for arm, seeds in by_arm(rows).items():
            _, kl, _ = claims.mean_curve(seeds, "kl")
            _, wr, _ = claims.mean_curve(seeds, "win_rate")
            ax.plot(kl, wr, "-" if arm.startswith("ipo") else "--", label=arm)
        ax.set(xlabel="KL(pi_theta || pi_ref)", ylabel="win-rate", xscale="symlog")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    elif name == "shift":
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for label in dict.fromkeys(r["label"] for r in rows):
            points = []
            for s in SHIFTS:
                runs = list(by_arm([r for r in rows if r["label"] == label and r["shift"] == s]).values())[0]
                points.append((runs[next(iter(runs))][0]["data_kl"],
                               np.mean([max(r["win_rate"] for r in run) for run in runs.values()]),
                               np.mean([run[-1]["win_rate"] for run in runs.values()])))
            kl, peak, final = zip(*points)
            axes[0].plot(kl, peak, "o-", label=label)
            axes[1].plot(kl, final, "o-", label=label)
        for ax, title in zip(axes, ["peak win-rate", "final win-rate"]):
            ax.set(xlabel="KL(data's policy || pi_ref)", ylabel=title, title=title)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
    elif name == "knobs":
        fig = knob_figure(plt, rows)
    else:  # rpo, controls, quality
        keys = [("win_rate", "win-rate"), ("kl", "KL")]
        if name != "rpo":
            keys.append(("theta_quality" if name == "quality" else "theta_length",
                         "theta (quality)" if name == "quality" else "theta (length)"))
        fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4.2))
        for ax, (key, label) in zip(axes, keys):
            curves(ax, rows, key, label)
        axes[0].legend(fontsize=6, ncol=3 if name == "rpo" else 1)
    fig.suptitle(f"{name} (categorical toy, mean over seeds {' '.join(map(str, args.seeds))})")
    return fig


def knob_figure(plt, rows):
    """DPO's win-rate per knob (first world, mean over seeds); per run, DPO's fall against its endpoint's
    win-rate; per run, the weighted methods' final win-rate minus DPO's against DPO's fall."""
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    for ax in axes[:2]:
        ax.set_prop_cycle(color=plt.cm.tab20.colors)  # a colour for each of the eleven knobs
    home = rows[0]["world_seed"]
    curves(axes[0], [r for r in rows if r["method"] == "dpo" and r["world_seed"] == home], "win_rate",
           "DPO's win-rate (first world)")
    axes[0].legend(fontsize=6)
    runs = knob_runs(rows)
    for knob in dict.fromkeys(k for k, _, _ in runs):
        dpo = [r for (k, _, m), seeds in runs.items() if k == knob and m == "dpo" for r in seeds.values()]
        axes[1].plot([r["endpoint_win_rate"] for r in dpo], [r["fall"] for r in dpo], "o", ms=4, alpha=0.7,
                     label=knob)
    axes[1].set(xlabel="win-rate of DPO's endpoint (u / beta)", ylabel="DPO's fall (peak - final)")
    for i, method in enumerate(dict.fromkeys(m for _, _, m in runs if m != "dpo")):
        xs, ys = [], []
        for (knob, world, m), seeds in runs.items():
            if m == method:
                dpo = runs[(knob, world, "dpo")]
                xs += [dpo[s]["fall"] for s in seeds]
                ys += [seeds[s]["final"] - dpo[s]["final"] for s in seeds]
        axes[2].plot(xs, ys, "ox"[i % 2], ms=4, alpha=0.6, label=method)
    axes[2].axhline(0, color="k", lw=0.8)
    axes[2].set(xlabel="DPO's fall (peak - final)", ylabel="final win-rate minus DPO's")
    for ax in axes[1:]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    return fig


def log_w_histograms(ax, rows, args):
    """log w of AIS-DPO's pairs (the first seed's data) at four points of training, from the theta its rows
    recorded (the run is not trained again; its pairs are drawn again, the same ones)."""
    world = tc.make_world(args)
    chosen, rejected = tc.sample_pairs(world, args.num_pairs, args.world_seed, args.seeds[0])
    rows = by_arm([r for r in rows if r["arm"] == "ais-dpo"])["ais-dpo"][args.seeds[0]]
    for i in np.linspace(0, len(rows) - 1, 5).round().astype(int)[1:]:
        row = rows[i]
        theta = torch.tensor([row["theta_length"], row["theta_quality"]], dtype=torch.float64)
        log_w = tc.pair_log_weights(tc.policy_logps(theta, world), world["log_ref"], world, chosen, rejected,
                                    "adaptive", 0.0, args)
        ax.hist(log_w.numpy(), bins=40, histtype="step", label=f"step {row['step']}")
    ax.set(xlabel="log w (AIS-DPO, one seed)", ylabel="pairs")
    ax.legend(fontsize=7)


EXPERIMENTS = {"alpha": alpha, "ipo": ipo, "shift": shift, "rpo": rpo, "weights": weights,
               "controls": controls, "quality": quality, "knobs": knobs}
EXTRA = {"alpha": ("ess", "loss"), "ipo": ("ess",), "shift": ("ess",), "rpo": ("mean_length",),
         "weights": ("ess", "top10_loss_share", "log_weight_mean"),
         "controls": ("ess", "mean_length", "theta_quality"),
         "quality": ("ess", "theta_quality", "mean_length")}
PAIRED = {"controls": "ais-dpo", "quality": "ais-dpo"}  # a second table: each arm against this one, by seed
TABLES = {"knobs": knob_tables}  # an experiment's own tables, in place of summary (and paired)


@stage.cleans_up
def run(name, args, out_root):
    out_dir = os.path.join(out_root, name)
    output = stage.start_output(out_dir, f"experiments/{name}")
    work = output.work
    rows = EXPERIMENTS[name](args)
    with open(os.path.join(work, "results.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    if name in TABLES:
        table = TABLES[name](rows)
    else:
        table = summary(rows, EXTRA[name])
        if name in PAIRED:
            table += "\n" + paired(rows, PAIRED[name])
    with open(os.path.join(work, "summary.md"), "w") as f:
        f.write(table)
    claims.save_figure(figure(name, rows, args), os.path.join(work, f"{name}.png"))
    output.publish()
    print(f"{name}: {out_dir}/summary.md, {name}.png\n{table}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=[*EXPERIMENTS, "all"])
    parser.add_argument("--out_dir", default="out/experiments", help="each experiment writes OUT_DIR/<name>/")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                        help="replicates (new pairs)")
    parser.add_argument("--world_seed", type=int, default=0, help="the categorical world's noise")
    cli = parser.parse_args(argv)
    args = dataclasses.replace(tc.Args(), seeds=cli.seeds, world_seed=cli.world_seed)
    tc.check(args)
    torch.set_num_threads(1)
    for name in EXPERIMENTS if cli.experiment == "all" else [cli.experiment]:
        run(name, args, cli.out_dir)


if __name__ == "__main__":
    main()
