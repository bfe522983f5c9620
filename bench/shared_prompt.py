"""
bench/shared_prompt.py -- what running a pair's prompt once saves (lm.sequence_logps, reward.reward_scores).

    python bench/shared_prompt.py                                   # the toy's sizes (about 20 s)
    python bench/shared_prompt.py --prompt_len 400 --response_len 50 --n_embd 256 --pairs 8   # TL;DR-like
    lengths

A preference pair is (prompt, chosen) and (prompt, rejected). The textbook batch is two full sequences per
pair (lm.collate: right-padded, one forward); ours runs the prompt once and lets both responses continue
from its keys and values (lm.collate_grouped + lm.response_hidden). Both variants compute the summed
log-probs of the response tokens with the same fused gather, then backward; the script first checks that
they agree, then reports the median wall time of forward + backward over --reps calls, and the tokens
each variant feeds the model. Random token ids on a randomly initialised GPT-NeoX; CPU, float32.
Timings depend on the machine's load: compare rows of one run, not across runs.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dpo  # noqa: E402
import lm  # noqa: E402


def two_sequences_logps(model, examples, pad_id, chunk):
    """The textbook way: every (prompt, response) row a full right-padded sequence."""
    batch = lm.collate(examples, pad_id)
    hidden = model.base_model(input_ids=batch["input_ids"],
                              attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["response_mask"][:, 1:]
    head = model.get_output_embeddings()
    token_logps = lm.ChunkedLogProbs.apply(hidden[:, :-1][mask], head.weight, head.bias,
                                           batch["input_ids"][:, 1:][mask], chunk)
    return torch.zeros(len(mask)).index_add(0, mask.nonzero()[:, 0], token_logps)


def shared_prompt_logps(model, examples, pad_id, chunk):
    return lm.sequence_logps(model, lm.collate_grouped(examples, pad_id, k=2), chunk)[0]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=32, help="pairs per batch (dpo.py's default batch)")
    p.add_argument("--prompt_len", type=int, default=42, help="mean prompt tokens (the toy: 42)")
    p.add_argument("--response_len", type=int, default=13, help="mean response tokens (the toy: 13)")
    p.add_argument("--vocab", type=int, default=204)
    p.add_argument("--n_layer", type=int, default=2)
    p.add_argument("--n_embd", type=int, default=128)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--chunk", type=int, default=dpo.Args.logit_chunk, help="tokens per chunk of the fused "
                   "gather, both variants (dpo.py's --logit_chunk)")
    args = p.parse_args()
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=args.vocab, hidden_size=args.n_embd, num_hidden_layers=args.n_layer,
                           num_attention_heads=max(1, args.n_embd // 32), intermediate_size=4 * args.n_embd,
                           max_position_embeddings=2 * (args.prompt_len + args.response_len),
                           tie_word_embeddings=False)
    model = GPTNeoXForCausalLM(config)
    g = torch.Generator().manual_seed(0)
    def ids(mean):  # lengths spread +-25% around the mean, as real data is ragged
        n = int(torch.randint(max(1, mean * 3 // 4), mean * 5 // 4 + 1, (1,), generator=g))
        return torch.randint(1, args.vocab, (n,), generator=g).tolist()

    examples = []
    for _ in range(args.pairs):
        prompt = ids(args.prompt_len)
        examples += [(prompt, ids(args.response_len)), (prompt, ids(args.response_len))]
    variants = {"two full sequences": two_sequences_logps, "shared prompt (ours)": shared_prompt_logps}
    with torch.no_grad():
        a, b = (fn(model, examples, 0, args.chunk) for fn in variants.values())
    print(f"check: max |difference| of the log-probs {float((a - b).abs().max()):.2e}")
    responses = sum(len(r) for _, r in examples)
    tokens = {"two full sequences": sum(len(p) for p, _ in examples) + responses,
              "shared prompt (ours)": sum(len(p) for p, _ in examples[::2]) + responses}
    print(f"{args.pairs} pairs, prompts ~{args.prompt_len} tokens, responses ~{args.response_len}, "
          f"model {args.n_layer} x {args.n_embd}, {torch.get_num_threads()} threads; forward + backward:")
    base = None
    for name, fn in variants.items():
        times = []
        for rep in range(args.reps + 1):
            model.zero_grad(set_to_none=True)
            t = time.perf_counter()
            fn(model, examples, 0, args.chunk).sum().backward()
            if rep:  # the first call warms up
                times.append(time.perf_counter() - t)
        median = statistics.median(times)
        base = base or median
        print(f"  {name:22s} {tokens[name]:6d} tokens  {median * 1e3:8.1f} ms  ({median / base:.2f}x)")


if __name__ == "__main__":
    main()
