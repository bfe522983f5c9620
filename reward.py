"""
reward.py -- the gold reward model, and the offline preference pairs it labels (METHOD.md, section 4).
  --mode train  from pi_ref, a one-score model fit by Bradley-Terry, -log sigmoid(r(x, y_w) - r(x, y_l)),
                to "human" pairs -> out/gold_rm/ (held-out accuracy; on the toy, also against the truth)
  --mode label  two samples of pi_ref a prompt, the higher-scored by the judge (the toy's hidden scorer,
                --judge true, or the gold RM, --judge rm) "chosen" -> out/prefs/train.jsonl, the DAAs' data,
                with the sampled ids (chosen_ids, ...) and their behaviour log-probs (chosen_behaviour_logp)
Run (after toy_tldr.py and sft.py, a minute each on a laptop CPU; other data: `python -m scale.prepare`):
    python reward.py --mode train && python reward.py --mode label
    torchrun --standalone --nproc_per_node 4 reward.py --mode label   # 4 processes share the prompts
"""
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import lm
import stage
from stage import fail


@dataclass
class Args:
    mode: str = field(default="train", metadata={"help": "train (the gold RM) | label (the pairs)"})
    sft_path: str = field(default="out/sft", metadata={"help": "pi_ref: the RM's start and label's sampler"})
    judge: str = field(default="true", metadata={"help": "label: true (the toy's scorer) | rm (--gold_path)"})
    gold_path: str = field(default="out/gold_rm", metadata={"help": "label --judge rm: the gold RM"})
    data: str = field(default="out/toy_tldr", metadata={
        "help": "a .jsonl or its directory; train: pairs (prefs_human.jsonl, train.jsonl); label: sft.jsonl"})
    max_prompt_len: int = field(default=64, metadata={"help": "longest prompt in tokens (longer: an error)"})
    max_response_len: int = field(default=24, metadata={"help": "response tokens kept, EOS included"})
    steps: int = field(default=300, metadata={"help": "train: optimizer steps"})
    batch_size: int = field(default=32, metadata={"help": "train: pairs per micro-batch (per process)"})
    grad_accum: int = field(default=1, metadata={"help": "train: micro-batches per optimizer step"})
    lr: float = field(default=1e-3, metadata={"help": "train: peak learning rate (AdamW)"})
    warmup_steps: int = field(default=20, metadata={"help": "train: linear warm-up steps"})
    min_lr_ratio: float = field(default=0.0, metadata={"help": "train: the cosine's floor / --lr"})
    grad_clip: float = field(default=1.0, metadata={"help": "train: max gradient norm"})
    val_size: int = field(default=1000, metadata={"help": "train: pairs held out for the accuracy"})
    num_prompts: int = field(default=2000, metadata={"help": "label: training prompts to sample pairs for"})
    temperature: float = field(default=1.0, metadata={"help": "label: sampling temperature of pi_ref"})
    label: str = field(default="argmax", metadata={"help": "label: argmax (ties dropped) | bt (a BT draw)"})
    bt_temperature: float = field(default=1.0, metadata={"help": "bt: P(a) = sigmoid((s_a - s_b) / T)"})
    sample_batch_size: int = field(default=256, metadata={"help": "prompts per sampling / scoring batch"})
    seed: int = field(default=0, metadata={"help": "seed for python, numpy and torch"})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch (0 = torch's default)"})
    precision: str = field(default="auto", metadata={"help": stage.PRECISION_HELP})
    out_dir: str = field(default="", metadata={"help": "default out/gold_rm | out/prefs"})
    resume: bool = field(default=False, metadata={"help": "train: continue an interrupted run"})
    save_every: int = field(default=50, metadata={"help": "train: steps between saved states"})
    fsdp: bool = field(default=False, metadata={"help": "train, under torchrun: shard the weights (FSDP)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "train: recompute activations"})


# the reward model
def load_reward_model(path, tokenizer=None, new_head=False):
    """A one-score sequence classifier. new_head: its head starts at zero (every score 0); otherwise a
    model without a trained head (pi_ref passed as the gold model) is refused."""
    from transformers import AutoModelForSequenceClassification

    if not os.path.isdir(path):
        fail(f"model directory {path} not found")
    model = lm.load_pretrained(AutoModelForSequenceClassification, path, "a reward model (a score head)",
                               ["score."] * new_head)
    if tokenizer is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if new_head:  # one score, zero to start with (pi_ref's config has no labels: 2 by default)
        model.score, model.config.num_labels = torch.nn.Linear(model.config.hidden_size, 1, bias=False), 1
        torch.nn.init.zeros_(model.score.weight)
    return model


def reward_scores(model, batch):
    """r(x, y) for a lm.collate_grouped batch: the head (float32: bf16 scores tie) on the hidden state after
    the last response token, found by response_mask, not from the pad id (Pythia's pad == EOS: skips EOS)."""
    hidden, length = lm.response_hidden(model.base_model, batch), batch["response_mask"].sum(1)
    last = hidden[torch.arange(len(length), device=length.device), length].to(model.score.weight.dtype)
    with torch.autocast(length.device.type, enabled=False):
        return model.score(last).squeeze(-1)


def bradley_terry_loss(r_chosen, r_rejected):
    """-log sigmoid(r_w - r_l), averaged over pairs; shapes [B]."""
    # BEGIN SOLUTION
    return -F.logsigmoid(r_chosen - r_rejected).mean()
    # END SOLUTION


@torch.no_grad()
def score_examples(model, examples, pad_id, batch_size, device, autocast, k=1, desc=None):
    """Scores of (prompt, response) ids in groups of k sharing a prompt; model: the RM or stage.parallel's."""
    model.eval()
    scores = []
    for start in tqdm(range(0, len(examples), batch_size * k), desc=desc, leave=False, disable=desc is None):
        batch = lm.to_device(lm.collate_grouped(examples[start:start + batch_size * k], pad_id, k), device)
        with autocast:
            scores += (reward_scores(model, batch) if hasattr(model, "score") else model(batch)).tolist()
    return scores


# --mode train: the Bradley-Terry loop
def train(args, device, autocast):
    stage.check_output(args.out_dir, "reward train", [args.sft_path, args.data])
    world, toy = stage.WORLD, os.path.isfile(os.path.join(args.data, "prefs_human.jsonl"))
    rows = lm.load_rows(args.data, "prefs_human.jsonl" if toy else "train.jsonl", ["prompt", "chosen",
                                                                                   "rejected"])
    if (n := len(rows) - args.val_size) < max(1, args.batch_size * world.size * (world.size > 1)):
        fail(f"{n} pairs to train on (--val_size {args.val_size} held out): below --batch_size x processes")
    tokenizer = lm.load_tokenizer(args.sft_path)
    pairs = list(zip(*(lm.encode(tokenizer, rows, c, args.max_prompt_len, args.max_response_len)
                       for c in ("chosen", "rejected"))))
    train_pairs, val_pairs, pad = pairs[:n], pairs[n:], tokenizer.pad_token_id
    model = load_reward_model(args.sft_path, tokenizer, new_head=True).to(device).train()
    output = stage.start_output(args.out_dir, "reward train", [args.sft_path, args.data], args.resume,
                                stage.record(args, sft_path=args.sft_path, data=args.data)) if world.main \
        else None
    work = stage.scratch_path(args.out_dir, "partial")  # output.work, known to every process
    stage.barrier()
    module = stage.parallel(model, reward_scores, args.fsdp, args.gradient_checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    scheduler = stage.lr_schedule(optimizer, args.warmup_steps, args.steps, min_lr_ratio=args.min_lr_ratio)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")  # fp16 gradients underflow
    done, order, cursor = stage.restore_state(work, args, model, optimizer, scheduler, scaler)
    size, t0 = args.batch_size * world.size, time.time()  # the global micro-batch: one order, a shard each
    for step in tqdm(range(done + 1, args.steps + 1), desc="gold rm", disable=not world.main):
        for micro in range(args.grad_accum):
            if cursor + size > len(order):  # a fresh shuffle each pass over the pairs
                order, cursor = random.sample(range(len(train_pairs)), len(train_pairs)), 0
            mine, cursor = [train_pairs[j] for j in stage.shard(order[cursor:cursor + size])], cursor + size
            batch = lm.to_device(lm.collate_grouped([ex for pair in mine for ex in pair], pad, k=2), device)
            with stage.sync_gradients(module, now=micro == args.grad_accum - 1):
                # --- the algorithm: -log sigmoid(r(x, y_w) - r(x, y_l)) ---
                with autocast:
                    r = module(batch)  # reward_scores(model, batch): chosen, rejected, chosen, ...
                r = stage.gather_live(r.view(-1, 2)).view(-1)  # every process's pairs
                loss = bradley_terry_loss(r[0::2], r[1::2]) / args.grad_accum
                scaler.scale(loss * world.size).backward()  # DDP averages the processes: stage.gather_live
        stage.optimizer_step(step, model, optimizer, scheduler, scaler, args.grad_clip, loss)
        if world.main:
            stage.append_jsonl(os.path.join(work, "train_log.jsonl"), {"step": step, "loss": loss.item() *
                               args.grad_accum, "accuracy": (r[0::2] > r[1::2]).float().mean().item()})
        stage.save_state(work, args, step, args.steps, model, optimizer, scheduler, order, cursor, scaler)
    stage.check_finite(args.steps, parameter_norm=stage.parameter_norm(model))
    metrics = {"train_seconds": time.time() - t0, **validation(args, module, val_pairs, rows[-args.val_size:],
                                                               pad, device, autocast)}
    stage.save_pretrained(model, work, tokenizer)
    if world.main:
        stage.save_json(os.path.join(work, "args.json"), asdict(args))
        stage.save_json(os.path.join(work, "metrics.json"), metrics)
        output.publish()
        print(f"gold rm: saved {args.out_dir}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))


def validation(args, module, val_pairs, val_rows, pad, device, autocast):
    """Held-out accuracy and, on the toy, how often the RM orders pairs as the hidden true scorer does."""
    scores = np.array(score_examples(module, [ex for pair in val_pairs for ex in pair], pad,
                                     args.sample_batch_size, device, autocast, k=2))
    s_chosen, s_rejected = scores[0::2], scores[1::2]
    stage.check_finite(args.steps, validation_scores=s_chosen.sum() + s_rejected.sum())
    metrics = {"val_accuracy": float(np.mean(s_chosen > s_rejected)), "val_pairs": len(val_rows)}
    if os.path.isfile(os.path.join(args.data, "eval.jsonl")):  # the toy knows the truth
        from toy_tldr import true_score
        t = np.array([[true_score(r["prompt"], r[c]) for c in ("chosen", "rejected")] for r in val_rows])
        differ, truth = t[:, 0] != t[:, 1], t[:, 0] > t[:, 1]
        metrics["val_true_accuracy"] = float(np.mean((s_chosen > s_rejected)[differ] == truth[differ]))
        metrics["human_label_true_accuracy"] = float(np.mean(truth[differ]))
    return metrics


# --mode label: sample, judge, label
def sample_and_judge(args, pi_ref, gold, tokenizer, prompts, device, autocast):
    """Per prompt, in order: (prompt row, a, b, score_a, score_b) of two samples of pi_ref, a and b each
    (text, ids, behaviour log-prob: of the distribution the ids were drawn from), or "unfinished" (no EOS
    to learn from) or "identical". Under torchrun each process samples every n-th prompt, its own stream."""
    world, mine = stage.WORLD, stage.shard(prompts)
    generator = torch.Generator(device=device).manual_seed(args.seed * world.size + world.rank)
    ids = [i for i in lm.encode_prompts(tokenizer, mine, args.max_prompt_len) for _ in range(2)]  # 2i, 2i+1
    with autocast:
        outs, logps = lm.sample(pi_ref, ids, tokenizer.eos_token_id, tokenizer.pad_token_id,
                                args.max_response_len, args.temperature, args.sample_batch_size, generator,
                                desc="sampling" if world.main else None,
                                suppress_ids=lm.banned_ids(tokenizer, pi_ref), logps_of="sampler")
    texts = [lm.decode_response(tokenizer, o) for o in outs]
    outcomes = [("unfinished" if not (texts[2 * i][1] and texts[2 * i + 1][1]) else
                 "identical" if texts[2 * i][0] == texts[2 * i + 1][0] else
                 (row, *((texts[j][0], outs[j], logps[j]) for j in (2 * i, 2 * i + 1))))
                for i, row in enumerate(mine)]
    keep = [o for o in outcomes if not isinstance(o, str)]
    scores = []
    for side in (1, 2):  # the texts of all a, then of all b
        if args.judge == "true":  # the toy's hidden scorer plays the human
            from toy_tldr import true_score
            scores.append([true_score(o[0]["prompt"], o[side][0]) for o in keep])
        else:  # the gold RM reads the ids sampled (a chat reply's text would be re-encoded with a space)
            rows = [{**o[0], "text": o[side][0], "text_ids": o[side][1]} for o in keep]
            examples = lm.encode(tokenizer, rows, "text", args.max_prompt_len, args.max_response_len)
            scores.append(score_examples(gold, examples, tokenizer.pad_token_id, args.sample_batch_size,
                                         device, autocast, desc="scoring" if world.main else None))
    scored = zip(*scores)
    return stage.unshard([o if isinstance(o, str) else (*o, *next(scored)) for o in outcomes])


def label_rows(args, judged, toy):
    """(rows, dropped and why, on the toy whether each label agrees with the truth): --label argmax or bt."""
    rng, rows, agree, dropped = random.Random(args.seed), [], [], dict(unfinished=0, identical=0, tied=0)
    for outcome in judged:
        if isinstance(outcome, str) or args.label == "argmax" and outcome[3] == outcome[4]:
            dropped[outcome if isinstance(outcome, str) else "tied"] += 1  # equal scores: no preference
            continue
        prompt, a, b, sa, sb = outcome
        if not (sa > sb if args.label == "argmax" else
                rng.random() < 1 / (1 + np.exp(-(sa - sb) / args.bt_temperature))):
            a, b, sa, sb = b, a, sb, sa
        rows.append({**prompt, "chosen": a[0], "rejected": b[0], "chosen_score": sa, "rejected_score": sb,
                     "chosen_behaviour_logp": a[2], "rejected_behaviour_logp": b[2],
                     "chosen_ids": a[1], "rejected_ids": b[1]})  # the sampled tokens, EOS included
        if toy:  # the true scorer's view of the pair
            from toy_tldr import true_score
            t = true_score(prompt["prompt"], a[0]), true_score(prompt["prompt"], b[0])
            rows[-1].update(chosen_true_score=t[0], rejected_true_score=t[1])
            agree += [t[0] > t[1]] if t[0] != t[1] else []
    if not rows:
        fail(f"no usable pairs: every pair was unfinished, identical or tied ({dropped})")
    return rows, dropped, agree


def label(args, device, autocast):
    """Sample, judge and label the pairs; the main process writes them to --out_dir."""
    gold = load_reward_model(args.gold_path).to(device) if args.judge == "rm" else None  # before any sampling
    inputs = [args.sft_path, args.data, args.gold_path if gold is not None else ""]
    output = stage.start_output(args.out_dir, "reward label", inputs) if stage.WORLD.main else None
    tokenizer = lm.load_tokenizer(args.sft_path)
    if args.judge == "rm" and lm.load_tokenizer(args.gold_path).get_vocab() != tokenizer.get_vocab():
        fail(f"the gold model's tokenizer ({args.gold_path}) differs from pi_ref's ({args.sft_path})")
    prompts = {}  # each prompt once, in order, with its ids if it has them
    for row in lm.load_rows(args.data, "sft.jsonl", ["prompt"]):
        prompts.setdefault(row["prompt"], {k: v for k, v in row.items() if k in ("prompt", "prompt_ids")})
    toy = os.path.isfile(os.path.join(args.data, "eval.jsonl"))
    if args.judge == "true" and not toy:
        fail(f"--judge true needs the toy's hidden scorer; {args.data} is not a toy_tldr dir: use --judge rm")
    pi_ref, t0 = lm.load_model(args.sft_path).to(device), time.time()
    rows, dropped, agree = label_rows(args, sample_and_judge(
        args, pi_ref, gold, tokenizer, list(prompts.values())[:args.num_prompts], device, autocast), toy)
    if stage.WORLD.main:
        with open(os.path.join(output.work, "train.jsonl"), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        metrics = {"pairs": len(rows), "dropped": dropped, "judge": args.judge, "seconds": time.time() - t0}
        metrics.update({"label_true_agreement": float(np.mean(agree))} if agree else {},
                       **{"processes": stage.WORLD.size} if stage.WORLD.size > 1 else {})  # a stream each
        stage.save_json(os.path.join(output.work, "args.json"), asdict(args))
        stage.save_json(os.path.join(output.work, "metrics.json"), metrics)
        output.publish()
        print(f"label: wrote {len(rows)} pairs to {args.out_dir}/train.jsonl (dropped {dropped})")
    stage.barrier()  # the others wait until the output is published


@stage.cleans_up
def main(args):
    stage.check_args(args, non_negative=("warmup_steps", "save_every"), positive=(
        "max_prompt_len", "max_response_len", "sample_batch_size", "steps", "batch_size", "grad_accum", "lr",
        "grad_clip", "val_size", "num_prompts", "temperature", "bt_temperature"))
    for flag, ok in (("mode", ("train", "label")), ("judge", ("true", "rm")), ("label", ("argmax", "bt"))):
        if getattr(args, flag) not in ok:
            fail(f"--{flag} must be {' or '.join(ok)}, got {getattr(args, flag)!r}")
    args.out_dir = args.out_dir or ("out/gold_rm" if args.mode == "train" else "out/prefs")
    if not os.path.isdir(args.sft_path):
        fail(f"--sft_path {args.sft_path} not found (run sft.py first)")
    stage.init_distributed()
    stage.seed_everything(args.seed)
    device, autocast = stage.device_and_autocast(args.precision, args.threads)
    (train if args.mode == "train" else label)(args, device, autocast)


if __name__ == "__main__":
    main(stage.parse_args(Args, __doc__))
