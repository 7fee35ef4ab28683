"""Structural pruning of the folded (dense) model below the dense floor: whole layers (depth) and attention heads.
Each compression is a config object with a registered handler (``HANDLERS``); :func:`apply` runs the ones a
:class:`~edgeprune.pruning.pipeline.PruneConfig` asks for, in order, before recovery (which distils the
pruned model from the original MoE, as after expert pruning).

Depth, ``--drop-layers N`` (:class:`LayerDrop`): every layer i gets the *block influence* of ShortGPT (Men et
al. 2024, "ShortGPT: Layers in Large Language Models are More Redundant Than You Expect"), the expected change
of direction it makes to the hidden state on the task's tokens,

    BI_i = 1 - E_{x,t}[ <h_i(x)_t, h_{i+1}(x)_t> / (||h_i(x)_t|| ||h_{i+1}(x)_t||) ],

(h_i: the input of layer i, h_{i+1} its output; t over non-padding tokens of training examples), and the N
layers with the smallest BI are removed. A layer that is an identity has BI = 0 and removing it changes nothing.

Heads, ``--heads-keep P`` (:class:`HeadPrune`): the importance of head h in layer l is Michel et al.'s (2019,
"Are Sixteen Heads Really Better than One?", eq. 2) expected absolute sensitivity of the task loss to a gate
xi_{l,h} on the head's output,

    I_{l,h} = E_x | dL(x) / d xi_{l,h} |,   at xi = 1,

computed with a gate on each head's output (:func:`edgeprune.models.bert_heads.head_gates`, what BERT's
``head_mask`` did before transformers 5; L: cross-entropy against the task labels; the absolute value is
taken per batch of 8 examples, as the authors' code does per batch), normalised per layer by its l2 norm as in
the paper. Every layer keeps its ``max(1, round(P * H))`` most important heads (the same
number in every layer, so the ONNX Runtime attention fusion sees one head count) by
:func:`edgeprune.models.bert_heads.slice_heads` (transformers 5 dropped BERT's ``prune_heads``), which slices Q, K,
V and the output projection and records ``pruned_heads`` in the config so that edgeprune reloads the checkpoint as it
is. A head whose output projection columns are zero contributes nothing and has I = 0. Heads need BERT's attention
layout (the default model's fold); others get a one-line error.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from edgeprune.errors import ConfigError
from edgeprune.pruning.calibration import calibration_batches
from edgeprune.tasks.encoding import Encoded, model_inputs


@dataclass(frozen=True)
class LayerDrop:
    """Remove the ``drop`` layers with the smallest block influence."""

    drop: int


@dataclass(frozen=True)
class HeadPrune:
    """Keep ``round(keep * heads)`` attention heads per layer, by Michel et al.'s importance."""

    keep: float


HANDLERS: dict[type, Callable] = {}


def handler(cls: type):
    def register(fn):
        HANDLERS[cls] = fn
        return fn
    return register


