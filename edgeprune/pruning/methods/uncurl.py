"""UNCURL, Sarkar et al. 2024, "Revisiting SMoE Language Models by Evaluating Inefficiencies with Task Specific
Expert Pruning" (arXiv 2409.01483): cluster the experts by their router logits on task data and merge each cluster."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from edgeprune.pruning.methods import MethodConfig, MethodOption, register, usage_scores


@dataclass(frozen=True)
class Uncurl(MethodConfig):
    """Per layer from Z experts to D: router logits H on task data; S_ij = cosine(H_:,i, H_:,j), S = (1 + S) / 2;
    spectral clustering of S into D clusters (:func:`edgeprune.pruning.merge.uncurl_clusters`); in each cluster
    the most used expert is the reference, the others are aligned to it by a permutation of hidden units
    (Hungarian matching of W_in and W_out) and merged by a usage-weighted average; the router is re-initialised
    with D outputs and only it is trained for ``router_steps`` (:meth:`after_apply`), then recovery as usual."""

    name: ClassVar[str] = "uncurl"
    merges: ClassVar[bool] = True
    options: ClassVar[tuple[MethodOption, ...]] = (
        MethodOption("--router-steps", "router_steps", int, "uncurl: router-only training steps after merging "
                                                            "[default: 50]."),)
    router_steps: int = 50
    seed: int = 0

    def clusters(self, stats, k: int):
        from edgeprune.pruning.merge import uncurl_clusters

        return uncurl_clusters(stats, k, seed=self.seed)

    def needs_after_apply(self, plan) -> bool:
        return not plan.folds  # at k = 1 there is no router left to train

    def after_apply(self, pruned, plan, train_enc, teacher, prune, task, progress: bool,
                    adapter=None) -> Optional[dict]:
        if not self.needs_after_apply(plan):
            return None
        from edgeprune.pruning.recover import train_router

        return train_router(pruned, train_enc, self.router_steps, teacher=teacher, max_length=task.max_length,
                            progress=progress, adapter=adapter)


register(Uncurl)(usage_scores)
