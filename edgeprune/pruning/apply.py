"""Applying a prune plan to a model of any registered family, and folding the router away at k = 1.

After pruning, a layer keeps the kept experts and every per-expert router parameter keeps only their rows
(weight, bias, score-correction bias), so the family's own routing rule runs unchanged over the kept experts:
a pruned model equals the original whose router logits for the dropped experts are -inf. The config's expert
count becomes k and its top-k min(top-k, k); the model is saved as the same family class. With top-1
(Switch) routing the renormalised gate grows; the plan's ``output_scale``
(:func:`edgeprune.pruning.plan.gate_output_scale`) is multiplied into the experts' output projections to undo
it. A merged group (UNCURL) gets the merged weights and the usage-weighted average of its members' router
parameters (UNCURL then re-initialises the router and trains it alone: :func:`edgeprune.pruning.recover.train_router`).

At k = 1 everywhere the weight of the one expert is exactly 1: the model folds into its family's dense sibling
(:meth:`~edgeprune.models.adapter.MoEAdapter.fold`: BERT-MoE -> BERT, Mixtral -> Mistral, Qwen3-MoE -> Qwen3),
or, for a family without one, stays its own class with one expert per layer.
"""
from __future__ import annotations

import torch

from edgeprune.models.adapter import clone_model, scale_outputs
from edgeprune.models.registry import adapter_for
from edgeprune.pruning import padding
from edgeprune.pruning.merge import merge_experts
from edgeprune.pruning.plan import PrunePlan, group_mixing, validate_plan


def apply_plan(model: torch.nn.Module, plan: PrunePlan, fold: bool = True, adapter=None) -> torch.nn.Module:
    """A new model with the plan's experts per layer (the input model is not modified).

    With ``fold`` and k = 1 in every layer, the result is the family's dense sibling where one exists.
    ``adapter``: the model's family where the caller resolved it (else looked up)."""
    adapter = adapter or adapter_for(model.config)
    validate_plan(plan, model, adapter)
    by_layer = {lp.layer: lp for lp in plan.layers}
    paths = adapter.block_paths(model)
    for layer, lp in by_layer.items():
        adapter.check_k(model.get_submodule(paths[layer]), lp.k)
    config = model.config.__class__.from_dict(model.config.to_dict())
    # the expert count lives in the text model's config (a multimodal checkpoint's text_config; else the config);
    # a per-layer k the family cannot store is padded to the largest
    padded = padding.resize_config(adapter, model, config.get_text_config(), {l: lp.k for l, lp in by_layer.items()})
    new = clone_model(model, config)
    src, dst = model.state_dict(), new.state_dict()
    for key in dst:  # everything whose shape did not change (experts and router rows are rewritten below)
        if key in src and src[key].shape == dst[key].shape:
            dst[key] = src[key].clone()
    for layer, lp in by_layer.items():
        keys = adapter.router_keys(model, layer)
        plan_layer(adapter, src, dst, paths[layer], lp, keys, plan.merge_rule)
        if padded:
            padding.pad_layer(adapter, model, dst, paths[layer], layer, keys, lp.k, padded[layer])
    new.load_state_dict(dst)
    new.eval()
    if fold and plan.folds:
        return fold_to_dense(new, adapter)
    return new


def plan_layer(adapter, src, dst, path: str, lp, router_keys: list[str], rule: str = "average") -> None:
    """Write the kept (or merged) experts and router rows of one layer into ``dst``, the pruned model's state.

    ``src`` is the original's state: a dict, or a lazy checkpoint (:mod:`edgeprune.pruning.stream`), of which only
    the kept experts' tensors are read. Fused 3-D expert tensors are written into ``dst``'s tensor in place."""
    for j, group in enumerate(lp.groups):
        experts = [adapter.expert_tensors(src, path, e) for e, _ in group]
        merged = merge_experts(experts, [w for _, w in group], adapter.expert_roles, rule)
        adapter.set_expert_tensors(dst, path, j, scale_outputs(adapter, merged, lp.output_scale))
    for key in router_keys:
        rows = src[key]
        mix = torch.from_numpy(group_mixing(lp.groups, rows.shape[0])).to(torch.float64)
        dst[key] = (mix.T @ rows.double().reshape(rows.shape[0], -1)).reshape(len(lp.groups), *rows.shape[1:]).to(rows.dtype)
    adapter.prune_layer_state(src, dst, path, lp)


def fold_to_dense(model: torch.nn.Module, adapter=None) -> torch.nn.Module:
    """The dense sibling equal to ``model`` whose every MoE layer has one expert; a family without a sibling
    keeps its class (one expert per layer, router skipped in export)."""
    adapter = adapter or adapter_for(model.config)
    if any(adapter.num_experts(b) != 1 for b in adapter.blocks(model).values()):
        raise ValueError("fold_to_dense needs exactly one expert in every MoE layer")
    dense = adapter.fold(model)
    return dense if dense is not None else model
