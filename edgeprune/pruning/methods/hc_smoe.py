"""HC-SMoE, Chen et al. 2025, "Retraining-Free Merging of Sparse Mixture-of-Experts via Hierarchical Clustering"
(ICML 2025, arXiv 2410.08589): group the experts by what they compute, not by how they are routed."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from edgeprune.pruning.methods import MethodConfig, register, usage_scores


@dataclass(frozen=True)
class HcSmoe(MethodConfig):
    """Per layer from Z experts to k: every expert's mean output o_e = mean_x E_e(x) over the same calibration
    tokens (routed there or not); agglomerative clustering of {o_e} with average linkage on Euclidean distance, the
    tree cut into k clusters (:func:`edgeprune.pruning.merge.hc_clusters`); each cluster merged by the
    frequency-weighted average of its experts' parameters, W = sum_e f_e W_e / sum_e f_e (no permutation: the
    paper's default merge). No retraining of the router: the group's router row is the weighted mean of its
    members' rows, as for every merge."""

    name: ClassVar[str] = "hc-smoe"
    merges: ClassVar[bool] = True
    merge_rule: ClassVar[str] = "average-unaligned"
    expert_outputs: ClassVar[bool] = True

    def clusters(self, stats, k: int):
        from edgeprune.pruning.merge import hc_clusters

        return hc_clusters(stats, k)


register(HcSmoe)(usage_scores)
