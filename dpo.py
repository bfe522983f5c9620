"""
dpo.py -- direct alignment on offline preference pairs: DPO, IPO, RPO, R-DPO, chi-PO.

The policy starts at pi_ref (sft.py) and learns from {prompt, chosen, rejected} pairs sampled from pi_ref
and labelled (reward.py). Every loss is a function of r(y) = log pi_theta(y|x) - log pi_ref(y|x) (METHOD 5).

Run (after toy_tldr.py, sft.py, reward.py --mode label; about 40 s on one CPU thread):
    python dpo.py                               # DPO, beta 0.01 -> out/runs/dpo_beta0.01_seed0/
    python dpo.py --reference_only              # only log pi_ref of the pairs, saved beside them
Paper scale (Pythia + TL;DR on GPUs, every stage): recipes/pythia_tldr.sh

Read it top to bottom: 1. the pairs; 2. the losses, small pure functions of summed log-probs; 3. log pi_ref
of every pair, taken once before training; 4. the loop, written out: data, forward (lm.pair_logps, the fused
gather), loss, weight, backward, step, log, save. is_dpo.py runs it with weigh=is_dpo.importance_weights.
"""
import dataclasses
import hashlib
import math
import os
import random
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import lm
import stage
from stage import fail, fingerprint

LOSS_TYPES = ("dpo", "dpo_norm", "ipo", "rpo", "rdpo", "chipo")


