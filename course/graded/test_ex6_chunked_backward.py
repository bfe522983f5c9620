"""Exercise 6 (advanced): lm.ChunkedLogProbs.backward (METHOD.md, section 2): d logp_t / d logits =
onehot(y_t) - softmax(logits), chunk by chunk; graded against the forward's finite differences
(torch.autograd.gradcheck, float64), for chunks smaller and larger than the batch, with and without a bias,
for each subset of the inputs that asks for a gradient; no tensor larger than a few [chunk, V] blocks; and
under bfloat16 autocast, the logits recomputed in the forward's dtype (the bias's gradient sums to 0) and
the gradients within bfloat16's rounding of float32's."""
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


def chunked(chunk, targets):
    """(hidden, weight, bias) -> log-probs through ChunkedLogProbs, chunk by chunk (bias may be None)."""
    return lambda hidden, weight, bias=None: lm.ChunkedLogProbs.apply(hidden, weight, bias, targets, chunk)


def test_gradients_equal_finite_differences():
    """torch.autograd.gradcheck: every column of the Jacobian that the backward gives (each upstream
    gradient a unit vector) against the forward's central differences, in float64."""
    for bias in (True, False):
        for chunk in (1, 4, 64):
            hidden, weight, b, targets, _ = tensors(n=11, h=5, v=7, bias=bias, seed=chunk)
            inputs = [t for t in (hidden, weight, b) if t is not None]
            assert torch.autograd.gradcheck(chunked(chunk, targets), inputs, raise_exception=False), (
                f"the backward's gradients (bias={bias}, chunk {chunk}, {len(targets)} tokens) differ from "
                "the forward's finite differences")


def test_only_the_gradients_asked_for():
    """Each of hidden, weight and bias may ask for a gradient alone (a frozen output layer, a frozen model
    under a trained bias, ...): the ones asked for are right, whichever the others are."""
    for asked in ("h", "w", "b", "hb", "wb", "hw"):
        hidden, weight, b, targets, _ = tensors(n=9, h=5, v=7, seed=3)
        params = [t.detach().requires_grad_(name in asked) for name, t in zip("hwb", (hidden, weight, b))]
        assert torch.autograd.gradcheck(chunked(4, targets), params, raise_exception=False), (
            f"with only {'/'.join(dict(zip('hwb', ('hidden', 'weight', 'bias')))[a] for a in asked)} "
            "asking for a gradient, the gradients differ from the forward's finite differences")


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
    want = torch.autograd.grad((lm.ChunkedLogProbs.apply(hidden, weight, b, targets, 8) * upstream).sum(),
                               [hidden, weight, b])  # float32, no autocast: graded above in float64
    for name, got, e in zip(("hidden", "weight", "bias"), grads, want):
        assert torch.allclose(got, e, rtol=5e-2, atol=5e-2 * e.abs().max().item()), (
            f"under bfloat16 autocast the gradient of {name} differs from float32's by more than bfloat16's "
            f"rounding: largest difference {(got - e).abs().max().item():.3g}")
