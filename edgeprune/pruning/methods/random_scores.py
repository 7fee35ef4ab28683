"""Seeded random expert scores: the baseline every prune table includes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from edgeprune.pruning.methods import MethodConfig, register


@dataclass(frozen=True)
class Random(MethodConfig):
    """Seeded random scores (``--seed``): the baseline every table includes."""

    name: ClassVar[str] = "random"
    needs_calibration: ClassVar[bool] = False
    seed: int = 0


@register(Random)
def score(cfg: Random, model, stats, adapter, **_):
    import numpy as np

    rng = np.random.default_rng(cfg.seed)
    return {i: rng.random(adapter.num_experts(b)) for i, b in adapter.blocks(model).items()}
