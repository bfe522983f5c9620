"""Conversational (chat-template) data through the whole chain, on stand-ins this file builds (no download):
a tiny Llama saved in bfloat16 with a byte-level BPE tokenizer that has Llama-3's special tokens and adds BOS
itself, as Llama-3's does, and Llama-3's chat template (given with --chat_template, as for a base Llama that
ships none); and data files in the hub data sets' schemas: HuggingFaceH4/ultrachat_200k (prompt, prompt_id,
messages), HuggingFaceH4/ultrafeedback_binarized (prompt, prompt_id, chosen, rejected, messages,
score_chosen, score_rejected), trl-lib/ultrafeedback_binarized (chosen, rejected: implicit prompt,
score_chosen, score_rejected) and TRL's explicit conversational forms (prompt, completion / chosen, rejected
as message lists).
"""
import json
import pytest
import torch

import policy
import sft

BOT, EOT, EOTXT = "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>"
HEAD = ("<|start_header_id|>", "<|end_header_id|>")
# Llama-3-8B-Instruct's template
TEMPLATE = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
            "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ "
            "message['content'] | trim + "
            "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
            "{{ content }}{% endfor %}{% if add_generation_prompt %}"
            "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
WORDS = "the cat sat on a mat and a dog ran to the park while birds sang over green hills".split()
MAX_PROMPT, MAX_RESPONSE = 128, 12


def by_hand(messages, generation_prompt):
    """Llama-3's rendering written out, independently of jinja."""
    text = BOT + "".join(f"{HEAD[0]}{m['role']}{HEAD[1]}\n\n{m['content'].strip()}{EOT}" for m in messages)
    return text + (f"{HEAD[0]}assistant{HEAD[1]}\n\n" if generation_prompt else "")


def sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def build_llama3_tokenizer(texts, template=None):
    """Byte-level BPE with Llama-3's special tokens; BOS added by its post-processor, as Llama-3's is."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = [BOT, EOTXT, *HEAD, EOT]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=300, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single=f"{BOT} $A", special_tokens=[(BOT, 0)])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOT, eos_token=EOTXT)
    out.chat_template = template
    return out


def conversations(seed, n, turns=1):
    """n conversations of `turns` user/assistant exchanges, and a second reply to each (the rejected one)."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        messages = []
        for _ in range(turns):
            messages += [user(sentence(rng, rng.randint(3, 8))), assistant(sentence(rng, rng.randint(2, 6)))]
        out.append((messages, assistant(sentence(rng, rng.randint(2, 6)))))
    return out


def write_snapshot(directory, splits):
    """A hub data set's snapshot as huggingface_hub.snapshot_download leaves it: README.md naming each
    split's files, and data/<split>-00000-of-00001.parquet."""
    import datasets

    yaml = "".join(f"  - split: {s}\n    path: data/{s}-*\n" for s in splits)
    directory.mkdir()
    (directory / "README.md").write_text(f"---\nconfigs:\n- config_name: default\n  data_files:\n{yaml}---\n")
    for split, rows in splits.items():
        path = directory / "data" / f"{split}-00000-of-00001.parquet"
        datasets.Dataset.from_list(rows).to_parquet(str(path))


def ultrachat_rows(convs):
    """HuggingFaceH4/ultrachat_200k: prompt (the first user turn's text), prompt_id, messages."""
    return [{"prompt": m[0]["content"], "prompt_id": f"{i:064x}", "messages": m}
            for i, (m, _) in enumerate(convs)]


def h4_feedback_rows(convs):
    """HuggingFaceH4/ultrafeedback_binarized: prompt (text), prompt_id, chosen and rejected as whole
    conversations, messages (= chosen), score_chosen, score_rejected."""
    return [{"prompt": m[-2]["content"], "prompt_id": f"{i:064x}", "chosen": m, "rejected": m[:-1] + [other],
             "messages": m, "score_chosen": 8.0, "score_rejected": 5.5} for i, (m, other) in enumerate(convs)]


def trl_feedback_rows(convs):
    """trl-lib/ultrafeedback_binarized: chosen, rejected (implicit prompt), score_chosen, score_rejected."""
    return [{"chosen": m, "rejected": m[:-1] + [other], "score_chosen": 9.0, "score_rejected": 2.0}
            for m, other in convs]


