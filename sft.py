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

What every stage does with a policy (rows, tokens, batches, models, sampling, resumable state) is in
policy.py; this file is the SFT stage alone: its flags, its loss, its validation and its loop.
"""
import dataclasses
import os
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import distributed
import policy
import toy_tldr
from stage import check_args, check_output, cleans_up, fail, finish_output, parse_args, start_output

# ----------------------------------------------------------------------------------------------
# config


@dataclass
class Args:
    data: str = field(default="out/toy_tldr", metadata={
        "help": "toy_tldr output dir, a local .json/.jsonl/.parquet file, or a hub dataset id"})
    split: str = field(default="train", metadata={"help": "split to read when --data is a hub id"})
    prompt_column: str = field(default="prompt", metadata={"help": "column holding the prompt"})
    completion_column: str = field(default="completion", metadata={"help": "column of the target summary"})
    tokenizer_path: str = field(default="", metadata={
        "help": "tokenizer dir or hub id; default: <data>/tokenizer for the toy, else the model's"})
    model_name_or_path: str = field(default="", metadata={
        "help": "hub id or local dir of a causal LM; empty = a tiny GPT-NeoX built from the flags below"})
    chat_template: str = field(default="", metadata={
        "help": "for conversational data (message lists) and a tokenizer without a chat template (a base "
                "model's): a .jinja file or the template itself; saved with pi_ref's tokenizer"})
    n_layer: int = field(default=2, metadata={"help": "layers of the tiny model"})
    n_embd: int = field(default=128, metadata={"help": "hidden size of the tiny model"})
    n_head: int = field(default=4, metadata={"help": "attention heads of the tiny model"})
    max_prompt_len: int = field(default=64, metadata={
        "help": "prompt tokens kept (longer prompts: error, or see --truncate_prompts)"})
    max_response_len: int = field(default=24, metadata={"help": "response tokens kept, EOS included"})
    truncate_prompts: bool = field(default=False, metadata={
        "help": "cut over-long prompts from the left (keeping 'TL;DR:') instead of refusing"})
    steps: int = field(default=300, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=64, metadata={"help": "examples per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate (AdamW)"})
    warmup_steps: int = field(default=30, metadata={"help": "linear warmup steps before the cosine decay"})
    min_lr_ratio: float = field(default=0.0, metadata={
        "help": "the cosine's floor as a fraction of --lr (0: decay to 0; the IS-DAAs paper: 0.1)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm"})
    val_size: int = field(default=500, metadata={"help": "rows held out for the validation loss"})
    num_sample_eval: int = field(default=256, metadata={
        "help": "toy only: eval prompts whose greedy samples get a true score"})
    seed: int = field(default=0, metadata={"help": "seed for python, numpy and torch"})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch (0 = torch's default)"})
    precision: str = field(default="auto", metadata={"help": policy.PRECISION_HELP})
    out_dir: str = field(default="out/sft", metadata={"help": "where pi_ref is saved"})
    resume: bool = field(default=False, metadata={"help": "continue an interrupted run from its saved state"})
    save_every: int = field(default=50, metadata={"help": "steps between states saved for --resume (0: no)"})
    fsdp: bool = field(default=False, metadata={
        "help": "under torchrun: shard every weight over the processes (FSDP) instead of copying it (DDP)"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute each layer's activations in backward instead of keeping them (less memory)"})


# ----------------------------------------------------------------------------------------------
# the SFT loss


def completion_loss(model, batch):
    """Mean negative log-likelihood of the response tokens (prompt and padding masked out).

    batch: policy.collate output, input_ids / attention_mask / response_mask [B, T].
    Returns a scalar: -(1 / sum_i |y_i|) sum_i log pi(y_i | x_i), the usual SFT objective.
    """
    # --- the algorithm: next-token cross-entropy on response positions only ---
    # BEGIN SOLUTION
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [B, T, V]
    targets = batch["input_ids"][:, 1:]
    mask = batch["response_mask"][:, 1:]  # logits at t predict token t+1
    return F.cross_entropy(logits[:, :-1][mask].float(), targets[mask])
    # END SOLUTION


# ----------------------------------------------------------------------------------------------
# validation


@torch.no_grad()
def validation_loss(model, examples, pad_id, batch_size, device, autocast):
    """completion_loss over held-out examples, weighted by their response tokens: one mean per token."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = policy.to_device(policy.collate(examples[start:start + batch_size], pad_id), device)
        n = int(batch["response_mask"][:, 1:].sum())
        with autocast:  # model: the policy, or distributed.parallel's module of it
            total += distributed.apply(completion_loss, model, batch).item() * n
        count += n
    model.train()
    return total / count


