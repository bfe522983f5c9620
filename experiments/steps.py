"""
experiments/steps.py -- how far, how straight and how evenly each DAA run moved, read from what run.sh
leaves: the weights of every checkpoint and each run's train_log.jsonl. It asks what the weights change in
the language toy: does AIS-DPO, whose weights put a batch's loss on a few pairs, take noisier steps and
wander further than DPO?

    python experiments/steps.py                         # out/runs/* (and out/eval/results.jsonl's KL)
    python experiments/steps.py --runs "out_w7/runs/*" --results out_w7/eval/results.jsonl

Per method and beta, mean ± std over seeds (one row a run with --by_run):
  net        |theta_last - theta_0|: how far the weights end from pi_ref's (L2 over every weight)
  path       sum over checkpoints of |theta_k+1 - theta_k|: how far they travelled
  straight   net / path (1: a straight line)
  cos        mean cosine of consecutive displacements theta_k+1 - theta_k
  late/early the mean |theta_k+1 - theta_k| over the second half of the checkpoints / over the first half
             (below 1: the steps shrank)
  grad_cv    std / mean of the gradient norm over the last third of the steps (how spiky the steps are)
  ess, w     is_dpo.py's effective sample size and batch-mean weight, over the last 20 steps
  KL/net     the final KL (evaluate.py's, nats) per unit of net distance: how much the samples changed
             for each unit the weights moved
"""
import argparse
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import evaluate  # noqa: E402
import lm  # noqa: E402
import stage  # noqa: E402


def flat(checkpoint):
    from safetensors.torch import load_file

    weights = load_file(os.path.join(checkpoint, "model.safetensors"))
    return torch.cat([weights[k].double().flatten() for k in sorted(weights)])


def measure(run, kl=None):
    """One evaluate.Run (its directory, args.json and checkpoints by step) -> {net, path, straight, cos,
    late/early, grad_cv, ess, w, KL/net}."""
    if len(run.checkpoints) < 3:
        stage.fail(f"{run.dir} holds {len(run.checkpoints)} checkpoints; steps.py needs ckpt-0 and two more")
    thetas = [flat(directory) for _, directory in run.checkpoints]
    steps = [b - a for a, b in zip(thetas, thetas[1:])]
    net = float((thetas[-1] - thetas[0]).norm())
    cos = [float(torch.nn.functional.cosine_similarity(a, b, dim=0)) for a, b in zip(steps, steps[1:])]
    sizes, half = [float(s.norm()) for s in steps], len(steps) // 2
    log = lm.read_jsonl(os.path.join(run.dir, "train_log.jsonl"))
    grads = np.array([row["grad_norm"] for row in log[-max(1, len(log) // 3):]])
    late = log[-20:]
    path = sum(sizes)
    return {"net": net, "path": path, "straight": net / path if path else float("nan"), "cos": np.mean(cos),
            "late/early": np.mean(sizes[len(steps) - half:]) / np.mean(sizes[:half]),
            "grad_cv": grads.std() / grads.mean(), "ess": np.mean([r.get("ess", np.nan) for r in late]),
            "w": np.mean([r.get("weight_mean", np.nan) for r in late]),
            "KL/net": kl / net if kl is not None and net else float("nan")}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="out/runs/*", help="glob of run directories (dpo.py / is_dpo.py)")
    parser.add_argument("--results", default="out/eval/results.jsonl", help="evaluate.py's rows (for the KL)")
    parser.add_argument("--by_run", action="store_true", help="one row a run, not a mean over seeds")
    cli = parser.parse_args(argv)
    runs = evaluate.find_runs(cli.runs)  # the run directories, their args.json and checkpoints; else an error
    kl = {}  # run directory name -> KL of its last evaluated checkpoint
    for row in sorted(evaluate.read_results(cli.results), key=lambda r: r["step"]):
        kl[row["run"]] = row["kl"]
    keys = ["net", "path", "straight", "cos", "late/early", "grad_cv", "ess", "w", "KL/net"]
    groups = {}
    for run in runs:
        name = run.args["run_name"]
        label = name if cli.by_run else f"{run.args['method']}_beta{run.args['beta']:g}"
        groups.setdefault(label, []).append(measure(run, kl.get(name)))
        print(f"measured {name}", file=sys.stderr)
    print("| run | seeds | " + " | ".join(keys) + " |\n|---|---|" + "---|" * len(keys))
    for label, rows in groups.items():
        cells = []
        for k in keys:
            v = np.array([r[k] for r in rows], dtype=float)
            spread = f" ± {v.std():.2g}" if len(v) > 1 else ""
            cells.append("-" if np.isnan(v).all() else f"{v.mean():.3g}{spread}")
        print(f"| {label} | {len(rows)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
