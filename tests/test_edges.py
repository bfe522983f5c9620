"""Correct at the edges: what bf16 autocast may and may not round (pi_ref's log-probs, the reward model's
score, the KL), dropout off on a loaded model, the length-normalised DPO loss, checkpoints in the dtype the
model came in, and the online sampler's banned ids. CPU bf16 autocast stands in for a GPU's."""
import copy
import json
import math
import os
import random
from types import SimpleNamespace

import pytest
import torch

import dpo
import evaluate
import lm
import reward
import stage
import toy_tldr

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def tiny_neox(tokenizer, seed=0, head_scale=40.0, **config):
    """A random tiny GPT-NeoX whose output layer is scaled up to logits of a trained model's size (a random
    model's are near 0, where bf16 rounds little)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=256, max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
        **config))
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(head_scale)
    return model.eval()


def random_examples(tokenizer, n, seed=0, k=1):
    """n groups of k (prompt ids, response ids) sharing a prompt, random ids of ordinary words."""
    rng = random.Random(seed)
    words = range(len(tokenizer.all_special_ids) + 2, len(tokenizer))
    out = []
    for _ in range(n):
        prompt = rng.choices(words, k=rng.randint(5, 20))
        out += [(prompt, rng.choices(words, k=rng.randint(3, 20)) + [tokenizer.eos_token_id])
                for _ in range(k)]
    return out


@pytest.fixture(scope="module")
def tokenizer():
    return toy_tldr.build_tokenizer()


# ----------------------------------------------------------------------------------------------
# bf16: the numbers a stage keeps (pi_ref's log-probs, a score, the KL) are float32


def test_reference_logps_are_float32_under_bf16(tokenizer, tmp_path):
    """dpo.py --reference_only --precision bf16: log pi_ref of every pair within 1e-3 of a float64
    computation (bf16's rounding alone is about a nat here)."""
    model = tiny_neox(tokenizer)
    model.save_pretrained(tmp_path / "sft")
    tokenizer.save_pretrained(tmp_path / "sft")
    examples = random_examples(tokenizer, 12, k=2)
    with open(tmp_path / "train.jsonl", "w") as f:
        for (p, w), (_, l) in zip(examples[0::2], examples[1::2]):
            f.write(json.dumps({"prompt": "p", "chosen": "w", "rejected": "l", "prompt_ids": p,
                                "chosen_ids": w, "rejected_ids": l}) + "\n")
    dpo.train(dpo.Args(sft_path=str(tmp_path / "sft"), data=str(tmp_path / "train.jsonl"), precision="bf16",
                       reference_only=True, batch_size=4, max_prompt_len=64, max_response_len=64))
    saved = torch.load(tmp_path / "reference_logps.pt", weights_only=True)["logps"]
    with torch.no_grad():
        exact = lm.pair_logps(copy.deepcopy(model).double(), list(zip(examples[0::2], examples[1::2])),
                              tokenizer.pad_token_id, "cpu", 64)
        with torch.autocast(**BF16):
            rounded = lm.pair_logps(model, list(zip(examples[0::2], examples[1::2])), tokenizer.pad_token_id,
                                    "cpu", 64)
    bf16_error = max((rounded[i].double() - exact[i]).abs().max().item() for i in (0, 1))
    error = max((saved[i].double() - exact[i]).abs().max().item() for i in (0, 1))
    assert bf16_error > 0.05 and error < 1e-3, (bf16_error, error)


def test_reward_score_head_is_float32_under_bf16(tokenizer):
    """reward.reward_scores under bf16 autocast: the body may round, the head does not. Its scores are within
    1e-5 of a float64 head on the same hidden states (a bf16 head: 8 bits, scores of a few units in steps of
    1/64, ties), and closer to a float64 model's than a bf16 head's are."""
    from transformers import GPTNeoXConfig, GPTNeoXForSequenceClassification

    torch.manual_seed(0)
    model = GPTNeoXForSequenceClassification(GPTNeoXConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=256, max_position_embeddings=128, num_labels=1)).eval()
    with torch.no_grad():
        model.score.weight.mul_(20)  # scores of a few units
    batch = lm.collate_grouped(random_examples(tokenizer, 32), tokenizer.pad_token_id)
    seen = []
    with torch.no_grad():
        exact = reward.reward_scores(copy.deepcopy(model).double(), batch)
        model.score.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0]))
        with torch.autocast(**BF16):
            got = reward.reward_scores(model, batch)
            bf16_head = model.score(seen[0]).squeeze(-1)
    head_exact = (seen[0].double() @ model.score.weight.double().T).squeeze(-1)
    assert got.dtype == torch.float32 and bf16_head.dtype == torch.bfloat16
    assert (got.double() - head_exact).abs().max() < 1e-5
    assert (bf16_head.double() - head_exact).abs().max() > 1e-3
    assert (got.double() - exact).abs().max() < (bf16_head.double() - exact).abs().max()
    assert len(set(got.tolist())) == len(got) > len(set(bf16_head.tolist()))  # bf16's ties, none here


def test_sequence_kl_is_float32_under_bf16(tokenizer):
    """evaluate.sequence_kl under bf16 autocast: within 1e-4 of float64 (bf16 logits' rounding alone gives a
    KL of 0.01s between two models that are one)."""
    policy, ref = tiny_neox(tokenizer, seed=0), tiny_neox(tokenizer, seed=0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    examples = random_examples(tokenizer, 16)
    with torch.no_grad():
        exact = evaluate.sequence_kl(copy.deepcopy(policy).double(), copy.deepcopy(ref).double(), examples,
                                     tokenizer.pad_token_id)
        with torch.autocast(**BF16):
            got = evaluate.sequence_kl(policy, ref, examples, tokenizer.pad_token_id)
            same = evaluate.sequence_kl(ref, ref, examples, tokenizer.pad_token_id)
    assert (got.double() - exact).abs().max() < 1e-4 * max(1.0, exact.abs().max().item()), (got, exact)
    assert same.abs().max() < 1e-5