def toy_sample_report(model, tokenizer, data_dir, n, max_prompt_len, max_response_len,
                      truncate_prompts=False):
    """Toy only: mean true score of greedy samples vs the references' on held-out prompts."""
    rows = policy.load_rows(data_dir, "eval.jsonl", None, {"prompt": "prompt", "reference": "reference"})[:n]
    prompts = policy.encode_prompts(tokenizer, [r["prompt"] for r in rows], max_prompt_len, truncate_prompts)
    outs, _ = policy.sample(model, prompts, tokenizer.eos_token_id, tokenizer.pad_token_id, max_response_len,
                            temperature=0, suppress_ids=policy.banned_ids(tokenizer, model))
    texts = [policy.decode_response(tokenizer, o) for o in outs]
    scores = [toy_tldr.true_score(r["prompt"], *text) for r, text in zip(rows, texts)]
    refs = [toy_tldr.true_score(r["prompt"], r["reference"]) for r in rows]
    return {"sample_true_score": float(np.mean(scores)), "reference_true_score": float(np.mean(refs)),
            "example_prompt": rows[0]["prompt"], "example_sample": texts[0][0]}


def final_metrics(args, model, tokenizer, val, seconds, device, autocast):
    """What metrics.json says of pi_ref: training time, validation loss and, on the toy, the true scores
    (not under FSDP: the sampler reads the model's weights whole). model: distributed.parallel's module."""
    metrics = {"train_seconds": seconds}
    if val:
        metrics["val_loss"] = validation_loss(model, val, tokenizer.pad_token_id, args.batch_size, device,
                                              autocast)
        # finite weights can still overflow logits
        policy.check_finite(args.steps, val_loss=metrics["val_loss"])
    if policy.is_toy(args.data) and args.num_sample_eval > 0 and not distributed.is_sharded(model):
        report = toy_sample_report(distributed.unwrap(model), tokenizer, args.data, args.num_sample_eval,
                                   args.max_prompt_len, args.max_response_len, args.truncate_prompts)
        metrics.update(report)
    return metrics


# ----------------------------------------------------------------------------------------------
# the stage: data, model, loop, output


def load_examples(args):
    """(tokenizer, train, val): (prompt_ids, response_ids) rows, the last --val_size held out. Rows of text
    ({prompt, completion}) or conversations: {prompt, completion} as message lists, or one whole conversation
    per row (UltraChat's `messages`: --completion_column messages), whose last assistant turn is the
    response and the turns before it the prompt (policy.split_conversation, policy.encode_rows)."""
    columns = {"prompt": args.prompt_column, "completion": args.completion_column}
    rows = policy.load_rows(args.data, "sft.jsonl", args.split, columns)
    tokenizer = policy.load_tokenizer(args.tokenizer_path, args.data, args.model_name_or_path,
                                      args.chat_template)
    examples = policy.encode_rows(tokenizer, [r["prompt"] for r in rows], [r["completion"] for r in rows],
                                  args.max_prompt_len, args.max_response_len, args.truncate_prompts)
    policy.report_shaping("sft", tokenizer, [p for p, _ in examples], [r for _, r in examples])
    if len(examples) <= args.val_size:
        fail(f"{len(examples)} rows is not more than --val_size {args.val_size}")
    return tokenizer, examples[:len(examples) - args.val_size], examples[len(examples) - args.val_size:]


