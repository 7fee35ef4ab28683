"""Qwen2-MoE: Qwen3-MoE's routing plus a ``shared_expert`` behind a per-token sigmoid ``shared_expert_gate``.
No exact dense sibling (the shared expert's gate is not constant, and Qwen2 forces a q/k/v bias layout of
its own), so a one-expert model stays a Qwen2-MoE with one expert per layer, exported with the router
skipped (its weight is exactly 1) and the gated shared expert kept."""
from __future__ import annotations

import torch.nn.functional as F
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

from edgeprune.models.adapter import SILU_GLU, MoEAdapter
from edgeprune.models.families.qwen3_moe import EXPERT_ROLES


class Qwen2MoeAdapter(MoEAdapter):
    def shared_forward(self, block, x):
        return F.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)


ADAPTER = Qwen2MoeAdapter(
    model_type="qwen2_moe",
    block_class=Qwen2MoeSparseMoeBlock,
    expert_roles=EXPERT_ROLES,  # the same experts as Qwen3-MoE
    num_experts_key="num_experts",
    ort_moe=SILU_GLU,
    renormalise=lambda block: bool(block.norm_topk_prob),
    fold_exact="no sibling: keeps Qwen2-MoE with one expert per layer (router skipped in export, exact)",
)
