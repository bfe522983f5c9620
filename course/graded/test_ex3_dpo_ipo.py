"""Exercise 3: dpo.dpo_loss, dpo.ipo_loss and dpo.rdpo_loss (METHOD.md, section 5): one loss per pair, shape
[B], graded by values at known margins: random log-probs built so that each pair's margin is a given number,
and the loss there written out (log(1 + e^-m) in graded_common.py, d^2); finite at any margin; their
gradients with respect to the policy's log-probs at known margins and by finite differences (pi_ref's
log-probs are constants: their gradient is not graded)."""
import math

import torch

import dpo
from course.graded import graded_common as common

BETAS = (0.01, 0.1, 0.5)
SOFTPLUS, SIGMOID = common.SOFTPLUS, common.SIGMOID  # -log sigmoid(m), sigmoid(-m) at margins m
MARGINS = (-4, -2, -1, -0.5, 0, 0.5, 1, 2, 4, 2, -1, 0, 1, -4, 0.5, -2)  # 16 pairs


def lengths(n=16, seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    return torch.randint(1, 25, (n,), generator=g).double(), torch.randint(1, 25, (n,), generator=g).double()


def at_deltas(deltas, seed, len_w=None, len_l=None):
    """[pi_w, pi_l, ref_w, ref_l], float64: random log-probs in (-30, 0), but pi_w, chosen so that
    (pi_w - ref_w) / len_w - (pi_l - ref_l) / len_l is each pair's delta (the lengths 1 when None)."""
    g = torch.Generator().manual_seed(seed)
    pi_l, ref_w, ref_l = (-30 * torch.rand(len(deltas), generator=g, dtype=torch.float64) for _ in range(3))
    len_w = torch.ones(len(deltas), dtype=torch.float64) if len_w is None else len_w
    len_l = torch.ones(len(deltas), dtype=torch.float64) if len_l is None else len_l
    pi_w = ref_w + len_w * (torch.tensor(deltas, dtype=torch.float64) + (pi_l - ref_l) / len_l)
    return [pi_w, pi_l, ref_w, ref_l]


def gradchecks(loss, pi_w, pi_l):
    """Whether loss(pi_w, pi_l)'s gradients (float64) equal its finite differences."""
    inputs = [pi_w.detach().clone().requires_grad_(True), pi_l.detach().clone().requires_grad_(True)]
    return torch.autograd.gradcheck(loss, inputs, raise_exception=False)


def test_dpo_loss_per_pair():
    for beta in BETAS:
        losses = dpo.dpo_loss(*at_deltas([m / beta for m in MARGINS], seed=0), beta)
        assert losses.shape == (16,), f"dpo_loss: one loss per pair, shape (16,), not {tuple(losses.shape)}"
        for i, m in enumerate(MARGINS):
            assert math.isclose(losses[i].item(), SOFTPLUS[m], rel_tol=1e-9), (
                f"dpo_loss at beta {beta}, pair {i} (Delta {m / beta:g}, beta * Delta {m}): "
                f"{losses[i].item():.6f}, -log sigmoid(beta * Delta) is {SOFTPLUS[m]:.6f}")


def test_dpo_loss_gradients():
    for beta in BETAS:
        inputs = [t.requires_grad_(i < 2) for i, t in enumerate(at_deltas([m / beta for m in MARGINS], 1))]
        dpo.dpo_loss(*inputs, beta).sum().backward()
        push = beta * torch.tensor([SIGMOID[m] for m in MARGINS], dtype=torch.float64)  # -dL/dpi_w
        for t, sign in zip(inputs[:2], (-1, 1)):
            assert t.grad is not None, "no gradient reaches the policy's log-probs"
            assert torch.allclose(t.grad, sign * push, rtol=1e-9, atol=1e-12), (
                f"dpo_loss's gradient with respect to {'pi_w' if sign < 0 else 'pi_l'} at beta {beta}: "
                f"{t.grad[:4].tolist()}..., expected {(sign * push)[:4].tolist()}... "
                "(-/+ beta sigmoid(-beta Delta))")
        ref_w, ref_l = inputs[2:]
        assert gradchecks(lambda a, b: dpo.dpo_loss(a, b, ref_w, ref_l, beta), *inputs[:2]), (
            f"dpo_loss's gradient with respect to pi_w, pi_l at beta {beta} differs from its finite "
            "differences")


def test_dpo_loss_is_finite_at_large_margins():
    """A margin beta * Delta of -1e4 costs 1e4, and of +1e4 nothing; the gradient stays beta, or 0."""
    zero = torch.zeros(4, dtype=torch.float64)
    pi_w = torch.tensor([-1e4, 1e4, -1e3, 0.0], dtype=torch.float64, requires_grad=True)
    losses = dpo.dpo_loss(pi_w, zero, zero, zero, 1.0)
    assert torch.isfinite(losses).all(), f"dpo_loss at margins -1e4, 1e4, -1e3, 0: {losses.tolist()}"
    want = [1e4, 0.0, 1e3, math.log(2)]
    assert torch.allclose(losses, torch.tensor(want, dtype=torch.float64), rtol=1e-9), (
        f"dpo_loss at margins -1e4, 1e4, -1e3, 0 (beta 1): {losses.tolist()}, expected {want}")
    losses.sum().backward()
    want = [-1.0, 0.0, -1.0, -0.5]
    assert torch.allclose(pi_w.grad, torch.tensor(want, dtype=torch.float64), atol=1e-12), (
        f"dpo_loss's gradient at margins -1e4, 1e4, -1e3, 0 (beta 1): {pi_w.grad.tolist()}, expected {want}")


# IPO: Delta at the target 1 / (2 beta) plus an offset d costs d^2; Delta = 0 costs the target squared
IPO_DELTAS = {0.5: (0, 1, 3, -1, 0.5, 2, -3, 1.25), 0.1: (0, 5, 8, 2, 4.5, 6, -5, 5.25),
              0.01: (0, 50, 53, 47, 49.5, 51, -50, 50.25)}
IPO_LOSSES = {0.5: (1, 0, 4, 4, 0.25, 1, 16, 0.0625), 0.1: (25, 0, 9, 9, 0.25, 1, 100, 0.0625),
              0.01: (2500, 0, 9, 9, 0.25, 1, 10000, 0.0625)}


def test_ipo_loss_per_pair_both_forms():
    len_w, len_l = lengths(seed=2)
    for beta in BETAS:
        for summed in (True, False):
            deltas, want = IPO_DELTAS[beta] * 2, IPO_LOSSES[beta] * 2
            inputs = at_deltas(deltas, 2, *((None, None) if summed else (len_w, len_l)))
            losses = dpo.ipo_loss(*inputs, len_w, len_l, beta, summed=summed)
            assert losses.shape == (16,), (
                f"ipo_loss returns one loss per pair, shape (16,), not {tuple(losses.shape)}")
            for i in range(16):
                assert math.isclose(losses[i].item(), want[i], rel_tol=1e-9, abs_tol=1e-9), (
                    f"ipo_loss at beta {beta}, summed={summed}, pair {i} (Delta {deltas[i]}): "
                    f"{losses[i].item():.6f}, (Delta - 1/(2 beta))^2 is {want[i]}")


def test_ipo_loss_gradients():
    """At beta 0.5 (target 1) and Delta = 0, 1, 3, -1: dL/dpi_w = 2 (Delta - 1) / |y_w| and dL/dpi_l =
    -2 (Delta - 1) / |y_l| (|y| = 1 when summed); and on random pairs, the finite differences."""
    len_w, len_l = (torch.tensor(n, dtype=torch.float64) for n in ((2, 4, 1, 8), (4, 1, 2, 2)))
    expected = {True: ([-2, 0, 4, -4], [2, 0, -4, 4]), False: ([-1, 0, 4, -0.5], [0.5, 0, -2, 2])}
    for summed in (True, False):
        inputs = at_deltas((0, 1, 3, -1), 3, *((None, None) if summed else (len_w, len_l)))
        pi_w, pi_l = (t.requires_grad_(True) for t in inputs[:2])
        dpo.ipo_loss(*inputs, len_w, len_l, 0.5, summed=summed).sum().backward()
        for t, name, want in zip((pi_w, pi_l), ("pi_w", "pi_l"), expected[summed]):
            assert t.grad is not None, "no gradient reaches the policy's log-probs"
            assert torch.allclose(t.grad, torch.tensor(want, dtype=torch.float64), rtol=1e-9, atol=1e-9), (
                f"ipo_loss's gradient with respect to {name}, summed={summed}, at Delta 0, 1, 3, -1 "
                f"(beta 0.5): {t.grad.tolist()}, expected {want}")
        g = torch.Generator().manual_seed(3)
        pi_w, pi_l, ref_w, ref_l = (-30 * torch.rand(16, generator=g, dtype=torch.float64) for _ in range(4))
        n_w, n_l = lengths(seed=3)
        assert gradchecks(lambda a, b: dpo.ipo_loss(a, b, ref_w, ref_l, n_w, n_l, 0.1, summed=summed),
                          pi_w, pi_l), (
            f"ipo_loss's gradient with respect to pi_w, pi_l (summed={summed}) differs from its finite "
            "differences")


def test_rdpo_loss_per_pair_and_finite():
    len_w, len_l = lengths(seed=4)
    for beta, alpha in ((0.1, 0.0), (0.1, 0.01), (0.5, -0.2)):
        # beta * Delta + alpha (|y_w| - |y_l|) = m: Delta = (m - alpha (|y_w| - |y_l|)) / beta
        deltas = [(m - alpha * (w - l)) / beta for m, w, l in zip(MARGINS, len_w.tolist(), len_l.tolist())]
        inputs = at_deltas(deltas, 4)
        losses = dpo.rdpo_loss(*inputs, len_w, len_l, beta, alpha)
        assert losses.shape == (16,), (
            f"rdpo_loss returns one loss per pair, shape (16,), not {tuple(losses.shape)}")
        for i, m in enumerate(MARGINS):
            assert math.isclose(losses[i].item(), SOFTPLUS[m], rel_tol=1e-9), (
                f"rdpo_loss at beta {beta}, alpha {alpha}, pair {i} (Delta {deltas[i]:.4f}, |y_w| "
                f"{len_w[i].item():g}, |y_l| {len_l[i].item():g}): {losses[i].item():.6f}, "
                f"-log sigmoid(beta Delta + alpha (|y_w| - |y_l|)) = -log sigmoid({m}) is {SOFTPLUS[m]:.6f}")
        ref_w, ref_l = inputs[2:]
        assert gradchecks(lambda a, b: dpo.rdpo_loss(a, b, ref_w, ref_l, len_w, len_l, beta, alpha),
                          *inputs[:2]), (
            f"rdpo_loss's gradient with respect to pi_w, pi_l (beta {beta}, alpha {alpha}) differs from its "
            "finite differences")
    zero = torch.zeros(2, dtype=torch.float64)
    margins = torch.tensor([-1e4, 1e4], dtype=torch.float64)
    big = dpo.rdpo_loss(margins, zero, zero, zero, zero, zero, 1.0, 0.0)
    assert torch.allclose(big, torch.tensor([1e4, 0.0], dtype=torch.float64)), (
        f"rdpo_loss at margins -1e4 and 1e4 (beta 1, alpha 0): {big.tolist()}, expected [1e4, 0]")
