"""
dpo.py -- direct alignment on offline preference pairs: DPO, IPO, RPO, R-DPO, chi-PO.

The policy starts at pi_ref (sft.py) and learns from {prompt, chosen, rejected} pairs that reward.py
sampled from pi_ref and labelled with a judge (the toy's true scorer, or a gold reward model). Every
loss is a function of the sequence log-ratios r(y) = log pi_theta(y|x) - log pi_ref(y|x) (METHOD.md,
sections 1 and 5).

Run (after toy_tldr.py, sft.py, reward.py --mode label; about 40 s on one CPU thread):
    python dpo.py                               # DPO, beta 0.01 -> out/runs/dpo_beta0.01_seed0/
    python dpo.py --loss_type ipo --beta 0.1
Paper scale (Pythia + TL;DR on a GPU): --sft_path <sft> --data <prefs> --lr 1e-6 --num_epochs 1
    --batch_size 8 --grad_accum 8 --max_prompt_len 512 --max_response_len 53 --truncate_prompts

Read it top to bottom:
  1. the data: (prompt, chosen, rejected) rows, tokenized into pairs;
  2. log pi(y|x), by its definition: one full forward, log_softmax, gather, masked sum over [B, T];
  3. the DAA losses, each a small pure function of summed log-probs;
  4. the fast path (an optimisation, not the method): the prompt of a pair runs once, and the output
     layer runs in chunks, so that no [batch, time, vocab] tensor exists; tested equal to 2.;
  5. reference log-probs, computed once before training (no reference model during the loop);
  6. the training loop, with checkpoints at evenly spaced fractions of training, step 0 included.
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

import distributed
import policy
import stage
from stage import fail

LOSS_TYPES = ("dpo", "ipo", "rpo", "rdpo", "chipo")

# ----------------------------------------------------------------------------------------------
# config


@dataclass
class Args:
    sft_path: str = field(default="out/sft", metadata={
        "help": "pi_ref (sft.py output): the starting policy and the reference"})
    data: str = field(default="out/prefs", metadata={
        "help": "reward.py --mode label output dir, a local .json/.jsonl/.parquet file, or a hub id"})
    split: str = field(default="train", metadata={"help": "split to read when --data is a hub id"})
    prompt_column: str = field(default="prompt", metadata={"help": "column holding the prompt"})
    chosen_column: str = field(default="chosen", metadata={"help": "column holding the preferred response"})
    rejected_column: str = field(default="rejected", metadata={"help": "column holding the other response"})
    loss_type: str = field(default="dpo", metadata={"help": "dpo | ipo | rpo | rdpo | chipo"})
    beta: float = field(default=0.01, metadata={"help": "KL strength (paper: 0.01, 0.05, 0.1)"})
    ipo_form: str = field(default="summed", metadata={
        "help": "ipo: summed (Azar et al. and the Adaptive-IS paper: Delta on summed log-ratios) | per_token "
                "(TRL: log-ratios averaged over each response's tokens)"})
    rpo_eta: float = field(default=0.005, metadata={
        "help": "rpo: weight of the summed NLL of the chosen response (the NLL term is multiplied by beta "
                "too)"})
    rdpo_alpha: float = field(default=0.01, metadata={
        "help": "rdpo: weight of the length difference |y_w| - |y_l|"})
    chipo_form: str = field(default="huang", metadata={
        "help": "chipo: huang (Huang et al.: the whole margin clipped to [-2 R, 2 R]) | isdaa (the IS-DAAs "
                "code: r clamped to [-c, c] inside exp)"})
    chipo_rmax: float = field(default=5.0, metadata={"help": "chipo, huang: the reward bound R of the clip"})
    chipo_clip: float = field(default=5.0, metadata={
        "help": "chipo, isdaa: clip c of the log-ratio inside exp()"})
    num_epochs: float = field(default=2.0, metadata={
        "help": "passes over the pairs (the paper: 1 pass over 92k pairs; the toy needs 2 to drift far)"})
    batch_size: int = field(default=32, metadata={"help": "pairs per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=3e-4, metadata={
        "help": "peak learning rate (AdamW; the paper: 1e-6 on Pythia)"})
    warmup_steps: int = field(default=20, metadata={"help": "linear warmup steps"})
    lr_schedule: str = field(default="cosine", metadata={
        "help": "after warm-up: cosine (to --min_lr_ratio) or constant (the DPO paper's)"})
    min_lr_ratio: float = field(default=0.0, metadata={
        "help": "the cosine's floor as a fraction of --lr (0: decay to 0; the IS-DAAs paper: 0.1)"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm"})
    num_checkpoints: int = field(default=11, metadata={
        "help": "checkpoints at evenly spaced fractions of training, plus step 0"})
    logit_chunk: int = field(default=128, metadata={
        "help": "response tokens per output-layer chunk in the fused log-prob gather"})
    max_prompt_len: int = field(default=64, metadata={"help": "prompt tokens kept"})
    max_response_len: int = field(default=24, metadata={"help": "response tokens kept, EOS included"})
    truncate_prompts: bool = field(default=False, metadata={
        "help": "cut over-long prompts from the left instead of refusing"})
    seed: int = field(default=0, metadata={"help": "seed for python, numpy and torch (data order)"})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch (0 = torch's default)"})
    precision: str = field(default="auto", metadata={"help": policy.PRECISION_HELP})
    runs_dir: str = field(default="out/runs", metadata={"help": "runs are written to <runs_dir>/<run_name>/"})
    reference_cache: str = field(default="", metadata={
        "help": "a directory where runs that share pi_ref and the pairs share their reference log-probs "
                "(run.sh sets it); empty: compute them"})
    run_name: str = field(default="", metadata={"help": "default: <method>_beta<beta>_seed<seed>"})
    resume: bool = field(default=False, metadata={"help": "continue an interrupted run from its saved state"})
    save_every: int = field(default=50, metadata={"help": "steps between states saved for --resume (0: no)"})
    fsdp: bool = field(default=False, metadata={
        "help": "under torchrun: shard every weight over the processes (FSDP) instead of copying it (DDP)"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute each layer's activations in backward instead of keeping them (less memory)"})


# ----------------------------------------------------------------------------------------------
# 1. the data: preference pairs


def load_pairs(args, tokenizer):
    """(rows, pairs): the data's rows, and per row ((prompt_ids, chosen_ids), (prompt_ids, rejected_ids)):
    the prompt encoded from its text, each response as the token ids it was sampled as when the row holds
    them (chosen_ids, rejected_ids of reward.py --mode label), else encoded from its text. Conversations
    (message lists in TRL's preference forms) go through pi_ref's chat template (policy.encode_rows)."""
    cols = {"prompt": args.prompt_column, "chosen": args.chosen_column, "rejected": args.rejected_column}
    rows = policy.load_rows(args.data, "train.jsonl", args.split, cols,
                            token_ids=policy.ids_columns(args))
    pairs = policy.encode_pairs(tokenizer, rows, args, "daa")  # the sampled token ids where rows hold them
    same = sum(r["chosen"] == r["rejected"] for r in rows)
    if same:  # legal, but such a pair has Delta = 0 forever and teaches nothing
        print(f"note: {same} pairs have chosen == rejected (their loss is constant)")
    return rows, pairs


# ----------------------------------------------------------------------------------------------
# 2. log pi(y|x): the plain definition (METHOD.md, section 2)


def sequence_logps_plain(model, batch):
    """log pi(y|x) = sum_t log pi(y_t | x, y_<t), summed over the response tokens of each row.

    The definition, written out: the reference that the fast path (section 4) is tested against.
    batch: policy.collate output: prompt + response per row, right-padded, with
        input_ids, attention_mask, response_mask  [B, T].
    Returns:
        logps [B]: the summed log-probs of the response tokens (float32 at least);
        lengths [B]: |y|, the response tokens counted.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [B, T, V]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    # position t predicts token t + 1: drop the last position's logits and the first token
    logps = logits[:, :-1].log_softmax(-1)  # [B, T-1, V]
    token_logps = logps.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)  # [B, T-1]
    mask = batch["response_mask"][:, 1:]  # keep the positions whose next token is a response token
    return (token_logps * mask).sum(-1), mask.sum(-1)


