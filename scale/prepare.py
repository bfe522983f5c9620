"""
scale/prepare.py -- a data set from outside turned into the canonical form the stages read.

    python -m scale.prepare --kind sft --data HuggingFaceH4/ultrachat_200k --split train_sft \\
        --completion_column messages --tokenizer_path meta-llama/Llama-3.2-3B \\
        --chat_template recipes/llama3.jinja --max_prompt_len 1024 --truncate_prompts --out_dir data/ultrachat
    python -m scale.prepare --kind prefs --data trl-lib/tldr-preference \\
        --tokenizer_path EleutherAI/pythia-1b --max_prompt_len 512 --tldr_truncation --out_dir data/tldr_pref

--data: a hub id, a local .json/.jsonl/.parquet/.csv/.arrow file, a glob of shards ("dir/*.parquet"), or a
local snapshot of a hub data set (as huggingface_hub.snapshot_download leaves it). Every mapped field is
checked (a string, or a conversation: a list of {role, content} messages in one of TRL's forms: UltraChat's
`messages`, UltraFeedback's whole conversations, the implicit prompt, the explicit form).

--out_dir gets (written into a temporary sibling, then renamed into place: all of it, or nothing):
    sft.jsonl | train.jsonl | eval.jsonl   (--kind sft | prefs | eval), one row a line:
        {"prompt": str, "prompt_ids": [int], "completion": str, "completion_ids": [int], ...}
        {"prompt": ..., "prompt_ids": ..., "chosen": ..., "chosen_ids": ..., "rejected": ..., ...}
        {"prompt": ..., "prompt_ids": ..., "reference": ..., "reference_ids": ...}   (reference optional)
      the data's other columns kept. Text prompts: the text, ids with BOS where the tokenizer adds one.
      Conversations: the prompt rendered by the chat template with its generation prompt (BOS exactly
      once); each reply its text as the template writes it, its ids up to and including the template's
      end-of-turn token. Every response's ids end with EOS.
    tokenizer/   the tokenizer (save_pretrained) with its chat template and, for conversations, EOS set to
      the template's end-of-turn token: the stages read it (what "finished" means: a sample ending in EOS).
    prepare.json what was done (flags, counts); it marks the directory as this script's: running again
      replaces it, and any other existing --out_dir is refused.

Prompts longer than --max_prompt_len tokens are refused, or cut: --truncate_prompts (text from the left,
keeping its end; conversations inside their oldest turns' contents, never the template's headers), or
--tldr_truncation (TL;DR posts a paragraph at a time as OpenAI's summarize-from-feedback code does; a row
that does not fit even with an empty post is dropped).
"""
import dataclasses
import json
import os
import shutil
import sys
from dataclasses import dataclass, field

if not __package__:  # run as `python scale/prepare.py`: the repository root on the path, as with -m
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import stage  # noqa: E402
from scale import data  # noqa: E402
from stage import fail  # noqa: E402

FILES = {"sft": "sft.jsonl", "prefs": "train.jsonl", "eval": "eval.jsonl"}
RESPONSES = {"sft": ("completion",), "prefs": ("chosen", "rejected"), "eval": ("reference",)}
MARKER = "prepare.json"
CHUNK = 1000  # rows encoded (and written) at a time


@dataclass
class Args:
    kind: str = field(default="sft", metadata={"help": "sft (prompt, completion) | prefs (prompt, chosen, "
                                                       "rejected) | eval (prompt, optional reference)"})
    data: str = field(default="", metadata={
        "help": "hub id, local .json/.jsonl/.parquet/.csv/.arrow file, glob of shards, or hub snapshot dir"})
    split: str = field(default="train", metadata={"help": "split to read from a hub id or snapshot"})
    prompt_column: str = field(default="prompt", metadata={
        "help": "column of the prompt (may be absent when the responses are whole conversations)"})
    completion_column: str = field(default="completion", metadata={"help": "--kind sft: the response"})
    chosen_column: str = field(default="chosen", metadata={"help": "--kind prefs: the preferred response"})
    rejected_column: str = field(default="rejected", metadata={"help": "--kind prefs: the other response"})
    reference_column: str = field(default="", metadata={
        "help": "--kind eval: the reference response (empty: none)"})
    tokenizer_path: str = field(default="", metadata={"help": "the model's tokenizer: a directory or hub id"})
    chat_template: str = field(default="", metadata={
        "help": "a chat template (.jinja file, or the template) replacing the tokenizer's own"})
    max_prompt_len: int = field(default=0, metadata={"help": "prompt token budget (0: none)"})
    truncate_prompts: bool = field(default=False, metadata={
        "help": "cut over-long prompts (text from the left; conversations inside their oldest turns)"})
    tldr_truncation: bool = field(default=False, metadata={
        "help": "cut TL;DR posts a paragraph at a time to fit --max_prompt_len; drop rows that cannot fit"})
    max_rows: int = field(default=0, metadata={"help": "only the first N rows (0: all)"})
    out_dir: str = field(default="", metadata={"help": "output directory"})


def columns_of(args):
    """{our name: the data's column} for --kind."""
    mapped = {"sft": {"completion": args.completion_column},
              "prefs": {"chosen": args.chosen_column, "rejected": args.rejected_column},
              "eval": {"reference": args.reference_column} if args.reference_column else {}}[args.kind]
    return {"prompt": args.prompt_column, **mapped}


