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
* ``logits``: a bounded sample of router logit rows (UNCURL clusters the experts by their columns);
* ``out_sum[e]``, when a method asks (``output_rows``; HC-SMoE clusters the experts by these mean outputs): sum of
  E_e(x) over a small seeded sample of tokens (``OUTPUT_ROWS`` per batch), every expert on the same tokens whether
  routed there or not.

Family-agnostic: the block's input is captured by a forward pre-hook, the router logits are computed from it
with the routing (top-k indices and weights) exactly as the family computes it, by the family's adapter
(:meth:`~edgeprune.models.adapter.MoEAdapter.routing`: the router's own forward for transformers 5's families); REAP's expert output norms come from the
adapter's :meth:`~edgeprune.models.adapter.MoEAdapter.expert_forward` on the routed tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from edgeprune.models.registry import adapter_for
from edgeprune.tasks.encoding import Encoded, collate, model_inputs


@dataclass
class LayerStats:
    """Routing statistics of one MoE layer (see the module docstring)."""

    counts: np.ndarray
    gate_sum: np.ndarray
    prob_sum: np.ndarray
    reap_sum: np.ndarray
    tokens: int = 0
    logits: list[np.ndarray] = field(default_factory=list)
    companions: dict[str, np.ndarray] = field(default_factory=dict)  # name -> routing mass per expert
    out_sum: Optional[np.ndarray] = None  # (experts, hidden): every expert's output summed over out_rows tokens
    out_rows: int = 0

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
    return mask if rows == mask.numel() else torch.ones(rows, dtype=torch.bool, device=mask.device)


@dataclass
class BatchStats:
    """One batch's contribution to one layer's :class:`LayerStats` (kept apart so that contributions computed
    in another order, layer by layer or by several processes, add up in batch order: the same float sums)."""

    counts: np.ndarray
    gate_sum: np.ndarray
    prob_sum: np.ndarray
    reap_sum: np.ndarray
    tokens: int
    logits: np.ndarray
    companions: dict[str, np.ndarray] = field(default_factory=dict)
    out_sum: Optional[np.ndarray] = None
    out_rows: int = 0


OUTPUT_ROWS = 32  # tokens per batch on which every expert runs (HC-SMoE's mean outputs)


@torch.no_grad()
def batch_stats(adapter, block: torch.nn.Module, x: torch.Tensor, layer: int, batch_index: int,
                logit_rows: int, extras: Optional[dict] = None, output_rows: int = 0) -> BatchStats:
    """The routing statistics of ``block`` on the real tokens ``x`` (rows, hidden) of one batch; ``extras``: the
    per-token values of the adapter's ``routing_kwargs`` (DeepSeek-V4's input ids).

    The sampled logit rows are drawn with a generator seeded by (layer, batch): the sample does not depend on
    the order in which layers and batches are visited."""
    logits, idx, gate = adapter.routing(block, x, **(extras or {}))
    norm = torch.zeros_like(gate)
    for e in idx.unique().tolist():
        tok, slot = (idx == e).nonzero(as_tuple=True)
        norm[tok, slot] = adapter.expert_forward(block, e, x[tok]).float().norm(dim=-1)
    z = adapter.num_experts(block)
    logits, idx, gate, norm = logits.cpu(), idx.cpu(), gate.cpu(), norm.cpu()
    flat_idx = idx.reshape(-1).numpy()
    reap_gate = gate / gate.sum(dim=-1, keepdim=True) if gate.shape[-1] > 1 else gate
    take = np.random.default_rng([layer, batch_index]).choice(logits.shape[0], size=min(logit_rows, logits.shape[0]),
                                                               replace=False)
    sample = x[torch.from_numpy(np.sort(take[:output_rows])).to(x.device)]
    out_sum = np.stack([adapter.expert_forward(block, e, sample).double().sum(0).cpu().numpy() for e in range(z)]) \
        if output_rows else None
    return BatchStats(
        counts=np.bincount(flat_idx, minlength=z).astype(np.float64),
        gate_sum=np.bincount(flat_idx, weights=gate.reshape(-1).double().numpy(), minlength=z),
        prob_sum=logits.softmax(-1).sum(0).double().numpy(),
        reap_sum=np.bincount(flat_idx, weights=(reap_gate * norm).reshape(-1).double().numpy(), minlength=z),
        tokens=int(x.shape[0]),
        logits=logits[torch.from_numpy(np.sort(take))].numpy(), out_sum=out_sum, out_rows=int(sample.shape[0]))


def empty_stats(adapter, blocks: dict[int, torch.nn.Module]) -> dict[int, LayerStats]:
    return {i: LayerStats(*(np.zeros(adapter.num_experts(b)) for _ in range(4))) for i, b in blocks.items()}


def add_in_order(stats: dict[int, LayerStats], parts: dict[tuple[int, int], BatchStats]) -> dict[int, LayerStats]:
    """Add the contributions ``(layer, batch) -> BatchStats`` into ``stats``, each layer's in batch order."""
    for layer, batch in sorted(parts):
        st, p = stats[layer], parts[(layer, batch)]
        st.tokens += p.tokens
        st.counts += p.counts
        st.gate_sum += p.gate_sum
        st.reap_sum += p.reap_sum
        st.prob_sum += p.prob_sum
        st.logits.append(p.logits)
        if p.out_sum is not None:
            st.out_sum = p.out_sum.copy() if st.out_sum is None else st.out_sum + p.out_sum
            st.out_rows += p.out_rows
        for name, mass in p.companions.items():
            st.companions[name] = st.companions.get(name, 0) + mass
    return stats


