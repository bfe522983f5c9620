"""
extras/rloo.py -- REINFORCE leave-one-out (RLOO) against a proxy reward model: the online baseline of the
Adaptive-IS paper (App. C, Fig. 6), and the online loop that extras/online_dpo.py shares.

Each step draws --prompts_per_step training prompts and k responses per prompt from the current policy
(temperature 1), scores each with the proxy reward model (reward.py --mode train on the offline pairs:
it never sees the judge's scores, only which response was chosen) or, with --judge true, with the toy's
hidden true scorer, and takes one policy-gradient step (METHOD.md, section 11):

    R(y)  = proxy(x, y) - beta * (log pi_theta(y|x) - log pi_ref(y|x))      the KL penalty in the reward
    A(y_i) = R(y_i) - mean_{j != i} R(y_j)                                  the leave-one-out baseline
    loss  = -mean_i A(y_i) * log pi_theta(y_i|x)                            A is a constant (no gradient)

Run (after toy_tldr.py, sft.py, reward.py --mode label, and the proxy:
    python reward.py --mode train --data out/prefs/train.jsonl --out_dir out/proxy_rm --val_size 500):
    python extras/rloo.py               # -> out/runs/rloo_beta0.01_seed0/ (ckpt-<step>/, train_log.jsonl)

Read it top to bottom:
  1. the prompts, and the scores of sampled responses (proxy or true scorer);
  2. the RLOO estimator: advantages and the surrogate loss, small pure functions;
  3. the online loop: sample from the current policy, score, step; checkpoints and train_log rows as
     dpo.py writes them, so that evaluate.py reads the runs unchanged.
"""
import dataclasses
import os
import random
import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the core, as a script too
import dpo  # noqa: E402
import lm  # noqa: E402
import reward  # noqa: E402
import stage  # noqa: E402
from stage import fail  # noqa: E402

# ----------------------------------------------------------------------------------------------
# config


def dpo_flag(name, **default):
    """dpo.py's flag of that name (its help), with dpo.py's default or the one given."""
    flag = next(f for f in dataclasses.fields(dpo.Args) if f.name == name)
    return field(default=default.get("default", flag.default), metadata=flag.metadata)


@dataclass
class OnlineArgs:
    """The flags of every online method (extras/rloo.py, extras/online_dpo.py); most are dpo.py's."""
    sft_path: str = dpo_flag("sft_path")
    data: str = field(default="out/toy_tldr", metadata={
        "help": "prompts to sample: a sft.jsonl, or the directory holding it (the toy world's)"})
    num_prompts: int = field(default=4000, metadata={
        "help": "the first N unique training prompts (reward.py --mode label's prompts)"})
    steps: int = field(default=150, metadata={"help": "optimizer steps"})
    prompts_per_step: int = field(default=32, metadata={"help": "prompts sampled per step"})
    judge: str = field(default="proxy", metadata={
        "help": "who scores the samples: proxy (the reward model at --proxy_path) or true (the toy's "
                "hidden scorer)"})
    beta: float = dpo_flag("beta")
    proxy_path: str = field(default="out/proxy_rm", metadata={
        "help": "the proxy reward model (reward.py --mode train --data out/prefs/train.jsonl)"})
    missing_eos_penalty: float = field(default=1.0, metadata={
        "help": "subtracted from the proxy's score of a response cut by --max_response_len (no EOS); the "
                "true scorer judges those itself"})
    lr: float = dpo_flag("lr")
    warmup_steps: int = dpo_flag("warmup_steps")
    lr_schedule: str = dpo_flag("lr_schedule")
    min_lr_ratio: float = dpo_flag("min_lr_ratio")
    decay_fraction: float = dpo_flag("decay_fraction")
    grad_clip: float = dpo_flag("grad_clip")
    num_checkpoints: int = dpo_flag("num_checkpoints", default=10)
    logit_chunk: int = dpo_flag("logit_chunk")
    precision: str = dpo_flag("precision")
    max_prompt_len: int = dpo_flag("max_prompt_len")
    max_response_len: int = dpo_flag("max_response_len")
    seed: int = dpo_flag("seed")
    threads: int = dpo_flag("threads")
    runs_dir: str = dpo_flag("runs_dir")
    run_name: str = dpo_flag("run_name")


@dataclass
class Args(OnlineArgs):
    prompts_per_step: int = field(default=16, metadata={"help": "prompts sampled per step (k samples each)"})
    lr: float = dpo_flag("lr", default=1e-4)
    k: int = field(default=4, metadata={
        "help": "responses sampled per prompt (>= 2: the baseline needs them)"})


# ----------------------------------------------------------------------------------------------
# 1. prompts and scores


def load_prompts(args, tokenizer):
    """[(text, ids)] of the first --num_prompts unique training prompts."""
    first = {}
    for row in lm.load_rows(args.data, "sft.jsonl", ["prompt"]):
        first.setdefault(row["prompt"], row)  # each prompt's first row, in the order of the file
    rows = list(first.values())[:args.num_prompts]
    ids = lm.encode_prompts(tokenizer, rows, args.max_prompt_len)
    return [(row["prompt"], p) for row, p in zip(rows, ids)]


