"""ONNX export with a parity check against PyTorch on real task inputs.

* A folded model (every MoE layer kept one expert) is a plain ``BertForSequenceClassification``: it goes
  through optimum's exporter (``optimum.exporters.onnx.main_export``), like any BERT.
* A model with k > 1 experts cannot go through the stock exporters (data-dependent dispatch, DESIGN.md
  section 2), so it is exported with ``torch.onnx.export`` under :func:`~edgeprune.models.dense_dispatch`:
  every kept expert is computed and combined with the top-k routing weights (cheap for small k).

Inputs are ``input_ids``, ``attention_mask``, ``token_type_ids`` (int64), output ``logits``; batch and
sequence axes are dynamic unless the target fixes them.
"""
from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from edgeprune.errors import ExportError
from edgeprune.export.targets import Target
from edgeprune.models import dense_dispatch
from edgeprune.training import Encoded, collate, predict_logits

INPUT_NAMES = ["input_ids", "attention_mask", "token_type_ids"]


def export_onnx(model: torch.nn.Module, model_dir: str | Path, out_path: str | Path, target: Target) -> str:
    """Export to ``out_path``; returns the exporter used (``optimum`` or ``torch.onnx+dense_dispatch``)."""
    out_path = Path(out_path)
    spec = target.export
    if not hasattr(model, "moe_blocks"):
        from optimum.exporters.onnx import main_export

        shapes = {"batch_size": spec.batch_size, "sequence_length": spec.sequence_length} if spec.fixed_shapes else {}
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
            try:
                main_export(str(model_dir), tmp, task="text-classification", opset=spec.opset,
                            local_files_only=True, do_validation=False, no_dynamic_axes=spec.fixed_shapes,
                            **shapes)
            except Exception as exc:  # optimum raises many types
                raise ExportError(f"optimum export of {model_dir} failed: {type(exc).__name__}: {exc}") from None
            shutil.move(str(Path(tmp) / "model.onnx"), out_path)
        return "optimum"
    b, s = (spec.batch_size, spec.sequence_length) if spec.fixed_shapes else (2, 16)
    dummy = (torch.ones(b, s, dtype=torch.long), torch.ones(b, s, dtype=torch.long),
             torch.zeros(b, s, dtype=torch.long))
    axes = None if spec.fixed_shapes else {n: {0: "batch_size", 1: "sequence_length"} for n in INPUT_NAMES}
    if axes is not None:
        axes["logits"] = {0: "batch_size"}

    class Wrapper(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.m(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits

    model.eval()
    try:
        with dense_dispatch(model), torch.no_grad():
            torch.onnx.export(Wrapper(model), dummy, str(out_path), input_names=INPUT_NAMES, output_names=["logits"],
                              dynamic_axes=axes, opset_version=spec.opset, dynamo=False)
    except Exception as exc:
        raise ExportError(f"torch.onnx export of the MoE failed: {type(exc).__name__}: {exc}") from None
    return "torch.onnx+dense_dispatch"


def session(path: str | Path, threads: int = 1):
    """An ONNX Runtime CPU session with ``threads`` intra-op threads (and the optimizers the model's metadata
    says to disable: :func:`edgeprune.export.quantize.disabled_optimizers`)."""
    import onnxruntime as ort

    from edgeprune.export.quantize import disabled_optimizers

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"],
                                disabled_optimizers=disabled_optimizers(Path(path)))


def onnx_logits(path: str | Path, enc: Encoded, batch_size: int = 32, fixed_length: int | None = None,
                threads: int = 2) -> np.ndarray:
    """Logits of the ONNX model on ``enc`` (padded per batch, or to ``fixed_length`` for fixed shapes)."""
    sess = session(path, threads)
    names = {i.name for i in sess.get_inputs()}
    fixed_batch = sess.get_inputs()[0].shape[0] if isinstance(sess.get_inputs()[0].shape[0], int) else None
    bs = fixed_batch or batch_size
    order = sorted(range(len(enc)), key=lambda i: len(enc.input_ids[i]))
    out = None
    for start in range(0, len(order), bs):
        idx = order[start : start + bs]
        batch = collate(enc, idx)
        feeds = {k: v.numpy() for k, v in batch.items() if k in names}
        if fixed_length is not None or fixed_batch:
            feeds = pad_to(feeds, fixed_batch or len(idx), fixed_length or feeds["input_ids"].shape[1])
        logits = sess.run(["logits"], feeds)[0][: len(idx)].astype(np.float32)
        if out is None:
            out = np.zeros((len(enc), logits.shape[1]), dtype=np.float32)
        out[idx] = logits
    return out


def pad_to(feeds: dict[str, np.ndarray], batch: int, length: int) -> dict[str, np.ndarray]:
    """Pad (or truncate) every input to ``batch`` x ``length`` for fixed-shape models."""
    out = {}
    for k, v in feeds.items():
        z = np.zeros((batch, length), dtype=v.dtype)
        n, m = min(batch, v.shape[0]), min(length, v.shape[1])
        z[:n, :m] = v[:n, :m]
        out[k] = z
    return out


def truncate(enc: Encoded, length: int) -> Encoded:
    """Encoded examples cut to ``length`` tokens (fixed-shape targets see at most that many)."""
    return Encoded([i[:length] for i in enc.input_ids], [t[:length] for t in enc.token_type_ids], enc.labels)


def parity(onnx_path: str | Path, model: torch.nn.Module, enc: Encoded, atol: float = 1e-3,
           min_agreement: float = 0.995, fixed_length: int | None = None) -> dict:
    """Compare ONNX and PyTorch logits on real inputs; raise :class:`ExportError` if parity is lost."""
    if fixed_length is not None:
        enc = truncate(enc, fixed_length)
    ref = predict_logits(model, enc)
    got = onnx_logits(onnx_path, enc, fixed_length=fixed_length)
    diff = float(np.abs(ref - got).max())
    agree = float((ref.argmax(-1) == got.argmax(-1)).mean())
    result = {"examples": len(enc), "max_abs_logit_diff": diff, "agreement": agree, "atol": atol}
    if not np.isfinite(got).all() or diff > atol or agree < min_agreement:
        raise ExportError(f"ONNX export lost parity with PyTorch on {len(enc)} task examples: max logit difference "
                          f"{diff:.3g} (allowed {atol}), agreement {agree:.4f} (required {min_agreement})")
    return result
