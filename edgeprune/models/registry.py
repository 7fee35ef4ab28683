"""The one registry of MoE families, keyed by the Hugging Face ``model_type`` (llm-compressor's
``MoEModelAttrs`` idea; REAP kept two registries in sync and suffered for it). Upcycling, calibration, every
scoring method, pruning, folding, ``--ffn-keep``, recovery and export read the adapters here
(:class:`~edgeprune.models.adapter.MoEAdapter`); each family is one file in ``edgeprune/models/families/``.

Importing this module imports every family file, which registers the family's adapter and, where transformers
has none, its label-word classifier class (:mod:`edgeprune.models.label_words`): there is no lookup with a
side effect. The family files import only the adapter base and the label-word helpers, never this module, so
there is no import cycle.
"""
from __future__ import annotations

from transformers import AutoModelForSequenceClassification, PretrainedConfig
from transformers.utils import logging as hf_logging

from edgeprune.errors import ModelError
from edgeprune.models import bert_heads, families  # noqa: F401  (bert_heads: its class by name)
from edgeprune.models.adapter import MoEAdapter
from edgeprune.models.label_words import CLASSES

ADAPTERS: dict[str, MoEAdapter] = {}
# transformers 5 draws a "Loading weights" bar for every model it loads (edgeprune's stages say what they load)
hf_logging.disable_progress_bar()


def register(adapter: MoEAdapter) -> MoEAdapter:
    ADAPTERS[adapter.model_type] = adapter
    return adapter


for _name in families.__all__:
    _module = getattr(families, _name)
    for _adapter in getattr(_module, "ADAPTERS", None) or [_module.ADAPTER]:
        register(_adapter)


def all_adapters() -> list[MoEAdapter]:
    """Every registered family, by model_type."""
    return [ADAPTERS[k] for k in sorted(ADAPTERS)]


def find_adapter(model_type: str) -> MoEAdapter | None:
    """The adapter of ``model_type``, or None (a dense model, e.g. a folded sibling)."""
    return ADAPTERS.get(model_type)


def adapter_for(config: PretrainedConfig | str) -> MoEAdapter:
    """The adapter of ``config.model_type``, or a one-line error listing the supported families."""
    from edgeprune.models.families.refused import REFUSED

    model_type = config if isinstance(config, str) else config.model_type
    try:
        return ADAPTERS[model_type]
    except KeyError:
        if model_type in REFUSED:
            raise ModelError(f"model_type {model_type!r} is not supported: {REFUSED[model_type]}") from None
        dense = [a.model_type for a in ADAPTERS.values() if a.dense and a.dense.config_class.model_type == model_type]
        hint = f"; it is the dense sibling of {', '.join(dense)}: nothing to prune" if dense else ""
        raise ModelError(f"model_type {model_type!r} is not a supported MoE family (supported: "
                         f"{', '.join(sorted(ADAPTERS))}){hint}") from None


def upcycle_adapter_for(config: PretrainedConfig) -> MoEAdapter:
    """The adapter whose dense family is ``config.model_type`` and that can upcycle it (BERT -> BERT-MoE)."""
    for a in ADAPTERS.values():
        if a.extra.get("upcycle_from") == config.model_type:
            return a
    raise ModelError(f"cannot upcycle model_type {config.model_type!r} (supported dense families: "
                     f"{', '.join(sorted(a.extra['upcycle_from'] for a in ADAPTERS.values() if 'upcycle_from' in a.extra))})")


def class_for(config: dict) -> type:
    """The class to load a saved classifier with: edgeprune's own where config.json names one (T5's label words
    cannot be in the Auto mapping, T5 has a classifier there), else the Auto class."""
    return CLASSES.get((config.get("architectures") or [""])[0], AutoModelForSequenceClassification)


def load_classifier(model_dir):
    """A saved classifier (:func:`class_for`)."""
    from edgeprune.models.checkpoint import read_config

    return class_for(read_config(model_dir)).from_pretrained(model_dir).eval()

