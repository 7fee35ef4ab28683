"""Tiny checkpoints of the Hugging Face MoE families, built from their config classes (nothing downloaded)."""
from __future__ import annotations

import torch
from transformers import (SwitchTransformersConfig, SwitchTransformersForConditionalGeneration, PhimoeConfig, PhimoeForSequenceClassification, GptOssConfig, GptOssForSequenceClassification, DeepseekV2Config, DeepseekV2ForSequenceClassification, DeepseekV3Config,
                          DeepseekV3ForSequenceClassification, Glm4MoeConfig, Glm4MoeForCausalLM, GraniteMoeConfig, GraniteMoeForCausalLM, GraniteMoeSharedConfig, GraniteMoeSharedForCausalLM,
                          MixtralConfig, MixtralForSequenceClassification, OlmoeConfig, OlmoeForCausalLM,
                          Qwen2MoeConfig, Qwen2MoeForSequenceClassification, Qwen3MoeConfig,
                          Qwen3MoeForSequenceClassification)

from edgeprune.tasks.prompts import LabelWords
from edgeprune.tasks import get_task

COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
              max_position_embeddings=128, num_labels=2, pad_token_id=0, bos_token_id=2, eos_token_id=3)

# Granite's multipliers away from 1, so that the folds and label rows must carry them
GRANITE = dict(embedding_multiplier=2.0, logits_scaling=4.0, residual_multiplier=0.5, attention_multiplier=0.2)

# DeepSeek-style: multi-head latent attention, 6 routed experts + 1 shared, every layer MoE
DEEPSEEK = dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=6, num_experts_per_tok=2,
                n_shared_experts=1, first_k_dense_replace=0, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                qk_rope_head_dim=8, v_head_dim=8, num_key_value_heads=4)

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
    "deepseek_v2": (DeepseekV2Config, DeepseekV2ForSequenceClassification, dict(DEEPSEEK, routed_scaling_factor=1.5)),
    "deepseek_v3": (DeepseekV3Config, DeepseekV3ForSequenceClassification, dict(
        DEEPSEEK, n_group=2, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5)),
    "glm4_moe": (Glm4MoeConfig, Glm4MoeForCausalLM, dict(
        DEEPSEEK, n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.8, partial_rotary_factor=0.5,
        use_qk_norm=True)),
    "gpt_oss": (GptOssConfig, GptOssForSequenceClassification, dict(
        intermediate_size=24, num_local_experts=6, num_experts_per_tok=2, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"])),
    "phimoe": (PhimoeConfig, PhimoeForSequenceClassification, dict(
        intermediate_size=24, num_local_experts=6, num_experts_per_tok=2, router_jitter_noise=0.5,
        input_jitter_noise=0.0)),
    # encoder-decoder with only an LM head: label words from the decoder's first step; layer 1 of each stack sparse
    "switch_transformers": (SwitchTransformersConfig, SwitchTransformersForConditionalGeneration, dict(
        d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4, num_experts=6,
        expert_capacity=64, encoder_sparse_step=2, decoder_sparse_step=2, decoder_start_token_id=0)),
}
# families that cannot keep one expert at all (SparseMixer picks two)
NO_ONE_EXPERT = {"phimoe"}
# families whose own class cannot run one expert per layer (group top-2 over one expert): k = 1 always folds
ONE_EXPERT_FOLDS_ONLY = {"deepseek_v3", "glm4_moe"}
# label words of the tiny LM classifiers: any two token ids of the tiny vocabulary
TINY_WORDS = LabelWords("{text}", ("negative", "positive"), (7, 9))


def is_lm(family: str) -> bool:
    return FAMILIES[family][1].__name__.endswith(("ForCausalLM", "ForConditionalGeneration"))


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
            if name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight", "router.layer.weight",
                              "mlp.router.weight",
                              "router.classifier.weight")):
                p.normal_(0, 1.0)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek-V3's choice bias, away from zero
                b.normal_(0, 0.3)
    return model