# ----------------------------------------------------------------------------------------------
# 3. the DAA losses (METHOD.md, section 5). Inputs are per pair, shape [B]: summed log-probs under the
# policy (pi_*) and the reference (ref_*) of the chosen (w) and rejected (l) responses, and their lengths.
# Each returns the per-pair losses [B]; the batch mean (times an importance weight) is the objective.


def dpo_loss(pi_w, pi_l, ref_w, ref_l, beta):
    """DPO (Rafailov et al. 2023, eq. 7): -log sigmoid(beta * Delta), Delta = r(y_w) - r(y_l).

    pi_w, pi_l, ref_w, ref_l: log pi_theta(y_w|x), log pi_theta(y_l|x), log pi_ref(y_w|x),
    log pi_ref(y_l|x), each [B]; beta: the KL strength. Returns [B].
    """
    # --- the algorithm ---
    # BEGIN SOLUTION
    return -F.logsigmoid(beta * ((pi_w - ref_w) - (pi_l - ref_l)))
    # END SOLUTION


def ipo_loss(pi_w, pi_l, ref_w, ref_l, len_w, len_l, beta, summed=True):
    """IPO (Azar et al. 2023, eq. 17; the Adaptive-IS paper, App. J): (Delta - 1 / (2 beta))^2 on the
    summed log-ratios; summed=False: TRL's per-token form, Delta_avg = r(y_w)/|y_w| - r(y_l)/|y_l|.
    len_w, len_l: |y_w|, |y_l| [B]. Returns [B]."""
    if summed:
        len_w, len_l = torch.ones_like(len_w), torch.ones_like(len_l)
    # --- the algorithm ---
    # BEGIN SOLUTION
    delta = (pi_w - ref_w) / len_w - (pi_l - ref_l) / len_l
    return (delta - 1 / (2 * beta)) ** 2
    # END SOLUTION


