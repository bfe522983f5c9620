"""
scale/fsdp.py -- --fsdp: every weight sharded over torchrun's processes (torch's fully_shard, FSDP2), for
models whose weights, gradients and AdamW moments do not fit on one GPU. The stages reach it through
stage.parallel(..., fsdp=True) and stage.save_pretrained; a CPU student never runs it.
"""
import torch


def shard_model(module):
    """module: stage.Forward(fn, model). Each transformer layer, then the whole, is sharded: each process
    holds 1/N of every weight and gathers a layer's weights just before it runs."""
    model = module.model
    for layer in [m for m in model.modules() if type(m).__name__ in (model._no_split_modules or [])]:
        torch.distributed.fsdp.fully_shard(layer)
    root = torch.distributed.fsdp.fully_shard(module)
    # FSDP keeps the root's own weights (embeddings, final norm, output layer) gathered from its forward to
    # its backward. A forward without a backward (no_grad: pi_ref's log-probs, a validation) would leave them
    # so, and model.parameters() would list the gathered copies, not the shards: an optimizer built then steps
    # on copies the next gather overwrites. So such a forward reshards at once.
    root.register_forward_hook(lambda m, inputs, out: None if torch.is_grad_enabled() else m.reshard())
    return root


def full_state_dict(model):
    """The whole model's weights on the main process's CPU, gathered from the shards (every process calls)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
