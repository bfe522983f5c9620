"""
experiments/online.py -- offline against online on the language toy (the Adaptive-IS paper, Sec. 3.1 and
App. C, Fig. 6): DPO and AIS-DPO on pi_ref's offline pairs, online DPO and RLOO on fresh samples of the
current policy labelled by a proxy reward model that learned from those same offline pairs, all at beta
0.01, on one win-rate-against-KL figure with the true scorer's win-rate beside the proxy's.

    python experiments/online.py                 # three seeds of each, 8 min 39 s on 2 cores
    python experiments/online.py --seeds 0 1     # fewer seeds (about 2.5 minutes each)
    python experiments/online.py --judge true    # the online methods labelled by the true scorer
                                                 # (-> <out>/online_judge_true/)

It runs what is missing of run.sh's stages 1, 2 and 4 (the world, pi_ref, the offline pairs in
<out>/prefs; 5 minutes more), then writes <out>/online/: proxy_rm/ (reward.py --mode train on
<out>/prefs/train.jsonl: the chosen/rejected labels only, never the score columns), runs/ (one per method
and seed), eval/ (evaluate.py --judge rm with the proxy as the "gold" model: win_rate is the proxy's,
true_win_rate the true scorer's), logs/, and report/: online.png, summary.md, timing.json.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import claims  # noqa: E402
import stage  # noqa: E402

METHODS = {  # method -> its command; every run at beta 0.01
    "dpo": ["dpo.py"],
    "ais-dpo": ["is_dpo.py", "--weight", "adaptive"],
    "online-dpo": ["extras/online_dpo.py"],
    "rloo": ["extras/rloo.py"],
}
OFFLINE = ("dpo", "ais-dpo")
COLORS = {"dpo": "tab:blue", "ais-dpo": "tab:orange", "online-dpo": "tab:green", "rloo": "tab:red"}


def say(start, text):
    print(f"[online {time.time() - start:.0f}s] {text}", flush=True)


def run_all(commands, jobs, logs):
    """Run {name: argv} with `jobs` side by side, each writing logs/<name>.log; stop at the first failure."""
    os.makedirs(logs, exist_ok=True)
    todo, running = list(commands.items()), []
    while todo or running:
        while todo and len(running) < jobs:
            name, argv = todo.pop(0)
            log = open(os.path.join(logs, f"{name}.log"), "w")
            running.append((name, subprocess.Popen([sys.executable, *map(str, argv)], cwd=ROOT, stdout=log,
                                                   stderr=subprocess.STDOUT), log))
        time.sleep(0.5)
        for item in [r for r in running if r[1].poll() is not None]:
            running.remove(item)
            item[2].close()
            if item[1].returncode:
                for _, proc, _ in running:
                    proc.terminate()
                stage.fail(f"{item[0]} failed; see {os.path.join(logs, item[0] + '.log')}")


def offline_stages(out, logs):
    """run.sh's stages 1, 2 and 4 (JUDGE=true), each only if its output is missing."""
    steps = {"toy_tldr": ["toy_tldr.py", "--out_dir", f"{out}/toy_tldr"],
             "sft": ["sft.py", "--data", f"{out}/toy_tldr", "--out_dir", f"{out}/sft"],
             "prefs": ["reward.py", "--mode", "label", "--judge", "true", "--sft_path", f"{out}/sft",
                       "--data", f"{out}/toy_tldr", "--out_dir", f"{out}/prefs"]}
    for name, argv in steps.items():
        if not os.path.isdir(os.path.join(out, name)):
            run_all({name: argv}, 1, logs)


def proxy_command(cli, root):
    """{"proxy_rm": argv} of reward.py on the offline pairs' labels, or {} if the proxy is there."""
    if os.path.isdir(os.path.join(root, "proxy_rm")):
        return {}
    return {"proxy_rm": ["reward.py", "--mode", "train", "--sft_path", f"{cli.out}/sft", "--data",
                         f"{cli.out}/prefs/train.jsonl", "--out_dir", f"{root}/proxy_rm", "--threads", 1,
                         *cli.proxy_flags.split()]}


def training_commands(cli, root):
    """{log name: argv}: every method x seed, the online runs first (they take longest)."""
    out = cli.out
    common = ["--sft_path", f"{out}/sft", "--runs_dir", f"{root}/runs", "--beta", 0.01, "--threads", 1,
              "--num_checkpoints", cli.num_checkpoints]
    online = ["--data", f"{out}/toy_tldr", "--proxy_path", f"{root}/proxy_rm", "--judge", cli.judge,
              *cli.online_flags.split()]
    offline = ["--data", f"{out}/prefs"]  # log pi_ref of the pairs: saved beside them by the first run
    runs = {}
    for method in sorted(METHODS, key=lambda m: m in OFFLINE):
        for seed in cli.seeds:
            flags = offline if method in OFFLINE else online
            runs[f"{method}_{seed}"] = [*METHODS[method], *common, *flags, "--seed", seed]
    return runs


def evaluate_runs(cli, root):
    """evaluate.py on every run, the proxy as the judge and the true scorer beside it (two shards)."""
    base = ["evaluate.py", "--runs", f"{root}/runs/*", "--data", f"{cli.out}/toy_tldr", "--judge", "rm",
            "--gold_path", f"{root}/proxy_rm", "--out_dir", f"{root}/eval", "--plots_dir", f"{root}/plots"]
    run_all({f"eval_{i}": [*base, "--shard", f"{i}/{cli.jobs}", "--threads", 1] for i in range(cli.jobs)},
            cli.jobs, f"{root}/logs")
    run_all({"plots": [*base, "--plots_only"]}, 1, f"{root}/logs")
    with open(f"{root}/eval/results.jsonl") as f:
        return [json.loads(line) for line in f]


