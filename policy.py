"""
policy.py -- what every stage does with a policy: rows in, token ids, batches, log-prob positions, samples.

sft.py, reward.py, dpo.py, is_dpo.py and evaluate.py all handle a causal LM the same way, and take it
from here:
  1. rows: from the toy world's directory, a local .json/.jsonl/.parquet file (or a glob of them), a local
     snapshot of a hub data set or a hub id, with a column mapping, every field type-checked; text, or
     conversations (message lists, in TRL's forms) split into a prompt and the assistant's last reply;
  2. tokens: prompt + response; text: the response ' ' + text + EOS, cut at --max_response_len;
     conversations: through the tokenizer's chat template (the reply ends with its end-of-turn token);
  3. batches: right-padded prompt + response (`collate`), or prompts run once for k responses each
     (`collate_grouped` + `response_hidden`: a preference pair costs one prompt, not two);
  4. the model: loaded complete (no weight silently fresh) or built as the tiny GPT-NeoX;
  5. sampling with a KV cache, and the log-probs of what it sampled;
  6. the run around a stage: seeds, device, JSON files, finite checks, the learning-rate schedule, and the
     state that --resume continues from.
Several processes (torchrun) are distributed.py's. Imports run down the pipeline only: this file imports
stage.py (flags, errors, outputs) and distributed.py, and no stage.
"""
import dataclasses
import functools
import glob
import json
import math
import os
import random
import warnings
from contextlib import nullcontext

import numpy as np
import torch
from tqdm.auto import tqdm

import distributed
import stage
from stage import fail



# ----------------------------------------------------------------------------------------------
# 1. rows: from the toy, a local file or the hub


def read_jsonl(path):
    """The rows of a JSON-lines file; a line that is not a JSON object is refused with its number."""
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                torn = "" if line.endswith("\n") else " (a torn last line?)"
                fail(f"{path} line {n} is not valid JSON{torn}: {e}")
            if not isinstance(row, dict):
                fail(f"{path} line {n} is not a JSON object: {line.strip()[:60]}")
            rows.append(row)
    return rows


def load_rows(source, filename, split, columns, numeric=(), token_ids=()):
    """Rows as dicts with our column names.

    source: a toy_tldr or stage output dir (reads <source>/<filename>), a local .json/.jsonl/.parquet
    file, a glob of such files (e.g. "dir/*.parquet": the shards of one split), a local snapshot of a hub
    data set (a directory as huggingface_hub.snapshot_download leaves it: data/<split>-*.parquet, ...) or a
    hub dataset id. columns: {our_name: column_in_the_data}. Every mapped field must be a string or a list
    of chat messages ({"role", "content"}, see split_conversation), or a finite number for the names in
    `numeric`: the first that is not is refused with its row and column. The prompt column may be absent
    when the responses are whole conversations (TRL's implicit prompt: it is their shared beginning).
    token_ids: optional columns of the data (e.g. chosen_ids): where the data has one, every row's value
    must be a non-empty list of token ids (integers >= 0), checked the same way.
    """
    if os.path.isdir(source) and not is_snapshot(source, filename):
        source = os.path.join(source, filename)
        if not os.path.isfile(source):
            fail(f"{source} not found (run the stage that writes it first)")
    if source.endswith(".jsonl") and not has_glob(source):
        if not os.path.isfile(source):
            fail(f"data file {source} not found")
        rows = read_jsonl(source)
        names = list(rows[0]) if rows else []
    else:
        rows, names = load_dataset(source, split)
    if not rows:
        fail(f"{source} has no rows")
    implicit = columns.get("prompt") not in names and len(columns) > 1 and all(
        isinstance(rows[0].get(theirs), list) for ours, theirs in columns.items() if ours != "prompt")
    missing = [c for ours, c in columns.items() if c not in names and not (ours == "prompt" and implicit)]
    if missing:
        fail(f"{source} lacks column(s) {missing}; it has {names} (map them with the --*_column flags)")
    kinds = {theirs: "a finite number" if ours in numeric else "a string or a list of messages"
             for ours, theirs in columns.items() if theirs in names}
    kinds.update({c: "a non-empty list of token ids" for c in token_ids if c in names})
    for i, row in enumerate(rows, 1):
        for theirs, kind in kinds.items():
            value = row.get(theirs)
            if not has_kind(value, kind):
                why = message_problem(value) if isinstance(value, list) and "messages" in kind else None
                fail(f"{source} row {i}, column {theirs!r}: " + (why or f"expected {kind}, got "
                                                                         f"{json.dumps(value)[:60]}"))
    # extra columns (scores, behaviour log-probs, token ids) travel along
    extra = [c for c in names if c not in columns.values() and c not in columns]
    return [split_conversation({**{ours: row.get(theirs) for ours, theirs in columns.items()},
                                **{c: row.get(c) for c in extra}}, f"{source} row {i}")
            for i, row in enumerate(rows, 1)]


def has_kind(value, kind):
    """Whether a field holds `kind`: a string or a list of messages, a finite number (no bool), or a non-empty
    list of token ids."""
    if kind == "a string or a list of messages":
        return isinstance(value, str) or (isinstance(value, list) and message_problem(value) is None)
    if kind == "a finite number":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return (isinstance(value, list) and bool(value)
            and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value))


def message_problem(value):
    """Why a list is not a conversation -- a non-empty list of messages {"role": str, "content": str} --
    or None when it is one."""
    if not value:
        return "an empty list of messages"
    for n, message in enumerate(value, 1):
        if not isinstance(message, dict):
            return f"message {n} is not a {{role, content}} object: {json.dumps(message)[:60]}"
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                return f"message {n} has no {key!r} (a string): {json.dumps(message)[:60]}"
    return None


