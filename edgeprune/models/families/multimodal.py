"""Multimodal MoE checkpoints of transformers 5.25 that edgeprune prunes through their text model: ``VIA_TEXT`` maps
the checkpoint's model type to the registered text model type (``text_config.model_type``).

A checkpoint of one of them (``...ForConditionalGeneration``, as a user's directory holds it) is loaded with
``AutoModelForImageTextToText`` and turned into the text model's label-word classifier
(:func:`edgeprune.models.loading.family_type`, :func:`edgeprune.models.label_words.to_classifier`): the text
decoder with its MoE layers and the LM head's verbaliser rows. The vision / audio towers are left out, so the
artifact classifies text only. Tested on a tiny checkpoint of the whole multimodal model for qwen3_vl_moe and
mistral_large4 (tests/test_table_families.py); the others are the same path, their text model tested alone.
"""
from __future__ import annotations

VIA_TEXT: dict[str, str] = {
    "aria": "aria_text",
    "gemma4": "gemma4_text",
    "glm4v_moe": "glm4v_moe_text",
    "hy_v4_vl": "hy_v4_vl_text",
    "inkling2": "inkling2_text",
    "inkling2_loop": "inkling2_loop_text",
    "inkling_mm_model": "inkling_text",
    "llama4": "llama4_text",
    "minimax_m3_vl": "minimax_m3_vl_text",
    "mistral_large4": "mistral_large4_text",
    "muse_spark": "muse_spark_text",
    "qwen3_5_moe": "qwen3_5_moe_text",
    "qwen3_vl_moe": "qwen3_vl_moe_text",
}
