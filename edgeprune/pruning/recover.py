"""Recovery fine-tuning after pruning (a bounded number of steps, optionally distilled from the original's
logits) and UNCURL's router-only training after merging."""
from __future__ import annotations

from typing import Optional

import torch

from edgeprune.tasks.encoding import Encoded

from edgeprune.training.loop import TrainConfig, train


def train_router(model: torch.nn.Module, enc: Encoded, steps: int, teacher: Optional[torch.nn.Module] = None,
                 max_length: int = 128, progress: bool = True, seed: int = 0, adapter=None) -> dict:
    """UNCURL step 5: re-initialise every router (N(0, initializer_range)) and train only the routers."""
    from edgeprune.models.registry import adapter_for

    adapter = adapter or adapter_for(model.config)
    blocks = adapter.blocks(model)
    if all(adapter.num_experts(b) == 1 for b in blocks.values()) or steps <= 0:
        return {"steps": 0}
    torch.manual_seed(seed)
    for b in blocks.values():
        torch.nn.init.normal_(adapter.router(b).weight, std=model.config.initializer_range)
    cfg = TrainConfig(max_steps=steps, learning_rate=1e-3, only_router=True, warmup_ratio=0.0,
                      distill_alpha=0.5 if teacher is not None else 0.0, seed=seed, max_length=max_length)
    return train(model, enc, cfg, teacher=teacher, desc="uncurl router", progress=progress)


def recover(model: torch.nn.Module, enc: Encoded, steps: int, teacher: Optional[torch.nn.Module] = None,
            distill_alpha: float = 0.5, learning_rate: float = 5e-5, max_length: int = 128,
            progress: bool = True, seed: int = 0, on_step=None, desc: str = "recover", fsdp: bool = False,
            device: str = "cpu", mode: str = "full") -> dict:
    """Fine-tune the pruned model for ``steps`` steps; with a teacher, distil from its logits (weight
    ``distill_alpha``, temperature 2); under torchrun data-parallel (DDP), or sharded with ``fsdp``
    (:mod:`edgeprune.scale.fsdp`).

    ``mode="router"``: only the routers (and the gates the adapter names as router keys) train, at 1e-3, everything
    else frozen: router-only recovery after pruning or merging (arXiv 2603.02217 and 2606.03391 report that
    re-fitting the router to the remaining experts recovers most of the loss; unlike UNCURL the router is not
    re-initialised). A model with no router left (k = 1, folded) has nothing to train: 0 steps."""
    if steps <= 0:
        return {"steps": 0, "seconds": 0.0}
    router = mode == "router"
    if router:
        from edgeprune.training.loop import router_parameter_names

        if not router_parameter_names(model):
            return {"steps": 0, "seconds": 0.0, "mode": mode, "note": "no router left to train"}
    cfg = TrainConfig(max_steps=steps, learning_rate=1e-3 if router else learning_rate, seed=seed,
                      max_length=max_length, distill_alpha=distill_alpha if teacher is not None else 0.0, fsdp=fsdp,
                      device=device, only_router=router, warmup_ratio=0.0 if router else 0.06)
    run = train(model, enc, cfg, teacher=teacher, on_step=on_step, desc=f"{desc} ({mode})" if router else desc,
                progress=progress)
    return dict(run, mode=mode)
