"""Applying a prune plan to a model, and folding the router away at k = 1.

After pruning, a layer keeps the kept experts and the router keeps only their rows, so the softmax is
renormalised over the kept experts (top-1: g = softmax over kept; top-k: the k largest renormalised).
With top-1 (Switch) routing that makes the gate, and so the FFN output, grow; the plan's ``output_scale``
(:func:`edgeprune.pruning.plan.gate_output_scale`) is multiplied into the experts' output weights to undo it.
A merged group (UNCURL) gets the merged weights and the usage-weighted average of its members' router
rows (deterministic; UNCURL then re-initialises the router and trains it alone for a few steps:
:func:`edgeprune.pruning.recover.train_router`).

At k = 1 everywhere the renormalised gate is exactly 1: every MoE layer is a plain FFN and the model is
saved as the dense class of the family (``BertForSequenceClassification``), which every exporter supports.
"""
from __future__ import annotations

import copy

import torch

from edgeprune.models.registry import adapter_for
from edgeprune.pruning.merge import merge_experts
from edgeprune.pruning.plan import PrunePlan, group_mixing, validate_plan

EXPERT_KEYS = ("w_in.weight", "w_in.bias", "w_out.weight", "w_out.bias")


def apply_plan(model: torch.nn.Module, plan: PrunePlan, fold: bool = True) -> torch.nn.Module:
    """A new model with the plan's experts per layer (the input model is not modified).

    With ``fold`` and k = 1 in every layer, the result is the dense class of the family.
    """
    validate_plan(plan, model)
    adapter = adapter_for(model.config)
    by_layer = {lp.layer: lp for lp in plan.layers}
    config = copy.deepcopy(model.config)
    config.num_experts_per_layer = [by_layer[i].k for i in config.moe_layers]
    new = adapter.classifier_class(config)
    src = model.state_dict()
    dst = new.state_dict()
    for key in dst:
        if key in src and ".moe." not in key:
            dst[key] = src[key].clone()
    pre = adapter.base_prefix
    for layer, lp in by_layer.items():
        router = src[pre + adapter.router_key(layer)]
        for j, group in enumerate(lp.groups):
            experts = [{k: src[pre + adapter.expert_prefix(layer, e) + k] for k in EXPERT_KEYS} for e, _ in group]
            merged = merge_experts(experts, [w for _, w in group])
            if lp.output_scale != 1.0:
                merged = {k: v * lp.output_scale if k.startswith("w_out") else v for k, v in merged.items()}
            for k, v in merged.items():
                dst[pre + adapter.expert_prefix(layer, j) + k] = v
        mix = torch.from_numpy(group_mixing(lp.groups, router.shape[0])).to(router.dtype)
        dst[pre + adapter.router_key(layer)] = mix.T @ router
    new.load_state_dict(dst)
    new.eval()
    if fold and plan.folds:
        return fold_to_dense(new)
    return new


def fold_to_dense(model: torch.nn.Module) -> torch.nn.Module:
    """The dense model of the family equal to ``model`` whose every MoE layer has one expert (gate = 1)."""
    adapter = adapter_for(model.config)
    blocks = model.moe_blocks()
    if any(b.num_experts != 1 for b in blocks.values()):
        raise ValueError("fold_to_dense needs exactly one expert in every MoE layer")
    moe_keys = ("moe_layers", "num_experts", "num_experts_per_layer", "num_experts_per_tok", "router_aux_loss_coef",
                "router_z_loss_coef", "router_jitter", "model_type", "architectures")
    cfg = {k: v for k, v in model.config.to_dict().items() if k not in moe_keys}
    dense = adapter.dense_classifier_class(adapter.dense_config_class(**cfg))
    src = model.state_dict()
    dst = dense.state_dict()
    pre = adapter.base_prefix
    for key in dst:
        if key in src:
            dst[key] = src[key].clone()
    for layer in blocks:
        for exp_key, dense_key in adapter.ffn_map.items():
            dst[pre + adapter.dense_prefix(layer) + dense_key] = src[pre + adapter.expert_prefix(layer, 0) + exp_key]
    missing = [k for k in dst if k not in src and not any(
        k == pre + adapter.dense_prefix(l) + d for l in blocks for d in adapter.ffn_map.values())]
    if missing:
        raise ValueError(f"fold_to_dense: no source for {missing[:3]}")
    dense.load_state_dict(dst)
    dense.eval()
    return dense