RESPONSES = ("completion", "chosen", "rejected", "reference")  # our names of the response columns


def split_conversation(row, where):
    """A row whose fields may be conversations, as TRL's forms have them, turned into one prompt (a message
    list) and one-message replies; a row of text is returned as it is.

    - A response (completion, chosen, rejected, reference) must end with an assistant turn; that turn is
      the reply. What comes before it, if anything, is the prompt: a whole conversation (UltraChat's
      `messages` as --completion_column; HuggingFaceH4/ultrafeedback_binarized's chosen and rejected, whose
      text `prompt` column is then replaced, as TRL's maybe_extract_prompt does; trl-lib's implicit prompt,
      no prompt column at all). Every response of a row must have the same prompt, and a prompt given as
      messages must be it: else the row is refused.
    - A prompt given as messages that ends with an assistant turn is the conversation before that turn
      (`messages` as --prompt_column: the label stage and evaluate.py sample after it).
    - A text response to a message prompt is the assistant's reply (the label stage's samples).
    """
    prompt = row.get("prompt")
    if isinstance(prompt, list) and prompt[-1]["role"] == "assistant":
        prompt = prompt[:-1]
    for ours in RESPONSES:
        value = row.get(ours)
        if not isinstance(value, list):
            continue
        if value[-1]["role"] != "assistant":
            fail(f"{where}, {ours!r}: its last message is a {value[-1]['role']!r} turn, not the assistant's "
                 f"reply")
        if len(value) > 1:
            if isinstance(prompt, list) and prompt != value[:-1]:
                fail(f"{where}: the conversation before the last reply of {ours!r} is not the row's prompt "
                     f"(chosen and rejected must answer the same prompt)")
            prompt = value[:-1]
        row[ours] = value[-1:]
    if prompt is None or prompt == []:
        fail(f"{where}: no prompt (no prompt column, and the responses hold no conversation before their "
             f"reply)")
    if isinstance(prompt, str) and any(isinstance(row.get(ours), list) for ours in RESPONSES):
        fail(f"{where}: the prompt is text but the responses are messages: give the prompt as messages too")
    row["prompt"] = prompt
    return row


def reply_text(response):
    """The text of a response: itself, or the content of a one-message reply."""
    return response if isinstance(response, str) else response[-1]["content"].strip()


def as_reply(prompt, text):
    """A sampled text as a response to `prompt`: text to a text prompt, an assistant message to messages."""
    return text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]


def unique(prompts):
    """The prompts without repeats, in order (message lists too, compared by their JSON)."""
    return list({json.dumps(p): p for p in prompts}.values())


DATA_FILES = (".json", ".jsonl", ".parquet", ".csv", ".arrow")


def has_glob(source):
    return any(c in source for c in "*?[")


def is_snapshot(directory, filename):
    """Whether a directory is a local copy of a hub data set rather than a stage's output: no stage wrote it
    (stage.py's marker), it lacks `filename` and it holds data files (at any depth, e.g.
    data/train-00000-of-00001.parquet)."""
    if os.path.isfile(os.path.join(directory, filename)) or stage.read_marker(directory) is not None:
        return False
    return any(name.endswith(DATA_FILES) for _, _, names in os.walk(directory) for name in names)


def load_dataset(source, split):
    """(rows, column names) of a local .json/.jsonl/.parquet file, a glob of shards, a local snapshot
    directory or a hub data set.

    Local files are read as they are now, never through the datasets library's cache: that cache knows a
    local file by its path and modification time only, so a file replaced at the same path by one with the
    same mtime (cp -p, rsync -a, tar -x or unzip of another version of the data) would hand back the rows
    of the old one. A snapshot directory's split is found as the hub finds it (its README's configs, else
    the file names) by datasets.load_dataset_builder, which reads no rows; we read its files. A hub id goes
    through datasets.load_dataset, whose cache is keyed by the hub's revision and cannot go stale."""
    import datasets

    if has_glob(source) or source.endswith((".json", ".jsonl", ".parquet")):
        files = sorted(glob.glob(source)) if has_glob(source) else [source]
        if not files or not all(os.path.isfile(f) for f in files):
            fail(f"data file {source} not found" if not has_glob(source) else f"no file matches {source}")
        kinds = {"parquet" if f.endswith(".parquet") else "json" if f.endswith((".json", ".jsonl")) else "?"
                 for f in files}
        if kinds not in ({"parquet"}, {"json"}):
            fail(f"{source}: expected .json/.jsonl or .parquet files of one kind, got {files[:3]}")
        return read_files(source, files, kinds.pop())
    if os.path.exists(source) and not os.path.isdir(source):
        fail(f"{source}: expected a directory or a .json/.jsonl/.parquet file")
    try:
        if not os.path.isdir(source):
            data = datasets.load_dataset(source, split=split)
            return data.to_list(), data.column_names
        builder = datasets.load_dataset_builder(source)
    except Exception as e:  # offline, unknown id, unknown split: all end here
        fail(f"could not load dataset {source!r} split {split!r}: {type(e).__name__}: {str(e)[:200]}")
    splits = builder.config.data_files or {}
    if split not in splits:
        fail(f"could not load dataset {source!r} split {split!r}: it has the splits {sorted(splits)}")
    return read_files(source, list(splits[split]), builder.name)


