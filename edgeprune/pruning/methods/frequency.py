"""Frequency (baseline): keep the experts with the most top-k assignments of task tokens."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from edgeprune.pruning.methods import MethodConfig, register


@dataclass(frozen=True)
class Frequency(MethodConfig):
    """Baseline: keep the experts with the most top-k assignments of task tokens (count_e = #{x : e in topk(x)})."""

    name: ClassVar[str] = "frequency"


@register(Frequency)
def score(cfg: Frequency, model, stats, **_):
    return {i: s.counts.astype(float) for i, s in stats.items()}
