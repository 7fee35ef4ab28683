"""Mixtral (transformers 5: ``mlp`` block with fused ``experts`` and a ``gate`` router; softmax in fp32 -> top-k ->
renormalise). One expert folds into Mistral exactly up to float rounding (<= 6e-8 on tiny models: transformers 5 computes
gate and up in one fused matmul, Mistral in two); Mistral's ``sliding_window`` default (4096) differs from
Mixtral's (None), so the MoE config's value is copied explicitly."""
from __future__ import annotations

from transformers import MistralConfig, MistralForSequenceClassification

from edgeprune.models.adapter import SILU_GLU, DenseSibling
from edgeprune.models.fused import MLP_NAMES, fused_family

SIBLING_FFN = {"layer": lambda l: f"model.layers.{l}.mlp", "in": ("gate_proj", "up_proj"), "out": "down_proj"}

ADAPTER = fused_family(
    "mixtral",
    ort_moe=SILU_GLU,
    dense=DenseSibling(MistralConfig, MistralForSequenceClassification, MLP_NAMES, mlp_path=lambda path: path,
                       drop_keys=("router_jitter_noise", "router_aux_loss_coef", "output_router_logits"),
                       overrides=lambda cfg: {"sliding_window": cfg.get("sliding_window")}, extra_ffn=SIBLING_FFN),
    fold_exact="exact to float rounding (fused gate|up matmul vs two)",
)