def read_files(source, files, kind):
    """(rows, column names) of data files of one kind (parquet, json: JSON lines or one array of objects,
    csv, arrow), read with pyarrow or json, in order; a file that cannot be read is refused."""
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet

    rows, names = [], None
    for path in files:
        try:
            if kind == "json":
                with open(path, encoding="utf-8") as f:
                    array = f.read(1024).lstrip().startswith("[")
                    f.seek(0)
                    table = json.load(f) if array else read_jsonl(path)
                if not all(isinstance(r, dict) for r in table):
                    fail(f"{path} is not a JSON array of objects")
                names = names or (list(table[0]) if table else None)
                rows += table
                continue
            if kind == "parquet":
                table = pa.parquet.read_table(path)
            elif kind == "csv":
                table = pa.csv.read_csv(path)
            elif kind == "arrow":
                with pa.memory_map(path) as f:
                    table = pa.ipc.open_stream(f).read_all()
            else:
                fail(f"{source}: data files of kind {kind!r}; expected parquet, json, csv or arrow")
        except (pa.ArrowException, OSError, ValueError) as e:  # empty, truncated, not of its kind
            fail(f"could not read rows from {source} (empty, or not valid {kind}?): {type(e).__name__} "
                 f"{str(e)[:200]}".strip())
        names = names or table.column_names
        rows += table.to_pylist()
    return rows, names or []


def is_toy(data):
    return os.path.isdir(data) and os.path.isfile(os.path.join(data, "eval.jsonl"))



# ----------------------------------------------------------------------------------------------
# 2. tokens: (prompt_ids, response_ids) per row


def load_tokenizer(path="", data="", model_name_or_path="", chat_template=""):
    """The tokenizer at `path`; without one, the toy's word-level tokenizer (<data>/tokenizer), else the
    model's own. A pad token is guaranteed. chat_template: a chat template (a .jinja file, or the template
    itself) that replaces the tokenizer's own, if any: a base Llama ships none. sft.py saves it with pi_ref's
    tokenizer, and the later stages read it from there."""
    from transformers import AutoTokenizer

    if not path:
        toy = os.path.join(data, "tokenizer") if os.path.isdir(data) else ""
        path = toy if toy and os.path.isdir(toy) else model_name_or_path
    if not path:
        fail("no tokenizer: pass --tokenizer_path or --model_name_or_path")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        fail(f"could not load tokenizer {path!r}: {str(e).splitlines()[0][:200]}")
    if tokenizer.pad_token is None:  # e.g. Pythia: padding is masked out, any id will do
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template:
        if os.path.isfile(chat_template):
            with open(chat_template, encoding="utf-8") as f:
                chat_template = f.read()
        elif "{{" not in chat_template and "{%" not in chat_template:
            fail(f"--chat_template {chat_template[:60]!r} is neither a file nor a jinja template")
        tokenizer.chat_template = chat_template
    return tokenizer


def encode_pairs(tokenizer, rows, args, stage):
    """[((prompt_ids, chosen_ids), (prompt_ids, rejected_ids))] of {prompt, chosen, rejected} rows, cut to
    args.max_prompt_len / max_response_len (args.truncate_prompts); what that did is reported under
    `stage`. A response is encoded from its text, unless its row holds the token ids it was sampled as
    (reward.py --mode label writes them beside each response column <c>, as <c>_ids): see sampled_ids."""
    prompts = [r["prompt"] for r in rows]
    sides = []
    for ours, column in zip(("chosen", "rejected"), ids_columns(args)):
        encoded = encode_rows(tokenizer, prompts, [r[ours] for r in rows], args.max_prompt_len,
                              args.max_response_len, args.truncate_prompts)
        sides.append(sampled_ids(tokenizer, rows, ours, column, encoded, args.max_response_len, stage))
    chosen, rejected = sides
    report_shaping(stage, tokenizer, [p for p, _ in chosen], [r for _, r in chosen + rejected])
    return list(zip(chosen, rejected))


def ids_columns(args):
    """The columns that may hold the sampled token ids of the chosen and the rejected responses."""
    return f"{args.chosen_column}_ids", f"{args.rejected_column}_ids"


def sampled_ids(tokenizer, rows, ours, column, encoded, max_response_len, stage):
    """encoded [(prompt_ids, response_ids)] with each response replaced by the ids in its row's `column`,
    cut at max_response_len, where those are this tokenizer's ids of the row's text: all below
    len(tokenizer), decoded to the text as the label stage decoded them. With a BPE tokenizer a text has
    many token sequences and re-encoding it need not give back the one pi_ref sampled (and whose behaviour
    log-prob the row holds). Rows without the column (hub data, human pairs) keep their encoding."""
    have = [i for i, r in enumerate(rows) if r.get(column) is not None]
    if not have:
        return encoded
    known = [i for i in have if max(rows[i][column]) < len(tokenizer)]
    texts = tokenizer.batch_decode([rows[i][column] for i in known], skip_special_tokens=True)
    match = [i for i, text in zip(known, texts) if text.strip() == reply_text(rows[i][ours])]
    out = list(encoded)
    for i in match:
        out[i] = (encoded[i][0], rows[i][column][:max_response_len])
    print(f"{stage}: {len(match)} of {len(rows)} {ours} responses are the sampled token ids of column "
          f"{column!r}" + (f"; {len(have) - len(match)} are not this tokenizer's ids of their text and are "
                           f"encoded from it" if len(match) < len(have) else ""))
    return out


