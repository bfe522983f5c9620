"""lm.py: rows and tokens of the canonical form, log pi(y|x) by its definition, and the fused gather tested
equal to it (values and gradients, plain and under autocast)."""
import json

import pytest
import torch

import lm
import toy_tldr

pytestmark = pytest.mark.core


def encode(tokenizer, prompt, response, max_prompt_len=64, max_response_len=24):
    return lm.encode(tokenizer, [{"prompt": prompt, "r": response}], "r", max_prompt_len, max_response_len)[0]

# ---------------------------------------------------------------------------------------------
# the fused log-prob gather


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_logps_equal_naive_values_and_gradients(bias, chunk):
    g = torch.Generator().manual_seed(0)
    n, h, v = 23, 8, 11
    hidden = torch.randn(n, h, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(v, dtype=torch.float64, generator=g, requires_grad=True) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    upstream = torch.randn(n, dtype=torch.float64, generator=g)

    def grads(fn):
        for t in (hidden, weight, b):
            if t is not None:
                t.grad = None
        out = fn()
        (out * upstream).sum().backward()
        return out.detach(), [t.grad.clone() for t in (hidden, weight, b) if t is not None]

    # independent reference: log_softmax written out, in float64
    def by_hand():
        logits = hidden @ weight.T + (b if b is not None else 0)
        return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, 1)

    ref_out, ref_grads = grads(by_hand)
    fused = lambda: lm.ChunkedLogProbs.apply(hidden, weight, b, targets, chunk)  # noqa: E731
    out, fused_grads = grads(fused)
    assert torch.allclose(out, ref_out, atol=1e-12)  # float64 in, float64 out
    for a, r in zip(fused_grads, ref_grads):
        assert torch.allclose(a, r, atol=1e-10, rtol=1e-10)
    naive_out, naive_grads = grads(lambda: lm.gather_logps_naive(hidden, weight, b, targets))
    assert torch.allclose(naive_out.double(), ref_out, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_chunked_logps_under_autocast_match_the_naive_gather_values_and_gradients(dtype, bias):
    """Under autocast (the CUDA path's bf16, or fp16; here on the CPU) the fused gather's forward and backward
    see the same logits, as the naive gather's autograd does: the same values and gradients, and the softmax
    of its backward sums to 1 for every token (the bias gradient of one token's log-prob sums to 0)."""
    g = torch.Generator().manual_seed(3)
    n, h, v = 37, 16, 300
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = (torch.randn(v, h, generator=g) * 2).requires_grad_()  # logits of about +-10: bf16 rounds them
    b = torch.randn(v, generator=g).requires_grad_() if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    upstream = torch.randn(n, generator=g)
    params = [t for t in (hidden, weight, b) if t is not None]
    results = []
    for fn in (lm.gather_logps_naive, lambda *a: lm.ChunkedLogProbs.apply(*a, 8)):
        for t in params:
            t.grad = None
        with torch.autocast("cpu", dtype=dtype):
            out = fn(hidden, weight, b, targets)
        assert out.dtype == torch.float32
        (out * upstream).sum().backward()
        results.append((out.detach(), [t.grad.clone() for t in params]))
    (naive, naive_grads), (fused, fused_grads) = results
    assert torch.allclose(fused, naive, atol=1e-5, rtol=1e-5)
    for a, r in zip(fused_grads, naive_grads):  # the naive weight gradient is a bf16/fp16 matmul: rounded
        assert a.dtype == r.dtype == torch.float32
        assert (a - r).abs().max() <= 1e-2 * r.abs().max()
    if bias:
        for i in range(8):
            b.grad = None
            with torch.autocast("cpu", dtype=dtype):
                lm.ChunkedLogProbs.apply(hidden[i:i + 1], weight, b, targets[i:i + 1], 8).sum().backward()
            assert abs(b.grad.sum()) < 1e-4  # 1 - sum_v softmax_v

def test_chunked_logps_gradcheck():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(6, 4, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(0, 5, (6,), generator=g)
    # output is float32 by design, so check the backward against finite differences of the naive
    # float64 formula instead of torch.autograd.gradcheck on the Function itself
    upstream = torch.randn(6, dtype=torch.float64, generator=g)
    (lm.ChunkedLogProbs.apply(hidden, weight, bias, targets, 4).double() * upstream).sum().backward()
    eps = 1e-6
    for tensor in (hidden, weight, bias):
        flat = tensor.detach().view(-1)
        for i in range(0, flat.numel(), 3):
            old = flat[i].item()
            vals = []
            for delta in (eps, -eps):
                flat[i] = old + delta
                vals.append((lm.gather_logps_naive(hidden.detach(), weight.detach(), bias.detach(),
                                                    targets).double() * upstream).sum().item())
            flat[i] = old
            fd = (vals[0] - vals[1]) / (2 * eps)
            assert abs(fd - tensor.grad.view(-1)[i].item()) < 1e-3


@pytest.fixture(scope="module")
def tiny_model():
    tokenizer = toy_tldr.build_tokenizer()
    torch.manual_seed(0)
    model = lm.new_model(tokenizer, n_layer=1, n_embd=32, n_head=2, max_len=88)
    return model.double(), tokenizer


def toy_examples(tokenizer, n, seed=0):
    import random
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        facts, prompt = toy_tldr.make_post(rng)
        out.append(encode(tokenizer, prompt, toy_tldr.reference_summary(facts, rng)[: rng.randint(1, 60)]))
    return out


def full_forward_logps(model, examples):
    """Independent: each example alone, one full forward, full log_softmax, summed over response positions."""
    out = []
    for p, r in examples:
        logp = model(input_ids=torch.tensor([p + r])).logits.log_softmax(-1)[0, len(p) - 1:-1]
        out.append(logp.gather(-1, torch.tensor(r)[:, None]).sum())
    return torch.stack(out)


def test_plain_logps_match_each_example_alone(tiny_model):
    """The plain definition on a right-padded batch equals one unpadded forward per example."""
    model, tokenizer = tiny_model
    examples = toy_examples(tokenizer, 6)
    plain, lengths = lm.sequence_logps_plain(model, lm.collate(examples, tokenizer.pad_token_id))
    torch.testing.assert_close(plain, full_forward_logps(model, examples), atol=1e-10, rtol=0)
    assert lengths.tolist() == [len(r) for _, r in examples]


def test_fast_logps_equal_the_plain_definition(tiny_model):
    """The fast path (prompt once, chunked output layer; also unchunked) against the plain definition."""
    model, tokenizer = tiny_model
    examples = toy_examples(tokenizer, 6)
    plain, plain_lengths = lm.sequence_logps_plain(model, lm.collate(examples, tokenizer.pad_token_id))
    batch = lm.collate_grouped(examples, tokenizer.pad_token_id)
    fused, lengths = lm.sequence_logps(model, batch, chunk=7)
    torch.testing.assert_close(fused, plain, atol=1e-10, rtol=0)
    assert lengths.tolist() == plain_lengths.tolist()


def test_fast_logps_gradients_equal_the_plain_definition(tiny_model):
    model, tokenizer = tiny_model
    examples = toy_examples(tokenizer, 4, seed=1)
    upstream = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    paths = {"plain": lambda: lm.sequence_logps_plain(model,
                                                       lm.collate(examples, tokenizer.pad_token_id)),
             "fused": lambda: lm.sequence_logps(model,
                                                 lm.collate_grouped(examples, tokenizer.pad_token_id), 5)}
    grads = {}
    for name, logps in paths.items():
        model.zero_grad()
        (logps()[0] * upstream).sum().backward()
        grads[name] = [p.grad.clone() for p in model.parameters()]
    for name in ("fused",):
        for a, b in zip(grads[name], grads["plain"]):
            torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)


def toy_pairs(tokenizer, seed, n):
    """n pairs of two tokenized responses to one toy post each (prefixes of references of random length)."""
    import random
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        facts, prompt = toy_tldr.make_post(rng)
        pairs.append(tuple(encode(tokenizer, prompt,
                                  toy_tldr.reference_summary(facts, rng)[: rng.randint(1, 60)])
                           for _ in range(2)))
    return pairs


def test_pair_logps_share_the_prompt_and_equal_the_plain_definition(tiny_model):
    """Chosen and rejected continue from one prompt pass; values and parameter gradients must be those
    of the plain definition on the chosen and on the rejected responses (prompts of different lengths, so left
    padding is exercised)."""
    model, tokenizer = tiny_model
    pairs = toy_pairs(tokenizer, seed=3, n=4)
    assert len({len(p[0][0]) for p in pairs}) > 1
    upstream = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    model.zero_grad()
    pi_w, pi_l, len_w, len_l = lm.pair_logps(model, pairs, tokenizer.pad_token_id, "cpu", 5)
    (upstream * (pi_w - 0.3 * pi_l)).sum().backward()
    shared = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    plain = [lm.sequence_logps_plain(model, lm.collate([p[k] for p in pairs], tokenizer.pad_token_id))[0]
             for k in (0, 1)]
    ref_w, ref_l = plain
    (upstream * (ref_w - 0.3 * ref_l)).sum().backward()
    torch.testing.assert_close(pi_w.double(), ref_w.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(pi_l.double(), ref_l.detach(), atol=1e-5, rtol=0)
    assert len_w.tolist() == [len(p[0][1]) for p in pairs] and len_l.tolist() == [len(p[1][1]) for p in pairs]
    for a, b in zip(shared, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)




# ---------------------------------------------------------------------------------------------
# the canonical form: rows, tokens


def test_encode_uses_the_rows_token_ids_and_else_the_text_plus_eos():
    tokenizer = toy_tldr.build_tokenizer()
    words = tokenizer("my mom lied to me", add_special_tokens=False)["input_ids"]
    rows = [{"prompt": "TL;DR:", "r": "my mom lied to me"},
            {"prompt": "TL;DR:", "prompt_ids": [5, 6], "r": "anything", "r_ids": [7, 8, 9]}]
    (p0, r0), (p1, r1) = lm.encode(tokenizer, rows, "r", 64, 24)
    assert p0 == tokenizer("TL;DR:", add_special_tokens=False)["input_ids"]
    assert r0 == (tokenizer(" my mom lied to me", add_special_tokens=False)["input_ids"]
                  + [tokenizer.eos_token_id])
    assert r0[:-1] == words  # the word-level tokenizer ignores the leading space
    assert (p1, r1) == ([5, 6], [7, 8, 9])
    assert lm.encode(tokenizer, rows, "r", 64, 2)[1][1] == [7, 8]  # cut at max_response_len


@pytest.mark.parametrize("row,words", [
    ({"prompt": "a " * 80, "r": "x"}, ["80 tokens", "scale.prepare"]),
    ({"prompt": "x", "r": "x", "r_ids": [10 ** 6]}, ["beyond the tokenizer"]),
])
def test_encode_refuses_in_one_line(row, words):
    tokenizer = toy_tldr.build_tokenizer()
    with pytest.raises(SystemExit) as e:
        lm.encode(tokenizer, [row], "r", 64, 24)
    assert str(e.value).startswith("error:") and all(w in str(e.value) for w in words), e.value


@pytest.mark.parametrize("row,words", [
    ({"prompt": "x"}, ["'chosen'", "a string", "scale.prepare"]),
    ({"prompt": "x", "chosen": 3}, ["'chosen'", "a string"]),
    ({"prompt": "x", "chosen": "y", "chosen_ids": [1, -2]}, ["'chosen_ids'", "token ids"]),
    ({"prompt": "x", "chosen": "y", "score": float("nan")}, ["'score'", "finite"]),
])
def test_load_rows_refuses_a_bad_field_with_its_row(tmp_path, row, words):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"prompt": "ok", "chosen": "ok", "score": 1.0}) + "\n"
                    + json.dumps(row) + "\n")
    with pytest.raises(SystemExit) as e:
        lm.load_rows(str(tmp_path), "train.jsonl", ["prompt", "chosen"],
                     numeric=["score"] if "score" in row else [])
    assert "row 2" in str(e.value) and all(w in str(e.value) for w in words), e.value


