"""Tiny checkpoints of the Hugging Face MoE families, built from their config classes (nothing downloaded)."""
from __future__ import annotations

import torch
from transformers import (MixtralConfig, MixtralForSequenceClassification, Qwen2MoeConfig,
                          Qwen2MoeForSequenceClassification, Qwen3MoeConfig, Qwen3MoeForSequenceClassification)

COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
              max_position_embeddings=128, num_labels=2, pad_token_id=0, bos_token_id=2, eos_token_id=3)

FAMILIES = {
    "mixtral": (MixtralConfig, MixtralForSequenceClassification,
                dict(intermediate_size=48, num_local_experts=6, num_experts_per_tok=2)),
    "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForSequenceClassification,
                  dict(intermediate_size=64, moe_intermediate_size=24, num_experts=6, num_experts_per_tok=2,
                       norm_topk_prob=False)),
    "qwen2_moe": (Qwen2MoeConfig, Qwen2MoeForSequenceClassification,
                  dict(intermediate_size=64, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                       num_experts=6, num_experts_per_tok=2)),
}


def tiny_family_model(family: str, vocab: int, seed: int = 0, **overrides) -> torch.nn.Module:
    config_cls, model_cls, kw = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_cls(vocab_size=vocab, **{**COMMON, **kw, **overrides})
    model = model_cls(config).eval()
    with torch.no_grad():  # random routers that actually spread tokens over the experts
        for name, p in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")):
                p.normal_(0, 1.0)
    return model
