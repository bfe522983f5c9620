"""
scale/data.py -- the outside world's data turned into the canonical form the core reads (SPEC: JSON lines of
text columns, with the token ids beside them). scale/prepare.py is its command line.

  1. rows: a hub id, a local .json/.jsonl/.parquet/.csv/.arrow file, a glob of shards, or a local snapshot
     of a hub data set, with a column mapping, every field type-checked; TRL's conversational forms split
     into one prompt (a message list) and one-message replies;
  2. chats: a tokenizer's chat template renders a conversation; its end-of-turn token becomes EOS;
  3. tokens: the prompt's ids (BOS exactly once; over-long prompts cut if asked: text from the left,
     conversations inside their oldest turns' contents) and each response's ids, ending with EOS;
  4. TL;DR prompts cut a paragraph at a time, as OpenAI's summarize-from-feedback code does.
Nothing here is imported by the core: the core meets none of these formats.
"""
import glob
import json
import math
import os
import re

from lm import read_jsonl
from stage import fail

RESPONSES = ("completion", "chosen", "rejected", "reference")  # our names of the response columns
DATA_FILES = (".json", ".jsonl", ".parquet", ".csv", ".arrow")
MARKERS = (".stage.json", "prepare.json")  # a directory holding one was written by this project


# ----------------------------------------------------------------------------------------------
# 1. rows (a JSON-lines file is read as the core reads it: lm.read_jsonl)


def load_rows(source, filename, split, columns, max_rows=0, numeric=()):
    """Rows as dicts with our column names, conversations split (split_conversation).

    source: a directory holding `filename` (a stage's or an earlier prepare's output), a local data file, a
    glob of such files (e.g. "dir/*.parquet": the shards of one split), a local snapshot of a hub data set
    (a directory as huggingface_hub.snapshot_download leaves it: data/<split>-*.parquet, ...) or a hub id.
    columns: {our_name: column_in_the_data}. Every mapped field must be a string or a list of chat messages
    ({"role", "content"}), or a finite number for the names in `numeric`: the first that is not is refused
    with its row and column. The prompt column may be absent when the responses are whole conversations
    (TRL's implicit prompt: their shared beginning). max_rows > 0: only the first max_rows rows.
    Extra columns travel along, but for those named like ours or like our token ids (replaced)."""
    if os.path.isdir(source) and not is_snapshot(source, filename):
        source = os.path.join(source, filename)
        if not os.path.isfile(source):
            fail(f"{source} not found")
    rows, names = load_dataset(source, split)
    rows = rows[:max_rows] if max_rows > 0 else rows
    if not rows:
        fail(f"{source} has no rows")
    implicit = columns.get("prompt") not in names and len(columns) > 1 and all(
        isinstance(rows[0].get(theirs), list) for ours, theirs in columns.items() if ours != "prompt")
    missing = [c for ours, c in columns.items() if c not in names and not (ours == "prompt" and implicit)]
    if missing:
        fail(f"{source} lacks column(s) {missing}; it has {names} (map them with the --*_column flags)")
    kinds = {theirs: "a finite number" if ours in numeric else "a string or a list of messages"
             for ours, theirs in columns.items() if theirs in names}
    for i, row in enumerate(rows, 1):
        for theirs, kind in kinds.items():
            value = row.get(theirs)
            if not has_kind(value, kind):
                why = message_problem(value) if isinstance(value, list) and "messages" in kind else None
                fail(f"{source} row {i}, column {theirs!r}: " + (why or f"expected {kind}, got "
                                                                         f"{json.dumps(value)[:60]}"))
    ours = set(columns) | {f"{c}_ids" for c in columns}
    extra = [c for c in names if c not in columns.values() and c not in ours]
    return [split_conversation({**{o: row.get(theirs) for o, theirs in columns.items()},
                                **{c: row.get(c) for c in extra}}, f"{source} row {i}")
            for i, row in enumerate(rows, 1)]


def has_kind(value, kind):
    """Whether a field holds `kind`: a string or a list of messages, or a finite number (no bool)."""
    if kind == "a string or a list of messages":
        return isinstance(value, str) or (isinstance(value, list) and message_problem(value) is None)
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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
      (`messages` as --prompt_column: prompts to sample after).
    - A text response to a message prompt is the assistant's reply.
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
    for turns in [prompt + row[o] for o in RESPONSES if isinstance(row.get(o), list)] or [prompt]:
        if isinstance(turns, list) and (why := turn_problem(turns)):
            fail(f"{where}: {why}")
    row["prompt"] = prompt
    return row


