"""Exercise 5: evaluate.sequence_kl (METHOD.md, section 7): per sequence, the sum over its response tokens
of the exact next-token KL(pi_theta || pi_ref) over the whole vocabulary. Graded by values: two models whose
next-token distributions are tables (common.table_model), so each token's KL is a closed form written out
below; and by properties on random tiny models: zero for a model against itself, positive otherwise, and the
same numbers whatever the batch size and the order of the sequences. The tolerance is float32's: computing it
after casting the logits to float32 is right too (the models here are float64)."""
import torch

import evaluate
from course.graded import graded_common as common

A, B, EOS = 2, 3, common.EOS
# the next token's distribution over (PAD, EOS, A, B) after PAD, EOS, A, B in turn, under pi_theta and pi_ref
POLICY = [[1 / 4, 1 / 4, 1 / 4, 1 / 4], [1 / 2, 1 / 8, 1 / 8, 1 / 4], [1 / 8, 1 / 4, 1 / 8, 1 / 2],
          [1 / 8, 1 / 8, 1 / 2, 1 / 4]]
REFERENCE = [[1 / 4, 1 / 4, 1 / 4, 1 / 4], [1 / 4, 1 / 4, 1 / 4, 1 / 4], [0.2, 0.4, 0.3, 0.1],
             [1 / 4, 1 / 4, 1 / 4, 1 / 4]]
# KL after A: (1/8) ln((1/8)/0.2) + (1/4) ln((1/4)/0.4) + (1/8) ln((1/8)/0.3) + (1/2) ln((1/2)/0.1)
KL_A = 0.5190340030806618
# KL after B: sum_v p(v) ln(p(v) / (1/4)) = (1/8) ln(1/2) + (1/8) ln(1/2) + (1/2) ln 2 + (1/4) ln 1
# = ln(2) / 4
KL_B = 0.17328679513998632
# each response token's KL is the one after the token before it (the prompt's last, for the first):
# row 0 after B, A; row 1 after B, B, A, B; row 2 after A
ROWS = [([A, B], [A, EOS]), ([B], [B, A, B, EOS]), ([A, A, A], [EOS])]
SEQUENCE_KL = [KL_B + KL_A, 3 * KL_B + KL_A, KL_A]


def test_one_number_per_sequence_the_full_distribution_kl():
    model, ref = common.table_model(POLICY), common.table_model(REFERENCE)
    want = torch.tensor(SEQUENCE_KL, dtype=torch.float64)
    with torch.no_grad():
        kl = evaluate.sequence_kl(model, ref, ROWS, common.PAD, batch_size=2)
    assert kl.shape == (3,), f"sequence_kl: one number per sequence, shape (3,), not {tuple(kl.shape)}"
    assert torch.allclose(kl.double(), want, rtol=1e-5, atol=1e-6), (
        f"sequence_kl: {kl.tolist()}, the sum over response tokens of the exact KL(p_t || q_t) over the "
        f"vocabulary is {want.tolist()} (KL after A {KL_A:.6f}, after B {KL_B:.6f})")


def test_the_same_numbers_whatever_the_batch():
    model, ref = common.tiny_model(0), common.tiny_model(1)
    rows = common.examples(10, seed=3)
    with torch.no_grad():
        kl = evaluate.sequence_kl(model, ref, rows, common.PAD, batch_size=4)
        whole = evaluate.sequence_kl(model, ref, rows, common.PAD, batch_size=10)
        reversed_ = evaluate.sequence_kl(model, ref, rows[::-1], common.PAD, batch_size=3).flip(0)
    assert kl.shape == (10,), f"sequence_kl: one number per sequence, shape (10,), not {tuple(kl.shape)}"
    for name, other in (("in one batch of 10", whole), ("in reverse order, batches of 3", reversed_)):
        assert torch.allclose(kl.double(), other.double(), rtol=1e-5, atol=1e-6), (
            f"sequence_kl in batches of 4: {kl.tolist()}, {name}: {other.tolist()}; each sequence's KL is "
            "its own, whatever else is in its batch")


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
