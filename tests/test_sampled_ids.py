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
import lm
import reward
import toy_tldr

MAX_PROMPT, MAX_RESPONSE, NUM_PROMPTS = 256, 16, 100


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
    model = lm.new_model(tokenizer, n_layer=1, n_embd=32, n_head=2, max_len=MAX_PROMPT + MAX_RESPONSE)
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
                       max_response_len=MAX_RESPONSE, sample_batch_size=16)
    if not out.exists():
        reward.main(args)
    return [json.loads(line) for line in open(out / "train.jsonl")], args


@pytest.fixture(scope="module")
def pi_ref(bpe_world):
    return lm.load_model(str(bpe_world / "sft")).eval(), lm.load_tokenizer(str(bpe_world / "sft"))


def prompt_ids(tokenizer, prompt):
    return lm.encode_prompts(tokenizer, [{"prompt": prompt}], MAX_PROMPT)[0]


def text_ids(tokenizer, row, side):
    """The ids of a row's response encoded from its text (what a row without <side>_ids gets)."""
    text_row = {"prompt": row["prompt"], side: row[side]}
    return lm.encode(tokenizer, [text_row], side, MAX_PROMPT, MAX_RESPONSE)[0][1]


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
            assert lm.decode_response(tokenizer, ids) == (r[side], True)
            changed += text_ids(tokenizer, r, side) != ids
    assert changed >= len(rows) // 2


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_label_keeps_the_sampled_ids_and_the_log_probs_they_were_drawn_with(bpe_world, pi_ref, temperature):
    """(b) the rows' ids are what lm.sample drew (same seed), (d) their behaviour log-probs are those of
    softmax((logits, suppressed ids at -inf) / T), against a full forward with the softmax written out."""
    rows, args = label(bpe_world, temperature)
    model, tokenizer = pi_ref
    world = [json.loads(line) for line in open(bpe_world / "world" / "sft.jsonl")]
    prompts = list(dict.fromkeys(r["prompt"] for r in world))[:NUM_PROMPTS]  # the label stage's prompts
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    drawn, logps = lm.sample(model, [i for i in ids for _ in range(2)], tokenizer.eos_token_id,
                             tokenizer.pad_token_id, MAX_RESPONSE, temperature, 16,
                             torch.Generator().manual_seed(args.seed),
                             suppress_ids=lm.banned_ids(tokenizer), logps_of="sampler")
    banned = lm.banned_ids(tokenizer)
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
    _, logps = lm.sample(model, prompts, tokenizer.eos_token_id, tokenizer.pad_token_id, 5, 0,
                         logps_of="sampler")
    assert logps == [0.0, 0.0]
    with pytest.raises(ValueError):
        lm.sample(model, prompts, tokenizer.eos_token_id, tokenizer.pad_token_id, 5, logps_of="ref")


def test_dpo_trains_on_the_sampled_ids(bpe_world, pi_ref, tmp_path):
    """(c) dpo.py's pairs are the rows' ids, and its reference log-probs are teacher forcing of those ids, not
    of the re-encoded text."""
    rows, _ = label(bpe_world, 1.3)
    model, tokenizer = pi_ref
    args = dpo.Args(sft_path=str(bpe_world / "sft"), data=str(bpe_world / "prefs_t1.3"),
                    max_prompt_len=MAX_PROMPT, max_response_len=MAX_RESPONSE, logit_chunk=16,
                    runs_dir=str(tmp_path / "runs"), batch_size=4, num_epochs=0.5, num_checkpoints=1)
    loaded, pairs = dpo.load_pairs(args, tokenizer)
    assert [(c[1], r[1]) for c, r in pairs] == [(r["chosen_ids"], r["rejected_ids"]) for r in rows]
    ref_w, ref_l = dpo.reference_logps(args, model, pairs, tokenizer.pad_token_id, torch.device("cpu"))
    moved = 0
    for r, w, lo in zip(rows, ref_w.tolist(), ref_l.tolist()):
        prompt = prompt_ids(tokenizer, r["prompt"])
        for side, ref in (("chosen", w), ("rejected", lo)):
            assert ref == pytest.approx(full_forward_logps(model, prompt, r[f"{side}_ids"]), abs=1e-4)
            again = text_ids(tokenizer, r, side)
            if again != r[f"{side}_ids"]:
                moved += abs(ref - full_forward_logps(model, prompt, again)) > 1e-3
    assert moved >= 1
    out = dpo.train(args)  # and the whole run goes through on them
    assert len(open(os.path.join(out, "train_log.jsonl")).readlines()) >= 1


