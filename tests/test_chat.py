"""Conversational (chat-template) data through the core, on stand-ins built here (no download): a tiny base
Llama saved in bfloat16 with a byte-level BPE tokenizer that has Llama-3's special tokens and adds BOS itself,
as Llama-3's does, and no chat template (Llama-3's is given to scale/prepare.py with --chat_template); data in
the hub data sets' schemas (tests/test_prepare.py's builders): HuggingFaceH4/ultrachat_200k,
HuggingFaceH4/ultrafeedback_binarized and trl-lib/ultrafeedback_binarized (implicit prompt).

scale/prepare.py turns them into the canonical form first (its own checks -- the template's split, BOS once,
truncation inside the turns, bad conversations -- are in tests/test_prepare.py); here the stages train on the
prepared rows: the SFT loss is the NLL of the reply, and the whole chain runs on conversations.
"""
import json

import pytest
import torch

import lm
import sft
from scale import data, prepare
from test_prepare import (EOT, TEMPLATE, by_hand, conversations, h4_feedback_rows, save_llama3_tokenizer,
                          trl_feedback_rows, ultrachat_rows, write_snapshot)

MAX_PROMPT, MAX_RESPONSE = 128, 12


def save_tiny_llama(directory, texts):
    """A tiny base Llama (no chat template) saved in bfloat16 with a tokenizer trained on `texts`, whose
    replies end soon: the residual stream's channel 0 is a constant that the output layer reads as a bias
    toward <|eot_id|>. Its tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    save_llama3_tokenizer(directory, texts)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    eot = tokenizer.convert_tokens_to_ids(EOT)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0] = 0.0
            layer.mlp.down_proj.weight[0] = 0.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[eot, 0] = 0.6
    model.to(torch.bfloat16).save_pretrained(directory)
    return tokenizer


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    """The data sets, and the tiny base Llama (save_tiny_llama)."""
    import datasets

    root = tmp_path_factory.mktemp("chat")
    train, test = conversations(0, 40), conversations(1, 8)
    chats = train + conversations(2, 8, turns=2)
    write_snapshot(root / "ultrachat_200k",
                   {"train_sft": ultrachat_rows(chats), "test_sft": ultrachat_rows(test)})
    write_snapshot(root / "ultrafeedback_binarized", {"train_prefs": h4_feedback_rows(train),
                                                      "test_prefs": h4_feedback_rows(test)})
    datasets.Dataset.from_list(trl_feedback_rows(train)).to_parquet(str(root / "trl_feedback.parquet"))
    (root / "llama3.jinja").write_text(TEMPLATE)
    save_tiny_llama(root / "base", [m["content"] for c, o in train for m in c + [o]])
    return root


@pytest.fixture(scope="module")
def tok(standin):
    """The stand-in's tokenizer with the template and <|eot_id|> as EOS, as scale/prepare.py saves it."""
    tokenizer = data.load_tokenizer(str(standin / "base"), str(standin / "llama3.jinja"))
    data.end_of_turn(tokenizer)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # as lm.load_tokenizer does
    return tokenizer


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def chat_examples(tokenizer, convs):
    """(prompt_ids, reply_ids) of conversations, each its last turn the reply: prepared (scale.data's
    canonical rows), then encoded by the core as a stage encodes them."""
    rows, _ = data.canonical_rows(tokenizer, [{"prompt": m[:-1], "completion": m[-1:]} for m in convs],
                                  ["completion"])
    return lm.encode(tokenizer, rows, "completion", MAX_PROMPT, 64)


def test_the_response_mask_covers_the_reply_and_its_end_token(tok):
    """lm.collate's response mask over prepared chat rows (one and two turns, of different lengths): the
    reply and its <|eot_id|>, nothing of the prompt or the padding; the rows are Llama-3's rendering."""
    (m1, _), = conversations(5, 1)
    (m2, _), = conversations(6, 1, turns=2)
    examples = chat_examples(tok, [m1, m2])
    batch = lm.collate(examples, tok.pad_token_id)
    assert batch["input_ids"].shape[1] == max(len(p) + len(r) for p, r in examples)
    for i, (m, (p, r)) in enumerate(zip((m1, m2), examples)):
        masked = batch["input_ids"][i][batch["response_mask"][i]].tolist()
        assert masked == r and r[-1] == tok.eos_token_id == tok.convert_tokens_to_ids(EOT)
        assert tok.decode(masked) == m[-1]["content"] + EOT
        assert tok.decode(batch["input_ids"][i][:len(p) + len(r)].tolist()) == by_hand(m, False)
        assert int(batch["attention_mask"][i].sum()) == len(p) + len(r)


def test_sft_loss_on_a_chat_row_is_the_nll_of_the_reply(standin, tok):
    """completion_loss on one prepared conversation = -mean log p of the reply's tokens (and <|eot_id|>),
    computed from the full rendering's logits with the reply's positions found by hand."""
    (m, _), = conversations(7, 1, turns=2)
    model = lm.load_model(str(standin / "base"))
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # bfloat16 on disk
    batch = lm.collate(chat_examples(tok, [m]), tok.pad_token_id)
    full = ids(tok, by_hand(m, False))
    reply = ids(tok, m[-1]["content"] + EOT)
    assert full[-len(reply):] == reply and batch["input_ids"][0].tolist() == full
    with torch.no_grad():
        logp = model(torch.tensor([full])).logits[0].float().log_softmax(-1)
        start = len(full) - len(reply)
        nll = -torch.stack([logp[t - 1, full[t]] for t in range(start, len(full))]).mean()
        assert torch.allclose(sft.completion_loss(model, batch), nll, atol=1e-5)