def report_shaping(stage, tokenizer, prompts, responses=()):
    """Say, once per stage, what tokenizing did to its data: responses longer than --max_response_len
    cut before their EOS, and words the tokenizer does not know turned into <unk>. Token id lists."""
    cut = sum(not r or r[-1] != tokenizer.eos_token_id for r in responses)
    unk = tokenizer.unk_token_id
    unknown = 0 if unk is None else sum(ids.count(unk) for ids in [*prompts, *responses])
    said = f"{unknown} unknown tokens (<unk>) in {len(prompts)} prompts"
    if responses:
        said = (f"{cut} of {len(responses)} responses were longer than --max_response_len and cut without "
                f"EOS; {said} and their responses")
    print(f"{stage}: {said}")


def encode_prompts(tokenizer, prompts, max_prompt_len, truncate_prompts=False):
    """Token ids of each prompt (one batched tokenizer call): a text as it is, a message list through the
    chat template with its generation prompt (chat_text); an over-long prompt is refused, or cut if asked:
    a text from the left (its end, 'TL;DR:', is what cues the summary), a conversation inside its messages'
    contents (truncate_chat), never in the template's headers.

    BOS: where the tokenizer adds one itself (adds_bos: Llama's does, Pythia's and the toy's do not), every
    prompt starts with it, unless it already does (a chat template usually writes BOS as text): never two."""
    prompts = list(prompts)
    chat = any(isinstance(p, list) for p in prompts)
    if chat:
        end_of_turn(tokenizer)
    texts = [render(tokenizer, p, True) if isinstance(p, list) else p for p in prompts]
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    out = []
    for prompt, ids in zip(prompts, tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []):
        if not ids:
            fail("a prompt is empty (no tokens): nothing to condition a summary on")
        ids = ids if ids[:1] == bos else bos + ids
        if len(ids) > max_prompt_len:
            if not truncate_prompts:
                fail(f"a prompt has {len(ids)} tokens > --max_prompt_len {max_prompt_len} "
                     f"(raise it, or pass --truncate_prompts to cut prompts"
                     f"{' inside their messages' if chat else ' from the left'})")
            if isinstance(prompt, list):
                ids = truncate_chat(tokenizer, prompt, max_prompt_len, bos)
            else:  # keep the end: 'TL;DR:' is what cues the summary (and BOS, where there is one)
                ids = bos + ids[len(ids) - max(max_prompt_len - len(bos), 0):]
        out.append(ids)
    return out


def adds_bos(tokenizer):
    """Whether the tokenizer puts BOS before a text itself (Llama's: tokenizer("x") starts with BOS, and
    tokenizer("x", add_special_tokens=False) does not). We tokenize without special tokens and add it."""
    bos = tokenizer.bos_token_id
    return (bos is not None and tokenizer("x")["input_ids"][:1] == [bos]
            and tokenizer("x", add_special_tokens=False)["input_ids"][:1] != [bos])


def special_ids(tokenizer):
    """The ids of every special token: BOS, EOS, pad, unknown, and the added ones marked special (a chat
    template's headers and end-of-turn, e.g. Llama-3's <|start_header_id|>, <|eot_id|>)."""
    added = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return set(tokenizer.all_special_ids) | added


def render(tokenizer, messages, generation_prompt):
    """A conversation as the chat template writes it, as text (generation_prompt: the assistant's header
    after it)."""
    if not tokenizer.chat_template:
        fail("the data is conversational (message lists) but the tokenizer has no chat template: pass "
             "--chat_template (a .jinja file, or the template) to sft.py, which saves it with pi_ref")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as e:  # the template's raise_exception (e.g. roles must alternate), a broken template
        fail(f"the chat template could not render a conversation: {type(e).__name__}: {str(e)[:200]}")


def chat_text(tokenizer, prompt, reply):
    """The text of the reply to a prompt (messages) as the template writes it: the rendering of the whole
    conversation after the rendering of the prompt with its generation prompt (refused where the one does
    not start with the other: there would be no prompt / response split)."""
    reply = reply if isinstance(reply, list) else [{"role": "assistant", "content": reply}]
    before, full = render(tokenizer, prompt, True), render(tokenizer, prompt + reply, False)
    if not full.startswith(before):
        fail("the chat template writes a conversation so that it does not start with its prompt as written "
             "with the generation prompt: no prompt / response split (use another --chat_template)")
    return full[len(before):]


def end_of_turn(tokenizer):
    """The token that ends an assistant turn in the chat template (Llama-3: <|eot_id|>, ChatML: <|im_end|>):
    the first special token after the reply's text in a rendered probe. It becomes the tokenizer's EOS --
    as TRL's clone_chat_template does, and as Llama-3-Instruct ships -- so that sampling stops where the
    data's replies end, a finished sample is one that ended with it, and pi_ref saved with this tokenizer
    carries it to the later stages. Returns its id."""
    probe = [{"role": "user", "content": "Hi"}]
    text = chat_text(tokenizer, probe, "Yes")
    special = special_ids(tokenizer)
    before, after = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in text.split("Yes", 1))
    ends = [t for t in after if t in special]
    if "Yes" not in text or any(t in special for t in before) or not ends:
        fail(f"the chat template does not write an assistant reply as its text then a special end-of-turn "
             f"token (it wrote {text!r} after the generation prompt): use another --chat_template")
    if tokenizer.eos_token_id != ends[0]:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(ends[0])
    return ends[0]


