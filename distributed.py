"""
distributed.py -- a stage run by several processes at once, one a GPU: `torchrun --nproc_per_node N
script.py ...` starts N copies of it, and this file is how they share the work.

  * who is who: WORLD (this process's rank, their number, its GPU), init_distributed, join_processes;
  * sharing the work: shard / unshard (every N-th item, and back), barrier;
  * one global batch: gather_live (every process's per-pair log-probs, each keeping its own gradient) and
    mean_over_batch, so N processes compute the loss one process would (METHOD.md, section 12);
  * the model: parallel wraps it in DDP (gradients averaged in backward) or FSDP (weights sharded), with
    the loss's forward inside the wrapper (Forward); sync_gradients, save_pretrained.

One process (`python script.py`): nothing here does anything, and the stages read as if it did not exist.
Imports run down the pipeline only: this file imports stage.py (errors) and no stage.
"""
import dataclasses
import os
import sys
from contextlib import contextmanager

import torch

from stage import fail


# ----------------------------------------------------------------------------------------------
# many processes: `torchrun --nproc_per_node N script.py ...` starts N copies of a stage, one a GPU
# (or, in the tests, CPU processes talking through gloo). Every copy runs the same lines; they differ only
# in their rank, which picks their GPU and their share of the work. One process: nothing here does anything.


@dataclasses.dataclass
class World:
    rank: int = 0  # this process, 0 .. size - 1
    size: int = 1  # processes in all
    local_rank: int = 0  # this process on its machine: its GPU

    @property
    def main(self):
        """The process that writes files and prints progress."""
        return self.rank == 0


WORLD = World()


def init_distributed():
    """Join the processes torchrun started (it sets RANK, WORLD_SIZE and LOCAL_RANK): NCCL between GPUs,
    gloo between CPU processes. Sets and returns WORLD; a plain `python script.py` gets World()."""
    global WORLD
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size > 1 and not torch.distributed.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        WORLD = World(torch.distributed.get_rank(), size, local_rank)
        if not WORLD.main:  # one copy of every printed line: the main process's (errors still show)
            sys.stdout = open(os.devnull, "w")
    return WORLD


def join_processes(args):
    """init_distributed() for a training stage. --resume is refused over several processes: the saved
    state (save_state) is one process's."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.resume:
        fail("--resume works in one process only: restart the run from its beginning")
    return init_distributed()


def shard(items):
    """This process's share of a list: items[rank::size] (all of it in one process)."""
    return items[WORLD.rank::WORLD.size]


def unshard(mine):
    """Every process's shard() back in the original order, on every process: the inverse of shard()."""
    if WORLD.size == 1:
        return list(mine)
    parts = [None] * WORLD.size
    torch.distributed.all_gather_object(parts, list(mine))
    out = [None] * sum(map(len, parts))
    for rank, part in enumerate(parts):
        out[rank::WORLD.size] = part
    return out


def barrier():
    """Wait here until every process has arrived (e.g. until the main one has written a file)."""
    if WORLD.size > 1:
        torch.distributed.barrier()


def gather_live(mine):
    """Every process's [B, ...] tensor, in shard() order, on every process: [N * B, ...] -- the inverse of
    shard() for tensors (every process must hold the same B).

    The other processes' entries arrive as constants (all_gather carries no gradient); this process's own
    entries are `mine` itself, gradient included. So a loss F computed from the gathered tensors is the
    same number on every process, and each process differentiates F through its own entries only: the
    chain rule's sum over entries, split by process. Summed over the processes, those gradients are F's
    whole gradient; DDP averages them instead, so a loop backpropagates WORLD.size * F. This holds for any
    F -- a mean, a self-normalised weight, a statistic of the whole global micro-batch.
    """
    if WORLD.size == 1:
        return mine
    parts = [torch.empty_like(mine) for _ in range(WORLD.size)]
    torch.distributed.all_gather(parts, mine.detach().contiguous())
    parts[WORLD.rank] = mine
    return torch.stack(parts, dim=1).reshape(-1, *mine.shape[1:])  # entry j * N + r: process r's j-th