def rpo_loss(pi_w, pi_l, ref_w, ref_l, beta, eta):
    """RPO (Liu et al. 2024): DPO - eta * beta * log pi_theta(y_w|x), DPO plus a summed NLL on the chosen."""
    return dpo_loss(pi_w, pi_l, ref_w, ref_l, beta) - eta * beta * pi_w


def rdpo_loss(pi_w, pi_l, ref_w, ref_l, len_w, len_l, beta, alpha):
    """R-DPO (Park et al. 2024): -log sigmoid(beta * Delta + alpha * (|y_w| - |y_l|)), the plus sign of that
    paper (and of the IS-DAAs code): a longer chosen response supplies part of the margin by its length."""
    delta = (pi_w - ref_w) - (pi_l - ref_l)
    return -F.logsigmoid(beta * delta + alpha * (len_w - len_l).to(delta.dtype))


def chipo_loss(pi_w, pi_l, ref_w, ref_l, beta, r_max):
    """chi-PO (Huang et al. 2024, Algorithm 1): -log sigmoid(clip(beta * (phi(z_w) - phi(z_l)), -2R, 2R)),
    phi(z) = z + log z, z = pi_theta / pi_ref = exp(r): the link of chi^2 + KL regularisation. Returns [B].

    exp(r_w) - exp(r_l) is computed as exp(m) * (exp(r_w - m) - exp(r_l - m)), m = max(r_w, r_l), with
    exp(m) capped at exp(30): beyond it the margin is past the clip unless |r_w - r_l| < 2R e^-30 / beta
    (a tie, where the term is 0 either way), so the capped value clips to the same number, and neither
    the loss nor its gradient overflows, even times an importance weight of e^50."""
    r_w, r_l = pi_w - ref_w, pi_l - ref_l
    m = torch.maximum(r_w, r_l)
    # --- the algorithm ---
    exp_gap = torch.exp(m.clamp(max=30.0)) * (torch.exp(r_w - m) - torch.exp(r_l - m))  # z_w - z_l
    margin = beta * ((r_w - r_l) + exp_gap)  # beta * (phi(z_w) - phi(z_l))
    return -F.logsigmoid(margin.clamp(-2 * r_max, 2 * r_max))


def chipo_isdaa_loss(pi_w, pi_l, ref_w, ref_l, beta, clip):
    """chi-PO as the public IS-DAAs code computes it: -log sigmoid(beta * (phi_w - phi_l)),
    phi = r + exp(clip(r, -c, c)). Once r > c the chi^2 term has no gradient and this is DPO exactly."""
    r_w, r_l = pi_w - ref_w, pi_l - ref_l
    phi_w = r_w + torch.exp(r_w.clamp(-clip, clip))
    phi_l = r_l + torch.exp(r_l.clamp(-clip, clip))
    return -F.logsigmoid(beta * (phi_w - phi_l))


