"""scale/prepare.py: the outside world's data formats turned into the canonical form, on stand-ins this file
builds (no download): byte-level BPE tokenizers saved with save_pretrained -- one with Llama-3's special
tokens that adds BOS itself, as Llama-3's does, given Llama-3's chat template (as a base Llama that ships
none is), and one as Pythia ships its own (one special token, <|endoftext|>, no BOS added, no pad) -- and
data files in the hub data sets' schemas: HuggingFaceH4/ultrachat_200k (prompt, prompt_id, messages),
HuggingFaceH4/ultrafeedback_binarized (prompt, prompt_id, chosen, rejected, messages, score_chosen,
score_rejected), trl-lib/ultrafeedback_binarized (chosen, rejected: implicit prompt), TRL's explicit
conversational forms, trl-lib/tldr (prompt, completion) and trl-lib/tldr-preference (prompt, chosen,
rejected), as files, shard globs and local hub snapshots.
"""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from scale import data, prepare

ROOT = Path(__file__).resolve().parent.parent
BOT, EOTXT, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
HEAD = ("<|start_header_id|>", "<|end_header_id|>")
# Llama-3-8B-Instruct's template
TEMPLATE = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
            "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ "
            "message['content'] | trim + "
            "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
            "{{ content }}{% endfor %}{% if add_generation_prompt %}"
            "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
WORDS = "the cat sat on a mat and a dog ran to the park while birds sang over green hills".split()


# ----------------------------------------------------------------------------------------------
# stand-ins


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


