"""Exercise 2: reward.bradley_terry_loss (METHOD.md, section 4): mean over pairs of
-log sigmoid(R(x, y_w) - R(x, y_l)), computed stably."""
import math

import torch

import reward


def scores(n=16, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, generator=g), scale * torch.randn(n, generator=g)


def by_hand(chosen, rejected):
    pairs = zip(chosen.tolist(), rejected.tolist())
    return sum(math.log1p(math.exp(-(c - r))) for c, r in pairs) / len(chosen)


def test_value_is_the_mean_over_pairs():
    for seed in range(3):
        chosen, rejected = scores(seed=seed)
        loss = reward.bradley_terry_loss(chosen, rejected)
        assert loss.shape == (), f"bradley_terry_loss returns one scalar, not shape {tuple(loss.shape)}"
        want = by_hand(chosen, rejected)
        assert math.isclose(loss.item(), want, rel_tol=1e-5), (
            f"bradley_terry_loss, scores seed {seed}: {loss.item():.6f}, the mean over pairs of "
            f"-log sigmoid(r_chosen - r_rejected) is {want:.6f}")


def test_gradient_is_minus_sigmoid_of_minus_the_margin():
    chosen, rejected = scores(n=12, seed=3)
    chosen.requires_grad_(True)
    rejected.requires_grad_(True)
    reward.bradley_terry_loss(chosen, rejected).backward()
    expected = -torch.sigmoid(-(chosen - rejected)).detach() / len(chosen)
    for name, t, want in (("r_chosen", chosen, expected), ("r_rejected", rejected, -expected)):
        assert t.grad is not None, f"no gradient reaches {name}"
        assert torch.allclose(t.grad, want, atol=1e-7), (
            f"bradley_terry_loss's gradient with respect to {name}: {t.grad.tolist()}, expected "
            f"{want.tolist()} (-/+ sigmoid(-margin) / number of pairs)")


def test_large_margins_stay_finite():
    chosen = torch.tensor([200.0, -200.0, 0.0, 50.0, -50.0, 1.0, 2.0, 3.0])
    rejected = torch.zeros(8)
    loss = reward.bradley_terry_loss(chosen, rejected)
    assert torch.isfinite(loss), f"bradley_terry_loss at margins of +-200: {loss.item()}, not finite"
    want = by_hand(chosen, rejected)
    assert math.isclose(loss.item(), want, rel_tol=1e-5), (
        f"bradley_terry_loss at margins of +-200: {loss.item():.6f}, expected {want:.6f} (a margin of -200 "
        "costs 200)")