def truncate_chat(tokenizer, messages, max_prompt_len, bos):
    """The token ids of a conversation cut to max_prompt_len inside its messages' contents: tokens go from
    the start of the oldest non-system message's content (the first user turn), then the next ones'; the
    template's BOS, headers and generation prompt are kept whole. Refused if those alone are too long."""
    messages = [dict(m) for m in messages]
    for message in (m for m in messages if m["role"] != "system"):
        content = tokenizer(message["content"], add_special_tokens=False)["input_ids"]
        while True:
            ids = tokenizer(render(tokenizer, messages, True), add_special_tokens=False)["input_ids"]
            ids = ids if ids[:1] == bos else bos + ids
            if len(ids) <= max_prompt_len:
                return ids
            if not content:
                break
            content = content[len(ids) - max_prompt_len:]  # at least the excess: a step closer each time
            message["content"] = tokenizer.decode(content)
    fail(f"a prompt's chat template alone (its headers, system prompt and generation prompt) has {len(ids)} "
         f"tokens > --max_prompt_len {max_prompt_len}")


def encode_rows(tokenizer, prompts, responses, max_prompt_len, max_response_len, truncate_prompts=False,
                add_eos=True):
    """[(prompt_ids, response_ids)] per row, each response cut at max_response_len.

    Text: the response is ' ' + text + EOS (a completion that starts with a space keeps its own).
    Conversations (the prompt a message list, the response an assistant message or its text): the response
    is the reply as the chat template writes it after the prompt's generation prompt (chat_text), up to and
    including its end-of-turn token, which is the tokenizer's EOS (end_of_turn); no space is added, and no
    second EOS is appended (TRL's DPO appends EOS to every response, giving Llama-3-Instruct's replies
    <|eot_id|><|eot_id|>). What a template writes after the end token (ChatML's newline) belongs to the
    next turn and is dropped: sampling stops at the end token, so sampled replies end as these do. Prompt
    and reply are tokenized apart, as the model reads a prompt and then samples a reply.
    add_eos=False leaves EOS off (text) or takes the end token off (conversations)."""
    prompt_ids = encode_prompts(tokenizer, prompts, max_prompt_len, truncate_prompts)
    chat = [isinstance(p, list) for p in prompts]
    texts = [chat_text(tokenizer, p, r) if c else r if r[:1].isspace() else " " + r
             for p, r, c in zip(prompts, responses, chat)]
    eos = tokenizer.eos_token_id
    response_ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    out = []
    for p, r, c in zip(prompt_ids, response_ids, chat):
        if c and eos in r:  # the reply up to its end token (end_of_turn found one in the template)
            r = r[:r.index(eos) + 1] if add_eos else r[:r.index(eos)]
        else:
            r = r + [eos] * add_eos
        out.append((p, r[:max_response_len]))
    return out


def encode(tokenizer, prompt, response, max_prompt_len, max_response_len, truncate_prompts=False,
           add_eos=True):
    """One row of encode_rows: (prompt_ids, response_ids)."""
    return encode_rows(tokenizer, [prompt], [response], max_prompt_len, max_response_len, truncate_prompts,
                       add_eos)[0]



# ----------------------------------------------------------------------------------------------
# 3. batches, and the hidden states that predict the response tokens


def collate(examples, pad_id):
    """Right-padded batch of prompt + response.

    examples: list of (prompt_ids, response_ids). Returns input_ids [B, L], attention_mask [B, L]
    and response_mask [B, L] (1 where the token is a response token, EOS included).
    """
    length = max(len(p) + len(r) for p, r in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    response_mask = torch.zeros((len(examples), length), dtype=torch.bool)
    for i, (p, r) in enumerate(examples):
        input_ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        attention_mask[i, :len(p) + len(r)] = 1
        response_mask[i, len(p):len(p) + len(r)] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}


def collate_grouped(examples, pad_id, k=1):
    """A batch whose prompts are run once for k responses each (see response_hidden).

    examples: (prompt_ids, response_ids), in groups of k consecutive rows sharing one prompt (k=2
    for a preference pair: chosen, rejected). Prompts are left-padded as in `sample`; responses are
    right-padded. Returns prompt_ids, prompt_mask [P, Lp] and response_ids, response_mask [P*k, Lr].
    """
    if len(examples) % k or any(examples[i][0] != examples[i - i % k][0] for i in range(len(examples))):
        raise ValueError(f"examples must come in groups of {k} rows with the same prompt")
    prompts, responses = [p for p, _ in examples[::k]], [r for _, r in examples]
    width, length = max(map(len, prompts)), max(map(len, responses))
    return {"prompt_ids": torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts]),
            "prompt_mask": torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts]),
            "response_ids": torch.tensor([r + [pad_id] * (length - len(r)) for r in responses]),
            "response_mask": torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in responses])}


def response_hidden(base_model, batch):
    """Last-layer hidden states over the response positions; each prompt is run once for its k responses.

    batch: collate_grouped output. Returns h [P*k, Lr + 1, H]: h[:, t] has read the prompt and the
    first t response tokens, so h[:, t] predicts response token t (h[:, :-1] lines up with
    response_ids), and h[i, len_i] has read all of response i (a reward model's score is read there).
    How: the prompt goes through once with use_cache; its keys and values are repeated k times and
    every response continues from its copy, with position ids that count real tokens only. A
    preference pair so costs one prompt instead of two (the prompt is most of a TL;DR sequence).
    """
    if base_model.training and base_model.is_activation_checkpointing:
        return response_hidden_whole(base_model, batch)  # checkpointed layers keep no cache
    prompt_mask, response_mask = batch["prompt_mask"], batch["response_mask"]
    k = len(response_mask) // len(prompt_mask)
    position = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    out = base_model(input_ids=batch["prompt_ids"], attention_mask=prompt_mask, position_ids=position,
                     use_cache=True)
    cache, last = out.past_key_values, out.last_hidden_state[:, -1:]  # left padding: the last column is real
    if k > 1:
        cache.batch_repeat_interleave(k)
        last, prompt_mask, position = (t.repeat_interleave(k, dim=0) for t in (last, prompt_mask, position))
    position = position[:, -1:] + 1 + torch.arange(response_mask.shape[1], device=position.device)
    out = base_model(input_ids=batch["response_ids"],
                     attention_mask=torch.cat([prompt_mask, response_mask], dim=1),
                     position_ids=position, past_key_values=cache)
    return torch.cat([last, out.last_hidden_state], dim=1)