def test_ids_are_used_as_they_are_and_ids_of_another_tokenizer_are_refused(bpe_world, pi_ref, tmp_path):
    """A row's ids are its tokens, whatever its text says (a text edited after labelling keeps its ids);
    rows without ids columns are encoded from their text; an id past the vocabulary is refused in one line."""
    rows, args = label(bpe_world, 1.3)
    _, tokenizer = pi_ref
    edited = [dict(r) for r in rows]
    edited[1]["rejected"] = edited[1]["rejected"] + " extra"
    toy_tldr.write_jsonl(tmp_path / "x.jsonl", edited)
    args = dpo.Args(data=str(tmp_path / "x.jsonl"), max_prompt_len=MAX_PROMPT, max_response_len=MAX_RESPONSE)
    _, pairs = dpo.load_pairs(args, tokenizer)
    assert [(c[1], r[1]) for c, r in pairs] == [(r["chosen_ids"], r["rejected_ids"]) for r in rows]
    as_text = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in edited]
    assert lm.encode(tokenizer, as_text, "rejected", MAX_PROMPT, MAX_RESPONSE)[1][1] == \
        text_ids(tokenizer, edited[1], "rejected")
    edited[0]["chosen_ids"] = edited[0]["chosen_ids"][:-1] + [len(tokenizer)]
    with pytest.raises(SystemExit, match="^error: .*beyond the tokenizer's .* ids of another tokenizer"):
        lm.encode(tokenizer, edited, "chosen", MAX_PROMPT, MAX_RESPONSE)


def test_label_samples_after_the_prompt_ids_of_its_rows(bpe_world, pi_ref, tmp_path):
    """Prompts prepared as ids (scale/prepare.py's prompt_ids, here cut to their last 40 tokens) are what
    pi_ref samples after: a text prompt of that length would be refused; the pairs carry the prompt ids."""
    _, tokenizer = pi_ref
    world = tmp_path / "world"
    world.mkdir()
    for name in ("eval.jsonl", "prefs_human.jsonl"):
        (world / name).write_text((bpe_world / "world" / name).read_text())
    rows = [json.loads(line) for line in open(bpe_world / "world" / "sft.jsonl")][:30]
    toy_tldr.write_jsonl(world / "sft.jsonl", [{**r, "prompt_ids": prompt_ids(tokenizer, r["prompt"])[-40:]}
                                              for r in rows])
    args = reward.Args(mode="label", sft_path=str(bpe_world / "sft"), data=str(world),
                       out_dir=str(tmp_path / "p"), num_prompts=30, temperature=1.3, max_prompt_len=40,
                       max_response_len=MAX_RESPONSE)
    reward.main(args)
    labelled = [json.loads(line) for line in open(tmp_path / "p" / "train.jsonl")]
    assert labelled
    by_prompt = {r["prompt"]: r for r in rows}
    for r in labelled:
        assert r["prompt_ids"] == prompt_ids(tokenizer, r["prompt"])[-40:] and len(r["prompt_ids"]) == 40
        assert set(r) >= {"chosen_ids", "rejected_ids", "chosen_behaviour_logp", "chosen_true_score"}
        assert r["prompt"] in by_prompt
    with pytest.raises(SystemExit, match="--max_prompt_len 40"):  # the same prompts as text are too long
        lm.encode_prompts(tokenizer, rows[:1], 40)


@pytest.mark.parametrize("value", ["1 2 3", [], [3, -1], [2.5], [True], None])
def test_a_malformed_ids_column_gives_one_line(bpe_world, tmp_path, value):
    rows, _ = label(bpe_world, 1.3)
    bad = [dict(r) for r in rows]
    bad[1]["rejected_ids"] = value
    toy_tldr.write_jsonl(tmp_path / "bad.jsonl", bad)
    args = dpo.Args(sft_path=str(bpe_world / "sft"), data=str(tmp_path / "bad.jsonl"),
                    runs_dir=str(tmp_path / "runs"), max_prompt_len=MAX_PROMPT)
    with pytest.raises(SystemExit) as e:
        dpo.train(args)
    message = str(e.value)
    assert message.startswith("error:") and "row 2" in message and "'rejected_ids'" in message
    assert "\n" not in message and not (tmp_path / "runs").exists()
