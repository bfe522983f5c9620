"""lm.py -- the language model every stage shares: 1. rows of local JSON lines in one form ({prompt,
completion}, {prompt, chosen, rejected} or {prompt, reference}, any text column C's token ids as C_ids where
known); 2. token ids; 3. batches and log pi(y|x), by its definition, then the fused gather training runs,
tested equal; 4. models, float32 master weights; 5. sampling."""
import json
import math
import os

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from stage import fail

# ----------------------------------------------------------------------------------------------
# 1. rows


def read_jsonl(path):
    """The rows of a JSON-lines file; a line that is not a JSON object is refused with its number."""
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                fail(f"{path} line {n} is not valid JSON{'' if line.endswith(chr(10)) else ' (torn?)'}: {e}")
            if not isinstance(row, dict):
                fail(f"{path} line {n} is not a JSON object: {line.strip()[:60]}")
            rows.append(row)
    return rows


def load_rows(data, filename, columns, numeric=()):
    """The rows of `data` (a .jsonl file, or a directory holding `filename`), every column in `columns` a
    string, every one in `numeric` a finite number, and every C_ids column a list of token ids where a row
    has one: the first that is not is refused in one line with its row."""
    path = os.path.join(data, filename) if os.path.isdir(data) else data
    if not os.path.isfile(path):
        fail(f"{path} not found (run the stage that writes it first)")
    if not path.endswith(".jsonl"):
        fail(f"{path} is not a .jsonl file: prepare other data with `python -m scale.prepare`")
    rows = read_jsonl(path)
    if not rows:
        fail(f"{path} has no rows")
    for i, row in enumerate(rows, 1):
        for c in [*columns, *numeric, *(k for k in row if k.endswith("_ids"))]:
            value = row.get(c)
            if c.endswith("_ids"):  # a non-empty list of token ids
                ok = isinstance(value, list) and value and all(type(t) is int and t >= 0 for t in value)
            else:
                ok = (type(value) in (int, float) and math.isfinite(value) if c in numeric
                      else isinstance(value, str))
            if not ok:
                kind = ("token ids" if c.endswith("_ids") else "a finite number" if c in numeric
                        else "a string")
                fail(f"{path} row {i}, column {c!r}: expected {kind}, got {json.dumps(value)[:60]}"
                     + ("" if isinstance(value, str) or value is not None or c in row else
                        f" (it has {sorted(row)}; prepare other columns with `python -m scale.prepare`)"))
    return rows


# ----------------------------------------------------------------------------------------------
# 2. tokens: (prompt_ids, response_ids) per row


def load_tokenizer(path):
    """The tokenizer saved at `path` (a directory or a hub id), with a pad token (EOS where it has none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        fail(f"could not load a tokenizer from {path!r}: {str(e).splitlines()[0][:200]}")
    if tokenizer.eos_token is None:
        fail(f"the tokenizer at {path!r} has no EOS token: a response could never end")
    if tokenizer.pad_token is None:  # e.g. Pythia: padding is masked out, any id will do
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def encode_prompts(tokenizer, rows, max_prompt_len):
    """Each row's prompt ids: its prompt_ids if it has them, else its text tokenized (BOS first where the
    tokenizer adds one itself, as Llama's does). A longer prompt than max_prompt_len is refused."""
    bos = tokenizer.bos_token_id
    adds_bos = (bos is not None and tokenizer("x")["input_ids"][:1] == [bos]
                and tokenizer("x", add_special_tokens=False)["input_ids"][:1] != [bos])
    texts = [r["prompt"] for r in rows if "prompt_ids" not in r]
    encoded, out = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []), []
    for row in rows:
        ids = row["prompt_ids"] if "prompt_ids" in row else [bos] * adds_bos + next(encoded)
        if not ids:
            fail("a prompt is empty (no tokens): nothing to condition a response on")
        if len(ids) > max_prompt_len:
            fail(f"a prompt has {len(ids)} tokens > --max_prompt_len {max_prompt_len}: raise it, or cut the "
                 f"prompts with `python -m scale.prepare --truncate_prompts`")
        out.append(ids)
    return out


def encode(tokenizer, rows, column, max_prompt_len, max_response_len):
    """[(prompt_ids, response_ids)] of each row's prompt and its response in `column`: the row's C_ids if it
    has them (the tokens a model sampled), else ' ' + text + EOS; cut at max_response_len (said once)."""
    texts = [r[column] if r[column][:1].isspace() else " " + r[column]
             for r in rows if column + "_ids" not in r]
    encoded, out = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []), []
    for row, prompt in zip(rows, encode_prompts(tokenizer, rows, max_prompt_len)):
        ids = row.get(column + "_ids") or next(encoded) + [tokenizer.eos_token_id]
        if max(ids + prompt) >= len(tokenizer):
            fail(f"a row's token ids reach {max(ids + prompt)}, beyond the tokenizer's {len(tokenizer)} "
                 f"tokens: ids of another tokenizer?")
        out.append((prompt, ids[:max_response_len], len(ids) > max_response_len))
    if sum(c for *_, c in out):
        print(f"note: {sum(c for *_, c in out)} of {len(out)} {column} responses cut at --max_response_len")
    return [(p, r) for p, r, _ in out]


