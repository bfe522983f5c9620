"""
dpo.py -- direct alignment on offline preference pairs: DPO, IPO, RPO, R-DPO, chi-PO.

The policy starts at pi_ref (sft.py) and learns from {prompt, chosen, rejected} pairs that
reward.py sampled from pi_ref and labelled with a judge (the toy's true scorer, or a gold reward model). Every loss is a function
of the sequence log-ratios r(y) = log pi_theta(y|x) - log pi_ref(y|x) (METHOD.md, sections 1 and 5).

Run (after toy_tldr.py, sft.py, reward.py --mode label; about 40 s on one CPU thread):
    python dpo.py                               # DPO, beta 0.01 -> out/runs/dpo_beta0.01_seed0/
    python dpo.py --loss_type ipo --beta 0.1
Paper scale (Pythia + TL;DR on a GPU): --sft_path <sft> --data <prefs> --lr 1e-6 --num_epochs 1
    --batch_size 8 --grad_accum 8 --max_prompt_len 512 --max_response_len 53 --truncate_prompts

What is in here, top to bottom:
  1. the fused log-prob gather: the prompt of a pair runs once and its chosen and rejected
     responses continue from it (policy.response_hidden); the output layer runs over chunks of
     response tokens only, recomputed in the backward pass, so that no [batch, time, vocab]
     tensor ever exists;
  2. the DAA losses, each a small pure function;
  3. reference log-probs computed once before training (no reference model during the loop), and
     with --reference_cache once for all the runs that share pi_ref and the pairs (run.sh);
  4. the training loop, with checkpoints at evenly spaced fractions of training, step 0 included.
is_dpo.py reuses all of it and passes `train` a function that weighs each pair.
"""
import dataclasses
import hashlib
import json
import math
import os
import random
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import policy
import stage
from stage import fail

LOSS_TYPES = ("dpo", "ipo", "rpo", "rdpo", "chipo")

# ----------------------------------------------------------------------------------------------
# config


