"""Plausible wrong answers to the exercises, each a function that tests/test_course.py puts in place of the
solution (monkeypatch) to show that at least one graded test of its exercise fails on it.

WRONG lists them: (name, exercise, the attribute it replaces, what is wrong). Most wrong answers change one
thing; where a function has several modes, the others are passed on to the solution, saved at import.
"""
import math
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

import graded_common as common
import is_dpo
import toy_gaussian

SOLUTION_LOG_W = is_dpo.log_importance_weights


class Wrong(NamedTuple):
    name: str
    exercise: int
    target: str  # module.attribute or module.Class.attribute
    what: str
    function: Callable


# ---------------------------------------------------------------------------------------- 1. SFT loss


def response_targets(model, batch, mask):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    return logits, batch["input_ids"][:, 1:], mask.bool()


def sft_per_row_mean(model, batch):
    logits, targets, mask = response_targets(model, batch, batch["response_mask"][:, 1:])
    nll = F.cross_entropy(logits.transpose(1, 2).float(), targets, reduction="none")
    return ((nll * mask).sum(1) / mask.sum(1)).mean()


def sft_eos_left_out(model, batch):
    mask = batch["response_mask"][:, 1:].clone()
    last = mask.sum(1) + mask.float().argmax(1) - 1  # the last response position: its target is EOS
    mask[torch.arange(len(mask)), last] = False
    logits, targets, mask = response_targets(model, batch, mask)
    return F.cross_entropy(logits[mask].float(), targets[mask])


def sft_mask_off_by_one(model, batch):
    logits, targets, mask = response_targets(model, batch, batch["response_mask"][:, :-1])
    return F.cross_entropy(logits[mask].float(), targets[mask])


def sft_prompt_counts(model, batch):
    logits, targets, mask = response_targets(model, batch, batch["attention_mask"][:, 1:])
    return F.cross_entropy(logits[mask].float(), targets[mask])


# ---------------------------------------------------------------------------------------- 2. Bradley-Terry


def bt_order_swapped(r_chosen, r_rejected):
    return -F.logsigmoid(r_rejected - r_chosen).mean()


def bt_summed(r_chosen, r_rejected):
    return -F.logsigmoid(r_chosen - r_rejected).sum()


def bt_log_of_sigmoid(r_chosen, r_rejected):
    return -torch.log(torch.sigmoid(r_chosen - r_rejected)).mean()


# ---------------------------------------------------------------------------------------- 3. DPO and IPO


def dpo_batch_mean(pi_w, pi_l, ref_w, ref_l, beta):
    return -F.logsigmoid(beta * ((pi_w - ref_w) - (pi_l - ref_l))).mean()


def dpo_sign_flipped(pi_w, pi_l, ref_w, ref_l, beta):
    return -F.logsigmoid(beta * ((pi_l - ref_l) - (pi_w - ref_w)))


def dpo_beta_missing(pi_w, pi_l, ref_w, ref_l, beta):
    return -F.logsigmoid((pi_w - ref_w) - (pi_l - ref_l))


def dpo_beta_outside(pi_w, pi_l, ref_w, ref_l, beta):
    return -beta * F.logsigmoid((pi_w - ref_w) - (pi_l - ref_l))


def ipo_target_one_over_beta(pi_w, pi_l, ref_w, ref_l, len_w, len_l, beta, summed=True):
    n_w, n_l = (1, 1) if summed else (len_w, len_l)
    return ((pi_w - ref_w) / n_w - (pi_l - ref_l) / n_l - 1 / beta) ** 2


def ipo_beta_on_the_margin(pi_w, pi_l, ref_w, ref_l, len_w, len_l, beta, summed=True):
    n_w, n_l = (1, 1) if summed else (len_w, len_l)
    return (beta * ((pi_w - ref_w) / n_w - (pi_l - ref_l) / n_l) - 0.5) ** 2


# ---------------------------------------------------------------------------------------- 4. the weights