def banned_ids(tokenizer, model=None):
    """Ids a response never holds: the special tokens but EOS (a chat template's headers are special too)
    and, given the model, the rows of a padded output layer that no token has (Pythia: 50,304 for 50,277)."""
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    special |= set(tokenizer.all_special_ids)
    padded = range(len(tokenizer), model.get_output_embeddings().weight.shape[0]) if model is not None else ()
    return sorted(special - {tokenizer.eos_token_id} | set(padded))


def decode_response(tokenizer, ids):  # (text without special tokens, finished: it ended with EOS)
    return tokenizer.decode(ids, skip_special_tokens=True).strip(), ids[-1:] == [tokenizer.eos_token_id]


# ----------------------------------------------------------------------------------------------
# 3. batches, and log pi(y|x)


def collate(examples, pad_id):
    """examples [(prompt_ids, response_ids)] -> right-padded input_ids, attention_mask and response_mask
    [B, T] (response_mask: 1 on the response's tokens, EOS included)."""
    length = max(len(p) + len(r) for p, r in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    response_mask = torch.zeros((len(examples), length), dtype=torch.bool)
    for i, (p, r) in enumerate(examples):
        input_ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        attention_mask[i, :len(p) + len(r)] = 1
        response_mask[i, len(p):len(p) + len(r)] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}