def conversations(seed, n, turns=1):
    """n conversations of `turns` user/assistant exchanges, and a second reply to each (the rejected one)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        messages = []
        for _ in range(turns):
            messages += [user(sentence(rng, rng.randint(3, 8))), assistant(sentence(rng, rng.randint(2, 6)))]
        out.append((messages, assistant(sentence(rng, rng.randint(2, 6)))))
    return out


def bpe(texts, special, vocab_size=300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return tok


def save_llama3_tokenizer(directory, texts):
    """Byte-level BPE with Llama-3's special tokens; BOS added by its post-processor, as Llama-3's is; no
    chat template (a base model's)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = bpe(texts + [BOT + HEAD[0] + "user assistant system" + HEAD[1] + "\n\n"], [BOT, EOTXT, *HEAD, EOT])
    tok.post_processor = processors.TemplateProcessing(single=f"{BOT} $A", special_tokens=[(BOT, 0)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOT, eos_token=EOTXT).save_pretrained(directory)


def save_pythia_tokenizer(directory, texts):
    """As Pythia ships its own: one special token, <|endoftext|>, for BOS, EOS and unknown; no pad."""
    from transformers import PreTrainedTokenizerFast

    tok = bpe(texts, ["<|endoftext|>"], vocab_size=400)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                            unk_token="<|endoftext|>").save_pretrained(directory)


def write_snapshot(directory, splits, columns=None):
    """A hub data set's snapshot as huggingface_hub.snapshot_download leaves it: README.md naming each
    split's files, and data/<split>-00000-of-00001.parquet."""
    import datasets

    yaml = "".join(f"  - split: {s}\n    path: data/{s}-*\n" for s in splits)
    directory.mkdir()
    (directory / "README.md").write_text(f"---\nconfigs:\n- config_name: default\n  data_files:\n{yaml}---\n")
    for split, rows in splits.items():
        path = directory / "data" / f"{split}-00000-of-00001.parquet"
        rows = [{c: r[c] for c in columns} for r in rows] if columns else rows
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


def tldr_rows(seed, n):
    """trl-lib/tldr's frame, each post in paragraphs of two sentences; completions start with a space."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        paragraphs = [" ".join(sentence(rng, rng.randint(3, 7)) for _ in range(2))
                      for _ in range(rng.randint(1, 5))]
        prompt = (f"SUBREDDIT: r/{rng.choice(WORDS)}\n\nTITLE: {sentence(rng, 4)}\n\nPOST: "
                  + "\n".join(paragraphs) + "\n\nTL;DR:")
        out.append({"prompt": prompt, "completion": " " + sentence(rng, 5), "chosen": " " + sentence(rng, 4),
                    "rejected": " " + sentence(rng, 4)})
    return out


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    """The tokenizers, the chat template, and the data sets."""
    root = tmp_path_factory.mktemp("prepare")
    train, test = conversations(0, 40), conversations(1, 8)
    save_llama3_tokenizer(root / "llama", [m["content"] for c, o in train for m in c + [o]])
    (root / "llama3.jinja").write_text(TEMPLATE)
    chats = train + conversations(2, 8, turns=2)
    write_snapshot(root / "ultrachat_200k", {"train_sft": ultrachat_rows(chats),
                                             "test_sft": ultrachat_rows(test)})
    write_snapshot(root / "ultrafeedback_binarized", {"train_prefs": h4_feedback_rows(train),
                                                      "test_prefs": h4_feedback_rows(test)})
    tldr = tldr_rows(3, 60)
    save_pythia_tokenizer(root / "pythia", [r["prompt"] + r["completion"] for r in tldr])
    write_snapshot(root / "tldr", {"train": tldr[:50], "test": tldr[50:]}, ("prompt", "completion"))
    write_snapshot(root / "tldr-preference", {"train": tldr[:50], "validation": tldr[50:]},
                   ("prompt", "chosen", "rejected"))
    return root


@pytest.fixture(scope="module")
def tok(standin):
    """The stand-in's tokenizer with the template and <|eot_id|> as EOS, as prepare.py saves it."""
    tokenizer = data.load_tokenizer(str(standin / "llama"), str(standin / "llama3.jinja"))
    data.end_of_turn(tokenizer)
    return tokenizer


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def run(out, **flags):
    """prepare.py in-process; the rows it wrote and its saved tokenizer."""
    from transformers import AutoTokenizer

    args = prepare.Args(out_dir=str(out), **flags)
    prepare.main(args)
    rows = [json.loads(line) for line in open(out / prepare.FILES[args.kind])]
    return rows, AutoTokenizer.from_pretrained(out / "tokenizer")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ----------------------------------------------------------------------------------------------
# conversations through the chat template


def test_six_schemas_render_as_the_template_by_hand(standin, tmp_path):
    """Every schema's row becomes the prompt rendered with the generation prompt and the last assistant
    turn with its <|eot_id|>, strings and ids equal to Llama-3's rendering written out by hand; the saved
    tokenizer has the template and <|eot_id|> as EOS; the other columns travel along."""
    (m, other), = conversations(6, 1, turns=2)
    reply = dict(kind="prefs", chosen_column="chosen", rejected_column="rejected")
    forms = {  # (row, flags): the same conversation in each schema
        "ultrachat": (ultrachat_rows([(m, None)])[0], dict(kind="sft", completion_column="messages")),
        "prompt-completion": ({"prompt": m[:-1], "completion": m[-1:]}, dict(kind="sft")),
        "h4 feedback": (h4_feedback_rows([(m, other)])[0], reply),
        "trl implicit": (trl_feedback_rows([(m, other)])[0], reply),
        "trl explicit": ({"prompt": m[:-1], "chosen": m[-1:], "rejected": [other]}, reply),
        "messages as prompt": ({"messages": m}, dict(kind="eval", prompt_column="messages")),
    }
    extras = {"ultrachat": {"prompt_id"}, "h4 feedback": {"prompt_id", "messages", "score_chosen",
                                                          "score_rejected"},
              "trl implicit": {"score_chosen", "score_rejected"}}
    prompt_text = by_hand(m[:-1], True)
    assert prompt_text.count(BOT) == 1 and prompt_text.endswith("assistant<|end_header_id|>\n\n")
    for name, (row, flags) in forms.items():
        source = write_jsonl(tmp_path / f"{name.replace(' ', '_')}.jsonl", [row])
        template = str(standin / "llama3.jinja")
        (got,), saved = run(tmp_path / name.replace(" ", "_"), data=source,
                            tokenizer_path=str(standin / "llama"), chat_template=template, **flags)
        assert saved.eos_token == EOT and saved.chat_template == TEMPLATE, name  # the stages read both
        eot = saved.convert_tokens_to_ids(EOT)
        assert got["prompt"] == prompt_text and got["prompt_ids"] == ids(saved, prompt_text), name
        assert got["prompt_ids"][:2] == ids(saved, BOT + HEAD[0]) and got["prompt_ids"].count(
            saved.bos_token_id) == 1, name  # one BOS
        responses = {"sft": ["completion"], "prefs": ["chosen", "rejected"], "eval": []}[flags["kind"]]
        assert set(got) == {"prompt", "prompt_ids", *responses, *[f"{r}_ids" for r in responses],
                            *extras.get(name, ())}, name
        for column, message in zip(responses, (m[-1], other)):
            assert got[column] == message["content"], name
            assert got[f"{column}_ids"] == ids(saved, message["content"]) + [eot], name
        if responses:  # prompt then reply: the whole conversation as written, up to its last <|eot_id|>
            whole = got["prompt_ids"] + got[responses[0] + "_ids"]
            assert saved.decode(whole) == by_hand(m, False), name
            assert saved.decode(got[responses[0] + "_ids"]) == m[-1]["content"] + EOT, name


def test_a_reply_given_as_text_to_a_conversation_is_the_assistants(standin, tmp_path):
    """A text response to a message prompt (the label stage's samples) is rendered as the assistant's
    turn; a reference of --kind eval too; rows of a snapshot split with --split, --max_rows."""
    (m, _), = conversations(7, 1)
    source = write_jsonl(tmp_path / "x.jsonl", [{"prompt": m[:-1], "completion": " " + m[-1]["content"]}])
    (got,), saved = run(tmp_path / "out", data=source, tokenizer_path=str(standin / "llama"),
                        chat_template=TEMPLATE)
    assert got["completion"] == m[-1]["content"]  # the template trims it
    assert got["completion_ids"] == ids(saved, m[-1]["content"]) + [saved.eos_token_id]
    rows, saved = run(tmp_path / "eval", kind="eval", data=str(standin / "ultrafeedback_binarized"),
                      split="test_prefs", prompt_column="messages", reference_column="chosen", max_rows=3,
                      tokenizer_path=str(standin / "llama"), chat_template=str(standin / "llama3.jinja"))
    convs = conversations(1, 8)[:3]
    assert [r["prompt"] for r in rows] == [by_hand(c[:-1], True) for c, _ in convs]
    assert [r["reference"] for r in rows] == [c[-1]["content"] for c, _ in convs]


def test_bos_once_where_the_tokenizer_adds_one_and_never_where_it_does_not(standin, tmp_path):
    """Text rows: prompt ids = BOS (where the tokenizer adds one: Llama's) + the text's, response ids = ' ' +
    text + EOS (the tokenizer's own: no chat); a conversation's BOS is the template's, once; a text prompt
    cut from the left keeps its BOS and its end, and its text is the decoding of the ids kept."""
    source = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "The cat sat", "completion": "on a mat."},
                                                {"prompt": "the cat " * 30, "completion": " A dog."}])
    rows, saved = run(tmp_path / "out", data=source, tokenizer_path=str(standin / "llama"), max_prompt_len=10,
                      truncate_prompts=True)
    assert data.adds_bos(saved) and saved("a cat")["input_ids"][0] == saved.bos_token_id
    assert saved.eos_token == EOTXT and saved.chat_template is None
    assert rows[0]["prompt_ids"] == [saved.bos_token_id] + ids(saved, "The cat sat")
    assert rows[0]["completion_ids"] == ids(saved, " on a mat.") + [saved.eos_token_id]
    assert rows[0]["prompt"] == "The cat sat" and rows[0]["completion"] == "on a mat."
    assert rows[1]["prompt_ids"] == [saved.bos_token_id] + ids(saved, "the cat " * 30)[-9:]
    assert ("the cat " * 30).endswith(rows[1]["prompt"]) and ids(saved, rows[1]["prompt"]) == rows[1][
        "prompt_ids"][1:]
    assert rows[1]["completion_ids"] == ids(saved, " A dog.") + [saved.eos_token_id]  # its own space
    tokenizer = data.load_tokenizer(str(standin / "llama"), TEMPLATE)
    (text, p, _), = data.encode_prompts(tokenizer, [[user("The cat sat.")]])
    assert p.count(tokenizer.bos_token_id) == 1 and p[0] == tokenizer.bos_token_id and text.count(BOT) == 1
    # a tokenizer that adds no BOS (Pythia's): none added
    (row,), saved = run(tmp_path / "pythia", data=source, tokenizer_path=str(standin / "pythia"), max_rows=1)
    assert not data.adds_bos(saved)
    assert row["prompt_ids"] == ids(saved, "The cat sat")
    assert row["completion_ids"] == ids(saved, " on a mat.") + [saved.eos_token_id]