@dataclass
class Args:
    sft_path: str = field(default="out/sft", metadata={"help": "pi_ref (sft.py): start and reference"})
    data: str = field(default="out/prefs", metadata={"help": "pairs: train.jsonl or its directory"})
    loss_type: str = field(default="dpo", metadata={"help": "dpo | dpo_norm | ipo | rpo | rdpo | chipo"})
    beta: float = field(default=0.01, metadata={"help": "KL strength (paper: 0.01, 0.05, 0.1)"})
    label_smoothing: float = field(default=0.0, metadata={"help": "dpo: P(a label is wrong): cDPO (0: DPO)"})
    ipo_form: str = field(default="summed", metadata={"help": "ipo: summed (Azar et al.) | per_token (TRL)"})
    rpo_eta: float = field(default=0.005, metadata={"help": "rpo: weight of the chosen's NLL (x beta)"})
    rdpo_alpha: float = field(default=0.01, metadata={"help": "rdpo: weight of the length gap |y_w| - |y_l|"})
    chipo_form: str = field(default="huang", metadata={"help": "chipo: huang | isdaa (IS-DAAs)"})
    chipo_rmax: float = field(default=5.0, metadata={"help": "chipo, huang: the reward bound R"})
    chipo_clip: float = field(default=5.0, metadata={"help": "chipo, isdaa: the clip c of r inside exp()"})
    num_epochs: float = field(default=4.0, metadata={"help": "passes over the pairs (paper: 1; the toy: 4)"})
    batch_size: int = field(default=32, metadata={"help": "pairs per micro-batch (per process)"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate, AdamW (paper: 1e-6 on Pythia)"})
    warmup_steps: int = field(default=20, metadata={"help": "linear warm-up steps"})
    lr_schedule: str = field(default="constant", metadata={"help": "constant (DPO's) | cosine | wsd"})
    min_lr_ratio: float = field(default=0.0, metadata={"help": "the cosine's floor / --lr (IS-DAAs: 0.1)"})
    decay_fraction: float = field(default=0.2, metadata={"help": "wsd: the last fraction of steps decays"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm"})
    num_checkpoints: int = field(default=8, metadata={"help": "ckpt-<step> at even fractions, + step 0"})
    logit_chunk: int = field(default=0, metadata={"help": "tokens per output-layer chunk (0: 128 MiB each)"})
    max_prompt_len: int = field(default=64, metadata={"help": "longest prompt in tokens (longer: an error)"})
    max_response_len: int = field(default=24, metadata={"help": "response tokens kept, EOS included"})
    seed: int = field(default=0, metadata={"help": "seed of python, numpy and torch (the data order)"})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch (0: torch's default)"})
    precision: str = field(default="auto", metadata={"help": stage.PRECISION_HELP})
    runs_dir: str = field(default="out/runs", metadata={"help": "the run goes to <runs_dir>/<run_name>/"})
    run_name: str = field(default="", metadata={"help": "default: <method>_beta<beta>_seed<seed>"})
    reference_only: bool = field(default=False, metadata={"help": "only log pi_ref, saved beside the pairs"})
    resume: bool = field(default=False, metadata={"help": "continue an interrupted run from its saved state"})
    save_every: int = field(default=50, metadata={"help": "steps between states for --resume (0: none)"})
    fsdp: bool = field(default=False, metadata={"help": "under torchrun: shard the weights (FSDP), not DDP"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations (memory)"})
    keep_dropout: bool = field(default=False, metadata={"help": "keep pi_ref's dropout (default: all off)"})


# --- 1. the pairs -----------------------------------------------------------------------------


def load_pairs(args, tokenizer):
    """(rows, pairs): the rows of --data, and per row ((prompt_ids, chosen_ids), (prompt_ids, rejected_ids)),
    the token ids the label stage sampled where the row holds them (chosen_ids, rejected_ids)."""
    rows = lm.load_rows(args.data, "train.jsonl", ["prompt", "chosen", "rejected"])
    chosen, rejected = (lm.encode(tokenizer, rows, c, args.max_prompt_len, args.max_response_len)
                        for c in ("chosen", "rejected"))
    same = sum(r["chosen"] == r["rejected"] for r in rows)
    if same:  # legal, but such a pair has Delta = 0 forever and teaches nothing
        print(f"note: {same} pairs have chosen == rejected (their loss is constant)")
    return rows, list(zip(chosen, rejected))


# --- 2. the losses (METHOD.md, section 5) -----------------------------------------------------
# Inputs per pair, [B]: summed log-probs under the policy (pi_*) and the reference (ref_*) of the chosen
# (w) and rejected (l) response, and their lengths. Each returns [B].


def dpo_loss(pi_w, pi_l, ref_w, ref_l, beta):
    """DPO (Rafailov et al. 2023, eq. 7): -log sigmoid(beta * Delta), Delta = r(y_w) - r(y_l); pi_w, pi_l,
    ref_w, ref_l [B]: log pi_theta(y_w|x), log pi_theta(y_l|x), log pi_ref(y_w|x), log pi_ref(y_l|x)."""
    # BEGIN SOLUTION
    return -F.logsigmoid(beta * ((pi_w - ref_w) - (pi_l - ref_l)))
    # END SOLUTION


def dpo_norm_loss(pi_w, pi_l, ref_w, ref_l, len_w, len_l, beta):
    """Length-normalised DPO (TRL's sigmoid_norm, open-instruct's dpo_norm): DPO on r(y)/|y| per response."""
    return -F.logsigmoid(beta * ((pi_w - ref_w) / len_w - (pi_l - ref_l) / len_l))


def ipo_loss(pi_w, pi_l, ref_w, ref_l, len_w, len_l, beta, summed=True):
    """IPO (Azar et al. 2023, eq. 17; the AIS paper, App. J): (Delta - 1 / (2 beta))^2 on summed log-ratios;
    summed=False: TRL's per-token form, Delta_avg = r(y_w)/|y_w| - r(y_l)/|y_l|. Returns [B]."""
    if summed:
        len_w, len_l = torch.ones_like(len_w), torch.ones_like(len_l)
    # BEGIN SOLUTION
    delta = (pi_w - ref_w) / len_w - (pi_l - ref_l) / len_l
    return (delta - 1 / (2 * beta)) ** 2
    # END SOLUTION


def rpo_loss(pi_w, pi_l, ref_w, ref_l, beta, eta):
    """RPO (Liu et al. 2024): DPO - eta * beta * log pi_theta(y_w|x), DPO plus a summed NLL of the chosen."""
    return dpo_loss(pi_w, pi_l, ref_w, ref_l, beta) - eta * beta * pi_w


def rdpo_loss(pi_w, pi_l, ref_w, ref_l, len_w, len_l, beta, alpha):
    """R-DPO (Park et al. 2024): -log sigmoid(beta * Delta + alpha * (|y_w| - |y_l|)), that paper's sign."""
    delta = (pi_w - ref_w) - (pi_l - ref_l)
    return -F.logsigmoid(beta * delta + alpha * (len_w - len_l).to(delta.dtype))


def chipo_loss(pi_w, pi_l, ref_w, ref_l, beta, r_max):
    """chi-PO (Huang et al. 2024, Alg. 1): -log sigmoid(clip(beta (phi(z_w) - phi(z_l)), -2R, 2R)), phi(z) =
    z + log z, z = exp(r). z_w - z_l = exp(m) (exp(r_w - m) - exp(r_l - m)), m = max(r_w, r_l), with exp(m)
    capped at e^30: past it the margin is clipped anyway, and nothing overflows (even times w = e^50)."""
    r_w, r_l = pi_w - ref_w, pi_l - ref_l
    m = torch.maximum(r_w, r_l)
    exp_gap = torch.exp(m.clamp(max=30.0)) * (torch.exp(r_w - m) - torch.exp(r_l - m))  # z_w - z_l
    return -F.logsigmoid((beta * ((r_w - r_l) + exp_gap)).clamp(-2 * r_max, 2 * r_max))


def chipo_isdaa_loss(pi_w, pi_l, ref_w, ref_l, beta, clip):
    """chi-PO as the IS-DAAs code computes it: phi = r + exp(clip(r, -c, c)); past c it is DPO exactly."""
    r_w, r_l = pi_w - ref_w, pi_l - ref_l
    phi_w, phi_l = r_w + torch.exp(r_w.clamp(-clip, clip)), r_l + torch.exp(r_l.clamp(-clip, clip))
    return -F.logsigmoid(beta * (phi_w - phi_l))


def daa_losses(args, pi_w, pi_l, ref_w, ref_l, len_w, len_l):
    """Per-pair losses [B] of --loss_type, and what is worth logging (implicit rewards beta * r(y))."""
    if args.loss_type == "dpo":  # label_smoothing eps: the expected loss if a label is wrong w.p. eps
        losses = ((1 - args.label_smoothing) * dpo_loss(pi_w, pi_l, ref_w, ref_l, args.beta)
                  + args.label_smoothing * dpo_loss(pi_l, pi_w, ref_l, ref_w, args.beta))
    elif args.loss_type == "dpo_norm":
        losses = dpo_norm_loss(pi_w, pi_l, ref_w, ref_l, len_w, len_l, args.beta)
    elif args.loss_type == "ipo":
        losses = ipo_loss(pi_w, pi_l, ref_w, ref_l, len_w, len_l, args.beta, args.ipo_form == "summed")
    elif args.loss_type == "rpo":
        losses = rpo_loss(pi_w, pi_l, ref_w, ref_l, args.beta, args.rpo_eta)
    elif args.loss_type == "rdpo":
        losses = rdpo_loss(pi_w, pi_l, ref_w, ref_l, len_w, len_l, args.beta, args.rdpo_alpha)
    elif args.chipo_form == "isdaa":
        losses = chipo_isdaa_loss(pi_w, pi_l, ref_w, ref_l, args.beta, args.chipo_clip)
    else:
        losses = chipo_loss(pi_w, pi_l, ref_w, ref_l, args.beta, args.chipo_rmax)
    with torch.no_grad():
        reward_w, reward_l = args.beta * (pi_w - ref_w), args.beta * (pi_l - ref_l)
        stats = {"daa_loss": losses.mean().item(), "margin": (reward_w - reward_l).mean().item(),
                 "accuracy": (reward_w > reward_l).float().mean().item(),
                 "reward_chosen": reward_w.mean().item(), "reward_rejected": reward_l.mean().item(),
                 "logps_chosen": pi_w.mean().item(), "logps_rejected": pi_l.mean().item()}
    return losses, stats


# --- 3. log pi_ref of every pair --------------------------------------------------------------
# pi_ref is where the policy starts, so they are taken once, before training; `dpo.py --reference_only`
# saves them beside the pairs for every run that trains from that pi_ref on them


def read_reference(path, key, n):
    """The saved log-probs if `path` holds them for `key` (n finite numbers each, checksum intact) or None."""
    try:
        saved = torch.load(path, weights_only=True)
        logps = saved["logps"]
        if saved["key"] == key and all(t.shape == (n,) and t.isfinite().all() for t in logps) and \
                saved["sha256"] == hashlib.sha256(torch.stack(logps).numpy().tobytes()).hexdigest():
            return logps
    except Exception:  # missing, torn, foreign: computed again
        return None


@torch.no_grad()
def reference_logps(args, forward, pairs, pad_id, device):
    """log pi_ref(y_w|x), log pi_ref(y_l|x) [N], float32 (bf16 rounds a sum of 50 by a nat): from <pairs
    dir>/reference_logps.pt if made from this pi_ref, pairs and lengths, else computed (and saved there by
    --reference_only). Over N processes each computes a shard (padded: FSDP needs equal batches)."""
    pairs_file = os.path.join(args.data, "train.jsonl") if os.path.isdir(args.data) else args.data
    path = os.path.join(os.path.dirname(pairs_file), "reference_logps.pt")
    key = [fingerprint(args.sft_path), fingerprint(pairs_file), args.max_prompt_len, args.max_response_len]
    saved = read_reference(path, key, len(pairs))
    if saved is not None:
        print(f"reference log-probs: read from {path}")
        return tuple(t.to(device) for t in saved)
    mine = stage.shard(pairs + pairs[-1:] * (-len(pairs) % stage.WORLD.size))
    out = []
    for s in tqdm(range(0, len(mine), 2 * args.batch_size), desc="reference log-probs", leave=False):
        out.append(torch.stack(lm.pair_logps(forward, mine[s:s + 2 * args.batch_size], pad_id, device,
                                             args.logit_chunk)[:2], 1))
    logps = stage.gather_live(torch.cat(out))[:len(pairs)].float().T.contiguous()  # [2, N]
    if args.reference_only and stage.WORLD.main:
        sha = hashlib.sha256(logps.cpu().numpy().tobytes()).hexdigest()
        stage.save_whole({"key": key, "logps": tuple(logps.cpu()), "sha256": sha}, path)
    return logps[0], logps[1]


# --- 4. training ------------------------------------------------------------------------------


def check(args):
    if args.loss_type not in LOSS_TYPES:
        fail(f"--loss_type must be one of {', '.join(LOSS_TYPES)}, got {args.loss_type!r}")
    stage.check_args(args, positive=("beta", "num_epochs", "batch_size", "grad_accum", "lr", "grad_clip",
                                     "chipo_clip", "chipo_rmax", "max_prompt_len", "max_response_len",
                                     "num_checkpoints"),
                     non_negative=("rpo_eta", "warmup_steps", "save_every", "logit_chunk"))
    if not 0 <= args.label_smoothing < 0.5 or args.label_smoothing and args.loss_type != "dpo":
        fail(f"--label_smoothing is in [0, 0.5) and goes with --loss_type dpo, got {args.label_smoothing}")
    if args.ipo_form not in ("summed", "per_token") or args.chipo_form not in ("huang", "isdaa"):
        fail(f"--ipo_form summed|per_token, --chipo_form huang|isdaa: got {args.ipo_form}, {args.chipo_form}")
    if args.run_name in (".", "..") or os.sep in args.run_name:
        fail(f"--run_name must be a plain name (no {os.sep}), got {args.run_name!r}")
    if not os.path.isdir(args.sft_path):
        fail(f"--sft_path {args.sft_path} not found (run sft.py first)")


@stage.cleans_up
def train(args, weigh=None, method=None):
    """The DAA loop. weigh(args, logps, rows, model) -> (w [B], stats) weighs each pair's loss (is_dpo.py;
    model, the policy being trained, for a weight of its own distributions: extras/wpo.py)."""
    check(args)
    world = stage.init_distributed()
    stage.seed_everything(args.seed)
    device, autocast = stage.device_and_autocast(args.precision, args.threads)
    name = args.run_name or f"{method or args.loss_type}_beta{args.beta:g}_seed{args.seed}"
    out_dir, inputs = os.path.join(args.runs_dir, name), [args.sft_path, args.data]
    if not args.reference_only:
        stage.check_output(out_dir, "daa run", inputs)  # before any work
    tokenizer = lm.load_tokenizer(args.sft_path)
    rows, pairs = load_pairs(args, tokenizer)
    if args.batch_size * world.size > len(pairs) and world.size > 1 and not args.reference_only:
        fail(f"--batch_size {args.batch_size} x {world.size} processes is more than the {len(pairs)} pairs")
    model = lm.load_model(args.sft_path, dropout=args.keep_dropout).to(device)
    forward = stage.parallel(model, lm.sequence_logps, args.fsdp, args.gradient_checkpointing)
    ref_w, ref_l = reference_logps(args, forward, pairs, tokenizer.pad_token_id, device)
    model.train()  # after pi_ref's log-probs: --keep_dropout's dropout, --gradient_checkpointing
    if args.reference_only:
        print(f"reference log-probs of {len(pairs)} pairs: beside them, in reference_logps.pt")
        return None
    pairs_file = os.path.join(args.data, "train.jsonl") if os.path.isdir(args.data) else args.data
    output = stage.start_output(out_dir, "daa run", inputs, args.resume, stage.record(
        args, sft_path=args.sft_path, data=pairs_file)) if world.main else None
    stage.barrier()
    size = args.batch_size * world.size  # the global micro-batch: every process draws the same order
    total_steps = max(1, math.ceil(args.num_epochs * len(pairs) / (size * args.grad_accum)))
    save_at = {round(k * total_steps / args.num_checkpoints) for k in range(args.num_checkpoints + 1)}
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    scheduler = stage.lr_schedule(optimizer, args.warmup_steps, total_steps, args.lr_schedule,
                                  args.min_lr_ratio, args.decay_fraction)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")  # fp16 gradients underflow
    work = stage.scratch_path(out_dir, "partial")  # output.work, known to every process
    if world.main:
        stage.save_json(os.path.join(work, "args.json"), {
            **dataclasses.asdict(args), "method": method or args.loss_type, "run_name": name,
            "run_id": output.run, "total_steps": total_steps, "num_pairs": len(pairs)})
    done, order, cursor = stage.restore_state(work, args, model, optimizer, scheduler, scaler)
    if 0 in save_at and not done:
        stage.save_pretrained(model, os.path.join(work, "ckpt-0"), tokenizer)
    print(f"{name}: {len(pairs)} pairs, {total_steps} steps of {size * args.grad_accum} pairs on {device}")
    t0 = time.time()
    bar = tqdm(range(done + 1, total_steps + 1), desc=name, disable=not world.main)
    for step in bar:
        logged = {}
        for micro in range(args.grad_accum):
            if cursor + size > len(order):  # a fresh shuffle each pass
                order, cursor = random.sample(range(len(pairs)), len(pairs)), 0
            idx, cursor = order[cursor:cursor + size], cursor + size
            with stage.sync_gradients(forward, now=micro == args.grad_accum - 1):
                # --- the algorithm: summed log-probs of this process's pairs; every process's, gathered ---
                with autocast:
                    mine = lm.pair_logps(forward, [pairs[i] for i in stage.shard(idx)],
                                         tokenizer.pad_token_id, device, args.logit_chunk)
                pi_w, pi_l, len_w, len_l = (stage.gather_live(t) for t in mine)
                logps = {"pi_w": pi_w, "pi_l": pi_l, "ref_w": ref_w[idx], "ref_l": ref_l[idx],
                         "len_w": len_w, "len_l": len_l}
                losses, stats = daa_losses(args, **logps)  # [B]
                weights, weight_stats = (weigh(args, logps, [rows[i] for i in idx], model) if weigh
                                         else (torch.ones_like(losses), {}))
                loss = (weights * losses).mean() / args.grad_accum  # METHOD.md, sections 5 and 6
                scaler.scale(loss * world.size).backward()  # DDP averages the processes: stage.gather_live
            for k, v in {**stats, **weight_stats, "loss": loss.item() * args.grad_accum}.items():
                logged[k] = logged.get(k, 0.0) + v / args.grad_accum
        grad_norm = stage.optimizer_step(step, model, optimizer, scheduler, scaler, args.grad_clip,
                                         logged["loss"])
        row = {"step": step, "epoch": step * size * args.grad_accum / len(pairs), **logged,
               "grad_norm": float(grad_norm)}
        if world.main:
            stage.append_jsonl(os.path.join(work, "train_log.jsonl"), row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", margin=f"{row['margin']:.2f}",
                        acc=f"{row['accuracy']:.2f}")
        if step in save_at:
            stage.save_pretrained(model, os.path.join(work, f"ckpt-{step}"), tokenizer)
        stage.save_state(work, args, step, total_steps, model, optimizer, scheduler, order, cursor, scaler)
    stage.check_finite(total_steps, parameter_norm=stage.parameter_norm(model))
    if world.main:
        output.publish()
    print(f"{name}: done in {time.time() - t0:.0f} s -> {out_dir}")
    return out_dir


if __name__ == "__main__":
    train(stage.parse_args(Args, __doc__))
