"""
is_dpo.py -- the same direct alignment as dpo.py, each pair weighted by an importance ratio.

The offline pairs were sampled from pi_ref, but the policy drifts away from it. Weighting each
pair's loss by how much likelier the current policy makes it, w ~ pi_theta(y_w) pi_theta(y_l) /
(pi_ref(y_w) pi_ref(y_l)), corrects the data toward the policy's own distribution, and the
over-optimisation of low-beta DAAs shrinks (IS-DAAs, arXiv 2506.08681, and its Adaptive-IS
predecessor). With r(y) = log pi_theta(y) - log pi_ref(y) summed over response tokens:

    mode      log w                                   note
    none      0                                       plain DAA
    full      r(y_w) + r(y_l)                         unbiased, variance explodes with length
    clipped   min(r(y_w) + r(y_l), log_w_max)         IS-DAAs (log_w_max = 2: w <= e^2)
    adaptive  r(y_w)/|y_w| + r(y_l)/|y_l|             AIS: alpha = 1/|y| per response (default)
    fixed     alpha * (r(y_w) + r(y_l))               ablation: alpha in {0, .05, .1, .2, .4}
    sqrt      r(y_w)/sqrt|y_w| + r(y_l)/sqrt|y_l|     ablation

    L = mean_over_pairs( w * loss ),  w = exp(log w), a constant (stop-gradient) by default.

Run (after the stages that dpo.py needs):
    python is_dpo.py                              # AIS-DPO, beta 0.01 -> out/runs/ais-dpo_beta0.01_seed0/
    python is_dpo.py --weight clipped             # IS-DPO with w <= e^2
    python is_dpo.py --weight fixed --alpha 0     # exactly dpo.py (the same train_log numbers)

How this departs from dpo.py and from the papers:
  1. It adds only `importance_weights` and its flags: dpo.train(args, weigh=importance_weights) runs
     dpo.py's loop, which multiplies each pair's loss by the weight it returns.
  2. log w is computed in log space and exponentiated last; it never multiplies probabilities.
  3. w is detached by default (--weight_grad keeps its gradient). With the gradient, the loss is
     lowered by making *every* response unlikely: the policy collapses (METHOD.md, section 6).
  4. Every mode's log w is also capped at 50 (w < 6e21) so that float32 cannot overflow on
     extreme log-ratios; only `full` can reach the cap, and it is reported, not hidden.
  5. The papers weigh against pi_ref; --behaviour_logps uses the log-probs of the policy that
     generated the data (columns written by reward.py --mode label) in place of log pi_ref.
  6. The weights are not normalised, as in the papers. Adam ignores a constant loss scale, but AIS's
     log w drifts down during training while Adam's second-moment average remembers ~1000 steps: the
     steps shrink, like a learning-rate decay. --self_normalise (w divided by its batch mean) is the
     control that removes that part.
"""
import math
from dataclasses import dataclass, field

import torch

import dpo
import lm
import stage
from stage import fail

RATIO_MODES = ("none", "full", "clipped", "adaptive", "fixed", "sqrt")  # w from pi_theta / pi_ref
MAX_LOG_W = 50.0  # exp(50) ~ 5e21: far inside float32, far above any weight that matters


@dataclass
class Args(dpo.Args):
    weight: str = field(default="adaptive", metadata={
        "help": "none | full | clipped | adaptive | fixed | sqrt"})
    alpha: float = field(default=0.1, metadata={"help": "--weight fixed: the exponent alpha in [0, 1]"})
    log_w_max: float = field(default=2.0, metadata={"help": "--weight clipped: upper clip of log w"})
    self_normalise: bool = field(default=False, metadata={
        "help": "a control: w divided by its batch mean, so only the weights' relative sizes act"})
    weight_grad: bool = field(default=False, metadata={"help": "let gradients flow through w (not advised)"})
    behaviour_logps: bool = field(default=False, metadata={
        "help": "weigh against the data's behaviour log-probs (columns chosen_behaviour_logp, "
                "rejected_behaviour_logp) instead of log pi_ref"})


