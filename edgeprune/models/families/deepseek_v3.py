"""DeepSeek-V3 (``mlp`` block: fused ``experts``, ungated ``shared_experts``, ``gate`` a router with a ``weight``
and an ``e_score_correction_bias`` buffer; scores sigmoid(logits) in fp32, the choice by scores + bias with
group-limited top-k (top-2 sum per group, ``topk_group`` of ``n_group`` groups), weights the chosen *scores* (no
bias), renormalised with ``norm_topk_prob``, times ``routed_scaling_factor``: the router's own code).

Pruning keeps the router rows and bias entries of the kept experts. The group limit needs equal groups of the
full expert set, so a pruned layer routes without it (``n_group = topk_group = 1``): exact where the limit was
inactive (``topk_group == n_group``, or one group), otherwise the kept experts compete freely.

One expert: the family's class cannot run it (top-2 within a group of one), and the weight is constant only with
``norm_topk_prob`` (s / (s + 1e-20) = 1 in fp32 unless s < 1e-13, times the scaling factor). Then the fold is its
own class with every layer dense (``first_k_dense_replace`` = all layers), the routed expert (output scaled by the
factor) and the shared experts side by side in one MLP; without ``norm_topk_prob`` k = 1 is refused.
GLM-4-MoE (:mod:`~edgeprune.models.families.glm4_moe`) routes the same way."""
from __future__ import annotations

from transformers import DeepseekV3Config, DeepseekV3ForSequenceClassification

from edgeprune.models.adapter import DenseSibling
from edgeprune.models.families.mixtral import SIBLING_FFN
from edgeprune.models.fused import MLP_NAMES, fused_family, refuse_one_expert_without_norm


def dense_overrides(cfg: dict) -> dict:
    """Every layer dense, one width: the widest of the original dense MLP and [routed | shared] (zero-padded)."""
    folded = cfg["moe_intermediate_size"] * (1 + (cfg.get("n_shared_experts") or 0))
    widths = [folded] + ([cfg["intermediate_size"]] if cfg.get("first_k_dense_replace", 0) else [])
    return {"first_k_dense_replace": cfg["num_hidden_layers"], "intermediate_size": max(widths),
            "n_routed_experts": 1, "num_experts_per_tok": 1, "n_group": 1, "topk_group": 1}


def own_dense(config_class, classifier_class) -> DenseSibling:
    return DenseSibling(config_class, classifier_class, MLP_NAMES, mlp_path=lambda path: path, overrides=dense_overrides,
                        extra_ffn=SIBLING_FFN)


# what DeepSeek-style families (V2, V3, GLM-4-MoE) have in common
DEEPSEEK = dict(num_experts_key="n_routed_experts", shared="shared_experts", group_keys=("n_group", "topk_group"),
                fold_scale=lambda block: block.gate.routed_scaling_factor)

ADAPTER = fused_family(
    "deepseek_v3", **DEEPSEEK,
    check_k=refuse_one_expert_without_norm,
    dense=own_dense(DeepseekV3Config, DeepseekV3ForSequenceClassification),
    fold_exact="own class, every layer dense, routed (x routed_scaling_factor) and shared experts in one MLP: exact "
               "to float rounding (with norm_topk_prob; without it k = 1 is refused)",
)
