"""REAP, Lasby et al. 2025, "REAP: Router-weighted Expert Activation Pruning" (arXiv 2510.13999)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from edgeprune.pruning.methods import MethodConfig, register


@dataclass(frozen=True)
class Reap(MethodConfig):
    """REAP, Lasby et al. 2025 (arXiv 2510.13999): S_j = mean over tokens routed to j of
    g_j(x) * ||E_j(x)||_2; prune the lowest."""

    name: ClassVar[str] = "reap"


@register(Reap)
def score(cfg: Reap, model, stats, **_):
    import numpy as np

    return {i: np.divide(s.reap_sum, s.counts, out=np.zeros_like(s.reap_sum), where=s.counts > 0)
            for i, s in stats.items()}
