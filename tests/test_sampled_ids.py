"""The label stage keeps the token ids pi_ref sampled, and their behaviour log-probs are those of the
distribution they were drawn from; dpo.py trains on those ids. With a byte-level BPE tokenizer (built here) a
text has many token sequences, and decoding a sample then encoding the text again need not give back the
sampled one."""
import json
import math
import os

import pytest
import torch

import dpo
import policy
import reward
import sft
import toy_tldr

MAX_PROMPT, MAX_RESPONSE, NUM_PROMPTS = 128, 16, 100


def build_bpe_tokenizer(texts, vocab_size=400, pythia=False):
    """A byte-level BPE tokenizer (GPT-2's scheme, as Pythia's) trained on `texts`; <pad>, <bos>, <eos>, or as
    Pythia ships its own (pythia=True): one special token, <|endoftext|>, for BOS, EOS and unknown; no pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|endoftext|>"] if pythia else ["<pad>", "<bos>", "<eos>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    if pythia:
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=special[0], eos_token=special[0],
                                       unk_token=special[0])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>")


@pytest.fixture(scope="module")
def bpe_world(tmp_path_factory):
    """A toy world, and a tiny GPT-NeoX pi_ref with a byte-level BPE tokenizer saved as sft.py saves one.

    pi_ref is random, but for one thing: the final layer norm's first channel is a constant 1, and the output
    layer reads it as a bias toward EOS: at temperature 0.7 and 1.3 enough samples end for 40-50 pairs."""
    root = tmp_path_factory.mktemp("bpe")
    world = toy_tldr.Args(out_dir=str(root / "world"), num_sft=120, num_human_pairs=8, num_eval=8)
    toy_tldr.main(world)
    rows = [json.loads(line) for line in open(root / "world" / "sft.jsonl")]
    tokenizer = build_bpe_tokenizer([r["prompt"] + " " + r["completion"] for r in rows])
    torch.manual_seed(0)
    model = policy.load_causal_lm(sft.Args(n_layer=1, n_embd=32, n_head=2, max_prompt_len=MAX_PROMPT,
                                           max_response_len=MAX_RESPONSE), tokenizer)
    with torch.no_grad():
        model.gpt_neox.final_layer_norm.weight[0] = 0.0
        model.gpt_neox.final_layer_norm.bias[0] = 1.0
        model.get_output_embeddings().weight[:, 0] = 0.0
        model.get_output_embeddings().weight[tokenizer.eos_token_id, 0] = 4.5
    model.save_pretrained(root / "sft")
    tokenizer.save_pretrained(root / "sft")
    return root


def label(root, temperature):
    """reward.py --mode label on the BPE pi_ref at `temperature`: (its rows, its args)."""
    out = root / f"prefs_t{temperature:g}"
    args = reward.Args(mode="label", sft_path=str(root / "sft"), data=str(root / "world"), out_dir=str(out),
                       num_prompts=NUM_PROMPTS, temperature=temperature, max_prompt_len=MAX_PROMPT,
                       max_response_len=MAX_RESPONSE, truncate_prompts=True, sample_batch_size=16)
    if not out.exists():
        reward.main(args)
    return [json.loads(line) for line in open(out / "train.jsonl")], args


@pytest.fixture(scope="module")
def pi_ref(bpe_world):
    return policy.load_policy(str(bpe_world / "sft")).eval(), policy.load_tokenizer(str(bpe_world / "sft"))


def prompt_ids(tokenizer, prompt):
    return policy.encode_prompts(tokenizer, [prompt], MAX_PROMPT, truncate_prompts=True)[0]


@torch.no_grad()
def full_forward_logps(model, prompt, response, temperature=1.0, banned=()):
    """sum_t log p(response_t), p = softmax((logits, banned ids at -inf) / temperature), written out: one full
    forward of prompt + response without cache or padding, the softmax over the allowed tokens in float64."""
    logits = model(input_ids=torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1].double()
    allowed = torch.ones(logits.shape[-1], dtype=torch.bool)
    allowed[list(banned)] = False
    total = 0.0
    for z, token in zip(logits, response):
        assert allowed[token]
        z = z[allowed] / temperature
        e = torch.exp(z - z.max())
        total += math.log((e[allowed[:token].sum()] / e.sum()).item())  # the token's place among the allowed
    return total


def test_decoding_and_encoding_again_does_not_give_the_sampled_ids(bpe_world, pi_ref):
    """(a) the test is meaningful: for many pairs, the text re-encoded is another token sequence."""
    rows, args = label(bpe_world, 1.3)
    _, tokenizer = pi_ref
    assert len(rows) >= 5
    changed = 0
    for r in rows:
        for side in ("chosen", "rejected"):
            ids = r[f"{side}_ids"]
            assert ids[-1] == tokenizer.eos_token_id and len(ids) <= MAX_RESPONSE
            assert policy.decode_response(tokenizer, ids) == (r[side], True)
            again = policy.encode(tokenizer, r["prompt"], r[side], MAX_PROMPT, MAX_RESPONSE, True)[1]
            changed += again != ids
    assert changed >= len(rows) // 2


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_label_keeps_the_sampled_ids_and_the_log_probs_they_were_drawn_with(bpe_world, pi_ref, temperature):
    """(b) the rows' ids are what policy.sample drew (same seed), (d) their behaviour log-probs are those of
    softmax((logits, suppressed ids at -inf) / T), against a full forward with the softmax written out."""
    rows, args = label(bpe_world, temperature)
    model, tokenizer = pi_ref
    world = [json.loads(line) for line in open(bpe_world / "world" / "sft.jsonl")]
    prompts = list(dict.fromkeys(r["prompt"] for r in world))[:NUM_PROMPTS]  # the label stage's prompts
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    drawn, logps = policy.sample(model, [i for i in ids for _ in range(2)], tokenizer.eos_token_id,
                                 tokenizer.pad_token_id, MAX_RESPONSE, temperature, 16,
                                 torch.Generator().manual_seed(args.seed),
                                 suppress_ids=policy.banned_ids(tokenizer), logps_of="sampler")
    banned = policy.banned_ids(tokenizer)
    assert banned and tokenizer.eos_token_id not in banned
    for r in rows:
        i = prompts.index(r["prompt"])
        pair = {tuple(drawn[2 * i]): logps[2 * i], tuple(drawn[2 * i + 1]): logps[2 * i + 1]}
        for side in ("chosen", "rejected"):
            ids_, logp = r[f"{side}_ids"], r[f"{side}_behaviour_logp"]
            assert pair[tuple(ids_)] == logp
            by_hand = full_forward_logps(model, prompt_ids(tokenizer, r["prompt"]), ids_, temperature, banned)
            assert logp == pytest.approx(by_hand, rel=1e-6, abs=1e-5)  # float32 sums of ~-90 nats
            # the check has teeth: the temperature-1 policy gives another number
            plain = full_forward_logps(model, prompt_ids(tokenizer, r["prompt"]), ids_)
            assert abs(plain - logp) > 1e-3


@torch.no_grad()
def test_greedy_samples_have_behaviour_log_prob_zero(bpe_world, pi_ref):
    model, tokenizer = pi_ref
    prompts = [prompt_ids(tokenizer, "SUBREDDIT: r/test TITLE: a b POST: c d TL;DR:")] * 2
    _, logps = policy.sample(model, prompts, tokenizer.eos_token_id, tokenizer.pad_token_id, 5, 0,
                             logps_of="sampler")
    assert logps == [0.0, 0.0]
    with pytest.raises(ValueError):
        policy.sample(model, prompts, tokenizer.eos_token_id, tokenizer.pad_token_id, 5, logps_of="ref")


def test_dpo_trains_on_the_sampled_ids(bpe_world, pi_ref, tmp_path):
    """(c) dpo.py's pairs are the rows' ids, and its reference log-probs are teacher forcing of those ids, not
    of the re-encoded text."""
    rows, _ = label(bpe_world, 1.3)
    model, tokenizer = pi_ref
    args = dpo.Args(sft_path=str(bpe_world / "sft"), data=str(bpe_world / "prefs_t1.3"),
                    max_prompt_len=MAX_PROMPT, max_response_len=MAX_RESPONSE, truncate_prompts=True,
                    runs_dir=str(tmp_path / "runs"), batch_size=4, num_epochs=0.5, num_checkpoints=0)
    loaded, pairs = dpo.load_pairs(args, tokenizer)
    assert [(c[1], r[1]) for c, r in pairs] == [(r["chosen_ids"], r["rejected_ids"]) for r in rows]
    ref_w, ref_l = dpo.reference_logps(model, pairs, tokenizer.pad_token_id, torch.device("cpu"),
                                       torch.autocast("cpu", enabled=False), 16, 8)
    moved = 0
    for r, w, lo in zip(rows, ref_w.tolist(), ref_l.tolist()):
        prompt = prompt_ids(tokenizer, r["prompt"])
        for side, ref in (("chosen", w), ("rejected", lo)):
            assert ref == pytest.approx(full_forward_logps(model, prompt, r[f"{side}_ids"]), abs=1e-4)
            text_ids = policy.encode(tokenizer, r["prompt"], r[side], MAX_PROMPT, MAX_RESPONSE, True)[1]
            if text_ids != r[f"{side}_ids"]:
                moved += abs(ref - full_forward_logps(model, prompt, text_ids)) > 1e-3
    assert moved >= 1
    out = dpo.train(args)  # and the whole run goes through on them
    assert len(open(os.path.join(out, "train_log.jsonl")).readlines()) >= 1


def test_ids_of_another_tokenizer_fall_back_to_the_text(bpe_world, pi_ref, tmp_path):
    """A row whose ids are not this tokenizer's ids of its text (an id past the vocabulary, or a text edited
    after labelling) is encoded from its text; rows without ids columns are encoded as before."""
    rows, args = label(bpe_world, 1.3)
    _, tokenizer = pi_ref
    edited = [dict(r) for r in rows]
    edited[0]["chosen_ids"] = edited[0]["chosen_ids"][:-1] + [len(tokenizer)]
    edited[1]["rejected"] = edited[1]["rejected"] + " extra"
    pairs = policy.encode_pairs(tokenizer, edited, args, "test")
    as_text = policy.encode_pairs(tokenizer, [{k: r[k] for k in ("prompt", "chosen", "rejected")}
                                              for r in edited], args, "test")
    assert pairs[0][0] == as_text[0][0] and pairs[1][1] == as_text[1][1]
    assert pairs[0][1][1] == rows[0]["rejected_ids"] and pairs[1][0][1] == rows[1]["chosen_ids"]
    assert [p[0][1] for p in pairs[2:]] == [r["chosen_ids"] for r in rows[2:]]


@pytest.mark.parametrize("value", ["1 2 3", [], [3, -1], [2.5], [True], None])
def test_a_malformed_ids_column_gives_one_line(bpe_world, tmp_path, value):
    rows, _ = label(bpe_world, 1.3)
    bad = [dict(r) for r in rows]
    bad[1]["rejected_ids"] = value
    toy_tldr.write_jsonl(tmp_path / "bad.jsonl", bad)
    args = dpo.Args(sft_path=str(bpe_world / "sft"), data=str(tmp_path / "bad.jsonl"),
                    runs_dir=str(tmp_path / "runs"), max_prompt_len=MAX_PROMPT, truncate_prompts=True)
    with pytest.raises(SystemExit) as e:
        dpo.train(args)
    message = str(e.value)
    assert message.startswith("error:") and "row 2" in message and "'rejected_ids'" in message
    assert "\n" not in message and not (tmp_path / "runs").exists()