def weights_breaking(mode_broken, log_w_of):
    """log_importance_weights with one mode's log w replaced by log_w_of(r_w, r_l, len_w, len_l, bound)."""
    def log_importance_weights(mode, r_w, r_l, len_w, len_l, alpha=0.0, log_w_max=2.0):
        if mode == mode_broken:
            return log_w_of(r_w, r_l, len_w, len_l, log_w_max)
        return SOLUTION_LOG_W(mode, r_w, r_l, len_w, len_l, alpha, log_w_max)
    return log_importance_weights


def weights_not_detached(args, logps, rows):
    r_w, r_l = logps["pi_w"] - logps["ref_w"], logps["pi_l"] - logps["ref_l"]
    log_w = is_dpo.log_importance_weights(args.weight, r_w, r_l, logps["len_w"].float(),
                                          logps["len_l"].float(), args.alpha, args.log_w_max)
    return torch.exp(log_w), is_dpo.weight_stats(log_w)


# ---------------------------------------------------------------------------------------- 5. the KL


def kl_of_token(per_token):
    """A sequence_kl that adds per_token(logp [|y|, V], logq [|y|, V], response ids [|y|]) over each
    response, one example at a time."""
    def sequence_kl(model, ref, examples, pad_id, batch_size=64):
        logps = common.next_token_logps
        return torch.stack([per_token(logps(model, p, r), logps(ref, p, r), torch.tensor(r)).sum()
                            for p, r in examples])
    return sequence_kl


def single_sample(logp, logq, ids):
    return (logp - logq).gather(1, ids[:, None]).squeeze(1)


def reversed_kl(logp, logq, ids):
    return (logq.exp() * (logq - logp)).sum(1)


def token_mean(logp, logq, ids):
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
    return backward


def right_grad_logits(probs, onehot, g):
    return (onehot - probs) * g[:, None]