@dataclass
class Args:
    sft_path: str = field(default="out/sft", metadata={"help": "pi_ref (sft.py output): the starting policy and the reference"})
    data: str = field(default="out/prefs", metadata={"help": "reward.py --mode label output dir, a local .json/.jsonl/.parquet file, or a hub id"})
    split: str = field(default="train", metadata={"help": "split to read when --data is a hub id"})
    prompt_column: str = field(default="prompt", metadata={"help": "column holding the prompt"})
    chosen_column: str = field(default="chosen", metadata={"help": "column holding the preferred response"})
    rejected_column: str = field(default="rejected", metadata={"help": "column holding the other response"})
    loss_type: str = field(default="dpo", metadata={"help": "dpo | ipo | rpo | rdpo | chipo"})
    beta: float = field(default=0.01, metadata={"help": "KL strength (paper: 0.01, 0.05, 0.1)"})
    ipo_sum: bool = field(default=False, metadata={"help": "ipo: summed log-ratios instead of length-averaged (TRL)"})
    rpo_eta: float = field(default=0.005, metadata={"help": "rpo: weight of the summed NLL of the chosen response "
                                                            "(the NLL term is multiplied by beta too)"})
    rdpo_alpha: float = field(default=0.01, metadata={"help": "rdpo: weight of the length difference |y_w| - |y_l|"})
    chipo_clip: float = field(default=5.0, metadata={"help": "chipo: clip c of the log-ratio inside exp()"})
    num_epochs: float = field(default=2.0, metadata={"help": "passes over the pairs (the paper: 1 pass over 92k pairs; the toy needs 2 to drift far)"})
    batch_size: int = field(default=32, metadata={"help": "pairs per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate (AdamW; the paper: 1e-6 on Pythia)"})
    warmup_steps: int = field(default=20, metadata={"help": "linear warmup steps"})
    lr_schedule: str = field(default="cosine", metadata={"help": "after warm-up: cosine (to 0) or constant (the DPO paper's)"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm"})
    num_checkpoints: int = field(default=11, metadata={"help": "checkpoints at evenly spaced fractions of training, plus step 0"})
    logit_chunk: int = field(default=128, metadata={"help": "response tokens per output-layer chunk in the fused log-prob gather"})
    max_prompt_len: int = field(default=64, metadata={"help": "prompt tokens kept"})
    max_response_len: int = field(default=24, metadata={"help": "response tokens kept, EOS included"})
    truncate_prompts: bool = field(default=False, metadata={"help": "cut over-long prompts from the left instead of refusing"})
    seed: int = field(default=0, metadata={"help": "seed for python, numpy and torch (data order)"})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch (0 = torch's default)"})
    runs_dir: str = field(default="out/runs", metadata={"help": "runs are written to <runs_dir>/<run_name>/"})
    reference_cache: str = field(default="", metadata={"help": "a directory where runs that share pi_ref and the pairs share "
                                                                "their reference log-probs (run.sh sets it); empty: compute them"})
    run_name: str = field(default="", metadata={"help": "default: <method>_beta<beta>_seed<seed>"})
    resume: bool = field(default=False, metadata={"help": "continue an interrupted run from its saved state"})
    save_every: int = field(default=50, metadata={"help": "steps between states saved for --resume (0: no)"})


# ----------------------------------------------------------------------------------------------
# 1. log-probs of response tokens: the naive gather and the fused one


def gather_logps_naive(hidden, weight, bias, targets):
    """log softmax(hidden @ W^T + b)[target], the textbook way: builds the full [N, V] log-softmax.

    hidden [N, H], weight [V, H], bias [V] or None, targets [N] -> [N] (float32, or float64 for float64 input).
    """
    logits = F.linear(hidden, weight, bias).to(torch.promote_types(hidden.dtype, torch.float32))
    return logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)


class ChunkedLogProbs(torch.autograd.Function):
    """The same numbers as `gather_logps_naive`, holding one [chunk, V] block of logits at a time.

    Forward keeps only the per-token logsumexp. Backward recomputes each chunk's logits and uses
    d logp_t / d logits = onehot(target) - softmax(logits), accumulating the output layer's
    gradient in place: peak memory no longer grows with tokens x vocabulary.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):
        w = weight.to(hidden.dtype)
        b = None if bias is None else bias.to(hidden.dtype)
        acc = torch.promote_types(hidden.dtype, torch.float32)  # bf16 logits are summed in float32
        logps = torch.empty(len(targets), dtype=acc, device=hidden.device)
        lse = torch.empty_like(logps)
        for s in range(0, len(targets), chunk):
            logits = F.linear(hidden[s:s + chunk], w, b).to(acc)
            lse[s:s + chunk] = logits.logsumexp(-1)
            logps[s:s + chunk] = logits.gather(-1, targets[s:s + chunk, None]).squeeze(-1) - lse[s:s + chunk]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk = chunk
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        w = weight.to(hidden.dtype)
        b = None if bias is None else bias.to(hidden.dtype)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        acc = lse.dtype
        grad_weight = torch.zeros_like(weight, dtype=acc) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias, dtype=acc) if bias is not None and ctx.needs_input_grad[2] else None
        for s in range(0, len(targets), ctx.chunk):
            h, g, t = hidden[s:s + ctx.chunk], grad_logps[s:s + ctx.chunk], targets[s:s + ctx.chunk]
            probs = F.linear(h, w, b).to(acc).sub_(lse[s:s + ctx.chunk, None]).exp_()  # in place: one [chunk, V] buffer
            grad_logits = probs.mul_(-g[:, None])  # -softmax * g ...
            grad_logits[torch.arange(len(t), device=t.device), t] += g  # ... + onehot(target) * g
            if grad_hidden is not None:
                grad_hidden[s:s + ctx.chunk] = grad_logits.to(h.dtype) @ w
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.T, h.to(acc))
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
        grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
        grad_bias = None if grad_bias is None else grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None


def sequence_logps(model, batch, chunk=1024, fused=True):
    """Summed log-probs of each row's response tokens, and their counts.

    batch: policy.collate_grouped output (a pair = one prompt, two responses; the prompt runs once).
    Returns logps [P*k] (float32 at least) and lengths [P*k]. The output layer runs only on response positions.
    """
    mask = batch["response_mask"].bool()
    h = policy.response_hidden(model.base_model, batch)[:, :-1][mask]  # h[:, t] predicts response token t
    targets = batch["response_ids"][mask]
    head = model.get_output_embeddings()
    if fused:
        token_logps = ChunkedLogProbs.apply(h, head.weight, head.bias, targets, chunk)
    else:
        token_logps = gather_logps_naive(h, head.weight, head.bias, targets)
    rows = mask.nonzero()[:, 0]
    logps = torch.zeros(len(mask), dtype=token_logps.dtype, device=h.device).index_add(0, rows, token_logps)
    return logps, mask.sum(1)


# ----------------------------------------------------------------------------------------------
# 2. the DAA losses. Inputs are per pair, shape [B]: summed log-probs under the policy (pi_*)
# and the reference (ref_*) of the chosen (w) and rejected (l) responses, and their lengths.


def dpo_loss(pi_w, pi_l, ref_w, ref_l, beta):
    # -log sigmoid(beta * Delta),  Delta = r(y_w) - r(y_l)
    return -F.logsigmoid(beta * ((pi_w - ref_w) - (pi_l - ref_l)))


def ipo_loss(pi_w, pi_l, ref_w, ref_l, len_w, len_l, beta, summed=False):
    # (Delta_avg - 1 / (2 beta))^2,  Delta_avg = r(y_w)/|y_w| - r(y_l)/|y_l|  (or summed: Delta)
    if summed:
        len_w, len_l = torch.ones_like(len_w), torch.ones_like(len_l)
    delta = (pi_w - ref_w) / len_w - (pi_l - ref_l) / len_l
    return (delta - 1 / (2 * beta)) ** 2


def rpo_loss(pi_w, pi_l, ref_w, ref_l, beta, eta):
    # DPO - eta * beta * log pi_theta(y_w | x): DPO plus a (summed) NLL on the chosen response
    return dpo_loss(pi_w, pi_l, ref_w, ref_l, beta) - eta * beta * pi_w


def rdpo_loss(pi_w, pi_l, ref_w, ref_l, len_w, len_l, beta, alpha):
    # -log sigmoid(beta * Delta + alpha * (|y_w| - |y_l|)), the sign of Park et al. and the IS-DAAs code
    delta = (pi_w - ref_w) - (pi_l - ref_l)
    return -F.logsigmoid(beta * delta + alpha * (len_w - len_l).to(delta.dtype))


def chipo_loss(pi_w, pi_l, ref_w, ref_l, beta, clip):
    # -log sigmoid(beta * (phi_w - phi_l)),  phi = r + exp(clip(r, -c, c)): the chi^2 + KL link
    r_w, r_l = pi_w - ref_w, pi_l - ref_l
    phi_w = r_w + torch.exp(r_w.clamp(-clip, clip))
    phi_l = r_l + torch.exp(r_l.clamp(-clip, clip))
    return -F.logsigmoid(beta * (phi_w - phi_l))


def daa_losses(args, pi_w, pi_l, ref_w, ref_l, len_w, len_l):
    """Per-pair losses [B] of args.loss_type, and what is worth logging."""
    if args.loss_type == "dpo":
        losses = dpo_loss(pi_w, pi_l, ref_w, ref_l, args.beta)
    elif args.loss_type == "ipo":
        losses = ipo_loss(pi_w, pi_l, ref_w, ref_l, len_w, len_l, args.beta, args.ipo_sum)
    elif args.loss_type == "rpo":
        losses = rpo_loss(pi_w, pi_l, ref_w, ref_l, args.beta, args.rpo_eta)
    elif args.loss_type == "rdpo":
        losses = rdpo_loss(pi_w, pi_l, ref_w, ref_l, len_w, len_l, args.beta, args.rdpo_alpha)
    elif args.loss_type == "chipo":
        losses = chipo_loss(pi_w, pi_l, ref_w, ref_l, args.beta, args.chipo_clip)
    else:
        fail(f"--loss_type must be one of {', '.join(LOSS_TYPES)}, got {args.loss_type!r}")
    with torch.no_grad():  # implicit rewards beta * r(y), as in the DPO paper's trainer
        reward_w, reward_l = args.beta * (pi_w - ref_w), args.beta * (pi_l - ref_l)
        stats = {"daa_loss": losses.mean().item(),  # before any importance weight
                 "margin": (reward_w - reward_l).mean().item(),
                 "accuracy": (reward_w > reward_l).float().mean().item(),
                 "reward_chosen": reward_w.mean().item(), "reward_rejected": reward_l.mean().item(),
                 "logps_chosen": pi_w.mean().item(), "logps_rejected": pi_l.mean().item()}
    return losses, stats


def no_weights(args, batch_logps, batch_rows):
    """Plain DAA: every pair counts once. is_dpo.py passes importance weights instead."""
    return torch.ones_like(batch_logps["pi_w"]), {}


# ----------------------------------------------------------------------------------------------
# 3. data and reference log-probs


def load_pairs(args, tokenizer):
    cols = {"prompt": args.prompt_column, "chosen": args.chosen_column, "rejected": args.rejected_column}
    rows = policy.load_rows(args.data, "train.jsonl", args.split, cols)
    chosen, rejected = (policy.encode_rows(tokenizer, [r["prompt"] for r in rows], [r[k] for r in rows], args.max_prompt_len,
                                        args.max_response_len, args.truncate_prompts) for k in ("chosen", "rejected"))
    policy.report_shaping("daa", tokenizer, [p for p, _ in chosen], [r for _, r in chosen + rejected])
    pairs = list(zip(chosen, rejected))
    same = sum(r["chosen"] == r["rejected"] for r in rows)
    if same:  # legal, but such a pair has Delta = 0 forever and teaches nothing
        print(f"note: {same} pairs have chosen == rejected (their loss is constant)")
    return rows, pairs


def pair_logps(model, pairs, pad_id, device, autocast, chunk):
    """Chosen and rejected of every pair in one pass: rows chosen, rejected, chosen, ... sharing their prompt."""
    batch = policy.to_device(policy.collate_grouped([example for pair in pairs for example in pair], pad_id, k=2), device)
    with autocast:
        logps, lengths = sequence_logps(model, batch, chunk)
    return logps[0::2], logps[1::2], lengths[0::2], lengths[1::2]


@torch.no_grad()
def reference_logps(model, pairs, pad_id, device, autocast, chunk, batch_size):
    """log pi_ref of every chosen and rejected response, once, before training: [N], [N]."""
    model.eval()
    ref_w, ref_l = [], []
    for s in tqdm(range(0, len(pairs), batch_size), desc="reference log-probs", leave=False):
        pi_w, pi_l, _, _ = pair_logps(model, pairs[s:s + batch_size], pad_id, device, autocast, chunk)
        ref_w.append(pi_w)
        ref_l.append(pi_l)
    model.train()
    return torch.cat(ref_w), torch.cat(ref_l)


def shared_reference_logps(args, model, pairs, pad_id, device, autocast):
    """reference_logps, computed by the first of several runs that need the same numbers and read by the rest.

    run.sh trains nine runs from one pi_ref on one set of pairs: their reference log-probs are equal.
    The file is named by a hash of everything the numbers depend on -- pi_ref's weights, every pair's
    token ids, the batching, the thread count, the code of dpo.py and sft.py, the library versions --
    so a run reads exactly what it would have computed, and a changed input or line of code misses.
    """
    import transformers

    batch_size = 2 * args.batch_size
    if not args.reference_cache:
        return reference_logps(model, pairs, pad_id, device, autocast, args.logit_chunk, batch_size)
    key = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        key.update(f"{name} {tensor.dtype}".encode())
        key.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    for path in (__file__, policy.__file__):
        with open(path, "rb") as f:
            key.update(f.read())
    key.update(json.dumps([pairs, batch_size, args.logit_chunk, torch.get_num_threads(), str(device),  # cuda: bf16 autocast
                           torch.__version__, transformers.__version__]).encode())
    path = os.path.join(args.reference_cache, key.hexdigest()[:20] + ".pt")
    if os.path.isfile(path):
        print(f"reference log-probs: read from {path}")
        saved = torch.load(path, weights_only=True)
        return saved["ref_w"].to(device), saved["ref_l"].to(device)
    ref_w, ref_l = reference_logps(model, pairs, pad_id, device, autocast, args.logit_chunk, batch_size)
    os.makedirs(args.reference_cache, exist_ok=True)
    torch.save({"ref_w": ref_w.cpu(), "ref_l": ref_l.cpu()}, f"{path}.{os.getpid()}.tmp")
    os.replace(f"{path}.{os.getpid()}.tmp", path)  # a whole file or none, even with runs side by side
    return ref_w, ref_l


def method_name(args):
    return args.loss_type


def validate(args):
    if args.loss_type not in LOSS_TYPES:
        fail(f"--loss_type must be one of {', '.join(LOSS_TYPES)}, got {args.loss_type!r}")
    stage.check_args(args, positive=("beta", "num_epochs", "batch_size", "grad_accum", "lr", "grad_clip",
                                   "chipo_clip", "logit_chunk", "max_prompt_len", "max_response_len"),
                   non_negative=("rpo_eta", "warmup_steps", "num_checkpoints", "save_every"))
    if args.lr_schedule not in ("constant", "cosine"):
        fail(f"--lr_schedule must be constant or cosine, got {args.lr_schedule!r}")
    if args.run_name in (".", "..") or os.sep in args.run_name:
        fail(f"--run_name must be a plain name (no {os.sep}), got {args.run_name!r}")
    if not os.path.isdir(args.sft_path):
        fail(f"--sft_path {args.sft_path} not found (run sft.py first)")


# ----------------------------------------------------------------------------------------------
# 4. training


@stage.cleans_up
def train(args, weigh=no_weights, method=None):
    """The DAA loop. weigh(args, logps, rows) -> (weights [B], stats): all ones for plain DAAs."""
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    validate(args)
    policy.seed_everything(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, autocast = policy.device_and_autocast()
    method = method or method_name(args)
    run_name = args.run_name or f"{method}_beta{args.beta:g}_seed{args.seed}"
    out_dir = os.path.join(args.runs_dir, run_name)
    inputs = [args.sft_path, args.data, args.reference_cache]
    stage.check_output(out_dir, "daa run", inputs)  # before any work: an output not to be replaced is refused

    tokenizer = policy.load_tokenizer(args.sft_path)
    rows, pairs = load_pairs(args, tokenizer)
    # locked, and kept across a kill: --resume continues from the state saved in it
    tmp = stage.start_output(out_dir, "daa run", inputs, resumable=True, resume=args.resume)
    model = policy.load_policy(args.sft_path).to(device)
    pad = tokenizer.pad_token_id
    # pi_ref is the starting policy: its log-probs of the data never change, so take them now
    ref_w, ref_l = shared_reference_logps(args, model, pairs, pad, device, autocast)

    pairs_per_step = args.batch_size * args.grad_accum
    total_steps = max(1, math.ceil(args.num_epochs * len(pairs) / pairs_per_step))
    save_at = {round(k * total_steps / args.num_checkpoints) for k in range(args.num_checkpoints + 1)} if args.num_checkpoints else set()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    if args.lr_schedule == "cosine":
        scheduler = get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, total_steps)
    else:
        scheduler = get_constant_schedule_with_warmup(optimizer, args.warmup_steps)
    run_id = stage.read_marker(tmp)["run"]  # tells evaluate.py a retrained run from the old one
    policy.save_json(os.path.join(tmp, "args.json"), {**dataclasses.asdict(args), "method": method, "run_name": run_name,
                                                  "run_id": run_id, "total_steps": total_steps, "num_pairs": len(pairs)})

    def save(step):
        path = os.path.join(tmp, f"ckpt-{step}")
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)

    done, order, cursor = policy.restore_state(tmp, args, model, optimizer, scheduler)
    if 0 in save_at and not done:
        save(0)
    print(f"{run_name}: {len(pairs)} pairs, {total_steps} steps of {pairs_per_step} pairs, device {device}")
    t0 = time.time()
    bar = tqdm(range(done + 1, total_steps + 1), desc=run_name)
    for step in bar:
        logged = {}
        for _ in range(args.grad_accum):
            if cursor + args.batch_size > len(order):  # reshuffle every pass
                order, cursor = random.sample(range(len(pairs)), len(pairs)), 0
            idx = order[cursor:cursor + args.batch_size]
            cursor += args.batch_size
            pi_w, pi_l, len_w, len_l = pair_logps(model, [pairs[i] for i in idx], pad, device, autocast, args.logit_chunk)
            index = torch.tensor(idx, device=device)
            logps = {"pi_w": pi_w, "pi_l": pi_l, "ref_w": ref_w[index], "ref_l": ref_l[index],
                     "len_w": len_w, "len_l": len_l}
            losses, stats = daa_losses(args, **logps)
            weights, weight_stats = weigh(args, logps, [rows[i] for i in idx])
            loss = (weights * losses).mean() / args.grad_accum
            loss.backward()
            for k, v in {**stats, **weight_stats, "loss": loss.item() * args.grad_accum}.items():
                logged[k] = logged.get(k, 0.0) + v / args.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        policy.check_finite(step, loss=logged["loss"], grad_norm=grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        row = {"step": step, "epoch": step * pairs_per_step / len(pairs), **logged, "grad_norm": float(grad_norm)}
        policy.append_jsonl(os.path.join(tmp, "train_log.jsonl"), row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", margin=f"{row['margin']:.2f}", acc=f"{row['accuracy']:.2f}")
        if step in save_at:
            save(step)
        policy.save_state(tmp, args, step, total_steps, model, optimizer, scheduler, order, cursor)
    policy.check_finite(total_steps, parameter_norm=policy.parameter_norm(model))
    policy.remove_state(tmp)
    stage.finish_output(tmp, out_dir)
    print(f"{run_name}: done in {time.time() - t0:.0f} s -> {out_dir}")
    return out_dir


if __name__ == "__main__":
    train(stage.parse_args(Args, __doc__))