def turn_problem(messages):
    """Why messages are not one conversation -- a system turn first or none, then user and assistant turns
    by turns, the user's first -- or None."""
    roles = [m["role"] for m in messages]
    for n, role in enumerate(roles, 1):
        if role not in ("system", "user", "assistant"):
            return f"message {n} has the unknown role {role!r} (not system, user or assistant)"
        if role == "system" and n > 1:
            return f"message {n} is a system turn inside the conversation (only the first message may be one)"
    turns = roles[1:] if roles[:1] == ["system"] else roles
    if turns and turns[0] != "user":
        return f"the conversation starts with an {turns[0]!r} turn, not the user's"
    for n, (a, b) in enumerate(zip(turns, turns[1:]), len(roles) - len(turns) + 2):
        if a == b:
            return f"messages {n - 1} and {n} are two {a!r} turns in a row (the turns must alternate)"
    return None


def has_glob(source):
    return any(c in source for c in "*?[")


def is_snapshot(directory, filename):
    """Whether a directory is a local copy of a hub data set rather than this project's output: nothing of
    this project wrote it (no marker), it lacks `filename` and it holds data files (at any depth, e.g.
    data/train-00000-of-00001.parquet)."""
    if os.path.isfile(os.path.join(directory, filename)) or any(
            os.path.isfile(os.path.join(directory, m)) for m in MARKERS):
        return False
    return any(name.endswith(DATA_FILES) for _, _, names in os.walk(directory) for name in names)


def file_kind(path):
    return {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv",
            ".arrow": "arrow"}.get(os.path.splitext(path)[1])