def response_hidden_whole(base_model, batch):
    """response_hidden's numbers (up to float rounding) without a KV cache: each response runs after its
    own copy of the prompt, prompt + response as one sequence, with the same positions and mask. The path
    of training under gradient checkpointing, where a checkpointed layer keeps no cache (HF drops it): the
    prompt is run k times instead of once."""
    prompt_mask, response_mask = batch["prompt_mask"], batch["response_mask"]
    k = len(response_mask) // len(prompt_mask)
    prompt_ids, prompt_mask = (t.repeat_interleave(k, dim=0) for t in (batch["prompt_ids"], prompt_mask))
    position = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    position = torch.cat([position, position[:, -1:] + 1 + torch.arange(response_mask.shape[1],
                                                                         device=position.device)], dim=1)
    out = base_model(input_ids=torch.cat([prompt_ids, batch["response_ids"]], dim=1),
                     attention_mask=torch.cat([prompt_mask, response_mask], dim=1), position_ids=position)
    return out.last_hidden_state[:, prompt_ids.shape[1] - 1:]  # the prompt's last column, then the response


def to_device(batch, device):
    return {k: v.to(device) for k, v in batch.items()}



# ----------------------------------------------------------------------------------------------
# 4. the model: load a causal LM, or build the tiny GPT-NeoX


def load_pretrained(auto_class, path, what, new_weights=(), **kwargs):
    """A model whose every weight was in its files: a reward model read as a policy (no language-model
    head) or pi_ref read as a reward model (no score head) is refused, not completed with random
    weights; an unreadable or truncated checkpoint ends in one line. new_weights: names of weights
    that may start fresh (the reward model's head, trained from pi_ref). The weights are read as float32
    whatever dtype the files store (Pythia ships float16, Llama bfloat16; transformers would keep that
    dtype): training keeps float32 master weights, and --precision decides what runs in lower precision."""
    try:
        model, info = auto_class.from_pretrained(path, output_loading_info=True, dtype=torch.float32,
                                                 **kwargs)
    except Exception as e:  # missing, truncated, foreign: all end here
        first_line = (str(e).splitlines() or [""])[0][:200]
        fail(f"could not load {what} from {path!r}: {type(e).__name__}: {first_line}")
    missing = [k for k in info["missing_keys"] if not k.startswith(tuple(new_weights))]
    if missing:
        fail(f"{path} is not {what}: its files lack the weights {', '.join(sorted(missing)[:3])}")
    return model


def load_policy(path):
    """A causal LM (pi_ref, a checkpoint of a run) from a directory or a hub id."""
    from transformers import AutoModelForCausalLM

    return load_pretrained(AutoModelForCausalLM, path, "a policy (a causal LM with its output layer)")


def check_positive(args, *names):
    for name in names:
        if getattr(args, name) <= 0:
            fail(f"--{name} must be positive, got {getattr(args, name)}")


def load_causal_lm(args, tokenizer):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    if args.model_name_or_path:
        return load_policy(args.model_name_or_path)
    check_positive(args, "n_layer", "n_embd", "n_head")
    if args.n_embd % args.n_head:
        fail(f"--n_embd {args.n_embd} must be divisible by --n_head {args.n_head}")
    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=args.n_embd, num_hidden_layers=args.n_layer,
                           num_attention_heads=args.n_head, intermediate_size=4 * args.n_embd,
                           max_position_embeddings=args.max_prompt_len + args.max_response_len,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    return GPTNeoXForCausalLM(config)


def banned_ids(tokenizer, model=None):
    """Ids a response must never contain: the special tokens but EOS (a response ends with EOS and holds no
    other special token; a chat template's headers are special tokens too) and, given the model, the ids
    of its output layer that the tokenizer has no token for: a padded vocabulary (Pythia: 50,304 logits for
    50,277 tokens) has rows that decode to nothing."""
    padded = range(len(tokenizer), model.get_output_embeddings().weight.shape[0]) if model is not None else ()
    return sorted(special_ids(tokenizer) - {tokenizer.eos_token_id} | set(padded))



# ----------------------------------------------------------------------------------------------
# 5. sampling with a KV cache


