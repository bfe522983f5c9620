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
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **{"tie_word_embeddings": False, **config}))
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


def write_pairs(path, examples):
    """A train.jsonl of pairs given as token ids: examples in twos (chosen, rejected) sharing a prompt."""
    with open(path, "w") as f:
        for (p, w), (_, l) in zip(examples[0::2], examples[1::2]):
            f.write(json.dumps({"prompt": "p", "chosen": "w", "rejected": "l", "prompt_ids": p,
                                "chosen_ids": w, "rejected_ids": l}) + "\n")


def test_reference_logps_are_float32_under_bf16(tokenizer, tmp_path):
    """dpo.py --reference_only --precision bf16: log pi_ref of every pair within 1e-3 of a float64
    computation (bf16's rounding alone is about a nat here)."""
    model = tiny_neox(tokenizer)
    model.save_pretrained(tmp_path / "sft")
    tokenizer.save_pretrained(tmp_path / "sft")
    examples = random_examples(tokenizer, 12, k=2)
    write_pairs(tmp_path / "train.jsonl", examples)
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


# ----------------------------------------------------------------------------------------------
# dropout: off when a model is loaded, unless asked for


def test_loaded_models_have_no_dropout_unless_kept(tokenizer, tmp_path):
    """A config with GPT-2-style dropout (0.1): loaded as a policy or a reward model, in training mode, every
    nn.Dropout has p = 0, the config's rates are 0 and two forwards agree; dropout=True keeps it."""
    tiny_neox(tokenizer, attention_dropout=0.1, hidden_dropout=0.1, classifier_dropout=0.1).save_pretrained(
        tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    batch = lm.collate_grouped(random_examples(tokenizer, 4), tokenizer.pad_token_id)
    loaded = {"policy": lm.load_model(str(tmp_path / "m")),
              "reward model": reward.load_reward_model(str(tmp_path / "m"), tokenizer, new_head=True),
              "kept": lm.load_model(str(tmp_path / "m"), dropout=True)}
    for name, model in loaded.items():
        model.train()
        rates = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
        config = [v for k, v in model.config.to_dict().items() if "dropout" in k and isinstance(v, float)]
        forward = reward.reward_scores if name == "reward model" else lambda m, b: lm.sequence_logps(m, b)[0]
        with torch.no_grad():
            a, b = forward(model, batch), forward(model, batch)
        if name == "kept":
            assert set(rates) == {0.1} and not torch.equal(a, b)
        else:
            assert rates and set(rates) == {0.0} and set(config) == {0.0} and torch.equal(a, b), name


def test_dpo_starts_at_its_reference_with_a_dropout_config(tokenizer, tmp_path):
    """dpo.py from a pi_ref whose config has dropout 0.1: at step 0 the policy's log-probs are pi_ref's (the
    first step's implicit rewards are 0 to float rounding); --keep_dropout trains with it (they are not)."""
    tiny_neox(tokenizer, head_scale=1.0, attention_dropout=0.1, hidden_dropout=0.1).save_pretrained(
        tmp_path / "sft")
    tokenizer.save_pretrained(tmp_path / "sft")
    examples = random_examples(tokenizer, 8, k=2)
    write_pairs(tmp_path / "train.jsonl", examples)
    for keep in (False, True):
        out = dpo.train(dpo.Args(sft_path=str(tmp_path / "sft"), data=str(tmp_path / "train.jsonl"),
                                 runs_dir=str(tmp_path / "runs"), run_name=f"keep{keep}", batch_size=8,
                                 num_epochs=1, num_checkpoints=1, beta=1.0, max_prompt_len=64,
                                 max_response_len=64, save_every=0, keep_dropout=keep))
        first = lm.read_jsonl(os.path.join(out, "train_log.jsonl"))[0]
        rewards = abs(first["reward_chosen"]) + abs(first["reward_rejected"])
        assert rewards > 0.1 if keep else rewards < 1e-4, first


# ----------------------------------------------------------------------------------------------
# length-normalised DPO


def test_dpo_norm_by_hand():
    """r_w = -10 - (-12) = 2 over 5 tokens, r_l = -14 - (-11) = -3 over 8: -log sigmoid(0.1 (2/5 + 3/8))."""
    t = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
    args = dpo.Args(loss_type="dpo_norm", beta=0.1)
    losses, _ = dpo.daa_losses(args, t(-10.0), t(-14.0), t(-12.0), t(-11.0), t(5), t(8))
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-0.1 * (0.4 + 0.375))), rel=1e-12)
    dpo.check(dpo.Args(loss_type="dpo_norm", sft_path="."))  # a loss the flag accepts


# ----------------------------------------------------------------------------------------------
# checkpoints in the dtype the model came in


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_checkpoints_keep_the_dtype_the_weights_came_in(tokenizer, tmp_path, dtype):
    """A model stored in float16 / bfloat16 trains in float32 and is saved in its own dtype: the checkpoint
    reloads in it (config.json and the weights), its weights the float32 ones rounded; a model built here
    (the toy's) is saved in float32."""
    from transformers import AutoModelForCausalLM

    tiny_neox(tokenizer, tie_word_embeddings=True).to(dtype).save_pretrained(tmp_path / "in")
    model = lm.load_model(str(tmp_path / "in"))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with torch.no_grad():
        for p in model.parameters():  # an update no float16 / bfloat16 holds
            p.add_(1e-4 * torch.randn_like(p))
    stage.save_pretrained(model, str(tmp_path / "out"), tokenizer)
    assert json.load(open(tmp_path / "out" / "config.json"))["dtype"] == str(dtype)[6:]
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
    theirs = dict(again.named_parameters())
    for name, p in model.named_parameters():
        assert theirs[name].dtype == dtype and torch.equal(theirs[name], p.detach().to(dtype)), name
    assert lm.load_model(str(tmp_path / "out")).stored_dtype == dtype
    toy = lm.new_model(tokenizer, 1, 16, 2, 32)
    stage.save_pretrained(toy, str(tmp_path / "toy"))
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "toy", dtype="auto").dtype == torch.float32


# ----------------------------------------------------------------------------------------------
# the online sampler bans what the others ban


def test_rloo_never_samples_a_padded_vocabulary_id(tokenizer):
    """A padded output layer (8 rows past the tokenizer, as Pythia's) whose padding rows win every argmax:
    extras/rloo.py's samples still hold tokenizer ids only."""
    from extras import rloo

    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=len(tokenizer) + 8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, eos_token_id=tokenizer.eos_token_id))
    with torch.no_grad():  # a constant channel, read by the output layer as a bias toward the padding rows
        model.gpt_neox.final_layer_norm.weight[0] = 0.0
        model.gpt_neox.final_layer_norm.bias[0] = 1.0
        model.get_output_embeddings().weight[:, 0] = 0.0
        model.get_output_embeddings().weight[len(tokenizer):, 0] = 20.0
    prompts = [("p", ids) for ids, _ in random_examples(tokenizer, 4)]
    run = SimpleNamespace(model=model, tokenizer=tokenizer, generator=torch.Generator().manual_seed(0))
    responses = rloo.sample_responses(SimpleNamespace(max_response_len=12), run, prompts, 2)
    assert max(max(r) for r in responses) < len(tokenizer)
