"""
reward.py -- the gold reward model, and the offline preference data it labels.

Two modes, the two halves of Gao et al.'s synthetic set-up (METHOD.md, section 4):

  --mode train  a scalar-head model started from pi_ref, trained with the Bradley-Terry loss
                -log sigmoid(r(x, y_w) - r(x, y_l)) on the "human" pairs; reports held-out accuracy
                (and, on the toy, agreement with the hidden true scorer). -> out/gold_rm/
  --mode label  for each training prompt, two samples from pi_ref at temperature 1, scored by a
                judge: the toy's hidden true scorer (--judge true, the default) or the gold model
                (--judge rm); the higher one is "chosen" (or a Bradley-Terry draw). -> out/prefs/train.jsonl
                This is the offline data the DAAs train on: the judge plays the human. Each row keeps the
                sampled token ids (chosen_ids, rejected_ids) and their behaviour log-probs under the
                distribution they were drawn from (METHOD.md, section 4).

Run (after toy_tldr.py and sft.py; each about a minute on a laptop CPU):
    python reward.py --mode train
    python reward.py --mode label
    torchrun --standalone --nproc_per_node 4 reward.py --mode label   # 4 processes (GPUs) share the prompts
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
import stage
import toy_tldr
from stage import fail

# ----------------------------------------------------------------------------------------------
# config


@dataclass
class Args:
    mode: str = field(default="train", metadata={
        "help": "train: fit the gold RM on human pairs; label: sample pi_ref pairs and label them with it"})
    sft_path: str = field(default="out/sft", metadata={
        "help": "pi_ref (sft.py output): the RM's starting point and the sampler in --mode label"})
    judge: str = field(default="true", metadata={
        "help": "--mode label: who labels the pairs: true (the toy's hidden scorer) or rm (the gold "
                "reward model at --gold_path)"})
    gold_path: str = field(default="out/gold_rm", metadata={
        "help": "--mode label --judge rm: the trained gold reward model"})
    data: str = field(default="out/toy_tldr", metadata={
        "help": "toy_tldr dir, local .json/.jsonl/.parquet, or hub id (train: human pairs; label: prompts)"})
    split: str = field(default="train", metadata={"help": "split to read when --data is a hub id"})
    prompt_column: str = field(default="prompt", metadata={"help": "column holding the prompt"})
    chosen_column: str = field(default="chosen", metadata={
        "help": "--mode train: column holding the preferred response"})
    rejected_column: str = field(default="rejected", metadata={
        "help": "--mode train: column holding the other response"})
    max_prompt_len: int = field(default=64, metadata={"help": "prompt tokens kept"})
    max_response_len: int = field(default=24, metadata={
        "help": "response tokens kept (and sampled), EOS included"})
    truncate_prompts: bool = field(default=False, metadata={
        "help": "cut over-long prompts from the left instead of refusing"})
    steps: int = field(default=300, metadata={"help": "--mode train: optimizer steps"})
    batch_size: int = field(default=32, metadata={"help": "--mode train: pairs per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "--mode train: micro-batches per optimizer step"})
    lr: float = field(default=1e-3, metadata={"help": "--mode train: peak learning rate (AdamW)"})
    warmup_steps: int = field(default=20, metadata={
        "help": "--mode train: warmup steps before the cosine decay"})
    min_lr_ratio: float = field(default=0.0, metadata={
        "help": "--mode train: the cosine's floor as a fraction of --lr (0: decay to 0; IS-DAAs: 0.1)"})
    grad_clip: float = field(default=1.0, metadata={"help": "--mode train: max gradient norm"})
    val_size: int = field(default=1000, metadata={"help": "--mode train: pairs held out for accuracy"})
    num_prompts: int = field(default=4000, metadata={
        "help": "--mode label: training prompts to sample pairs for"})
    temperature: float = field(default=1.0, metadata={"help": "--mode label: sampling temperature of pi_ref"})
    label: str = field(default="argmax", metadata={
        "help": "--mode label: argmax (higher score wins; ties dropped) or bt (Bradley-Terry draw at "
                "--bt_temperature)"})
    bt_temperature: float = field(default=1.0, metadata={
        "help": "--mode label --label bt: P(a wins) = sigmoid((s_a - s_b) / T)"})
    sample_batch_size: int = field(default=256, metadata={"help": "prompts per sampling / scoring batch"})
    seed: int = field(default=0, metadata={"help": "seed for python, numpy and torch"})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch (0 = torch's default)"})
    precision: str = field(default="auto", metadata={"help": policy.PRECISION_HELP})
    out_dir: str = field(default="", metadata={
        "help": "output dir; default out/gold_rm (train) or out/prefs (label)"})
    resume: bool = field(default=False, metadata={"help": "train: continue an interrupted run"})
    save_every: int = field(default=50, metadata={"help": "train: steps between states saved for --resume"})
    fsdp: bool = field(default=False, metadata={
        "help": "train, under torchrun: shard every weight over the processes (FSDP) instead of copying it"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "train: recompute each layer's activations in backward instead of keeping them"})


# ----------------------------------------------------------------------------------------------
# the reward model


def load_reward_model(path, tokenizer=None, new_head=False):
    """A scalar-head sequence classifier. new_head: start the head at zero (every score 0); otherwise a
    model without a trained head (pi_ref passed as the gold model) is refused."""
    from transformers import AutoModelForSequenceClassification

    if not os.path.isdir(path):
        fail(f"model directory {path} not found")
    model = policy.load_pretrained(AutoModelForSequenceClassification, path, "a reward model (a score head)",
                                new_weights=["score."] if new_head else [], num_labels=1)
    if tokenizer is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if new_head:
        torch.nn.init.zeros_(model.score.weight)
    return model


def reward_scores(model, batch):
    """r(x, y) for a policy.collate_grouped batch: the scalar head on the hidden state after the last response
    token.

    We pick that token ourselves (response_mask tells where each response ends) instead of trusting
    the model to find it by pad id: with Pythia, pad == EOS and the final EOS would be skipped.
    """
    hidden = policy.response_hidden(model.base_model, batch)  # hidden[:, t] has read t response tokens
    length = batch["response_mask"].sum(1)
    return model.score(hidden[torch.arange(len(length), device=length.device), length]).squeeze(-1).float()


def bradley_terry_loss(r_chosen, r_rejected):
    """-log sigmoid(r_w - r_l), averaged over pairs; shapes [B]."""
    # BEGIN SOLUTION
    return -F.logsigmoid(r_chosen - r_rejected).mean()
    # END SOLUTION


def pair_batch(pairs, pad_id):
    """Every pair's prompt once, with its two responses: rows chosen, rejected, chosen, rejected, ..."""
    return policy.collate_grouped([example for pair in pairs for example in pair], pad_id, k=2)


