"""OLMoE (``mlp``: ModuleList gate/up/down_proj, ``gate`` Linear; softmax in fp32 -> top-k -> renormalise only
with ``norm_topk_prob``, default False). transformers has only ``OlmoeForCausalLM``: the checkpoint classifies by
label words through a generic sequence-classification head (:mod:`edgeprune.models.label_words`). No exact
dense sibling (OLMo-2 norms after attention and MLP, OLMoE before them), so a one-expert model keeps its class
with one expert per layer and is exported with the router skipped (its weight is exactly 1)."""
from __future__ import annotations

from transformers import OlmoeConfig
from transformers.models.olmoe.modeling_olmoe import OlmoePreTrainedModel, OlmoeSparseMoeBlock

from edgeprune.models.adapter import SILU_GLU, MoEAdapter
from edgeprune.models.families.qwen3_moe import EXPERT_ROLES
from edgeprune.models.label_words import classifier_class

CLASSIFIER = classifier_class(OlmoeConfig, OlmoePreTrainedModel, "OlmoeForSequenceClassification")

ADAPTER = MoEAdapter(
    model_type="olmoe",
    block_class=OlmoeSparseMoeBlock,
    expert_roles=EXPERT_ROLES,  # gate_proj / up_proj / down_proj, like Qwen-MoE
    num_experts_key="num_experts",
    ort_moe=SILU_GLU,
    renormalise=lambda block: bool(block.norm_topk_prob),
    heads=("causal-lm",),
    fold_exact="no sibling: keeps OLMoE with one expert per layer (router skipped in export, exact)",
)
