"""Exercise 3: dpo.dpo_loss and dpo.ipo_loss (METHOD.md, section 5): one loss per pair, shape [B], against
the formulas written out pair by pair, and their gradients against the closed forms."""
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
        assert losses.shape == (16,)
        for i in range(16):
            delta = (pi_w[i] - ref_w[i]).item() - (pi_l[i] - ref_l[i]).item()
            assert math.isclose(losses[i].item(), math.log1p(math.exp(-beta * delta)), rel_tol=1e-9)


def test_dpo_loss_gradients():
    for beta in BETAS:
        inputs = [t.requires_grad_(True) for t in logps(seed=1)[:4]]
        dpo.dpo_loss(*inputs, beta).sum().backward()
        pi_w, pi_l, ref_w, ref_l = (t.detach() for t in inputs)
        push = beta * torch.sigmoid(-beta * ((pi_w - ref_w) - (pi_l - ref_l)))  # -dL/dpi_w
        for t, sign in zip(inputs, (-1, 1, 1, -1)):
            assert torch.allclose(t.grad, sign * push, rtol=1e-9, atol=1e-12)


def test_ipo_loss_per_pair_both_forms():
    pi_w, pi_l, ref_w, ref_l, len_w, len_l = logps(seed=2)
    for beta in BETAS:
        for summed in (True, False):
            losses = dpo.ipo_loss(pi_w, pi_l, ref_w, ref_l, len_w, len_l, beta, summed=summed)
            assert losses.shape == (16,)
            for i in range(16):
                n_w, n_l = (1.0, 1.0) if summed else (len_w[i].item(), len_l[i].item())
                delta = (pi_w[i] - ref_w[i]).item() / n_w - (pi_l[i] - ref_l[i]).item() / n_l
                assert math.isclose(losses[i].item(), (delta - 1 / (2 * beta)) ** 2, rel_tol=1e-9)


def test_ipo_loss_gradient():
    pi_w, pi_l, ref_w, ref_l, len_w, len_l = logps(seed=3)
    pi_w.requires_grad_(True)
    beta = 0.1
    dpo.ipo_loss(pi_w, pi_l, ref_w, ref_l, len_w, len_l, beta, summed=False).sum().backward()
    delta = (pi_w.detach() - ref_w) / len_w - (pi_l - ref_l) / len_l
    assert torch.allclose(pi_w.grad, 2 * (delta - 1 / (2 * beta)) / len_w, rtol=1e-9)
