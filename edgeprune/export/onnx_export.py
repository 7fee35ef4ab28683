"""ONNX export with a parity check against PyTorch on real task inputs.

Every model (a dense fold such as BERT, Mistral or Qwen3; an MoE with k > 1 of any family; a family kept with one
expert; a fold into one of edgeprune's label-word classes) is exported with ``torch.onnx.export`` (the TorchScript
exporter, ``dynamo=False``: the dynamo exporter stops at the families' data-dependent expert loops) under the family
adapter's export patch (:meth:`~edgeprune.models.adapter.MoEAdapter.export_patch`: every kept expert computed and
combined with the routing weights). transformers 5 builds its attention masks without vmap (``use_vmap=False``),
so no mask patch is needed (optimum-onnx's ``sdpa_mask_without_vmap`` was, on 4.57). A traced MoE could silently
keep only the experts the example input reached; the dense dispatch has no such branch, and :func:`parity` on real
task inputs at several shapes gates every export.

Inputs are ``input_ids``, ``attention_mask`` and, for BERT, ``token_type_ids`` (int64), output ``logits``;
batch and sequence axes are dynamic unless the target fixes them. A k > 1 dense-dispatch graph also reads its
routers' top-k from ``top_k`` (int64 [1], stored as its default: :mod:`edgeprune.export.runtime_top_k`).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from edgeprune.errors import ExportError
from edgeprune.export.ort_session import pad_to, session  # noqa: F401
from edgeprune.export.runtime_top_k import INPUT, overridable, routed_top_k
from edgeprune.targets import Target
from edgeprune.tasks.encoding import Encoded, collate, model_inputs
from edgeprune.training.loop import predict_logits

INPUT_NAMES = ["input_ids", "attention_mask", "token_type_ids"]


@contextlib.contextmanager
def eager_attention(model: torch.nn.Module):
    """The model's eager attention while exporting, its own after: transformers 5's default is SDPA, whose traced
    graph ONNX Runtime's transformer optimizer does not fuse into ``Attention`` (the eager graph it does, measured on
    BERT: Attention 2 of 2 layers fused against 0 of 2)."""
    before = getattr(model.config, "_attn_implementation", None)
    if before in (None, "eager") or not hasattr(model, "set_attn_implementation"):
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def export_onnx(model: torch.nn.Module, model_dir: str | Path, out_path: str | Path, target: Target,
                max_tokens: int | None = None, large: bool = False) -> str:
    """Export to ``out_path``; returns the exporter used (``torch.onnx+dense_dispatch`` or ``torch.onnx+ort_moe`` for
    an MoE, ``torch.onnx`` for a dense model). ``max_tokens``: the longest input the artifact takes (checked where
    the export is exact only up to a length: :func:`~edgeprune.export.torchscript_fixes.check_dsa_length`); the
    model is traced under :func:`~edgeprune.export.torchscript_fixes.exportable`.

    ``large``: the dynamo exporter, weights into external data one tensor at a time (:mod:`edgeprune.export.large`
    says why), no run-time top-k input (its symbolic function is TorchScript's); exporter ``torch.onnx.dynamo``. A
    model on the meta device (``large`` only) is traced without weights, which are read from ``model_dir`` when
    the graph is written (:mod:`edgeprune.export.lazy_weights`)."""
    from edgeprune.errors import ModelError
    from edgeprune.export.ort_moe import maps_onto_ort_moe, ort_moe_patch
    from edgeprune.export.torchscript_fixes import check_dsa_length, exportable
    from edgeprune.models.registry import adapter_for

    out_path = Path(out_path)
    spec = target.export
    if max_tokens is not None:
        check_dsa_length(model, max_tokens)
    try:
        adapter = adapter_for(model.config)
    except ModelError:
        adapter = None
    b, s = (spec.batch_size, spec.sequence_length) if spec.fixed_shapes else (2, 16)
    feeds = model_inputs(model, _example_inputs(b, s))
    names = [n for n in INPUT_NAMES if n in feeds]
    axes = None if spec.fixed_shapes else {n: {0: "batch_size", 1: "sequence_length"} for n in names}
    if axes is not None:
        axes["logits"] = {0: "batch_size"}

    model.eval()
    # a model folded into its own class (every layer dense) still takes the family's other patches (DeepSeek-V2 rope)
    exporter = "torch.onnx+dense_dispatch" if adapter is not None and adapter.blocks(model) else "torch.onnx"
    patch = adapter.export_patch(model) if adapter is not None else contextlib.nullcontext()
    if adapter is not None and spec.moe_operator in ("ort", "qmoe") and maps_onto_ort_moe(adapter, model):
        patch, exporter = ort_moe_patch(adapter, model), "torch.onnx+ort_moe"
    routing = routing_of(adapter, model) if exporter == "torch.onnx+dense_dispatch" and not large else None
    if routing is not None:  # the routers' top-k as the graph input top_k (edgeprune.export.runtime_top_k)
        feeds[INPUT], names = torch.tensor([routing[1]]), names + [INPUT]

    args = tuple(feeds[n] for n in names)
    try:
        with patch, eager_attention(model), exportable(model), torch.no_grad():
            if large:
                _dynamo_export(_Logits(model, names, routing).eval(), args, out_path, names, axes, spec.opset,
                               _meta_weights(model, model_dir))
                exporter = exporter.replace("torch.onnx", "torch.onnx.dynamo")
            else:
                torch.onnx.export(_Logits(model, names, routing), args, str(out_path), input_names=names,
                                  output_names=["logits"], dynamic_axes=axes, opset_version=spec.opset, dynamo=False,
                                  custom_opsets={"com.microsoft": 1})
    except Exception as exc:
        raise ExportError(f"torch.onnx export of the {model.config.model_type} model failed: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    if routing is not None:
        overridable(out_path, routing[1])
    return exporter


def _example_inputs(b: int, s: int) -> dict[str, torch.Tensor]:
    """Every input a classifier may take, ``b`` x ``s`` (the trace's example; :func:`model_inputs` keeps the model's)."""
    return {"input_ids": torch.ones(b, s, dtype=torch.long), "attention_mask": torch.ones(b, s, dtype=torch.long),
            "token_type_ids": torch.zeros(b, s, dtype=torch.long)}


class _Logits(torch.nn.Module):
    """``model``'s logits from positional inputs named ``names`` (the last one ``top_k`` when ``routing`` is given:
    the routers then route to that many experts)."""

    def __init__(self, model, names: list, routing):
        super().__init__()
        self.m, self.names, self.routing = model, names, routing

    def forward(self, *inputs):
        kw = dict(zip(self.names, inputs))
        with routed_top_k(kw.pop(INPUT), *self.routing) if self.routing else contextlib.nullcontext():
            return self.m(**kw).logits


def _meta_weights(model: torch.nn.Module, model_dir):
    """The checkpoint's tensors under the model's names, read on access, when the model's parameters are on the meta
    device (a skeleton: :func:`edgeprune.pruning.layerwise.skeleton`); None for a loaded model."""
    if not next(model.parameters()).is_meta:
        return None
    from edgeprune.scale.lazy import LazyCheckpoint

    return LazyCheckpoint(model_dir, extra=getattr(model, "edgeprune_extra", None), model=model)


LARGE_BYTES = 1 << 30  # weights above this export with the dynamo exporter into external data (export_onnx)
DYNAMO_MIN_OPSET = 18  # the dynamo exporter's lowest opset


def _dynamo_export(wrapper, args: tuple, out_path: Path, names: list, axes: dict | None, opset: int,
                   weights=None) -> None:
    """``torch.onnx.export(dynamo=True)`` of ``wrapper`` at ``max(opset, 18)``, weights into external data.

    ``weights`` (a name -> tensor mapping): the model's parameters are on the meta device, and each initializer is
    read from ``weights`` when the graph is saved, one at a time (:mod:`edgeprune.export.lazy_weights`); the
    transposed weights and per-expert slices are folded lazily before the exporter's optimizer runs."""
    import onnx_ir as ir
    import onnxscript

    from edgeprune.export import lazy_weights

    shapes, constants = None, None
    if axes is not None:
        batch, seq = torch.export.Dim("batch_size"), torch.export.Dim("sequence_length")
        shapes = ({0: batch, 1: seq},) * len(args)
    if weights is not None:  # everything on the meta device (lazy_weights says why); buffers' values kept
        constants = {n: b for n, b in wrapper.named_buffers() if not b.is_meta}
        wrapper, args = wrapper.to("meta"), tuple(a.to("meta") for a in args)
    program = torch.onnx.export(wrapper, args, input_names=names, output_names=["logits"], dynamo=True,
                                dynamic_shapes=(shapes,) if shapes else None, opset_version=max(opset, DYNAMO_MIN_OPSET),
                                optimize=weights is None, verbose=False)
    if weights is not None:
        lazy_weights.attach(program.model, weights, prefix="m.", constants=constants)
        lazy_weights.fold_views(program.model)
        onnxscript.optimizer.optimize(program.model)
    ir.save(program.model, str(out_path), external_data=out_path.name + ".data")
    del program


