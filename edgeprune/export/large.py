"""Exporting and quantizing a classifier whose weights exceed :data:`~edgeprune.export.onnx_export.LARGE_BYTES`
within a memory bound (issue 26; measured in ``results/scale_build.md``).

Two things held the weights several times over, measured on a 1.1 GB folded Mistral (``scripts/scale_build.py``):

* the export. The TorchScript exporter peaked at 4.9 GiB; the dynamo exporter writes the weights one by one into
  external data (1.6 GiB), but afterwards the process kept the checkpoint's memory-mapped shards resident (1.1 GiB
  of file pages) with no Python reference left to drop: something in the export machinery holds the storages. So
  the export runs in a child process (``spawn``): it loads the pruned checkpoint, exports, computes PyTorch's
  logits on the parity sample, and exits, giving everything back; the build process never loads the model.
* ONNX Runtime's dynamic quantizer. ``ONNXQuantizer.__init__`` re-infers shapes with
  ``save_and_reload_model_with_shape_infer``, which deep-copies the whole model before saving it (so that the
  caller's model is not changed): two extra copies of every weight (+1.9 GiB there). :func:`quantizer_without_copy`
  swaps in the same save-and-reload without the copy (the quantizer's own model is the one saved and replaced, and
  nothing reads the old one after), for the duration of one quantization.
"""
from __future__ import annotations

import contextlib
import resource
from pathlib import Path
from typing import Callable, Iterator, Optional


def _child(pruned_dir: str, out_path: str, target_source: str, max_tokens: int, sample,
           fixed: Optional[tuple[int, int]], describe: Callable):
    """In the child: export ``pruned_dir`` (dynamo, external data), PyTorch's logits on ``sample`` and
    ``describe(model)``."""
    from edgeprune.export.onnx_export import export_onnx, reference_logits
    from edgeprune.models.registry import load_classifier
    from edgeprune.targets import load_target

    model = load_classifier(pruned_dir)
    exporter = export_onnx(model, pruned_dir, out_path, load_target(target_source), max_tokens, large=True)
    if fixed is not None:
        from edgeprune.export.quantize import fix_shapes

        fix_shapes(Path(out_path), *fixed)
    ref = reference_logits(model, sample, fixed[1] if fixed else None)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return exporter, ref, describe(model), peak_kib / 1024 ** 2


def export_in_child(pruned_dir: Path, out_path: Path, target, max_tokens: int, sample,
                    fixed: Optional[tuple[int, int]], describe: Callable):
    """(exporter, PyTorch's parity logits, ``describe(model)``, the child's peak resident memory in GiB) of
    exporting ``pruned_dir`` in a spawned child process (``describe``: a module-level function, pickled by name);
    the child's errors are raised here."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_child, str(pruned_dir), str(out_path), target.source, max_tokens, sample, fixed,
                           describe).result()


@contextlib.contextmanager
def quantizer_without_copy() -> Iterator[None]:
    """ONNX Runtime's dynamic quantizer, its shape re-inference saving and reloading the model it holds without
    first deep-copying it (see the module docstring)."""
    import tempfile

    import onnx
    from onnxruntime.quantization import onnx_quantizer
    from onnxruntime.quantization.quant_utils import load_model_with_shape_infer

    def save_and_reload(model):
        with tempfile.TemporaryDirectory(prefix="edgeprune-quant-") as tmp:
            path = Path(tmp) / "model.onnx"
            onnx.save_model(model, str(path), save_as_external_data=True)  # moves the weights out of ``model``
            return load_model_with_shape_infer(path)

    before = onnx_quantizer.save_and_reload_model_with_shape_infer
    onnx_quantizer.save_and_reload_model_with_shape_infer = save_and_reload
    try:
        yield
    finally:
        onnx_quantizer.save_and_reload_model_with_shape_infer = before
