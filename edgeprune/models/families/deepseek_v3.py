"""DeepSeek-V3 (``mlp``: ModuleList gate/up/down_proj, ungated ``shared_experts``, ``gate`` a router with a
``weight`` and an ``e_score_correction_bias`` buffer; scores sigmoid(logits) in fp32, the choice by
scores + bias with group-limited top-k (top-2 sum per group, ``topk_group`` of ``n_group`` groups), weights the
chosen *scores* (no bias), renormalised with ``norm_topk_prob``, times ``routed_scaling_factor``).

Pruning keeps the router rows and bias entries of the kept experts. The group limit needs equal groups of the
full expert set, so a pruned layer routes without it (``n_group = topk_group = 1``): exact where the limit was
inactive (``topk_group == n_group``, or one group), otherwise the kept experts compete freely.

One expert: the family's class cannot run it (top-2 within a group of one), and the weight is constant only with
``norm_topk_prob`` (s / (s + 1e-20) = 1 in fp32 unless s < 1e-13, times the scaling factor). Then the fold is its
own class with every layer dense (``first_k_dense_replace`` = all layers), the routed expert (output scaled by the
factor) and the shared experts side by side in one MLP; without ``norm_topk_prob`` k = 1 is refused.
GLM-4-MoE (:mod:`~edgeprune.models.families.glm4_moe`) routes the same way."""
from __future__ import annotations

import torch.nn.functional as F
from transformers import DeepseekV3Config, DeepseekV3ForSequenceClassification
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

from edgeprune.errors import ConfigError
from edgeprune.models.adapter import DenseSibling, MoEAdapter
from edgeprune.models.families.qwen3_moe import EXPERT_ROLES, MLP

SHARED = {n: f"shared_experts.{n}" for n in EXPERT_ROLES}


class DeepseekAdapter(MoEAdapter):
    """DeepSeek-style blocks: a router module holding ``weight`` (fp32 logits), ungated shared experts, groups."""

    def router_logits(self, block, x):
        return F.linear(x.float(), block.gate.weight.float())

    def top_k(self, block):
        return min(int(block.gate.top_k), self.num_experts(block))

    def shared_forward(self, block, x):
        return block.shared_experts(x)

    def shared_tensors(self, state, path):
        return {n: state[f"{path}.{s}"] for n, s in SHARED.items()}

    def fold_scale(self, block):
        return float(block.gate.routed_scaling_factor)

    def block_output(self, out, logits):
        return out

    def route_is_trivial(self, block):
        return False  # a one-expert weight is the scaling factor (V2), or the class cannot run one expert (V3)

    def resize_config(self, config, k_per_layer):
        k_old = config.n_routed_experts
        super().resize_config(config, k_per_layer)
        if config.n_routed_experts != k_old:  # the group limit needs the full, equal groups
            config.n_group, config.topk_group = 1, 1


class DeepseekV3Adapter(DeepseekAdapter):
    def route(self, block, logits):
        gate = block.gate
        scores = logits.float().sigmoid()
        idx = gate.get_topk_indices(scores)  # the family's own choice: scores + bias, group-limited top-k
        weight = scores.gather(1, idx)
        if gate.norm_topk_prob:
            weight = weight / (weight.sum(dim=-1, keepdim=True) + 1e-20)
        return idx, weight * gate.routed_scaling_factor

    def check_k(self, block, k):
        if k == 1 and not block.gate.norm_topk_prob:
            raise ConfigError(f"{self.model_type} without norm_topk_prob cannot keep one expert: its weight "
                              "sigmoid(logit) is not constant and its class cannot route one expert; use --experts 2")


def dense_overrides(cfg: dict) -> dict:
    """Every layer dense, one width: the widest of the original dense MLP and [routed | shared] (zero-padded)."""
    folded = cfg["moe_intermediate_size"] * (1 + (cfg.get("n_shared_experts") or 0))
    widths = [folded] + ([cfg["intermediate_size"]] if cfg.get("first_k_dense_replace", 0) else [])
    return {"first_k_dense_replace": cfg["num_hidden_layers"], "intermediate_size": max(widths),
            "n_routed_experts": 1, "num_experts_per_tok": 1, "n_group": 1, "topk_group": 1}


def own_dense(config_class, classifier_class) -> DenseSibling:
    return DenseSibling(config_class, classifier_class, MLP, mlp_path=lambda path: path, overrides=dense_overrides,
                        extra_ffn={"layer": lambda l: f"model.layers.{l}.mlp", "in": ("gate_proj", "up_proj"),
                                   "out": "down_proj"})


ADAPTER = DeepseekV3Adapter(
    model_type="deepseek_v3",
    block_class=DeepseekV3MoE,
    expert_roles=EXPERT_ROLES,
    num_experts_key="n_routed_experts",
    dense=own_dense(DeepseekV3Config, DeepseekV3ForSequenceClassification),
    fold_exact="own class, every layer dense, routed (x routed_scaling_factor) and shared experts in one MLP: exact "
               "to float rounding (with norm_topk_prob; without it k = 1 is refused)",
)
