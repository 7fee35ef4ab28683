"""Calibration pass: routing statistics of an MoE on task data.

One forward pass over a bounded number of task examples (the training split: scoring never sees
validation data), recording per MoE layer, over non-padding tokens only:

* ``counts[e]``: top-k assignments of tokens to expert e (frequency baseline);
* ``gate_sum[e]``: sum of the gate values of the tokens routed to e (Chen et al. 2022 alpha score);
* ``prob_sum[e]``: sum of softmax gate probabilities over all tokens;
* ``reap_sum[e]``: sum over routed tokens of g_e(x) * ||E_e(x)||_2 (REAP, Lasby et al. 2025), with the top-k
  gates renormalised to sum to one as the REAP authors' corrected code does (families that do not renormalise,
  Qwen3-MoE without ``norm_topk_prob``, DeepSeek's scaled gates, would otherwise weigh tokens unevenly; top-1
  gates stay as routed);
* ``logits``: a bounded sample of router logit rows (UNCURL clusters the experts by their columns).

Family-agnostic: the block's input is captured by a forward pre-hook, the router logits are computed from it
by the family's adapter (:meth:`~edgeprune.models.adapter.MoEAdapter.router_logits`; some routers, DeepSeek's,
return their choice rather than logits), and the routing (top-k indices and weights) from the logits, exactly
as the family computes it (:meth:`~edgeprune.models.adapter.MoEAdapter.route`); REAP's expert output norms come from the
adapter's :meth:`~edgeprune.models.adapter.MoEAdapter.expert_forward` on the routed tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from edgeprune.models.registry import adapter_for
from edgeprune.training import Encoded, collate, model_inputs


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
                        progress: bool = True, labels: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """The first ``max_examples`` examples, sorted by length (little padding) and collated without labels
    (with them when ``labels``: a loss to differentiate, as for head importance)."""
    n = min(len(enc), max_examples)
    order = sorted(range(n), key=lambda i: len(enc.input_ids[i]))
    for start in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, unit="batch"):
        batch = collate(enc, order[start : start + batch_size])
        if not labels:
            batch.pop("labels")
        yield batch


def real_tokens(mask: torch.Tensor, rows: int) -> torch.Tensor:
    """The non-padding rows (bool) of a layer's flattened input: the batch's attention mask, or every row where the
    layer sees other positions than the input tokens (an encoder-decoder's decoder: the label-word step)."""
    return mask if rows == mask.numel() else torch.ones(rows, dtype=torch.bool)


@torch.no_grad()
def collect_routing(model: torch.nn.Module, enc: Encoded, max_examples: int = 2048, batch_size: int = 64,
                    max_logit_rows: int = 20000, progress: bool = True) -> dict[int, LayerStats]:
    """Run ``model`` over up to ``max_examples`` encoded examples and return :class:`LayerStats` per layer."""
    adapter = adapter_for(model.config)
    blocks = adapter.blocks(model)
    stats = {i: LayerStats(*(np.zeros(adapter.num_experts(b)) for _ in range(4))) for i, b in blocks.items()}
    n = min(len(enc), max_examples)
    rows_per_batch = max(1, max_logit_rows * batch_size // max(1, n))
    gen = np.random.default_rng(0)
    seen: dict[int, dict] = {i: {} for i in blocks}

    def on_block(i):
        def pre(_m, args, kwargs):
            hidden = args[0] if args else next(iter(kwargs.values()))
            seen[i]["x"] = hidden.detach().reshape(-1, hidden.shape[-1])
        return pre

    handles = [b.register_forward_pre_hook(on_block(i), with_kwargs=True) for i, b in blocks.items()]
    model.eval()
    try:
        for batch in calibration_batches(enc, max_examples, batch_size, "calibrate", progress):
            model(**model_inputs(model, batch))
            mask = batch["attention_mask"].reshape(-1).bool()
            for i, block in blocks.items():
                st = stats[i]
                keep = real_tokens(mask, seen[i]["x"].shape[0])
                x = seen[i]["x"][keep]
                logits = adapter.router_logits(block, x).float()
                idx, gate = adapter.route(block, logits)
                norm = torch.zeros_like(gate)
                for e in idx.unique().tolist():
                    tok, slot = (idx == e).nonzero(as_tuple=True)
                    norm[tok, slot] = adapter.expert_forward(block, e, x[tok]).float().norm(dim=-1)
                z = len(st.counts)
                flat_idx = idx.reshape(-1).numpy()
                st.tokens += int(keep.sum())
                st.counts += np.bincount(flat_idx, minlength=z)
                st.gate_sum += np.bincount(flat_idx, weights=gate.reshape(-1).double().numpy(), minlength=z)
                reap_gate = gate / gate.sum(dim=-1, keepdim=True) if gate.shape[-1] > 1 else gate
                st.reap_sum += np.bincount(flat_idx, weights=(reap_gate * norm).reshape(-1).double().numpy(),
                                           minlength=z)
                st.prob_sum += logits.softmax(-1).sum(0).double().numpy()
                take = gen.choice(logits.shape[0], size=min(rows_per_batch, logits.shape[0]), replace=False)
                st.logits.append(logits[torch.from_numpy(np.sort(take))].numpy())
    finally:
        for h in handles:
            h.remove()
    return stats
