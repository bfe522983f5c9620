"""Correct answers that differ from the solution, each a function that tests/test_course.py puts in place of
the solution (monkeypatch) to show that every graded test of its exercise accepts it: the graders check what
a function computes, not how it is written.

Each is registered in RIGHT by `@right(exercise, the attribute it replaces, how it differs)`.
"""
import math
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

import is_dpo
import lm
import toy_gaussian


class Right(NamedTuple):
    name: str
    exercise: int
    target: str  # module.attribute or module.Class.attribute
    what: str
    function: Callable


RIGHT = []


def right(exercise, target, what):
    def register(function):
        RIGHT.append(Right(function.__name__, exercise, target, what, function))
        return function
    return register


# ---------------------------------------------------------------------------------------- 1. SFT loss


@right(1, "sft.completion_loss", "log_softmax and gather, summed, over the count of response tokens")
def sft_sum_over_count(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    token_logps = logits.float().log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    mask = batch["response_mask"][:, 1:]
    return -(token_logps * mask).sum() / mask.sum()


# ---------------------------------------------------------------------------------------- 2. Bradley-Terry


@right(2, "reward.bradley_terry_loss", "softplus(-(r_w - r_l)), the same function")
def bt_softplus(r_chosen, r_rejected):
    return F.softplus(r_rejected - r_chosen).mean()


# ---------------------------------------------------------------------------------------- 3. DPO and IPO


@right(3, "dpo.dpo_loss", "pi_ref's log-probs detached inside the loss (they are constants)")
def dpo_reference_detached(pi_w, pi_l, ref_w, ref_l, beta):
    return -F.logsigmoid(beta * ((pi_w - ref_w.detach()) - (pi_l - ref_l.detach())))


@right(3, "dpo.dpo_loss", "softplus(-beta Delta)")
def dpo_softplus(pi_w, pi_l, ref_w, ref_l, beta):
    return F.softplus(-beta * ((pi_w - pi_l) - (ref_w - ref_l)))


# ---------------------------------------------------------------------------------------- 4. the weights


@right(4, "is_dpo.importance_weights", "w exponentiated first, then detached")
def weights_detached_after_exp(args, logps, rows):
    base_w, base_l = logps["ref_w"], logps["ref_l"]
    if args.behaviour_logps:
        base_w = logps["pi_w"].new_tensor([r["chosen_behaviour_logp"] for r in rows])
        base_l = logps["pi_l"].new_tensor([r["rejected_behaviour_logp"] for r in rows])
    log_w = is_dpo.log_importance_weights(args.weight, logps["pi_w"] - base_w, logps["pi_l"] - base_l,
                                          logps["len_w"].double(), logps["len_l"].double(), alpha=args.alpha,
                                          log_w_max=args.log_w_max)
    stats = is_dpo.weight_stats(log_w)
    if args.self_normalise:
        log_w = log_w - torch.logsumexp(log_w, 0) + math.log(len(log_w))
    w = torch.exp(log_w)
    return (w if args.weight_grad else w.detach()), stats


# ---------------------------------------------------------------------------------------- 5. the KL


@torch.no_grad()
def sequence_kl_float32(model, ref, examples, pad_id, batch_size=64):
    """sequence_kl with the exact KL computed after casting the logits to float32, whatever their dtype."""
    device = next(model.parameters()).device
    out = []
    for s in range(0, len(examples), batch_size):
        batch = lm.to_device(lm.collate_grouped(examples[s:s + batch_size], pad_id), device)
        mask = batch["response_mask"].bool()
        h_p = lm.response_hidden(model.base_model, batch)[:, :-1][mask]
        h_q = lm.response_hidden(ref.base_model, batch)[:, :-1][mask]
        logp = model.get_output_embeddings()(h_p).float().log_softmax(-1)
        logq = ref.get_output_embeddings()(h_q).float().log_softmax(-1)
        kl_token = (logp.exp() * (logp - logq)).sum(-1)
        rows = mask.nonzero()[:, 0]
        out.append(torch.zeros(len(mask), dtype=kl_token.dtype, device=device).index_add(0, rows, kl_token))
    return torch.cat(out).cpu()


right(5, "evaluate.sequence_kl", "the exact KL after casting the logits to float32")(sequence_kl_float32)


# ---------------------------------------------------------------------------------------- 6. the backward


@right(6, "lm.ChunkedLogProbs.backward", "softmax of each chunk's logits (not exp(logits - lse)), one_hot")
def backward_softmax_and_one_hot(ctx, grad_logps):
    hidden, weight, bias, targets, lse = ctx.saved_tensors
    w, b = weight.to(ctx.dtype), None if bias is None else bias.to(ctx.dtype)
    grads = [torch.zeros_like(hidden), torch.zeros_like(weight, dtype=lse.dtype),
             None if bias is None else torch.zeros_like(bias, dtype=lse.dtype)]
    with torch.autocast(hidden.device.type, enabled=False):
        for s in range(0, len(targets), ctx.chunk):
            h, g = hidden[s:s + ctx.chunk], grad_logps[s:s + ctx.chunk, None]
            logits = F.linear(h.to(ctx.dtype), w, b).to(lse.dtype)
            onehot = F.one_hot(targets[s:s + ctx.chunk], len(weight)).to(lse.dtype)
            grad_logits = (onehot - logits.softmax(-1)) * g
            grads[0][s:s + ctx.chunk] = grad_logits.to(ctx.dtype) @ w
            grads[1] += grad_logits.T @ h.to(lse.dtype)
            if bias is not None:
                grads[2] += grad_logits.sum(0)
    asked = [ctx.needs_input_grad[i] and grads[i] is not None for i in range(3)]
    grads = [t.to(p.dtype) if a else None for t, p, a in zip(grads, (hidden, weight, bias), asked)]
    return (*grads, None, None)


# ---------------------------------------------------------------------------------------- 7. Gaussian toys


def h_of(theta, y):
    return toy_gaussian.gaussian_logpdf(y, theta, toy_gaussian.POLICY_STD) - toy_gaussian.mixture_logpdf(y)


@right(7, "toy_gaussian.pair_losses", "the two numbers as a numpy array, not a tuple")
def pair_losses_array(theta, y_w, y_l):
    h_w, h_l = h_of(theta, y_w), h_of(theta, y_l)
    half_rho2 = 0.5 * (h_w - h_l) ** 2
    return np.array([half_rho2.mean(), (np.exp(h_w + h_l) * half_rho2).mean()])


@right(7, "toy_gaussian.exact_moments", "np.logaddexp.reduce and log1p(-exp(.))")
def moments_logaddexp_log1p(log_r, alpha, T):
    log_mean = T * (np.logaddexp.reduce(alpha * log_r) - np.log(len(log_r)))
    log_second = T * (np.logaddexp.reduce(2 * alpha * log_r) - np.log(len(log_r)))
    with np.errstate(divide="ignore"):
        return float(log_mean), float(log_second + np.log1p(-np.exp(2 * log_mean - log_second)))


@right(7, "toy_gaussian.exact_moments", "the two numbers as a numpy array, not a tuple")
def moments_array(log_r, alpha, T):
    log_m = [T * (np.logaddexp.reduce(a * log_r) - math.log(len(log_r))) for a in (alpha, 2 * alpha)]
    with np.errstate(divide="ignore"):
        return np.array([log_m[0], log_m[1] + np.log(-np.expm1(min(2 * log_m[0] - log_m[1], 0.0)))])