def summary(rows):
    """Markdown: per method, mean +- std over seeds of the true and the proxy's win-rates and the KL."""
    import numpy as np

    def ms(values):
        return f"{np.mean(values):.2f} ± {np.std(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"

    head = ("| method | seeds | peak true win-rate | final true win-rate | final proxy win-rate | final KL "
            "| final true score |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    groups = claims.group_runs(rows)
    for method in METHODS:
        runs = [run for (m, _), seeds in groups.items() if m == method for run in seeds.values()]
        if runs:
            final = {key: ms([run[-1][key] for run in runs])
                     for key in ("true_win_rate", "gold_win_rate", "kl", "true_score")}
            peak = ms([max(r["true_win_rate"] for r in run) for run in runs])
            lines.append(f"| {method} | {len(runs)} | {peak} | {final['true_win_rate']} | "
                         f"{final['gold_win_rate']} | {final['kl']} | {final['true_score']} |")
    start = next(r for r in rows if r["step"] == 0)  # every run starts at pi_ref: one shared row
    lines.append(f"\npi_ref (step 0): true win-rate {start['true_win_rate']:.2f}, proxy win-rate "
                 f"{start['gold_win_rate']:.2f}, true score {start['true_score']:.2f}.")
    return "\n".join(lines) + "\n"


def figure(rows, judge):
    """Win-rate against KL: each method's seed-averaged checkpoints; solid: true scorer, dashed: proxy."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (method, _), seeds in sorted(claims.group_runs(rows).items()):
        _, kl, _ = claims.mean_curve(seeds, "kl")
        for key, style, what in (("true_win_rate", "o-", "true"), ("gold_win_rate", "x--", "proxy")):
            _, wr, _ = claims.mean_curve(seeds, key)
            ax.plot(kl, wr, style, color=COLORS.get(method), ms=4, alpha=1 if what == "true" else 0.5,
                    label=f"{method} ({what})")
    ax.set(xlabel="KL(pi_theta || pi_ref), nats", ylabel="win-rate against the references",
           title=f"beta 0.01, mean over seeds; online methods labelled by the {judge}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return fig


@stage.cleans_up
def report(rows, root, judge, timing):
    """<root>/report/: online.png, summary.md, timing.json, written whole or not at all."""
    out_dir = os.path.join(root, "report")
    output = stage.start_output(out_dir, "experiments/online")
    work = output.work
    table = summary(rows)
    with open(os.path.join(work, "summary.md"), "w") as f:
        f.write(table)
    with open(os.path.join(work, "timing.json"), "w") as f:
        json.dump(timing, f, indent=2)
    claims.save_figure(figure(rows, judge), os.path.join(work, "online.png"))
    output.publish()
    print(f"{out_dir}/online.png, summary.md\n{table}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out", help="run.sh's OUT: the world, pi_ref and the pairs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="replicates of every method")
    parser.add_argument("--judge", default="proxy", choices=["proxy", "true"],
                        help="who labels the online methods' samples")
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side, one thread each")
    parser.add_argument("--proxy_flags", default="--val_size 500",
                        help="extra flags of the proxy (reward.py --mode train)")
    parser.add_argument("--num_checkpoints", type=int, default=5,
                        help="checkpoints of every run, evaluated (plus step 0, shared)")
    parser.add_argument("--online_flags", default="",
                        help="extra flags of extras/rloo.py and extras/online_dpo.py")
    cli = parser.parse_args(argv)
    root = os.path.join(cli.out, "online" if cli.judge == "proxy" else "online_judge_true")
    start, timing = time.time(), {}
    logs = os.path.join(root, "logs")
    offline_stages(cli.out, logs)
    timing["offline_stages_s"] = round(time.time() - start)
    commands = {name: argv for name, argv in training_commands(cli, root).items()
                if not os.path.isdir(os.path.join(root, "runs", run_dir(argv)))}
    first_seed = [name for name, argv in commands.items()  # beside the proxy, which the online runs need
                  if argv[0] in ("dpo.py", "is_dpo.py") and str(argv[-1]) == str(cli.seeds[0])]
    say(start, f"the proxy RM beside {len(first_seed)} offline runs, {cli.jobs} at a time (logs: {logs})")
    run_all({**proxy_command(cli, root), **{name: commands.pop(name) for name in first_seed}}, cli.jobs, logs)
    timing["proxy_and_first_offline_s"] = round(time.time() - start) - timing["offline_stages_s"]
    say(start, f"the other {len(commands)} runs")
    run_all(commands, cli.jobs, logs)
    timing["other_runs_s"] = round(time.time() - start) - sum(timing.values())
    say(start, "evaluation: the true scorer and the proxy on every checkpoint")
    rows = evaluate_runs(cli, root)
    timing["eval_s"] = round(time.time() - start) - sum(timing.values())
    timing["total_s"] = round(time.time() - start)
    report(rows, root, cli.judge, timing)
    say(start, f"done: {timing}")


def run_dir(argv):
    """The run directory name a training command writes: <method>_beta0.01_seed<seed>."""
    method = next(m for m, cmd in METHODS.items() if argv[:len(cmd)] == cmd)
    return f"{method}_beta0.01_seed{argv[argv.index('--seed') + 1]}"


if __name__ == "__main__":
    main()
