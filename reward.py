"""
reward.py -- the gold reward model, and the offline preference pairs it labels.

The two halves of Gao et al.'s synthetic set-up (METHOD.md, section 4):
  --mode train  a scalar-head model started from pi_ref, trained with the Bradley-Terry loss
                -log sigmoid(r(x, y_w) - r(x, y_l)) on the "human" pairs; reports held-out accuracy (and,
                on the toy, agreement with the hidden true scorer). -> out/gold_rm/
  --mode label  for each training prompt two samples of pi_ref at --temperature, scored by a judge: the
                toy's hidden true scorer (--judge true) or the gold model (--judge rm); the higher one is
                "chosen" (or a Bradley-Terry draw). -> out/prefs/train.jsonl, the offline data the DAAs
                train on. Each row keeps the sampled token ids (chosen_ids, rejected_ids) and their
                behaviour log-probs under the distribution they were drawn from.

Run (after toy_tldr.py and sft.py; each about a minute on a laptop CPU):
    python reward.py --mode train
    python reward.py --mode label
    torchrun --standalone --nproc_per_node 4 reward.py --mode label   # 4 processes share the prompts
Other data: prepare it with `python -m scale.prepare` (--kind prefs for train, --kind sft for label).
"""
import dataclasses
import functools
import json
import os
import random
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import lm
import stage
from stage import fail


