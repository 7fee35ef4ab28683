"""The classifier's export stage: ONNX export (parity-checked against PyTorch on task inputs), fixed shapes where
the target wants them, ONNX Runtime's transformer fusions, the target's quantization and variants, the ORT format
and the mobile usability check. Cached (:class:`edgeprune.build.stage.Stage`): a reused export must reproduce the
logits it recorded on the parity sample."""
from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

import numpy as np

from edgeprune.build.config import BuildConfig, log
from edgeprune.cache import Stage, dir_sha256
from edgeprune.targets import Target


def ort_model_type(model, adapter) -> Optional[str]:
    """The ORT transformer optimizer's model type for ``model`` (a dense sibling's or an MoE family's;
    ``adapter`` None for a folded decoder such as Mistral or Qwen3: plain ORT optimisation)."""
    if model.config.model_type == "bert":
        return "bert"
    return adapter.ort_model_type if adapter is not None else None


def attention_shape(config) -> tuple[int, int]:
    """Heads and attention width for ONNX Runtime's attention fusion: after ``--heads-keep`` every layer has the
    same, smaller number of heads (config ``pruned_heads``) and the attention width shrinks with it."""
    heads, hidden = config.num_attention_heads, config.hidden_size
    pruned = getattr(config, "pruned_heads", None) or {}
    if pruned:
        left = {heads - len(set(h)) for h in pruned.values()}
        if len(pruned) != config.num_hidden_layers or len(left) != 1:
            return 0, 0  # uneven: the optimizer reads each attention's shape from the graph
        kept = left.pop()
        return kept, kept * (hidden // heads)
    return heads, hidden


def describe(model) -> tuple[tuple[int, int], Optional[str]]:
    """What the ORT transformer optimizer needs of ``model``: attention heads and width, its model type."""
    from edgeprune.models.registry import find_adapter

    return attention_shape(model.config), ort_model_type(model, find_adapter(model.config.model_type))


def fixed_shape(t: Target) -> Optional[tuple[int, int]]:
    return (t.export.batch_size, t.export.sequence_length) if t.export.fixed_shapes else None


def stage_export(cfg: BuildConfig, pruned_dir: Path, val_enc) -> Path:
    """The quantized graph of the pruned checkpoint for ``cfg.target`` (see the module docstring)."""
    from edgeprune.export.onnx_export import onnx_logits

    t = cfg.target
    fixed = fixed_shape(t)
    fixed_len = fixed[1] if fixed else None
    n = cfg.parity_examples
    sample = type(val_enc)(val_enc.input_ids[:n], val_enc.token_type_ids[:n], val_enc.labels[:n], val_enc.pad_id)
    stage = Stage("export", dir_sha256(pruned_dir), asdict(t.export), asdict(t.quantization), asdict(t.optimization),
                  t.runtime.ort_format, t.runtime.mobile_usability, cfg.parity_examples)

    def same_logits(d: Path) -> Optional[str]:  # the quantized graph's logits on the parity sample, as recorded
        got = onnx_logits(d / "model.onnx", sample, fixed_length=fixed_len)
        want = np.load(d / "parity_logits.npy")
        ok = got.shape == want.shape and np.allclose(got, want, atol=1e-4)
        return None if ok else "no longer reproduces its recorded logits"

    return stage.run(lambda tmp: _export(tmp, pruned_dir, t, sample, fixed, fixed_len or cfg.task.max_length), check=same_logits,
                     verified="files verified, parity re-checked")


def _export(tmp: Path, pruned_dir: Path, t: Target, sample, fixed, max_tokens: int) -> None:
    import onnx

    from edgeprune.export import onnx_export
    from edgeprune.export.large import internalize, streaming_quantizer
    from edgeprune.export.quantize import fix_shapes, mark_disabled_optimizers, optimize, quantize
    from edgeprune.models.registry import load_classifier
    from edgeprune.scale.meter import trim
    from edgeprune.scale.lazy import LazyCheckpoint

    fixed_len = fixed[1] if fixed else None
    large = LazyCheckpoint(pruned_dir).total_bytes > onnx_export.LARGE_BYTES  # from the safetensors headers
    info: dict = {}
    log(f"export: ONNX opset {t.export.opset}" + (f", fixed shape {fixed}" if fixed else ", dynamic shapes")
        + (" (large: the dynamo exporter on the meta device, weights read one at a time into external data)"
           if large else ""))
    if large:  # the model never enters memory whole (edgeprune.export.lazy_weights): parity against its logits
        info["exporter"], reference, (heads, fuse_as) = _export_large(pruned_dir, tmp / "fp32.onnx", t, max_tokens,
                                                                     sample, fixed)
    else:
        reference = load_classifier(pruned_dir)  # MoE (k > 1) or folded dense sibling
        info["exporter"] = onnx_export.export_onnx(reference, pruned_dir, tmp / "fp32.onnx", t, max_tokens)
        if fixed:
            fix_shapes(tmp / "fp32.onnx", *fixed)
        heads, fuse_as = describe(reference)
    info["moe_operator"] = t.export.moe_operator
    info["parity_fp32"] = onnx_export.parity(tmp / "fp32.onnx", reference, sample, fixed_length=fixed_len,
                                             segmented=large)  # a large graph one layer at a time
    log(f"export: parity with PyTorch ok (max logit diff {info['parity_fp32']['max_abs_logit_diff']:.2e})")
    if not large:
        _runtime_top_k(tmp / "fp32.onnx", reference, sample, fixed_len, info)
    del reference
    trim()  # the parity sessions' memory back to the system before the quantizer loads the graph
    info["fusions"] = optimize(tmp / "fp32.onnx", tmp / "opt.onnx", t, *heads, fuse_as)
    log(f"quantize: {t.quantization.precision}")
    if large and t.quantization.embedding_bits == 4:
        log("quantize: the word embedding stays 8-bit (the 4-bit pass would hold the whole large graph in memory)")
        t = replace(t, quantization=replace(t.quantization, embedding_bits=8))
    with streaming_quantizer(tmp) if large else contextlib.nullcontext():  # one weight in memory at a time
        info["quantization"] = quantize(tmp / "opt.onnx", tmp / "model.onnx", t, calib=sample, external=large)
    if large:
        internalize(tmp / "model.onnx")
    info["variants"] = export_variants(tmp, t, sample, fixed_len)
    info["ort_disabled_optimizers"] = t.optimization.ort_disabled_optimizers
    mark_disabled_optimizers(tmp / "model.onnx", info["ort_disabled_optimizers"])
    for f in ("fp32.onnx", "opt.onnx", "fp32.onnx.data", "model.onnx.data"):
        (tmp / f).unlink(missing_ok=True)
    _runtime_formats(tmp, t, info)
    graph = onnx.load(str(tmp / "model.onnx"), load_external_data=False).graph
    stored = {i.name for i in graph.initializer}
    info["input_names"] = [i.name for i in graph.input if i.name not in stored]  # top_k: overridable, not required
    if "top_k" in info and not ("top_k" in stored and any(i.name == "top_k" for i in graph.input)):
        from edgeprune.errors import ExportError

        raise ExportError("the graph's top_k input was lost in fusion or quantization; report it with the command")
    (tmp / "export.json").write_text(json.dumps(info, indent=1))
    np.save(tmp / "parity_logits.npy", onnx_export.onnx_logits(tmp / "model.onnx", sample, fixed_length=fixed_len))


def _export_large(pruned_dir: Path, out: Path, t: Target, max_tokens: int, sample, fixed):
    """(exporter, PyTorch's logits on ``sample``, ``describe``) of a checkpoint exported from its skeleton on the meta
    device, the weights read one at a time when the graph is written, and the logits computed one layer at a time
    (:func:`edgeprune.pruning.layerwise.logits_layerwise`): no step holds the model whole."""
    from edgeprune.export import onnx_export
    from edgeprune.export.quantize import fix_shapes
    from edgeprune.pruning.layerwise import logits_layerwise, skeleton

    model = skeleton(pruned_dir)
    exporter = onnx_export.export_onnx(model, pruned_dir, out, t, max_tokens, large=True)
    if fixed:
        fix_shapes(out, *fixed)
    how = describe(model)
    del model
    cut = onnx_export.truncate(sample, fixed[1]) if fixed else sample
    return exporter, logits_layerwise(pruned_dir, cut, progress=False), how


def _runtime_top_k(path: Path, model, sample, fixed_len: Optional[int], info: dict) -> None:
    """Keep the routers' run-time top-k (edgeprune.export.runtime_top_k) where the graph routes to every k as PyTorch
    does on the parity sample; otherwise fix it at the model's own, saying why."""
    import onnx

    from edgeprune.export import runtime_top_k
    from edgeprune.export.onnx_export import routing_of
    from edgeprune.models.registry import find_adapter

    if not any(i.name == runtime_top_k.INPUT for i in onnx.load(str(path), load_external_data=False).graph.input):
        return
    z, k = routing_of(find_adapter(model.config.model_type), model)
    diffs, why = runtime_top_k.check(path, model, sample, z, k, fixed_length=fixed_len)
    if why:
        runtime_top_k.fix(path)
        info["top_k_fixed"] = why
        log(f"export: top-k stays {k} in the graph: {why}")
        return
    info["top_k"] = {"input": "top_k", "default": k, "max": z, "parity_by_k": diffs}
    log(f"export: the routers read their top-k from the input top_k (default {k}; 1..{z} checked against PyTorch, "
        f"max logit diff {max(diffs.values()):.2e})")


def _runtime_formats(tmp: Path, t: Target, info: dict) -> None:
    """The ORT format and the mobile usability check, where the target asks for them."""
    from edgeprune.export.quantize import mobile_usability, to_ort_format

    if t.runtime.ort_format:
        to_ort_format(tmp / "model.onnx", tmp / "model.ort")
    if t.runtime.mobile_usability:
        log("mobile usability check (NNAPI / CoreML)")
        info["mobile_usability"] = mobile_usability(tmp / "model.onnx")


def export_variants(tmp: Path, t: Target, sample, fixed_len: Optional[int]) -> dict:
    """The target's extra precisions (``[export] variants``), from the same fused fp32 graph as the artifact,
    each compared with the fp32 graph on the parity sample (the quantized artifact's own check is the build's
    validation). fp16 keeps fp32 inputs and outputs (keep_io_types), as transformers.js' fp16 models do."""
    from edgeprune.export.onnx_export import onnx_logits
    from edgeprune.export.quantize import quantize

    out = {}
    if not t.export.variants:
        return out
    ref = onnx_logits(tmp / "fp32.onnx", sample, fixed_length=fixed_len)
    for v in t.export.variants:
        log(f"export: variant {v}")
        vt = replace(t, quantization=replace(t.quantization, precision=v, embedding_bits=8))
        quantize(tmp / "opt.onnx", tmp / f"model_{v}.onnx", vt)
        got = onnx_logits(tmp / f"model_{v}.onnx", sample, fixed_length=fixed_len)
        out[v] = {"max_abs_logit_diff_vs_fp32": float(np.abs(ref - got).max()),
                  "agreement_vs_fp32": float((ref.argmax(-1) == got.argmax(-1)).mean()),
                  "examples": len(sample), "mb": round((tmp / f"model_{v}.onnx").stat().st_size / 1e6, 3)}
    return out
