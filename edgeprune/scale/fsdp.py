"""Sharded recovery fine-tuning under ``torchrun`` (``--fsdp``): PyTorch's FSDP2 (``fully_shard``) on CPUs.

DDP keeps the whole model, its gradients and AdamW's two moments in every process: 16 bytes a parameter in fp32,
so a 7B fold (Mixtral-8x7B at k = 1) needs ~112 GB for its recovery in each process. FSDP shards all of that over
the W processes (Zhao et al. 2023, "PyTorch FSDP"): every transformer layer (the model's ``_no_split_modules``, the
unit accelerate's transformer auto-wrap policy uses too) and the root are ``fully_shard``-ed, so each process holds
1/W of the parameters, gradients and optimizer state, and gathers one layer's parameters at a time for its
forward and backward; gradients are reduce-scattered (averaged over the processes as DDP averages them). The
same global batches give the same weights as one process (tested: the checkpoint equals the DDP one).

Why not accelerate's FSDP plugin: accelerate 1.15 refuses to start FSDP without an accelerator ("There are
currently no available devices found, must be one of 'XPU', 'CUDA', ..."), while PyTorch's ``fully_shard`` runs
on CPU tensors over gloo. What is not sharded here: each process reads the pruned checkpoint whole before sharding
it (the sharded copy shares its tensors, which are then freed: one whole copy at the peak, not two), and the
distillation teacher, when there is one, is whole in every process.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def layer_classes(model: nn.Module) -> set[str]:
    names = set(getattr(model, "_no_split_modules", None) or [])
    if not names:
        raise ValueError(f"{type(model).__name__} names no transformer layer class (_no_split_modules) to shard by")
    return names


def shard(model: nn.Module) -> nn.Module:
    """A sharded copy of ``model`` to train (every layer, then the root); ``model``'s own parameters are freed
    until :func:`gather_into` fills them again."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    names = layer_classes(model)
    # the copy shares model's parameter tensors (no second copy of the weights); fully_shard replaces the copy's
    # with its shards, and model's are freed below
    net = copy.deepcopy(model, memo={id(t): t for t in [*model.parameters(), *model.buffers()]})
    mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (dist.get_world_size(),))
    for module in list(net.modules()):
        if type(module).__name__ in names:
            fully_shard(module, mesh=mesh)
    fully_shard(net, mesh=mesh)
    for p in model.parameters():
        p.data = torch.empty(0, dtype=p.dtype)
    return net


def gather_into(net: nn.Module, model: nn.Module) -> None:
    """The trained full weights (a collective call: every process) into rank 0's ``model``."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        for name, p in model.named_parameters():
            p.data = full[name].to(p.dtype)
