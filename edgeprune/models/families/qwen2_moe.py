"""Qwen2-MoE: Qwen3-MoE's routing plus a ``shared_expert`` behind a per-token sigmoid ``shared_expert_gate`` (the
block's own code, kept as it is in export). No exact dense sibling (the shared expert's gate is not constant, and
Qwen2 forces a q/k/v bias layout of its own), so a one-expert model stays a Qwen2-MoE with one expert per layer."""
from __future__ import annotations

from edgeprune.models.adapter import SILU_GLU
from edgeprune.models.fused import fused_family

ADAPTER = fused_family(
    "qwen2_moe",
    num_experts_key="num_experts",
    ort_moe=SILU_GLU,
    renormalise=lambda block: bool(block.gate.norm_topk_prob),
    fold_exact="no sibling: keeps Qwen2-MoE with one expert per layer (exact)",
)