def sample_responses(args, run, prompts, k):
    """k responses per prompt from the current policy at temperature 1: [response ids] of len(prompts) * k,
    rows i*k .. i*k+k-1 for prompt i (EOS kept where the response finished)."""
    ids = [p for _, p in prompts for _ in range(k)]
    tok = run.tokenizer
    responses, _ = lm.sample(run.model, ids, tok.eos_token_id, tok.pad_token_id, args.max_response_len,
                             1.0, 256, run.generator, suppress_ids=lm.banned_ids(tok, run.model))
    return responses


@torch.no_grad()
def proxy_scores(run, examples, k, batch_size=64):
    """The proxy's score of each (prompt_ids, response_ids) [len(examples)], k rows sharing each prompt."""
    run.scorer.eval()
    out = []
    for s in range(0, len(examples), batch_size * k):
        batch = lm.collate_grouped(examples[s:s + batch_size * k], run.tokenizer.pad_token_id, k)
        batch = lm.to_device(batch, run.device)
        with run.autocast:
            out.append(reward.reward_scores(run.scorer, batch))
    return torch.cat(out).cpu()


def scores(args, run, prompts, responses, k):
    """The judge's score of each response [len(responses)]: the proxy's (minus --missing_eos_penalty for a
    response without EOS) or the toy's true scorer's."""
    eos = run.tokenizer.eos_token_id
    finished = torch.tensor([bool(r) and r[-1] == eos for r in responses])
    if args.judge == "true":
        import toy_tldr  # the toy's hidden scorer

        texts = [lm.decode_response(run.tokenizer, r)[0] for r in responses]
        return torch.tensor([toy_tldr.true_score(prompts[i // k][0], t, bool(f))
                             for i, (t, f) in enumerate(zip(texts, finished))])
    s = proxy_scores(run, [(prompts[i // k][1], r) for i, r in enumerate(responses)], k)
    return s - args.missing_eos_penalty * (~finished).float()


def logps_of(args, model, run, prompts, responses, k):
    """log pi(y|x) of each response [len(responses)], each prompt run once for its k responses."""
    examples = [(prompts[i // k][1], r) for i, r in enumerate(responses)]
    batch = lm.to_device(lm.collate_grouped(examples, run.tokenizer.pad_token_id, k), run.device)
    with run.autocast:
        return lm.sequence_logps(model, batch, args.logit_chunk)[0]


# ----------------------------------------------------------------------------------------------
# 2. the RLOO estimator (METHOD.md, section 11)


def leave_one_out_advantages(rewards):
    """A_i = R_i - mean_{j != i} R_j within each prompt's group. rewards [P, k], k >= 2 -> [P, k]."""
    k = rewards.shape[-1]
    return rewards - (rewards.sum(-1, keepdim=True) - rewards) / (k - 1)


def rloo_loss(logps, advantages):
    """The surrogate -mean(A * log pi_theta(y)): its gradient is the RLOO estimate of -grad E[R]. A is
    detached: the baseline and the KL term of the reward carry no gradient of their own."""
    return -(advantages.detach() * logps).mean()


def rloo_step(args, run, prompts):
    """One RLOO loss on k fresh samples of each prompt, and what is worth logging."""
    responses = sample_responses(args, run, prompts, args.k)
    score = scores(args, run, prompts, responses, args.k).to(run.device)
    logps = logps_of(args, run.model, run, prompts, responses, args.k)
    with torch.no_grad():
        ref = logps_of(args, run.ref, run, prompts, responses, args.k)
    # --- the algorithm: the KL-penalised reward, the leave-one-out baseline, the surrogate ---
    kl = (logps - ref).detach()
    rewards = (score - args.beta * kl).view(-1, args.k)
    advantages = leave_one_out_advantages(rewards).reshape(-1)
    loss = rloo_loss(logps, advantages)
    lengths = torch.tensor([len(r) for r in responses], dtype=torch.float)
    return loss, {"score": score.mean().item(), "reward": rewards.mean().item(), "kl": kl.mean().item(),
                  "advantage_abs": advantages.abs().mean().item(), "logps": logps.mean().item(),
                  "length": lengths.mean().item()}


# ----------------------------------------------------------------------------------------------
# 3. the online loop, shared with extras/online_dpo.py


@dataclass
class Run:
    """What a step works on."""
    tokenizer: object
    model: object  # pi_theta, started at pi_ref
    ref: object  # pi_ref, frozen
    scorer: object  # the proxy reward model, or None (--judge true)
    generator: torch.Generator
    device: torch.device
    autocast: object


def check(args):
    stage.one_process_only("an online method (extras/rloo.py, extras/online_dpo.py)")
    stage.check_args(args, positive=("num_prompts", "steps", "prompts_per_step", "lr", "grad_clip", "beta",
                                     "max_prompt_len", "max_response_len"),
                     non_negative=("warmup_steps", "num_checkpoints", "missing_eos_penalty", "logit_chunk"))
    if getattr(args, "k", 2) < 2:
        fail(f"--k must be >= 2 (the leave-one-out baseline needs another sample), got {args.k}")
    if args.judge not in ("proxy", "true"):
        fail(f"--judge must be proxy or true, got {args.judge!r}")
    if args.run_name in (".", "..") or os.sep in args.run_name:
        fail(f"--run_name must be a plain name (no {os.sep}), got {args.run_name!r}")
    for flag in ("sft_path", "proxy_path") if args.judge == "proxy" else ("sft_path",):
        if not os.path.isdir(getattr(args, flag)):
            fail(f"--{flag} {getattr(args, flag)} not found")
    if args.judge == "true" and not os.path.isfile(os.path.join(args.data, "eval.jsonl")):
        fail(f"--judge true needs the toy world's hidden scorer; {args.data} is not a toy_tldr dir")


def start_run(args, device, autocast):
    """pi_theta, pi_ref, the scorer and the sampler's generator."""
    tokenizer = lm.load_tokenizer(args.sft_path)
    model = lm.load_model(args.sft_path).to(device)
    ref = lm.load_model(args.sft_path).to(device).eval().requires_grad_(False)
    scorer = None
    if args.judge == "proxy":
        scorer = reward.load_reward_model(args.proxy_path, tokenizer).to(device).requires_grad_(False)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    return Run(tokenizer, model, ref, scorer, generator, device, autocast)


@stage.cleans_up
def train(args, step_loss, method):
    """The online loop: step_loss(args, run, prompts) -> (loss, stats) on samples of the current policy."""
    check(args)
    stage.seed_everything(args.seed)
    device, autocast = stage.device_and_autocast(args.precision, args.threads)
    name = args.run_name or f"{method}_beta{args.beta:g}_seed{args.seed}"
    out_dir = os.path.join(args.runs_dir, name)
    inputs = [args.sft_path, args.data] + ([args.proxy_path] if args.judge == "proxy" else [])
    stage.check_output(out_dir, "online run", inputs)  # before any work
    run = start_run(args, device, autocast)
    prompts = load_prompts(args, run.tokenizer)
    if args.prompts_per_step > len(prompts):
        fail(f"--prompts_per_step {args.prompts_per_step} > the {len(prompts)} prompts of {args.data}")
    output = stage.start_output(out_dir, "online run", inputs)
    optimizer = torch.optim.AdamW(run.model.parameters(), lr=args.lr, weight_decay=0.0)
    scheduler = stage.lr_schedule(optimizer, args.warmup_steps, args.steps, args.lr_schedule,
                                  args.min_lr_ratio, args.decay_fraction)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")  # fp16 gradients underflow
    stage.save_json(os.path.join(output.work, "args.json"),
                    {**dataclasses.asdict(args), "method": method, "run_name": name, "run_id": output.run,
                     "total_steps": args.steps, "num_prompts_read": len(prompts),
                     "num_epochs": args.steps * args.prompts_per_step / len(prompts)})
    save_at = ({round(i * args.steps / args.num_checkpoints) for i in range(args.num_checkpoints + 1)}
               if args.num_checkpoints else set())
    if 0 in save_at:
        stage.save_pretrained(run.model, os.path.join(output.work, "ckpt-0"), run.tokenizer)
    order, cursor, t0 = [], 0, time.time()
    bar = tqdm(range(1, args.steps + 1), desc=name)
    for step in bar:
        if cursor + args.prompts_per_step > len(order):  # a fresh shuffle each pass over the prompts
            order, cursor = random.sample(range(len(prompts)), len(prompts)), 0
        idx, cursor = order[cursor:cursor + args.prompts_per_step], cursor + args.prompts_per_step
        loss, stats = step_loss(args, run, [prompts[i] for i in idx])
        scaler.scale(loss).backward()
        grad_norm = stage.optimizer_step(step, run.model, optimizer, scheduler, scaler, args.grad_clip,
                                         loss.item())
        row = {"step": step, "epoch": step * args.prompts_per_step / len(prompts), "loss": loss.item(),
               **stats, "grad_norm": float(grad_norm)}
        stage.append_jsonl(os.path.join(output.work, "train_log.jsonl"), row)
        bar.set_postfix(loss=f"{row['loss']:.3f}")
        if step in save_at:
            stage.save_pretrained(run.model, os.path.join(output.work, f"ckpt-{step}"), run.tokenizer)
    stage.check_finite(args.steps, parameter_norm=stage.parameter_norm(run.model))
    output.publish()
    print(f"{name}: done in {time.time() - t0:.0f} s -> {out_dir}")
    return out_dir


if __name__ == "__main__":
    train(stage.parse_args(Args, __doc__), rloo_step, "rloo")