@torch.no_grad()
def score_examples(model, examples, pad_id, batch_size, device, autocast, k=1, desc=None):
    """Gold scores of encoded (prompt, response) rows, in groups of k rows sharing a prompt (run once per
    group)."""
    model.eval()
    scores = []
    rows = batch_size * k
    for start in tqdm(range(0, len(examples), rows), desc=desc, leave=False, disable=desc is None):
        batch = policy.to_device(policy.collate_grouped(examples[start:start + rows], pad_id, k), device)
        with autocast:  # model: the reward model, or distributed.parallel's module of it
            scores += distributed.apply(reward_scores, model, batch).tolist()
    return scores


def score_texts(model, tokenizer, prompts, responses, args, device, autocast, desc=None, finished=None):
    """Gold scores of (prompt, response) texts, EOS appended to each response that ended (all, unless
    `finished` [bool per response] says otherwise): an unfinished sample is scored as it is, without EOS."""
    examples = policy.encode_rows(tokenizer, prompts, responses, args.max_prompt_len, args.max_response_len,
                                  args.truncate_prompts, add_eos=False)
    eos = tokenizer.eos_token_id
    examples = [(p, (r + [eos] * (finished is None or finished[i]))[:args.max_response_len])
                for i, (p, r) in enumerate(examples)]
    return score_examples(model, examples, tokenizer.pad_token_id, args.sample_batch_size, device, autocast,
                          desc=desc)