def log_importance_weights(mode, r_w, r_l, len_w, len_l, alpha=0.0, log_w_max=2.0):
    """log w per pair [B] from the sequence log-ratios r_w, r_l [B] and lengths len_w, len_l [B]."""
    if mode == "none":
        log_w = torch.zeros_like(r_w)
    elif mode == "full":
        # BEGIN SOLUTION
        log_w = r_w + r_l
        # END SOLUTION
    elif mode == "clipped":
        # BEGIN SOLUTION
        log_w = (r_w + r_l).clamp(max=log_w_max)
        # END SOLUTION
    elif mode == "adaptive":
        # BEGIN SOLUTION
        log_w = r_w / len_w + r_l / len_l
        # END SOLUTION
    elif mode == "fixed":
        # BEGIN SOLUTION
        log_w = alpha * (r_w + r_l)
        # END SOLUTION
    elif mode == "sqrt":
        # BEGIN SOLUTION
        log_w = r_w / len_w.sqrt() + r_l / len_l.sqrt()
        # END SOLUTION
    else:
        fail(f"--weight must be one of {', '.join(RATIO_MODES)}, got {mode!r}")
    return log_w.clamp(max=MAX_LOG_W)


def weight_stats(log_w):
    """Mean, max and effective sample size (sum w)^2 / sum w^2 of a batch, from log w."""
    log_w = log_w.detach().double()
    ess = torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0))
    return {"weight_mean": log_w.exp().mean().item(), "weight_max": log_w.exp().max().item(),
            "log_weight_mean": log_w.mean().item(), "ess": ess.item()}


def importance_weights(args, logps, rows, model=None):
    """w [B] of a batch (dpo.train calls it where it weighs the losses), and its diagnostics.
    logps: dpo.train's {pi_w, pi_l, ref_w, ref_l, len_w, len_l}, each [B]; rows: the batch's data rows."""
    base_w, base_l = logps["ref_w"], logps["ref_l"]
    if args.behaviour_logps:
        base_w = torch.tensor([r["chosen_behaviour_logp"] for r in rows], device=base_w.device)
        base_l = torch.tensor([r["rejected_behaviour_logp"] for r in rows], device=base_l.device)
    # BEGIN SOLUTION
    r_w, r_l = logps["pi_w"] - base_w, logps["pi_l"] - base_l
    log_w = log_importance_weights(args.weight, r_w, r_l, logps["len_w"].float(), logps["len_l"].float(),
                                   args.alpha, args.log_w_max)
    if not args.weight_grad:
        log_w = log_w.detach()
    # END SOLUTION
    stats = weight_stats(log_w)  # the papers' weights, before any normalisation
    if args.self_normalise:  # w / mean_batch(w), in log space
        log_w = log_w - torch.logsumexp(log_w, 0) + math.log(len(log_w))
    return torch.exp(log_w), stats


def method_name(args):
    prefix = {"none": "w1", "full": "fullis", "clipped": "is", "adaptive": "ais", "fixed": f"a{args.alpha:g}",
              "sqrt": "sqrtis"}[args.weight]
    return f"{prefix}{'-sn' if args.self_normalise else ''}-{args.loss_type}"


def main(args, weigh=importance_weights):
    if args.weight not in RATIO_MODES:
        fail(f"--weight must be one of {', '.join(RATIO_MODES)}, got {args.weight!r}")
    if not 0 <= args.alpha <= 1:
        fail(f"--alpha must be in [0, 1], got {args.alpha}")
    if not math.isfinite(args.log_w_max) or args.log_w_max < -10:
        fail(f"--log_w_max must be finite and >= -10 (w >= e^-10, a policy that moves), got {args.log_w_max}")
    columns = ["chosen_behaviour_logp", "rejected_behaviour_logp"]  # finite log-probabilities, <= 0
    rows = lm.load_rows(args.data, "train.jsonl", [], columns) if args.behaviour_logps else []
    for i, row in enumerate(rows, 1):
        if max(row[c] for c in columns) > 0:
            fail(f"{args.data} row {i}: a behaviour log-prob above 0 ({max(row[c] for c in columns)})")
    return dpo.train(args, weigh=weigh, method=method_name(args))


if __name__ == "__main__":
    main(stage.parse_args(Args, __doc__))
