"""Exercise 2: reward.bradley_terry_loss (METHOD.md, section 4): mean over pairs of
-log sigmoid(R(x, y_w) - R(x, y_l)), computed stably. Graded by values at known margins (graded_common.py),
properties (swapping chosen and rejected, a constant added to every score, the mean over pairs), the gradient
at known margins and by finite differences, and margins of hundreds."""
import math

import torch

import reward
from course.graded import graded_common as common

SOFTPLUS, SIGMOID = common.SOFTPLUS, common.SIGMOID  # -log sigmoid(m), sigmoid(-m) at margins m
MARGINS = {0: (-4, -2, -1, 0, 0.5, 1, 2, 4), 1: (0, 0, 0, 0, 0, 0), 2: (2, -0.5, 1, -4, 4, -1, 0.5, 2, -2, 0)}


def at_margins(margins, seed, dtype=torch.float32):
    """(r_chosen, r_rejected): random rejected scores, and chosen ones that exceed them by the margins."""
    g = torch.Generator().manual_seed(seed)
    rejected = 3 * torch.randn(len(margins), generator=g, dtype=dtype)
    return rejected + torch.tensor(margins, dtype=dtype), rejected


def test_value_is_the_mean_over_pairs():
    for seed, margins in MARGINS.items():
        chosen, rejected = at_margins(margins, seed)
        loss = reward.bradley_terry_loss(chosen, rejected)
        assert loss.shape == (), f"bradley_terry_loss returns one scalar, not shape {tuple(loss.shape)}"
        want = sum(SOFTPLUS[m] for m in margins) / len(margins)
        assert math.isclose(loss.item(), want, rel_tol=1e-5), (
            f"bradley_terry_loss, scores seed {seed}: {loss.item():.6f}, the mean over pairs of "
            f"-log sigmoid(r_chosen - r_rejected) at margins {margins} is {want:.6f}")


def test_swap_shift_and_mean_over_pairs():
    """On random scores: L(r_w, r_l) - L(r_l, r_w) = -mean(r_w - r_l) (log(1 + e^-m) - log(1 + e^m) = -m),
    adding a constant to every score changes nothing, and a batch's loss is the mean of its halves'."""
    g = torch.Generator().manual_seed(5)
    chosen, rejected = (3 * torch.randn(16, generator=g, dtype=torch.float64) for _ in range(2))
    loss = reward.bradley_terry_loss(chosen, rejected).item()
    swapped = reward.bradley_terry_loss(rejected, chosen).item()
    margin = (chosen - rejected).mean().item()
    assert math.isclose(loss - swapped, -margin, rel_tol=1e-6, abs_tol=1e-9), (
        f"bradley_terry_loss(r_w, r_l) - bradley_terry_loss(r_l, r_w) = {loss - swapped:.6f}, expected "
        f"-mean(r_w - r_l) = {-margin:.6f}")
    shifted = reward.bradley_terry_loss(chosen + 7.5, rejected + 7.5).item()
    assert math.isclose(shifted, loss, rel_tol=1e-6), (
        f"bradley_terry_loss with 7.5 added to every score: {shifted:.6f}, without: {loss:.6f}")
    halves = [reward.bradley_terry_loss(chosen[s], rejected[s]).item() for s in (slice(0, 8), slice(8, 16))]
    assert math.isclose(loss, sum(halves) / 2, rel_tol=1e-6), (
        f"bradley_terry_loss of 16 pairs: {loss:.6f}, of its two halves of 8: {halves}; the mean over pairs "
        f"gives their mean, {sum(halves) / 2:.6f}")


def test_gradient_is_minus_sigmoid_of_minus_the_margin():
    margins = MARGINS[2]
    chosen, rejected = (t.requires_grad_(True) for t in at_margins(margins, seed=3))
    reward.bradley_terry_loss(chosen, rejected).backward()
    expected = torch.tensor([-SIGMOID[m] / len(margins) for m in margins])
    for name, t, want in (("r_chosen", chosen, expected), ("r_rejected", rejected, -expected)):
        assert t.grad is not None, f"no gradient reaches {name}"
        assert torch.allclose(t.grad, want, rtol=1e-5, atol=1e-7), (
            f"bradley_terry_loss's gradient with respect to {name} at margins {margins}: {t.grad.tolist()}, "
            f"expected {want.tolist()} (-/+ sigmoid(-margin) / number of pairs)")
    g = torch.Generator().manual_seed(4)
    inputs = [(3 * torch.randn(6, generator=g, dtype=torch.float64)).requires_grad_(True) for _ in range(2)]
    assert torch.autograd.gradcheck(reward.bradley_terry_loss, inputs, raise_exception=False), (
        "bradley_terry_loss's gradient (float64, random scores) differs from its finite differences")


def test_large_margins_stay_finite():
    chosen = torch.tensor([200.0, -200.0, 0.0, 50.0, -50.0, 1.0, 2.0, 3.0])
    rejected = torch.zeros(8)
    loss = reward.bradley_terry_loss(chosen, rejected)
    assert torch.isfinite(loss), f"bradley_terry_loss at margins of +-200: {loss.item()}, not finite"
    # log(1 + e^-m) at 200, -200, 0, 50, -50, 1, 2, 3: 0 (to 1e-87), 200, log 2, 0 (to 1e-21), 50, and
    # 0.3132616875182228, 0.1269280110429725, 0.04858735157374206; their mean:
    want = 31.39774052883686
    assert math.isclose(loss.item(), want, rel_tol=1e-5), (
        f"bradley_terry_loss at margins of +-200: {loss.item():.6f}, expected {want:.6f} (a margin of -200 "
        "costs 200)")