def test_load_rows_reads_a_file_or_the_directory_holding_it(tmp_path):
    (tmp_path / "sft.jsonl").write_text('{"prompt": "a", "completion": "b"}\n\n')
    assert lm.load_rows(str(tmp_path), "sft.jsonl", ["prompt"]) == [{"prompt": "a", "completion": "b"}]
    assert lm.load_rows(str(tmp_path / "sft.jsonl"), "x", ["completion"])[0]["completion"] == "b"
    for bad in (tmp_path / "missing.jsonl", tmp_path / "data.parquet"):
        bad.touch() if bad.suffix == ".parquet" else None
        with pytest.raises(SystemExit, match="error:"):
            lm.load_rows(str(bad), "sft.jsonl", ["prompt"])


def test_the_whole_path_of_gradient_checkpointing_equals_the_cached_one(tiny_model):
    """Under gradient checkpointing no KV cache is kept: each response runs after its own prompt copy."""
    model, tokenizer = tiny_model
    pairs = toy_pairs(tokenizer, seed=5, n=3)
    batch = lm.collate_grouped([ex for pair in pairs for ex in pair], tokenizer.pad_token_id, k=2)
    cached = lm.sequence_logps(model, batch, 7)[0]
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    try:
        model.train()
        whole = lm.sequence_logps(model, batch, 7)[0]
    finally:
        model.activation_checkpointing_disable()
        model.eval()
    torch.testing.assert_close(whole, cached, atol=1e-9, rtol=0)