def test_truncation_keeps_the_header_and_the_generation_prompt(standin, tok, tmp_path):
    long = user(" ".join(["the cat sat on a mat"] * 20))
    messages = [{"role": "system", "content": "Be brief."}, long, assistant("A dog."), user("And birds?")]
    (_, full, cut), = data.encode_prompts(tok, [messages])
    assert not cut
    head = ids(tok, BOT + f"{HEAD[0]}system{HEAD[1]}\n\nBe brief.{EOT}{HEAD[0]}user{HEAD[1]}\n\n")
    tail = ids(tok, f"{EOT}{HEAD[0]}assistant{HEAD[1]}\n\nA dog.{EOT}{HEAD[0]}user{HEAD[1]}\n\n"
                    f"And birds?{EOT}{HEAD[0]}assistant{HEAD[1]}\n\n")
    limit = len(head) + len(tail) + 10
    (text, ids_cut, was_cut), = data.encode_prompts(tok, [messages], limit, truncate_prompts=True)
    assert was_cut and len(full) > limit >= len(ids_cut) > limit - 5
    assert ids_cut[:len(head)] == head and ids_cut[-len(tail):] == tail  # only the first user turn's start
    kept = tok.decode(ids_cut[len(head):-len(tail)])
    assert kept and long["content"].endswith(kept)
    assert ids(tok, text) == ids_cut and text.startswith(BOT) and text.count(BOT) == 1  # the text re-rendered
    with pytest.raises(SystemExit, match="error: row 1: the chat template alone"):
        data.encode_prompts(tok, [messages], len(head) + 8, truncate_prompts=True)
    with pytest.raises(SystemExit, match="row 1: .*--truncate_prompts"):
        data.encode_prompts(tok, [messages], limit)
    # through the command line: the prompt written is the cut one, its ids those of encode_prompts
    source = write_jsonl(tmp_path / "long.jsonl", [{"prompt": messages, "completion": "Birds sang."}])
    (row,), _ = run(tmp_path / "out", data=source, tokenizer_path=str(standin / "llama"),
                    chat_template=TEMPLATE, max_prompt_len=limit, truncate_prompts=True)
    assert row["prompt_ids"] == ids_cut and row["prompt"] == text