def load_dataset(source, split):
    """(rows, column names) of a local data file, a glob of shards, a local snapshot directory or a hub
    data set.

    Local files are read as they are now, never through the datasets library's cache: that cache knows a
    local file by its path and modification time only, so a file replaced at the same path by one with the
    same mtime (cp -p, rsync -a, tar -x or unzip of another version of the data) would hand back the rows
    of the old one. A snapshot directory's split is found as the hub finds it (its README's configs, else
    the file names) by datasets.load_dataset_builder, which reads no rows; we read its files. A hub id goes
    through datasets.load_dataset, whose cache is keyed by the hub's revision and cannot go stale."""
    if has_glob(source) or source.endswith(DATA_FILES):
        files = sorted(glob.glob(source)) if has_glob(source) else [source]
        if not files or not all(os.path.isfile(f) for f in files):
            fail(f"data file {source} not found" if not has_glob(source) else f"no file matches {source}")
        kinds = {file_kind(f) for f in files}
        if len(kinds) != 1 or None in kinds:
            fail(f"{source}: expected {'/'.join(DATA_FILES)} files of one kind, got {files[:3]}")
        return read_files(source, files, kinds.pop())
    if os.path.exists(source) and not os.path.isdir(source):
        fail(f"{source}: expected a directory or a {'/'.join(DATA_FILES)} file")
    import datasets

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
    csv, arrow: IPC stream or file), read with pyarrow or json, in order; a file that cannot be read is
    refused."""
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet

    rows, names = [], None
    for path in files:
        try:
            if kind == "json":
                table = read_json(path)
                names = names or (list(table[0]) if table else None)
                rows += table
                continue
            if kind == "parquet":
                table = pa.parquet.read_table(path)
            elif kind == "csv":
                table = pa.csv.read_csv(path)
            elif kind == "arrow":
                table = read_arrow(path)
            else:
                fail(f"{source}: data files of kind {kind!r}; expected parquet, json, csv or arrow")
        except (pa.ArrowException, OSError, ValueError) as e:  # empty, truncated, not of its kind
            fail(f"could not read rows from {source} (empty, or not valid {kind}?): {type(e).__name__} "
                 f"{str(e)[:200]}".strip())
        names = names or table.column_names
        rows += table.to_pylist()
    return rows, names or []


def read_json(path):
    """The rows of a JSON-lines file or of a file holding one JSON array of objects."""
    with open(path, encoding="utf-8") as f:
        array = f.read(1024).lstrip().startswith("[")
        f.seek(0)
        table = json.load(f) if array else read_jsonl(path)
    if not all(isinstance(r, dict) for r in table):
        fail(f"{path} is not a JSON array of objects")
    return table


def read_arrow(path):
    """An Arrow IPC stream (as datasets writes its .arrow files) or an Arrow IPC file."""
    import pyarrow as pa

    with pa.memory_map(path) as f:
        try:
            return pa.ipc.open_stream(f).read_all()
        except pa.ArrowInvalid:
            f.seek(0)
            return pa.ipc.open_file(f).read_all()


# ----------------------------------------------------------------------------------------------
# 2. chats


def load_tokenizer(path, chat_template=""):
    """The tokenizer at `path` (a directory or a hub id). chat_template: a chat template (a .jinja file, or
    the template itself) that replaces the tokenizer's own, if any: a base Llama ships none."""
    from transformers import AutoTokenizer

    if not path:
        fail("no tokenizer: pass --tokenizer_path (the model's directory or hub id)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        fail(f"could not load tokenizer {path!r}: {str(e).splitlines()[0][:200]}")
    if chat_template:
        if os.path.isfile(chat_template):
            with open(chat_template, encoding="utf-8") as f:
                chat_template = f.read()
        elif "{{" not in chat_template and "{%" not in chat_template:
            fail(f"--chat_template {chat_template[:60]!r} is neither a file nor a jinja template")
        tokenizer.chat_template = chat_template
    return tokenizer


def render(tokenizer, messages, generation_prompt):
    """A conversation as the chat template writes it, as text (generation_prompt: the assistant's header
    after it)."""
    if not tokenizer.chat_template:
        fail("the data is conversational (message lists) but the tokenizer has no chat template: pass "
             "--chat_template (a .jinja file, or the template)")
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


def special_ids(tokenizer):
    """The ids of every special token: BOS, EOS, pad, unknown, and the added ones marked special (a chat
    template's headers and end-of-turn, e.g. Llama-3's <|start_header_id|>, <|eot_id|>)."""
    added = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return set(tokenizer.all_special_ids) | added


def end_of_turn(tokenizer):
    """The token that ends an assistant turn in the chat template (Llama-3: <|eot_id|>, ChatML: <|im_end|>):
    the first special token after the reply's text in a rendered probe. It becomes the tokenizer's EOS --
    as TRL's clone_chat_template does, and as Llama-3-Instruct ships -- so that sampling stops where the
    data's replies end, and a finished sample is one that ended with it. Returns its id."""
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


def adds_bos(tokenizer):
    """Whether the tokenizer puts BOS before a text itself (Llama's: tokenizer("x") starts with BOS, and
    tokenizer("x", add_special_tokens=False) does not). We tokenize without special tokens and add it."""
    bos = tokenizer.bos_token_id
    return (bos is not None and tokenizer("x")["input_ids"][:1] == [bos]
            and tokenizer("x", add_special_tokens=False)["input_ids"][:1] != [bos])


def truncate_chat(tokenizer, messages, max_prompt_len, bos, where="a prompt"):
    """(ids, messages) of a conversation cut to max_prompt_len inside its messages' contents: tokens go from
    the start of the oldest non-system message's content (the first user turn), then the next ones'; the
    template's BOS, headers and generation prompt are kept whole. Refused if those alone are too long."""
    messages = [dict(m) for m in messages]
    for message in (m for m in messages if m["role"] != "system"):
        content = tokenizer(message["content"], add_special_tokens=False)["input_ids"]
        while True:
            ids = tokenizer(render(tokenizer, messages, True), add_special_tokens=False)["input_ids"]
            ids = ids if ids[:1] == bos else bos + ids
            if len(ids) <= max_prompt_len:
                return ids, messages
            if not content:
                break
            content = content[len(ids) - max_prompt_len:]  # at least the excess: a step closer each time
            message["content"] = tokenizer.decode(content)
    fail(f"{where}: the chat template alone (its headers, system prompt and generation prompt) has "
         f"{len(ids)} tokens > --max_prompt_len {max_prompt_len}")


# ----------------------------------------------------------------------------------------------
# 3. tokens: the canonical rows


def encode_prompts(tokenizer, prompts, max_prompt_len=0, truncate_prompts=False, first_row=1):
    """[(text, ids, cut)] of each prompt (one batched tokenizer call): a text as it is, a message list
    rendered with its generation prompt. max_prompt_len > 0: an over-long prompt is refused, or cut if
    asked -- a text from the left (its end, 'TL;DR:', is what cues the summary; its text is then the
    decoding of the ids kept), a conversation inside its messages' contents (truncate_chat), never in the
    template's headers. BOS: where the tokenizer adds one itself (adds_bos: Llama's does, Pythia's does
    not), every prompt starts with it, unless it already does (a chat template usually writes BOS as
    text): never two. first_row: the row number of prompts[0], for the error lines."""
    texts = [render(tokenizer, p, True) if isinstance(p, list) else p for p in prompts]
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    out = []
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    for n, (prompt, text, ids) in enumerate(zip(prompts, texts, encoded), first_row):
        if not ids:
            fail(f"row {n}: the prompt is empty (no tokens): nothing to condition a response on")
        ids = ids if ids[:1] == bos else bos + ids
        cut = 0 < max_prompt_len < len(ids)
        if cut and not truncate_prompts:
            fail(f"row {n}: the prompt has {len(ids)} tokens > --max_prompt_len {max_prompt_len} (raise it, "
                 f"or pass --truncate_prompts to cut prompts"
                 f"{' inside their messages' if isinstance(prompt, list) else ' from the left'})")
        if cut and isinstance(prompt, list):
            ids, messages = truncate_chat(tokenizer, prompt, max_prompt_len, bos, f"row {n}")
            text = render(tokenizer, messages, True)
        elif cut:  # keep the end: 'TL;DR:' is what cues the summary (and BOS, where there is one)
            ids = bos + ids[len(ids) - max(max_prompt_len - len(bos), 0):]
            text = tokenizer.decode(ids[len(bos):])
        out.append((text, ids, cut))
    return out


def encode_responses(tokenizer, prompts, responses):
    """[(text, ids)] of each response, ending with EOS. Text: ids of ' ' + text (a text that starts with
    whitespace keeps its own), then EOS. Conversations (the prompt a message list, the response an
    assistant message or its text): the reply as the chat template writes it after the prompt's
    generation prompt (chat_text), up to and including its end-of-turn token, which is the tokenizer's EOS
    (end_of_turn); the text is what the template writes before it. What a template writes after the end
    token (ChatML's newline) belongs to the next turn and is dropped: sampling stops at the end token, so
    sampled replies end as these do. No second EOS (TRL's DPO appends EOS to every response, giving
    Llama-3-Instruct's replies <|eot_id|><|eot_id|>)."""
    chat = [isinstance(p, list) for p in prompts]
    texts = [chat_text(tokenizer, p, r) if c else r if r[:1].isspace() else " " + r
             for p, r, c in zip(prompts, responses, chat)]
    eos, eos_text = tokenizer.eos_token_id, tokenizer.eos_token
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    out = []
    for response, text, ids, c in zip(responses, texts, encoded, chat):
        if c and eos in ids:  # the reply up to its end token (end_of_turn found one in the template)
            out.append((text.split(eos_text, 1)[0], ids[:ids.index(eos) + 1]))
        else:
            out.append((text if c else response, ids + [eos]))
    return out


def canonical_rows(tokenizer, rows, responses, max_prompt_len=0, truncate_prompts=False, first_row=1):
    """(rows of the canonical form, number of prompts cut): each row's prompt and `responses` (our column
    names) as text, with their token ids beside them as <column>_ids; its other columns kept."""
    prompts = encode_prompts(tokenizer, [r["prompt"] for r in rows], max_prompt_len, truncate_prompts,
                             first_row)
    out = [{"prompt": text, "prompt_ids": ids} for text, ids, _ in prompts]
    for column in responses:
        have = [i for i, r in enumerate(rows) if r.get(column) is not None]
        encoded = encode_responses(tokenizer, [rows[i]["prompt"] for i in have],
                                   [rows[i][column] for i in have])
        for i, (text, ids) in zip(have, encoded):
            out[i][column], out[i][f"{column}_ids"] = text, ids
    for row, source in zip(out, rows):  # the other columns, after ours
        row.update((c, v) for c, v in source.items() if c not in row)
    return out, sum(cut for _, _, cut in prompts)


# ----------------------------------------------------------------------------------------------
# 4. TL;DR prompts cut a paragraph at a time

# (head, body, tail) of each frame; the body is what gets cut:
#   SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:     (Reddit rows)
#   TITLE: {title}\n\n{article}\n\nTL;DR:          (CNN/DM rows of trl-lib/tldr-preference's validation)
FRAMES = (re.compile(r"(SUBREDDIT: r/.*?\n\nTITLE: .*?\n\nPOST: )(.*)(\n\nTL;DR:)", re.DOTALL),
          re.compile(r"(TITLE: .*?\n\n)(.*)(\n\nTL;DR:)", re.DOTALL))


def split_frame(prompt):
    """(head, body, tail) of a TL;DR prompt; None when it is in neither frame."""
    for frame in FRAMES:
        match = frame.fullmatch(prompt)
        if match:
            return match.groups()
    return None


def truncate_post(prompt, count, budget):
    """The prompt with its post cut at paragraph level until count(prompt) <= budget (OpenAI's
    process_query: cut at the last '\\n', else drop the last character); None when even an empty post is
    too long. count: text -> number of tokens. Only the post (the article) is cut; the frame stays whole."""
    head, body, tail = split_frame(prompt)
    text = prompt
    while count(text) > budget:
        if not body:
            return None
        cut = body.rfind("\n")
        body = body[:cut] if cut >= 0 else body[:-1]
        text = head + body + tail
    return text
