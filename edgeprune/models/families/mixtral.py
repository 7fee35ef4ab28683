"""Mixtral (``block_sparse_moe``: ModuleList of w1 gate / w3 up / w2 down, ``gate`` Linear; softmax in fp32 ->
top-k -> renormalise). One expert folds into Mistral bit for bit; Mistral's ``sliding_window`` default (4096)
differs from Mixtral's (None), so the MoE config's value is copied explicitly."""
from __future__ import annotations

from transformers import MistralConfig, MistralForSequenceClassification
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from edgeprune.models.adapter import SILU_GLU, DenseSibling, MoEAdapter

ADAPTER = MoEAdapter(
    model_type="mixtral",
    block_class=MixtralSparseMoeBlock,
    expert_roles={"w1.weight": "in", "w3.weight": "in", "w2.weight": "out"},
    num_experts_key="num_local_experts",
    ort_moe=SILU_GLU,
    dense=DenseSibling(MistralConfig, MistralForSequenceClassification,
                       {"w1.weight": "gate_proj.weight", "w3.weight": "up_proj.weight", "w2.weight": "down_proj.weight"},
                       mlp_path=lambda path: path.replace(".block_sparse_moe", ".mlp"),
                       drop_keys=("router_jitter_noise", "router_aux_loss_coef", "output_router_logits"),
                       overrides=lambda cfg: {"sliding_window": cfg.get("sliding_window")},
                       extra_ffn={"layer": lambda l: f"model.layers.{l}.mlp", "in": ("gate_proj", "up_proj"),
                                  "out": "down_proj"}),
    fold_exact="exact (bit for bit)",
)