def mean_over_batch(mean, count):
    """The mean over the global micro-batch of what each process averaged over its own `count` items
    (SFT's tokens: the processes hold different numbers of them); `mean` itself in one process."""
    if WORLD.size == 1:
        return mean
    count = torch.as_tensor(count, dtype=mean.dtype, device=mean.device).reshape(1)
    return gather_live((mean * count).reshape(1)).sum() / gather_live(count).sum()


class Forward(torch.nn.Module):
    """fn(model, *inputs) as the forward of a module: the module DDP and FSDP wrap.

    Both act through a module's forward: DDP prepares its gradient sync there, FSDP gathers the sharded
    weights there. A loss that reads model.base_model and the output layer's weight directly (the fused
    log-prob gather, the reward head on chosen positions) would pass by both; as this module's forward,
    it goes through them."""

    def __init__(self, fn, model):
        super().__init__()
        self.fn, self.model = fn, model

    def forward(self, *inputs, **kwargs):
        return self.fn(self.model, *inputs, **kwargs)


def parallel(model, fn, fsdp=False, gradient_checkpointing=False):
    """The module a training loop calls for fn(model, ...): Forward(fn, model) in one process; over
    several, wrapped in DDP (gradients averaged over the processes in backward) or, with fsdp, every
    transformer layer and the whole sharded by FSDP (torch's fully_shard: each process holds 1/N of every
    weight and gathers a layer's weights just before it runs). gradient_checkpointing: the layers keep
    no activations for backward and recompute them (response_hidden then runs prompt + response whole)."""
    if gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    module = Forward(fn, model)
    if WORLD.size == 1:
        return module
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in [m for m in model.modules() if type(m).__name__ in (model._no_split_modules or [])]:
            fully_shard(layer)
        root = fully_shard(module)
        # FSDP keeps the root's own weights (embeddings, final layer norm, output layer) gathered from its
        # forward to its backward. A forward without a backward (no_grad: pi_ref's log-probs, a validation)
        # would leave them so, and model.parameters() would list those gathered copies, not the shards: an
        # optimizer built then steps on copies the next gather overwrites, while the shards' gradients are
        # never cleared by zero_grad (a train_log apart from step 2 on). So such a forward reshards at once.
        root.register_forward_hook(lambda m, inputs, out: None if torch.is_grad_enabled() else m.reshard())
        return root
    return torch.nn.parallel.DistributedDataParallel(
        module, device_ids=[WORLD.local_rank] if torch.cuda.is_available() else None, broadcast_buffers=False)


def unwrap(module):
    """The model inside parallel()'s module (or the model itself)."""
    module = getattr(module, "module", module)  # DDP's
    return module.model if isinstance(module, Forward) else module


def apply(fn, model, *inputs, **kwargs):
    """fn(model, ...), for a plain model or for parallel()'s module made of fn (then through its forward)."""
    if model is unwrap(model):
        return fn(model, *inputs, **kwargs)
    if getattr(model, "module", model).fn is not fn:
        raise ValueError(f"this module computes {getattr(model, 'module', model).fn.__name__}, "
                         f"not {fn.__name__}")
    return model(*inputs, **kwargs)


@contextmanager
def sync_gradients(module, now):
    """Around a micro-batch's forward and backward: the processes average their gradients only when `now`
    (the last micro-batch of a step); before it, each accumulates its own (DDP's no_sync, FSDP's
    set_requires_gradient_sync). Nothing to do in one process."""
    if isinstance(module, torch.nn.parallel.DistributedDataParallel) and not now:
        with module.no_sync():
            yield
        return
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP
        module.set_requires_gradient_sync(now)
    yield


def is_sharded(model):
    """Are model's weights sharded over the processes (parallel(..., fsdp=True))?"""
    return any(hasattr(p, "full_tensor") for p in model.parameters())


def save_pretrained(model, path, tokenizer=None):
    """model.save_pretrained(path) (and the tokenizer's), by the main process only. Sharded weights are
    gathered first, as one full state dict on the CPU of the main process (every process takes part)."""
    state = None
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if WORLD.main:
        model.save_pretrained(path, **({} if state is None else {"state_dict": state}))
        if tokenizer is not None:
            tokenizer.save_pretrained(path)