def save_tiny_llama(directory, texts):
    """A tiny base Llama (no chat template) saved in bfloat16 with a tokenizer trained on `texts`, whose
    replies end soon: the residual stream's channel 0 is a constant that the output layer reads as a bias
    toward <|eot_id|>. Its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_llama3_tokenizer(texts + [BOT + HEAD[0] + "user assistant system" + HEAD[1] + "\n\n"])
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
    tokenizer.save_pretrained(directory)
    return tokenizer


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    """The data sets, and the tiny base Llama (save_tiny_llama)."""
    root = tmp_path_factory.mktemp("chat")
    train, test = conversations(0, 40), conversations(1, 8)
    chats = train + conversations(2, 8, turns=2)
    write_snapshot(root / "ultrachat_200k",
                   {"train_sft": ultrachat_rows(chats), "test_sft": ultrachat_rows(test)})
    write_snapshot(root / "ultrafeedback_binarized", {"train_prefs": h4_feedback_rows(train),
                                                      "test_prefs": h4_feedback_rows(test)})
    import datasets
    datasets.Dataset.from_list(trl_feedback_rows(train)).to_parquet(str(root / "trl_feedback.parquet"))
    (root / "llama3.jinja").write_text(TEMPLATE)
    save_tiny_llama(root / "base", [m["content"] for c, o in train for m in c + [o]])
    return root


@pytest.fixture(scope="module")
def tok(standin):
    """The stand-in's tokenizer with the template, as sft.py --chat_template loads it."""
    return policy.load_tokenizer(str(standin / "base"), chat_template=str(standin / "llama3.jinja"))


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_the_split_is_the_template_by_hand(standin, tok):
    """Every schema's row splits into the prompt rendered with the generation prompt and the last assistant
    turn with its <|eot_id|>, string and tokens equal to Llama-3's rendering written out by hand."""
    (m1, other), = conversations(5, 1)
    (m2, _), = conversations(6, 1, turns=2)
    forms = {  # (row, columns): the same conversation in each schema
        "ultrachat": (ultrachat_rows([(m2, None)])[0], {"prompt": "prompt", "completion": "messages"}),
        "prompt-completion": ({"prompt": m2[:-1], "completion": m2[-1:]},
                              {"prompt": "prompt", "completion": "completion"}),
        "h4 feedback": (h4_feedback_rows([(m2, other)])[0], {"prompt": "prompt", "chosen": "chosen",
                                                              "rejected": "rejected"}),
        "trl implicit": (trl_feedback_rows([(m2, other)])[0], {"chosen": "chosen", "rejected": "rejected",
                                                               "prompt": "prompt"}),
        "trl explicit": ({"prompt": m2[:-1], "chosen": m2[-1:], "rejected": [other]},
                         {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}),
        "messages as prompt": ({"messages": m2}, {"prompt": "messages"}),
    }
    prompt_text = by_hand(m2[:-1], True)
    assert prompt_text.count(BOT) == 1 and prompt_text.endswith("assistant<|end_header_id|>\n\n")
    for name, (row, columns) in forms.items():
        path = standin / f"form_{name.replace(' ', '_')}.jsonl"
        path.write_text(json.dumps(row) + "\n")
        got = policy.load_rows(str(path), "", None, columns)[0]
        assert got["prompt"] == m2[:-1], name
        assert policy.render(tok, got["prompt"], True) == prompt_text, name
        for ours in set(columns) & {"completion", "chosen"}:
            assert got[ours] == m2[-1:], name
            assert policy.chat_text(tok, got["prompt"], got[ours]) == m2[-1]["content"] + EOT, name
            p, r = policy.encode(tok, got["prompt"], got[ours], MAX_PROMPT, 64)
            assert p == ids(tok, prompt_text) and p[:2] == ids(tok, BOT + HEAD[0]), name  # one BOS
            assert r == ids(tok, m2[-1]["content"]) + [tok.convert_tokens_to_ids(EOT)], name
            assert r[-1] == tok.eos_token_id and tok.eos_token == EOT  # the end of turn is the sampler's stop
        if "rejected" in columns:
            assert got["rejected"] == [other]
    # the response mask covers the reply and its end token, nothing of the prompt or the padding
    examples = policy.encode_rows(tok, [m1[:-1], m2[:-1]], [m1[-1:], m2[-1:]], MAX_PROMPT, 64)
    batch = policy.collate(examples, tok.pad_token_id)
    for i, (m, (p, r)) in enumerate(zip((m1, m2), examples)):
        masked = batch["input_ids"][i][batch["response_mask"][i]].tolist()
        assert tok.decode(masked) == m[-1]["content"] + EOT
        assert tok.decode(batch["input_ids"][i][:len(p) + len(r)].tolist()) == by_hand(m, False)