def routing_of(adapter, model) -> tuple[int, int] | None:
    """(Z, top-k) of a model whose MoE layers all keep Z > 1 experts with one top-k (None otherwise: one expert
    per layer has no routing to change; layers that differ keep their graph's constants)."""
    blocks = list(adapter.blocks(model).values())
    if not adapter.runtime_top_k:
        return None
    pairs = {(adapter.num_experts(b), adapter.top_k(b)) for b in blocks}
    if len(pairs) != 1:
        return None
    z, k = pairs.pop()
    return (z, k) if z > 1 else None


def onnx_logits(path: str | Path, enc: Encoded, batch_size: int = 32, fixed_length: int | None = None,
                threads: int = 2, extra: dict | None = None, segmented: bool = False) -> np.ndarray:
    """Logits of the ONNX model on ``enc`` (padded per batch, or to ``fixed_length`` for fixed shapes); ``extra``:
    more feeds (``top_k``). ``segmented``: the graph run one layer at a time (:mod:`edgeprune.export.segments`),
    for a graph whose weights do not fit in memory beside the build."""
    if segmented:
        from edgeprune.export import segments

        segs = segments.Segments(path)
        graph = segs.model.graph
        inputs = [(i.name, i.type.tensor_type.shape.dim[0]) for i in graph.input if i.name not in segs.inits]
        first = inputs[0][1]
        names, fixed_batch = {n for n, _ in inputs}, first.dim_value if first.HasField("dim_value") else None
        batches = list(_batches(enc, names, fixed_batch or batch_size, fixed_batch, fixed_length))
        got = segments.run(segs, [{**f, **(extra or {})} for _, f in batches], threads)
        at = [o.name for o in graph.output].index("logits")
        runs = [(idx, out[at]) for (idx, _), out in zip(batches, got)]
    else:
        sess = session(path, threads)
        names = {i.name for i in sess.get_inputs()}
        fixed_batch = sess.get_inputs()[0].shape[0] if isinstance(sess.get_inputs()[0].shape[0], int) else None
        runs = ((idx, sess.run(["logits"], {**f, **(extra or {})})[0])
                for idx, f in _batches(enc, names, fixed_batch or batch_size, fixed_batch, fixed_length))
    out = None
    for idx, logits in runs:
        logits = logits[: len(idx)].astype(np.float32)
        if out is None:
            out = np.zeros((len(enc), logits.shape[1]), dtype=np.float32)
        out[idx] = logits
    return out


