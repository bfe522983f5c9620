"""Plausible wrong answers to the exercises, each a function that tests/test_course.py puts in place of the
solution (monkeypatch) to show that at least one graded test of its exercise fails on it.

Each is registered in WRONG by `@wrong(exercise, the attribute it replaces, what is wrong)`. Most change one
thing; where a function has several modes, the others are passed on to the solution, saved at import.
"""
import math
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

import is_dpo
import toy_gaussian

SOLUTION_LOG_W = is_dpo.log_importance_weights


class Wrong(NamedTuple):
    name: str
    exercise: int
    target: str  # module.attribute or module.Class.attribute
    what: str
    function: Callable


WRONG = []


def wrong(exercise, target, what):
    def register(function):
        WRONG.append(Wrong(function.__name__, exercise, target, what, function))
        return function
    return register


# ---------------------------------------------------------------------------------------- 1. SFT loss


def response_targets(model, batch, mask):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    return logits, batch["input_ids"][:, 1:], mask.bool()


@wrong(1, "sft.completion_loss", "each row's mean, then the mean over rows")
def sft_per_row_mean(model, batch):
    logits, targets, mask = response_targets(model, batch, batch["response_mask"][:, 1:])
    nll = F.cross_entropy(logits.transpose(1, 2).float(), targets, reduction="none")
    return ((nll * mask).sum(1) / mask.sum(1)).mean()


@wrong(1, "sft.completion_loss", "EOS left out of the mask")
def sft_eos_left_out(model, batch):
    mask = batch["response_mask"][:, 1:].clone()
    last = mask.sum(1) + mask.float().argmax(1) - 1  # the last response position: its target is EOS
    mask[torch.arange(len(mask)), last] = False
    logits, targets, mask = response_targets(model, batch, mask)
    return F.cross_entropy(logits[mask].float(), targets[mask])


@wrong(1, "sft.completion_loss", "the response mask not shifted with the targets")
def sft_mask_off_by_one(model, batch):
    logits, targets, mask = response_targets(model, batch, batch["response_mask"][:, :-1])
    return F.cross_entropy(logits[mask].float(), targets[mask])


@wrong(1, "sft.completion_loss", "targets equal to the pad id masked out: EOS dropped where pad == EOS")
def sft_pad_targets_masked(model, batch):
    mask = batch["response_mask"][:, 1:] & (batch["input_ids"][:, 1:] != model.config.pad_token_id)
    logits, targets, mask = response_targets(model, batch, mask)
    return F.cross_entropy(logits[mask].float(), targets[mask])


@wrong(1, "sft.completion_loss", "prompt tokens in the loss")
def sft_prompt_counts(model, batch):
    logits, targets, mask = response_targets(model, batch, batch["attention_mask"][:, 1:])
    return F.cross_entropy(logits[mask].float(), targets[mask])


# ---------------------------------------------------------------------------------------- 2. Bradley-Terry


@wrong(2, "reward.bradley_terry_loss", "chosen and rejected swapped")
def bt_order_swapped(r_chosen, r_rejected):
    return -F.logsigmoid(r_rejected - r_chosen).mean()


@wrong(2, "reward.bradley_terry_loss", "summed over pairs instead of averaged")
def bt_summed(r_chosen, r_rejected):
    return -F.logsigmoid(r_chosen - r_rejected).sum()


@wrong(2, "reward.bradley_terry_loss", "log(sigmoid(.)): infinite for large margins")
def bt_log_of_sigmoid(r_chosen, r_rejected):
    return -torch.log(torch.sigmoid(r_chosen - r_rejected)).mean()


# ---------------------------------------------------------------------------------------- 3. DPO and IPO


@wrong(3, "dpo.dpo_loss", "the batch mean instead of one loss per pair")
def dpo_batch_mean(pi_w, pi_l, ref_w, ref_l, beta):
    return -F.logsigmoid(beta * ((pi_w - ref_w) - (pi_l - ref_l))).mean()


@wrong(3, "dpo.dpo_loss", "the margin's sign flipped")
def dpo_sign_flipped(pi_w, pi_l, ref_w, ref_l, beta):
    return -F.logsigmoid(beta * ((pi_l - ref_l) - (pi_w - ref_w)))


@wrong(3, "dpo.dpo_loss", "beta missing")
def dpo_beta_missing(pi_w, pi_l, ref_w, ref_l, beta):
    return -F.logsigmoid((pi_w - ref_w) - (pi_l - ref_l))


@wrong(3, "dpo.dpo_loss", "beta outside the log-sigmoid")
def dpo_beta_outside(pi_w, pi_l, ref_w, ref_l, beta):
    return -beta * F.logsigmoid((pi_w - ref_w) - (pi_l - ref_l))