def daa_losses(args, pi_w, pi_l, ref_w, ref_l, len_w, len_l):
    """Per-pair losses [B] of args.loss_type, and what is worth logging."""
    if args.loss_type == "dpo":
        losses = dpo_loss(pi_w, pi_l, ref_w, ref_l, args.beta)
    elif args.loss_type == "ipo":
        losses = ipo_loss(pi_w, pi_l, ref_w, ref_l, len_w, len_l, args.beta, args.ipo_form == "summed")
    elif args.loss_type == "rpo":
        losses = rpo_loss(pi_w, pi_l, ref_w, ref_l, args.beta, args.rpo_eta)
    elif args.loss_type == "rdpo":
        losses = rdpo_loss(pi_w, pi_l, ref_w, ref_l, len_w, len_l, args.beta, args.rdpo_alpha)
    elif args.loss_type == "chipo" and args.chipo_form == "isdaa":
        losses = chipo_isdaa_loss(pi_w, pi_l, ref_w, ref_l, args.beta, args.chipo_clip)
    elif args.loss_type == "chipo":
        losses = chipo_loss(pi_w, pi_l, ref_w, ref_l, args.beta, args.chipo_rmax)
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
# 4. the fast path: an optimisation of section 2, the same numbers up to float rounding (tests/test_dpo.py).
# It pays at large vocabularies (Pythia: 50k; the logits of a batch at 512 + 53 tokens are gigabytes); at
# the toy's 204 it saves about 1 MB (bench/README.md). Read it when you need to, not first.


def gather_logps_naive(hidden, weight, bias, targets):
    """log softmax(hidden @ W^T + b)[target], the textbook way: builds the full [N, V] log-softmax.

    hidden [N, H], weight [V, H], bias [V] or None, targets [N] -> [N] (float32, or float64 for float64
    input). The reference of ChunkedLogProbs, on the output layer alone.
    """
    logits = F.linear(hidden, weight, bias).to(torch.promote_types(hidden.dtype, torch.float32))
    return logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)


def matmul_dtype(hidden):
    """The dtype the output layer runs in: autocast's (bf16, fp16) where autocast is on, else the hidden
    states' own."""
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype


class ChunkedLogProbs(torch.autograd.Function):
    """The same numbers as `gather_logps_naive`, holding one [chunk, V] block of logits at a time.

    Forward keeps only the per-token logsumexp. Backward recomputes each chunk's logits and uses
    d logp_t / d logits = onehot(target) - softmax(logits), accumulating the output layer's
    gradient in place: peak memory no longer grows with tokens x vocabulary.
    Under autocast both compute the logits the same way, in the dtype autocast chose for the forward
    (ctx.dtype; autocast itself is off inside, and backward runs outside it): a softmax from logits of
    another precision than the saved logsumexp would not sum to 1 (METHOD.md, section 2).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):
        ctx.dtype = matmul_dtype(hidden)
        w = weight.to(ctx.dtype)
        b = None if bias is None else bias.to(ctx.dtype)
        acc = torch.promote_types(hidden.dtype, torch.float32)  # bf16 logits are summed in float32
        logps = torch.empty(len(targets), dtype=acc, device=hidden.device)
        lse = torch.empty_like(logps)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, len(targets), chunk):
                logits = F.linear(hidden[s:s + chunk].to(ctx.dtype), w, b).to(acc)
                lse[s:s + chunk] = logits.logsumexp(-1)
                picked = logits.gather(-1, targets[s:s + chunk, None]).squeeze(-1)
                logps[s:s + chunk] = picked - lse[s:s + chunk]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk = chunk
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        w = weight.to(ctx.dtype)
        b = None if bias is None else bias.to(ctx.dtype)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        acc = lse.dtype
        grad_weight = torch.zeros_like(weight, dtype=acc) if ctx.needs_input_grad[1] else None
        wants_bias = bias is not None and ctx.needs_input_grad[2]
        grad_bias = torch.zeros_like(bias, dtype=acc) if wants_bias else None
        # BEGIN SOLUTION
        with torch.autocast(hidden.device.type, enabled=False):  # the logits of the forward, in ctx.dtype
            for s in range(0, len(targets), ctx.chunk):
                h, g, t = hidden[s:s + ctx.chunk], grad_logps[s:s + ctx.chunk], targets[s:s + ctx.chunk]
                # in place: one [chunk, V] buffer
                probs = F.linear(h.to(ctx.dtype), w, b).to(acc).sub_(lse[s:s + ctx.chunk, None]).exp_()
                grad_logits = probs.mul_(-g[:, None])  # -softmax * g ...
                grad_logits[torch.arange(len(t), device=t.device), t] += g  # ... + onehot(target) * g
                if grad_hidden is not None:
                    grad_hidden[s:s + ctx.chunk] = grad_logits.to(ctx.dtype) @ w
                if grad_weight is not None:
                    grad_weight.addmm_(grad_logits.T, h.to(acc))
                if grad_bias is not None:
                    grad_bias += grad_logits.sum(0)
        # END SOLUTION
        grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
        grad_bias = None if grad_bias is None else grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None


@torch.no_grad()
def log_sum_squared_probs(hidden, weight, bias, chunk):
    """log sum_v p_t(v)^2 per token [N], p_t = softmax(hidden_t @ W^T + b), in float32, chunk tokens at a
    time: the term WPO subtracts (is_dpo.py --weight wpo). No gradient: WPO's weight is a constant."""
    terms = []
    for s in range(0, len(hidden), chunk):
        logits = F.linear(hidden[s:s + chunk].float(), weight.float(), None if bias is None else bias.float())
        terms.append(torch.logsumexp(2 * logits.log_softmax(-1), -1))
    return torch.cat(terms)


