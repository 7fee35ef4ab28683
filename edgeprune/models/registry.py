"""One adapter per MoE family, keyed by the Hugging Face ``model_type``: the single registry that upcycling,
routing hooks, pruning, folding and export all read (llm-compressor's ``MoEModelAttrs`` idea; REAP kept two
registries in sync and suffered for it).

An adapter knows how to find the MoE blocks of a model and how the parameters of one expert map onto the
FFN of the dense model of the same family (``ffn_map``), which is what upcycling (dense -> experts) and
folding (one expert -> dense) both need.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn
from transformers import BertConfig, BertForSequenceClassification, BertModel, PretrainedConfig

from edgeprune.errors import ModelError
from edgeprune.models.bert_moe import (BertMoeBlock, BertMoeConfig, BertMoeForSequenceClassification,
                                       BertMoeModel)


@dataclass(frozen=True)
class MoEAdapter:
    """How edgeprune sees one MoE family.

    ``ffn_map`` maps an expert parameter suffix to the dense layer's parameter suffix, e.g.
    ``w_in.weight -> intermediate.dense.weight``; ``expert_prefix(layer, e)`` and ``dense_prefix(layer)``
    give the state-dict prefixes (inside the base model) of expert ``e`` and of the dense FFN of ``layer``.
    """

    model_type: str
    config_class: type[PretrainedConfig]
    base_class: type[nn.Module]
    classifier_class: type[nn.Module]
    dense_config_class: type[PretrainedConfig]
    dense_base_class: type[nn.Module]
    dense_classifier_class: type[nn.Module]
    dense_model_type: str
    ffn_map: dict[str, str]
    expert_prefix: Callable[[int, int], str]
    router_key: Callable[[int], str]
    dense_prefix: Callable[[int], str]
    base_prefix: str

    def blocks(self, model: nn.Module) -> dict[int, BertMoeBlock]:
        """MoE blocks by layer index."""
        return model.moe_blocks()


BERT_MOE = MoEAdapter(
    model_type="bert_moe",
    config_class=BertMoeConfig,
    base_class=BertMoeModel,
    classifier_class=BertMoeForSequenceClassification,
    dense_config_class=BertConfig,
    dense_base_class=BertModel,
    dense_classifier_class=BertForSequenceClassification,
    dense_model_type="bert",
    ffn_map={"w_in.weight": "intermediate.dense.weight", "w_in.bias": "intermediate.dense.bias",
             "w_out.weight": "output.dense.weight", "w_out.bias": "output.dense.bias"},
    expert_prefix=lambda layer, e: f"encoder.layer.{layer}.moe.experts.{e}.",
    router_key=lambda layer: f"encoder.layer.{layer}.moe.router.weight",
    dense_prefix=lambda layer: f"encoder.layer.{layer}.",
    base_prefix="bert.",
)

ADAPTERS: dict[str, MoEAdapter] = {BERT_MOE.model_type: BERT_MOE}
DENSE_TO_MOE: dict[str, MoEAdapter] = {a.dense_model_type: a for a in ADAPTERS.values()}


def adapter_for(config: PretrainedConfig) -> MoEAdapter:
    """The adapter of ``config.model_type``, or a one-line error listing the supported families."""
    try:
        return ADAPTERS[config.model_type]
    except KeyError:
        raise ModelError(f"model_type {config.model_type!r} is not a supported MoE family "
                         f"(supported: {', '.join(sorted(ADAPTERS))})") from None


def upcycle_adapter_for(config: PretrainedConfig) -> MoEAdapter:
    """The adapter whose dense family is ``config.model_type`` (for upcycling a dense checkpoint)."""
    try:
        return DENSE_TO_MOE[config.model_type]
    except KeyError:
        raise ModelError(f"cannot upcycle model_type {config.model_type!r} "
                         f"(supported dense families: {', '.join(sorted(DENSE_TO_MOE))})") from None
