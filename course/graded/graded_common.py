"""What the graded tests share: a tiny GPT-NeoX built from a config (no download, float64), batches of
random token ids, each example's next-token log-probabilities computed the slow, obvious way, and the size
of the largest tensor an operation makes."""
import functools
import random

import torch
from torch.utils._python_dispatch import TorchDispatchMode

VOCAB, PAD, EOS = 29, 0, 1


@functools.lru_cache(maxsize=None)
def tiny_model(seed, pad=PAD):
    """A 1-layer GPT-NeoX in float64 whose output layer is large enough that log-probs differ by token; pad:
    its config's pad id (pad = EOS, as Pythia has it, with tiny_model(seed, pad=EOS))."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=64, bos_token_id=EOS,
                           eos_token_id=EOS, pad_token_id=pad, tie_word_embeddings=False)
    model = GPTNeoXForCausalLM(config).double().eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0.0, 0.5)
        model.get_input_embeddings().weight.normal_(0.0, 1.0)
    return model


def examples(n, seed=0):
    """n (prompt_ids, response_ids): prompts of 2-7 tokens, responses of 1-6 tokens ending with EOS, so the
    lengths differ from row to row."""
    rng = random.Random(seed)
    word = lambda: rng.randrange(2, VOCAB)  # noqa: E731
    return [([word() for _ in range(rng.randint(2, 7))], [word() for _ in range(rng.randint(0, 5))] + [EOS])
            for _ in range(n)]


def next_token_logps(model, prompt, response):
    """[|y|, V]: log pi(. | x, y_<t) for each response position t, one example alone, no padding."""
    logits = model(input_ids=torch.tensor([prompt + response])).logits[0].double()
    return logits.log_softmax(-1)[len(prompt) - 1:len(prompt) + len(response) - 1]


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