def sequence_logps(model, batch, chunk=1024, fused=True, wpo=False):
    """sequence_logps_plain's numbers (up to float rounding), computed the fast way.

    batch: policy.collate_grouped output (a pair = one prompt, two responses; the prompt runs once and
    both responses continue from its keys and values: policy.response_hidden).
    Returns logps [P*k] (float32 at least) and lengths [P*k], like sequence_logps_plain. The output layer
    runs only on response positions, chunk tokens at a time (ChunkedLogProbs; fused=False: all at once).
    wpo=True also returns, from the same hidden states, the sum over each response's tokens of
    log sum_v p_t(v)^2 [P*k] (no gradient), for is_dpo.py --weight wpo.
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
    if not wpo:
        return logps, mask.sum(1)
    squared = log_sum_squared_probs(h, head.weight, head.bias, chunk)
    return logps, mask.sum(1), torch.zeros(len(mask), device=h.device).index_add(0, rows, squared)


def pair_logps(model, pairs, pad_id, device, autocast, chunk, wpo=False):
    """log pi(y_w|x), log pi(y_l|x), |y_w|, |y_l| of every pair, each [B], in one pass: the batch holds rows
    chosen, rejected, chosen, ... and each pair's prompt runs once for both. wpo=True adds, from the same
    pass, WPO's sums of log sum_v p_t(v)^2 of the chosen and of the rejected response (sequence_logps).

    The default path of training and of the reference log-probs is the fast one (sequence_logps), for
    two reasons: it is what every number in the README and every exact test (bit-equal logs, the shared
    reference log-probs) was computed with -- the plain path differs in the last float bits -- and it is
    what lets the same code run at Pythia's vocabulary. sequence_logps_plain is the definition it is
    tested against, not a second mode.
    """
    examples = [example for pair in pairs for example in pair]
    batch = policy.to_device(policy.collate_grouped(examples, pad_id, k=2), device)
    # model: the policy, or distributed.parallel's module (DDP, FSDP) whose forward is sequence_logps
    with autocast:
        out = distributed.apply(sequence_logps, model, batch, chunk, wpo=wpo)
    return tuple(x for t in out for x in (t[0::2], t[1::2]))


# ----------------------------------------------------------------------------------------------
# 5. reference log-probs: pi_ref is the starting policy, so its log-probs of the data are taken once


@torch.no_grad()
def reference_logps(model, pairs, pad_id, device, autocast, chunk, batch_size):
    """log pi_ref of every chosen and rejected response, once, before training: [N], [N]. Over several
    processes each computes its shard of the pairs (padded with copies of the last to a multiple of the
    processes: FSDP needs every process to run as many batches) and every process gets them all."""
    model.eval()
    ref_w, ref_l = [], []
    mine = distributed.shard(pairs + pairs[-1:] * (-len(pairs) % distributed.WORLD.size))
    for s in tqdm(range(0, len(mine), batch_size), desc="reference log-probs", leave=False,
                  disable=not distributed.WORLD.main):
        pi_w, pi_l, _, _ = pair_logps(model, mine[s:s + batch_size], pad_id, device, autocast, chunk)
        ref_w.append(pi_w)
        ref_l.append(pi_l)
    model.train()
    return tuple(distributed.gather_live(torch.cat(ref))[:len(pairs)] for ref in (ref_w, ref_l))


def shared_reference_logps(args, model, pairs, pad_id, device, autocast):
    """reference_logps, computed by the first of several runs that need the same numbers and read by the rest.

    run.sh trains nine runs from one pi_ref on one set of pairs: their reference log-probs are equal.
    The file is named by a hash of everything the numbers depend on -- pi_ref's weights, every pair's
    token ids, the batching, the thread count, the code of dpo.py and policy.py, the library versions --
    so a run reads exactly what it would have computed, and a changed input or line of code misses.
    model: the policy, or distributed.parallel's module of it. Over several processes the main one writes
    the file.
    """
    import transformers

    batch_size = 2 * args.batch_size
    if not args.reference_cache:
        return reference_logps(model, pairs, pad_id, device, autocast, args.logit_chunk, batch_size)
    key = hashlib.sha256()
    for name, tensor in distributed.unwrap(model).state_dict().items():
        tensor = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor  # FSDP's shards
        key.update(f"{name} {tensor.dtype}".encode())
        key.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    for path in (__file__, policy.__file__):
        with open(path, "rb") as f:
            key.update(f.read())
    key.update(json.dumps([pairs, batch_size, args.logit_chunk, torch.get_num_threads(),
                           str(device), args.precision,  # the autocast
                           torch.__version__, transformers.__version__, distributed.WORLD.size]).encode())
    path = os.path.join(args.reference_cache, key.hexdigest()[:20] + ".pt")
    if all(distributed.unshard([os.path.isfile(path)])):  # every process reads, or every process computes
        print(f"reference log-probs: read from {path}")
        saved = torch.load(path, weights_only=True)
        return saved["ref_w"].to(device), saved["ref_l"].to(device)
    ref_w, ref_l = reference_logps(model, pairs, pad_id, device, autocast, args.logit_chunk, batch_size)
    if not distributed.WORLD.main:
        return ref_w, ref_l
    os.makedirs(args.reference_cache, exist_ok=True)
    torch.save({"ref_w": ref_w.cpu(), "ref_l": ref_l.cpu()}, f"{path}.{os.getpid()}.tmp")
    os.replace(f"{path}.{os.getpid()}.tmp", path)  # a whole file or none, even with runs side by side
    return ref_w, ref_l


def method_name(args):
    return args.loss_type


def check_run_flags(args):
    """--lr_schedule and --run_name, as every training run (dpo.py, is_dpo.py, rloo.py) takes them."""
    if args.lr_schedule not in ("constant", "cosine"):
        fail(f"--lr_schedule must be constant or cosine, got {args.lr_schedule!r}")
    if args.run_name in (".", "..") or os.sep in args.run_name:
        fail(f"--run_name must be a plain name (no {os.sep}), got {args.run_name!r}")


def validate(args):
    if args.loss_type not in LOSS_TYPES:
        fail(f"--loss_type must be one of {', '.join(LOSS_TYPES)}, got {args.loss_type!r}")
    stage.check_args(args, positive=("beta", "num_epochs", "batch_size", "grad_accum", "lr", "grad_clip",
                                   "chipo_clip", "chipo_rmax", "logit_chunk", "max_prompt_len",
                                   "max_response_len"),
                   non_negative=("rpo_eta", "warmup_steps", "num_checkpoints", "save_every"))
    if args.ipo_form not in ("summed", "per_token"):
        fail(f"--ipo_form must be summed or per_token, got {args.ipo_form!r}")
    if args.chipo_form not in ("huang", "isdaa"):
        fail(f"--chipo_form must be huang or isdaa, got {args.chipo_form!r}")
    check_run_flags(args)
    if not os.path.isdir(args.sft_path):
        fail(f"--sft_path {args.sft_path} not found (run sft.py first)")


# ----------------------------------------------------------------------------------------------
# 6. training


@dataclass
class Run:
    """What the loop works on, set up once by start_run."""
    name: str
    out_dir: str
    tmp: str  # the unfinished output, published as out_dir when the run ends (None but in the main process)
    tokenizer: object
    model: object  # pi_theta, started at pi_ref
    forward: object  # what the loop calls: its forward is sequence_logps(model, ...) (distributed.parallel)
    rows: list
    pairs: list
    ref_w: torch.Tensor  # log pi_ref(y_w|x) of every pair [N]
    ref_l: torch.Tensor  # log pi_ref(y_l|x) [N]
    device: torch.device
    autocast: object
    total_steps: int
    scaler: object  # policy.grad_scaler: --precision fp16 only


def begin_run(args, method):
    """Seeds and threads set: (device, autocast, run name, run directory). rloo.py begins the same way."""
    policy.seed_everything(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, autocast = policy.device_and_autocast(args.precision)
    name = args.run_name or f"{method}_beta{args.beta:g}_seed{args.seed}"
    return device, autocast, name, os.path.join(args.runs_dir, name)


def start_run(args, method):
    """Checks, seeds, data, pi_ref's log-probs, and the locked output directory of the run (written by the
    main process only; the others wait for it)."""
    validate(args)
    world = distributed.join_processes(args)  # one process, or each of torchrun's (distributed.py)
    device, autocast, name, out_dir = begin_run(args, method)
    inputs = [args.sft_path, args.data, args.reference_cache]
    stage.check_output(out_dir, "daa run", inputs)  # before any work: an output not to be replaced is refused
    tokenizer = policy.load_tokenizer(args.sft_path)
    rows, pairs = load_pairs(args, tokenizer)
    if args.batch_size * world.size > len(pairs) and world.size > 1:
        fail(f"--batch_size {args.batch_size} x {world.size} processes is more than the {len(pairs)} pairs")
    # locked, and kept across a kill: --resume continues from the state saved in it
    tmp = (stage.start_output(out_dir, "daa run", inputs, resumable=True, resume=args.resume)
           if world.main else None)
    distributed.barrier()
    model = policy.load_policy(args.sft_path).to(device)
    forward = distributed.parallel(model, sequence_logps, args.fsdp, args.gradient_checkpointing)
    ref_w, ref_l = shared_reference_logps(args, forward, pairs, tokenizer.pad_token_id, device, autocast)
    global_batch = args.batch_size * args.grad_accum * world.size  # pairs a step, over all processes
    total_steps = max(1, math.ceil(args.num_epochs * len(pairs) / global_batch))
    return Run(name, out_dir, tmp, tokenizer, model, forward, rows, pairs, ref_w, ref_l, device, autocast,
               total_steps, policy.grad_scaler(args.precision, device))


def make_optimizer(args, model, total_steps):
    """AdamW without weight decay, linear warm-up, then a cosine decay to --min_lr_ratio of --lr or a constant
    rate (policy.lr_schedule)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    return optimizer, policy.lr_schedule(optimizer, args.warmup_steps, total_steps, args.lr_schedule,
                                         args.min_lr_ratio)


