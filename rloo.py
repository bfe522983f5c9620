"""
rloo.py -- REINFORCE leave-one-out (RLOO) against a proxy reward model: the online baseline of the
Adaptive-IS paper (App. C, Fig. 6), and the online loop that online_dpo.py shares.

Each step draws --prompts_per_step training prompts and k responses per prompt from the current policy
(temperature 1), scores each with the proxy reward model (reward.py --mode train on the offline pairs:
it never sees the judge's scores, only which response was chosen) or, with --judge true, with the toy's
hidden true scorer, and takes one policy-gradient step (METHOD.md, section 11):

    R(y)  = proxy(x, y) - beta * (log pi_theta(y|x) - log pi_ref(y|x))      the KL penalty in the reward
    A(y_i) = R(y_i) - mean_{j != i} R(y_j)                                  the leave-one-out baseline
    loss  = -mean_i A(y_i) * log pi_theta(y_i|x)                            A is a constant (no gradient)

Run (after toy_tldr.py, sft.py, reward.py --mode label, and the proxy:
    python reward.py --mode train --data out/prefs/train.jsonl --out_dir out/proxy_rm --val_size 500):
    python rloo.py                      # -> out/runs/rloo_beta0.01_seed0/ (ckpt-<step>/, train_log.jsonl)

Read it top to bottom:
  1. the prompts, and the scores of sampled responses (proxy or true scorer);
  2. the RLOO estimator: advantages and the surrogate loss, small pure functions;
  3. the online loop: sample from the current policy, score, step; checkpoints and train_log rows as
     dpo.py writes them, so that evaluate.py reads the runs unchanged.
"""
import dataclasses
import os
import random
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

import dpo
import policy
import reward
import stage
import toy_tldr
from stage import fail

# ----------------------------------------------------------------------------------------------
# config


def dpo_flag(name, **default):
    """dpo.py's flag of that name (its help), with dpo.py's default or the one given."""
    flag = next(f for f in dataclasses.fields(dpo.Args) if f.name == name)
    return field(default=default.get("default", flag.default), metadata=flag.metadata)


@dataclass
class OnlineArgs:
    """The flags of every online method (rloo.py, online_dpo.py); most are dpo.py's."""
    sft_path: str = dpo_flag("sft_path")
    data: str = field(default="out/toy_tldr", metadata={
        "help": "toy_tldr dir or local .json/.jsonl/.parquet file whose prompts are sampled (sft.jsonl)"})
    split: str = dpo_flag("split")
    prompt_column: str = dpo_flag("prompt_column")
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
    grad_clip: float = dpo_flag("grad_clip")
    num_checkpoints: int = dpo_flag("num_checkpoints", default=10)
    logit_chunk: int = dpo_flag("logit_chunk")
    precision: str = dpo_flag("precision")
    max_prompt_len: int = dpo_flag("max_prompt_len")
    max_response_len: int = dpo_flag("max_response_len")
    truncate_prompts: bool = dpo_flag("truncate_prompts")
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
    rows = policy.load_rows(args.data, "sft.jsonl", args.split, {"prompt": args.prompt_column})
    texts = policy.unique(r["prompt"] for r in rows)[:args.num_prompts]
    ids = policy.encode_prompts(tokenizer, texts, args.max_prompt_len, args.truncate_prompts)
    return list(zip(texts, ids))


def sample_responses(args, run, prompts, k):
    """k responses per prompt from the current policy at temperature 1: [response ids] of len(prompts) * k,
    rows i*k .. i*k+k-1 for prompt i (EOS kept where the response finished)."""
    ids = [p for _, p in prompts for _ in range(k)]
    tok = run.tokenizer
    responses, _ = policy.sample(run.model, ids, tok.eos_token_id, tok.pad_token_id, args.max_response_len,
                                 1.0, 256, run.generator, suppress_ids=policy.banned_ids(tok))
    return responses


