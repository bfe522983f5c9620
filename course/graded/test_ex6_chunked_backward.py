"""Exercise 6 (advanced): lm.ChunkedLogProbs.backward (METHOD.md, section 2): d logp_t / d logits =
onehot(y_t) - softmax(logits), chunk by chunk; graded against autograd on log_softmax written out, and
against finite differences, for chunks smaller and larger than the batch, with and without a bias, for each
subset of the inputs that asks for a gradient; no tensor larger than a few [chunk, V] blocks; and under
bfloat16 autocast, the logits recomputed in the forward's dtype."""
import torch

from course.graded import graded_common as common
import lm


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
            out = lm.ChunkedLogProbs.apply(hidden, weight, b, targets, chunk)
            grads = torch.autograd.grad((out * upstream).sum(), params)
            expected = torch.autograd.grad((by_hand(hidden, weight, b, targets) * upstream).sum(), params)
            for name, got, want in zip(("hidden", "weight", "bias"), grads, expected):
                assert got.shape == want.shape, (
                    f"the gradient of {name}: shape {tuple(got.shape)}, {name}'s is {tuple(want.shape)}")
                assert torch.allclose(got, want, rtol=1e-9, atol=1e-10), (
                    f"the gradient of {name} (bias={bias}, chunk {chunk}) differs from autograd's: largest "
                    f"difference {(got - want).abs().max().item():.3g}")


def test_only_the_gradients_asked_for():
    """Each of hidden, weight and bias may ask for a gradient alone (a frozen output layer, a frozen model
    under a trained bias, ...): the ones asked for are right, whichever the others are."""
    for asked in ("h", "w", "b", "hb", "wb", "hw"):
        hidden, weight, b, targets, upstream = tensors(n=9, seed=3)
        params = [t.detach().requires_grad_(name in asked) for name, t in zip("hwb", (hidden, weight, b))]
        wanted = [t for t in params if t.requires_grad]
        got = torch.autograd.grad((lm.ChunkedLogProbs.apply(*params, targets, 4) * upstream).sum(), wanted)
        want = torch.autograd.grad((by_hand(*params, targets) * upstream).sum(), wanted)
        for g, e in zip(got, want):
            assert torch.allclose(g, e, rtol=1e-9, atol=1e-10), (
                f"with only {'/'.join(dict(zip('hwb', ('hidden', 'weight', 'bias')))[a] for a in asked)} "
                "asking for a gradient, the gradients differ from autograd's")


def test_never_a_tensor_of_the_whole_batch_times_the_vocabulary():
    n, h, v, chunk = 512, 8, 1000, 16
    hidden, weight, b, targets, upstream = tensors(n=n, h=h, v=v, seed=5)
    out = lm.ChunkedLogProbs.apply(hidden, weight, b, targets, chunk)
    with common.LargestTensor() as largest:
        (out * upstream).sum().backward()
    assert largest.numel <= 4 * chunk * v, (
        f"backward made a tensor of {largest.numel} elements: [chunk, V] = {chunk * v}, [N, V] = {n * v}")


def test_bfloat16_autocast_logits_recomputed_as_the_forward_computed_them():
    """Under autocast the forward's logits are bfloat16 (float32 weights): softmax = exp(logits - the saved
    logsumexp) sums to 1 only on the same bfloat16 logits, so each row of d logp / d logits sums to 0, and
    the bias's gradient sums to 0 over the vocabulary."""
    g = torch.Generator().manual_seed(9)
    n, h, v = 40, 16, 50
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = (3 * torch.randn(v, h, generator=g)).requires_grad_(True)
    b = torch.randn(v, generator=g, requires_grad=True)
    targets, upstream = torch.randint(0, v, (n,), generator=g), torch.rand(n, generator=g) + 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lm.ChunkedLogProbs.apply(hidden, weight, b, targets, 8)
    grads = torch.autograd.grad((out * upstream).sum(), [hidden, weight, b])
    assert [t.dtype for t in grads] == [torch.float32] * 3, (
        f"under bfloat16 autocast the gradients come back in the inputs' dtype (float32), not "
        f"{[t.dtype for t in grads]}")
    assert abs(grads[2].sum().item()) < 1e-3 * upstream.sum().item(), (
        f"under bfloat16 autocast the bias's gradient sums to {grads[2].sum().item():.4g} over the "
        "vocabulary, not 0: recompute the logits in the forward's dtype (ctx.dtype)")
    logits = torch.nn.functional.linear(hidden.bfloat16(), weight.bfloat16(), b.bfloat16()).float()
    definition = logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, 1)
    want = torch.autograd.grad((definition * upstream).sum(), [hidden, weight, b])
    for name, got, e in zip(("hidden", "weight", "bias"), grads, want):
        assert torch.allclose(got, e, rtol=2e-2, atol=2e-2 * e.abs().max().item()), (
            f"under bfloat16 autocast the gradient of {name} differs from the bfloat16 logits' definition: "
            f"largest difference {(got - e).abs().max().item():.3g}")


def test_finite_differences():
    hidden, weight, b, targets, upstream = tensors(n=8, h=4, v=5, seed=7)
    (lm.ChunkedLogProbs.apply(hidden, weight, b, targets, 3) * upstream).sum().backward()
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
            numeric = (values[0] - values[1]).item() / (2 * eps)
            assert abs(numeric - tensor.grad.view(-1)[i].item()) < 1e-6, (
                f"finite differences: element {i} of a {tuple(tensor.shape)} input, the backward gives "
                f"{tensor.grad.view(-1)[i].item():.6g}, the central difference {numeric:.6g}")
