"""Exercise 3: dpo.dpo_loss, dpo.ipo_loss and dpo.rdpo_loss (METHOD.md, section 5): one loss per pair, shape
[B], against the formulas written out pair by pair, finite at any margin, and their gradients with respect to
the policy's log-probs against the closed forms (pi_ref's log-probs are constants: their gradient is not
graded)."""
import math

import torch

import dpo

BETAS = (0.01, 0.1, 0.5)


def logps(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    pi_w, pi_l, ref_w, ref_l = (-30 * torch.rand(n, generator=g, dtype=torch.float64) for _ in range(4))
    len_w = torch.randint(1, 25, (n,), generator=g).double()
    len_l = torch.randint(1, 25, (n,), generator=g).double()
    return pi_w, pi_l, ref_w, ref_l, len_w, len_l


def test_dpo_loss_per_pair():
    pi_w, pi_l, ref_w, ref_l, _, _ = logps()
    for beta in BETAS:
        losses = dpo.dpo_loss(pi_w, pi_l, ref_w, ref_l, beta)
        assert losses.shape == (16,), f"dpo_loss: one loss per pair, shape (16,), not {tuple(losses.shape)}"
        for i in range(16):
            delta = (pi_w[i] - ref_w[i]).item() - (pi_l[i] - ref_l[i]).item()
            want = math.log1p(math.exp(-beta * delta))
            assert math.isclose(losses[i].item(), want, rel_tol=1e-9), (
                f"dpo_loss at beta {beta}, pair {i} (Delta {delta:.4f}): {losses[i].item():.6f}, "
                f"-log sigmoid(beta * Delta) is {want:.6f}")


def test_dpo_loss_gradients():
    for beta in BETAS:
        inputs = [t.requires_grad_(i < 2) for i, t in enumerate(logps(seed=1)[:4])]
        dpo.dpo_loss(*inputs, beta).sum().backward()
        pi_w, pi_l, ref_w, ref_l = (t.detach() for t in inputs)
        push = beta * torch.sigmoid(-beta * ((pi_w - ref_w) - (pi_l - ref_l)))  # -dL/dpi_w
        for t, sign in zip(inputs[:2], (-1, 1)):
            assert t.grad is not None, "no gradient reaches the policy's log-probs"
            assert torch.allclose(t.grad, sign * push, rtol=1e-9, atol=1e-12), (
                f"dpo_loss's gradient with respect to {'pi_w' if sign < 0 else 'pi_l'} at beta {beta}: "
                f"{t.grad[:4].tolist()}..., expected {(sign * push)[:4].tolist()}... "
                "(-/+ beta sigmoid(-beta Delta))")


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


def test_ipo_loss_per_pair_both_forms():
    pi_w, pi_l, ref_w, ref_l, len_w, len_l = logps(seed=2)
    for beta in BETAS:
        for summed in (True, False):
            losses = dpo.ipo_loss(pi_w, pi_l, ref_w, ref_l, len_w, len_l, beta, summed=summed)
            assert losses.shape == (16,), (
                f"ipo_loss returns one loss per pair, shape (16,), not {tuple(losses.shape)}")
            for i in range(16):
                n_w, n_l = (1.0, 1.0) if summed else (len_w[i].item(), len_l[i].item())
                delta = (pi_w[i] - ref_w[i]).item() / n_w - (pi_l[i] - ref_l[i]).item() / n_l
                want = (delta - 1 / (2 * beta)) ** 2
                assert math.isclose(losses[i].item(), want, rel_tol=1e-9), (
                    f"ipo_loss at beta {beta}, summed={summed}, pair {i} (Delta {delta:.4f}): "
                    f"{losses[i].item():.6f}, (Delta - 1/(2 beta))^2 is {want:.6f}")


def test_ipo_loss_gradients():
    for summed in (True, False):
        pi_w, pi_l, ref_w, ref_l, len_w, len_l = logps(seed=3)
        pi_w.requires_grad_(True)
        pi_l.requires_grad_(True)
        beta = 0.1
        dpo.ipo_loss(pi_w, pi_l, ref_w, ref_l, len_w, len_l, beta, summed=summed).sum().backward()
        n_w, n_l = (torch.ones_like(len_w), torch.ones_like(len_l)) if summed else (len_w, len_l)
        delta = (pi_w.detach() - ref_w) / n_w - (pi_l.detach() - ref_l) / n_l
        for t, sign, n in ((pi_w, 1, n_w), (pi_l, -1, n_l)):
            assert t.grad is not None, "no gradient reaches the policy's log-probs"
            want = sign * 2 * (delta - 1 / (2 * beta)) / n
            assert torch.allclose(t.grad, want, rtol=1e-9), (
                f"ipo_loss's gradient with respect to {'pi_w' if sign > 0 else 'pi_l'}, summed={summed}: "
                f"{t.grad[:4].tolist()}..., expected {want[:4].tolist()}...")


def test_rdpo_loss_per_pair_and_finite():
    pi_w, pi_l, ref_w, ref_l, len_w, len_l = logps(seed=4)
    for beta, alpha in ((0.1, 0.0), (0.1, 0.01), (0.5, -0.2)):
        losses = dpo.rdpo_loss(pi_w, pi_l, ref_w, ref_l, len_w, len_l, beta, alpha)
        assert losses.shape == (16,), (
            f"rdpo_loss returns one loss per pair, shape (16,), not {tuple(losses.shape)}")
        for i in range(16):
            z = beta * ((pi_w[i] - ref_w[i]).item() - (pi_l[i] - ref_l[i]).item()) + alpha * (
                len_w[i] - len_l[i]).item()
            want = math.log1p(math.exp(-z))
            assert math.isclose(losses[i].item(), want, rel_tol=1e-9), (
                f"rdpo_loss at beta {beta}, alpha {alpha}, pair {i}: {losses[i].item():.6f}, "
                f"-log sigmoid(beta Delta + alpha (|y_w| - |y_l|)) is {want:.6f}")
    zero = torch.zeros(2, dtype=torch.float64)
    margins = torch.tensor([-1e4, 1e4], dtype=torch.float64)
    big = dpo.rdpo_loss(margins, zero, zero, zero, zero, zero, 1.0, 0.0)
    assert torch.allclose(big, torch.tensor([1e4, 0.0], dtype=torch.float64)), (
        f"rdpo_loss at margins -1e4 and 1e4 (beta 1, alpha 0): {big.tolist()}, expected [1e4, 0]")