def _batches(enc: Encoded, names: set, bs: int, fixed_batch: int | None, fixed_length: int | None):
    """(example indices, feeds) of ``enc`` in batches of ``bs`` sorted by length, padded to the fixed shape."""
    order = sorted(range(len(enc)), key=lambda i: len(enc.input_ids[i]))
    for start in range(0, len(order), bs):
        idx = order[start : start + bs]
        feeds = {k: v.numpy() for k, v in collate(enc, idx).items() if k in names}
        if fixed_length is not None or fixed_batch:
            feeds = pad_to(feeds, fixed_batch or len(idx), fixed_length or feeds["input_ids"].shape[1], enc.pad_id)
        yield idx, feeds


def truncate(enc: Encoded, length: int) -> Encoded:
    """Encoded examples cut to ``length`` tokens (fixed-shape targets see at most that many)."""
    return Encoded([i[:length] for i in enc.input_ids], [t[:length] for t in enc.token_type_ids], enc.labels, enc.pad_id)


def reference_logits(model: torch.nn.Module, enc: Encoded, fixed_length: int | None = None) -> np.ndarray:
    """PyTorch's logits on the examples :func:`parity` compares (cut to ``fixed_length`` for fixed shapes)."""
    return predict_logits(model, truncate(enc, fixed_length) if fixed_length is not None else enc)


def parity(onnx_path: str | Path, model: torch.nn.Module | np.ndarray, enc: Encoded, atol: float = 1e-3,
           min_agreement: float = 0.995, fixed_length: int | None = None,
           batch_sizes: tuple[int, ...] = (1, 7, 32), segmented: bool = False) -> dict:
    """Compare ONNX and PyTorch logits on real inputs, the ONNX model run at several batch sizes (each batch
    padded to its longest example, so the sequence lengths vary too; a fixed-shape model at its one shape);
    raise :class:`ExportError` if parity is lost at any of them. ``model`` may be PyTorch's logits already
    (:func:`reference_logits`: a large model is freed before ONNX Runtime loads its graph). ``segmented``: the graph
    run one layer at a time (:func:`onnx_logits`)."""
    ref = model if isinstance(model, np.ndarray) else reference_logits(model, enc, fixed_length)
    if fixed_length is not None:
        enc = truncate(enc, fixed_length)
    sizes = batch_sizes if fixed_length is None else (None,)
    per_batch, worst, agree = {}, 0.0, 1.0
    for bs in sizes:
        try:
            got = onnx_logits(onnx_path, enc, batch_size=bs or 32, fixed_length=fixed_length, segmented=segmented)
        except Exception as exc:  # a graph traced for one shape that fails at another
            raise ExportError(f"ONNX export lost parity with PyTorch: ONNX Runtime fails on task inputs at batch size "
                              f"{bs or 'fixed'} ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})") from None
        diff = float(np.abs(ref - got).max()) if np.isfinite(got).all() else float("inf")
        per_batch[str(bs or "fixed")] = diff
        worst, agree = max(worst, diff), min(agree, float((ref.argmax(-1) == got.argmax(-1)).mean()))
    result = {"examples": len(enc), "max_abs_logit_diff": worst, "agreement": agree, "atol": atol,
              "by_batch_size": per_batch}
    if worst > atol or agree < min_agreement:
        raise ExportError(f"ONNX export lost parity with PyTorch on {len(enc)} task examples: max logit difference "
                          f"{worst:.3g} (allowed {atol}; by batch size {per_batch}), agreement {agree:.4f} "
                          f"(required {min_agreement})")
    return result