def score_pairs(model, pairs, pad_id, batch_size, device, autocast):
    """Gold scores (chosen, rejected) of encoded pairs, each pair's prompt run once (as in pair_batch)."""
    scores = score_examples(model, [example for pair in pairs for example in pair], pad_id, batch_size,
                            device, autocast, k=2)
    return np.array(scores[0::2]), np.array(scores[1::2])


# ----------------------------------------------------------------------------------------------
# mode train


def load_human_pairs(args):
    """(tokenizer, train pairs, validation pairs, validation rows) of the human preference data."""
    cols = {"prompt": args.prompt_column, "chosen": args.chosen_column, "rejected": args.rejected_column}
    rows = policy.load_rows(args.data, "prefs_human.jsonl", args.split, cols,
                            token_ids=policy.ids_columns(args))
    if len(rows) <= args.val_size:
        fail(f"{len(rows)} pairs is not more than --val_size {args.val_size}")
    tokenizer = policy.load_tokenizer(args.sft_path)
    pairs = policy.encode_pairs(tokenizer, rows, args, "gold rm")
    return tokenizer, pairs[:-args.val_size], pairs[-args.val_size:], rows[-args.val_size:]


def train_steps(args, tmp, model, train_pairs, pad_id, device, autocast):
    """The Bradley-Terry loop, continued from the state saved in tmp if any. model: distributed.parallel's
    module, whose forward is reward_scores. Under torchrun every process draws the same order, scores its
    shard of each global micro-batch (--batch_size pairs a process), and all the scores are gathered."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    scheduler = policy.lr_schedule(optimizer, args.warmup_steps, args.steps, min_lr_ratio=args.min_lr_ratio)
    scaler = policy.grad_scaler(args.precision, device)
    done, order, cursor = policy.restore_state(tmp, args, model, optimizer, scheduler, scaler)
    size = args.batch_size * distributed.WORLD.size  # the global micro-batch
    bar = tqdm(range(done + 1, args.steps + 1), desc="gold rm", disable=not distributed.WORLD.main)
    for step in bar:
        for i in range(args.grad_accum):
            if cursor + size > len(order):
                order, cursor = random.sample(range(len(train_pairs)), len(train_pairs)), 0
            batch_pairs = [train_pairs[j] for j in distributed.shard(order[cursor:cursor + size])]
            batch = policy.to_device(pair_batch(batch_pairs, pad_id), device)
            cursor += size
            with distributed.sync_gradients(model, now=i == args.grad_accum - 1):
                # --- the algorithm: -log sigmoid(r(x, y_w) - r(x, y_l)) ---
                with autocast:
                    r = model(batch)  # reward_scores(the reward model, batch)
                r = distributed.gather_live(r.view(-1, 2)).view(-1)  # every process's pairs
                r_chosen, r_rejected = r[0::2], r[1::2]
                loss = bradley_terry_loss(r_chosen, r_rejected) / args.grad_accum
                scaler.scale(loss * distributed.WORLD.size).backward()
        policy.optimizer_step(step, model, optimizer, scheduler, scaler, args.grad_clip, loss)
        accuracy = (r_chosen > r_rejected).float().mean().item()
        if distributed.WORLD.main:
            policy.append_jsonl(os.path.join(tmp, "train_log.jsonl"),
                                {"step": step, "loss": loss.item() * args.grad_accum, "accuracy": accuracy})
        bar.set_postfix(loss=f"{loss.item() * args.grad_accum:.3f}", acc=f"{accuracy:.2f}")
        policy.save_state(tmp, args, step, args.steps, model, optimizer, scheduler, order, cursor, scaler)
    policy.check_finite(args.steps, parameter_norm=policy.parameter_norm(model))


def validation_metrics(args, model, val_pairs, val_rows, pad_id, device, autocast):
    """Held-out accuracy and, on the toy, agreement with the true scorer."""
    s_chosen, s_rejected = score_pairs(model, val_pairs, pad_id, args.sample_batch_size, device, autocast)
    policy.check_finite(args.steps, validation_scores=s_chosen.sum() + s_rejected.sum())
    metrics = {"val_accuracy": float(np.mean(s_chosen > s_rejected)), "val_pairs": len(val_rows)}
    # the toy knows the truth: how often does the RM order pairs as the true scorer does?
    if policy.is_toy(args.data):
        t_chosen = np.array([toy_tldr.true_score(r["prompt"], r["chosen"]) for r in val_rows])
        t_rejected = np.array([toy_tldr.true_score(r["prompt"], r["rejected"]) for r in val_rows])
        differ = t_chosen != t_rejected
        agree = (s_chosen > s_rejected)[differ] == (t_chosen > t_rejected)[differ]
        metrics["val_true_accuracy"] = float(np.mean(agree))
        metrics["human_label_true_accuracy"] = float(np.mean((t_chosen > t_rejected)[differ]))
    return metrics


def train(args, device, autocast):
    stage.check_args(args, positive=("steps", "batch_size", "grad_accum", "lr", "grad_clip", "val_size"),
                     non_negative=("warmup_steps", "save_every"))
    stage.check_output(args.out_dir, "reward train", [args.sft_path, args.data])
    main_process = distributed.WORLD.main  # under torchrun, the one that writes the files
    tokenizer, train_pairs, val_pairs, val_rows = load_human_pairs(args)
    model = load_reward_model(args.sft_path, tokenizer, new_head=True).to(device)
    model.train()
    tmp = stage.start_output(args.out_dir, "reward train", [args.sft_path, args.data], resumable=True,
                             resume=args.resume) if main_process else None
    distributed.barrier()
    forward = distributed.parallel(model, reward_scores, args.fsdp, args.gradient_checkpointing)
    t0 = time.time()
    train_steps(args, tmp, forward, train_pairs, tokenizer.pad_token_id, device, autocast)
    seconds = time.time() - t0
    pad = tokenizer.pad_token_id
    validation = validation_metrics(args, forward, val_pairs, val_rows, pad, device, autocast)
    metrics = {"train_seconds": seconds, **validation}
    distributed.save_pretrained(model, tmp, tokenizer)
    if not main_process:
        return
    policy.save_json(os.path.join(tmp, "args.json"), dataclasses.asdict(args))
    policy.save_json(os.path.join(tmp, "metrics.json"), metrics)
    policy.remove_state(tmp)
    stage.finish_output(tmp, args.out_dir)
    print(f"gold rm: saved {args.out_dir}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))


# ----------------------------------------------------------------------------------------------
# mode label


def sample_pairs(args, pi_ref, tokenizer, prompts, device, autocast):
    """Two samples of pi_ref per prompt at --temperature: one outcome per prompt, either (prompt, a, b) for
    two different finished responses, a and b each (text, sampled token ids with EOS, behaviour log-prob:
    log of the distribution the ids were drawn from, temperature and suppression included), or the reason
    the prompt gives no pair ("unfinished" or "identical").

    Under torchrun each process samples its own share of the prompts from its own random stream: the
    generator is seeded by seed * processes + rank (one process: --seed itself)."""
    world = distributed.WORLD
    generator = torch.Generator(device=device).manual_seed(args.seed * world.size + world.rank)
    desc = "sampling" if world.main else None  # one progress bar
    ids = policy.encode_prompts(tokenizer, prompts, args.max_prompt_len, args.truncate_prompts)
    policy.report_shaping("label", tokenizer, ids)  # samples cut by the length limit are dropped below
    with autocast:  # two samples per prompt: rows 2i and 2i+1
        outs, logps = policy.sample(pi_ref, [i for i in ids for _ in range(2)], tokenizer.eos_token_id,
                                    tokenizer.pad_token_id, args.max_response_len, args.temperature,
                                    args.sample_batch_size, generator, desc=desc,
                                    suppress_ids=policy.banned_ids(tokenizer, pi_ref), logps_of="sampler")
    texts = [policy.decode_response(tokenizer, o) for o in outs]
    outcomes = []
    for i, prompt in enumerate(prompts):
        (a, fa), (b, fb) = texts[2 * i], texts[2 * i + 1]
        if not (fa and fb):
            outcomes.append("unfinished")  # a response cut by the length limit has no EOS to learn from
        elif a == b:
            outcomes.append("identical")  # chosen == rejected carries no preference
        else:
            outcomes.append((prompt, (a, outs[2 * i], logps[2 * i]), (b, outs[2 * i + 1], logps[2 * i + 1])))
    return outcomes


def judge_pairs(args, gold, tokenizer, keep, device, autocast):
    """The judge's scores of both responses of every kept pair: the true scorer's, or the gold RM's. Both
    read the text, as a human judge would (the gold RM re-encodes it, as it was trained)."""
    prompts_kept = [k[0] for k in keep]
    texts_a, texts_b = [a[0] for _, a, _ in keep], [b[0] for _, _, b in keep]
    if args.judge == "true":  # the toy's hidden scorer plays the human
        scores_a = [toy_tldr.true_score(p, t) for p, t in zip(prompts_kept, texts_a)]
        scores_b = [toy_tldr.true_score(p, t) for p, t in zip(prompts_kept, texts_b)]
    else:
        desc = "scoring" if distributed.WORLD.main else None  # one progress bar
        scores_a = score_texts(gold, tokenizer, prompts_kept, texts_a, args, device, autocast, desc=desc)
        scores_b = score_texts(gold, tokenizer, prompts_kept, texts_b, args, device, autocast)
    return scores_a, scores_b


def sample_and_judge(args, pi_ref, gold, tokenizer, prompts, device, autocast):
    """(keep, scores_a, scores_b, dropped) over all the prompts, in their order: the pairs of sample_pairs,
    their judge's scores, and the count of prompts dropped for each reason.

    Under torchrun each process samples and judges its share of the prompts (distributed.shard: every n-th),
    and every process gets back every outcome, in prompt order (distributed.unshard)."""
    outcomes = sample_pairs(args, pi_ref, tokenizer, distributed.shard(prompts), device, autocast)
    keep = [o for o in outcomes if not isinstance(o, str)]
    scores_a, scores_b = judge_pairs(args, gold, tokenizer, keep, device, autocast) if keep else ([], [])
    scores = zip(scores_a, scores_b)  # in the order of keep
    judged = distributed.unshard([o if isinstance(o, str) else (o, *next(scores)) for o in outcomes])
    dropped = {"unfinished": 0, "identical": 0, "tied": 0}
    for o in judged:
        if isinstance(o, str):
            dropped[o] += 1
    kept = [o for o in judged if not isinstance(o, str)]
    if not kept:
        fail("no usable pairs: every sample was unfinished or identical")
    return [k for k, _, _ in kept], [a for _, a, _ in kept], [b for _, _, b in kept], dropped


def label_rows(args, keep, scores_a, scores_b, toy, dropped):
    """(rows, agree): each pair labelled chosen / rejected by its scores (--label argmax or bt), and on the
    toy whether each label agrees with the true scorer."""
    rng = random.Random(args.seed)
    out_rows, agree = [], []
    for (prompt, a, b), sa, sb in zip(keep, scores_a, scores_b):
        if args.label == "argmax":
            if sa == sb:
                dropped["tied"] += 1  # equal scores carry no preference
                continue
            a_wins = sa > sb
        else:
            a_wins = rng.random() < 1 / (1 + np.exp(-(sa - sb) / args.bt_temperature))
        if not a_wins:
            a, b, sa, sb = b, a, sb, sa
        # text, or (a conversation's prompt) TRL's explicit form: the replies as assistant messages
        row = {"prompt": prompt, "chosen": policy.as_reply(prompt, a[0]),
               "rejected": policy.as_reply(prompt, b[0]), "chosen_score": sa, "rejected_score": sb,
               "chosen_behaviour_logp": a[2], "rejected_behaviour_logp": b[2],
               "chosen_ids": a[1], "rejected_ids": b[1]}  # the sampled tokens, EOS included
        if toy:  # when the true scorer judged, its scores are already sa, sb
            if args.judge == "true":
                row["chosen_true_score"], row["rejected_true_score"] = sa, sb
            else:
                row["chosen_true_score"] = toy_tldr.true_score(prompt, a[0])
                row["rejected_true_score"] = toy_tldr.true_score(prompt, b[0])
            if row["chosen_true_score"] != row["rejected_true_score"]:
                agree.append(row["chosen_true_score"] > row["rejected_true_score"])
        out_rows.append(row)
    if not out_rows:
        fail("no usable pairs: every pair was unfinished, identical or tied")
    return out_rows, agree


def label(args, device, autocast):
    """Sample, judge and label the pairs; write them to --out_dir. Under torchrun the processes share the
    sampling and the judging (sample_and_judge); the main one alone locks, writes and publishes the output."""
    stage.check_args(args, positive=("num_prompts", "sample_batch_size", "temperature", "bt_temperature"))
    if args.label not in ("argmax", "bt"):
        fail(f"--label must be argmax or bt, got {args.label!r}")
    if args.judge not in ("true", "rm"):
        fail(f"--judge must be true or rm, got {args.judge!r}")
    # the output, locked before the sampling: a second labelling of it fails now, not at its end
    inputs = [args.sft_path, args.data] + ([args.gold_path] if args.judge == "rm" else [])
    tmp = stage.start_output(args.out_dir, "reward label", inputs) if distributed.WORLD.main else None
    if args.judge == "rm" and not os.path.isdir(args.gold_path):
        fail(f"model directory {args.gold_path} not found")
    tokenizer = policy.load_tokenizer(args.sft_path)
    if args.judge == "rm" and policy.load_tokenizer(args.gold_path).get_vocab() != tokenizer.get_vocab():
        fail(f"the gold model's tokenizer ({args.gold_path}) differs from pi_ref's ({args.sft_path})")
    rows = policy.load_rows(args.data, "sft.jsonl", args.split, {"prompt": args.prompt_column})
    toy = policy.is_toy(args.data)
    if args.judge == "true" and not toy:
        fail(f"--judge true needs the toy world's hidden scorer; {args.data} is not a toy_tldr dir "
             f"(use --judge rm)")
    prompts = policy.unique(r["prompt"] for r in rows)[:args.num_prompts]  # in order; text or messages
    pi_ref = policy.load_policy(args.sft_path).to(device)
    # a gold model that is no reward model is refused now, before the sampling
    gold = load_reward_model(args.gold_path, tokenizer).to(device) if args.judge == "rm" else None
    t0 = time.time()
    keep, scores_a, scores_b, dropped = sample_and_judge(args, pi_ref, gold, tokenizer, prompts, device,
                                                         autocast)
    out_rows, agree = label_rows(args, keep, scores_a, scores_b, toy, dropped)
    if distributed.WORLD.main:
        write_pairs(args, tmp, out_rows, agree, dropped, time.time() - t0)
    distributed.barrier()  # the others wait until the output is published


def write_pairs(args, tmp, out_rows, agree, dropped, seconds):
    """train.jsonl, args.json and metrics.json into the unfinished output tmp, then publish it."""
    toy_tldr.write_jsonl(os.path.join(tmp, "train.jsonl"), out_rows)
    metrics = {"pairs": len(out_rows), "dropped": dropped, "judge": args.judge, "seconds": seconds}
    if agree:
        metrics["label_true_agreement"] = float(np.mean(agree))
    if distributed.WORLD.size > 1:  # the samples depend on the number of processes (one stream each)
        metrics["processes"] = distributed.WORLD.size
    policy.save_json(os.path.join(tmp, "args.json"), dataclasses.asdict(args))
    policy.save_json(os.path.join(tmp, "metrics.json"), metrics)
    stage.finish_output(tmp, args.out_dir)
    print(f"label: wrote {len(out_rows)} pairs to {args.out_dir}/train.jsonl (dropped {dropped})"
          + (f"; the label agrees with the true scorer on {metrics['label_true_agreement']:.1%}"
             if agree else ""))


@stage.cleans_up
def main(args):
    stage.check_args(args, positive=("max_prompt_len", "max_response_len", "sample_batch_size"))
    if args.mode not in ("train", "label"):
        fail(f"--mode must be train or label, got {args.mode!r}")
    args.out_dir = args.out_dir or ("out/gold_rm" if args.mode == "train" else "out/prefs")
    if not os.path.isdir(args.sft_path):
        fail(f"--sft_path {args.sft_path} not found (run sft.py first)")
    if args.mode == "train":  # under torchrun: join the other processes (distributed.py)
        distributed.join_processes(args)  # (--resume is for one process only)
    else:
        distributed.init_distributed()
    policy.seed_everything(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, autocast = policy.device_and_autocast(args.precision)
    (train if args.mode == "train" else label)(args, device, autocast)


if __name__ == "__main__":
    main(stage.parse_args(Args, __doc__))
