"""Exercise 6 (advanced): dpo.ChunkedLogProbs.backward (METHOD.md, section 2): d logp_t / d logits =
onehot(y_t) - softmax(logits), chunk by chunk; graded against autograd on log_softmax written out, and
against finite differences, for chunks smaller and larger than the batch, with and without a bias."""
import torch

import dpo


def tensors(n=23, h=8, v=11, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(v, dtype=torch.float64, generator=g, requires_grad=True) if bias else None
    return hidden, weight, b, torch.randint(0, v, (n,), generator=g), torch.randn(n, dtype=torch.float64,
                                                                                  generator=g)


def by_hand(hidden, weight, bias, targets):
    logits = hidden @ weight.T + (0 if bias is None else bias)
    return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, 1)


def test_gradients_equal_autograd_of_the_definition():
    for bias in (True, False):
        for chunk in (1, 5, 64):
            hidden, weight, b, targets, upstream = tensors(bias=bias, seed=chunk)
            params = [t for t in (hidden, weight, b) if t is not None]
            out = dpo.ChunkedLogProbs.apply(hidden, weight, b, targets, chunk)
            grads = torch.autograd.grad((out * upstream).sum(), params)
            expected = torch.autograd.grad((by_hand(hidden, weight, b, targets) * upstream).sum(), params)
            for got, want in zip(grads, expected):
                assert got.shape == want.shape
                assert torch.allclose(got, want, rtol=1e-9, atol=1e-10), (bias, chunk)


def test_gradient_of_the_hidden_states_alone():
    hidden, weight, b, targets, upstream = tensors(n=9, seed=3)
    weight, b = weight.detach(), b.detach()
    (grad,) = torch.autograd.grad((dpo.ChunkedLogProbs.apply(hidden, weight, b, targets, 4) * upstream).sum(),
                                  [hidden])
    (want,) = torch.autograd.grad((by_hand(hidden, weight, b, targets) * upstream).sum(), [hidden])
    assert torch.allclose(grad, want, rtol=1e-9, atol=1e-10)


def test_finite_differences():
    hidden, weight, b, targets, upstream = tensors(n=8, h=4, v=5, seed=7)
    (dpo.ChunkedLogProbs.apply(hidden, weight, b, targets, 3) * upstream).sum().backward()
    eps = 1e-6
    for tensor in (hidden, weight, b):
        flat = tensor.detach().view(-1)
        for i in range(0, flat.numel(), 2):
            old, values = flat[i].item(), []
            for step in (eps, -eps):
                flat[i] = old + step
                logps = by_hand(hidden.detach(), weight.detach(), b.detach(), targets)
                values.append((logps * upstream).sum())
            flat[i] = old
            assert abs((values[0] - values[1]).item() / (2 * eps) - tensor.grad.view(-1)[i].item()) < 1e-6