@wrong(3, "dpo.dpo_loss", "-log(sigmoid(beta Delta)): infinite at a margin of -1e4")
def dpo_log_of_sigmoid(pi_w, pi_l, ref_w, ref_l, beta):
    return -torch.log(torch.sigmoid(beta * ((pi_w - ref_w) - (pi_l - ref_l))))


@wrong(3, "dpo.ipo_loss", "the rejected log-ratio detached: no gradient pushes y_l down")
def ipo_rejected_detached(pi_w, pi_l, ref_w, ref_l, len_w, len_l, beta, summed=True):
    n_w, n_l = (1, 1) if summed else (len_w, len_l)
    return ((pi_w - ref_w) / n_w - ((pi_l - ref_l) / n_l).detach() - 1 / (2 * beta)) ** 2


@wrong(3, "dpo.ipo_loss", "IPO's target 1/beta instead of 1/(2 beta)")
def ipo_target_one_over_beta(pi_w, pi_l, ref_w, ref_l, len_w, len_l, beta, summed=True):
    n_w, n_l = (1, 1) if summed else (len_w, len_l)
    return ((pi_w - ref_w) / n_w - (pi_l - ref_l) / n_l - 1 / beta) ** 2


@wrong(3, "dpo.ipo_loss", "(beta Delta - 1/2)^2: beta on the margin")
def ipo_beta_on_the_margin(pi_w, pi_l, ref_w, ref_l, len_w, len_l, beta, summed=True):
    n_w, n_l = (1, 1) if summed else (len_w, len_l)
    return (beta * ((pi_w - ref_w) / n_w - (pi_l - ref_l) / n_l) - 0.5) ** 2


# ---------------------------------------------------------------------------------------- 4. the weights


def breaks(mode_broken):
    """log_importance_weights with one mode's log w computed by the decorated
    (r_w, r_l, len_w, len_l, bound)."""
    def wrap(log_w_of):
        def log_importance_weights(mode, r_w, r_l, len_w, len_l, alpha=0.0, log_w_max=2.0):
            if mode == mode_broken:
                return log_w_of(r_w, r_l, len_w, len_l, log_w_max)
            return SOLUTION_LOG_W(mode, r_w, r_l, len_w, len_l, alpha, log_w_max)
        log_importance_weights.__name__ = log_w_of.__name__
        return log_importance_weights
    return wrap


@wrong(4, "is_dpo.log_importance_weights", "AIS with one alpha = 1/(|y_w| + |y_l|) on the ratios' product")
@breaks("adaptive")
def ais_alpha_on_the_product(r_w, r_l, len_w, len_l, bound):
    return (r_w + r_l) / (len_w + len_l)


@wrong(4, "is_dpo.log_importance_weights", "alpha on the wrong quantity: each ratio over |y|, not its log")
@breaks("adaptive")
def ais_alpha_on_the_weight(r_w, r_l, len_w, len_l, bound):
    return r_w - len_w.log() + r_l - len_l.log()


@wrong(4, "is_dpo.log_importance_weights", "the clip on the wrong side (a floor, not a ceiling)")
@breaks("clipped")
def clip_from_below(r_w, r_l, len_w, len_l, bound):
    return (r_w + r_l).clamp(min=bound)


@wrong(4, "is_dpo.log_importance_weights", "each response's ratio clipped, not the pair's weight")
@breaks("clipped")
def clip_each_ratio(r_w, r_l, len_w, len_l, bound):
    return r_w.clamp(max=bound) + r_l.clamp(max=bound)


@wrong(4, "is_dpo.importance_weights", "the weight not detached")
def weight_not_detached(args, logps, rows):
    r_w, r_l = logps["pi_w"] - logps["ref_w"], logps["pi_l"] - logps["ref_l"]
    log_w = is_dpo.log_importance_weights(args.weight, r_w, r_l, logps["len_w"].float(),
                                          logps["len_l"].float(), args.alpha, args.log_w_max)
    return torch.exp(log_w), is_dpo.weight_stats(log_w)


def weights_of(log_w_of_base):
    """importance_weights with log w from log_w_of_base(args, logps, rows) (base: what the log-ratios are
    taken against), detached unless --weight_grad, as it should be."""
    def importance_weights(args, logps, rows):
        log_w = log_w_of_base(args, logps, rows)
        log_w = log_w if args.weight_grad else log_w.detach()
        return torch.exp(log_w), is_dpo.weight_stats(log_w)
    importance_weights.__name__ = log_w_of_base.__name__
    return importance_weights


