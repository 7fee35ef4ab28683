"""Calibration pass: routing statistics of an MoE on task data.

One forward pass over a bounded number of task examples (the training split: scoring never sees
validation data), recording per MoE layer, over non-padding tokens only:

* ``counts[e]``: top-k assignments of tokens to expert e (frequency baseline);
* ``gate_sum[e]``: sum of the gate values of the tokens routed to e (Chen et al. 2022 alpha score);
* ``prob_sum[e]``: sum of softmax gate probabilities over all tokens;
* ``reap_sum[e]``: sum over routed tokens of g_e(x) * ||E_e(x)||_2 (REAP, Lasby et al. 2025);
* ``logits``: a bounded sample of router logit rows (UNCURL clusters the experts by their columns).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from edgeprune.training import Encoded, collate


@dataclass
class LayerStats:
    """Routing statistics of one MoE layer (see the module docstring)."""

    counts: np.ndarray
    gate_sum: np.ndarray
    prob_sum: np.ndarray
    reap_sum: np.ndarray
    tokens: int = 0
    logits: list[np.ndarray] = field(default_factory=list)

    @property
    def usage(self) -> np.ndarray:
        """Share of top-k assignments per expert (sums to 1)."""
        total = self.counts.sum()
        return self.counts / total if total else self.counts.astype(float)

    def logit_matrix(self) -> np.ndarray:
        return np.concatenate(self.logits, axis=0) if self.logits else np.zeros((0, len(self.counts)))

    def summary(self) -> dict:
        return {"tokens": int(self.tokens), "usage": [round(float(u), 4) for u in self.usage],
                "mean_gate": [round(float(g / c), 4) if c else 0.0 for g, c in zip(self.gate_sum, self.counts)]}


def calibration_batches(enc: Encoded, max_examples: int, batch_size: int, desc: str,
                        progress: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """The first ``max_examples`` examples, sorted by length (little padding) and collated without labels."""
    n = min(len(enc), max_examples)
    order = sorted(range(n), key=lambda i: len(enc.input_ids[i]))
    for start in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, unit="batch"):
        batch = collate(enc, order[start : start + batch_size])
        batch.pop("labels")
        yield batch


@torch.no_grad()
def collect_routing(model: torch.nn.Module, enc: Encoded, max_examples: int = 2048, batch_size: int = 64,
                    max_logit_rows: int = 20000, progress: bool = True) -> dict[int, LayerStats]:
    """Run ``model`` over up to ``max_examples`` encoded examples and return :class:`LayerStats` per layer."""
    blocks = model.moe_blocks()
    stats = {i: LayerStats(*(np.zeros(b.num_experts) for _ in range(4))) for i, b in blocks.items()}
    n = min(len(enc), max_examples)
    rows_per_batch = max(1, max_logit_rows * batch_size // max(1, n))
    gen = np.random.default_rng(0)
    model.eval()
    for b in blocks.values():
        b.record_expert_norms = True
    try:
        for batch in calibration_batches(enc, max_examples, batch_size, "calibrate", progress):
            model(**batch)
            keep = batch["attention_mask"].reshape(-1).bool()
            for i, block in blocks.items():
                rec, st = block.last, stats[i]
                z = rec.router_logits.shape[-1]
                logits = rec.router_logits[keep]
                idx, gate, norm = rec.top_idx[keep], rec.top_gate[keep], rec.expert_out_norm[keep]
                st.tokens += int(keep.sum())
                st.counts += np.bincount(idx.reshape(-1).numpy(), minlength=z)
                st.gate_sum += np.bincount(idx.reshape(-1).numpy(), weights=gate.reshape(-1).double().numpy(), minlength=z)
                st.reap_sum += np.bincount(idx.reshape(-1).numpy(), weights=(gate * norm).reshape(-1).double().numpy(),
                                           minlength=z)
                st.prob_sum += logits.softmax(-1).sum(0).double().numpy()
                take = gen.choice(logits.shape[0], size=min(rows_per_batch, logits.shape[0]), replace=False)
                st.logits.append(logits[torch.from_numpy(np.sort(take))].numpy())
    finally:
        for b in blocks.values():
            b.record_expert_norms = False
    return stats