def last_chunk(ctx, n):
    return slice((n - 1) // ctx.chunk * ctx.chunk, None)  # as if each chunk overwrote the one before


# ---------------------------------------------------------------------------------------- 7. Gaussian toys


def h_of(theta, y):
    return toy_gaussian.gaussian_logpdf(y, theta, toy_gaussian.POLICY_STD) - toy_gaussian.mixture_logpdf(y)


def is_loss_one_ratio(theta, y_w, y_l):
    h_w, h_l = h_of(theta, y_w), h_of(theta, y_l)
    rho2 = 0.5 * (h_w - h_l) ** 2
    return float(rho2.mean()), float((np.exp(h_w) * rho2).mean())


def no_half(theta, y_w, y_l):
    h_w, h_l = h_of(theta, y_w), h_of(theta, y_l)
    rho2 = (h_w - h_l) ** 2
    return float(rho2.mean()), float((np.exp(h_w + h_l) * rho2).mean())


def moments(log_moment, square=2):
    """An exact_moments from log_moment(log_r, a) = log E[r^a], with E[w^a]^square in the variance."""
    def exact_moments(log_r, alpha, T):
        m1, m2 = T * log_moment(log_r, alpha), T * log_moment(log_r, 2 * alpha)
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            return float(m1), float(m2 + np.log(-np.expm1(min(square * m1 - m2, 0.0))))
    return exact_moments


def stable_log_moment(log_r, a):
    return np.logaddexp.reduce(a * log_r) - math.log(len(log_r))


def naive_log_moment(log_r, a):
    with np.errstate(over="ignore"):
        return float(np.log(np.mean(np.exp(a * log_r))))


WRONG = [
    Wrong("sft_per_row_mean", 1, "sft.completion_loss", "each row's mean, then the mean over rows",
          sft_per_row_mean),
    Wrong("sft_eos_left_out", 1, "sft.completion_loss", "EOS left out of the mask", sft_eos_left_out),
    Wrong("sft_mask_off_by_one", 1, "sft.completion_loss", "the response mask not shifted with the targets",
          sft_mask_off_by_one),
    Wrong("sft_prompt_counts", 1, "sft.completion_loss", "prompt tokens in the loss", sft_prompt_counts),
    Wrong("bt_order_swapped", 2, "reward.bradley_terry_loss", "chosen and rejected swapped",
          bt_order_swapped),
    Wrong("bt_summed", 2, "reward.bradley_terry_loss", "summed over pairs instead of averaged", bt_summed),
    Wrong("bt_log_of_sigmoid", 2, "reward.bradley_terry_loss", "log(sigmoid(.)): -inf for large margins",
          bt_log_of_sigmoid),
    Wrong("dpo_batch_mean", 3, "dpo.dpo_loss", "the batch mean instead of one loss per pair", dpo_batch_mean),
    Wrong("dpo_sign_flipped", 3, "dpo.dpo_loss", "the margin's sign flipped", dpo_sign_flipped),
    Wrong("dpo_beta_missing", 3, "dpo.dpo_loss", "beta missing", dpo_beta_missing),
    Wrong("dpo_beta_outside", 3, "dpo.dpo_loss", "beta outside the log-sigmoid", dpo_beta_outside),
    Wrong("ipo_target_one_over_beta", 3, "dpo.ipo_loss", "IPO's target 1/beta instead of 1/(2 beta)",
          ipo_target_one_over_beta),
    Wrong("ipo_beta_on_the_margin", 3, "dpo.ipo_loss", "(beta Delta - 1/2)^2: beta on the margin",
          ipo_beta_on_the_margin),
    Wrong("ais_alpha_on_the_product", 4, "is_dpo.log_importance_weights",
          "AIS with one alpha = 1/(|y_w| + |y_l|) on the product of the ratios",
          weights_breaking("adaptive", lambda rw, rl, nw, nl, b: (rw + rl) / (nw + nl))),
    Wrong("ais_alpha_on_the_weight", 4, "is_dpo.log_importance_weights",
          "alpha on the wrong quantity: each ratio divided by |y| instead of its log",
          weights_breaking("adaptive", lambda rw, rl, nw, nl, b: rw - nw.log() + rl - nl.log())),
    Wrong("clip_from_below", 4, "is_dpo.log_importance_weights", "the clip on the wrong side (min, not max)",
          weights_breaking("clipped", lambda rw, rl, nw, nl, b: (rw + rl).clamp(min=b))),
    Wrong("clip_each_ratio", 4, "is_dpo.log_importance_weights", "each response's ratio clipped, not w",
          weights_breaking("clipped", lambda rw, rl, nw, nl, b: rw.clamp(max=b) + rl.clamp(max=b))),
    Wrong("weight_not_detached", 4, "is_dpo.importance_weights", "the weight not detached",
          weights_not_detached),
    Wrong("kl_single_sample", 5, "evaluate.sequence_kl", "log p(y_t) - log q(y_t) of the sampled token only",
          kl_of_token(single_sample)),
    Wrong("kl_reversed", 5, "evaluate.sequence_kl", "KL(pi_ref || pi_theta)", kl_of_token(reversed_kl)),
    Wrong("kl_token_mean", 5, "evaluate.sequence_kl", "the mean over tokens instead of the sum",
          kl_of_token(token_mean)),
    Wrong("backward_no_softmax", 6, "dpo.ChunkedLogProbs.backward", "onehot only, the softmax term left out",
          backward_from(lambda probs, onehot, g: onehot * g[:, None])),
    Wrong("backward_sign_flipped", 6, "dpo.ChunkedLogProbs.backward", "softmax - onehot: the sign flipped",
          backward_from(lambda probs, onehot, g: (probs - onehot) * g[:, None])),
    Wrong("backward_last_chunk_only", 6, "dpo.ChunkedLogProbs.backward",
          "the weight's and bias's gradients set (=) per chunk instead of added (+=)",
          backward_from(right_grad_logits, last_chunk)),
    Wrong("is_loss_no_half", 7, "toy_gaussian.pair_losses", "rho^2 instead of rho^2 / 2", no_half),
    Wrong("is_loss_one_ratio", 7, "toy_gaussian.pair_losses", "the mu-IS weight of the chosen response only",
          is_loss_one_ratio),
    Wrong("moments_mean_not_squared", 7, "toy_gaussian.exact_moments",
          "Var = E[r^2a]^T - E[r^a]^T: the mean not squared", moments(stable_log_moment, square=1)),
    Wrong("moments_without_the_shift", 7, "toy_gaussian.exact_moments", "exp before log: overflows",
          moments(naive_log_moment)),
]
