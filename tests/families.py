"""Tiny checkpoints of the Hugging Face MoE families, built from their config classes (nothing downloaded)."""
from __future__ import annotations

import torch
from transformers import (GraniteMoeConfig, GraniteMoeForCausalLM, GraniteMoeSharedConfig, GraniteMoeSharedForCausalLM,
                          MixtralConfig, MixtralForSequenceClassification, OlmoeConfig, OlmoeForCausalLM,
                          Qwen2MoeConfig, Qwen2MoeForSequenceClassification, Qwen3MoeConfig,
                          Qwen3MoeForSequenceClassification)

from edgeprune.prompts import LabelWords
from edgeprune.tasks import get_task

COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
              max_position_embeddings=128, num_labels=2, pad_token_id=0, bos_token_id=2, eos_token_id=3)

# Granite's multipliers away from 1, so that the folds and label rows must carry them
GRANITE = dict(embedding_multiplier=2.0, logits_scaling=4.0, residual_multiplier=0.5, attention_multiplier=0.2)

FAMILIES = {
    "mixtral": (MixtralConfig, MixtralForSequenceClassification,
                dict(intermediate_size=48, num_local_experts=6, num_experts_per_tok=2)),
    "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForSequenceClassification,
                  dict(intermediate_size=64, moe_intermediate_size=24, num_experts=6, num_experts_per_tok=2,
                       norm_topk_prob=False)),
    "qwen2_moe": (Qwen2MoeConfig, Qwen2MoeForSequenceClassification,
                  dict(intermediate_size=64, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                       num_experts=6, num_experts_per_tok=2)),
    # language-model checkpoints (no classification head in transformers): classify by label words
    "olmoe": (OlmoeConfig, OlmoeForCausalLM, dict(intermediate_size=24, num_experts=6, num_experts_per_tok=2)),
    "granitemoe": (GraniteMoeConfig, GraniteMoeForCausalLM, dict(intermediate_size=24, num_local_experts=6,
                   num_experts_per_tok=2, **GRANITE)),
    "granitemoeshared": (GraniteMoeSharedConfig, GraniteMoeSharedForCausalLM, dict(
        intermediate_size=24, shared_intermediate_size=16, num_local_experts=6, num_experts_per_tok=2, **GRANITE)),
}
# label words of the tiny LM classifiers: any two token ids of the tiny vocabulary
TINY_WORDS = LabelWords("{text}", ("negative", "positive"), (7, 9))


def is_lm(family: str) -> bool:
    return FAMILIES[family][1].__name__.endswith("ForCausalLM")


def tiny_family_model(family: str, vocab: int, seed: int = 0, **overrides) -> torch.nn.Module:
    """The family's sequence classifier (a language model made one by label words, as edgeprune loads it)."""
    model = tiny_family_checkpoint(family, vocab, seed, **overrides)
    if is_lm(family):
        from edgeprune.models.label_words import to_classifier

        model = to_classifier(model, TINY_WORDS, get_task("sst2"))
    return model


def tiny_family_checkpoint(family: str, vocab: int, seed: int = 0, **overrides) -> torch.nn.Module:
    """The family's model as a user holds it: a classifier, or a language model where transformers has no
    classification head for the family."""
    config_cls, model_cls, kw = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_cls(vocab_size=vocab, **{**COMMON, **kw, **overrides})
    model = model_cls(config).eval()
    with torch.no_grad():  # random routers that actually spread tokens over the experts
        for name, p in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight", "router.layer.weight")):
                p.normal_(0, 1.0)
    return model
