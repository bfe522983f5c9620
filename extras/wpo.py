"""
extras/wpo.py -- WPO (Zhou et al. 2024, "Weighted Preference Optimization"; TRL's DPOConfig(use_weighting)):
dpo.py's loop with each pair's loss weighted by how likely the current policy is to write the pair itself.

    log w = mean over y_w's tokens of (log p_t(y_t) - log sum_v p_t(v)^2)  +  the same over y_l,   w <= 1

p_t is the policy's next-token distribution at response position t. It is not an importance ratio: there is
no pi_ref in it, only the policy's own probabilities, aligned by log sum_v p_t(v)^2 (the log-probability of a
token the policy itself would draw, on average) so that a confident policy is not penalised for being
confident (the paper's eq. 2, TRL's form: a per-token mean, both responses, capped at 1). w is a constant:
no gradient flows through it. Compare is_dpo.py, whose weights are ratios to pi_ref.

Run (after the stages that dpo.py needs; every flag is dpo.py's):
    python extras/wpo.py                        # -> out/runs/wpo-dpo_beta0.01_seed0/
    python extras/wpo.py --loss_type ipo --beta 0.1

dpo.train calls weigh(args, logps, rows, model): logps holds log pi_theta of the batch's responses, and the
term log sum_v p_t(v)^2 needs the policy's whole distribution at each response token, so wpo_weights runs
one more pass, without gradient, of the policy being trained (`model`) over the batch's pairs.
"""
import functools
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the core, as a script too
import dpo  # noqa: E402
import is_dpo  # noqa: E402
import lm  # noqa: E402
import stage  # noqa: E402
from stage import fail  # noqa: E402

Args = dpo.Args  # every flag is dpo.py's


def wpo_log_weights(pi_w, pi_l, sq_w, sq_l, len_w, len_l):
    """log w per pair [B]: (pi_w - sq_w) / |y_w| + (pi_l - sq_l) / |y_l|, at most 0 (w <= 1). pi_* [B]: summed
    log-probs of the responses under the policy; sq_* [B]: sums over their tokens of log sum_v p_t(v)^2."""
    return ((pi_w - sq_w) / len_w + (pi_l - sq_l) / len_l).clamp(max=0.0)


@torch.no_grad()
def log_sum_squared_probs(hidden, weight, bias, chunk):
    """log sum_v p_t(v)^2 per token [N], p_t = softmax(hidden_t @ W^T + b), chunk tokens at a time (0: as
    lm.ChunkedLogProbs sizes them), the logits in float32 at least (autocast off: a [chunk, V] block, never
    [N, V])."""
    chunk = lm.ChunkedLogProbs.tokens(chunk, len(weight))
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
    terms = []
    with torch.autocast(hidden.device.type, enabled=False):
        for s in range(0, len(hidden), chunk):
            logits = F.linear(hidden[s:s + chunk].to(dtype), w, b)
            terms.append(torch.logsumexp(2 * logits.log_softmax(-1), -1))  # log sum_v exp(2 log p_t(v))
    return torch.cat(terms)


@torch.no_grad()
def squared_terms(model, pairs, pad_id, device, chunk):
    """(sq_w, sq_l) [B]: for the chosen and the rejected response of each pair [((prompt, y_w), (prompt,
    y_l))], the sum over its tokens of log sum_v p_t(v)^2; each prompt runs once for both (lm.pair_logps)."""
    batch = lm.to_device(lm.collate_grouped([ex for pair in pairs for ex in pair], pad_id, k=2), device)
    mask = batch["response_mask"].bool()
    hidden = lm.response_hidden(model.base_model, batch)[:, :-1][mask]  # hidden[:, t] predicts token t
    head = model.get_output_embeddings()
    terms = log_sum_squared_probs(hidden, head.weight, head.bias, chunk)
    sums = torch.zeros(len(mask), dtype=terms.dtype, device=terms.device)
    sums = sums.index_add(0, mask.nonzero()[:, 0], terms)  # each token's term to its response
    return sums[0::2], sums[1::2]


@functools.lru_cache(maxsize=None)
def tokenizer_of(path):
    return lm.load_tokenizer(path)


def wpo_weights(args, logps, rows, model):
    """dpo.train's weigh: w [B] of the batch and its diagnostics. logps: dpo.train's {pi_w, pi_l, len_w,
    len_l, ...} [B]; rows: the batch's rows; model: the policy being trained. Over several processes each
    computes its shard of the rows, in the order dpo.train gathers its log-probs (stage.gather_live)."""
    tokenizer = tokenizer_of(args.sft_path)
    mine = stage.shard(rows)
    chosen, rejected = (lm.encode(tokenizer, mine, c, args.max_prompt_len, args.max_response_len)
                        for c in ("chosen", "rejected"))
    device = logps["pi_w"].device
    _, autocast = stage.device_and_autocast(args.precision)
    with autocast:
        sq_w, sq_l = squared_terms(model, list(zip(chosen, rejected)), tokenizer.pad_token_id, device,
                                   args.logit_chunk)
    sq_w, sq_l = stage.gather_live(sq_w), stage.gather_live(sq_l)
    log_w = wpo_log_weights(logps["pi_w"].detach(), logps["pi_l"].detach(), sq_w, sq_l,
                            logps["len_w"].float(), logps["len_l"].float())
    return torch.exp(log_w), is_dpo.weight_stats(log_w)


def main(args):
    if args.fsdp:
        fail("--fsdp: extras/wpo.py's extra pass calls the policy itself, not FSDP's module: leave it out")
    return dpo.train(args, weigh=wpo_weights, method=f"wpo-{args.loss_type}")


if __name__ == "__main__":
    main(stage.parse_args(Args, __doc__))