def test_bos_once_where_the_tokenizer_adds_one_and_never_for_the_toy(standin, tok, tmp_path):
    import toy_tldr

    assert policy.adds_bos(tok) and tok("a cat")["input_ids"][0] == tok.bos_token_id
    p, r = policy.encode(tok, "The cat sat", "on a mat.", MAX_PROMPT, MAX_RESPONSE)  # text: BOS, as before
    assert p == [tok.bos_token_id] + ids(tok, "The cat sat")
    assert r == ids(tok, " on a mat.") + [tok.eos_token_id]
    p, _ = policy.encode(tok, [user("The cat sat.")], "A dog.", MAX_PROMPT, MAX_RESPONSE)  # template's BOS
    assert p.count(tok.bos_token_id) == 1 and p[0] == tok.bos_token_id
    p = policy.encode_prompts(tok, ["the cat " * 30], 10, truncate_prompts=True)[0]
    assert p == [tok.bos_token_id] + ids(tok, "the cat " * 30)[-9:]
    toy_tldr.main(toy_tldr.Args(out_dir=str(tmp_path / "w"), num_sft=20, num_human_pairs=20, num_eval=5))
    toy = policy.load_tokenizer("", str(tmp_path / "w"))
    columns = {"prompt": "prompt", "completion": "completion"}
    row = policy.load_rows(str(tmp_path / "w"), "sft.jsonl", None, columns)[0]
    assert not policy.adds_bos(toy)
    assert policy.encode(toy, row["prompt"], row["completion"], 200, 50) == (
        ids(toy, row["prompt"]), ids(toy, " " + row["completion"]) + [toy.eos_token_id])


def test_truncation_keeps_the_header_and_the_generation_prompt(tok):
    long = user(" ".join(["the cat sat on a mat"] * 20))
    messages = [{"role": "system", "content": "Be brief."}, long, assistant("A dog."), user("And birds?")]
    full = policy.encode_prompts(tok, [messages], 1000)[0]
    head = ids(tok, BOT + f"{HEAD[0]}system{HEAD[1]}\n\nBe brief.{EOT}{HEAD[0]}user{HEAD[1]}\n\n")
    tail = ids(tok, f"{EOT}{HEAD[0]}assistant{HEAD[1]}\n\nA dog.{EOT}{HEAD[0]}user{HEAD[1]}\n\n"
                    f"And birds?{EOT}{HEAD[0]}assistant{HEAD[1]}\n\n")
    limit = len(head) + len(tail) + 10
    cut = policy.encode_prompts(tok, [messages], limit, truncate_prompts=True)[0]
    assert len(full) > limit >= len(cut) > limit - 5
    assert cut[:len(head)] == head and cut[-len(tail):] == tail  # only the first user turn's start is gone
    kept = tok.decode(cut[len(head):-len(tail)])
    assert kept and long["content"].endswith(kept)
    with pytest.raises(SystemExit, match="error: a prompt's chat template alone"):
        policy.encode_prompts(tok, [messages], len(head) + 8, truncate_prompts=True)
    with pytest.raises(SystemExit, match="--truncate_prompts"):
        policy.encode_prompts(tok, [messages], limit)


def test_sft_loss_on_a_chat_row_is_the_nll_of_the_reply(standin, tok):
    """completion_loss on one conversation = -mean log p of the reply's tokens (and <|eot_id|>), computed
    from the full rendering's logits with the reply's positions found by hand."""
    (m, _), = conversations(7, 1, turns=2)
    model = policy.load_policy(str(standin / "base"))
    batch = policy.collate([policy.encode(tok, m[:-1], m[-1:], MAX_PROMPT, 64)], tok.pad_token_id)
    full = ids(tok, by_hand(m, False))
    reply = ids(tok, m[-1]["content"] + EOT)
    assert full[-len(reply):] == reply
    with torch.no_grad():
        logp = model(torch.tensor([full])).logits[0].float().log_softmax(-1)
        start = len(full) - len(reply)
        nll = -torch.stack([logp[t - 1, full[t]] for t in range(start, len(full))]).mean()
        assert torch.allclose(sft.completion_loss(model, batch), nll, atol=1e-5)


