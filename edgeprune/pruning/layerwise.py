"""Layer-wise calibration: the routing statistics of a checkpoint that does not fit in memory.

The model is built with its parameters on the meta device (``accelerate.init_empty_weights``: no memory), only
the tensors outside the layer stack (embeddings, final norm, head) are read, and the calibration set goes
through the stack one layer at a time, as the REAP authors' layer-wise observer and llm-compressor's
sequential onloading do:

1. one pass of the model with every layer replaced by a recorder captures, per batch, the first layer's input
   hidden states and the arguments the model gives each layer (attention mask, rotary embeddings, ...: computed
   once per batch by the model, they may differ per layer, e.g. gpt-oss's sliding-window layers);
2. for each layer: its tensors are read from the safetensors shards, every batch's hidden states go through it
   (the MoE block's input is captured by the same hook and turned into the same per-batch statistics as the
   in-memory pass, :func:`edgeprune.pruning.calibration.batch_stats`), the outputs replace the inputs, and the
   layer's tensors are dropped again.

Between layers only the calibration set's hidden states are kept: in memory up to ``max_hidden_bytes``, the rest
in files under ``offload_dir`` (a temporary directory by default). Batches are the in-memory pass's batches and
each layer computes what it computes inside the whole model, so the statistics, and every method's plan, are the
same bit for bit (tested for every method). Peak memory: the tensors outside the stack + one layer + the hidden
states kept in memory (:mod:`edgeprune.scale.memory`).

Encoder-decoder checkpoints (Switch) are refused: their stacks pass state between layers (T5's position bias)
that a recorder does not see.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from edgeprune.errors import ModelError
from edgeprune.scale.meter import trim
from edgeprune.models.registry import adapter_for, class_for
from edgeprune.pruning.calibration import (LayerStats, add_in_order, block_stats, calibration_batches, capture_input,
                                           empty_stats, logit_rows_per_batch)
from edgeprune.scale import distributed
from edgeprune.scale.hidden_store import HiddenStore
from edgeprune.scale.lazy import LazyCheckpoint, layer_of
from edgeprune.tasks.encoding import Encoded, model_inputs


class _Stop(Exception):
    """Raised by the last layer's recorder: nothing after the stack runs in the recording pass."""


