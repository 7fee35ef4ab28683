"""The one registry of MoE families, keyed by the Hugging Face ``model_type`` (llm-compressor's
``MoEModelAttrs`` idea; REAP kept two registries in sync and suffered for it). Upcycling, calibration, every
scoring method, pruning, folding, ``--ffn-keep``, recovery and export read the adapters here
(:class:`~edgeprune.models.adapter.MoEAdapter`); each family is one file in ``edgeprune/models/families/``.
"""
from __future__ import annotations

from transformers import PretrainedConfig

from edgeprune.errors import ModelError
from edgeprune.models.adapter import MoEAdapter

ADAPTERS: dict[str, MoEAdapter] = {}


def register(adapter: MoEAdapter) -> MoEAdapter:
    ADAPTERS[adapter.model_type] = adapter
    return adapter


def all_adapters() -> list[MoEAdapter]:
    """Every registered family, by model_type."""
    _load()
    return [ADAPTERS[k] for k in sorted(ADAPTERS)]


def _load() -> None:
    if not ADAPTERS:
        from edgeprune.models import families

        for name in families.__all__:
            register(getattr(families, name).ADAPTER)


def adapter_for(config: PretrainedConfig | str) -> MoEAdapter:
    """The adapter of ``config.model_type``, or a one-line error listing the supported families."""
    _load()
    model_type = config if isinstance(config, str) else config.model_type
    try:
        return ADAPTERS[model_type]
    except KeyError:
        dense = [a.model_type for a in ADAPTERS.values() if a.dense and a.dense.config_class.model_type == model_type]
        hint = f"; it is the dense sibling of {', '.join(dense)}: nothing to prune" if dense else ""
        raise ModelError(f"model_type {model_type!r} is not a supported MoE family (supported: "
                         f"{', '.join(sorted(ADAPTERS))}){hint}") from None


def upcycle_adapter_for(config: PretrainedConfig) -> MoEAdapter:
    """The adapter whose dense family is ``config.model_type`` and that can upcycle it (BERT -> BERT-MoE)."""
    _load()
    for a in ADAPTERS.values():
        if a.extra.get("upcycle_from") == config.model_type:
            return a
    raise ModelError(f"cannot upcycle model_type {config.model_type!r} (supported dense families: "
                     f"{', '.join(sorted(a.extra['upcycle_from'] for a in ADAPTERS.values() if 'upcycle_from' in a.extra))})")