def checkpoint_steps(args, total_steps):
    """The steps saved as ckpt-<step>: evenly spaced fractions of training, step 0 (pi_ref) included."""
    if not args.num_checkpoints:
        return set()
    return {round(k * total_steps / args.num_checkpoints) for k in range(args.num_checkpoints + 1)}


def save_checkpoint(run, step):
    distributed.save_pretrained(run.model, os.path.join(run.tmp or "", f"ckpt-{step}"), run.tokenizer)


def micro_batch_loss(args, run, weigh, idx):
    """The loss of the pairs idx, already divided by --grad_accum, and what is worth logging.

    L = mean_i(w_i * L_i) / grad_accum (METHOD.md, sections 5 and 6): L_i the DAA loss of pair i,
    w_i its weight (1 in dpo.py, an importance weight in is_dpo.py).
    Over several processes idx is the global micro-batch: each process runs its shard of it, and the
    per-pair log-probs of all are gathered (distributed.gather_live), so that L, the weights and every logged
    number are those of idx, as one process would compute them.
    """
    # --- the algorithm: summed log-probs, the per-pair loss, the weight ---
    pairs = [run.pairs[i] for i in distributed.shard(idx)]  # this process's pairs (all, in one process)
    wpo = getattr(args, "weight", None) == "wpo"  # is_dpo.py --weight wpo: its term from the same pass
    out = pair_logps(run.forward, pairs, run.tokenizer.pad_token_id, run.device, run.autocast,
                     args.logit_chunk, wpo=wpo)
    out = [distributed.gather_live(t) for t in out]  # every process's pairs, in the order of idx
    pi_w, pi_l, len_w, len_l = out[:4]
    index = torch.tensor(idx, device=run.device)
    logps = {"pi_w": pi_w, "pi_l": pi_l, "ref_w": run.ref_w[index], "ref_l": run.ref_l[index],
             "len_w": len_w, "len_l": len_l}
    losses, stats = daa_losses(args, **logps)
    if wpo:
        logps["sq_w"], logps["sq_l"] = out[4:]
    weights, weight_stats = weigh(args, logps, [run.rows[i] for i in idx])
    loss = (weights * losses).mean() / args.grad_accum
    return loss, {**stats, **weight_stats}


