"""Granite-MoE (``block_sparse_moe`` block: fused ``experts``, ``router``; top-k on the logits, then softmax over the
k chosen). transformers has only ``GraniteMoeForCausalLM``: the checkpoint classifies by label words
(:mod:`edgeprune.models.label_words`; Granite's ``logits_scaling`` is folded into the label rows). One expert
(softmax over one logit: weight exactly 1) folds into Granite, whose config carries the same multipliers,
exactly up to float rounding."""
from __future__ import annotations

from transformers import GraniteConfig, GraniteMoeConfig
from transformers.models.granite.modeling_granite import GranitePreTrainedModel
from transformers.models.granitemoe.modeling_granitemoe import GraniteMoePreTrainedModel

from edgeprune.models.adapter import SILU_GLU, DenseSibling
from edgeprune.models.families.mixtral import SIBLING_FFN
from edgeprune.models.fused import MLP_NAMES, fused_family
from edgeprune.models.label_words import classifier_class

CLASSIFIER = classifier_class(GraniteMoeConfig, GraniteMoePreTrainedModel, "GraniteMoeForSequenceClassification")
GRANITE = classifier_class(GraniteConfig, GranitePreTrainedModel, "GraniteForSequenceClassification")
MOE_KEYS = ("router_aux_loss_coef", "output_router_logits", "position_embedding_type")


def granite_sibling(drop: tuple[str, ...] = (), overrides=lambda cfg: {}) -> DenseSibling:
    return DenseSibling(GraniteConfig, GRANITE, MLP_NAMES, mlp_path=lambda path: path.replace(".block_sparse_moe", ".mlp"),
                        drop_keys=MOE_KEYS + drop, overrides=overrides, extra_ffn=SIBLING_FFN)


# what Granite-MoE and Granite-MoE-Shared have in common
GRANITE_LAYOUT = dict(
    router_attr="router",
    ort_moe=SILU_GLU,
    renormalise=lambda block: True,  # softmax over the top-k logits = renormalised softmax top-k
    heads=("causal-lm",),
)

ADAPTER = fused_family("granitemoe", **GRANITE_LAYOUT, dense=granite_sibling(), fold_exact="exact to float rounding (fused gate|up matmul vs two)")