# ----------------------------------------------------------------------------------------------
# bad input: one error line each, nothing written


def messages_without_role(path):
    return {"data": write_jsonl(path, [{"prompt": [{"content": "Hi"}], "completion": [assistant("Yes.")]}])}


def prompts_that_differ(path):
    row = trl_feedback_rows(conversations(3, 1))[0]
    row["rejected"] = [user("Something else.")] + row["rejected"][1:]
    return {"data": write_jsonl(path, [row]), "kind": "prefs"}


def no_template(path):
    return {"data": write_jsonl(path, ultrachat_rows(conversations(4, 12))), "completion_column": "messages",
            "chat_template": ""}


def last_turn_users(path):
    (m, _), = conversations(4, 1)
    return {"data": write_jsonl(path, [{"prompt": m[:-1], "completion": m[:-1]}])}


def turns_out_of_order(turns):
    def make(path):
        return {"data": write_jsonl(path, [{"prompt": [{"role": r, "content": "Hi"} for r in turns],
                                            "completion": [assistant("Yes.")]}])}
    make.__name__ = "turns_" + "_".join(turns)
    return make


def text_prompt_message_reply(path):
    return {"data": write_jsonl(path, [{"prompt": "Hi", "completion": [assistant("Yes.")]}])}


def mixed_rows(path):
    (m, _), = conversations(4, 1)
    return {"data": write_jsonl(path, [{"prompt": "Hi", "completion": "Yes."},
                                       {"prompt": m[:-1], "completion": m[-1:]}])}


def sft_rows(n=12):
    return [{"prompt": f"Post {i}. TL;DR:", "completion": f"summary {i}"} for i in range(n)]


def null_completion(path):
    return {"data": write_jsonl(path, [{**r, "completion": None} if i == 1 else r
                                       for i, r in enumerate(sft_rows())])}


def null_completion_array(path):
    path = path.with_suffix(".json")
    path.write_text(json.dumps([{**r, "completion": None} if i == 1 else r
                                for i, r in enumerate(sft_rows())]))
    return {"data": str(path)}


def number_prompt(path):
    return {"data": write_jsonl(path, [{**r, "prompt": 42} if i == 0 else r
                                       for i, r in enumerate(sft_rows())])}


def list_completion(path):
    return {"data": write_jsonl(path, [{**r, "completion": ["my", "mom"]} if i == 2 else r
                                       for i, r in enumerate(sft_rows())])}


def torn(path):
    path.write_text("".join(json.dumps(r) + "\n" for r in sft_rows(3)) + json.dumps(sft_rows()[3])[:25])
    return {"data": str(path)}


