"""Exercise 1: sft.completion_loss, the SFT loss (METHOD.md, section 3), and lm.sequence_logps_plain, log
pi(y|x) by its definition (METHOD.md, section 2). Graded by values and properties: on a model whose
next-token distribution after each token is a table of powers of 2 (common.table_model), every log-prob is a
whole number of bits, so each loss below is a count of bits written out by hand (EOS a target, prompt and
padding never); on a random tiny model, the batch's loss pools its rows' tokens (each row alone, weighted by
its length), the order of the rows does not matter, and the gradient is the loss's finite differences."""
import math

import torch

from course.graded import graded_common as common
import lm
import sft

A, B, EOS = 2, 3, common.EOS
LN2 = math.log(2)
# pi(. | previous token) over (PAD, EOS, A, B), the previous token PAD, EOS, A, B in turn
POLICY = [[1 / 4, 1 / 4, 1 / 4, 1 / 4], [1 / 2, 1 / 8, 1 / 8, 1 / 4], [1 / 8, 1 / 4, 1 / 8, 1 / 2],
          [1 / 8, 1 / 8, 1 / 2, 1 / 4]]
# -log2 pi of each response token: row 0: A after B 1, EOS after A 2 (3 bits in 2 tokens); row 1: B after B
# 2, A after B 1, B after A 1, EOS after B 3 (7 bits in 4 tokens); row 2: EOS after A 2 (2 bits in 1 token)
ROWS = [([A, B], [A, EOS]), ([B], [B, A, B, EOS]), ([A, A, A], [EOS])]
BITS, TOKENS = [3, 7, 2], [2, 4, 1]


def test_a_scalar_the_mean_over_every_response_token_of_the_batch():
    model = common.table_model(POLICY)
    for rows, bits, tokens in ((ROWS, 12, 7), (ROWS[:2], 10, 6), (ROWS[1:], 9, 5), (ROWS[::2], 5, 3)):
        loss = sft.completion_loss(model, lm.collate(rows, common.PAD))
        assert loss.shape == (), f"completion_loss returns one scalar, not shape {tuple(loss.shape)}"
        want = bits / tokens * LN2
        assert math.isclose(loss.item(), want, rel_tol=1e-5), (
            f"completion_loss on {rows}: {loss.item():.6f}, the mean over every response token (EOS "
            f"included, prompt and padding not) is {bits} bits / {tokens} tokens = {want:.6f}")
    for seed in range(3):
        model, rows = common.tiny_model(0), common.examples(10, seed)
        loss = sft.completion_loss(model, lm.collate(rows, common.PAD)).item()
        alone = [sft.completion_loss(model, lm.collate([row], common.PAD)).item() for row in rows]
        pooled = sum(len(r) * x for (_, r), x in zip(rows, alone)) / sum(len(r) for _, r in rows)
        assert math.isclose(loss, pooled, rel_tol=1e-5), (
            f"completion_loss, batch seed {seed}: {loss:.6f}, but its rows alone, each weighted by its "
            f"number of response tokens, give {pooled:.6f}: one mean over every response token of the batch, "
            "padding never counted")


def test_eos_is_a_target_when_pad_is_eos():
    """Pythia pads with EOS: a response's final EOS is still a target (response_mask says what counts)."""
    loss = sft.completion_loss(common.table_model(POLICY, pad=EOS), lm.collate(ROWS, EOS))
    assert math.isclose(loss.item(), 12 / 7 * LN2, rel_tol=1e-5), (
        f"completion_loss with pad = EOS: {loss.item():.6f}, expected 12 bits / 7 tokens = "
        f"{12 / 7 * LN2:.6f} (the final EOS is a target: response_mask says which tokens count)")
    for seed in range(2):
        model, rows = common.tiny_model(0, common.EOS), common.examples(10, seed)
        loss = sft.completion_loss(model, lm.collate(rows, EOS)).item()
        alone = [sft.completion_loss(model, lm.collate([row], EOS)).item() for row in rows]
        pooled = sum(len(r) * x for (_, r), x in zip(rows, alone)) / sum(len(r) for _, r in rows)
        assert math.isclose(loss, pooled, rel_tol=1e-5), (
            f"completion_loss with pad = EOS, batch seed {seed}: {loss:.6f}, its rows alone pooled give "
            f"{pooled:.6f}")


