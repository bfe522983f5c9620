"""
bench/dpo_step.py -- one DPO training step of a Pythia-1B-shaped model: tokens/s, peak memory and MFU, with
the fused log-prob gather (lm.sequence_logps) beside the naive one (lm.gather_logps_naive in its place).

    python bench/dpo_step.py                               # on a GPU: Pythia-1B shape, bf16 autocast
    python bench/dpo_step.py --pairs 16 --steps 10         # a larger batch, more timed steps
    python bench/dpo_step.py --size tiny --precision fp32  # a CPU smoke run (seconds)

A step is what dpo.py does per optimizer step: the pairs' prompts run once, chosen and rejected continue from
their keys and values (lm.collate_grouped, lm.sequence_logps), the DPO loss against reference
log-probs computed beforehand (as dpo.py saves them; here the model's own, shifted by seeded noise so that
the loss depends on what the variants compute), backward, gradient clipping, AdamW. The model is a
GPTNeoXConfig with Pythia-1B's dimensions (16 layers, hidden 2048, 8 heads, MLP 8192, vocabulary 50,304,
rotary on 25% of each head, parallel residual, untied output layer) and random weights; the token ids are
random (the cost of a step does not depend on them). Both variants start from the same weights and data,
each with a fresh AdamW, and their first losses must agree.

Reported per variant: tokens/s (tokens through the model per step: each prompt once plus both responses;
median step time over --steps after --warmup steps), peak memory (torch.cuda.max_memory_allocated over the
timed steps, weights and AdamW state included; on the CPU not measured), and
MFU = 6 ((N - N_out) T + N_out T_resp) / t / peak: N the parameters that do matrix products per token (all
but the input embedding), N_out those of the output layer, which runs on the response tokens only (T_resp
of the T tokens of a step; the prompt's positions predict nothing a loss reads), t the step's time, peak
the accelerator's dense peak (--peak_tflops; the default 989 is an H100 SXM's bf16 dense figure without
sparsity). The numerator counts the model's matrix products of forward and backward (the fused gather's
recomputed logits in backward are not model work: they lower the MFU) and leaves out attention's own T^2
work, so the MFU is a slight underestimate at these lengths.
"""
import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import dpo  # noqa: E402
import lm  # noqa: E402
import stage  # noqa: E402

SIZES = {  # GPTNeoXConfig fields
    "pythia-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=8, intermediate_size=8192,
                      vocab_size=50304),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                 vocab_size=1000),
}


