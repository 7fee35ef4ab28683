"""``genai_config.json``: the decoder artifact as onnxruntime-genai apps load it (``og.Model(DIR)``), as it is.

onnxruntime-genai reads the graph's input and output names from the config, so the optimum graph of
:mod:`edgeprune.export.lm_export` (``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values.%d.key``
/ ``.value`` -> ``logits``, ``present.%d.key`` / ``.value``) needs no rebuild by genai's model builder; the past and
present are separate buffers (``past_present_share_buffer = false``: the graph concatenates). ``type`` is the
checkpoint's model type where genai 0.11 knows it (llama, mistral, qwen2, qwen3, granite, olmo, phi3, gemma, ...)
and ``decoder`` (its generic decoder-only LLM) otherwise (Mixtral with k > 1, OLMoE keep their class); none
for DeepSeek's latent attention (see :func:`write_genai_config`).
Measured here with onnxruntime-genai 0.11.4 (``pip install --no-deps``): greedy tokens equal EdgeLM's (tests).
"""
from __future__ import annotations

import json
from pathlib import Path

GENAI_TYPES = ("llama", "mistral", "qwen2", "qwen3", "granite", "olmo", "phi3", "gemma", "gemma2", "gemma3",
               "chatglm", "nemotron", "phi", "phimoe", "gpt_oss", "smollm3", "ernie4_5")


def genai_config(config: dict, model_file: str, eos_ids: list, max_length: int, position_ids: bool = True) -> dict:
    """The config for ``model_file`` (relative to the artifact) of a model with the HF ``config``; ``position_ids``:
    the graph takes them (optimum's does; the model builder's GroupQueryAttention derives them from the mask)."""
    heads = config["num_attention_heads"]
    head_size = config.get("head_dim") or config["hidden_size"] // heads
    kv = config.get("num_key_value_heads") or heads
    eos = eos_ids[0] if len(eos_ids) == 1 else list(eos_ids)
    return {
        "model": {
            "bos_token_id": config.get("bos_token_id"), "context_length": int(config.get("max_position_embeddings") or 2048),
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": model_file, "head_size": head_size, "hidden_size": config["hidden_size"],
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           **({"position_ids": "position_ids"} if position_ids else {}),
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": heads, "num_hidden_layers": config["num_hidden_layers"],
                "num_key_value_heads": kv},
            "eos_token_id": eos, "pad_token_id": config.get("pad_token_id") or (eos_ids[0] if eos_ids else 0),
            "type": config["model_type"] if config["model_type"] in GENAI_TYPES else "decoder",
            "vocab_size": config["vocab_size"]},
        "search": {"do_sample": False, "max_length": max_length, "min_length": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }


def write_genai_config(directory: Path, model_file: str, eos_ids: list) -> bool:
    """``directory/genai_config.json`` for ``model_file``: the model builder's where it wrote the graph, else from
    the artifact's ``config.json``; False (nothing written) for multi-head latent attention (DeepSeek), whose cached keys and values differ in size, which genai's
    one ``head_size`` cannot say."""
    import onnx

    built = directory / "genai_config.json"  # the model builder's own (export.genai_builder): kept, for model_file
    if built.is_file():
        cfg = json.loads(built.read_text())
        cfg["model"]["decoder"]["filename"] = model_file
        built.write_text(json.dumps(cfg, indent=1))
        return True
    config = json.loads((directory / "config.json").read_text())
    if "kv_lora_rank" in config:
        return False
    inputs = {i.name for i in onnx.load(str(directory / model_file), load_external_data=False).graph.input}
    cfg = genai_config(config, model_file, eos_ids, int(config.get("max_position_embeddings") or 2048),
                       position_ids="position_ids" in inputs)
    (directory / "genai_config.json").write_text(json.dumps(cfg, indent=1))
    return True
