"""Exercise 5: evaluate.sequence_kl (METHOD.md, section 7): per sequence, the sum over its response tokens
of the exact next-token KL(pi_theta || pi_ref) over the whole vocabulary; graded against each example
alone, written out as sum_t sum_v p_t(v) (log p_t(v) - log q_t(v)). The tolerance is float32's: computing it
after casting the logits to float32 is right too (the models here are float64)."""
import torch

import evaluate
from course.graded import graded_common as common


def by_hand(model, ref, rows):
    out = []
    for p, r in rows:
        logp, logq = common.next_token_logps(model, p, r), common.next_token_logps(ref, p, r)
        out.append(sum((logp[t].exp() * (logp[t] - logq[t])).sum() for t in range(len(r))))
    return torch.stack(out)


def test_one_number_per_sequence_the_full_distribution_kl():
    model, ref = common.tiny_model(0), common.tiny_model(1)
    rows = common.examples(10, seed=3)
    with torch.no_grad():
        kl = evaluate.sequence_kl(model, ref, rows, common.PAD, batch_size=4)
        expected = by_hand(model, ref, rows)
    assert kl.shape == (10,), f"sequence_kl: one number per sequence, shape (10,), not {tuple(kl.shape)}"
    assert torch.allclose(kl.double(), expected, rtol=1e-5, atol=1e-6), (
        f"sequence_kl: {kl.tolist()}, the sum over response tokens of the exact KL(p_t || q_t) over the "
        f"vocabulary is {expected.tolist()}")


def test_zero_for_the_same_model_and_never_negative():
    model, ref = common.tiny_model(0), common.tiny_model(2)
    rows = common.examples(9, seed=4)
    with torch.no_grad():
        same = evaluate.sequence_kl(model, model, rows, common.PAD, batch_size=3)
        assert same.shape == (9,), f"sequence_kl: shape (9,), not {tuple(same.shape)}"
        assert torch.allclose(same.double(), torch.zeros(9, dtype=torch.float64), atol=1e-6), (
            f"sequence_kl of a model against itself: {same.tolist()}, expected 0")
        other = evaluate.sequence_kl(ref, model, rows, common.PAD, batch_size=3)
        assert (other > 0).all(), f"sequence_kl of two different models: {other.tolist()}, expected all > 0"
