"""Expert-scoring methods: each is a frozen config object plus a registered handler (torchao's
``quantize_(model, Config())`` pattern). A handler returns, per MoE layer, one score per expert (higher =
keep) or, for merging methods, the clusters to merge.

Add a method: write a config dataclass with a unique ``name``, a handler decorated with
``@register(YourConfig)``; the CLI, the plan and the benchmark scripts pick it up from :data:`METHODS`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, ClassVar, Optional

import numpy as np
import torch
from safetensors.torch import load_file

from edgeprune.errors import ConfigError, ModelError
from edgeprune.models.registry import adapter_for
from edgeprune.pruning.calibration import LayerStats


@dataclass(frozen=True)
class MethodConfig:
    """Base of all method configs. ``needs_calibration``: whether task data must be run through the model."""

    name: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = True
    merges: ClassVar[bool] = False


@dataclass(frozen=True)
class Frequency(MethodConfig):
    """Baseline: keep the experts with the most top-k assignments of task tokens."""

    name: ClassVar[str] = "frequency"


@dataclass(frozen=True)
class Chen2022(MethodConfig):
    """Chen et al. 2022, "Task-Specific Expert Pruning for Sparse Mixture-of-Experts" (arXiv 2206.00277).

    Proficiency ("alpha score") of expert e: alpha_e = sum over tokens routed to e of the gate value
    g_e(x), normalised over the experts: alpha_e / sum_j alpha_j. One-shot form, accumulated over the
    calibration pass; the progressive form (windows during fine-tuning, beta / Z_alive threshold, eager
    variant) is :mod:`edgeprune.pruning.progressive`.
    """

    name: ClassVar[str] = "chen2022"


@dataclass(frozen=True)
class Chowdhury2024(MethodConfig):
    """Chowdhury et al. 2024, "A Provably Effective Method for Pruning Experts in Fine-tuned Sparse MoE"
    (ICML 2024, arXiv 2405.16646): delta_s = ||w_s(fine-tuned)||_2 - ||w_s(pretrained)||_2 for router row
    s (difference of norms, as in their code); keep the largest delta per layer. No task data needed, but
    the pretrained MoE's router is: ``pretrained`` is its checkpoint directory (default: the one recorded
    with the original)."""

    name: ClassVar[str] = "chowdhury2024"
    needs_calibration: ClassVar[bool] = False
    pretrained: Optional[str] = None


@dataclass(frozen=True)
class Reap(MethodConfig):
    """REAP, Lasby et al. 2025 (arXiv 2510.13999): S_j = mean over tokens routed to j of
    g_j(x) * ||E_j(x)||_2; prune the lowest."""

    name: ClassVar[str] = "reap"


@dataclass(frozen=True)
class Random(MethodConfig):
    """Seeded random scores: the baseline every table includes."""

    name: ClassVar[str] = "random"
    needs_calibration: ClassVar[bool] = False
    seed: int = 0


@dataclass(frozen=True)
class Uncurl(MethodConfig):
    """UNCURL, Sarkar et al. 2024 (arXiv 2409.01483), per layer from Z experts to D:
    router logits H on task data; S_ij = cosine(H_:,i, H_:,j), S = (1 + S) / 2; spectral clustering of S
    into D clusters; in each cluster the most used expert is the reference, the others are aligned to it by
    a permutation of hidden units (Hungarian matching of W_in and W_out) and merged by a usage-weighted
    average; the router is re-initialised with D outputs and only it is trained for ``router_steps``."""

    name: ClassVar[str] = "uncurl"
    merges: ClassVar[bool] = True
    router_steps: int = 50
    seed: int = 0


METHODS: dict[str, type[MethodConfig]] = {}
Handler = Callable[..., dict[int, np.ndarray]]
_HANDLERS: dict[type[MethodConfig], Handler] = {}


def register(cfg_cls: type[MethodConfig]) -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        METHODS[cfg_cls.name] = cfg_cls
        _HANDLERS[cfg_cls] = fn
        return fn

    return deco


def method_config(name: str, **options) -> MethodConfig:
    """Build the config of method ``name``; unknown names and options are one-line errors."""
    if name not in METHODS:
        raise ConfigError(f"unknown pruning method {name!r}; known: {', '.join(METHODS)}")
    cls = METHODS[name]
    allowed = {f.name for f in fields(cls)}
    bad = sorted(set(options) - allowed)
    if bad:
        raise ConfigError(f"method {name} has no option {bad[0]!r}" + (f" (options: {', '.join(sorted(allowed))})"
                                                                      if allowed else ""))
    return cls(**options)


def score_experts(cfg: MethodConfig, model: torch.nn.Module, stats: Optional[dict[int, LayerStats]],
                  source_dir: Optional[str] = None) -> dict[int, np.ndarray]:
    """Per-layer expert scores (higher = more important) by the handler of ``cfg``."""
    if cfg.needs_calibration and stats is None:
        raise ConfigError(f"method {cfg.name} needs calibration statistics on task data")
    return _HANDLERS[type(cfg)](cfg, model=model, stats=stats, source_dir=source_dir)


@register(Frequency)
def _frequency(cfg: Frequency, model, stats, **_) -> dict[int, np.ndarray]:
    return {i: s.counts.astype(float) for i, s in stats.items()}


@register(Chen2022)
def _chen(cfg: Chen2022, model, stats, **_) -> dict[int, np.ndarray]:
    return {i: s.gate_sum / max(s.gate_sum.sum(), 1e-12) for i, s in stats.items()}


@register(Reap)
def _reap(cfg: Reap, model, stats, **_) -> dict[int, np.ndarray]:
    return {i: np.divide(s.reap_sum, s.counts, out=np.zeros_like(s.reap_sum), where=s.counts > 0)
            for i, s in stats.items()}


@register(Random)
def _random(cfg: Random, model, stats, **_) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(cfg.seed)
    adapter = adapter_for(model.config)
    return {i: rng.random(adapter.num_experts(b)) for i, b in adapter.blocks(model).items()}


@register(Uncurl)
def _uncurl(cfg: Uncurl, model, stats, **_) -> dict[int, np.ndarray]:
    # Scores are the usage; the clusters are made when the plan knows D (see plan.make_plan).
    return {i: s.counts.astype(float) for i, s in stats.items()}


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
def _chowdhury(cfg: Chowdhury2024, model, stats, source_dir=None, **_) -> dict[int, np.ndarray]:
    pre_dir = Path(cfg.pretrained) if cfg.pretrained else pretrained_router_dir(source_dir)
    if pre_dir is None:
        raise ConfigError("chowdhury2024 needs the pretrained MoE's router: pass --pretrained DIR (the checkpoint "
                          "before task fine-tuning)")
    from edgeprune.models.checkpoint import read_config, weight_files

    read_config(pre_dir)
    pre = {}
    for f in weight_files(pre_dir):
        pre.update(load_file(str(f)))
    adapter = adapter_for(model.config)
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