def prepared(out, **flags):
    """scale/prepare.py in-process into `out`; the rows it wrote."""
    args = prepare.Args(out_dir=str(out), max_prompt_len=MAX_PROMPT, truncate_prompts=True, **flags)
    prepare.main(args)
    return [json.loads(line) for line in open(out / prepare.FILES[args.kind])]


def test_the_chain_runs_on_conversations(standin):
    """scale.prepare first (UltraChat with --chat_template; trl-lib's implicit prompt; UltraFeedback's
    messages as prompts and, for the evaluation, its chosen reply as the reference), then sft -> gold RM ->
    label -> DPO -> adaptive IS-DPO -> evaluate on the prepared directories, each stage's exit 0, at tiny
    sizes; the pairs keep the prepared prompt ids and the sampled ids, and dpo.py trains on exactly those."""
    import dpo
    import evaluate
    import is_dpo
    import reward

    root, lens = standin, {"max_prompt_len": MAX_PROMPT, "max_response_len": MAX_RESPONSE}
    prepared(root / "d_sft", data=str(root / "ultrachat_200k"), split="train_sft",
             completion_column="messages", tokenizer_path=str(root / "base"),
             chat_template=str(root / "llama3.jinja"))
    tokenizer_dir = str(root / "d_sft" / "tokenizer")  # the template, <|eot_id|> as EOS
    prepared(root / "d_human", kind="prefs", data=str(root / "trl_feedback.parquet"),
             tokenizer_path=tokenizer_dir)
    prompts = prepared(root / "d_prompts", kind="eval", data=str(root / "ultrafeedback_binarized"),
                       split="train_prefs", prompt_column="messages", tokenizer_path=tokenizer_dir)
    prepared(root / "d_eval", kind="eval", data=str(root / "ultrafeedback_binarized"), split="test_prefs",
             prompt_column="messages", reference_column="chosen", tokenizer_path=tokenizer_dir)
    sft.main(sft.Args(model_name_or_path=str(root / "base"), data=str(root / "d_sft"),
                      out_dir=str(root / "sft"), steps=2, batch_size=4, lr=1e-4, warmup_steps=0, val_size=4,
                      **lens))
    saved = lm.load_tokenizer(str(root / "sft"))
    assert saved.eos_token == EOT and saved.chat_template == TEMPLATE  # the later stages read both
    reward.main(reward.Args(mode="train", sft_path=str(root / "sft"), out_dir=str(root / "gold"),
                            data=str(root / "d_human"), steps=2, batch_size=4, val_size=4, **lens))
    reward.main(reward.Args(mode="label", judge="rm", sft_path=str(root / "sft"),
                            gold_path=str(root / "gold"),
                            data=str(root / "d_prompts" / "eval.jsonl"), out_dir=str(root / "prefs"),
                            num_prompts=40, sample_batch_size=16, **lens))
    rows = lm.read_jsonl(root / "prefs" / "train.jsonl")
    assert len(rows) >= 4
    prompt_ids = {r["prompt"]: r["prompt_ids"] for r in prompts}
    for row in rows:  # the prepared prompt, its ids, and the sampled ids ending with <|eot_id|>
        assert row["prompt"].endswith("assistant<|end_header_id|>\n\n")
        assert row["prompt_ids"] == prompt_ids[row["prompt"]]
        for side in ("chosen", "rejected"):
            assert row[f"{side}_ids"][-1] == saved.eos_token_id
            assert saved.decode(row[f"{side}_ids"], skip_special_tokens=True).strip() == row[side]
    pairs = dpo.load_pairs(dpo.Args(sft_path=str(root / "sft"), data=str(root / "prefs"), **lens), saved)[1]
    assert [c[1] for c, _ in pairs] == [r["chosen_ids"][:MAX_RESPONSE] for r in rows]
    assert [r[1] for _, r in pairs] == [r["rejected_ids"][:MAX_RESPONSE] for r in rows]
    assert [c[0] for c, _ in pairs] == [r["prompt_ids"] for r in rows]
    common = dict(sft_path=str(root / "sft"), data=str(root / "prefs"), runs_dir=str(root / "runs"),
                  batch_size=4, num_epochs=1, num_checkpoints=1, beta=0.1, **lens)
    dpo.train(dpo.Args(reference_only=True, **common))
    assert (root / "prefs" / "reference_logps.pt").is_file()  # saved beside the pairs, for every run
    dpo.train(dpo.Args(**common))
    is_dpo.main(is_dpo.Args(weight="adaptive", **common))
    evaluate.main(evaluate.Args(runs=str(root / "runs" / "*"), data=str(root / "d_eval"), judge="rm",
                                gold_path=str(root / "gold"), out_dir=str(root / "eval"),
                                plots_dir=str(root / "plots"), num_prompts=4, kl_prompts=4, **lens))
    results = lm.read_jsonl(root / "eval" / "results.jsonl")
    assert len(results) == 4 and all(0 <= r["win_rate"] <= 1 for r in results)
    assert {r["run"] for r in results} == {"dpo_beta0.1_seed0", "ais-dpo_beta0.1_seed0"}
