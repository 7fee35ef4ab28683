"""Chowdhury et al. 2024, "A Provably Effective Method for Pruning Experts in Fine-tuned Sparse Mixture-of-Experts"
(ICML 2024, arXiv 2405.16646): the change of each router row's norm during fine-tuning. No task data needed."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

import click

from edgeprune.errors import ConfigError, ModelError
from edgeprune.pruning.methods import MethodConfig, MethodOption, register


@dataclass(frozen=True)
class Chowdhury2024(MethodConfig):
    """delta_s = ||w_s(fine-tuned)||_2 - ||w_s(pretrained)||_2 for router row s (difference of norms, as in their
    code); keep the largest delta per layer. No task data needed, but the pretrained MoE's router is:
    ``pretrained`` is its checkpoint directory (default: the one recorded with the original)."""

    name: ClassVar[str] = "chowdhury2024"
    needs_calibration: ClassVar[bool] = False
    options: ClassVar[tuple[MethodOption, ...]] = (
        MethodOption("--pretrained", "pretrained", click.Path(file_okay=False), "chowdhury2024: the MoE checkpoint before task fine-tuning "
                                                        "(default: recorded one)."),)
    pretrained: Optional[str] = None


def pretrained_router_dir(source_dir: Optional[str]) -> Optional[Path]:
    """The pretrained MoE recorded with an original built by edgeprune (``edgeprune_original.json``)."""
    if source_dir is None:
        return None
    meta = Path(source_dir) / "edgeprune_original.json"
    if meta.is_file():
        import json

        pre = json.loads(meta.read_text()).get("pretrained_moe")
        return Path(pre) if pre else None
    return None


@register(Chowdhury2024)
def score(cfg: Chowdhury2024, model, stats, adapter, source_dir=None, **_):
    pre_dir = Path(cfg.pretrained) if cfg.pretrained else pretrained_router_dir(source_dir)
    if pre_dir is None:
        raise ConfigError("chowdhury2024 needs the pretrained MoE's router: pass --pretrained DIR (the checkpoint "
                          "before task fine-tuning)")
    from transformers import AutoModel

    from edgeprune.models.checkpoint import load_checked, read_config

    read_config(pre_dir)
    # through from_pretrained: transformers 5 stores some families' experts and routers under other names on disk
    # than in memory (Mixtral's block_sparse_moe) and converts them when it loads
    pre = {k: v.detach() for k, v in load_checked(AutoModel, pre_dir).state_dict().items()}
    out = {}
    for layer, block in adapter.blocks(model).items():
        w_ft = adapter.router(block).weight.detach().float()
        key = [k for k in adapter.router_keys(model, layer) if k.endswith(".weight")][0]
        # a base model's keys lack the task model's prefix (e.g. "bert." or "model."): match by suffix
        cands = [k for k in pre if k == key or key.endswith("." + k) or k.endswith("." + key)]
        if not cands:
            raise ModelError(f"{pre_dir}: no router for layer {layer} ({key}); is it the same model before fine-tuning?")
        w_pre = pre[cands[0]].float()
        if w_pre.shape != w_ft.shape:
            raise ModelError(f"{pre_dir}: router of layer {layer} has shape {tuple(w_pre.shape)}, the fine-tuned "
                             f"one {tuple(w_ft.shape)}; is it the same model before fine-tuning?")
        out[layer] = (w_ft.norm(dim=1) - w_pre.norm(dim=1)).numpy()
    return out
