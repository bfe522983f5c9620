"""extras/wpo.py: WPO's weights against an independent computation (a full forward per response, TRL's
use_weighting form), their cap at 1, extreme inputs, and a tiny run whose weights follow the policy."""
import math
import random

import pytest
import torch

import dpo
import lm
import toy_tldr
from extras import wpo
from test_dpo import read_log, run, tiny_world  # noqa: F401 (tiny_world is a fixture)
from test_lm import tiny_model  # noqa: F401 (a fixture)


def toy_rows(n, seed):
    """n rows {prompt, chosen, rejected} of toy posts, the responses prefixes of references."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        facts, prompt = toy_tldr.make_post(rng)
        chosen, rejected = (toy_tldr.reference_summary(facts, rng)[:rng.randint(1, 60)] for _ in range(2))
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def test_wpo_weights_match_a_full_forward_and_trl_form(tiny_model, tmp_path):  # noqa: F811
    """Per response, one plain full forward: log p_t(y_t) and log sum_v p_t(v)^2 by their definitions; TRL's
    weight exp(mean_t over y_w + mean_t over y_l), capped at 1. wpo_weights, from the rows, the summed
    log-probs and the policy, must give the same (and squared_terms the same sums)."""
    model, tokenizer = tiny_model
    tokenizer.save_pretrained(tmp_path)
    args = dpo.Args(sft_path=str(tmp_path), logit_chunk=7)
    rows = toy_rows(8, seed=5)
    pairs = list(zip(*(lm.encode(tokenizer, rows, c, args.max_prompt_len, args.max_response_len)
                       for c in ("chosen", "rejected"))))
    logp_sums, sq_sums, lengths, per_token = [], [], [], []
    for pair in pairs:
        for prompt_ids, response_ids in pair:
            with torch.no_grad():
                logp = model(input_ids=torch.tensor([prompt_ids + response_ids])).logits[0].log_softmax(-1)
            at = logp[len(prompt_ids) - 1:-1]  # the positions that predict the response tokens
            sq = torch.log((at.exp() ** 2).sum(-1))  # log sum_v p(v)^2, the definition
            token_logps = at.gather(-1, torch.tensor(response_ids)[:, None]).squeeze(-1)
            logp_sums.append(token_logps.sum())
            sq_sums.append(sq.sum())
            lengths.append(len(response_ids))
            per_token.append((token_logps - sq).mean())
    pi, sq, n = torch.stack(logp_sums), torch.stack(sq_sums), torch.tensor(lengths)
    logps = {"pi_w": pi[0::2], "pi_l": pi[1::2], "len_w": n[0::2], "len_l": n[1::2]}
    w, stats = wpo.wpo_weights(args, logps, rows, model)
    trl = torch.stack(per_token).reshape(-1, 2).sum(1).clamp(max=0).exp()
    torch.testing.assert_close(w, trl, atol=1e-10, rtol=1e-8)
    sq_w, sq_l = wpo.squared_terms(model, pairs, tokenizer.pad_token_id, torch.device("cpu"), 7)
    torch.testing.assert_close(torch.stack([sq_w, sq_l], 1).reshape(-1), sq, atol=1e-10, rtol=0)
    assert (w <= 1).all() and (w < 1).any() and stats["weight_max"] <= 1


def test_wpo_weights_cap_at_one():
    big = torch.tensor([5.0, -1.0])
    log_w = wpo.wpo_log_weights(big, big, torch.zeros(2), torch.zeros(2), torch.ones(2), torch.ones(2))
    assert log_w.tolist() == [0.0, -2.0]


def test_extreme_inputs_stay_finite():
    pi = torch.tensor([1e4, -1e4, 1e4, -1e4])
    sq = torch.tensor([-1e4, 1e4, 1e4, -1e4])
    lens = torch.tensor([3.0, 7.0, 1.0, 24.0])
    log_w = wpo.wpo_log_weights(pi, pi.flip(0), sq, sq.flip(0), lens, lens.flip(0))
    w = log_w.exp()
    assert torch.isfinite(w).all() and (w <= 1).all()
    from is_dpo import weight_stats
    assert all(math.isfinite(v) for v in weight_stats(log_w).values())


def test_wpo_runs_and_its_weights_follow_the_trained_policy(tmp_path_factory, tiny_world):  # noqa: F811
    """Every pair in each of two steps: step 2 weighs the same 48 pairs as step 1, so its weights differ
    from step 1's only if they are computed with the policy being trained (not pi_ref)."""
    out = run(tmp_path_factory, "extras/wpo.py", "--sft_path", tiny_world / "sft", "--data",
              tiny_world / "prefs.jsonl", "--runs_dir", tiny_world / "runs_wpo", "--batch_size", 48,
              "--num_epochs", 2, "--num_checkpoints", 1, "--warmup_steps", 0, "--lr", 1e-2, "--seed", 3)
    assert out.returncode == 0, out.stderr[-2000:]
    log = read_log(tiny_world / "runs_wpo" / "wpo-dpo_beta0.01_seed3")
    assert len(log) == 2
    for row in log:
        assert {"weight_mean", "weight_max", "ess", "loss", "daa_loss", "margin", "accuracy"} <= set(row)
        assert all(math.isfinite(v) for v in row.values())
        assert row["weight_max"] <= 1.0 and row["weight_mean"] < 1.0  # the policy's own probabilities
        assert row["loss"] < row["daa_loss"]  # the loss is the mean of w * loss, w < 1
    assert abs(log[1]["weight_mean"] - log[0]["weight_mean"]) > 1e-4 * log[0]["weight_mean"]
