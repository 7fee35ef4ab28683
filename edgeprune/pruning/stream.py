"""Streamed prune and fold: a plan applied checkpoint to checkpoint, one layer at a time.

The same per-layer code as the in-memory :func:`edgeprune.pruning.apply.apply_plan` and
:meth:`edgeprune.models.adapter.MoEAdapter.fold` (:func:`~edgeprune.pruning.apply.plan_layer`,
:meth:`~edgeprune.models.adapter.MoEAdapter.fold_layer`), fed from a lazy view of the original's safetensors
(:class:`edgeprune.scale.lazy.LazyCheckpoint`): per layer, only the kept experts' tensors and the layer's other
tensors are read (a fused 3-D expert tensor, Granite's or gpt-oss's, is read whole), the pruned (or folded)
layer is written as its own safetensors shard, and everything is freed before the next layer. The output is a
sharded checkpoint with ``model.safetensors.index.json``, loadable by ``from_pretrained``; its tensors equal the
in-memory path's (tested, tensor for tensor). Peak memory: about one layer of the original.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from edgeprune.models.adapter import zero_pad
from edgeprune.models.registry import adapter_for
from edgeprune.pruning import padding
from edgeprune.pruning.apply import plan_layer
from edgeprune.pruning.plan import PrunePlan, validate_plan
from edgeprune.scale.lazy import LazyCheckpoint, layer_of
from edgeprune.pruning.layerwise import layer_stack, skeleton
from edgeprune.scale.meter import trim


class _LayerState(dict):
    """The pruned model's tensors of one layer; a fused expert tensor is created empty, of the pruned model's
    shape, when the adapter first writes into it."""

    def __init__(self, shapes: dict[str, tuple[torch.Size, torch.dtype]]):
        super().__init__()
        self.shapes = shapes

    def __missing__(self, key):
        shape, dtype = self.shapes[key]
        t = self[key] = torch.empty(shape, dtype=dtype)
        return t


class _Chain(dict):
    """``first`` (the pruned layer) over ``then`` (the lazy original), each original tensor read once."""

    def __init__(self, first: dict, then: LazyCheckpoint, dtype: torch.dtype):
        super().__init__()
        self.first, self.then, self.dtype = first, then, dtype

    def __contains__(self, key):
        return key in self.first or key in self.then

    def __missing__(self, key):
        if key in self.first:
            return self.first[key]
        t = self.then[key]
        t = self[key] = t.to(self.dtype) if t.is_floating_point() else t
        return t

    def get(self, key, default=None):
        return self[key] if key in self else default


def _meta_state(model) -> dict[str, tuple[torch.Size, torch.dtype]]:
    return {k: (v.shape, v.dtype) for k, v in model.state_dict(keep_vars=True).items()}


def _layer_tensors(adapter, target_shapes: dict, prefix: str, layer, mapped: dict, view, folding: bool) -> dict:
    """The target's tensors of one layer: folded ones from ``mapped``, the rest from the pruned ``view``."""
    tensors = {}
    for key, (shape, dt) in target_shapes.items():
        if layer_of(key, prefix) != layer:
            continue
        t = mapped.get(key, view.get(key))
        if t is None:
            raise ValueError(f"streamed prune of {adapter.model_type}: no source for {key}")
        if t.shape != shape and not folding:
            raise ValueError(f"streamed prune: {key} has shape {tuple(t.shape)}, the pruned model {tuple(shape)}")
        tensors[key] = zero_pad(t, shape, key).to(dt).contiguous()
    return tensors


def stream_apply(model_dir: str | Path, plan: PrunePlan, out: str | Path, dtype: Optional[str] = None,
                 fold: bool = True, progress: bool = True, task=None, prompt: Optional[str] = None,
                 verbalisers=None, lm: bool = False) -> Path:
    """Write the original at ``model_dir`` pruned by ``plan`` (folded at k = 1 where the family has a dense
    sibling) into ``out`` as a sharded safetensors checkpoint (config + weights; no tokenizer). Returns ``out``.
    With ``lm`` (``--generate``) the checkpoint's causal LM is pruned, and folded into the sibling's
    ``...ForCausalLM``; else its classifier (a language model's label-word classifier)."""
    from accelerate import init_empty_weights

    out = Path(out)
    src_model = skeleton(model_dir, dtype, task, prompt, verbalisers, lm=lm)  # (task etc.: an LM's label words)
    adapter = adapter_for(src_model.config)
    validate_plan(plan, src_model, adapter)
    paths = adapter.block_paths(src_model)
    by_layer = {lp.layer: lp for lp in plan.layers}
    for layer, lp in by_layer.items():
        adapter.check_k(src_model.get_submodule(paths[layer]), lp.k)
    wdtype = next(src_model.parameters()).dtype
    config = src_model.config.__class__.from_dict(src_model.config.to_dict())
    padded = padding.resize_config(adapter, src_model, config, {l: lp.k for l, lp in by_layer.items()})
    with init_empty_weights(include_buffers=False):
        pruned = type(src_model)._from_config(config, dtype=wdtype)
        folding = fold and plan.folds and adapter.dense is not None
        dense_cls = adapter.fold_class(pruned) if folding else None
        target = (dense_cls._from_config(adapter.fold_config(pruned.config, dense_cls), dtype=wdtype)
                  if folding else pruned)
    prefix, stack = layer_stack(src_model)
    pruned_shapes, target_shapes = _meta_state(pruned), _meta_state(target)
    layers = sorted({layer_of(k, prefix) for k in target_shapes} - {None}) + [None]
    out.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    # read tensor by tensor: each read maps and unmaps its shard
    ckpt = LazyCheckpoint(model_dir, extra=src_model.edgeprune_extra, model=src_model)
    for n, layer in enumerate(tqdm(layers, desc="prune (streamed)", disable=not progress, unit="layer")):
        state = _LayerState({k: v for k, v in pruned_shapes.items() if layer_of(k, prefix) == layer})
        original = None
        if layer in by_layer:
            # one layer's original tensors, read at most once (a fused expert tensor serves every kept expert)
            original = _Chain({}, ckpt, wdtype)
            keys = adapter.router_keys(src_model, layer)
            plan_layer(adapter, original, state, paths[layer], by_layer[layer], keys, plan.merge_rule)
            if padded:
                padding.pad_layer(adapter, src_model, state, paths[layer], layer, keys, by_layer[layer].k,
                                  padded[layer])
        view = _Chain(state, ckpt, wdtype)
        mapped = adapter.fold_layer(view, paths[layer], pruned.get_submodule(paths[layer])) \
            if folding and layer in paths else {}
        tensors = _layer_tensors(adapter, target_shapes, prefix, layer, mapped, view, folding)
        name = f"model-{n + 1:05d}-of-{len(layers):05d}.safetensors"
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        for key, t in tensors.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
        del state, view, tensors, mapped, original
        trim()
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    target.config.save_pretrained(out)
    return out
