"""What the graded tests share: a tiny GPT-NeoX built from a config (no download, float64), a GPT-NeoX whose
next-token distributions are a table given in the test (so its log-probs, losses and KLs are closed forms
written out there), batches of random token ids, and the size of the largest tensor an operation makes."""
import functools
import math
import random

import torch
from torch.utils._python_dispatch import TorchDispatchMode

VOCAB, PAD, EOS = 29, 0, 1
# -log sigmoid(m) = log(1 + e^-m) and sigmoid(-m) = 1 / (1 + e^m) at the margins m the tests use, each
# computed once to 40 digits (mpmath) and rounded to a float: log(1 + e^0) = log 2, log(1 + e^4) = 4 +
# log(1 + e^-4)
SOFTPLUS = {-4: 4.0181499279178094, -2: 2.1269280110429727, -1: 1.3132616875182228, -0.5: 0.9740769841801067,
            0: 0.6931471805599453, 0.5: 0.4740769841801067, 1: 0.3132616875182228, 2: 0.1269280110429725,
            4: 0.01814992791780974}
SIGMOID = {-4: 0.9820137900379085, -2: 0.8807970779778824, -1: 0.7310585786300049, -0.5: 0.6224593312018546,
           0: 0.5, 0.5: 0.37754066879814546, 1: 0.2689414213699951, 2: 0.11920292202211756,
           4: 0.01798620996209156}


def neox_config(vocab, hidden, layers, pad):
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=2, intermediate_size=32, max_position_embeddings=64,
                         bos_token_id=EOS, eos_token_id=EOS, pad_token_id=pad, tie_word_embeddings=False)


@functools.lru_cache(maxsize=None)
def tiny_model(seed, pad=PAD):
    """A 1-layer GPT-NeoX in float64 whose output layer is large enough that log-probs differ by token; pad:
    its config's pad id (pad = EOS, as Pythia has it, with tiny_model(seed, pad=EOS))."""
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(neox_config(VOCAB, 16, 1, pad)).double().eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0.0, 0.5)
        model.get_input_embeddings().weight.normal_(0.0, 1.0)
    return model


def table_model(probs, pad=PAD):
    """A GPT-NeoX in float64 (no transformer layer) whose next-token distribution after token i is probs[i]
    whatever came before: pi(j | x, y_<t) = probs[y_{t-1}][j] (the vocabulary: len(probs) tokens, PAD = 0
    and EOS = 1 among them). Token i's embedding is e_2i - e_2i+1: the final layer norm scales it by 1 / s,
    s = sqrt(2 / H + eps), and the output layer's columns 2i and 2i+1 hold log probs[i] * s / 2 and its
    negative, so the logits after token i are log probs[i]."""
    from transformers import GPTNeoXForCausalLM

    vocab = len(probs)
    model = GPTNeoXForCausalLM(neox_config(vocab, 2 * vocab, 0, pad)).double().eval()
    s = math.sqrt(2 / (2 * vocab) + model.config.layer_norm_eps)
    with torch.no_grad():
        embed, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        embed.zero_()
        out.zero_()
        for i, row in enumerate(probs):
            embed[i, 2 * i], embed[i, 2 * i + 1] = 1.0, -1.0
            out[:, 2 * i] = torch.tensor([math.log(p) * s / 2 for p in row], dtype=torch.float64)
            out[:, 2 * i + 1] = -out[:, 2 * i]
    return model


def examples(n, seed=0):
    """n (prompt_ids, response_ids): prompts of 2-7 tokens, responses of 1-6 tokens ending with EOS, so the
    lengths differ from row to row."""
    rng = random.Random(seed)
    word = lambda: rng.randrange(2, VOCAB)  # noqa: E731
    return [([word() for _ in range(rng.randint(2, 7))], [word() for _ in range(rng.randint(0, 5))] + [EOS])
            for _ in range(n)]


class LargestTensor(TorchDispatchMode):
    """`with LargestTensor() as m:` ... then m.numel is the most elements of any tensor an operation made."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out
