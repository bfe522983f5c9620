"""
sft.py -- supervised fine-tuning: the reference policy pi_ref.

Trains a causal LM on {prompt, completion} rows with the loss on the completion's tokens only. The result
is pi_ref: the policy every later stage starts from and measures its drift against.
Run (the toy world, about a minute on a laptop CPU; first `python toy_tldr.py`):
    python sft.py
A real model and data set, same code (on a GPU; data/tldr written by `python -m scale.prepare --kind sft`):
    python sft.py --model_name_or_path EleutherAI/pythia-1b --data data/tldr --max_prompt_len 512 \\
        --max_response_len 53 --batch_size 16 --grad_accum 8 --lr 1e-5 --steps 900 --out_dir out/sft_pythia

Read it top to bottom: the loss, the validation, then main's loop (data, forward, loss, backward, step, log,
save). Rows, tokens and models are lm.py's; the lines every loop shares are stage.py's.
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

import lm
import stage
from stage import fail


@dataclass
class Args:
    data: str = field(default="out/toy_tldr", metadata={"help": "an sft.jsonl, or the directory holding it"})
    tokenizer_path: str = field(default="", metadata={
        "help": "tokenizer dir or hub id; default: <data>/tokenizer where it exists, else the model's"})
    model_name_or_path: str = field(default="", metadata={
        "help": "hub id or local dir of a causal LM; empty = a tiny GPT-NeoX built from the flags below"})
    n_layer: int = field(default=2, metadata={"help": "layers of the tiny model"})
    n_embd: int = field(default=128, metadata={"help": "hidden size of the tiny model"})
    n_head: int = field(default=4, metadata={"help": "attention heads of the tiny model"})
    max_prompt_len: int = field(default=64, metadata={"help": "longest prompt in tokens (longer: an error)"})
    max_response_len: int = field(default=24, metadata={"help": "response tokens kept, EOS included"})
    steps: int = field(default=300, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=64, metadata={"help": "examples per micro-batch (per process)"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate (AdamW)"})
    warmup_steps: int = field(default=30, metadata={"help": "linear warm-up steps before the cosine decay"})
    min_lr_ratio: float = field(default=0.0, metadata={"help": "the cosine's floor, a fraction of --lr"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm"})
    val_size: int = field(default=500, metadata={"help": "rows held out for the validation loss"})
    num_sample_eval: int = field(default=256, metadata={"help": "toy: greedy samples given a true score"})
    seed: int = field(default=0, metadata={"help": "seed for python, numpy and torch"})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch (0 = torch's default)"})
    precision: str = field(default="auto", metadata={"help": stage.PRECISION_HELP})
    out_dir: str = field(default="out/sft", metadata={"help": "where pi_ref is saved"})
    resume: bool = field(default=False, metadata={"help": "continue an interrupted run from its saved state"})
    save_every: int = field(default=50, metadata={"help": "steps between states saved for --resume (0: no)"})
    fsdp: bool = field(default=False, metadata={"help": "under torchrun: shard the weights (FSDP), not DDP"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations (backward)"})


def completion_loss(model, batch):
    """The SFT objective, the mean NLL of the response tokens (prompt and padding masked out), a scalar:
    -(1 / sum_i |y_i|) sum_i log pi(y_i | x_i). batch: lm.collate's (input_ids, masks [B, T])."""
    # --- the algorithm: next-token cross-entropy on response positions only ---
    # BEGIN SOLUTION
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [B, T, V]
    targets = batch["input_ids"][:, 1:]
    mask = batch["response_mask"][:, 1:]  # logits at t predict token t+1
    return F.cross_entropy(logits[:, :-1][mask].float(), targets[mask])
    # END SOLUTION


@torch.no_grad()
def validation_loss(module, examples, pad_id, batch_size, device, autocast):
    """completion_loss over held-out examples, weighted by their response tokens: one mean per token.
    module: stage.parallel's module (or stage.Forward(completion_loss, model)); module(batch) is the loss."""
    module.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = lm.to_device(lm.collate(examples[start:start + batch_size], pad_id), device)
        n = int(batch["response_mask"][:, 1:].sum())
        with autocast:
            total += module(batch).item() * n
        count += n
    module.train()
    return total / count


def toy_sample_report(model, tokenizer, data_dir, n, max_prompt_len, max_response_len):
    """Toy only: mean true score of greedy samples vs the references' on held-out prompts."""
    import toy_tldr  # the toy's hidden scorer

    rows = lm.load_rows(data_dir, "eval.jsonl", ["prompt", "reference"])[:n]
    outs, _ = lm.sample(model, lm.encode_prompts(tokenizer, rows, max_prompt_len), tokenizer.eos_token_id,
                        tokenizer.pad_token_id, max_response_len, temperature=0,
                        suppress_ids=lm.banned_ids(tokenizer, model))
    texts = [lm.decode_response(tokenizer, o) for o in outs]
    scores = [toy_tldr.true_score(r["prompt"], *text) for r, text in zip(rows, texts)]
    refs = [toy_tldr.true_score(r["prompt"], r["reference"]) for r in rows]
    return {"sample_true_score": float(np.mean(scores)), "reference_true_score": float(np.mean(refs)),
            "example_prompt": rows[0]["prompt"], "example_sample": texts[0][0]}