@wrong(4, "is_dpo.importance_weights", "--behaviour_logps ignored: always against log pi_ref")
@weights_of
def weights_ignore_behaviour(args, logps, rows):
    r_w, r_l = logps["pi_w"] - logps["ref_w"], logps["pi_l"] - logps["ref_l"]
    lengths = logps["len_w"].float(), logps["len_l"].float()
    return is_dpo.log_importance_weights(args.weight, r_w, r_l, *lengths,
                                         args.alpha, args.log_w_max)


@wrong(4, "is_dpo.importance_weights", "alpha and log_w_max swapped")
@weights_of
def weights_alpha_and_bound_swapped(args, logps, rows):
    base_w, base_l = logps["ref_w"], logps["ref_l"]
    if args.behaviour_logps:
        base_w = torch.tensor([r["chosen_behaviour_logp"] for r in rows], device=base_w.device)
        base_l = torch.tensor([r["rejected_behaviour_logp"] for r in rows], device=base_l.device)
    r_w, r_l = logps["pi_w"] - base_w, logps["pi_l"] - base_l
    lengths = logps["len_w"].float(), logps["len_l"].float()
    return is_dpo.log_importance_weights(args.weight, r_w, r_l, *lengths,
                                         args.log_w_max, args.alpha)


# ---------------------------------------------------------------------------------------- 5. the KL


def next_token_logps(model, prompt, response):
    """[|y|, V]: log pi(. | x, y_<t) for each response position t, one example alone, no padding."""
    logits = model(input_ids=torch.tensor([prompt + response])).logits[0].double()
    return logits.log_softmax(-1)[len(prompt) - 1:len(prompt) + len(response) - 1]


def summed_per_sequence(per_token):
    """A sequence_kl that adds the decorated (logp [|y|, V], logq [|y|, V], response ids [|y|]) over each
    response, one example at a time."""
    def sequence_kl(model, ref, examples, pad_id, batch_size=64):
        logps = next_token_logps
        return torch.stack([per_token(logps(model, p, r), logps(ref, p, r), torch.tensor(r)).sum()
                            for p, r in examples])
    sequence_kl.__name__ = per_token.__name__
    return sequence_kl


@wrong(5, "evaluate.sequence_kl", "log p(y_t) - log q(y_t) of the sampled token only")
@summed_per_sequence
def kl_single_sample(logp, logq, ids):
    return (logp - logq).gather(1, ids[:, None]).squeeze(1)


@wrong(5, "evaluate.sequence_kl", "KL(pi_ref || pi_theta)")
@summed_per_sequence
def kl_reversed(logp, logq, ids):
    return (logq.exp() * (logq - logp)).sum(1)


@wrong(5, "evaluate.sequence_kl", "the mean over tokens instead of the sum")
@summed_per_sequence
def kl_token_mean(logp, logq, ids):
    return (logp.exp() * (logp - logq)).sum(1) / len(ids)


# ---------------------------------------------------------------------------------------- 6. the backward


def backward_from(grad_logits_of, rows_of_weight=lambda ctx, n: slice(None)):
    """A ChunkedLogProbs.backward from grad_logits_of(probs [N, V], onehot [N, V], upstream [N]); the
    weight's and bias's gradients add the rows rows_of_weight(ctx, N) only."""
    def backward(ctx, grad_logps):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        logits = F.linear(hidden, weight, bias)
        onehot = F.one_hot(targets, weight.shape[0]).to(logits.dtype)
        grad_logits = grad_logits_of((logits - lse[:, None]).exp(), onehot, grad_logps)
        rows = rows_of_weight(ctx, len(targets))
        grad_bias = None if bias is None else grad_logits[rows].sum(0)
        return grad_logits @ weight, grad_logits[rows].T @ hidden[rows], grad_bias, None, None
    backward.__name__ = grad_logits_of.__name__
    return backward


@wrong(6, "lm.ChunkedLogProbs.backward", "onehot only, the softmax term left out")
@backward_from
def backward_no_softmax(probs, onehot, g):
    return onehot * g[:, None]


@wrong(6, "lm.ChunkedLogProbs.backward", "softmax - onehot: the sign flipped")
@backward_from
def backward_sign_flipped(probs, onehot, g):
    return (probs - onehot) * g[:, None]