def test_sampling_is_teacher_forcing(tiny_model):
    """The summed log-probs `sample` reports for what it drew equal the plain definition on those tokens."""
    model, tokenizer = tiny_model
    prompts = [p for (p, _), _ in toy_pairs(tokenizer, seed=7, n=4)]
    g = torch.Generator().manual_seed(0)
    responses, logps = lm.sample(model, prompts, tokenizer.eos_token_id, tokenizer.pad_token_id, 10,
                                 generator=g)
    plain, _ = lm.sequence_logps_plain(model, lm.collate(list(zip(prompts, responses)),
                                                         tokenizer.pad_token_id))
    torch.testing.assert_close(torch.tensor(logps, dtype=torch.float64), plain.detach(), atol=1e-4, rtol=0)


def test_encode_says_once_how_many_responses_it_cut(capsys):
    tokenizer = toy_tldr.build_tokenizer()
    rows = [{"prompt": "TL;DR:", "r": "my mom lied to me"}, {"prompt": "TL;DR:", "r": "mom"}]
    assert [len(r) for _, r in lm.encode(tokenizer, rows, "r", 64, 3)] == [3, 2]
    assert capsys.readouterr().out == "note: 1 of 2 r responses cut at --max_response_len\n"
    lm.encode(tokenizer, rows, "r", 64, 24)
    assert capsys.readouterr().out == ""