def null_chosen(path):
    return {"data": write_jsonl(path, [{"prompt": "p", "chosen": None, "rejected": "r"}]), "kind": "prefs"}


def missing_column(path):
    return {"data": write_jsonl(path, sft_rows()), "completion_column": "summary"}


def empty_prompt(path):
    return {"data": write_jsonl(path, [{"prompt": "", "completion": "x"}])}


def too_long(path):
    return {"data": write_jsonl(path, sft_rows()), "max_prompt_len": 3}


def not_a_frame(path):
    return {"data": write_jsonl(path, sft_rows()), "max_prompt_len": 30, "tldr_truncation": True}


def no_such_file(path):
    return {"data": str(path.with_name("none.parquet"))}


def bad_kind(path):
    return {"data": write_jsonl(path, sft_rows()), "kind": "pairs"}


def bad_template(path):
    return {"data": write_jsonl(path, sft_rows()), "chat_template": "llama3.jinja"}


BAD = [  # (what, words the error line must hold)
    (messages_without_role, ["row 1", "'prompt'", "message 1", "'role'"]),
    (prompts_that_differ, ["row 1", "same prompt"]),
    (no_template, ["conversational", "no chat template", "--chat_template"]),
    (last_turn_users, ["row 1", "'completion'", "'user' turn"]),
    (text_prompt_message_reply, ["row 1", "prompt is text"]),
    (turns_out_of_order(["user", "user"]), ["row 1", "messages 1 and 2", "two 'user' turns in a row"]),
    (turns_out_of_order(["assistant", "user"]), ["row 1", "starts with an 'assistant' turn"]),
    (turns_out_of_order(["system", "user", "assistant", "system", "user"]), ["row 1", "message 4", "system"]),
    (turns_out_of_order(["user", "narrator"]), ["row 1", "message 2", "unknown role 'narrator'"]),
    (mixed_rows, ["row 2", "mix text and conversations"]),
    (null_completion, ["row 2", "'completion'", "null"]),
    (null_completion_array, ["row 2", "'completion'"]),
    (number_prompt, ["row 1", "'prompt'", "a string"]),
    (list_completion, ["row 3", "'completion'"]),
    (torn, ["line 4", "torn"]),
    (null_chosen, ["row 1", "'chosen'"]),
    (missing_column, ["lacks column", "summary", "--*_column"]),
    (empty_prompt, ["row 1", "empty"]),
    (too_long, ["row 1", "--max_prompt_len 3", "--truncate_prompts"]),
    (not_a_frame, ["row 1", "TL;DR frame"]),
    (no_such_file, ["not found"]),
    (bad_kind, ["--kind"]),
    (bad_template, ["neither a file nor a jinja template"]),
]


@pytest.mark.parametrize("make, words", BAD, ids=[make.__name__ for make, _ in BAD])
def test_bad_input_is_one_error_line_and_writes_nothing(standin, tmp_path, make, words):
    """Bad input: one `error:` line (stage.fail's SystemExit), nothing written: no output, no temporary.
    The tokenizer has no template of its own: the template is given but where a case takes it away."""
    flags = {"tokenizer_path": str(standin / "llama"), "chat_template": TEMPLATE,
             **make(tmp_path / "d.jsonl")}
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(SystemExit) as e:
        prepare.main(prepare.Args(out_dir=str(tmp_path / "out"), **flags))
    line = str(e.value.code)
    assert line.startswith("error: ") and "\n" not in line, line
    for word in words:
        assert word in line, line
    assert sorted(os.listdir(tmp_path)) == before


