"""Exercise 1: sft.completion_loss, the SFT loss (METHOD.md, section 3), and lm.sequence_logps_plain, log
pi(y|x) by its definition (METHOD.md, section 2). Graded against the definition: each example alone, the
log-probs of its response tokens (EOS included, prompt and padding never); the loss pools all response tokens
of the batch into one mean, the log-probs sum per row."""
import torch

from course.graded import graded_common as common
import lm
import sft


def token_logps(model, rows):
    return [common.next_token_logps(model, p, r).gather(1, torch.tensor(r)[:, None]).squeeze(1)
            for p, r in rows]


def batch_and_expected(n, seed, pad=common.PAD):
    model, rows = common.tiny_model(0, pad), common.examples(n, seed)
    expected = -torch.cat(token_logps(model, rows)).sum() / sum(len(r) for _, r in rows)
    return model, lm.collate(rows, pad), expected


def test_a_scalar_the_mean_over_every_response_token_of_the_batch():
    for seed in range(3):
        model, batch, expected = batch_and_expected(10, seed)
        loss = sft.completion_loss(model, batch)
        assert loss.shape == (), f"completion_loss returns one scalar, not shape {tuple(loss.shape)}"
        assert torch.allclose(loss.double(), expected, rtol=1e-5, atol=1e-6), (
            f"completion_loss, batch seed {seed}: {loss.item():.6f}, the mean over every response token "
            f"(EOS included, prompt and padding not) is {expected.item():.6f}")


def test_eos_is_a_target_when_pad_is_eos():
    """Pythia pads with EOS: a response's final EOS is still a target (response_mask says what counts)."""
    for seed in range(2):
        model, batch, expected = batch_and_expected(10, seed, pad=common.EOS)
        loss = sft.completion_loss(model, batch)
        assert torch.allclose(loss.double(), expected, rtol=1e-5, atol=1e-6), (
            f"completion_loss with pad = EOS, batch seed {seed}: {loss.item():.6f}, expected "
            f"{expected.item():.6f} (the final EOS is a target: response_mask says which tokens count)")


def test_one_example_alone_and_order_of_rows():
    model, rows = common.tiny_model(0), common.examples(8, seed=5)
    p, r = rows[0]
    alone = -common.next_token_logps(model, p, r).gather(1, torch.tensor(r)[:, None]).mean()
    one = sft.completion_loss(model, lm.collate(rows[:1], common.PAD)).double()
    assert torch.allclose(one, alone, rtol=1e-5), (
        f"completion_loss of one example alone: {one.item():.6f}, its mean token NLL is {alone.item():.6f}")
    forward = sft.completion_loss(model, lm.collate(rows, common.PAD))
    backward = sft.completion_loss(model, lm.collate(rows[::-1], common.PAD))
    assert torch.allclose(forward, backward, rtol=1e-5), (
        f"completion_loss depends on the order of the rows: {forward.item():.6f} and {backward.item():.6f}")


def test_gradient_equals_the_definitions():
    model, batch, _ = batch_and_expected(9, seed=7)
    params = [model.get_output_embeddings().weight, model.get_input_embeddings().weight]
    grads = torch.autograd.grad(sft.completion_loss(model, batch), params)
    _, _, expected = batch_and_expected(9, seed=7)
    expected_grads = torch.autograd.grad(expected, params)
    for name, g, e in zip(("output layer", "input embedding"), grads, expected_grads):
        assert torch.allclose(g.double(), e, rtol=1e-4, atol=1e-7), (
            f"completion_loss's gradient of the {name}'s weight differs from the definition's: largest "
            f"difference {(g.double() - e).abs().max().item():.3g}")


def test_sequence_logps_plain_sums_each_rows_response():
    for pad in (common.PAD, common.EOS):
        model, rows = common.tiny_model(0, pad), common.examples(9, seed=11)
        logps, lengths = lm.sequence_logps_plain(model, lm.collate(rows, pad))
        assert logps.shape == (9,), f"sequence_logps_plain: logps of shape (9,), not {tuple(logps.shape)}"
        assert lengths.tolist() == [len(r) for _, r in rows], (
            f"sequence_logps_plain's lengths {lengths.tolist()}, the responses' (EOS included): "
            f"{[len(r) for _, r in rows]}")
        expected = torch.stack([t.sum() for t in token_logps(model, rows)])
        assert torch.allclose(logps.double(), expected, rtol=1e-6, atol=1e-8), (
            f"sequence_logps_plain with pad id {pad}: {logps.tolist()}, each row's sum of its response "
            f"tokens' log-probs: {expected.tolist()}")