def train_steps(args, tmp, model, train, pad_id, device, autocast):
    """The SFT loop, continued from the state saved in tmp if any; one train_log.jsonl row per step.
    model: distributed.parallel's module, whose forward is completion_loss. Under torchrun every process draws
    the same order and takes its shard of each global micro-batch (--batch_size examples a process)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = policy.lr_schedule(optimizer, args.warmup_steps, args.steps, min_lr_ratio=args.min_lr_ratio)
    scaler = policy.grad_scaler(args.precision, device)
    done, order, cursor = policy.restore_state(tmp, args, model, optimizer, scheduler, scaler)
    size = args.batch_size * distributed.WORLD.size  # the global micro-batch
    bar = tqdm(range(done + 1, args.steps + 1), desc="sft", disable=not distributed.WORLD.main)
    for step in bar:
        for i in range(args.grad_accum):
            if cursor + size > len(order):  # a fresh shuffle each pass over the data
                order, cursor = random.sample(range(len(train)), len(train)), 0
            examples = [train[j] for j in distributed.shard(order[cursor:cursor + size])]
            batch = policy.to_device(policy.collate(examples, pad_id), device)
            cursor += size
            with distributed.sync_gradients(model, now=i == args.grad_accum - 1):
                # --- the algorithm: minimise the response tokens' NLL ---
                with autocast:
                    loss = model(batch)  # completion_loss(the policy, batch)
                # the global micro-batch's mean over its tokens (distributed.mean_over_batch, gather_live)
                tokens = batch["response_mask"][:, 1:].sum()
                loss = distributed.mean_over_batch(loss, tokens) / args.grad_accum
                scaler.scale(loss * distributed.WORLD.size).backward()
        grad_norm = policy.optimizer_step(step, model, optimizer, scheduler, scaler, args.grad_clip, loss)
        row = {"step": step, "loss": loss.item() * args.grad_accum, "grad_norm": float(grad_norm),
               "lr": scheduler.get_last_lr()[0]}
        if distributed.WORLD.main:
            policy.append_jsonl(os.path.join(tmp, "train_log.jsonl"), row)
        bar.set_postfix(loss=f"{row['loss']:.3f}")
        policy.save_state(tmp, args, step, args.steps, model, optimizer, scheduler, order, cursor, scaler)
    policy.check_finite(args.steps, parameter_norm=policy.parameter_norm(model))


@cleans_up
def main(args):
    check_args(args, positive=("steps", "batch_size", "grad_accum", "lr", "grad_clip", "max_prompt_len",
                               "max_response_len"),
               non_negative=("val_size", "warmup_steps", "weight_decay", "num_sample_eval", "save_every"))
    inputs = [args.data, args.tokenizer_path, args.model_name_or_path]
    check_output(args.out_dir, "sft", inputs)  # before any work: an output not to be replaced is refused
    main_process = distributed.join_processes(args).main  # under torchrun, the one that writes the files
    policy.seed_everything(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, autocast = policy.device_and_autocast(args.precision)
    tokenizer, train, val = load_examples(args)
    model = policy.load_causal_lm(args, tokenizer).to(device)
    model.train()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"sft: {params:.2f}M params, {len(train)} train rows, device {device}")
    # locked, and kept across a kill: --resume continues from the state saved in it
    tmp = (start_output(args.out_dir, "sft", inputs, resumable=True, resume=args.resume)
           if main_process else None)
    distributed.barrier()
    forward = distributed.parallel(model, completion_loss, args.fsdp, args.gradient_checkpointing)
    t0 = time.time()
    train_steps(args, tmp, forward, train, tokenizer.pad_token_id, device, autocast)
    metrics = final_metrics(args, forward, tokenizer, val, time.time() - t0, device, autocast)
    distributed.save_pretrained(model, tmp, tokenizer)
    if not main_process:
        return
    policy.save_json(os.path.join(tmp, "args.json"), dataclasses.asdict(args))
    policy.save_json(os.path.join(tmp, "metrics.json"), metrics)
    policy.remove_state(tmp)
    finish_output(tmp, args.out_dir)
    summary = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float))
    print(f"sft: saved {args.out_dir}: {summary}")
    if "example_sample" in metrics:
        print(f"  greedy sample: {metrics['example_sample']!r}")


if __name__ == "__main__":
    main(parse_args(Args, __doc__))
