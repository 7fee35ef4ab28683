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
from edgeprune.models.adapter import PADDED_KEY, padded_slots

PAD_BIAS = -1e9
BIAS_NAMES = ("e_score_correction_bias", "expert_bias", "bias")
CONFIG_KEY = PADDED_KEY


def selection_bias_key(adapter, model, layer: int) -> Optional[str]:
    """The layer's per-expert additive selection bias (a state key), or None."""
    for key in adapter.router_keys(model, layer):
        if key.rsplit(".", 1)[-1] in BIAS_NAMES and model.state_dict()[key].dim() == 1:
            return key
    return None


def padded_counts(adapter, model, k_per_layer: dict[int, int]) -> Optional[dict[int, int]]:
    """None where nothing is padded (one k everywhere, or a family that stores per-layer counts); else every layer's
    count K. A per-layer plan on a family that can be neither is one line."""
    ks = set(k_per_layer.values())
    if len(ks) <= 1 or adapter.per_layer_counts:
        return None
    missing = [l for l in k_per_layer if selection_bias_key(adapter, model, l) is None]
    if missing:
        raise ConfigError(f"{adapter.model_type} stores one expert count for all layers and its router has no "
                          f"selection bias to keep padded experts unselected (layer {missing[0]}); the plan keeps "
                          f"{sorted(ks)}: use --experts K (the same k in every layer)")
    return {l: max(ks) for l in k_per_layer}


def mark(config, k_per_layer: dict[int, int], padded: Optional[dict[int, int]]) -> None:
    """Record the padded slots in the (text) config."""
    if padded:
        setattr(config, CONFIG_KEY, {str(l): list(range(k, padded[l])) for l, k in sorted(k_per_layer.items())
                                     if k < padded[l]})


slots = padded_slots  # the padded expert slots of a layer (empty for a checkpoint without padding)


@torch.no_grad()
def pad_layer(adapter, dst: dict, path: str, router_keys: list[str], k: int, total: int,
              bias_key: Optional[str]) -> None:
    """Slots ``k .. total - 1`` of one layer: zero experts, zero router rows, the selection bias at ``PAD_BIAS``."""
    if k >= total:
        return
    for key in router_keys:
        rows = dst[key]
        if rows.shape[0] < total:  # plan_layer wrote k rows
            rows = torch.cat([rows, rows.new_zeros(total - rows.shape[0], *rows.shape[1:])])
        rows[k:] = PAD_BIAS if key == bias_key else 0
        dst[key] = rows
    zero = {n: torch.zeros_like(t) for n, t in adapter.expert_tensors(dst, path, 0).items()}
    for e in range(k, total):
        adapter.set_expert_tensors(dst, path, e, zero)
