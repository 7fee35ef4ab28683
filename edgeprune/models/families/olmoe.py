"""OLMoE (``mlp`` block: fused ``experts``, ``gate`` router; softmax in fp32 -> top-k -> renormalise only with
``norm_topk_prob``, default False). transformers has only ``OlmoeForCausalLM``: the checkpoint classifies by
label words through a generic sequence-classification head (:mod:`edgeprune.models.label_words`). No exact
dense sibling (OLMo-2 norms after attention and MLP, OLMoE before them), so a one-expert model keeps its class
with one expert per layer (its weight is exactly 1)."""
from __future__ import annotations

from transformers import OlmoeConfig
from transformers.models.olmoe.modeling_olmoe import OlmoePreTrainedModel

from edgeprune.models.adapter import SILU_GLU
from edgeprune.models.fused import fused_family
from edgeprune.models.label_words import classifier_class

CLASSIFIER = classifier_class(OlmoeConfig, OlmoePreTrainedModel, "OlmoeForSequenceClassification")

ADAPTER = fused_family(
    "olmoe",
    num_experts_key="num_experts",
    ort_moe=SILU_GLU,
    renormalise=lambda block: bool(block.gate.norm_topk_prob),
    heads=("causal-lm",),
    fold_exact="no sibling: keeps OLMoE with one expert per layer (exact)",
)