def capture_input(seen: dict, key, extras: tuple[str, ...] = ()):
    """A forward pre-hook that keeps a block's input, flattened to (tokens, hidden), in the list ``seen[key]``: one
    entry per call, so a layer that runs several times in one forward (Inkling 2 Loop's looped layers) counts the
    tokens of every pass (:func:`routed_tokens`). ``extras``: keyword arguments of the call kept per token as well,
    in ``seen[(key, name)]`` (an adapter's ``routing_kwargs``)."""
    def pre(_m, args, kwargs):
        hidden = args[0] if args else next(iter(kwargs.values()))
        seen.setdefault(key, []).append(hidden.detach().reshape(-1, hidden.shape[-1]))
        for name in extras:
            value = kwargs.get(name)
            if value is not None:
                seen.setdefault((key, name), []).append(value.detach().reshape(-1, 1))
    return pre


def block_stats(adapter, block, seen: dict, layer: int, batch_index: int, mask: torch.Tensor,
                logit_rows: int, output_rows: int = 0) -> BatchStats:
    """:func:`batch_stats` of what :func:`capture_input` kept for ``layer`` in one batch (its real tokens)."""
    extras = {n: routed_tokens(seen.pop((layer, n)), mask).reshape(-1) for n in adapter.routing_kwargs
              if (layer, n) in seen}
    return batch_stats(adapter, block, routed_tokens(seen.pop(layer), mask), layer, batch_index, logit_rows, extras,
                       output_rows)


def capture_output(seen: dict, key):
    """A forward hook that keeps a module's output (a companion router's logits) as :func:`capture_input` does."""
    def post(_m, _args, out):
        seen.setdefault(key, []).append(out.detach().reshape(-1, out.shape[-1]))
    return post


def routing_mass(route, logits: torch.Tensor) -> np.ndarray:
    """sum_t w_e(x_t) per expert over the tokens' router ``logits`` (T, Z), ``route`` giving (top-k index, weight)."""
    idx, weight = (t.cpu() for t in route(logits.float()))
    return np.bincount(idx.reshape(-1).numpy(), weights=weight.reshape(-1).double().numpy(),
                       minlength=logits.shape[-1])


def routed_tokens(calls: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """The real (non-padding) tokens of every call of one block in one batch, as one (tokens, hidden) tensor."""
    return torch.cat([x[real_tokens(mask, x.shape[0])] for x in calls])


def logit_rows_per_batch(max_logit_rows: int, batch_size: int, n: int) -> int:
    return max(1, max_logit_rows * batch_size // max(1, n))


@torch.no_grad()
def collect_routing(model: torch.nn.Module, enc: Encoded, max_examples: int = 2048, batch_size: int = 64,
                    max_logit_rows: int = 20000, progress: bool = True, adapter=None,
                    device: str = "cpu", output_rows: int = 0) -> dict[int, LayerStats]:
    """Run ``model`` over up to ``max_examples`` encoded examples and return :class:`LayerStats` per layer.

    ``device`` (:mod:`edgeprune.scale.device`): the model and its batches go there for the pass and the model comes
    back; the statistics are the CPU's numpy arrays wherever the pass ran.

    Under ``torchrun`` each process takes every world-size-th batch and the contributions are gathered and added
    in batch order (:mod:`edgeprune.scale.distributed`): the same statistics as one process."""
    from edgeprune.scale.device import borrowed, to
    from edgeprune.scale import distributed

    adapter = adapter or adapter_for(model.config)
    blocks = adapter.blocks(model)
    n = min(len(enc), max_examples)
    rows = logit_rows_per_batch(max_logit_rows, batch_size, n)
    seen: dict[int, list[torch.Tensor]] = {}
    handles = [adapter.routing_input(b).register_forward_pre_hook(capture_input(seen, i, adapter.routing_kwargs),
                                                                  with_kwargs=True) for i, b in blocks.items()]
    companions = {i: adapter.companions(model, p) for i, p in adapter.block_paths(model).items()}
    logits_seen: dict[tuple[int, str], list[torch.Tensor]] = {}
    handles += [router.register_forward_hook(capture_output(logits_seen, (i, name)))
                for i, cs in companions.items() for name, (router, _) in cs.items()]
    model.eval()
    parts: dict[tuple[int, int], BatchStats] = {}
    try:
        with borrowed(device, model) as dev:
            for b, batch in distributed.my_batches(calibration_batches(enc, max_examples, batch_size, "calibrate",
                                                                       progress)):
                model(**model_inputs(model, to(batch, dev)))
                mask = batch["attention_mask"].reshape(-1).bool().to(dev)
                for i, block in blocks.items():
                    parts[(i, b)] = block_stats(adapter, block, seen, i, b, mask, rows, output_rows)
                    parts[(i, b)].companions = {
                        name: routing_mass(route, routed_tokens(logits_seen.pop((i, name)), mask))
                        for name, (_, route) in companions[i].items()}
    finally:
        for h in handles:
            h.remove()
    return add_in_order(empty_stats(adapter, blocks), distributed.gather_parts(parts))