def scores(args, run, prompts, responses, k):
    """The judge's score of each response [len(responses)]: the proxy's (minus --missing_eos_penalty for a
    response without EOS) or the toy's true scorer's."""
    eos = run.tokenizer.eos_token_id
    finished = torch.tensor([bool(r) and r[-1] == eos for r in responses])
    if args.judge == "true":
        texts = [policy.decode_response(run.tokenizer, r)[0] for r in responses]
        return torch.tensor([toy_tldr.true_score(prompts[i // k][0], t, bool(f))
                             for i, (t, f) in enumerate(zip(texts, finished))])
    examples = [(prompts[i // k][1], r) for i, r in enumerate(responses)]
    s = torch.tensor(reward.score_examples(run.scorer, examples, run.tokenizer.pad_token_id, 64, run.device,
                                           run.autocast, k=k))
    return s - args.missing_eos_penalty * (~finished).float()


def logps_of(args, model, run, prompts, responses, k):
    """log pi(y|x) of each response [len(responses)], each prompt run once for its k responses."""
    examples = [(prompts[i // k][1], r) for i, r in enumerate(responses)]
    batch = policy.to_device(policy.collate_grouped(examples, run.tokenizer.pad_token_id, k), run.device)
    with run.autocast:
        return dpo.sequence_logps(model, batch, args.logit_chunk)[0]


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
# 3. the online loop, shared with online_dpo.py


@dataclass
class Run:
    """What the online loop works on (the fields dpo.save_checkpoint reads: tmp, model, tokenizer)."""
    name: str
    out_dir: str
    tmp: str
    tokenizer: object
    model: object  # pi_theta, started at pi_ref
    ref: object  # pi_ref, frozen
    scorer: object  # the proxy reward model, or None (--judge true)
    prompts: list
    generator: torch.Generator
    device: torch.device
    autocast: object
    scaler: object  # policy.grad_scaler: --precision fp16 only


def validate(args):
    stage.one_process_only("an online method (rloo.py, online_dpo.py)")
    stage.check_args(args, positive=("num_prompts", "steps", "prompts_per_step", "lr", "grad_clip", "beta",
                                   "logit_chunk", "max_prompt_len", "max_response_len"),
                     non_negative=("warmup_steps", "num_checkpoints", "missing_eos_penalty"))
    if getattr(args, "k", 2) < 2:
        fail(f"--k must be >= 2 (the leave-one-out baseline needs another sample), got {args.k}")
    if args.judge not in ("proxy", "true"):
        fail(f"--judge must be proxy or true, got {args.judge!r}")
    dpo.check_run_flags(args)
    for flag, path in (("sft_path", args.sft_path),) + ((("proxy_path", args.proxy_path),)
                                                        if args.judge == "proxy" else ()):
        if not os.path.isdir(path):
            fail(f"--{flag} {path} not found")
    if args.judge == "true" and not policy.is_toy(args.data):
        fail(f"--judge true needs the toy world's hidden scorer; {args.data} is not a toy_tldr dir")


def start_run(args, method):
    """Checks, seeds, prompts, pi_theta, pi_ref, the scorer, and the locked output directory."""
    validate(args)
    device, autocast, name, out_dir = dpo.begin_run(args, method)
    inputs = [args.sft_path, args.data] + ([args.proxy_path] if args.judge == "proxy" else [])
    stage.check_output(out_dir, "online run", inputs)
    tokenizer = policy.load_tokenizer(args.sft_path)
    prompts = load_prompts(args, tokenizer)
    tmp = stage.start_output(out_dir, "online run", inputs)
    model = policy.load_policy(args.sft_path).to(device)
    ref = policy.load_policy(args.sft_path).to(device).eval().requires_grad_(False)
    scorer = None
    if args.judge == "proxy":
        scorer = reward.load_reward_model(args.proxy_path, tokenizer).to(device).requires_grad_(False)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    return Run(name, out_dir, tmp, tokenizer, model, ref, scorer, prompts, generator, device, autocast,
               policy.grad_scaler(args.precision, device))


def prompt_batches(args, num_prompts):
    """Index lists of --prompts_per_step prompts, one a step, reshuffled every pass."""
    order, cursor = [], 0
    while True:
        if cursor + args.prompts_per_step > len(order):
            order, cursor = random.sample(range(num_prompts), num_prompts), 0
        yield order[cursor:cursor + args.prompts_per_step]
        cursor += args.prompts_per_step


@stage.cleans_up
def train(args, step_loss, method):
    """The online loop: step_loss(args, run, prompts) -> (loss, stats) on samples of the current policy."""
    run = start_run(args, method)
    if args.prompts_per_step > len(run.prompts):
        fail(f"--prompts_per_step {args.prompts_per_step} > the {len(run.prompts)} prompts of {args.data}")
    optimizer, scheduler = dpo.make_optimizer(args, run.model, args.steps)
    epochs = args.steps * args.prompts_per_step / len(run.prompts)  # passes over the prompts
    policy.save_json(os.path.join(run.tmp, "args.json"),
                     {**dataclasses.asdict(args), "method": method, "run_name": run.name,
                      "run_id": stage.read_marker(run.tmp)["run"], "total_steps": args.steps,
                      "num_epochs": epochs, "num_prompts_read": len(run.prompts)})
    save_at = dpo.checkpoint_steps(args, args.steps)
    if 0 in save_at:
        dpo.save_checkpoint(run, 0)
    batches = prompt_batches(args, len(run.prompts))
    t0 = time.time()
    bar = tqdm(range(1, args.steps + 1), desc=run.name)
    for step in bar:
        loss, stats = step_loss(args, run, [run.prompts[i] for i in next(batches)])
        run.scaler.scale(loss).backward()
        grad_norm = policy.optimizer_step(step, run.model, optimizer, scheduler, run.scaler, args.grad_clip,
                                          loss.item())
        row = {"step": step, "epoch": step * args.prompts_per_step / len(run.prompts), "loss": loss.item(),
               **stats, "grad_norm": float(grad_norm)}
        policy.append_jsonl(os.path.join(run.tmp, "train_log.jsonl"), row)
        bar.set_postfix(loss=f"{row['loss']:.3f}")
        if step in save_at:
            dpo.save_checkpoint(run, step)
    policy.check_finite(args.steps, parameter_norm=policy.parameter_norm(run.model))
    stage.finish_output(run.tmp, run.out_dir)
    print(f"{run.name}: done in {time.time() - t0:.0f} s -> {run.out_dir}")
    return run.out_dir


if __name__ == "__main__":
    train(stage.parse_args(Args, __doc__), rloo_step, "rloo")
