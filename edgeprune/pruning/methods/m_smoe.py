"""M-SMoE, Li et al. 2024, "Merge, Then Compress: Demystify Efficient SMoE with Hints from Its Routing Policy"
(ICLR 2024, arXiv 2310.01334; MC-SMoE without its low-rank compression step)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from edgeprune.pruning.methods import MethodConfig, register, usage_scores


@dataclass(frozen=True)
class MSmoe(MethodConfig):
    """Per layer from Z experts to k: the k most frequently used experts on the task data are the dominant ones;
    every other expert joins the dominant expert whose router-logit column is the most similar (cosine, mapped to
    [0, 1]: S_ij = (1 + cos(H_:,i, H_:,j)) / 2); in each group the experts are aligned to the dominant one by the
    permutation of hidden units that best matches their weights (Hungarian matching) and merged by the
    frequency-weighted average W = sum_e f_e W_e / sum_e f_e (:func:`edgeprune.pruning.merge.dominant_clusters`)."""

    name: ClassVar[str] = "m-smoe"
    merges: ClassVar[bool] = True
    merge_rule: ClassVar[str] = "average"

    def clusters(self, stats, k: int):
        from edgeprune.pruning.merge import dominant_clusters

        return dominant_clusters(stats, k)


register(MSmoe)(usage_scores)