def to_device(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


def sequence_logps_plain(model, batch):
    """log pi(y|x) = sum_t log pi(y_t | x, y_<t) over the response tokens of each row: the definition
    (METHOD.md, section 2), which the fused gather below is tested against.
    batch: collate's [B, T]. Returns logps [B] (float32 at least) and lengths |y| [B]."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [B, T, V]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logps = logits[:, :-1].log_softmax(-1)  # position t predicts token t + 1
    token_logps = logps.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)  # [B, T-1]
    mask = batch["response_mask"][:, 1:]  # the positions whose next token is a response token
    return (token_logps * mask).sum(-1), mask.sum(-1)


# The fused gather: the same numbers up to float rounding (tests/test_lm.py), two optimisations. (a) A pair's
# two responses share a prompt, which is most of a TL;DR sequence: it runs once, and both responses continue
# from its keys and values. (b) The output layer runs on response positions only, a chunk of tokens at a time,
# so no [batch, time, vocabulary] tensor exists (Pythia's 50k vocabulary makes that gigabytes).


def collate_grouped(examples, pad_id, k=1):
    """examples in groups of k rows sharing a prompt (k = 2: chosen, rejected) -> prompt_ids, prompt_mask
    [P, Lp] (left-padded, as `sample` pads) and response_ids, response_mask [P*k, Lr] (right-padded)."""
    if len(examples) % k or any(examples[i][0] != examples[i - i % k][0] for i in range(len(examples))):
        raise ValueError(f"examples must come in groups of {k} rows with the same prompt")
    prompts, responses = [p for p, _ in examples[::k]], [r for _, r in examples]
    width, length = max(map(len, prompts)), max(map(len, responses))
    return {"prompt_ids": torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts]),
            "prompt_mask": torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts]),
            "response_ids": torch.tensor([r + [pad_id] * (length - len(r)) for r in responses]),
            "response_mask": torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in responses])}


def response_hidden(base_model, batch):
    """Last-layer hidden states h [P*k, Lr + 1, H] over the response positions of collate_grouped's batch:
    h[:, t] has read the prompt and t response tokens, so h[:, :-1] predicts response_ids, and h[i, len_i]
    has read all of response i (where a reward model reads its score). The prompt runs once with use_cache,
    its keys and values are repeated k times, and each response continues from its copy; position ids count
    real tokens only. Under gradient checkpointing (no cache kept) each response runs after its own prompt."""
    prompt_mask, response_mask = batch["prompt_mask"], batch["response_mask"]
    k = len(response_mask) // len(prompt_mask)
    position = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    if base_model.training and base_model.is_activation_checkpointing:
        ids, prompt_mask, position = (t.repeat_interleave(k, 0)
                                      for t in (batch["prompt_ids"], prompt_mask, position))
        after = position[:, -1:] + 1 + torch.arange(response_mask.shape[1], device=position.device)
        out = base_model(input_ids=torch.cat([ids, batch["response_ids"]], 1),
                         attention_mask=torch.cat([prompt_mask, response_mask], 1),
                         position_ids=torch.cat([position, after], 1))
        return out.last_hidden_state[:, ids.shape[1] - 1:]  # the prompt's last column, then the response
    out = base_model(input_ids=batch["prompt_ids"], attention_mask=prompt_mask, position_ids=position,
                     use_cache=True)
    cache, last = out.past_key_values, out.last_hidden_state[:, -1:]  # left padding: the last column is real
    if k > 1:
        cache.batch_repeat_interleave(k)
        last, prompt_mask, position = (t.repeat_interleave(k, dim=0) for t in (last, prompt_mask, position))
    position = position[:, -1:] + 1 + torch.arange(response_mask.shape[1], device=position.device)
    out = base_model(input_ids=batch["response_ids"], position_ids=position, past_key_values=cache,
                     attention_mask=torch.cat([prompt_mask, response_mask], 1))
    return torch.cat([last, out.last_hidden_state], dim=1)


def gather_logps_naive(hidden, weight, bias, targets):
    """log softmax(hidden @ W^T + b)[target], the textbook way (the whole [N, V] log-softmax).
    hidden [N, H], weight [V, H], bias [V] or None, targets [N] -> [N], float32 at least."""
    logits = F.linear(hidden, weight, bias).to(torch.promote_types(hidden.dtype, torch.float32))
    return logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)


class ChunkedLogProbs(torch.autograd.Function):
    """gather_logps_naive's numbers, one [chunk, V] block of logits at a time. Forward keeps the per-token
    logsumexp; backward recomputes each chunk's logits and uses d logp_t / d logits = onehot(target) -
    softmax(logits), both in the dtype autocast chose for the forward (ctx.dtype; autocast off inside): a
    softmax of logits of another precision than the saved logsumexp would not sum to 1."""
    BYTES = 2 ** 27  # chunk 0: as many tokens as fill 128 MiB of float32 logits (bench/README.md says why)
    tokens = staticmethod(lambda chunk, vocab: chunk or max(1, ChunkedLogProbs.BYTES // (4 * vocab)))

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):
        device, chunk = hidden.device.type, ChunkedLogProbs.tokens(chunk, len(weight))
        ctx.dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        w, b = weight.to(ctx.dtype), None if bias is None else bias.to(ctx.dtype)
        acc = torch.promote_types(hidden.dtype, torch.float32)  # bf16 logits are summed in float32
        logps = torch.empty(len(targets), dtype=acc, device=hidden.device)
        lse = torch.empty_like(logps)
        with torch.autocast(device, enabled=False):
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
        w, b = weight.to(ctx.dtype), None if bias is None else bias.to(ctx.dtype)
        acc = lse.dtype
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
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


def sequence_logps(model, batch, chunk=0):
    """sequence_logps_plain's numbers, the fast way, for collate_grouped's batch: logps [P*k] (float32 at
    least) and lengths [P*k]. Training and pi_ref's log-probs run this path."""
    mask = batch["response_mask"].bool()
    h = response_hidden(model.base_model, batch)[:, :-1][mask]  # h[:, t] predicts response token t
    head = model.get_output_embeddings()
    token_logps = ChunkedLogProbs.apply(h, head.weight, head.bias, batch["response_ids"][mask], chunk)
    logps = torch.zeros(len(mask), dtype=token_logps.dtype, device=h.device)
    return logps.index_add(0, mask.nonzero()[:, 0], token_logps), mask.sum(1)


def pair_logps(forward, pairs, pad_id, device, chunk):
    """log pi(y_w|x), log pi(y_l|x), |y_w|, |y_l| [B] of pairs [((prompt, chosen), (prompt, rejected))] in
    one pass (each prompt runs once for both). forward: the model, or stage.parallel's module of it."""
    batch = to_device(collate_grouped([ex for pair in pairs for ex in pair], pad_id, k=2), device)
    if isinstance(forward, torch.nn.Module) and hasattr(forward, "base_model"):
        logps, lengths = sequence_logps(forward, batch, chunk)
    else:  # stage.parallel's module: its forward is sequence_logps(model, ...)
        logps, lengths = forward(batch, chunk)
    return logps[0::2], logps[1::2], lengths[0::2], lengths[1::2]


# ----------------------------------------------------------------------------------------------
# 4. models


def load_pretrained(auto_class, path, what, new_weights=(), dropout=False):
    """A model whose every weight was in its files (a reward model as a policy is refused, not completed at
    random), in float32 master weights (stage.save_pretrained saves in the files' dtype, stored_dtype).
    new_weights: weights that may start fresh (the RM's head). dropout=False: every rate 0 (as TRL)."""
    try:
        model, info = auto_class.from_pretrained(path, output_loading_info=True, dtype="auto")
    except Exception as e:  # missing, truncated, foreign: all end here
        first_line = (str(e).splitlines() or [""])[0][:200]
        fail(f"could not load {what} from {path!r}: {type(e).__name__}: {first_line}")
    missing = [k for k in info["missing_keys"] if not k.startswith(tuple(new_weights))]
    if missing:
        fail(f"{path} is not {what}: its files lack the weights {', '.join(sorted(missing)[:3])}")
    for m in [] if dropout else [*model.modules(), model.config]:  # nn.Dropout's p, modules' and config's
        vars(m).update({k: 0.0 for k, v in vars(m).items() if isinstance(v, float) and (
            k == "p" and isinstance(m, torch.nn.Dropout) or "dropout" in k or "pdrop" in k)})
    model.stored_dtype = model.dtype
    return model.float()


def load_model(path, dropout=False):
    """A causal LM (pi_ref, a checkpoint) from a directory or a hub id; dropout: keep its dropout."""
    from transformers import AutoModelForCausalLM

    return load_pretrained(AutoModelForCausalLM, path, "a policy (a causal LM)", dropout=dropout)


def new_model(tokenizer, n_layer, n_embd, n_head, max_len):
    """The toy's tiny GPT-NeoX (Pythia's architecture), untied output layer, no dropout."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    if n_embd % n_head:
        fail(f"--n_embd {n_embd} must be divisible by --n_head {n_head}")
    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=n_embd, num_hidden_layers=n_layer,
                           num_attention_heads=n_head, intermediate_size=4 * n_embd,
                           max_position_embeddings=max_len,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    return GPTNeoXForCausalLM(config)


# ----------------------------------------------------------------------------------------------
# 5. sampling with a KV cache


@torch.no_grad()
def sample(model, prompts, eos_id, pad_id, max_new_tokens, temperature=1.0, batch_size=256, generator=None,
           desc=None, suppress_ids=(), logps_of="policy"):
    """One response per prompt (token-id lists), batched, with a KV cache. Prompts are left-padded, masked,
    and position ids count real tokens, so a row sees what it would see alone. temperature 0: greedy;
    suppress_ids are never drawn. Returns (responses: id lists cut after the first EOS, logps: the summed
    log-probs of the sampled tokens under logps_of="policy", the temperature-1 policy without suppression
    (what teacher forcing gives), or "sampler", the distribution each token was drawn from (greedy: 0))."""
    if logps_of not in ("policy", "sampler"):
        raise ValueError(f"logps_of must be policy or sampler, got {logps_of!r}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    responses, logps = [], []
    banned = torch.tensor(list(suppress_ids), dtype=torch.long, device=device)
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False, disable=desc is None):
        tokens, totals = sample_batch(model, prompts[start:start + batch_size], eos_id, pad_id,
                                      max_new_tokens, temperature, generator, banned)
        responses += [row[:row.index(eos_id) + 1] if eos_id in row else row for row in tokens]
        logps += totals[logps_of].tolist()
    model.train(was_training)
    return responses, logps


def sample_batch(model, chunk, eos_id, pad_id, max_new_tokens, temperature, generator, banned):
    """One batch of `sample`: (token lists, pad after EOS; {"policy", "sampler"}: summed log-probs [B])."""
    device = banned.device
    width = max(len(p) for p in chunk)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    done = torch.zeros(len(chunk), dtype=torch.bool, device=device)
    totals = {name: torch.zeros(len(chunk), device=device) for name in ("policy", "sampler")}
    out_tokens, cache = [], None
    for _ in range(max_new_tokens):
        out = model(input_ids=ids, attention_mask=mask, position_ids=position, past_key_values=cache,
                    use_cache=True)
        cache = out.past_key_values
        logits = out.logits[:, -1].float()
        allowed = logits.index_fill(-1, banned, float("-inf")) if len(banned) else logits
        if temperature == 0:
            token, drawn = allowed.argmax(-1), torch.zeros_like(logits)  # greedy: probability 1
        else:
            probs = torch.softmax(allowed / temperature, -1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            drawn = torch.log_softmax(allowed / temperature, dim=-1)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        for name, token_logps in (("policy", torch.log_softmax(logits, -1)), ("sampler", drawn)):
            totals[name] += torch.where(done, 0.0, token_logps.gather(-1, token[:, None]).squeeze(-1))
        out_tokens.append(token)
        done |= token == eos_id
        if done.all():
            break
        ids, position = token[:, None], position[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(token)[:, None]], dim=1)
    return torch.stack(out_tokens, dim=1).tolist(), totals