def test_the_chain_runs_on_conversations(standin):
    """sft (UltraChat, --chat_template) -> gold RM (trl-lib's implicit prompt) -> label (UltraFeedback's
    messages as prompts) -> DPO -> adaptive IS-DPO -> evaluate (UltraFeedback's test_prefs, the chosen reply
    as the reference), each stage's exit 0, at tiny sizes; the pairs keep the sampled ids."""
    import dpo
    import evaluate
    import is_dpo
    import reward

    sizes = {"max_prompt_len": MAX_PROMPT, "max_response_len": MAX_RESPONSE, "truncate_prompts": True}
    sft.main(sft.Args(model_name_or_path=str(standin / "base"), data=str(standin / "ultrachat_200k"),
                      split="train_sft", completion_column="messages",
                      chat_template=str(standin / "llama3.jinja"), out_dir=str(standin / "sft"), steps=2,
                      batch_size=4, lr=1e-4, warmup_steps=0, val_size=4, **sizes))
    saved = policy.load_tokenizer(str(standin / "sft"))
    assert saved.eos_token == EOT and saved.chat_template == TEMPLATE  # the later stages read both
    reward.main(reward.Args(mode="train", sft_path=str(standin / "sft"), out_dir=str(standin / "gold"),
                            data=str(standin / "trl_feedback.parquet"), steps=2, batch_size=4, val_size=4,
                            **sizes))
    reward.main(reward.Args(mode="label", judge="rm", sft_path=str(standin / "sft"),
                            gold_path=str(standin / "gold"),
                            data=str(standin / "ultrafeedback_binarized"), split="train_prefs",
                            prompt_column="messages", out_dir=str(standin / "prefs"), num_prompts=40,
                            sample_batch_size=16, **sizes))
    rows = [json.loads(line) for line in open(standin / "prefs" / "train.jsonl")]
    assert len(rows) >= 4
    for row in rows:  # TRL's explicit conversational form, and the sampled ids ending with <|eot_id|>
        assert row["prompt"][-1]["role"] == "user" and row["chosen"][0]["role"] == "assistant"
        assert row["chosen_ids"][-1] == saved.eos_token_id
        text = saved.decode(row["chosen_ids"], skip_special_tokens=True)
        assert text.strip() == row["chosen"][0]["content"]
    daa = dpo.Args(sft_path=str(standin / "sft"), data=str(standin / "prefs"), **sizes)
    pairs = dpo.load_pairs(daa, saved)[1]
    assert [c[1] for c, _ in pairs] == [r["chosen_ids"] for r in rows]
    assert [c[0] for c, _ in pairs] == policy.encode_prompts(saved, [r["prompt"] for r in rows], MAX_PROMPT)
    common = dict(sft_path=str(standin / "sft"), data=str(standin / "prefs"), runs_dir=str(standin / "runs"),
                  batch_size=4, num_epochs=1, num_checkpoints=1, beta=0.1, **sizes)
    dpo.train(dpo.Args(**common))
    is_dpo.main(is_dpo.Args(weight="adaptive", **common))
    evaluate.main(evaluate.Args(runs=str(standin / "runs" / "*"),
                                data=str(standin / "ultrafeedback_binarized"), split="test_prefs",
                                prompt_column="messages", reference_column="chosen",
                                judge="rm", gold_path=str(standin / "gold"), out_dir=str(standin / "eval"),
                                plots_dir=str(standin / "plots"), num_prompts=4, kl_prompts=4,
                                max_prompt_len=MAX_PROMPT, max_response_len=MAX_RESPONSE,
                                truncate_prompts=True))
    results = [json.loads(line) for line in open(standin / "eval" / "results.jsonl")]
    assert len(results) == 4 and all(0 <= r["win_rate"] <= 1 for r in results)


def messages_without_role(path):
    path.write_text(json.dumps({"prompt": [{"content": "Hi"}], "completion": [assistant("Yes.")]}) + "\n")


def prompts_that_differ(path):
    row = trl_feedback_rows(conversations(3, 1))[0]
    row["rejected"] = [user("Something else.")] + row["rejected"][1:]
    path.write_text(json.dumps(row) + "\n")


def ultrachat_file(path):
    path.write_text("".join(json.dumps(r) + "\n" for r in ultrachat_rows(conversations(4, 12))))


@pytest.mark.parametrize("make, stage, words", [
    (messages_without_role, "sft", ["row 1", "'prompt'", "message 1", "'role'"]),
    (prompts_that_differ, "reward", ["row 1", "same prompt"]),
    (ultrachat_file, "sft", ["conversational", "no chat template", "--chat_template"]),
], ids=["message without role", "prompts differ", "no template"])
def test_bad_conversations_are_one_error_line(standin, tmp_path, make, stage, words):
    """Bad conversational input: one `error:` line (stage.fail's SystemExit, as tests/test_bad_input.py's
    command lines end), nothing written. The base model has no chat template: the third case passes none."""
    import reward

    make(tmp_path / "data.jsonl")
    common = dict(data=str(tmp_path / "data.jsonl"), out_dir=str(tmp_path / "out"), val_size=1, batch_size=2)
    with pytest.raises(SystemExit) as e:
        if stage == "sft":
            sft.main(sft.Args(model_name_or_path=str(standin / "base"), steps=1,
                              completion_column="completion" if make is messages_without_role else "messages",
                              **common))
        else:
            reward.main(reward.Args(mode="train", sft_path=str(standin / "base"), steps=1, **common))
    line = str(e.value.code)
    assert line.startswith("error: ") and "\n" not in line, line
    for word in words:
        assert word in line, line
    assert not (tmp_path / "out").exists()