def layer_list(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The model's list of transformer layers: the ModuleList with ``num_hidden_layers`` entries."""
    n = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n and name.endswith(("layer", "layers")):
            return name, module
    raise ConfigError(f"{model.config.model_type}: no list of {n} layers found to drop layers from")


@torch.no_grad()
def block_influence(model: torch.nn.Module, enc: Encoded, max_examples: int = 512, batch_size: int = 64,
                    progress: bool = True) -> np.ndarray:
    """BI_i per layer (module docstring), from the hidden states the model returns."""
    n = model.config.num_hidden_layers
    sums, count = np.zeros(n), 0
    model.eval()
    for batch in calibration_batches(enc, max_examples, batch_size, "block influence", progress):
        out = model(**model_inputs(model, batch), output_hidden_states=True)
        hs = out.hidden_states
        if hs is None or len(hs) != n + 1:
            raise ConfigError(f"{model.config.model_type}: the model does not return one hidden state per layer")
        mask = batch["attention_mask"].bool()
        for i in range(n):
            cos = torch.nn.functional.cosine_similarity(hs[i].float(), hs[i + 1].float(), dim=-1, eps=1e-12)
            sums[i] += float((1 - cos)[mask].sum())
        count += int(mask.sum())
    return sums / max(count, 1)


@handler(LayerDrop)
def drop_layers(model: torch.nn.Module, cfg: LayerDrop, enc: Encoded, max_examples: int, progress: bool):
    """The model without its ``cfg.drop`` least influential layers (in place; config and layer indices updated)."""
    n = model.config.num_hidden_layers
    if not 0 < cfg.drop < n:
        raise ConfigError(f"--drop-layers {cfg.drop}: the model has {n} layers; drop between 1 and {n - 1}")
    name, layers = layer_list(model)
    bi = block_influence(model, enc, max_examples, progress=progress)
    dropped = sorted(int(i) for i in np.argsort(bi, kind="stable")[: cfg.drop])
    kept = [i for i in range(n) if i not in dropped]
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    setattr(parent, name.rsplit(".", 1)[-1], torch.nn.ModuleList([layers[i] for i in kept]))
    for new_index, layer in enumerate(model.get_submodule(name)):
        for module in layer.modules():  # decoders index their KV cache by it
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    model.config.num_hidden_layers = len(kept)
    for key in ("layer_types",):  # per-layer config lists follow the kept layers
        values = getattr(model.config, key, None)
        if isinstance(values, list) and len(values) == n:
            setattr(model.config, key, [values[i] for i in kept])
    if getattr(model.config, "pruned_heads", None):
        model.config.pruned_heads = {kept.index(int(l)): h for l, h in model.config.pruned_heads.items()
                                     if int(l) in kept}
    return model, {"dropped": dropped, "layers": [n, len(kept)],
                   "block_influence": [round(float(b), 5) for b in bi]}


def head_importance(model: torch.nn.Module, enc: Encoded, max_examples: int = 512, batch_size: int = 8,
                    progress: bool = True) -> np.ndarray:
    """I_{l,h} (module docstring), layers x heads, each layer normalised to unit l2 norm."""
    from edgeprune.models.bert_heads import head_gates, supports_heads

    cfg = model.config
    if not supports_heads(model):
        raise ConfigError(f"--heads-keep: {cfg.model_type} is not a BERT-family encoder (heads are gated and removed "
                          "in BERT's attention layout); prune heads of a BERT-family fold")
    heads = cfg.num_attention_heads
    gate = torch.ones(cfg.num_hidden_layers, heads, requires_grad=True)
    total = torch.zeros(cfg.num_hidden_layers, heads)
    n = min(len(enc), max_examples)
    model.eval()
    for batch in calibration_batches(enc, max_examples, batch_size, "head importance", progress, labels=True):
        labels = batch.pop("labels")
        with head_gates(model, gate):
            logits = model(**model_inputs(model, batch)).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
        (grad,) = torch.autograd.grad(loss, gate)
        total += grad.abs()  # |gradient| per small batch, as in the authors' code (batch_size 8 here)
    model.zero_grad(set_to_none=True)
    imp = (total / max(n, 1)).numpy()
    norm = np.linalg.norm(imp, axis=1, keepdims=True)
    return imp / np.where(norm > 0, norm, 1)


@handler(HeadPrune)
def prune_heads(model: torch.nn.Module, cfg: HeadPrune, enc: Encoded, max_examples: int, progress: bool):
    """Keep ``max(1, round(keep * H))`` heads per layer (in place, transformers' ``prune_heads``)."""
    if not 0 < cfg.keep <= 1:
        raise ConfigError(f"--heads-keep must be in (0, 1], got {cfg.keep}")
    heads = model.config.num_attention_heads
    if getattr(model.config, "pruned_heads", None):
        raise ConfigError("--heads-keep: the model's heads were pruned already (config pruned_heads)")
    keep = max(1, int(round(cfg.keep * heads)))
    imp = head_importance(model, enc, max_examples, progress=progress)
    drop = {l: sorted(int(h) for h in np.argsort(-imp[l], kind="stable")[keep:]) for l in range(len(imp))}
    from edgeprune.models.bert_heads import slice_heads

    slice_heads(model, {l: h for l, h in drop.items() if h})
    return model, {"keep": cfg.keep, "heads": [heads, keep], "pruned": {str(l): h for l, h in drop.items()},
                   "importance": [[round(float(x), 4) for x in row] for row in imp]}


def requested(drop_layers: int = 0, heads_keep: float = 1.0) -> list:
    """The compressions a PruneConfig asks for, in the order they run (layers first: fewer heads to score)."""
    out: list = []
    if drop_layers:
        out.append(LayerDrop(drop_layers))
    if heads_keep < 1:
        out.append(HeadPrune(heads_keep))
    return out


def apply(model: torch.nn.Module, compressions: list, enc: Encoded, max_examples: int = 512,
          progress: bool = True) -> tuple[torch.nn.Module, dict]:
    """Run each compression's registered handler; returns the model and a record per compression."""
    info = {}
    for c in compressions:
        model, info[type(c).__name__] = HANDLERS[type(c)](model, c, enc, max_examples, progress)
    return model, info