def test_the_command_line_says_its_defaults_and_ends_bad_input_with_one_line(standin, tmp_path):
    done = subprocess.run([sys.executable, "-m", "scale.prepare", "--help"], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 0
    for flag in ("--kind", "--data", "--split", "--prompt_column", "--completion_column", "--chosen_column",
                 "--rejected_column", "--reference_column", "--tokenizer_path", "--chat_template",
                 "--max_prompt_len", "--truncate_prompts", "--tldr_truncation", "--max_rows", "--out_dir"):
        assert flag in done.stdout, flag
    assert done.stdout.count("(default:") >= 15
    source = write_jsonl(tmp_path / "d.jsonl", [{"prompt": 42, "completion": "x"}])
    done = subprocess.run([sys.executable, "scale/prepare.py", "--data", source, "--tokenizer_path",
                           str(standin / "pythia"), "--out_dir", str(tmp_path / "out")], cwd=ROOT,
                          capture_output=True, text=True)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and "Traceback" not in done.stderr and lines[-1].startswith("error: ")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# the output directory


def test_the_output_is_replaced_only_if_prepare_wrote_it(standin, tmp_path):
    source = write_jsonl(tmp_path / "d.jsonl", sft_rows())
    flags = dict(data=source, tokenizer_path=str(standin / "pythia"))
    rows, _ = run(tmp_path / "out", **flags)
    assert len(rows) == 12 and json.load(open(tmp_path / "out" / "prepare.json"))["rows_written"] == 12
    rows, _ = run(tmp_path / "out", max_rows=5, **flags)  # a previous output: replaced whole
    assert len(rows) == 5 and sorted(os.listdir(tmp_path)) == ["d.jsonl", "out"]
    with pytest.raises(SystemExit, match="--max_prompt_len 3"):  # a failed run leaves the previous output
        prepare.main(prepare.Args(out_dir=str(tmp_path / "out"), max_prompt_len=3, **flags))
    assert sorted(os.listdir(tmp_path)) == ["d.jsonl", "out"]
    assert len((tmp_path / "out" / "sft.jsonl").read_text().splitlines()) == 5
    (tmp_path / "thesis").mkdir()
    (tmp_path / "thesis" / "chapter1.tex").write_text("the user's work\n")
    for out, words in ((tmp_path / "thesis", "did not write"), (tmp_path / "d.jsonl", "not a directory"),
                       (tmp_path, "did not write")):
        with pytest.raises(SystemExit, match=words):
            prepare.main(prepare.Args(out_dir=str(out), **flags))
    assert (tmp_path / "thesis" / "chapter1.tex").read_text() == "the user's work\n"
    with pytest.raises(SystemExit, match="holds --data"):  # its own output as its input
        prepare.main(prepare.Args(out_dir=str(tmp_path / "out"), **{**flags, "data": str(tmp_path / "out")}))
    rows_again, _ = run(tmp_path / "again", **{**flags, "data": str(tmp_path / "out")})  # read as a source
    assert [r["prompt"] for r in rows_again] == [r["prompt"] for r in rows]


# ----------------------------------------------------------------------------------------------
# sources: snapshots, shards, files


def test_a_snapshot_directory_and_shard_globs_load_like_a_hub_id(standin):
    import datasets

    for name, splits, columns in (("tldr", ("train", "test"), {"completion": "completion"}),
                                  ("tldr-preference", ("train", "validation"),
                                   {"chosen": "chosen", "rejected": "rejected"})):
        columns = {"prompt": "prompt", **columns}
        for split in splits:
            files = str(standin / name / "data" / f"{split}-*")
            expected = datasets.load_dataset("parquet", data_files=files, split="train").to_list()
            assert data.load_rows(str(standin / name), "train.jsonl", split, columns) == expected
            shards = str(standin / name / "data" / f"{split}-*.parquet")
            assert data.load_rows(shards, "train.jsonl", "ignored", columns) == expected
    with pytest.raises(SystemExit, match="no file matches"):
        data.load_rows(str(standin / "tldr" / "none-*.parquet"), "x", "train", {"prompt": "prompt"})
    with pytest.raises(SystemExit, match="split"):
        data.load_rows(str(standin / "tldr-preference"), "train.jsonl", "test", {"prompt": "prompt"})


def test_an_output_of_this_project_is_not_taken_for_a_hub_snapshot(standin, tmp_path):
    """A directory that a stage or prepare.py wrote (its marker) is read for its own file, never searched
    for data files as a snapshot is."""
    for marker in (".stage.json", "prepare.json"):
        out = tmp_path / marker
        out.mkdir()
        (out / marker).write_text("{}")
        write_jsonl(out / "train.jsonl", sft_rows(2))
        with pytest.raises(SystemExit, match="eval.jsonl not found"):
            data.load_rows(str(out), "eval.jsonl", "train", {"prompt": "prompt"})


def test_csv_arrow_json_array_and_jsonl_files_read_alike(tmp_path):
    import pyarrow as pa
    import pyarrow.csv

    rows = sft_rows(5)
    table = pa.Table.from_pylist(rows)
    pa.csv.write_csv(table, tmp_path / "d.csv")
    with pa.OSFile(str(tmp_path / "stream.arrow"), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        w.write_table(table)
    with pa.OSFile(str(tmp_path / "file.arrow"), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    write_jsonl(tmp_path / "d.jsonl", rows)
    columns = {"prompt": "prompt", "completion": "completion"}
    for name in ("d.csv", "stream.arrow", "file.arrow", "d.json", "d.jsonl"):
        assert data.load_rows(str(tmp_path / name), "", None, columns) == rows, name
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(SystemExit, match="could not read rows"):
        data.load_rows(str(tmp_path / "bad.parquet"), "", None, columns)
    with pytest.raises(SystemExit, match="of one kind"):
        data.load_rows(str(tmp_path / "d.*"), "", None, columns)


def test_a_local_file_rewritten_at_the_same_path_and_mtime_gives_its_new_rows(tmp_path, monkeypatch):
    """The datasets library's cache knows a local file by its path and mtime: a file replaced by another
    version with the same mtime (cp -p, rsync -a, tar -x) would give the old rows through it. load_rows
    reads local files and snapshots afresh: a parquet file, a snapshot directory, a glob of JSON files."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    columns = {"prompt": "prompt", "completion": "completion"}

    def rows(tag, n):
        return [{"prompt": f"{tag} {i}", "completion": "c"} for i in range(n)]

    def write(path, tag, n):
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".parquet":
            datasets.Dataset.from_list(rows(tag, n)).to_parquet(str(path))
        else:
            path.write_text("".join(json.dumps(r) + "\n" for r in rows(tag, n)))

    snapshot = tmp_path / "snap"
    cases = [(tmp_path / "a.parquet", str(tmp_path / "a.parquet"), None),
             (snapshot / "data" / "train-00000-of-00001.parquet", str(snapshot), "train"),
             (tmp_path / "j" / "x.json", str(tmp_path / "j" / "*.json"), None)]
    for path, source, split in cases:
        write(path, "old", 3)
        assert data.load_rows(source, "", split, columns) == rows("old", 3)
        stat = path.stat()
        write(path, "new", 5)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert path.stat().st_mtime_ns == stat.st_mtime_ns
        assert data.load_rows(source, "", split, columns) == rows("new", 5), source


def test_chat_snapshots_prepare_for_the_stages(standin, tmp_path):
    """The llama recipe's data: UltraChat's train_sft (one- and two-turn conversations) and UltraFeedback's
    train_prefs, from their snapshots, cut inside the turns to fit; every row's ids as the template writes
    them, within the budget, each response ending with <|eot_id|>."""
    common = dict(tokenizer_path=str(standin / "llama"), chat_template=str(standin / "llama3.jinja"),
                  max_prompt_len=48, truncate_prompts=True)
    rows, saved = run(tmp_path / "sft", data=str(standin / "ultrachat_200k"), split="train_sft",
                      completion_column="messages", **common)
    meta = json.load(open(tmp_path / "sft" / "prepare.json"))
    assert len(rows) == 48 and meta["prompts_cut"] > 0 and meta["conversational"] and meta["eos_token"] == EOT
    pairs, _ = run(tmp_path / "prefs", kind="prefs", data=str(standin / "ultrafeedback_binarized"),
                   split="train_prefs", **{**common, "tokenizer_path": str(tmp_path / "sft" / "tokenizer"),
                                           "chat_template": ""})
    assert len(pairs) == 40
    for row in rows + pairs:
        assert len(row["prompt_ids"]) <= 48 and row["prompt_ids"].count(saved.bos_token_id) == 1
        assert ids(saved, row["prompt"]) == row["prompt_ids"]
        for column in ("completion", "chosen", "rejected"):
            if column in row:
                assert row[f"{column}_ids"][-1] == saved.eos_token_id == saved.convert_tokens_to_ids(EOT)
                assert saved.decode(row[f"{column}_ids"][:-1]) == row[column]


# ----------------------------------------------------------------------------------------------
# TL;DR prompts cut a paragraph at a time


def test_tldr_truncation_drops_whole_paragraphs_then_characters_keeping_the_frame():
    """Counting characters as tokens: the frame is 40 characters, each paragraph 'pN' 2 plus its newline."""
    head, tail = "SUBREDDIT: r/a\n\nTITLE: b\n\nPOST: ", "\n\nTL;DR:"
    prompt = head + "p1\np2\np3" + tail
    assert len(head + tail) == 40 and len(prompt) == 48
    assert data.truncate_post(prompt, len, 48) == prompt  # fits: untouched
    assert data.truncate_post(prompt, len, 47) == head + "p1\np2" + tail  # one paragraph
    assert data.truncate_post(prompt, len, 45) == head + "p1\np2" + tail
    assert data.truncate_post(prompt, len, 44) == head + "p1" + tail  # two
    assert data.truncate_post(prompt, len, 41) == head + "p" + tail  # then a character
    assert data.truncate_post(prompt, len, 40) == head + tail
    assert data.truncate_post(prompt, len, 39) is None  # the frame alone is too long
    cnn = "TITLE: t\n\nline one\nline two\n\nTL;DR:"  # tldr-preference's CNN/DM rows: the article is cut
    assert data.truncate_post(cnn, len, 30) == "TITLE: t\n\nline one\n\nTL;DR:"
    assert data.split_frame("no frame TL;DR:") is None


def test_tldr_truncation_cuts_long_posts_of_a_snapshot_at_paragraphs(standin, tmp_path):
    """--tldr_truncation on trl-lib/tldr's snapshot: every prompt within the budget, cut posts cut at a
    paragraph (or, no paragraph fitting, a prefix of the first), the next paragraph would not have fitted;
    the completions as they were with their ids; prefs and eval too."""
    from transformers import AutoTokenizer

    budget = 48
    tokenizer = AutoTokenizer.from_pretrained(standin / "pythia")
    source = tldr_rows(3, 60)[:50]

    def count(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    common = dict(tokenizer_path=str(standin / "pythia"), max_prompt_len=budget, tldr_truncation=True)
    rows, saved = run(tmp_path / "train", data=str(standin / "tldr"), **common)
    meta = json.load(open(tmp_path / "train" / "prepare.json"))
    assert len(rows) == meta["rows_written"] == 50 - meta["rows_dropped"] > 25
    assert all(set(r) == {"prompt", "prompt_ids", "completion", "completion_ids"} for r in rows)
    cut = 0
    for row in rows:
        head, body, tail = data.split_frame(row["prompt"])
        original = [r for r in source if r["completion"] == row["completion"]][0]
        _, full, _ = data.split_frame(original["prompt"])
        assert count(row["prompt"]) <= budget and tail == "\n\nTL;DR:"
        assert row["prompt_ids"] == ids(saved, row["prompt"])  # no BOS: Pythia's adds none
        assert row["completion_ids"] == ids(saved, row["completion"]) + [saved.eos_token_id]
        if body != full:
            cut += 1  # whole paragraphs gone, or (no paragraph fits) a prefix of the first one
            assert full.startswith(body) and (full[len(body)] == "\n" or "\n" not in body)
            longer = full[:full.index("\n", len(body) + 1)] if "\n" in full[len(body) + 1:] else full
            assert count(head + longer + tail) > budget  # the next paragraph would not have fitted
    assert cut == meta["prompts_cut"] > 0
    pairs, _ = run(tmp_path / "prefs", kind="prefs", data=str(standin / "tldr-preference"), **common)
    test, _ = run(tmp_path / "test", kind="eval", data=str(standin / "tldr"), split="test",
                  reference_column="completion", **common)
    assert pairs and all(count(r["prompt"]) <= budget for r in pairs + test)
    assert test and all(r["reference_ids"][-1] == saved.eos_token_id for r in test)


# ----------------------------------------------------------------------------------------------
# the recipes prepare first, then hand the stages the prepared data


@pytest.mark.parametrize("script", ["pythia_tldr.sh", "llama3_ultrafeedback.sh"])
def test_recipes_prepare_their_data_and_pass_no_data_flags_to_the_stages(script, tmp_path):
    """$PYTHON is a stand-in that writes down its command lines: every data set goes through scale.prepare
    first, and no stage gets a flag about the outside world's formats."""
    log, fake = tmp_path / "commands", tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> {log}\n')
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "OUT": str(tmp_path / "out"), "SEEDS": "1", "BETAS": "0.1",
           "GOLD_FSDP": "0"}  # one process: the gold RM unsharded (tests/test_recipes.py: sharded)
    done = subprocess.run(["bash", str(ROOT / "recipes" / script)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = log.read_text().splitlines()
    prepares = [line for line in lines if line.startswith("-m scale.prepare ")]
    stages = [line for line in lines if line not in prepares]
    assert len(prepares) == (3 if script == "pythia_tldr.sh" else 2) and len(stages) >= 3
    assert lines[:len(prepares)] == prepares  # the data first
    for line in stages:
        for flag in ("--split", "_column", "--chat_template", "--truncate_prompts", "--tldr_truncation"):
            assert flag not in line, line
