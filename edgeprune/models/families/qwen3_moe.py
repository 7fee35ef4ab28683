"""Qwen3-MoE (``mlp`` block: fused ``experts``, ``gate`` router; softmax -> top-k -> renormalise only with
``norm_topk_prob``, default False). One expert folds into Qwen3 exactly up to float rounding (fused gate|up matmul vs two): the sibling's single
``intermediate_size`` is the widest MLP, narrower ones (``moe_intermediate_size``, ``mlp_only_layers``) are
zero-padded, which adds exact zeros; ``max_window_layers`` is set so that Qwen3 keeps every layer on full
attention exactly where the MoE does."""
from __future__ import annotations

from transformers import Qwen3Config, Qwen3ForSequenceClassification

from edgeprune.models.adapter import SILU_GLU, DenseSibling
from edgeprune.models.families.mixtral import SIBLING_FFN
from edgeprune.models.fused import MLP_NAMES, fused_family


def qwen3_overrides(cfg: dict) -> dict:
    sparse = [l for l in range(cfg["num_hidden_layers"]) if l not in cfg.get("mlp_only_layers", [])
              and (l + 1) % cfg.get("decoder_sparse_step", 1) == 0]
    widths = [cfg["moe_intermediate_size"]] if sparse else []
    if len(sparse) < cfg["num_hidden_layers"]:
        widths.append(cfg["intermediate_size"])
    return {"intermediate_size": max(widths), "layer_types": None,
            "max_window_layers": cfg.get("max_window_layers", cfg["num_hidden_layers"])}


ADAPTER = fused_family(
    "qwen3_moe",
    ort_moe=SILU_GLU,
    renormalise=lambda block: bool(block.gate.norm_topk_prob),
    dense=DenseSibling(Qwen3Config, Qwen3ForSequenceClassification, MLP_NAMES, mlp_path=lambda path: path,
                       drop_keys=("moe_intermediate_size", "decoder_sparse_step", "mlp_only_layers", "norm_topk_prob",
                                  "router_aux_loss_coef", "output_router_logits"),
                       overrides=qwen3_overrides, extra_ffn=SIBLING_FFN),
    fold_exact="exact to float rounding (fused gate|up matmul vs two; narrower MLPs zero-padded)",
)
