"""
extras/online_dpo.py -- online DPO (the Adaptive-IS paper, Sec. 3.1): every step samples two fresh responses
per prompt from the current policy, labels them with the proxy reward model (or, with --judge true, the
toy's hidden true scorer), and takes one DPO step on those pairs (METHOD.md, section 11).

The loss is dpo.py's, to the bit; what changes is where the pairs come from: on-policy samples instead of
pi_ref's offline pairs, so no importance weight is needed. pi_ref's log-probs are computed on the fly
(the pairs are new every step). A pair whose two responses are identical or score the same carries no
preference and is dropped, as reward.py --mode label drops it.

Run (after the proxy: see extras/rloo.py):
    python extras/online_dpo.py                 # -> out/runs/online-dpo_beta0.01_seed0/
    python extras/online_dpo.py --judge true    # the labels of the true scorer instead of the proxy's
"""
import functools
import os
import sys
import types
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the core, as a script too
import dpo  # noqa: E402
import lm  # noqa: E402
import stage  # noqa: E402
from extras import rloo  # noqa: E402
from stage import fail  # noqa: E402


@dataclass
class Args(rloo.OnlineArgs):
    pass


def labelled_pairs(args, run, prompts):
    """Two samples of the current policy per prompt, labelled by the judge: [((prompt_ids, y_w),
    (prompt_ids, y_l))], pairs of identical or equally scored responses dropped."""
    responses = rloo.sample_responses(args, run, prompts, 2)
    score = rloo.scores(args, run, prompts, responses, 2).tolist()
    pairs = []
    for i, (_, ids) in enumerate(prompts):
        (a, b), (sa, sb) = responses[2 * i:2 * i + 2], score[2 * i:2 * i + 2]
        if a != b and sa != sb:
            pairs.append(((ids, a), (ids, b)) if sa > sb else ((ids, b), (ids, a)))
    return pairs


def online_dpo_step(args, run, prompts, sampler=labelled_pairs):
    """dpo.py's loss (the mean over the pairs) on the pairs that sampler(args, run, prompts) returns."""
    pairs = sampler(args, run, prompts)
    if not pairs:
        fail("every sampled pair was identical or tied: no preference to learn from")
    pad = run.tokenizer.pad_token_id
    with run.autocast:
        pi_w, pi_l, len_w, len_l = lm.pair_logps(run.model, pairs, pad, run.device, args.logit_chunk)
        with torch.no_grad():
            ref_w, ref_l, _, _ = lm.pair_logps(run.ref, pairs, pad, run.device, args.logit_chunk)
    loss_args = types.SimpleNamespace(loss_type="dpo", beta=args.beta, label_smoothing=0.0)
    losses, stats = dpo.daa_losses(loss_args, pi_w, pi_l, ref_w, ref_l, len_w, len_l)
    return losses.mean(), {**stats, "pairs": len(pairs)}


def main(args, sampler=labelled_pairs):
    return rloo.train(args, functools.partial(online_dpo_step, sampler=sampler), "online-dpo")


if __name__ == "__main__":
    main(stage.parse_args(Args, __doc__))
