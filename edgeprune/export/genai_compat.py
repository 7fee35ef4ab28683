"""onnxruntime-genai's model builder run with the config reading that transformers 5.25's Gemma 4 needs.

Run as a script (``python genai_compat.py <the builder's arguments>``, what :func:`edgeprune.export.genai_builder.
build_graph` does); it imports nothing of edgeprune, so the child process needs only the builder and transformers.

The builder's ``Gemma4Model`` (onnxruntime-genai 0.18) reads a flat Gemma 4 text config: ``head_dim`` and
``num_key_value_heads`` for the sliding-window layers, ``global_head_dim`` and ``num_global_key_value_heads`` for the
full-attention layers. transformers 5.25 parses those keys into its heterogeneous per-layer config
(``per_layer_config[i].head_dim``; reading ``config.head_dim`` raises ``AmbiguousGlobalPerLayerAttributeError``) and
keeps no ``global_head_dim``. :func:`flatten_gemma4` gives the builder the flat view back, read from the per-layer
config, where the layers come in the builder's two profiles (every sliding layer alike, every full layer alike), and
stops with one line where they do not. Nothing else of the builder is changed.
"""
from __future__ import annotations

import runpy
import sys

KEYS = ("head_dim", "num_key_value_heads")


def _profile(config, layer: int) -> tuple:
    return tuple(getattr(config.per_layer_config[layer], k) for k in KEYS)


def flatten_gemma4(config) -> None:
    """Give a ``gemma4_text`` config (``config`` or its ``text_config``) the flat keys the builder reads, from its
    per-layer config: the sliding layers' ``head_dim`` / ``num_key_value_heads`` and the full layers' as
    ``global_head_dim`` / ``num_global_key_value_heads``. Global reads of per-layer keys are allowed on both
    configs (the builder copies the text config's keys to the top level and reads them there)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "model_type", "") != "gemma4_text" or getattr(text, "per_layer_config", None) is None:
        return
    types = list(text.layer_types)
    profiles = {kind: {_profile(text, i) for i, t in enumerate(types) if t == kind} for kind in set(types)}
    if any(len(p) > 1 for p in profiles.values()) or set(profiles) - {"sliding_attention", "full_attention"}:
        raise SystemExit("error: this Gemma 4 checkpoint's layers do not come in onnxruntime-genai's two profiles "
                         f"(one sliding, one full): {profiles}; the model builder cannot write it")
    for c in {id(config): config, id(text): text}.values():
        c.allow_global_per_layer_attribute_access = True
    full = profiles.get("full_attention") or profiles.get("sliding_attention")
    head_dim, kv_heads = next(iter(full))
    object.__setattr__(text, "global_head_dim", head_dim)
    object.__setattr__(text, "num_global_key_value_heads", kv_heads)
    if "sliding_attention" in profiles:
        sliding = next(iter(profiles["sliding_attention"]))
        flat = tuple(getattr(text, k) for k in KEYS)  # the builder reads the sliding layers' from the flat keys
        if flat != sliding:
            raise SystemExit(f"error: this Gemma 4 checkpoint's sliding layers have {dict(zip(KEYS, sliding))}, its "
                             f"config {dict(zip(KEYS, flat))}, which the model builder would read: it cannot write it")


def main(argv: list[str]) -> None:
    from transformers import AutoConfig

    read = AutoConfig.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        config = read(cls, *args, **kwargs)
        flatten_gemma4(config)
        return config

    AutoConfig.from_pretrained = classmethod(from_pretrained)
    sys.argv = ["onnxruntime_genai.models.builder", *argv]
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
