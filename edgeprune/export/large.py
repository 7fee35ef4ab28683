"""Exporting and quantizing a classifier whose weights exceed :data:`~edgeprune.export.onnx_export.LARGE_BYTES`
within a memory bound (issue 26; measured in ``results/scale_build.md``).

Two things held the weights several times over, found by instrumenting the export of the 1.1 GB folded Mistral of
``scripts/scale_build.py`` step by step (one-off runs; the whole build's figures are in ``results/scale_build.md``):

* the export. The TorchScript exporter peaked at 4.9 GiB; the dynamo exporter writes the weights one by one into
  external data (1.6 GiB), but afterwards the process kept the checkpoint's memory-mapped shards resident (1.1 GiB
  of file pages) with no Python reference left to drop. So the model is never loaded: its skeleton on the meta
  device is traced and each weight read from the checkpoint when the graph is written
  (:mod:`edgeprune.export.lazy_weights`); PyTorch's parity logits are computed one layer at a time
  (:func:`edgeprune.pruning.layerwise.logits_layerwise`).
* ONNX Runtime's dynamic quantizer (3.0 GiB above the process for the 1.1 GB graph): it loads every weight into
  the graph, and ``ONNXQuantizer.__init__`` re-infers shapes with ``save_and_reload_model_with_shape_infer``,
  which deep-copies the whole model before saving and reloading it. :func:`streaming_quantizer` keeps the weights
  on disk while the quantizer runs and hands it one weight at a time; the 4-bit embedding pass (its own whole-graph
  quantizer) is left out on this path, the embedding is int8 with the rest.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator


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
    """``path`` with every tensor it still reads from external data (the quantized weights, written there one at a
    time, and those the quantizer left in fp32: norms, biases) stored inside it, so that the data files can go.

    Written one tensor at a time: the graph without its initializers, then one ``ModelProto`` per initializer
    holding only it. Protocol buffers parse concatenated messages as one message merged from them (repeated fields
    appended), so the file is the graph with its initializers in order: what ``onnx.save`` of the loaded model
    writes, without the loaded model and its serialised copy in memory together (``onnx.save(onnx.load(...))`` took
    1.4 GiB over the process for the 0.45 GiB k = 2 graph of ``scripts/scale_build.py``, this 0.55: a one-off probe;
    the whole build's figures are in ``results/scale_build.md``)."""
    import os

    import onnx
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    from edgeprune.errors import ExportError
    from edgeprune.scale.memory import ONNX_FILE_LIMIT

    model = onnx.load(str(path), load_external_data=False)
    tensors = list(model.graph.initializer)
    total = model.ByteSize() + sum(_stored_bytes(t) for t in tensors)
    if total > ONNX_FILE_LIMIT:
        raise ExportError(f"the quantized graph ({total / 1e9:.2f} GB) is over ONNX's 2 GB limit for one file; use a "
                          "smaller --experts or a lower-bit target")
    del model.graph.initializer[:]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(model.SerializeToString())
        for t in tensors:
            if uses_external_data(t):
                load_external_data_for_tensor(t, str(path.parent))
                t.data_location = onnx.TensorProto.DEFAULT
                del t.external_data[:]
            piece = onnx.ModelProto()
            piece.graph.initializer.append(t)
            f.write(piece.SerializeToString())
            t.ClearField("raw_data")
    os.replace(tmp, path)


def _stored_bytes(t) -> int:
    """A tensor's bytes, inside the graph or in external data."""
    ext = {e.key: e.value for e in t.external_data}
    return int(ext["length"]) if "length" in ext else t.ByteSize()