def check(args):
    """Every flag, before any work."""
    stage.check_args(args, non_negative=("max_prompt_len", "max_rows"))
    if args.kind not in FILES:
        fail(f"--kind must be one of {sorted(FILES)}, got {args.kind!r}")
    for name in ("data", "tokenizer_path", "out_dir"):
        if not getattr(args, name):
            fail(f"--{name} is required")
    if (args.truncate_prompts or args.tldr_truncation) and not args.max_prompt_len:
        fail("--truncate_prompts and --tldr_truncation need --max_prompt_len > 0")
    if args.truncate_prompts and args.tldr_truncation:
        fail("--truncate_prompts and --tldr_truncation are two ways to cut a prompt: pass one")
    out = os.path.realpath(args.out_dir)
    if os.path.lexists(args.out_dir) and not os.path.isdir(args.out_dir):
        fail(f"--out_dir {args.out_dir} exists and is not a directory")
    if os.path.isdir(args.out_dir) and os.listdir(args.out_dir) and not os.path.isfile(
            os.path.join(args.out_dir, MARKER)):
        fail(f"--out_dir {args.out_dir} is a non-empty directory that scale/prepare.py did not write (it has "
             f"no {MARKER}): choose another, or empty it")
    source = os.path.realpath(args.data) if os.path.exists(args.data) else ""
    if source and (source == out or source.startswith(out + os.sep)):
        fail(f"--out_dir {args.out_dir} holds --data {args.data}: it would be replaced")


def tldr_cut(tokenizer, rows, max_prompt_len, source):
    """The rows with their TL;DR posts cut a paragraph at a time to fit max_prompt_len tokens (BOS
    counted where the tokenizer adds one), the rows that cannot fit dropped; (rows, cut, dropped)."""
    for i, row in enumerate(rows, 1):
        if not isinstance(row["prompt"], str) or data.split_frame(row["prompt"]) is None:
            fail(f"{source} row {i}: --tldr_truncation: the prompt is not in a TL;DR frame "
                 f"('SUBREDDIT: r/... TITLE: ... POST: ... TL;DR:'): {str(row['prompt'])[:60]!r}")
    budget = max_prompt_len - data.adds_bos(tokenizer)

    def count(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    kept, cut = [], 0
    for row in rows:
        prompt = data.truncate_post(row["prompt"], count, budget)
        if prompt is not None:
            cut += prompt != row["prompt"]
            kept.append({**row, "prompt": prompt})
    return kept, cut, len(rows) - len(kept)


def publish(out_dir, write):
    """write(tmp) into out_dir's temporary sibling, then one rename puts it in place (a previous output of
    this script, checked in `check`, is moved aside first and removed): all of it, or nothing."""
    out_dir = os.path.normpath(out_dir)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        result = write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = f"{out_dir}.old-{os.getpid()}"
    if os.path.exists(out_dir):
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return result


def write_rows(tmp, args, tokenizer, rows, responses):
    """The canonical rows of `rows` into tmp/<file>, CHUNK rows at a time; the number of prompts cut."""
    from tqdm.auto import tqdm

    cut = 0
    with open(os.path.join(tmp, FILES[args.kind]), "w", encoding="utf-8") as f, \
            tqdm(total=len(rows), desc="prepare", unit="row", mininterval=2) as bar:
        for start in range(0, len(rows), CHUNK):
            out, n = data.canonical_rows(tokenizer, rows[start:start + CHUNK], responses, args.max_prompt_len,
                                         args.truncate_prompts, first_row=start + 1)
            cut += n
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out))
            bar.update(len(out))
    return cut


def main(args):
    check(args)
    tokenizer = data.load_tokenizer(args.tokenizer_path, args.chat_template)
    columns = columns_of(args)
    rows = data.load_rows(args.data, FILES[args.kind], args.split, columns, args.max_rows)
    chat = [isinstance(r["prompt"], list) for r in rows]
    if any(chat) and not all(chat):
        fail(f"{args.data}: row {chat.index(not chat[0]) + 1} is {'text' if chat[0] else 'a conversation'}, "
             f"row 1 is not: the rows mix text and conversations")
    if chat[0]:
        data.end_of_turn(tokenizer)  # its end-of-turn token becomes EOS
    read, cut, dropped = len(rows), 0, 0
    if args.tldr_truncation:
        rows, cut, dropped = tldr_cut(tokenizer, rows, args.max_prompt_len, args.data)
        if not rows:
            fail(f"no row of {args.data} fits --max_prompt_len {args.max_prompt_len}")

    def write(tmp):
        tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
        n = write_rows(tmp, args, tokenizer, rows, [c for c in RESPONSES[args.kind] if c in columns])
        report = {"rows_read": read, "rows_written": len(rows), "prompts_cut": cut + n,
                  "rows_dropped": dropped, "conversational": chat[0], "eos_token": tokenizer.eos_token,
                  "file": FILES[args.kind]}
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump({"written_by": "scale/prepare.py", **report, "args": dataclasses.asdict(args)}, f,
                      indent=1)
        return report

    report = publish(args.out_dir, write)
    how = "--tldr_truncation" if args.tldr_truncation else "--truncate_prompts"
    dropped = f", {report['rows_dropped']} dropped (too long even with an empty post)" * args.tldr_truncation
    print(f"prepare: {report['rows_read']} rows read, {report['prompts_cut']} prompts cut to "
          f"--max_prompt_len {args.max_prompt_len} ({how}){dropped}; wrote {report['rows_written']} rows to "
          f"{os.path.join(args.out_dir, report['file'])} and the tokenizer (EOS {report['eos_token']!r}) to "
          f"{os.path.join(args.out_dir, 'tokenizer')}")

if __name__ == "__main__":
    main(stage.parse_args(Args, __doc__))