@dataclass
class Args:
    size: str = field(default="pythia-1b", metadata={"help": "pythia-1b | tiny (a CPU smoke run)"})
    precision: str = field(default="auto", metadata={"help": stage.PRECISION_HELP})
    pairs: int = field(default=8, metadata={"help": "preference pairs per step"})
    prompt_len: int = field(default=400, metadata={"help": "prompt tokens (TL;DR-like: ~400)"})
    response_len: int = field(default=50, metadata={"help": "tokens of each response (TL;DR-like: ~50)"})
    steps: int = field(default=5, metadata={"help": "timed steps per variant (median reported)"})
    warmup: int = field(default=2, metadata={"help": "untimed steps first (kernels, AdamW state)"})
    chunk: int = field(default=dpo.Args.logit_chunk, metadata={
        "help": "response tokens per chunk of the fused gather (0: sized by bytes, dpo.py's default)"})
    beta: float = field(default=0.1, metadata={"help": "DPO's beta (does not change the cost)"})
    peak_tflops: float = field(default=989.0, metadata={
        "help": "the accelerator's dense peak in TFLOP/s at --precision (default: H100 SXM, bf16, dense)"})
    seed: int = field(default=0, metadata={"help": "seed of the weights and token ids"})
    json_out: str = field(default="", metadata={"help": "also write the rows to this JSON file"})


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Args):
        parser.add_argument(f"--{f.name}", default=f.default, type=f.type, help=f.metadata["help"])
    args = Args(**vars(parser.parse_args(argv)))
    if args.size not in SIZES:
        parser.error(f"--size must be one of {', '.join(SIZES)}, got {args.size!r}")
    for name in ("pairs", "prompt_len", "response_len", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0 or args.chunk < 0 or not args.peak_tflops > 0:
        parser.error("--warmup and --chunk must be >= 0 and --peak_tflops > 0")
    return args


def build_model(args, device):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(**SIZES[args.size], max_position_embeddings=2048, rotary_pct=0.25,
                           use_parallel_residual=True, tie_word_embeddings=False)
    torch.manual_seed(args.seed)
    return GPTNeoXForCausalLM(config).to(device)


def make_batch(args, vocab, device):
    """lm.collate_grouped of random pairs: one prompt, a chosen and a rejected response each."""
    g = torch.Generator().manual_seed(args.seed + 1)
    examples = []
    for _ in range(args.pairs):
        prompt = torch.randint(vocab, (args.prompt_len,), generator=g).tolist()
        for _ in range(2):
            examples.append((prompt, torch.randint(vocab, (args.response_len,), generator=g).tolist()))
    return lm.to_device(lm.collate_grouped(examples, pad_id=0, k=2), device)


def naive_sequence_logps(model, batch):
    """lm.sequence_logps with the textbook gather in place of the fused one: lm.gather_logps_naive, the whole
    [N, V] logits and log-softmax of the response tokens at once."""
    mask = batch["response_mask"].bool()
    hidden = lm.response_hidden(model.base_model, batch)[:, :-1][mask]  # hidden[:, t] predicts token t
    head = model.get_output_embeddings()
    token_logps = lm.gather_logps_naive(hidden, head.weight, head.bias, batch["response_ids"][mask])
    zeros = torch.zeros(len(mask), dtype=token_logps.dtype, device=hidden.device)
    return zeros.index_add(0, mask.nonzero()[:, 0], token_logps)


def dpo_step(step, model, update, batch, ref, fused, args, autocast):
    """Forward of chosen + rejected (prompt once), the DPO loss, backward, then the training loops' own
    update (stage.optimizer_step: clip, finite check, AdamW). update: (optimizer, schedule, scaler).
    Returns the loss."""
    with autocast:
        logps = (lm.sequence_logps(model, batch, args.chunk)[0] if fused
                 else naive_sequence_logps(model, batch))
        loss = dpo.dpo_loss(logps[0::2], logps[1::2], ref[0::2], ref[1::2], args.beta).mean()
    optimizer, schedule, scaler = update
    scaler.scale(loss).backward()
    stage.optimizer_step(step, model, optimizer, schedule, scaler, 1.0, loss)
    return loss.item()


def run_variant(args, fused, device, autocast, batch, ref):
    """Median step time, peak memory and the first loss of one variant, from the seed's fresh weights."""
    model = build_model(args, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0)
    update = (optimizer, stage.lr_schedule(optimizer, 0, 1, "constant"),  # dpo.py's, without warm-up
              torch.amp.GradScaler(device.type, enabled=args.precision == "fp16"))
    cuda = device.type == "cuda"
    losses, times = [], []
    for i in range(args.warmup + args.steps):
        if cuda and i == args.warmup:
            torch.cuda.reset_peak_memory_stats(device)
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        losses.append(dpo_step(i + 1, model, update, batch, ref, fused, args, autocast))
        if cuda:
            torch.cuda.synchronize(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else None
    matmul_params = sum(p.numel() for n, p in model.named_parameters() if "embed_in" not in n)
    head_params = model.get_output_embeddings().weight.numel()
    del model, optimizer, update
    return statistics.median(times), peak, losses[0], matmul_params, head_params


def main(args):
    device, autocast = stage.device_and_autocast(args.precision)
    model = build_model(args, device)
    batch = make_batch(args, model.config.vocab_size, device)
    with torch.no_grad(), autocast:  # the reference log-probs, computed once as dpo.py saves them
        ref = lm.sequence_logps(model, batch, args.chunk)[0].float()
    noise = torch.randn(len(ref), generator=torch.Generator().manual_seed(args.seed + 2))
    ref = ref + noise.to(ref.device)  # pi_theta = pi_ref at the start would make every first loss log 2
    del model
    tokens = args.pairs * (args.prompt_len + 2 * args.response_len)
    response_tokens = args.pairs * 2 * args.response_len
    precision = args.precision if args.precision != "auto" else "bf16" if device.type == "cuda" else "fp32"
    print(f"{args.size}, {device.type}, {precision}, {args.pairs} pairs x ({args.prompt_len} prompt + 2 x "
          f"{args.response_len} response) = {tokens} tokens a step; median of {args.steps} steps after "
          f"{args.warmup}; MFU against {args.peak_tflops:g} TFLOP/s")
    rows = []
    for name, fused in (("fused", True), ("naive", False)):
        seconds, peak, loss, n, head = run_variant(args, fused, device, autocast, batch, ref)
        # the output layer runs on response tokens only (lm.sequence_logps): charged there alone
        flops = 6 * ((n - head) * tokens + head * response_tokens)
        rows.append({"variant": name, "step_s": seconds, "tokens_per_s": tokens / seconds, "peak_gib": peak,
                     "mfu": flops / seconds / (args.peak_tflops * 1e12), "first_loss": loss,
                     "matmul_params": n, "head_params": head, "tokens": tokens,
                     "response_tokens": response_tokens, "model_flops": flops, "device": device.type,
                     "precision": precision})
    if not math.isclose(rows[0]["first_loss"], rows[1]["first_loss"], rel_tol=1e-2, abs_tol=1e-3):
        sys.exit(f"fused and naive disagree on the first loss: {rows[0]['first_loss']} vs "
                 f"{rows[1]['first_loss']}")
    print(f"{'variant':8s} {'step s':>8s} {'tokens/s':>10s} {'peak GiB':>9s} {'MFU':>7s} {'first loss':>11s}")
    for r in rows:
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        print(f"{r['variant']:8s} {r['step_s']:8.3f} {r['tokens_per_s']:10.0f} {peak:>9s} {r['mfu']:7.2%} "
              f"{r['first_loss']:11.6f}")
    print(f"N = {rows[0]['matmul_params'] / 1e6:.1f}M parameters in matrix products (the input embedding "
          f"left out), {rows[0]['head_params'] / 1e6:.1f}M of them the output layer, charged on the "
          f"{response_tokens} response tokens only")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main(parse_args())
