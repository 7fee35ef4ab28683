"""Progressive and eager expert dropping during fine-tuning, Chen et al. 2022, "Task-Specific Expert Pruning
for Sparse Mixture-of-Experts" (arXiv 2206.00277), section 3.

Proficiency (alpha score) of expert e in a window of fine-tuning steps: the sum of the router gate values
g_e(x) of the tokens routed to e, normalised over the experts still alive: a_e = A_e / sum_{j alive} A_j.
Progressive: at the end of each window of ``window`` steps, experts with a_e < beta / Z_alive are dropped
for good (no tokens, no gradient: the router logit is masked to -inf), never below ``min_experts``.
Eager: at ``eager_at`` (default the middle of fine-tuning) each layer keeps only its top expert, which is
trained alone for the second half: the layer is then a dense FFN.

Here the dropping runs while fine-tuning the original further (it doubles as recovery), starting from the
task-fine-tuned original rather than the pretrained MoE, to fit the CPU budget; the alive experts at the
end become a :class:`~edgeprune.pruning.plan.PrunePlan` that :func:`~edgeprune.pruning.apply.apply_plan`
turns into the physically pruned (or folded) model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from edgeprune.pruning.plan import LayerPlan, PrunePlan


@dataclass
class ProgressiveDropper:
    """``on_step`` callback for :func:`edgeprune.training.loop.train` implementing Chen et al.'s dropping."""

    model: torch.nn.Module
    max_steps: int
    window: int = 50
    beta: float = 0.5
    min_experts: int = 1
    eager: bool = False
    eager_at: Optional[int] = None
    adapter: Optional[object] = None  # the model's family (looked up when not given)

    def __post_init__(self):
        from edgeprune.models.registry import adapter_for

        self.blocks = (self.adapter or adapter_for(self.model.config)).blocks(self.model)
        self.alpha = {i: np.zeros(b.num_experts) for i, b in self.blocks.items()}
        self.total = {i: np.zeros(b.num_experts) for i, b in self.blocks.items()}
        self.history: list[dict] = []
        if self.eager and self.eager_at is None:
            self.eager_at = self.max_steps // 2

    def __call__(self, step: int, model: torch.nn.Module, batch: dict) -> None:
        keep = batch["attention_mask"].reshape(-1).bool()
        for i, block in self.blocks.items():
            rec = block.last
            idx = rec.top_idx[keep].reshape(-1).numpy()
            gate = rec.top_gate[keep].detach().reshape(-1).double().numpy()
            a = np.bincount(idx, weights=gate, minlength=block.num_experts)
            self.alpha[i] += a
            self.total[i] += a
        if self.eager and step + 1 == self.eager_at:
            for i, block in self.blocks.items():
                score = np.where(block.alive.numpy(), self.total[i], -np.inf)
                block.alive.zero_()
                block.alive[int(score.argmax())] = True
            self._log(step, "eager")
        elif not self.eager and (step + 1) % self.window == 0:
            for i, block in self.blocks.items():
                alive = block.alive.numpy().copy()
                z_alive = int(alive.sum())
                if z_alive <= self.min_experts:
                    continue
                a = self.alpha[i] * alive
                a = a / a.sum() if a.sum() > 0 else np.full_like(a, 1.0 / z_alive) * alive
                drop = alive & (a < self.beta / z_alive)
                order = np.argsort(a + np.where(alive, 0, np.inf))  # weakest alive first
                budget = z_alive - self.min_experts
                for e in order:
                    if budget == 0:
                        break
                    if drop[e]:
                        block.alive[int(e)] = False
                        budget -= 1
            self._log(step, "window")
        if (step + 1) % self.window == 0:
            self.alpha = {i: np.zeros_like(a) for i, a in self.alpha.items()}

    def _log(self, step: int, kind: str) -> None:
        self.history.append({"step": step + 1, "event": kind,
                             "alive": {str(i): int(b.alive.sum()) for i, b in self.blocks.items()}})

    def plan(self, method: str, **meta) -> PrunePlan:
        """The alive experts as a plan (scores = alpha accumulated over the whole run)."""
        layers = [LayerPlan(i, b.num_experts, [round(float(x), 4) for x in self.total[i]],
                            [[(int(e), 1.0)] for e in np.flatnonzero(b.alive.numpy())])
                  for i, b in self.blocks.items()]
        return PrunePlan(method, layers, options={"window": self.window, "beta": self.beta, "eager": self.eager,
                                                  "history": self.history}, **meta)

    def reset(self) -> None:
        for b in self.blocks.values():
            b.alive.fill_(True)


def top_alive(plan: PrunePlan, k: Optional[int]) -> PrunePlan:
    """Chen et al.'s threshold may leave more than k alive: keep the k with the largest alpha."""
    if k is None:
        return plan
    for lp in plan.layers:
        if lp.k > k:
            alive = [g[0][0] for g in lp.groups]
            best = sorted(alive, key=lambda e: -lp.scores[e])[:k]
            lp.groups = [[(e, 1.0)] for e in sorted(best)]
    return plan