def accumulate_gradients(args, run, weigh, order, cursor):
    """--grad_accum micro-batches, backward on each: (logged means, data order, cursor in it). Every
    process draws the same order; a micro-batch is --batch_size pairs for each of them. Their gradients
    are averaged at the last micro-batch's backward only (distributed.sync_gradients)."""
    logged = {}
    size = args.batch_size * distributed.WORLD.size  # the global micro-batch
    for i in range(args.grad_accum):
        if cursor + size > len(order):  # reshuffle every pass
            order, cursor = random.sample(range(len(run.pairs)), len(run.pairs)), 0
        idx = order[cursor:cursor + size]
        cursor += size
        with distributed.sync_gradients(run.forward, now=i == args.grad_accum - 1):
            loss, stats = micro_batch_loss(args, run, weigh, idx)
            run.scaler.scale(loss * distributed.WORLD.size).backward()  # DDP averages: see gather_live
        for k, v in {**stats, "loss": loss.item() * args.grad_accum}.items():
            logged[k] = logged.get(k, 0.0) + v / args.grad_accum
    return logged, order, cursor


def write_args(args, run, method):
    run_id = stage.read_marker(run.tmp)["run"]  # tells evaluate.py a retrained run from the old one
    policy.save_json(os.path.join(run.tmp, "args.json"),
                     {**dataclasses.asdict(args), "method": method, "run_name": run.name, "run_id": run_id,
                      "total_steps": run.total_steps, "num_pairs": len(run.pairs)})