@wrong(6, "lm.ChunkedLogProbs.backward", "the weight's and bias's gradients set (=) per chunk, not added")
def backward_last_chunk_only(ctx, grad_logps):
    last_chunk = lambda ctx, n: slice((n - 1) // ctx.chunk * ctx.chunk, None)  # noqa: E731
    return backward_from(lambda probs, onehot, g: (onehot - probs) * g[:, None], last_chunk)(ctx, grad_logps)


def chunked_backward(ctx, grad_logps, chunk=None, logits_dtype=None, bias_inside_weight=False):
    """The solution's loop, but for one change: chunk (None: ctx.chunk), the dtype the logits are recomputed
    in (None: the forward's, ctx.dtype), or the bias's gradient added only where the weight's is asked for."""
    hidden, weight, bias, targets, lse = ctx.saved_tensors
    dtype, chunk, acc = logits_dtype or ctx.dtype, chunk or ctx.chunk, lse.dtype
    w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
    grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
    grad_weight = torch.zeros_like(weight, dtype=acc) if ctx.needs_input_grad[1] else None
    grad_bias = torch.zeros_like(bias, dtype=acc) if bias is not None and ctx.needs_input_grad[2] else None
    with torch.autocast(hidden.device.type, enabled=False):
        for s in range(0, len(targets), chunk):
            h, g, t = hidden[s:s + chunk], grad_logps[s:s + chunk], targets[s:s + chunk]
            probs = F.linear(h.to(dtype), w, b).to(acc).sub_(lse[s:s + chunk, None]).exp_()
            grad_logits = probs.mul_(-g[:, None])
            grad_logits[torch.arange(len(t), device=t.device), t] += g
            if grad_hidden is not None:
                grad_hidden[s:s + chunk] = grad_logits.to(dtype) @ w
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.T, h.to(acc))
                if grad_bias is not None and bias_inside_weight:
                    grad_bias += grad_logits.sum(0)
            if grad_bias is not None and not bias_inside_weight:
                grad_bias += grad_logits.sum(0)
    grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
    grad_bias = None if grad_bias is None else grad_bias.to(bias.dtype)
    return grad_hidden, grad_weight, grad_bias, None, None


@wrong(6, "lm.ChunkedLogProbs.backward", "the bias's gradient computed only inside the weight's branch")
def backward_bias_inside_weight_branch(ctx, grad_logps):
    return chunked_backward(ctx, grad_logps, bias_inside_weight=True)


@wrong(6, "lm.ChunkedLogProbs.backward", "the whole [N, V] softmax at once (right numbers, N V memory)")
def backward_whole_softmax(ctx, grad_logps):
    return chunked_backward(ctx, grad_logps, chunk=len(grad_logps))


@wrong(6, "lm.ChunkedLogProbs.backward", "logits recomputed in the parameters' dtype, not the forward's")
def backward_parameters_dtype(ctx, grad_logps):
    return chunked_backward(ctx, grad_logps, logits_dtype=ctx.saved_tensors[1].dtype)


# ---------------------------------------------------------------------------------------- 7. Gaussian toys


def h_of(theta, y):
    return toy_gaussian.gaussian_logpdf(y, theta, toy_gaussian.POLICY_STD) - toy_gaussian.mixture_logpdf(y)


@wrong(7, "toy_gaussian.pair_losses", "the mu-IS weight of the chosen response only")
def is_loss_one_ratio(theta, y_w, y_l):
    h_w, h_l = h_of(theta, y_w), h_of(theta, y_l)
    rho2 = 0.5 * (h_w - h_l) ** 2
    return float(rho2.mean()), float((np.exp(h_w) * rho2).mean())


@wrong(7, "toy_gaussian.pair_losses", "rho^2 instead of rho^2 / 2")
def is_loss_no_half(theta, y_w, y_l):
    rho2 = (h_of(theta, y_w) - h_of(theta, y_l)) ** 2
    return float(rho2.mean()), float((np.exp(h_of(theta, y_w) + h_of(theta, y_l)) * rho2).mean())


def moments(log_moment, square=2):
    """An exact_moments from log_moment(log_r, a) = log E[r^a], with E[w^a]^square in the variance."""
    def exact_moments(log_r, alpha, T):
        m1, m2 = T * log_moment(log_r, alpha), T * log_moment(log_r, 2 * alpha)
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            return float(m1), float(m2 + np.log(-np.expm1(min(square * m1 - m2, 0.0))))
    return exact_moments


@wrong(7, "toy_gaussian.exact_moments", "Var = E[r^2a]^T - E[r^a]^T: the mean not squared")
def moments_mean_not_squared(log_r, alpha, T):
    stable = lambda log_r, a: np.logaddexp.reduce(a * log_r) - math.log(len(log_r))  # noqa: E731
    return moments(stable, square=1)(log_r, alpha, T)


@wrong(7, "toy_gaussian.exact_moments", "exp before log: overflows")
def moments_without_the_shift(log_r, alpha, T):
    with np.errstate(over="ignore"):
        return moments(lambda log_r, a: float(np.log(np.mean(np.exp(a * log_r)))))(log_r, alpha, T)