@dataclass
class Args:
    mode: str = field(default="train", metadata={"help": "train: the gold RM on human pairs | label: pairs"})
    sft_path: str = field(default="out/sft", metadata={"help": "pi_ref: the RM's start and label's sampler"})
    judge: str = field(default="true", metadata={
        "help": "label: true (the toy's hidden scorer) | rm (the gold reward model at --gold_path)"})
    gold_path: str = field(default="out/gold_rm", metadata={"help": "label --judge rm: the gold RM"})
    data: str = field(default="out/toy_tldr", metadata={
        "help": "train: pairs (prefs_human.jsonl or train.jsonl); label: prompts (sft.jsonl); or a dir of it"})
    max_prompt_len: int = field(default=64, metadata={"help": "longest prompt in tokens (longer: an error)"})
    max_response_len: int = field(default=24, metadata={"help": "response tokens kept (and sampled), EOS too"})
    steps: int = field(default=300, metadata={"help": "train: optimizer steps"})
    batch_size: int = field(default=32, metadata={"help": "train: pairs per micro-batch (per process)"})
    grad_accum: int = field(default=1, metadata={"help": "train: micro-batches per optimizer step"})
    lr: float = field(default=1e-3, metadata={"help": "train: peak learning rate (AdamW)"})
    warmup_steps: int = field(default=20, metadata={"help": "train: warm-up steps before the cosine decay"})
    min_lr_ratio: float = field(default=0.0, metadata={"help": "train: the cosine's floor, a fraction of --lr"})
    grad_clip: float = field(default=1.0, metadata={"help": "train: max gradient norm"})
    val_size: int = field(default=1000, metadata={"help": "train: pairs held out for the accuracy"})
    num_prompts: int = field(default=4000, metadata={"help": "label: training prompts to sample pairs for"})
    temperature: float = field(default=1.0, metadata={"help": "label: sampling temperature of pi_ref"})
    label: str = field(default="argmax", metadata={
        "help": "label: argmax (higher score wins; ties dropped) | bt (a Bradley-Terry draw, --bt_temperature)"})
    bt_temperature: float = field(default=1.0, metadata={"help": "label --label bt: sigmoid((s_a - s_b) / T)"})
    sample_batch_size: int = field(default=256, metadata={"help": "prompts per sampling / scoring batch"})
    seed: int = field(default=0, metadata={"help": "seed for python, numpy and torch"})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch (0 = torch's default)"})
    precision: str = field(default="auto", metadata={"help": stage.PRECISION_HELP})
    out_dir: str = field(default="", metadata={"help": "default out/gold_rm (train) or out/prefs (label)"})
    resume: bool = field(default=False, metadata={"help": "train: continue an interrupted run"})
    save_every: int = field(default=50, metadata={"help": "train: steps between states saved for --resume"})
    fsdp: bool = field(default=False, metadata={"help": "train, under torchrun: shard the weights (FSDP)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "train: recompute activations"})


# ----------------------------------------------------------------------------------------------
# the reward model


def load_reward_model(path, tokenizer=None, new_head=False):
    """A one-score sequence classifier. new_head: its head starts at zero (every score 0); otherwise a
    model without a trained head (pi_ref passed as the gold model) is refused."""
    from transformers import AutoModelForSequenceClassification

    if not os.path.isdir(path):
        fail(f"model directory {path} not found")
    one_score = SimpleNamespace(from_pretrained=functools.partial(  # num_labels=1: one score
        AutoModelForSequenceClassification.from_pretrained, num_labels=1))
    model = lm.load_pretrained(one_score, path, "a reward model (a score head)", ["score."] if new_head else [])
    if tokenizer is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if new_head:
        torch.nn.init.zeros_(model.score.weight)
    return model


def reward_scores(model, batch):
    """r(x, y) for a lm.collate_grouped batch: the head on the hidden state after the last response token.
    We pick that token ourselves (response_mask says where each response ends) rather than let the model
    find it by pad id: with Pythia, pad == EOS and the final EOS would be skipped."""
    hidden = lm.response_hidden(model.base_model, batch)  # hidden[:, t] has read t response tokens
    length = batch["response_mask"].sum(1)
    return model.score(hidden[torch.arange(len(length), device=length.device), length]).squeeze(-1).float()


def bradley_terry_loss(r_chosen, r_rejected):
    """-log sigmoid(r_w - r_l), averaged over pairs; shapes [B]."""
    # BEGIN SOLUTION
    return -F.logsigmoid(r_chosen - r_rejected).mean()
    # END SOLUTION


@torch.no_grad()
def score_examples(model, examples, pad_id, batch_size, device, autocast, k=1, desc=None):
    """Scores of encoded (prompt, response) rows in groups of k sharing a prompt (it runs once a group).
    model: the reward model, or stage.parallel's module of it (whose forward is reward_scores)."""
    model.eval()
    scores = []
    for start in tqdm(range(0, len(examples), batch_size * k), desc=desc, leave=False, disable=desc is None):
        batch = lm.to_device(lm.collate_grouped(examples[start:start + batch_size * k], pad_id, k), device)
        with autocast:
            scores += (reward_scores(model, batch) if hasattr(model, "score") else model(batch)).tolist()
    return scores


def score_texts(model, tokenizer, prompts, responses, args, device, autocast, desc=None, finished=None):
    """Scores of response texts after their prompts (texts, or rows with prompt and maybe prompt_ids), EOS
    after each response that ended (all, unless `finished` says otherwise): an unfinished one has none."""
    rows = [{**(p if isinstance(p, dict) else {"prompt": p}), "response": r} for p, r in zip(prompts, responses)]
    examples = lm.encode(tokenizer, rows, "response", args.max_prompt_len, 1 << 30)  # all, EOS last
    examples = [(p, (r if finished is None or finished[i] else r[:-1])[:args.max_response_len])
                for i, (p, r) in enumerate(examples)]
    return score_examples(model, examples, tokenizer.pad_token_id, args.sample_batch_size, device, autocast,
                          desc=desc)


# ----------------------------------------------------------------------------------------------
# --mode train


def train(args, device, autocast):
    """The Bradley-Terry loop. Under torchrun every process draws the same order, scores its shard of each
    global micro-batch (--batch_size pairs a process), and all the scores are gathered."""
    stage.check_args(args, positive=("steps", "batch_size", "grad_accum", "lr", "grad_clip", "val_size"),
                     non_negative=("warmup_steps", "save_every"))
    stage.check_output(args.out_dir, "reward train", [args.sft_path, args.data])
    world = stage.WORLD
    human = os.path.isfile(os.path.join(args.data, "prefs_human.jsonl"))  # the toy's
    rows = lm.load_rows(args.data, "prefs_human.jsonl" if human else "train.jsonl", ["prompt", "chosen", "rejected"])
    if len(rows) <= args.val_size:
        fail(f"{len(rows)} pairs is not more than --val_size {args.val_size}")
    tokenizer = lm.load_tokenizer(args.sft_path)
    pairs = list(zip(*(lm.encode(tokenizer, rows, c, args.max_prompt_len, args.max_response_len)
                       for c in ("chosen", "rejected"))))
    train_pairs, val_pairs, pad = pairs[:-args.val_size], pairs[-args.val_size:], tokenizer.pad_token_id
    model = load_reward_model(args.sft_path, tokenizer, new_head=True).to(device).train()
    output = stage.start_output(args.out_dir, "reward train", [args.sft_path, args.data], args.resume) \
        if world.main else None
    work = output.work if output else ""
    stage.barrier()
    module = stage.parallel(model, reward_scores, args.fsdp, args.gradient_checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    scheduler = stage.lr_schedule(optimizer, args.warmup_steps, args.steps, min_lr_ratio=args.min_lr_ratio)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")  # fp16 gradients underflow
    done, order, cursor = stage.restore_state(work, args, model, optimizer, scheduler, scaler)
    size, t0 = args.batch_size * world.size, time.time()  # the global micro-batch
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
        stage.save_json(os.path.join(work, "args.json"), dataclasses.asdict(args))
        stage.save_json(os.path.join(work, "metrics.json"), metrics)
        stage.remove_state(work)
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

        t_chosen = np.array([true_score(r["prompt"], r["chosen"]) for r in val_rows])
        t_rejected = np.array([true_score(r["prompt"], r["rejected"]) for r in val_rows])
        differ = t_chosen != t_rejected
        metrics["val_true_accuracy"] = float(np.mean((s_chosen > s_rejected)[differ] == (t_chosen > t_rejected)[differ]))
        metrics["human_label_true_accuracy"] = float(np.mean((t_chosen > t_rejected)[differ]))
    return metrics


# ----------------------------------------------------------------------------------------------
# --mode label


def sample_and_judge(args, pi_ref, gold, tokenizer, prompts, device, autocast):
    """Two samples of pi_ref per prompt, judged. Per prompt, in order: (prompt row, a, b, score_a, score_b),
    a and b each (text, sampled ids with EOS, behaviour log-prob: of the distribution the ids were drawn
    from, temperature and suppression included), or why it gives no pair: "unfinished" (a response cut by
    the length limit has no EOS to learn from) or "identical". The judge reads the texts, as a human would.
    Under torchrun each process samples and judges every n-th prompt from its own random stream (seed *
    processes + rank), and every process gets every outcome back, in order."""
    world, mine = stage.WORLD, stage.shard(prompts)
    generator = torch.Generator(device=device).manual_seed(args.seed * world.size + world.rank)
    ids = lm.encode_prompts(tokenizer, mine, args.max_prompt_len)
    with autocast:  # two samples per prompt: rows 2i and 2i+1
        outs, logps = lm.sample(pi_ref, [i for i in ids for _ in range(2)], tokenizer.eos_token_id,
                                tokenizer.pad_token_id, args.max_response_len, args.temperature,
                                args.sample_batch_size, generator, desc="sampling" if world.main else None,
                                suppress_ids=lm.banned_ids(tokenizer, pi_ref), logps_of="sampler")
    texts = [lm.decode_response(tokenizer, o) for o in outs]
    outcomes = [("unfinished" if not (texts[2 * i][1] and texts[2 * i + 1][1]) else
                 "identical" if texts[2 * i][0] == texts[2 * i + 1][0] else
                 (row, *((texts[j][0], outs[j], logps[j]) for j in (2 * i, 2 * i + 1))))
                for i, row in enumerate(mine)]
    keep = [o for o in outcomes if not isinstance(o, str)]
    sides = [[o[1][0] for o in keep], [o[2][0] for o in keep]]  # the texts of a, of b
    if args.judge == "true":  # the toy's hidden scorer plays the human
        from toy_tldr import true_score

        scores = [[true_score(o[0]["prompt"], text) for o, text in zip(keep, side)] for side in sides]
    else:
        scores = [score_texts(gold, tokenizer, [o[0] for o in keep], side, args, device, autocast,
                              desc="scoring" if world.main and not n else None) for n, side in enumerate(sides)]
    scored = zip(*scores)
    return stage.unshard([o if isinstance(o, str) else (*o, *next(scored)) for o in outcomes])


def label_rows(args, judged, toy):
    """(rows, dropped, agree): each pair labelled chosen / rejected by its scores (--label argmax or bt),
    what was dropped and why, and on the toy whether each label agrees with the true scorer."""
    if toy:
        from toy_tldr import true_score
    rng, rows, agree = random.Random(args.seed), [], []
    dropped = {"unfinished": 0, "identical": 0, "tied": 0}
    for outcome in judged:
        if isinstance(outcome, str) or args.label == "argmax" and outcome[3] == outcome[4]:
            dropped[outcome if isinstance(outcome, str) else "tied"] += 1  # equal scores: no preference
            continue
        prompt, a, b, sa, sb = outcome
        if not (sa > sb if args.label == "argmax" else
                rng.random() < 1 / (1 + np.exp(-(sa - sb) / args.bt_temperature))):
            a, b, sa, sb = b, a, sb, sa
        rows.append({"prompt": prompt["prompt"], **{k: v for k, v in prompt.items() if k == "prompt_ids"},
                     "chosen": a[0], "rejected": b[0], "chosen_score": sa, "rejected_score": sb,
                     "chosen_behaviour_logp": a[2], "rejected_behaviour_logp": b[2],
                     "chosen_ids": a[1], "rejected_ids": b[1]})  # the sampled tokens, EOS included
        if toy:  # the true scorer's view (when it judged, sa and sb)
            t = (sa, sb) if args.judge == "true" else (true_score(prompt["prompt"], a[0]),
                                                      true_score(prompt["prompt"], b[0]))
            rows[-1].update(chosen_true_score=t[0], rejected_true_score=t[1])
            if t[0] != t[1]:
                agree.append(t[0] > t[1])
    if not rows:
        fail(f"no usable pairs: every pair was unfinished, identical or tied ({dropped})")
    return rows, dropped, agree


def label(args, device, autocast):
    """Sample, judge and label the pairs; the main process writes them to --out_dir."""
    stage.check_args(args, positive=("num_prompts", "sample_batch_size", "temperature", "bt_temperature"))
    if args.label not in ("argmax", "bt") or args.judge not in ("true", "rm"):
        fail(f"--label must be argmax or bt, --judge true or rm: got {args.label!r}, {args.judge!r}")
    if args.judge == "rm" and not os.path.isdir(args.gold_path):
        fail(f"model directory {args.gold_path} not found")
    inputs = [args.sft_path, args.data] + ([args.gold_path] if args.judge == "rm" else [])
    # locked before the sampling: a second labelling of the same output fails now, not at its end
    output = stage.start_output(args.out_dir, "reward label", inputs) if stage.WORLD.main else None
    tokenizer = lm.load_tokenizer(args.sft_path)
    if args.judge == "rm" and lm.load_tokenizer(args.gold_path).get_vocab() != tokenizer.get_vocab():
        fail(f"the gold model's tokenizer ({args.gold_path}) differs from pi_ref's ({args.sft_path})")
    prompts = {}  # each prompt once, in order
    for row in lm.load_rows(args.data, "sft.jsonl", ["prompt"]):
        prompts.setdefault(row["prompt"], {k: v for k, v in row.items() if k in ("prompt", "prompt_ids")})
    toy = os.path.isfile(os.path.join(args.data, "eval.jsonl"))
    if args.judge == "true" and not toy:
        fail(f"--judge true needs the toy world's hidden scorer; {args.data} is not a toy_tldr dir (--judge rm)")
    pi_ref = lm.load_model(args.sft_path).to(device)
    # a gold model that is no reward model is refused now, before the sampling
    gold = load_reward_model(args.gold_path, tokenizer).to(device) if args.judge == "rm" else None
    t0 = time.time()
    judged = sample_and_judge(args, pi_ref, gold, tokenizer, list(prompts.values())[:args.num_prompts], device,
                              autocast)
    rows, dropped, agree = label_rows(args, judged, toy)
    if stage.WORLD.main:
        with open(os.path.join(output.work, "train.jsonl"), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        metrics = {"pairs": len(rows), "dropped": dropped, "judge": args.judge, "seconds": time.time() - t0,
                   **({"label_true_agreement": float(np.mean(agree))} if agree else {}),
                   **({"processes": stage.WORLD.size} if stage.WORLD.size > 1 else {})}  # one stream each
        stage.save_json(os.path.join(output.work, "args.json"), dataclasses.asdict(args))
        stage.save_json(os.path.join(output.work, "metrics.json"), metrics)
        output.publish()
        print(f"label: wrote {len(rows)} pairs to {args.out_dir}/train.jsonl (dropped {dropped})"
              + (f"; the labels agree with the true scorer on {metrics['label_true_agreement']:.1%}" if agree else ""))
    stage.barrier()  # the others wait until the output is published


@stage.cleans_up
def main(args):
    stage.check_args(args, positive=("max_prompt_len", "max_response_len", "sample_batch_size"))
    if args.mode not in ("train", "label"):
        fail(f"--mode must be train or label, got {args.mode!r}")
    args.out_dir = args.out_dir or ("out/gold_rm" if args.mode == "train" else "out/prefs")
    if not os.path.isdir(args.sft_path):
        fail(f"--sft_path {args.sft_path} not found (run sft.py first)")
    stage.init_distributed(args.resume and args.mode == "train")  # --resume: one process's (train)
    stage.seed_everything(args.seed)
    device, autocast = stage.device_and_autocast(args.precision, args.threads)
    (train if args.mode == "train" else label)(args, device, autocast)


if __name__ == "__main__":
    main(stage.parse_args(Args, __doc__))
