"""ONNX Runtime sessions as edgeprune opens them (CPU provider, thread count, the optimizers the model's
metadata says to disable) and input padding for fixed-shape graphs. Shared by export, quantization,
validation and the scripts; it imports no other export module, so none of them import each other in a circle."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

DISABLED_KEY = "edgeprune.ort_disabled_optimizers"


def mark_disabled_optimizers(path: Path, names: list[str]) -> None:
    """Record in the model's metadata the ORT optimizers its sessions must disable (comma-separated), so the
    .onnx file says how to load it; edgeprune's own sessions read it (:func:`disabled_optimizers`)."""
    if not names:
        return
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, DISABLED_KEY: ",".join(names)})
    onnx.save(model, str(path))


def disabled_optimizers(path: Path) -> list[str]:
    """The ORT optimizers recorded by :func:`mark_disabled_optimizers` (none for .ort files or unmarked models)."""
    if Path(path).suffix != ".onnx":
        return []
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return [n for n in props.get(DISABLED_KEY, "").split(",") if n]


def session(path: str | Path, threads: int = 1):
    """An ONNX Runtime CPU session with ``threads`` intra-op threads (and the optimizers the model's metadata
    says to disable: :func:`disabled_optimizers`)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"],
                                disabled_optimizers=disabled_optimizers(Path(path)))


def pad_to(feeds: dict[str, np.ndarray], batch: int, length: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Pad (or truncate) every input to ``batch`` x ``length`` for fixed-shape models."""
    out = {}
    for k, v in feeds.items():
        z = np.full((batch, length), pad_id if k == "input_ids" else 0, dtype=v.dtype)
        n, m = min(batch, v.shape[0]), min(length, v.shape[1])
        z[:n, :m] = v[:n, :m]
        out[k] = z
    return out
