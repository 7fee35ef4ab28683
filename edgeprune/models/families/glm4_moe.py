"""GLM-4-MoE: DeepSeek-V3's routing (sigmoid scores, score-correction bias, group-limited top-k,
``norm_topk_prob``, ``routed_scaling_factor``) and ungated shared experts; see
:mod:`~edgeprune.models.families.deepseek_v3`. transformers has only ``Glm4MoeForCausalLM``: the checkpoint
classifies by label words. One expert folds into its own class with every layer dense."""
from __future__ import annotations

from transformers import Glm4MoeConfig
from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoePreTrainedModel

from edgeprune.models.families.deepseek_v3 import DEEPSEEK, own_dense
from edgeprune.models.fused import fused_family, refuse_one_expert_without_norm
from edgeprune.models.label_words import classifier_class

CLASSIFIER = classifier_class(Glm4MoeConfig, Glm4MoePreTrainedModel, "Glm4MoeForSequenceClassification")

ADAPTER = fused_family(
    "glm4_moe", **DEEPSEEK,
    check_k=refuse_one_expert_without_norm,
    heads=("causal-lm",),
    dense=own_dense(Glm4MoeConfig, CLASSIFIER),
    fold_exact="own class, every layer dense, routed and shared experts in one MLP: exact to float rounding "
               "(with norm_topk_prob; without it k = 1 is refused)",
)
