"""Do the experts specialise? Expert usage per domain and the Jensen-Shannon divergence between domains.

For each MoE layer and each domain d, u_d is the share of the domain's tokens whose top-1 expert is e (padding
excluded). Two domains routed alike have JS(u_a, u_b) = 0; routed to disjoint experts, JS = ln 2 = 0.693 (natural
log, the divergence, not scipy's distance, which is its square root). The mean over domain pairs per layer is the
figure ``results/originals.md`` reports (Branch-Train-MiX, Sukhbaatar et al. 2024, shows its routing per domain
the same way, as usage shares).
"""
from __future__ import annotations

import itertools

import numpy as np
import torch


def usage_by_domain(body: torch.nn.Module, chunks: dict[str, list[list[int]]], batch_size: int = 32,
                    adapter=None) -> dict[int, dict[str, list[float]]]:
    """``{layer: {domain: usage shares}}`` of a BERT-MoE body (or a model holding one), or of any family's MoE
    (top-1 = the router's largest logit, caught by a hook), on each domain's chunks."""
    from edgeprune.models.registry import adapter_for

    adapter = adapter or adapter_for(body.config)
    blocks = adapter.blocks(body)
    counts = {i: {d: np.zeros(adapter.num_experts(b)) for d in chunks} for i, b in blocks.items()}
    logits: dict[int, torch.Tensor] = {}
    hooks = [] if all(hasattr(b, "last") for b in blocks.values()) else [
        adapter.router(b).register_forward_hook(lambda _m, _a, out, i=i: logits.__setitem__(
            i, (out[0] if isinstance(out, tuple) else out).reshape(-1, adapter.num_experts(blocks[i]))))
        for i, b in blocks.items()]
    body.eval()
    try:
        with torch.no_grad():
            for d, rows in chunks.items():
                for s in range(0, len(rows), batch_size):
                    ids = torch.tensor(rows[s:s + batch_size])
                    body(input_ids=ids, attention_mask=torch.ones_like(ids))
                    for i, b in blocks.items():
                        top = (logits[i].argmax(-1) if hooks else b.last.top_idx[:, 0]).numpy()
                        counts[i][d] += np.bincount(top, minlength=len(counts[i][d]))
    finally:
        for h in hooks:
            h.remove()
    return {i: {d: (c / max(c.sum(), 1)).round(4).tolist() for d, c in per.items()} for i, per in counts.items()}


def js_divergence(p, q) -> float:
    """Jensen-Shannon divergence in nats: 0 for equal distributions, ln 2 for disjoint ones."""
    from scipy.spatial.distance import jensenshannon

    return float(jensenshannon(np.asarray(p, float), np.asarray(q, float)) ** 2)


def mean_pairwise_js(usage: dict[str, list[float]]) -> float:
    """Mean JS divergence over all pairs of domains of one layer."""
    pairs = list(itertools.combinations(usage.values(), 2))
    return float(np.mean([js_divergence(a, b) for a, b in pairs])) if pairs else 0.0


def specialisation(usage: dict[int, dict[str, list[float]]]) -> dict[str, float]:
    """``{layer: mean pairwise JS}`` (string keys, as JSON has them)."""
    return {str(i): round(mean_pairwise_js(u), 4) for i, u in usage.items()}