def skeleton(model_dir: str | Path, dtype: Optional[str] = None, task=None, prompt: Optional[str] = None,
             verbalisers=None, label_map=None, lm: bool = False) -> nn.Module:
    """The checkpoint's classifier (with ``lm``: its causal LM, ``--generate``) with every parameter on the meta
    device (buffers real: rotary frequencies, position ids), in the dtype it would be loaded in.

    A language-model checkpoint becomes its label-word classifier as in memory
    (:func:`edgeprune.models.label_words.to_classifier`): the classifier's ``score`` rows are the verbalisers'
    LM-head rows (divided by Granite's ``logits_scaling``), read row by row from the shards and kept on the model as
    ``edgeprune_extra`` (a tensor that is in no shard: :class:`LazyCheckpoint` serves it from there)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from edgeprune.models.checkpoint import read_config, torch_dtype

    raw = read_config(model_dir)
    arch = " ".join(raw.get("architectures") or [])
    if raw.get("is_encoder_decoder"):
        raise ModelError(f"{model_dir}: {raw['model_type']} is an encoder-decoder, whose layers pass state the "
                         "layer-wise path does not see; drop --layerwise (the in-memory path)")
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    wdtype = torch_dtype(dtype, raw)
    extra = {}
    if lm:
        cls = _lm_class(model_dir, config, arch)
    elif arch and "SequenceClassification" not in arch:
        cls, extra = _label_word_class(model_dir, config, raw, arch, task, prompt, verbalisers, wdtype)
    else:
        from edgeprune.models.labels import label_order

        if task is not None and label_order(raw.get("id2label") or {}, task, label_map, f"{model_dir}/config.json"):
            raise ModelError(f"{model_dir}: the checkpoint's labels are the task's in another order, which the "
                             "layer-wise path does not reorder; re-save the checkpoint with the task's id2label order")
        cls = class_for(raw)
        cls = cls._model_mapping[type(config)] if hasattr(cls, "_model_mapping") else cls
    with init_empty_weights(include_buffers=False):
        model = cls._from_config(config, dtype=wdtype)
    model.edgeprune_extra = extra
    model.edgeprune_skeleton = True  # never whole in memory: not to be run or timed as a model (validate.speed)
    return model.eval()


def _label_word_class(model_dir, config, raw: dict, arch: str, task, prompt, verbalisers, wdtype) -> tuple:
    """(the sequence-classification class, ``{"score.weight": the verbalisers' LM-head rows}``) of a causal-LM
    checkpoint scored by label words; ``config`` is made the classifier's."""
    from transformers import AutoModelForSequenceClassification

    from edgeprune.models import label_words
    from edgeprune.models.tokenizer import load_tokenizer

    if "CausalLM" not in arch or task is None:
        raise ModelError(f"{model_dir}: a {arch} checkpoint has no sequence-classification head the layer-wise "
                         "path can use (a ...ForCausalLM classifies by label words, with the task given)")
    adapter_for(config)  # a supported family (its file registers a classifier class where transformers has none)
    words = label_words.for_task(task, prompt, verbalisers).resolve(load_tokenizer(model_dir))
    cls = AutoModelForSequenceClassification._model_mapping.get(type(config), None)
    if cls is None:
        raise ModelError(f"{config.model_type}: no sequence-classification class to score label words with")
    config.num_labels = task.num_labels
    config.id2label = dict(enumerate(task.labels))
    config.label2id = {l: i for i, l in enumerate(task.labels)}
    config.architectures = [cls.__name__]
    setattr(config, label_words.CONFIG_KEY, words.to_dict())
    ckpt = LazyCheckpoint(model_dir)
    head = "lm_head.weight" if "lm_head.weight" in ckpt else next(
        (k for k in ckpt if k.endswith("embed_tokens.weight")), None)
    if head is None:
        raise ModelError(f"{model_dir}: no lm_head.weight (nor a tied embed_tokens.weight) for the label rows")
    scale = float(raw.get("logits_scaling", 1.0) or 1.0)
    config.tie_word_embeddings = False
    return cls, {"score.weight": (ckpt.rows(head, words.token_ids).float() / scale).to(wdtype)}


def _lm_class(model_dir, config, arch: str) -> type:
    """The causal-LM class of a ``...ForCausalLM`` checkpoint, MoE or dense (a multimodal one loads whole: refused
    here)."""
    from transformers import AutoModelForCausalLM

    if "CausalLM" not in arch:
        raise ModelError(f"{model_dir}: the layer-wise path of --generate takes a ...ForCausalLM checkpoint, not "
                         f"{arch or 'one without architectures'}; drop --layerwise (the in-memory path)")
    try:
        adapter_for(config)  # a family's file registers its classes
    except ModelError:
        pass  # a dense causal LM (an MoE folded at k = 1)
    return AutoModelForCausalLM._model_mapping[type(config)]


def layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The path (``model.layers``) and module list of the decoder / encoder layers holding the MoE blocks; of a
    dense model (an MoE folded into its dense sibling at k = 1), the module list holding most of its parameters."""
    try:
        adapter = adapter_for(model.config)
        paths = list(adapter.block_paths(model).values())
    except ModelError:
        adapter, paths = None, []
    if not paths:  # a dense model, or an MoE family's class with every layer folded (DeepSeek, GLM-4-MoE)
        lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
        if lists:
            return max(lists, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))
        if adapter is None:
            raise ModelError(f"{model.config.model_type}: no list of layers found; the layer-wise path needs one")
    m = re.match(r"(.*)\.(\d+)\.", paths[0] + ".") if paths else None
    stack = model.get_submodule(m.group(1)) if m else None
    if not isinstance(stack, nn.ModuleList):
        raise ModelError(f"{adapter.model_type}: no layer stack found around {paths[:1]}; the layer-wise path "
                         "needs the MoE blocks inside a list of layers")
    return m.group(1), stack


def load_tensors(model: nn.Module, ckpt: LazyCheckpoint, names, dtype: torch.dtype) -> None:
    """Replace the (meta) parameters / buffers ``names`` of ``model`` by the checkpoint's tensors."""
    for name in names:
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        t = ckpt[name]
        t = t.to(dtype) if t.is_floating_point() else t
        if leaf in module._parameters:
            module._parameters[leaf] = nn.Parameter(t, requires_grad=False)
        else:
            module._buffers[leaf] = t


def unload(module: nn.Module) -> None:
    """Every parameter of ``module`` back to the meta device, and its memory given back to the system."""
    for sub in module.modules():
        for leaf, p in list(sub._parameters.items()):
            if p is not None:
                sub._parameters[leaf] = nn.Parameter(p.to("meta"), requires_grad=False)
    trim()


def model_keys(model: nn.Module) -> set[str]:
    return set(model.state_dict(keep_vars=True).keys())


def _first_tensor(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    """A layer's hidden-state input, positional or ``hidden_states=`` (taken out of ``kwargs``), unwrapped from the
    1-tuple that a recorder or a replayed layer returns."""
    return _first_tensor(args[0]) if args else _first_tensor(kwargs.pop("hidden_states"))


def _run_stack(model: nn.Module, ckpt: LazyCheckpoint, batches, store: HiddenStore, progress: bool,
               last: Optional[int] = None, on_output=None, head: bool = False, desc: str = "layer-wise",
               reduce=None):
    """The core of the layer-wise pass (see the module docstring): ``batches`` are ``(index, batch)``; layers
    ``0..last`` run one at a time, ``on_output(layer, batch index, mask)`` is called after each layer's batch
    (the calibration reads the MoE block's input there). With ``head``, every layer runs and a replay pass
    (every layer returning its stored output) lets the model's own code apply the final norm, pooling and head:
    returns ``{batch index: logits}`` (``reduce(batch index, logits)`` of them, where given)."""
    run = _StackPass(model, store)
    run.reduce = reduce
    last = len(run.stack) - 1 if last is None or head else last
    run.patched(run.recorder, run.record, batches)
    for i, layer in enumerate(tqdm(run.stack, desc=desc, disable=not progress, unit="layer")):
        if i > last:
            break
        run.layer(i, layer, ckpt, on_output, keep=i < last or head)
    if not head:
        return None
    run.patched(run.replay, run.read_head, batches)
    return run.logits


class _StackPass:
    """One layer-wise pass over ``model``'s layer stack. The model's own forward is run twice with every layer
    patched: first with recorders (the embeddings' output and each layer's extra arguments are recorded, and the
    pass stops at the last layer), at the end with replays (each layer returns its stored output, so the model's
    own code applies the final norm, pooling and head). In between, :meth:`layer` runs the real layers one at a
    time with their tensors loaded from the checkpoint."""

    def __init__(self, model: nn.Module, store: HiddenStore):
        self.model, self.store = model, store
        self.prefix, self.stack = layer_stack(model)
        self.wdtype = next(model.parameters()).dtype
        self.keys = model_keys(model)
        self.recorded: dict[int, dict] = {}
        self.masks: dict[int, torch.Tensor] = {}
        self.inputs_of: dict[int, dict] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.now: dict = {}
        self.reduce = None

    def recorder(self, i: int):
        def forward(*args, **kwargs):
            hidden = _hidden(args, kwargs)
            if i == 0:
                self.store.put(self.now["b"], hidden)
            self.recorded[self.now["b"]][i] = (tuple(args[1:]), kwargs)
            if i == len(self.stack) - 1:
                raise _Stop
            return (hidden,)
        return forward

    def replay(self, i: int):
        def forward(*args, **kwargs):
            hidden = _hidden(args, kwargs)
            if i < len(self.stack) - 1:
                return (hidden,)
            final = self.store.get(self.now["b"])
            return (final,) if self.now["tuple"] else final  # what the real layer returns, for the code after it
        return forward

    def patched(self, make, run, batches) -> None:
        for i, layer in enumerate(self.stack):
            layer.forward = make(i)
        try:
            for b, batch in batches:
                self.now["b"] = b
                run(b, batch)
        finally:
            for layer in self.stack:
                layer.__dict__.pop("forward", None)

    def record(self, b, batch) -> None:
        self.recorded[b] = {}
        self.masks[b] = batch["attention_mask"].reshape(-1).bool()
        self.inputs_of[b] = model_inputs(self.model, batch)
        if getattr(self.model.config, "use_cache", None) is not None:
            self.inputs_of[b]["use_cache"] = False
        try:
            self.model(**self.inputs_of[b])
        except _Stop:
            pass

    def layer(self, i: int, layer: nn.Module, ckpt: LazyCheckpoint, on_output, keep: bool) -> None:
        """Layer ``i`` over every recorded batch, its tensors loaded for the pass and given back after it."""
        load_tensors(self.model, ckpt, [k for k in self.keys if k in ckpt and layer_of(k, self.prefix) == i],
                     self.wdtype)
        try:
            for b in sorted(self.recorded):
                args, kwargs = self.recorded[b][i]
                raw = layer(self.store.get(b), *args, **kwargs)
                self.now["tuple"] = isinstance(raw, (tuple, list))
                out = _first_tensor(raw)
                if on_output is not None:
                    on_output(i, b, self.masks[b])
                if keep:
                    self.store.put(b, out)
        finally:
            unload(layer)

    def read_head(self, b, _batch) -> None:
        logits = self.model(**self.inputs_of[b]).logits.float()
        self.logits[b] = self.reduce(b, logits) if self.reduce is not None else logits


def _open(model_dir, dtype, model):
    model = model if model is not None else skeleton(model_dir, dtype)
    ckpt = LazyCheckpoint(model_dir, extra=getattr(model, "edgeprune_extra", None), model=model)
    keys = model_keys(model)
    params = dict(model.named_parameters())
    missing = sorted(k for k in keys if k not in ckpt and k in params)
    if missing:
        raise ModelError(f"{model_dir}: the weights do not match config.json ({len(missing)} weight(s) missing, "
                         f"e.g. {missing[0]}); is the config the one saved with these weights?")
    bad = sorted(k for k in keys if k in ckpt and k in params and k in ckpt.info and tuple(params[k].shape) != ckpt.info[k].shape)
    if bad:
        raise ModelError(f"{model_dir}: the weights do not match config.json (shape mismatch, e.g. {bad[0]}); is "
                         "the config the one saved with these weights?")
    prefix, _ = layer_stack(model)  # the tensors outside the layer stack stay loaded (embeddings, norm, head)
    load_tensors(model, ckpt, [k for k in keys if k in ckpt and layer_of(k, prefix) is None],
                 next(model.parameters()).dtype)
    return ckpt, model


@torch.no_grad()
def collect_routing_layerwise(model_dir: str | Path, enc: Encoded, max_examples: int = 2048, batch_size: int = 64,
                              max_logit_rows: int = 20000, progress: bool = True, dtype: Optional[str] = None,
                              max_hidden_bytes: Optional[int] = None, offload_dir: Optional[str | Path] = None,
                              model: Optional[nn.Module] = None,
                              output_rows: int = 0) -> tuple[dict[int, LayerStats], nn.Module]:
    """:func:`edgeprune.pruning.calibration.collect_routing` one layer at a time (see the module docstring).

    Returns the statistics and the skeleton, whose routers are loaded (scoring methods read router weights)."""
    ckpt, model = _open(model_dir, dtype, model)
    adapter = adapter_for(model.config)
    blocks = adapter.blocks(model)
    wdtype = next(model.parameters()).dtype
    n = min(len(enc), max_examples)
    rows = logit_rows_per_batch(max_logit_rows, batch_size, n)
    store = HiddenStore(max_hidden_bytes, offload_dir)
    parts, seen = {}, {}

    def on_output(i, b, mask):
        if i in blocks:
            parts[(i, b)] = block_stats(adapter, blocks[i], seen, i, b, mask, rows, output_rows)

    handles = [adapter.routing_input(blk).register_forward_pre_hook(capture_input(seen, i, adapter.routing_kwargs),
                                                                    with_kwargs=True) for i, blk in blocks.items()]
    try:
        batches = distributed.my_batches(calibration_batches(enc, max_examples, batch_size, "embed", progress))
        _run_stack(model, ckpt, batches, store, progress, last=max(blocks), on_output=on_output,
                   desc="calibrate (layer-wise)")
        # routers in memory for the scoring methods that read them (Chowdhury et al.)
        load_tensors(model, ckpt, [k for layer in blocks for k in adapter.router_keys(model, layer) if k in ckpt],
                     wdtype)
    finally:
        for h in handles:
            h.remove()
        store.close()
    return add_in_order(empty_stats(adapter, blocks), distributed.gather_parts(parts)), model


@torch.no_grad()
def logits_layerwise(model_dir: str | Path, enc: Encoded, batch_size: int = 64, progress: bool = True,
                     dtype: Optional[str] = None, max_hidden_bytes: Optional[int] = None,
                     offload_dir: Optional[str | Path] = None, model: Optional[nn.Module] = None,
                     lm: bool = False, reduce=None):
    """The original's logits on every example of ``enc`` (in ``enc``'s order), one layer at a time: what the
    build validates the artifact against when the original does not fit in memory. With ``lm`` (a causal LM,
    ``--generate``): a list, per example, of ``reduce(logits over its positions [length, vocab], example index)``
    (default: those logits), each batch reduced as soon as its head has run."""
    from edgeprune.tasks.encoding import collate

    model = model if model is not None or not lm else skeleton(model_dir, dtype, lm=True)
    ckpt, model = _open(model_dir, dtype, model)
    order = sorted(range(len(enc)), key=lambda i: len(enc.input_ids[i]))
    chunks = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    store = HiddenStore(max_hidden_bytes, offload_dir)
    keep = reduce or (lambda z, i: z)

    def per_example(b, logits):
        return [keep(logits[r, : len(enc.input_ids[i])].numpy(), i) for r, i in enumerate(chunks[b])]

    try:
        drop = ("labels", "token_type_ids") if lm else ("labels",)
        batches = [(b, {k: v for k, v in collate(enc, idx).items() if k not in drop}) for b, idx in enumerate(chunks)]
        out = _run_stack(model, ckpt, batches, store, progress, head=True, desc="original logits (layer-wise)",
                         reduce=per_example if lm else None)
    finally:
        store.close()
    if lm:
        result = [None] * len(enc)
        for b, idx in enumerate(chunks):
            for i, value in zip(idx, out[b]):
                result[i] = value
        return result
    logits = np.zeros((len(enc), next(iter(out.values())).shape[-1]), dtype=np.float32)
    for b, idx in enumerate(chunks):
        logits[idx] = out[b].numpy()
    return logits