@stage.cleans_up
def train(args, weigh=no_weights, method=None):
    """The DAA loop. weigh(args, logps, rows) -> (weights [B], stats): all ones for plain DAAs."""
    method = method or method_name(args)
    run = start_run(args, method)
    optimizer, scheduler = make_optimizer(args, run.model, run.total_steps)
    main = distributed.WORLD.main  # writes the run's files; under torchrun the other processes only compute
    if main:
        write_args(args, run, method)
    save_at = checkpoint_steps(args, run.total_steps)
    done, order, cursor = policy.restore_state(run.tmp, args, run.model, optimizer, scheduler, run.scaler)
    if 0 in save_at and not done:
        save_checkpoint(run, 0)
    processes = distributed.WORLD.size
    pairs_per_step = args.batch_size * args.grad_accum * processes
    print(f"{run.name}: {len(run.pairs)} pairs, {run.total_steps} steps of {pairs_per_step} pairs, "
          f"device {run.device}" + (f" (x {processes} processes: {args.grad_accum} micro-batches of "
                                    f"{args.batch_size} pairs each)" if processes > 1 else ""))
    t0 = time.time()
    bar = tqdm(range(done + 1, run.total_steps + 1), desc=run.name, disable=not main)
    for step in bar:
        logged, order, cursor = accumulate_gradients(args, run, weigh, order, cursor)
        grad_norm = policy.optimizer_step(step, run.model, optimizer, scheduler, run.scaler, args.grad_clip,
                                          logged["loss"])
        row = {"step": step, "epoch": step * pairs_per_step / len(run.pairs), **logged,
               "grad_norm": float(grad_norm)}
        if main:
            policy.append_jsonl(os.path.join(run.tmp, "train_log.jsonl"), row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", margin=f"{row['margin']:.2f}",
                        acc=f"{row['accuracy']:.2f}")
        if step in save_at:
            save_checkpoint(run, step)
        policy.save_state(run.tmp, args, step, run.total_steps, run.model, optimizer, scheduler,
                          order, cursor, run.scaler)
    policy.check_finite(run.total_steps, parameter_norm=policy.parameter_norm(run.model))
    if main:
        policy.remove_state(run.tmp)
        stage.finish_output(run.tmp, run.out_dir)
    print(f"{run.name}: done in {time.time() - t0:.0f} s -> {run.out_dir}")
    return run.out_dir


if __name__ == "__main__":
    train(stage.parse_args(Args, __doc__))
