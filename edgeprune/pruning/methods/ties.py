"""TIES-Merging of aligned experts: Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models"
(NeurIPS 2023, arXiv 2306.01708), applied within groups of experts formed as M-SMoE forms them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from edgeprune.pruning.methods import register, usage_scores
from edgeprune.pruning.methods.m_smoe import MSmoe


@dataclass(frozen=True)
class Ties(MSmoe):
    """Groups as M-SMoE (the k most used experts lead, the others join the leader with the most similar router
    logits), members aligned to the leader by a permutation of hidden units; then TIES with the leader as the base
    (experts share no pretrained base in general): task vectors tau_e = W_e - W_lead, each trimmed to its 20% largest
    magnitudes, one sign elected per entry (sign of sum_e f_e tau_e), the f-weighted mean of the agreeing entries
    added to the leader scaled by the other members' usage share (:func:`edgeprune.pruning.merge.ties_merge`)."""

    name: ClassVar[str] = "ties"
    merge_rule: ClassVar[str] = "ties"


register(Ties)(usage_scores)
