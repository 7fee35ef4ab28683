"""Exporting and quantizing a classifier whose weights exceed :data:`~edgeprune.export.onnx_export.LARGE_BYTES`
within a memory bound (issue 26; measured in ``results/scale_build.md``).

Two things held the weights several times over, found by instrumenting the export of the 1.1 GB folded Mistral of
``scripts/scale_build.py`` step by step (one-off runs; the whole build's figures are in ``results/scale_build.md``):

* the export. The TorchScript exporter peaked at 4.9 GiB; the dynamo exporter writes the weights one by one into
  external data (1.6 GiB), but afterwards the process kept the checkpoint's memory-mapped shards resident (1.1 GiB
  of file pages) with no Python reference left to drop: something in the export machinery holds the storages. So
  the export runs in a child process (``spawn``): it loads the pruned checkpoint, exports, computes PyTorch's
  logits on the parity sample, and exits, giving everything back; the build process never loads the model.
* ONNX Runtime's dynamic quantizer (3.0 GiB above the process for the 1.1 GB graph): it loads every weight into
  the graph, and ``ONNXQuantizer.__init__`` re-infers shapes with ``save_and_reload_model_with_shape_infer``,
  which deep-copies the whole model before saving and reloading it. :func:`streaming_quantizer` keeps the weights
  on disk while the quantizer runs and hands it one weight at a time; the 4-bit embedding pass (its own whole-graph
  quantizer) is left out on this path, the embedding is int8 with the rest.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator, Optional

from edgeprune.scale.meter import note_child_peak, peak_gib, resident_gib


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
    return exporter, ref, describe(model), peak_gib()  # VmHWM: this process's own (ru_maxrss includes the parent's)


def export_in_child(pruned_dir: Path, out_path: Path, target, max_tokens: int, sample,
                    fixed: Optional[tuple[int, int]], describe: Callable):
    """(exporter, PyTorch's parity logits, ``describe(model)``, the child's peak resident memory in GiB) of
    exporting ``pruned_dir`` in a spawned child process (``describe``: a module-level function, pickled by name);
    the child's errors are raised here."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    beside = resident_gib()
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        result = pool.submit(_child, str(pruned_dir), str(out_path), target.source, max_tokens, sample, fixed,
                             describe).result()
    note_child_peak(result[3], beside)
    return result


@contextlib.contextmanager
def streaming_quantizer(folder: Path) -> Iterator[None]:
    """ONNX Runtime's dynamic quantizer on a graph whose weights are in external data in ``folder``, reading one
    weight at a time (see the module docstring): the graph is loaded and re-inferred without its weights, each
    weight read from disk into a copy of its tensor when the quantizer asks for it (the graph's own tensor stays a
    reference), and no deep copy. The weights are the same numbers: the quantized graph equals the one the
    quantizer writes from the loaded graph, tensor for tensor (tests/test_large_export.py). The working directory
    is ``folder`` meanwhile (ONNX resolves a tensor's file from there when no folder is given)."""
    import importlib
    import os

    import onnx
    from onnx.external_data_helper import uses_external_data
    from onnxruntime.quantization import base_quantizer, onnx_quantizer, quant_utils

    ort_quantize = importlib.import_module("onnxruntime.quantization.quantize")  # the package re-exports a function

    def load_lazy(path):
        path = Path(path)
        inferred = path.with_name(path.stem + "-inferred.onnx")
        onnx.shape_inference.infer_shapes_path(str(path), str(inferred))
        try:
            model = onnx.load(str(inferred), load_external_data=False)
        finally:
            inferred.unlink(missing_ok=True)
        quant_utils.add_infer_metadata(model)
        return model

    def save_and_reload(model):
        path = Path("edgeprune-reinfer.onnx").resolve()  # beside the weights: the references stay valid
        onnx.save_model(model, str(path))
        try:
            return load_lazy(path)
        finally:
            path.unlink(missing_ok=True)

    def to_array(tensor):
        if uses_external_data(tensor):  # read into a copy: the graph's tensor stays a reference to the file
            copy = onnx.TensorProto()
            copy.CopyFrom(tensor)
            tensor = copy
        return quant_utils.tensor_proto_to_array(tensor)

    patches = [(ort_quantize, "load_model_with_shape_infer", load_lazy),
               (base_quantizer, "save_and_reload_model_with_shape_infer", save_and_reload),
               (onnx_quantizer, "save_and_reload_model_with_shape_infer", save_and_reload),
               (base_quantizer, "tensor_proto_to_array", to_array), (onnx_quantizer, "tensor_proto_to_array", to_array)]
    before, cwd = [(m, n, getattr(m, n)) for m, n, _ in patches], os.getcwd()
    os.chdir(folder)
    for module, name, f in patches:
        setattr(module, name, f)
    try:
        yield
    finally:
        for module, name, f in before:
            setattr(module, name, f)
        os.chdir(cwd)


def internalize(path: Path) -> None:
    """``path`` with every tensor it still reads from external data (the weights the quantizer left in fp32:
    norms, biases) stored inside it, so that the data files can go."""
    import onnx

    onnx.save(onnx.load(str(path)), str(path))
