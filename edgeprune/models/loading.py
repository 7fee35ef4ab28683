"""Loading a user's (or edgeprune's) checkpoint for pruning: safetensors only, no remote code, tensors checked
against the config (:mod:`edgeprune.models.checkpoint`), the family resolved once (:func:`family_of`) and passed
to the stages that need it."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from edgeprune.errors import ConfigError, ModelError
from edgeprune.models.adapter import MoEAdapter
from edgeprune.models.labels import label_order, reorder_head
from edgeprune.models.registry import ADAPTERS, adapter_for, class_for
from edgeprune.models.tokenizer import load_tokenizer


def family_type(raw: dict) -> str:
    """The model type whose adapter prunes the checkpoint of config.json ``raw``: its own, or, for a multimodal
    checkpoint whose type is not registered, its text model's (``text_config.model_type``) where that is: the text
    MoE is what edgeprune prunes, and the artifact is the text model (the vision / audio towers are left out)."""
    text = (raw.get("text_config") or {}).get("model_type")
    return text if raw["model_type"] not in ADAPTERS and text in ADAPTERS else raw["model_type"]


def family_of(model_or_dir) -> MoEAdapter:
    """The adapter of a loaded model or of a checkpoint directory (read from its config.json)."""
    if isinstance(model_or_dir, (str, Path)):
        from edgeprune.models.checkpoint import read_config

        return adapter_for(family_type(read_config(model_or_dir)))
    return adapter_for(family_type(model_or_dir.config.to_dict()))


def load_model(model_dir: str | Path, dtype: Optional[str] = None, task=None,
               prompt: Optional[str] = None, verbalisers: Optional[Sequence[str]] = None,
               label_map=None) -> torch.nn.Module:
    """A local Hugging Face checkpoint of a supported MoE family as a sequence classifier: safetensors only, no
    remote code, tensors checked against the config (:mod:`edgeprune.models.checkpoint`); ``dtype`` defaults to
    the checkpoint's own. A checkpoint with only a language-model head becomes the family's classifier by
    label-word scoring (:mod:`edgeprune.models.label_words`; ``task`` gives the labels, ``prompt`` and
    ``verbalisers`` override the defaults). A classifier's labels are matched to the task's by name
    (:mod:`edgeprune.models.labels`; ``label_map`` maps other names), its head put into the task's order."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from edgeprune.models import label_words
    from edgeprune.models.checkpoint import load_checked, read_config, torch_dtype, weight_files

    raw = read_config(model_dir)
    adapter = adapter_for(family_type(raw))
    weight_files(model_dir)
    arch = " ".join(raw.get("architectures") or [])
    if adapter.model_type != raw["model_type"]:  # a multimodal checkpoint: its text MoE by label words
        from transformers import AutoModelForImageTextToText

        if task is None:
            raise ModelError(f"{model_dir}: a multimodal model classifies by label words; give the task")
        mm = load_checked(AutoModelForImageTextToText, model_dir, dtype=torch_dtype(dtype, raw))
        words = label_words.for_task(task, prompt, verbalisers).resolve(load_tokenizer(model_dir))
        return label_words.to_classifier(mm, words, task)
    if arch and "SequenceClassification" not in arch:
        lm_class = AutoModelForSeq2SeqLM if "ConditionalGeneration" in arch else AutoModelForCausalLM
        is_lm = "CausalLM" in arch or "ConditionalGeneration" in arch
        if not is_lm or not {"causal-lm", "seq2seq-lm"} & set(adapter.heads):
            raise ModelError(f"{model_dir}: a {arch} checkpoint has neither a sequence-classification nor a "
                             f"language-model head that edgeprune can use (heads of {adapter.model_type}: "
                             f"{', '.join(adapter.heads)})")
        if task is None:
            raise ModelError(f"{model_dir}: a language model classifies by label words; give the task")
        lm = load_checked(lm_class, model_dir, dtype=torch_dtype(dtype, raw))
        words = label_words.for_task(task, prompt, verbalisers).resolve(load_tokenizer(model_dir))
        return label_words.to_classifier(lm, words, task)
    if prompt is not None or verbalisers:
        raise ConfigError(f"{model_dir} has its own classification head; --prompt and --verbalisers are for "
                          "checkpoints with only a language-model head")
    order = label_order(raw.get("id2label") or {}, task, label_map, f"{model_dir}/config.json") if task else None
    model = load_checked(class_for(raw), model_dir, dtype=torch_dtype(dtype, raw))
    if order is not None:
        reorder_head(model, order, task)
    return model



# multimodal checkpoints whose text model ``--generate`` prunes and onnxruntime-genai's model builder exports (the
# builder takes these architectures whole and writes their text decoder)
MULTIMODAL_LM = ("Qwen3_5MoeForConditionalGeneration", "Gemma4ForConditionalGeneration")


def load_language_model(original_dir: str | Path, dtype: Optional[str] = None, moe: bool = True) -> torch.nn.Module:
    """``--generate``: the checkpoint's own causal LM (safetensors, checked against its config), of a supported
    MoE family unless not ``moe`` (a pruned and folded one); a :data:`MULTIMODAL_LM` checkpoint loads whole (its
    text MoE is pruned, its vision / audio towers stay so that the checkpoint keeps its class)."""
    from transformers import AutoModelForCausalLM

    from edgeprune.models.checkpoint import load_checked, read_config, torch_dtype, weight_files

    raw = read_config(original_dir)
    if moe:
        adapter_for(family_type(raw))
    archs = raw.get("architectures") or []
    if any(a in MULTIMODAL_LM for a in archs):  # the whole model: its text part generates, the towers are kept
        from transformers import AutoModelForImageTextToText

        weight_files(original_dir)
        return load_checked(AutoModelForImageTextToText, original_dir, dtype=torch_dtype(dtype, raw))
    if not any("CausalLM" in a for a in archs):
        raise ConfigError(f"--generate needs a language-model checkpoint (...ForCausalLM, or "
                          f"{' / '.join(MULTIMODAL_LM)}); {original_dir} is {', '.join(archs or ['unknown'])}")
    weight_files(original_dir)
    return load_checked(AutoModelForCausalLM, original_dir, dtype=torch_dtype(dtype, raw))


