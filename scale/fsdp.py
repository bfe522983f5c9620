"""
scale/fsdp.py -- --fsdp: every weight sharded over torchrun's processes (torch's fully_shard, FSDP2), for
models whose weights, gradients and AdamW moments do not fit on one GPU. The stages reach it through
stage.parallel(..., fsdp=True), stage.save_pretrained and --resume's stage.save_state / restore_state; a CPU
student never runs it.
"""
import os
import shutil

import torch

import stage


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


def save_shards(work, step, model, optimizer, state):
    """--resume's state under --fsdp. Each process writes its own shards of the weights and AdamW moments into
    work/state-<step>/ (torch.distributed.checkpoint); once every process has, the main one writes state.pt
    (state: stage.save_state's step, data order, RNGs, ...) naming that directory, whole or not at all, then
    removes the older ones. A run stopped at any moment leaves a state.pt that names a whole directory."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    name = f"state-{step}"
    if stage.WORLD.main:  # a torn copy, written by a run stopped before its state.pt named it
        shutil.rmtree(os.path.join(work, name), ignore_errors=True)
    stage.barrier()
    weights, moments = get_state_dict(model, optimizer)
    try:
        dcp.save({"model": weights, "optimizer": moments}, checkpoint_id=os.path.join(work, name))
    except dcp.CheckpointException as e:  # a process could not write (a full disk): every process hears of it
        raise OSError(f"could not write {os.path.join(work, name)}: {first_failure(e)}") from e
    stage.barrier()  # every process's shards are written
    if stage.WORLD.main:
        stage.save_whole({**state, "shards": name}, os.path.join(work, "state.pt"))
        for old in os.listdir(work):
            if old.startswith("state-") and old != name:
                shutil.rmtree(os.path.join(work, old))


def load_shards(path, model, optimizer):
    """Each process reads its own shards of the weights and AdamW moments from path (save_shards wrote it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    weights, moments = get_state_dict(model, optimizer)  # the shards' layout (AdamW's moments made first)
    shards = {"model": weights, "optimizer": moments}
    try:
        dcp.load(shards, checkpoint_id=path)  # in place
    except dcp.CheckpointException as e:
        stage.fail(f"could not read the saved shards {path} ({first_failure(e)}): remove "
                   f"{os.path.dirname(path)} to start over")
    set_state_dict(model, optimizer, model_state_dict=shards["model"], optim_state_dict=shards["optimizer"])


def first_failure(error):  # what went wrong first, on the first process it went wrong on
    return next(iter(error.failures.values()))[0]
