"""Width pruning of the folded model: keep the task's most salient FFN neurons (k = 1 only).

Expert pruning stops at the dense model: once the router is folded away (k = 1) the artifact costs what a
natively dense model of the family costs. ``--ffn-keep P`` goes one step further, inside every FFN of the
folded model (the folded experts and the layers that were dense in the original alike: the dense family has a
single ``intermediate_size``). Neuron j of layer l (row j of ``W_in``, column j of ``W_out``, FFN(x) =
W_out act(W_in x + b_in) + b_out) gets the task-aware saliency

    s_j = E_x[ |a_j(x)| ] * ||W_out[:, j]||_2,    a(x) = act(W_in x + b_in),

averaged over the non-padding tokens of calibration examples of the task: the expected size of the neuron's
contribution to the FFN output. It is the structured, per-neuron form of Wanda's ``|W_ij| * ||X_j||_2``
(Sun et al. 2024, "A Simple and Effective Pruning Approach for Large Language Models") and the neuron-level
analogue of REAP's ``g_j(x) * ||E_j(x)||_2`` for experts (Lasby et al. 2025). Every layer keeps the
``round(P * d_ff)`` neurons with the largest saliency, so the result is still a plain checkpoint of the dense
family that every exporter takes; recovery fine-tuning (distilled from the original) follows, as after expert
pruning, and needs more steps than expert pruning alone (results/benchmark_ffn.md: 1000).
"""
from __future__ import annotations

import copy

import numpy as np
import torch

from edgeprune.models.registry import MoEAdapter
from edgeprune.pruning.calibration import calibration_batches, real_tokens
from edgeprune.tasks.encoding import Encoded, model_inputs


def ffn_paths(model: torch.nn.Module, adapter: MoEAdapter) -> dict[int, tuple[tuple[str, ...], str]]:
    """Per layer of the folded dense model, the module paths of its FFN's input projections (W_in, or gate and
    up of a gated MLP) and of its output projection (W_out / down), from the adapter's dense sibling."""
    ffn = adapter.dense.extra_ffn
    if "modules" in ffn:  # e.g. T5: encoder and decoder FFNs
        mlps = ffn["modules"](model)
    else:
        mlps = [ffn["layer"](l) for l in range(model.config.num_hidden_layers)]
    return {i: (tuple(f"{m}.{n}" for n in ffn["in"]), f"{m}.{ffn['out']}") for i, m in enumerate(mlps)}


@torch.no_grad()
def neuron_saliency(model: torch.nn.Module, adapter: MoEAdapter, enc: Encoded, max_examples: int = 1024,
                    batch_size: int = 64, progress: bool = True) -> dict[int, np.ndarray]:
    """s_j = mean over non-padding tokens of |a_j| times ||W_out[:, j]||_2, per layer (see the module docstring);
    a is the output projection's input (act(W_in x) or act(gate x) * up x)."""
    paths = ffn_paths(model, adapter)
    sums = {l: None for l in paths}
    tokens = {l: 0 for l in paths}
    state = {"mask": None}

    def hook(layer):
        def pre(_module, inputs):
            a = inputs[0].detach().float().abs().reshape(-1, inputs[0].shape[-1])
            mask = real_tokens(state["mask"], a.shape[0]).float().unsqueeze(-1)
            s = (a * mask).sum(0)
            sums[layer] = s if sums[layer] is None else sums[layer] + s
            tokens[layer] += int(mask.sum())
        return pre

    handles = [model.get_submodule(out_path).register_forward_pre_hook(hook(l)) for l, (_, out_path) in paths.items()]
    model.eval()
    try:
        for batch in calibration_batches(enc, max_examples, batch_size, "neuron saliency", progress):
            state["mask"] = batch["attention_mask"].reshape(-1).bool()
            model(**model_inputs(model, batch))
    finally:
        for h in handles:
            h.remove()
    out = {}
    for l, (_, out_path) in paths.items():
        w_norm = model.get_submodule(out_path).weight.detach().float().norm(dim=0)
        out[l] = (sums[l] / max(1, tokens[l]) * w_norm).numpy()
    return out


def slim_ffn(model: torch.nn.Module, adapter: MoEAdapter, saliency: dict[int, np.ndarray], keep: float) -> tuple[torch.nn.Module, dict]:
    """A new dense model whose every FFN keeps the ``round(keep * d_ff)`` most salient neurons (input unchanged)."""
    width_key = adapter.dense.extra_ffn.get("width", "intermediate_size")
    d_ff = getattr(model.config, width_key)
    width = max(1, int(round(keep * d_ff)))
    kept = {l: np.sort(np.argsort(-s, kind="stable")[:width]) for l, s in saliency.items()}
    config = copy.deepcopy(model.config)
    setattr(config, width_key, width)
    new = type(model)(config).to(next(model.parameters()).dtype)
    src, dst = model.state_dict(), new.state_dict()
    for key in dst:  # everything outside the FFN projections keeps its shape (the output bias included)
        if src[key].shape == dst[key].shape:
            dst[key] = src[key].clone()
    for l, (in_paths, out_path) in ffn_paths(model, adapter).items():
        idx = torch.from_numpy(kept[l])
        for in_path in in_paths:
            dst[in_path + ".weight"] = src[in_path + ".weight"][idx].clone()
            if in_path + ".bias" in src:
                dst[in_path + ".bias"] = src[in_path + ".bias"][idx].clone()
        dst[out_path + ".weight"] = src[out_path + ".weight"][:, idx].clone()
    new.load_state_dict(dst)
    new.eval()
    share = {l: float(saliency[l][kept[l]].sum() / max(saliency[l].sum(), 1e-12)) for l in kept}
    return new, {"keep": keep, "intermediate_size": [d_ff, width],
                 "saliency_kept_share": {str(l): round(v, 4) for l, v in share.items()}}