@torch.no_grad()
def sample(model, prompts, eos_id, pad_id, max_new_tokens, temperature=1.0, batch_size=256, generator=None,
           desc=None, suppress_ids=(), logps_of="policy"):
    """Sample one response per prompt, batched, with a KV cache.

    prompts: list of token-id lists. Prompts are left-padded; the attention mask hides the
    padding and position ids count real tokens only, so a row sees exactly what it would see
    alone (tests check this against teacher forcing). temperature 0 = greedy.
    suppress_ids (e.g. banned_ids(tokenizer)) are never drawn.
    Returns (responses, logps): responses are id lists cut after the first EOS (EOS kept); logps are
    the summed log-probs of the sampled tokens, of one of two distributions:
      logps_of="policy": the temperature-1 policy without suppression, exactly what teacher forcing
        gives (the temperature and the suppression only decide which token is drawn);
      logps_of="sampler": the distribution each token was drawn from, softmax((logits with
        suppress_ids at -inf) / temperature): the behaviour log-probs of the samples (greedy: 0).
    """
    if logps_of not in ("policy", "sampler"):
        raise ValueError(f"logps_of must be policy or sampler, got {logps_of!r}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    responses, logps = [], []
    banned = torch.tensor(list(suppress_ids), dtype=torch.long, device=device)
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc=desc, leave=False, disable=desc is None):
        tokens, totals = sample_batch(model, prompts[start:start + batch_size], eos_id, pad_id,
                                      max_new_tokens, temperature, generator, banned)
        for row in tokens:
            cut = row.index(eos_id) + 1 if eos_id in row else len(row)
            responses.append(row[:cut])
        logps += totals[logps_of].tolist()
    model.train(was_training)
    return responses, logps


def sample_batch(model, chunk, eos_id, pad_id, max_new_tokens, temperature, generator, banned):
    """One batch of `sample`: (token lists [B, <= max_new_tokens], pad after EOS; {"policy": summed log-probs
    [B] under the temperature-1 policy, "sampler": under the distribution drawn from})."""
    device = banned.device
    width = max(len(p) for p in chunk)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    done = torch.zeros(len(chunk), dtype=torch.bool, device=device)
    totals = {name: torch.zeros(len(chunk), device=device) for name in ("policy", "sampler")}
    out_tokens, cache = [], None
    for _ in range(max_new_tokens):
        out = model(input_ids=ids, attention_mask=mask, position_ids=position, past_key_values=cache,
                    use_cache=True)
        cache = out.past_key_values
        logits = out.logits[:, -1].float()
        allowed = logits.index_fill(-1, banned, float("-inf")) if len(banned) else logits
        if temperature == 0:
            token = allowed.argmax(-1)
            drawn = torch.zeros_like(logits)  # greedy: the drawn token has probability 1
        else:
            probs = torch.softmax(allowed / temperature, dim=-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            drawn = torch.log_softmax(allowed / temperature, dim=-1)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        for name, token_logps in (("policy", torch.log_softmax(logits, -1)), ("sampler", drawn)):
            totals[name] += torch.where(done, 0.0, token_logps.gather(-1, token[:, None]).squeeze(-1))
        out_tokens.append(token)
        done |= token == eos_id
        if done.all():
            break
        ids, position = token[:, None], position[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(token)[:, None]], dim=1)
    return torch.stack(out_tokens, dim=1).tolist(), totals


def decode_response(tokenizer, ids):
    """(text, finished): text without special tokens; finished = ended with EOS."""
    finished = bool(ids) and ids[-1] == tokenizer.eos_token_id
    return tokenizer.decode(ids, skip_special_tokens=True).strip(), finished



# ----------------------------------------------------------------------------------------------
# 6. the run around a stage: seeds, device, files, finite checks


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PRECISION_HELP = ("auto (bf16 autocast on CUDA, float32 on the CPU) | fp32 | bf16 (bf16 autocast) | fp16 "
                  "(fp16 autocast with a gradient scaler); the weights and the optimizer stay float32")


