"""Attention heads of a BERT-family classifier: a gate on each head's output (for Michel et al.'s importance,
:mod:`edgeprune.pruning.structure`) and the removal of heads.

transformers 5 dropped BERT's ``head_mask`` argument and ``prune_heads`` method (4.57 had both). The same two
operations are here, on transformers 5's ``BertSelfAttention`` (query / key / value ``Linear``s of
``num_attention_heads * attention_head_size`` rows, the output projection ``attention.output.dense``):

* :func:`head_gates`: a forward hook multiplies each head's context vector by ``gate[l, h]``, which is what
  ``head_mask`` did (it scaled the head's attention probabilities, hence its context, by the gate);
* :func:`slice_heads`: query / key / value keep the rows of the kept heads, the output projection their columns;
  the config records ``pruned_heads`` (``{layer: [heads]}``) as 4.57's did.

A head-pruned BERT is saved as :class:`BertPrunedHeadsForSequenceClassification` (``architectures``), which edgeprune
loads (:func:`edgeprune.models.registry.class_for`): stock transformers 5 cannot read narrower attention in BERT.
The ONNX artifact, which is what apps load, has no such limit.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from transformers import BertForSequenceClassification

from edgeprune.models.label_words import CLASSES


def self_attentions(model: nn.Module) -> list[nn.Module]:
    """Each layer's ``BertSelfAttention`` (with its ``attention.output`` beside it), in layer order."""
    return [layer.attention for layer in model.base_model.encoder.layer]


def supports_heads(model: nn.Module) -> bool:
    """A BERT-family encoder (transformers' ``BertSelfAttention`` layout)."""
    try:
        atts = self_attentions(model)
    except AttributeError:
        return False
    return bool(atts) and all(hasattr(a, "self") and hasattr(a.self, "attention_head_size") for a in atts)


@contextlib.contextmanager
def head_gates(model: nn.Module, gate: torch.Tensor) -> Iterator[None]:
    """Every head's context scaled by ``gate[l, h]`` (layers x heads) while inside; hooks removed on exit."""
    hooks = []

    def hook(layer: int):
        def scale(module, _args, out):
            ctx = out[0] if isinstance(out, tuple) else out
            b, t, _ = ctx.shape
            heads = module.num_attention_heads
            ctx = (ctx.reshape(b, t, heads, -1) * gate[layer, :heads].to(ctx.dtype)[None, None, :, None]).reshape(b, t, -1)
            return (ctx, *out[1:]) if isinstance(out, tuple) else ctx
        return scale

    try:
        for l, att in enumerate(self_attentions(model)):
            hooks.append(att.self.register_forward_hook(hook(l)))
        yield
    finally:
        for h in hooks:
            h.remove()


def _rows(linear: nn.Linear, idx: torch.Tensor) -> nn.Linear:
    new = nn.Linear(linear.in_features, len(idx), bias=linear.bias is not None).to(linear.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(linear.weight[idx])
        if linear.bias is not None:
            new.bias.copy_(linear.bias[idx])
    return new


def slice_heads(model: nn.Module, drop: dict[int, list[int]], record: bool = True) -> None:
    """Remove heads ``drop`` ({layer: [head, ...]}) in place; ``record``: add them to ``config.pruned_heads``."""
    atts = self_attentions(model)
    for l, heads in drop.items():
        att = atts[int(l)]
        sa, d = att.self, att.self.attention_head_size
        keep = [h for h in range(sa.num_attention_heads) if h not in set(heads)]
        idx = torch.cat([torch.arange(h * d, (h + 1) * d) for h in keep])
        sa.query, sa.key, sa.value = _rows(sa.query, idx), _rows(sa.key, idx), _rows(sa.value, idx)
        dense = att.output.dense
        new = nn.Linear(len(idx), dense.out_features, bias=dense.bias is not None).to(dense.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(dense.weight[:, idx])
            if dense.bias is not None:
                new.bias.copy_(dense.bias)
        att.output.dense = new
        sa.num_attention_heads, sa.all_head_size = len(keep), len(keep) * d
    if record:
        done = {int(l): list(h) for l, h in (getattr(model.config, "pruned_heads", None) or {}).items()}
        for l, heads in drop.items():
            done[int(l)] = sorted(set(done.get(int(l), [])) | set(heads))
        model.config.pruned_heads = {l: h for l, h in sorted(done.items())}
        if type(model) is BertForSequenceClassification:  # saved (architectures) as the class that reloads it
            model.__class__ = BertPrunedHeadsForSequenceClassification


class BertPrunedHeadsForSequenceClassification(BertForSequenceClassification):
    """``BertForSequenceClassification`` with the heads of ``config.pruned_heads`` removed (see the module
    docstring): built full, then sliced, then loaded."""

    def __init__(self, config):
        super().__init__(config)
        pruned = getattr(config, "pruned_heads", None) or {}
        if pruned:
            slice_heads(self, {int(l): h for l, h in pruned.items()}, record=False)


CLASSES[BertPrunedHeadsForSequenceClassification.__name__] = BertPrunedHeadsForSequenceClassification
