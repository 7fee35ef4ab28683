"""Different k per layer in a checkpoint that stock transformers loads (issue 28, item 5).

An adaptive plan (``--coverage``) keeps k_l experts in layer l, but the families of transformers store one expert
count for every layer (``num_local_experts``). Where a layer's router adds a per-expert bias before it selects (a
router ``bias``, DeepSeek-style ``e_score_correction_bias``, LFM2's ``expert_bias``), every layer is padded to
K = max_l k_l: slots k_l .. K-1 get zero weights, zero router rows and a selection bias of ``PAD_BIAS`` (-1e9), so
the top-k never picks them while at least top-k real experts remain (k_l >= top-k, which the plan ensures), and a
softmax over biased logits gives them exactly 0 (exp underflows). The pruned model then computes exactly what the
plan keeps, and ``from_pretrained`` of the family's own class loads it. The padded slots are listed in the config
(``edgeprune_padded_experts``: layer -> slots, an ordinary config attribute), and the export skips them: the ONNX
graph computes only the kept experts.

Routers without such a bias (Mixtral, Qwen2/3-MoE: a linear map with no bias) cannot be kept off a slot for every
input, so a per-layer plan there stays refused with one line (use ``--experts K``); edgeprune's own BERT-MoE stores
per-layer counts natively (``MoEAdapter.per_layer_counts``).
"""
from __future__ import annotations

from typing import Optional

import torch

from edgeprune.errors import ConfigError
from edgeprune.models.adapter import PADDED_KEY

PAD_BIAS = -1e9
BIAS_NAMES = ("e_score_correction_bias", "expert_bias", "bias")


def selection_bias_key(adapter, model, layer: int) -> Optional[str]:
    """The layer's per-expert additive selection bias (a state key), or None."""
    for key in adapter.router_keys(model, layer):
        owner, _, name = key.rpartition(".")
        if name in BIAS_NAMES and getattr(model.get_submodule(owner), name).dim() == 1:
            return key
    return None


def resize_config(adapter, model, config, k_per_layer: dict[int, int]) -> Optional[dict[int, int]]:
    """Set ``config``'s expert counts for the plan's ``k_per_layer``: as they are, or every layer padded to the
    largest k (returned, with the padded slots recorded in the text config); None where nothing is padded (one k
    everywhere, or a family that stores per-layer counts). A per-layer plan on a family that can be neither is one
    line."""
    ks = set(k_per_layer.values())
    if len(ks) <= 1 or adapter.per_layer_counts:
        adapter.resize_config(config, k_per_layer)
        return None
    missing = [l for l in k_per_layer if selection_bias_key(adapter, model, l) is None]
    if missing:
        raise ConfigError(f"{adapter.model_type} stores one expert count for all layers and its router has no "
                          f"selection bias to keep padded experts unselected (layer {missing[0]}); the plan keeps "
                          f"{sorted(ks)}: use --experts K (the same k in every layer)")
    padded = {l: max(ks) for l in k_per_layer}
    adapter.resize_config(config, padded)
    setattr(config.get_text_config(), PADDED_KEY,
            {str(l): list(range(k, padded[l])) for l, k in sorted(k_per_layer.items()) if k < padded[l]})
    return padded


@torch.no_grad()
def pad_layer(adapter, model, dst: dict, path: str, layer: int, router_keys: list[str], k: int, total: int) -> None:
    """Slots ``k .. total - 1`` of one layer of ``model`` (the original): zero experts, zero router rows, the
    selection bias at ``PAD_BIAS``."""
    if k >= total:
        return
    bias_key = selection_bias_key(adapter, model, layer)
    for key in router_keys:
        rows = dst[key]
        if rows.shape[0] < total:  # plan_layer wrote k rows
            rows = torch.cat([rows, rows.new_zeros(total - rows.shape[0], *rows.shape[1:])])
        rows[k:] = PAD_BIAS if key == bias_key else 0
        dst[key] = rows
    zero = {n: torch.zeros_like(t) for n, t in adapter.expert_tensors(dst, path, 0).items()}
    for e in range(k, total):
        adapter.set_expert_tensors(dst, path, e, zero)