def test_one_example_alone_and_order_of_rows():
    model = common.table_model(POLICY)
    for row, bits, tokens in zip(ROWS, BITS, TOKENS):
        one = sft.completion_loss(model, lm.collate([row], common.PAD)).item()
        assert math.isclose(one, bits / tokens * LN2, rel_tol=1e-5), (
            f"completion_loss of {row} alone: {one:.6f}, its mean token NLL is {bits} bits / {tokens} tokens "
            f"= {bits / tokens * LN2:.6f}")
    model, rows = common.tiny_model(0), common.examples(8, seed=5)
    forward = sft.completion_loss(model, lm.collate(rows, common.PAD))
    backward = sft.completion_loss(model, lm.collate(rows[::-1], common.PAD))
    assert torch.allclose(forward, backward, rtol=1e-5), (
        f"completion_loss depends on the order of the rows: {forward.item():.6f} and {backward.item():.6f}")


def test_gradient_equals_finite_differences():
    """Along a random direction of the output layer's and the input embedding's weights, the gradient equals
    the central difference (L(w + eps d) - L(w - eps d)) / (2 eps), to float32's precision."""
    model, rows = common.tiny_model(0), common.examples(9, seed=7)
    batch = lm.collate(rows, common.PAD)
    g = torch.Generator().manual_seed(0)
    for name, weight in (("output layer", model.get_output_embeddings().weight),
                         ("input embedding", model.get_input_embeddings().weight)):
        direction = torch.randn(weight.shape, generator=g, dtype=weight.dtype)
        direction /= direction.norm()
        (grad,) = torch.autograd.grad(sft.completion_loss(model, batch), [weight])
        saved, eps, values = weight.detach().clone(), 1e-3, []
        with torch.no_grad():
            for step in (eps, -eps):
                weight.copy_(saved + step * direction)
                values.append(sft.completion_loss(model, batch).double().item())
            weight.copy_(saved)
        numeric, analytic = (values[0] - values[1]) / (2 * eps), (grad.double() * direction).sum().item()
        assert abs(numeric - analytic) <= 1e-3 * max(1.0, abs(numeric)), (
            f"completion_loss's gradient of the {name}'s weight along a random direction: {analytic:.6g}, "
            f"the loss's central difference: {numeric:.6g}")


def test_sequence_logps_plain_sums_each_rows_response():
    for pad in (common.PAD, EOS):
        logps, lengths = lm.sequence_logps_plain(common.table_model(POLICY, pad), lm.collate(ROWS, pad))
        assert logps.shape == (3,), f"sequence_logps_plain: logps of shape (3,), not {tuple(logps.shape)}"
        assert lengths.tolist() == TOKENS, (
            f"sequence_logps_plain's lengths {lengths.tolist()}, the responses' (EOS included): {TOKENS}")
        want = torch.tensor([-b * LN2 for b in BITS], dtype=torch.float64)
        assert torch.allclose(logps.double(), want, rtol=1e-6), (
            f"sequence_logps_plain with pad id {pad}: {logps.tolist()}, each row's sum of its response "
            f"tokens' log-probs: -{BITS} bits = {want.tolist()}")
        model, rows = common.tiny_model(0, pad), common.examples(9, seed=11)
        logps, lengths = lm.sequence_logps_plain(model, lm.collate(rows, pad))
        assert lengths.tolist() == [len(r) for _, r in rows], (
            f"sequence_logps_plain's lengths {lengths.tolist()}, the responses' (EOS included): "
            f"{[len(r) for _, r in rows]}")
        alone = torch.cat([lm.sequence_logps_plain(model, lm.collate([row], pad))[0] for row in rows])
        assert torch.allclose(logps.double(), alone.double(), rtol=1e-6, atol=1e-8), (
            f"sequence_logps_plain with pad id {pad}: {logps.tolist()}, each row alone: {alone.tolist()} "
            "(padding changes no row's log-prob)")
        loss = sft.completion_loss(model, lm.collate(rows, pad)).item()
        mean = -logps.sum().item() / lengths.sum().item()
        assert math.isclose(loss, mean, rel_tol=1e-5), (
            f"completion_loss {loss:.6f} and sequence_logps_plain's -sum(logps) / sum(lengths) {mean:.6f} "
            f"differ (pad id {pad}): both are the response tokens' log-probs")