def device_and_autocast(precision="auto"):
    """(device, autocast): CUDA when present, else the CPU; the autocast of --precision (METHOD.md,
    section 2): auto = bf16 on CUDA and none (float32) on the CPU. Autocast runs the matrix products in
    the lower precision; the weights themselves stay float32 (load_pretrained loads them so)."""
    device = torch.device(f"cuda:{distributed.WORLD.local_rank}" if torch.cuda.is_available() else "cpu")
    if precision not in PRECISIONS:
        fail(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return device, nullcontext()
    return device, torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def grad_scaler(precision, device):
    """torch's GradScaler for --precision fp16 (fp16 gradients underflow without it); a pass-through
    (scale, unscale_, step and update change nothing) in every other mode."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def optimizer_step(step, model, optimizer, scheduler, scaler, grad_clip, loss):
    """The update after a step's backward passes (of scaler.scale(loss)): unscale, clip to grad_clip, stop
    the run at a non-finite loss or gradient norm (check_finite), step, schedule. Under fp16 a non-finite
    gradient norm is the scaler's overflow, not a broken run: the scaler skips that update and lowers its
    scale. Returns the gradient norm (before clipping)."""
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP's
    check_finite(step, loss=loss, **({} if scaler.is_enabled() else {"grad_norm": grad_norm}))
    scaler.step(optimizer)
    scaler.update()
    with warnings.catch_warnings():  # the schedule counts steps, skipped ones too: torch's warning that an
        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")  # update was skipped is not
        scheduler.step()  # news here
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


SCHEDULES = ("cosine", "constant")


def schedule_factor(step, warmup_steps, total_steps, shape="cosine", min_lr_ratio=0.0):
    """The learning rate at optimizer step `step` as a fraction of the peak --lr.

    Linear warm-up from 0 over warmup_steps, then either constant (1) or a half cosine from 1 down to the
    floor min_lr_ratio, reached at total_steps:
        warm-up:  step / warmup,  warmup = warmup_steps
        cosine:   m + (1 - m) * (1 + cos(pi * p)) / 2,  p = (step - warmup) / (total_steps - warmup)
    m = 0 is transformers' get_cosine_schedule_with_warmup to the last bit (same float operations); m > 0 is
    its cosine_with_min_lr (the IS-DAAs code decays to 0.1 of the peak)."""
    if step < warmup_steps:
        return float(step) / float(max(1, warmup_steps))
    if shape == "constant":
        return 1.0
    progress = float(step - warmup_steps) / float(max(1, total_steps - warmup_steps))
    factor = 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress))
    if min_lr_ratio:
        factor = factor * (1.0 - min_lr_ratio) + min_lr_ratio
    return max(0.0, factor)


def lr_schedule(optimizer, warmup_steps, total_steps, shape="cosine", min_lr_ratio=0.0):
    """The one learning-rate schedule of every training stage (sft.py, reward.py, dpo.py): a LambdaLR over
    schedule_factor. Its state_dict is what --resume saves (the factor itself is a pure function)."""
    if shape not in SCHEDULES:
        fail(f"--lr_schedule must be one of {', '.join(SCHEDULES)}, got {shape!r}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        fail(f"--min_lr_ratio must be in [0, 1] (a fraction of --lr), got {min_lr_ratio}")
    factor = functools.partial(schedule_factor, warmup_steps=warmup_steps, total_steps=total_steps,
                               shape=shape, min_lr_ratio=min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def save_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def append_jsonl(path, row):
    """Append one row with one write() to a file opened for appending: rows written side by side never
    interleave, and a stop tears at most the last line (evaluate.read_results drops it)."""
    line = (json.dumps(row) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if os.write(fd, line) != len(line):
            raise OSError(28, "short write (disk full?)", path)
    finally:
        os.close(fd)


def check_finite(step, **values):
    """Stop the run at the first non-finite loss or gradient norm: a NaN never heals. Nothing is published."""
    for name, value in values.items():
        value = float(value.detach()) if torch.is_tensor(value) else float(value)
        if not math.isfinite(value):
            fail(f"non-finite {name} ({value}) at step {step}: training stopped, nothing saved")


def parameter_norm(model):
    """The norm of all weights, checked finite when training ends: no loss checks the last update."""
    squares = sum(p.detach().float().pow(2).sum() for p in model.parameters())
    return torch.sqrt(squares.full_tensor() if hasattr(squares, "full_tensor") else squares)  # FSDP's shards



# ----------------------------------------------------------------------------------------------
# 7. resumable training: the state of a run, saved every --save_every steps in its unfinished output
# (stage.start_output(..., resumable=True) keeps that directory across a kill)


def _settings(args):
    """What a resumed run must share with the interrupted one: every flag but --resume and --save_every."""
    return {k: v for k, v in dataclasses.asdict(args).items() if k not in ("resume", "save_every")}


def save_state(work, args, step, total, model, optimizer, scheduler, order, cursor, scaler=None):
    """Every --save_every steps (but the last of `total`), all that the loop needs to go on after `step`
    exactly as if never stopped: weights, optimizer moments, schedule, fp16's loss scale (the scaler's),
    random generators, the data order and the place in it, and how much of train_log.jsonl is written.
    Written aside and renamed: a kill leaves this state or the one before. Over several processes nothing
    is saved (--resume is one process's: join_processes)."""
    if distributed.WORLD.size > 1 or not args.save_every or step % args.save_every or step == total:
        return
    numpy_rng = np.random.get_state()
    state = {"step": step, "order": order, "cursor": cursor, "settings": _settings(args),
             "log_bytes": os.path.getsize(os.path.join(work, "train_log.jsonl")),
             "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(),
             "rng": {"python": random.getstate(),
                     "numpy": [numpy_rng[0], numpy_rng[1].tolist(), *numpy_rng[2:]],
                     "torch": torch.get_rng_state(),
                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}
    if scaler is not None and scaler.is_enabled():
        state["scaler"] = scaler.state_dict()
    try:
        torch.save(state, os.path.join(work, "state.pt.tmp"))
    except RuntimeError as e:  # torch reports a full disk so; an OSError ends the run in one line
        raise OSError(f"could not save the training state in {work}: {e}") from e
    os.replace(os.path.join(work, "state.pt.tmp"), os.path.join(work, "state.pt"))


def remove_state(work):
    """The saved state is for --resume only: it is not part of the published output."""
    for name in ("state.pt", "state.pt.tmp"):  # .tmp: a save cut short by a kill
        if os.path.exists(os.path.join(work, name)):
            os.remove(os.path.join(work, name))


def restore_state(work, args, model, optimizer, scheduler, scaler=None):
    """(last step done, data order, cursor): from the saved state of an interrupted run if `work` holds
    one (weights, optimizer, schedule and random generators are restored in place), else (0, [], 0)."""
    if distributed.WORLD.size > 1:  # --resume is refused over several processes (join_processes)
        return 0, [], 0
    path = os.path.join(work, "state.pt")
    if not os.path.exists(path):
        return 0, [], 0
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a state torn by a full disk: say so in one line
        fail(f"could not read the saved state {path} ({type(e).__name__}): remove {work} to start over")
    changed = [k for k, v in _settings(args).items() if state["settings"].get(k) != v]
    if changed:
        changed = ", ".join("--" + k for k in changed)
        fail(f"--resume with other settings than the interrupted run ({changed}): "
             f"use the same, or remove {work} to start over")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    rng = state["rng"]
    random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
    np.random.set_state((rng["numpy"][0], np.array(rng["numpy"][1], dtype=np.uint32), *rng["numpy"][2:]))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    with open(os.path.join(work, "train_log.jsonl"), "r+b") as f:
        f.truncate(state["log_bytes"])  # the rows of steps after the save are written again
    print(f"resumed from the state saved at step {state['step']}")
    return state["step"], state["order"], state["cursor"]
