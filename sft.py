"""
sft.py -- supervised fine-tuning: the reference policy pi_ref.

Trains a causal LM on {prompt, completion} rows with the loss on completion tokens only. The
result is pi_ref: the policy every later stage starts from and measures its drift against.

Run (embedded toy world, ~1 minute on a laptop CPU; first `python toy_tldr.py`):
    python sft.py
A real model and data set, same code (on a GPU):
    python sft.py --model_name_or_path EleutherAI/pythia-1b --data trl-lib/tldr \
        --max_prompt_len 512 --max_response_len 53 --truncate_prompts --batch_size 16 \
        --grad_accum 8 --lr 1e-5 --steps 900 --out_dir out/sft_pythia

This file also owns what every later stage needs to handle a policy: loading rows (toy directory,
local json/jsonl/parquet, or a hub id, with a column mapping), tokenizing prompt + response with a
response mask, batching, loading or building the model, and sampling with a KV cache.
"""
import dataclasses
import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import toy_tldr
# the plumbing every stage shares (stage.py); later stages take it from here
from stage import (check_args, check_output, cleans_up, fail, finish_output, parse_args,  # noqa: F401
                      prepare_dir, read_marker, start_output)

# ----------------------------------------------------------------------------------------------
# config


@dataclass
class Args:
    data: str = field(default="out/toy_tldr", metadata={"help": "toy_tldr output dir, a local .json/.jsonl/.parquet file, or a hub dataset id"})
    split: str = field(default="train", metadata={"help": "split to read when --data is a hub id"})
    prompt_column: str = field(default="prompt", metadata={"help": "column holding the prompt"})
    completion_column: str = field(default="completion", metadata={"help": "column holding the target summary"})
    tokenizer_path: str = field(default="", metadata={"help": "tokenizer dir or hub id; default: <data>/tokenizer for the toy, else the model's"})
    model_name_or_path: str = field(default="", metadata={"help": "hub id or local dir of a causal LM; empty = a tiny GPT-NeoX built from the flags below"})
    n_layer: int = field(default=2, metadata={"help": "layers of the tiny model"})
    n_embd: int = field(default=128, metadata={"help": "hidden size of the tiny model"})
    n_head: int = field(default=4, metadata={"help": "attention heads of the tiny model"})
    max_prompt_len: int = field(default=64, metadata={"help": "prompt tokens kept (longer prompts: error, or see --truncate_prompts)"})
    max_response_len: int = field(default=24, metadata={"help": "response tokens kept, EOS included"})
    truncate_prompts: bool = field(default=False, metadata={"help": "cut over-long prompts from the left (keeping 'TL;DR:') instead of refusing"})
    steps: int = field(default=300, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=64, metadata={"help": "examples per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate (AdamW)"})
    warmup_steps: int = field(default=30, metadata={"help": "linear warmup steps before the cosine decay"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm"})
    val_size: int = field(default=500, metadata={"help": "rows held out for the validation loss"})
    num_sample_eval: int = field(default=256, metadata={"help": "toy only: eval prompts whose greedy samples get a true score"})
    seed: int = field(default=0, metadata={"help": "seed for python, numpy and torch"})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch (0 = torch's default)"})
    out_dir: str = field(default="out/sft", metadata={"help": "where pi_ref is saved"})
    resume: bool = field(default=False, metadata={"help": "continue an interrupted run from its saved state"})
    save_every: int = field(default=50, metadata={"help": "steps between states saved for --resume (0: no)"})


# ----------------------------------------------------------------------------------------------
# plumbing shared by every stage: errors, seeds, devices, output directories, resumable training


def check_positive(args, *names):
    for name in names:
        if getattr(args, name) <= 0:
            fail(f"--{name} must be positive, got {getattr(args, name)}")


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def device_and_autocast():
    """CUDA with bf16 autocast when present; CPU float32 otherwise."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.device("cpu"), nullcontext()


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


# ----------------------------------------------------------------------------------------------
# resumable training: the state of a run, saved every --save_every steps in its unfinished output
# (start_output(..., resumable=True) keeps that directory across a kill)


def check_finite(step, **values):
    """Stop the run at the first non-finite loss or gradient norm: a NaN never heals. Nothing is published."""
    for name, value in values.items():
        value = float(value.detach()) if torch.is_tensor(value) else float(value)
        if not math.isfinite(value):
            fail(f"non-finite {name} ({value}) at step {step}: training stopped, nothing saved")


def parameter_norm(model):
    """The norm of all weights, checked finite when training ends: no loss checks the last update."""
    return torch.sqrt(sum(p.detach().float().pow(2).sum() for p in model.parameters()))


def _settings(args):
    """What a resumed run must share with the interrupted one: every flag but --resume and --save_every."""
    return {k: v for k, v in dataclasses.asdict(args).items() if k not in ("resume", "save_every")}


def save_state(work, args, step, total, model, optimizer, scheduler, order, cursor):
    """Every --save_every steps (but the last of `total`), all that the loop needs to go on after `step`
    exactly as if never stopped: weights, optimizer moments, schedule, random generators, the data order
    and the place in it, and how much of train_log.jsonl is written. Written aside and renamed: a kill
    leaves this state or the one before."""
    if not args.save_every or step % args.save_every or step == total:
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


def restore_state(work, args, model, optimizer, scheduler):
    """(last step done, data order, cursor): from the saved state of an interrupted run if `work` holds
    one (weights, optimizer, schedule and random generators are restored in place), else (0, [], 0)."""
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


# ----------------------------------------------------------------------------------------------
# data: rows from the toy, a local file or the hub; tokenized into (prompt_ids, response_ids)


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


def load_rows(source, filename, split, columns, numeric=()):
    """Rows as dicts with our column names.

    source: a toy_tldr output dir (reads <source>/<filename>), a local .json/.jsonl/.parquet file,
    or a hub dataset id. columns: {our_name: column_in_the_data}. Every mapped field must be a string,
    or a finite number for the names in `numeric`: the first that is not is refused with its row and column.
    """
    if os.path.isdir(source):
        source = os.path.join(source, filename)
        if not os.path.isfile(source):
            fail(f"{source} not found (run the stage that writes it first)")
    if source.endswith(".jsonl"):
        if not os.path.isfile(source):
            fail(f"data file {source} not found")
        rows = read_jsonl(source)
        names = list(rows[0]) if rows else []
    else:
        data = load_dataset(source, split)
        rows, names = data.to_list(), data.column_names
    if not rows:
        fail(f"{source} has no rows")
    missing = [c for c in columns.values() if c not in names]
    if missing:
        fail(f"{source} lacks column(s) {missing}; it has {names} (map them with the --*_column flags)")
    for i, row in enumerate(rows, 1):
        for ours, theirs in columns.items():
            value = row.get(theirs)
            if ours in numeric:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            else:
                ok = isinstance(value, str)
            if not ok:
                kind = "a finite number" if ours in numeric else "a string"
                fail(f"{source} row {i}, column {theirs!r}: expected {kind}, got {json.dumps(value)[:60]}")
    # extra columns (scores, behaviour log-probs) travel along
    extra = [c for c in names if c not in columns.values() and c not in columns]
    return [{**{ours: row[theirs] for ours, theirs in columns.items()}, **{c: row.get(c) for c in extra}}
            for row in rows]


def load_dataset(source, split):
    """A local .json/.parquet file or a hub data set, through the datasets library."""
    import datasets

    if source.endswith((".json", ".parquet")):
        if not os.path.isfile(source):
            fail(f"data file {source} not found")
        kind = "parquet" if source.endswith(".parquet") else "json"
        try:
            return datasets.load_dataset(kind, data_files=source, split="train")
        except Exception as e:  # an empty or malformed file ends here, not in a traceback
            fail(f"could not read rows from {source} (empty, or not valid {kind}?): {type(e).__name__} {str(e)[:200]}".strip())
    if os.path.exists(source):
        fail(f"{source}: expected a directory or a .json/.jsonl/.parquet file")
    try:
        return datasets.load_dataset(source, split=split)
    except Exception as e:  # offline, unknown id, unknown split: all end here
        fail(f"could not load dataset {source!r} split {split!r}: {type(e).__name__}: {str(e)[:200]}")


def load_tokenizer(args):
    """The toy's word-level tokenizer, or the model's own; a pad token is guaranteed."""
    from transformers import AutoTokenizer

    path = args.tokenizer_path
    if not path:
        toy = os.path.join(args.data, "tokenizer") if os.path.isdir(args.data) else ""
        path = toy if toy and os.path.isdir(toy) else args.model_name_or_path
    if not path:
        fail("no tokenizer: pass --tokenizer_path or --model_name_or_path")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        fail(f"could not load tokenizer {path!r}: {str(e).splitlines()[0][:200]}")
    if tokenizer.pad_token is None:  # e.g. Pythia: padding is masked out, any id will do
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


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
    """Token ids of each prompt (one batched tokenizer call); an over-long prompt is refused, or cut from the left if asked."""
    out = []
    for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"] if prompts else []:
        if not ids:
            fail("a prompt is empty (no tokens): nothing to condition a summary on")
        if len(ids) > max_prompt_len:
            if not truncate_prompts:
                fail(f"a prompt has {len(ids)} tokens > --max_prompt_len {max_prompt_len} "
                     f"(raise it, or pass --truncate_prompts to cut prompts from the left)")
            ids = ids[-max_prompt_len:]  # keep the end: 'TL;DR:' is what cues the summary
        out.append(ids)
    return out


def encode_rows(tokenizer, prompts, responses, max_prompt_len, max_response_len, truncate_prompts=False, add_eos=True):
    """[(prompt_ids, response_ids)] per row: each response is ' ' + text + EOS, cut at max_response_len."""
    prompt_ids = encode_prompts(tokenizer, prompts, max_prompt_len, truncate_prompts)
    texts = [r if r[:1].isspace() else " " + r for r in responses]
    eos = [tokenizer.eos_token_id] if add_eos else []
    response_ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    return [(p, (r + eos)[:max_response_len]) for p, r in zip(prompt_ids, response_ids)]


def encode(tokenizer, prompt, response, max_prompt_len, max_response_len, truncate_prompts=False, add_eos=True):
    """One row of encode_rows: (prompt_ids, response_ids)."""
    return encode_rows(tokenizer, [prompt], [response], max_prompt_len, max_response_len, truncate_prompts, add_eos)[0]


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
    prompt_mask, response_mask = batch["prompt_mask"], batch["response_mask"]
    k = len(response_mask) // len(prompt_mask)
    position = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    out = base_model(input_ids=batch["prompt_ids"], attention_mask=prompt_mask, position_ids=position, use_cache=True)
    cache, last = out.past_key_values, out.last_hidden_state[:, -1:]  # left padding: the last column is real
    if k > 1:
        cache.batch_repeat_interleave(k)
        last, prompt_mask, position = (t.repeat_interleave(k, dim=0) for t in (last, prompt_mask, position))
    position = position[:, -1:] + 1 + torch.arange(response_mask.shape[1], device=position.device)
    out = base_model(input_ids=batch["response_ids"], attention_mask=torch.cat([prompt_mask, response_mask], dim=1),
                     position_ids=position, past_key_values=cache)
    return torch.cat([last, out.last_hidden_state], dim=1)


def to_device(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------
# model: load a causal LM or build the tiny GPT-NeoX; sample with a KV cache


def load_pretrained(auto_class, path, what, new_weights=(), **kwargs):
    """A model whose every weight was in its files: a reward model read as a policy (no language-model
    head) or pi_ref read as a reward model (no score head) is refused, not completed with random
    weights; an unreadable or truncated checkpoint ends in one line. new_weights: names of weights
    that may start fresh (the reward model's head, trained from pi_ref)."""
    try:
        model, info = auto_class.from_pretrained(path, output_loading_info=True, **kwargs)
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


def banned_ids(tokenizer):
    """Special tokens a response must never contain: all but EOS: a response ends with EOS and holds no other special token."""
    return sorted(set(tokenizer.all_special_ids) - {tokenizer.eos_token_id})


@torch.no_grad()
def sample(model, prompts, eos_id, pad_id, max_new_tokens, temperature=1.0, batch_size=256, generator=None, desc=None,
           suppress_ids=()):
    """Sample one response per prompt, batched, with a KV cache.

    prompts: list of token-id lists. Prompts are left-padded; the attention mask hides the
    padding and position ids count real tokens only, so a row sees exactly what it would see
    alone (tests check this against teacher forcing). temperature 0 = greedy.
    suppress_ids (e.g. banned_ids(tokenizer)) are never drawn.
    Returns (responses, logps): responses are id lists cut after the first EOS (EOS kept);
    logps are the summed log-probs of the sampled tokens under the temperature-1 policy, exactly
    what teacher forcing gives (the suppression only decides which token is drawn).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    responses, logps = [], []
    banned = torch.tensor(list(suppress_ids), dtype=torch.long, device=device)
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc=desc, leave=False, disable=desc is None):
        chunk = prompts[start:start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        position = (mask.cumsum(-1) - 1).clamp(min=0)
        done = torch.zeros(len(chunk), dtype=torch.bool, device=device)
        total = torch.zeros(len(chunk), device=device)
        out_tokens, cache = [], None
        for _ in range(max_new_tokens):
            out = model(input_ids=ids, attention_mask=mask, position_ids=position, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits = out.logits[:, -1].float()
            allowed = logits.index_fill(-1, banned, float("-inf")) if len(banned) else logits
            if temperature == 0:
                token = allowed.argmax(-1)
            else:
                probs = torch.softmax(allowed / temperature, dim=-1)
                token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            token = torch.where(done, torch.full_like(token, pad_id), token)
            total += torch.where(done, 0.0, torch.log_softmax(logits, -1).gather(-1, token[:, None]).squeeze(-1))
            out_tokens.append(token)
            done |= token == eos_id
            if done.all():
                break
            ids, position = token[:, None], position[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(token)[:, None]], dim=1)
        tokens = torch.stack(out_tokens, dim=1).tolist()
        for row in tokens:
            cut = row.index(eos_id) + 1 if eos_id in row else len(row)
            responses.append(row[:cut])
        logps += total.tolist()
    model.train(was_training)
    return responses, logps


def decode_response(tokenizer, ids):
    """(text, finished): text without special tokens; finished = ended with EOS."""
    finished = bool(ids) and ids[-1] == tokenizer.eos_token_id
    return tokenizer.decode(ids, skip_special_tokens=True).strip(), finished


# ----------------------------------------------------------------------------------------------
# the SFT loss


def completion_loss(model, batch):
    """Mean negative log-likelihood of the response tokens (prompt and padding masked out)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["input_ids"][:, 1:]
    mask = batch["response_mask"][:, 1:]  # logits at t predict token t+1
    return F.cross_entropy(logits[:, :-1][mask].float(), targets[mask])


@torch.no_grad()
def validation_loss(model, examples, pad_id, batch_size, device, autocast):
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = to_device(collate(examples[start:start + batch_size], pad_id), device)
        n = int(batch["response_mask"][:, 1:].sum())
        with autocast:
            total += completion_loss(model, batch).item() * n
        count += n
    model.train()
    return total / count


def toy_sample_report(model, tokenizer, data_dir, n, max_prompt_len, max_response_len, truncate_prompts=False):
    """Toy only: mean true score of greedy samples vs the references' on held-out prompts."""
    rows = load_rows(data_dir, "eval.jsonl", None, {"prompt": "prompt", "reference": "reference"})[:n]
    prompts = encode_prompts(tokenizer, [r["prompt"] for r in rows], max_prompt_len, truncate_prompts)
    outs, _ = sample(model, prompts, tokenizer.eos_token_id, tokenizer.pad_token_id, max_response_len, temperature=0,
                     suppress_ids=banned_ids(tokenizer))
    scores = [toy_tldr.true_score(r["prompt"], *decode_response(tokenizer, o)) for r, o in zip(rows, outs)]
    refs = [toy_tldr.true_score(r["prompt"], r["reference"]) for r in rows]
    example = decode_response(tokenizer, outs[0])[0]
    return {"sample_true_score": float(np.mean(scores)), "reference_true_score": float(np.mean(refs)),
            "example_prompt": rows[0]["prompt"], "example_sample": example}


def is_toy(data):
    return os.path.isdir(data) and os.path.isfile(os.path.join(data, "eval.jsonl"))


# ----------------------------------------------------------------------------------------------


@cleans_up
def main(args):
    from transformers import get_cosine_schedule_with_warmup

    check_args(args, positive=("steps", "batch_size", "grad_accum", "lr", "grad_clip", "max_prompt_len",
                               "max_response_len"),
               non_negative=("val_size", "warmup_steps", "weight_decay", "num_sample_eval", "save_every"))
    inputs = [args.data, args.tokenizer_path, args.model_name_or_path]
    check_output(args.out_dir, "sft", inputs)  # before any work: an output not to be replaced is refused
    seed_everything(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, autocast = device_and_autocast()
    rows = load_rows(args.data, "sft.jsonl", args.split, {"prompt": args.prompt_column, "completion": args.completion_column})
    tokenizer = load_tokenizer(args)
    examples = encode_rows(tokenizer, [r["prompt"] for r in rows], [r["completion"] for r in rows], args.max_prompt_len,
                           args.max_response_len, args.truncate_prompts)
    report_shaping("sft", tokenizer, [p for p, _ in examples], [r for _, r in examples])
    if len(examples) <= args.val_size:
        fail(f"{len(examples)} rows is not more than --val_size {args.val_size}")
    train, val = examples[:len(examples) - args.val_size], examples[len(examples) - args.val_size:]
    model = load_causal_lm(args, tokenizer).to(device)
    model.train()
    print(f"sft: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {len(train)} train rows, device {device}")

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, args.steps)
    # locked, and kept across a kill: --resume continues from the state saved in it
    tmp = start_output(args.out_dir, "sft", inputs, resumable=True, resume=args.resume)
    log_path = os.path.join(tmp, "train_log.jsonl")
    done, order, cursor = restore_state(tmp, args, model, optimizer, scheduler)
    t0 = time.time()
    bar = tqdm(range(done + 1, args.steps + 1), desc="sft")
    for step in bar:
        for _ in range(args.grad_accum):
            if cursor + args.batch_size > len(order):  # a fresh shuffle each pass over the data
                order, cursor = random.sample(range(len(train)), len(train)), 0
            batch = to_device(collate([train[i] for i in order[cursor:cursor + args.batch_size]], tokenizer.pad_token_id), device)
            cursor += args.batch_size
            with autocast:
                loss = completion_loss(model, batch) / args.grad_accum
            loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        check_finite(step, loss=loss, grad_norm=grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        row = {"step": step, "loss": loss.item() * args.grad_accum, "grad_norm": float(grad_norm),
               "lr": scheduler.get_last_lr()[0]}
        append_jsonl(log_path, row)
        bar.set_postfix(loss=f"{row['loss']:.3f}")
        save_state(tmp, args, step, args.steps, model, optimizer, scheduler, order, cursor)
    check_finite(args.steps, parameter_norm=parameter_norm(model))

    metrics = {"train_seconds": time.time() - t0}
    if val:
        metrics["val_loss"] = validation_loss(model, val, tokenizer.pad_token_id, args.batch_size, device, autocast)
        check_finite(args.steps, val_loss=metrics["val_loss"])  # finite weights can still overflow the logits
    if is_toy(args.data) and args.num_sample_eval > 0:
        metrics.update(toy_sample_report(model, tokenizer, args.data, args.num_sample_eval,
                                         args.max_prompt_len, args.max_response_len, args.truncate_prompts))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    save_json(os.path.join(tmp, "args.json"), dataclasses.asdict(args))
    save_json(os.path.join(tmp, "metrics.json"), metrics)
    remove_state(tmp)
    finish_output(tmp, args.out_dir)
    summary = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float))
    print(f"sft: saved {args.out_dir}: {summary}")
    if "example_sample" in metrics:
        print(f"  greedy sample: {metrics['example_sample']!r}")


if __name__ == "__main__":
    main(parse_args(Args, __doc__))