def load_examples(args):
    """(tokenizer, train, val): (prompt_ids, response_ids) of the rows, the last --val_size held out."""
    rows = lm.load_rows(args.data, "sft.jsonl", ["prompt", "completion"])
    own = os.path.join(args.data, "tokenizer")
    path = args.tokenizer_path or (own if os.path.isdir(own) else args.model_name_or_path)
    if not path:
        fail(f"no tokenizer: {args.data} holds none; pass --tokenizer_path or --model_name_or_path")
    tokenizer = lm.load_tokenizer(path)
    examples = lm.encode(tokenizer, rows, "completion", args.max_prompt_len, args.max_response_len)
    if len(examples) <= args.val_size:
        fail(f"{len(examples)} rows is not more than --val_size {args.val_size}")
    return tokenizer, examples[:len(examples) - args.val_size], examples[len(examples) - args.val_size:]


@stage.cleans_up
def main(args):
    stage.check_args(args, positive=("n_layer", "n_embd", "n_head", "steps", "batch_size", "grad_accum", "lr",
                                     "grad_clip", "max_prompt_len", "max_response_len"), non_negative=(
        "val_size", "warmup_steps", "weight_decay", "num_sample_eval", "save_every"))
    inputs = [args.data, args.tokenizer_path, args.model_name_or_path]
    stage.check_output(args.out_dir, "sft", inputs)  # before any work: an output not to replace is refused
    world = stage.init_distributed()
    stage.seed_everything(args.seed)
    device, autocast = stage.device_and_autocast(args.precision, args.threads)
    tokenizer, train, val = load_examples(args)
    model = (lm.load_model(args.model_name_or_path) if args.model_name_or_path else
             lm.new_model(tokenizer, args.n_layer, args.n_embd, args.n_head,
                          args.max_prompt_len + args.max_response_len)).to(device).train()
    print(f"sft: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {len(train)} rows, {device}")
    output = stage.start_output(args.out_dir, "sft", inputs, args.resume, stage.record(
        args, **dict(zip(["data", "tokenizer_path", "model_name_or_path"], inputs)))) if world.main else None
    work = stage.scratch_path(args.out_dir, "partial")  # output.work, known to every process
    stage.barrier()
    module = stage.parallel(model, completion_loss, args.fsdp, args.gradient_checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = stage.lr_schedule(optimizer, args.warmup_steps, args.steps, min_lr_ratio=args.min_lr_ratio)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")  # fp16 gradients underflow
    done, order, cursor = stage.restore_state(work, args, model, optimizer, scheduler, scaler)
    size, pad = args.batch_size * world.size, tokenizer.pad_token_id  # the global micro-batch: one order
    t0 = time.time()
    for step in tqdm(range(done + 1, args.steps + 1), desc="sft", disable=not world.main):
        for micro in range(args.grad_accum):
            if cursor + size > len(order):  # a fresh shuffle each pass over the data
                order, cursor = random.sample(range(len(train)), len(train)), 0
            examples, cursor = [train[j] for j in stage.shard(order[cursor:cursor + size])], cursor + size
            batch = lm.to_device(lm.collate(examples, pad), device)
            with stage.sync_gradients(module, now=micro == args.grad_accum - 1):
                # --- the algorithm: minimise the response tokens' NLL ---
                with autocast:
                    loss = module(batch)  # completion_loss(model, batch)
                if world.size > 1:  # the mean over the global micro-batch's tokens (each process has n)
                    n = batch["response_mask"][:, 1:].sum().reshape(1).to(loss.dtype)
                    loss = stage.gather_live(loss.reshape(1) * n).sum() / stage.gather_live(n).sum()
                loss = loss / args.grad_accum
                scaler.scale(loss * world.size).backward()  # DDP averages the processes: stage.gather_live
        grad_norm = stage.optimizer_step(step, model, optimizer, scheduler, scaler, args.grad_clip, loss)
        if world.main:
            stage.append_jsonl(os.path.join(work, "train_log.jsonl"), {
                "step": step, "loss": loss.item() * args.grad_accum, "grad_norm": float(grad_norm),
                "lr": scheduler.get_last_lr()[0]})
        stage.save_state(work, args, step, args.steps, model, optimizer, scheduler, order, cursor, scaler)
    stage.check_finite(args.steps, parameter_norm=stage.parameter_norm(model))
    metrics = {"train_seconds": time.time() - t0}
    if val:
        metrics["val_loss"] = validation_loss(module, val, pad, args.batch_size, device, autocast)
        stage.check_finite(args.steps, val_loss=metrics["val_loss"])  # finite weights can overflow logits
    is_toy = os.path.isfile(os.path.join(args.data, "eval.jsonl"))
    if is_toy and args.num_sample_eval > 0 and not args.fsdp and world.main:  # FSDP: no whole weights
        metrics.update(toy_sample_report(model, tokenizer, args.data, args.num_sample_eval,
                                         args.max_prompt_len, args.max_response_len))
    stage.save_pretrained(model, work, tokenizer)
    if world.main:
        stage.save_json(os.path.join(work, "args.json"), dataclasses.asdict(args))
        stage.save_json(os.path.join(work, "metrics.json"), metrics)
        output.publish()
        print(f"sft: saved {args.out_dir}: "
              + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float))
              + (f"; greedy sample: {metrics['example_sample']!r}" if "example_sample" in metrics else ""))


if __name__ == "__main__":
    main(stage.parse_args(Args, __doc__))
