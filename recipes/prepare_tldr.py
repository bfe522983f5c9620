"""
recipes/prepare_tldr.py -- TL;DR prompts cut to a token budget a paragraph at a time, as the paper's data.

The stages' own --truncate_prompts cuts an over-long prompt's tokens from the left, which keeps 'TL;DR:' but
loses the SUBREDDIT and TITLE lines and starts mid-word. The paper (App. D) truncates at paragraph level:
its data are the TL;DR sets preprocessed as OpenAI's summarize-from-feedback code does (Stiennon et al.
2020; Huang et al. 2024, "The N+ implementation details of RLHF"), which, while the formatted prompt has
more than --max_prompt_len tokens, cuts the POST at its last newline -- or, when the post has no newline
left, drops its last character -- and formats it again:

    SUBREDDIT: r/{subreddit}\\n\\nTITLE: {title}\\n\\nPOST: {post}\\n\\nTL;DR:     (Reddit rows)
    TITLE: {title}\\n\\n{article}\\n\\nTL;DR:                                    (CNN/DM rows of
                                                                                tldr-preference's validation)

Only the post (the article) is cut; the frame stays whole. A row that does not fit even with an empty post
is dropped and counted. Tokens are counted as the stages count them (the tokenizer, no special tokens).

Reads trl-lib/tldr ({prompt, completion}) or trl-lib/tldr-preference ({prompt, chosen, rejected}) rows from a
hub id, a local snapshot directory, or a .json/.jsonl/.parquet file (policy.load_rows); every other column
is kept as it is. Writes one .jsonl file (atomically; an existing file is refused) that the stages read with
--data <file>:

    python recipes/prepare_tldr.py --data trl-lib/tldr --split train --tokenizer_path EleutherAI/pythia-1b \\
        --max_prompt_len 512 --out data/tldr_train.jsonl
"""
import os
import re
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import policy  # noqa: E402
import stage  # noqa: E402
import toy_tldr  # noqa: E402
from stage import fail  # noqa: E402

# (head, body, tail) of each frame; the body is what gets cut
FRAMES = (re.compile(r"(SUBREDDIT: r/.*?\n\nTITLE: .*?\n\nPOST: )(.*)(\n\nTL;DR:)", re.DOTALL),
          re.compile(r"(TITLE: .*?\n\n)(.*)(\n\nTL;DR:)", re.DOTALL))


@dataclass
class Args:
    data: str = field(default="trl-lib/tldr", metadata={
        "help": "hub id, local snapshot dir, or .json/.jsonl/.parquet file of TL;DR rows"})
    split: str = field(default="train", metadata={"help": "split to read from a hub id or snapshot"})
    prompt_column: str = field(default="prompt", metadata={"help": "column holding the prompt"})
    tokenizer_path: str = field(default="", metadata={"help": "tokenizer dir or hub id (the policy's)"})
    max_prompt_len: int = field(default=512, metadata={"help": "prompt token budget (the paper: 512)"})
    out: str = field(default="", metadata={"help": "output .jsonl file"})


def split_frame(prompt):
    """(head, body, tail) of a TL;DR prompt; None when it is in neither frame."""
    for frame in FRAMES:
        match = frame.fullmatch(prompt)
        if match:
            return match.groups()
    return None


def truncate_prompt(prompt, count, budget):
    """The prompt with its post cut at paragraph level until count(prompt) <= budget (OpenAI's
    process_query: cut at the last '\\n', else drop the last character); None when even an empty post is
    too long. count: text -> number of tokens."""
    head, body, tail = split_frame(prompt)
    text = prompt
    while count(text) > budget:
        if not body:
            return None
        cut = body.rfind("\n")
        body = body[:cut] if cut >= 0 else body[:-1]
        text = head + body + tail
    return text


def prepare(args, tokenizer):
    """The rows of --data with their prompts truncated, the rows that cannot fit dropped; and a report."""
    rows = policy.load_rows(args.data, "train.jsonl", args.split, {"prompt": args.prompt_column})
    for i, row in enumerate(rows, 1):
        if split_frame(row["prompt"]) is None:
            fail(f"{args.data} row {i}: the prompt is not in a TL;DR frame ('SUBREDDIT: r/... TITLE: ... "
                 f"POST: ... TL;DR:'): {row['prompt'][:60]!r}")

    def count(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    kept, cut, dropped = [], 0, 0
    for row in rows:
        prompt = truncate_prompt(row["prompt"], count, args.max_prompt_len)
        if prompt is None:
            dropped += 1
            continue
        cut += prompt != row["prompt"]
        kept.append({args.prompt_column: prompt, **{k: v for k, v in row.items() if k != "prompt"}})
    if not kept:
        fail(f"no row of {args.data} fits --max_prompt_len {args.max_prompt_len}")
    return kept, (f"prepare_tldr: {len(rows)} rows, {cut} posts cut to fit {args.max_prompt_len} tokens, "
                  f"{dropped} dropped (too long even with an empty post)")


def main(args):
    stage.check_args(args, positive=("max_prompt_len",))
    if not args.out.endswith(".jsonl"):
        fail(f"--out must name a .jsonl file, got {args.out!r}")
    if os.path.exists(args.out):
        fail(f"{args.out} exists; remove it first (this script does not overwrite)")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        fail(f"the directory of --out {args.out} does not exist")
    tokenizer = policy.load_tokenizer(args.tokenizer_path)
    rows, report = prepare(args, tokenizer)
    tmp = os.path.join(os.path.dirname(args.out) or ".", f".{os.path.basename(args.out)}.{os.getpid()}.tmp")
    toy_tldr.write_jsonl(tmp, rows)  # written aside and renamed: all the rows, or no file
    os.replace(tmp, args.out)
    print(f"{report}; wrote {args.out}")


if __name__ == "__main__":
    main(stage.parse_args(Args, __doc__))
