"""The large-graph path of the export (edgeprune.export.large): ONNX Runtime's dynamic quantizer reading one weight
at a time from external data writes the same graph, tensor for tensor, as the quantizer on the loaded graph; the
tensors it leaves in fp32 are brought inside the file."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def graph_with_weights(d, external: bool):
    rng = np.random.default_rng(0)
    w = {"emb": rng.normal(size=(50, 16)), "w1": rng.normal(size=(16, 32)), "w2": rng.normal(size=(32, 16)),
         "g": rng.normal(size=(16,))}
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["x"]), helper.make_node("MatMul", ["x", "w1"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y0"]),
             helper.make_node("Mul", ["y0", "g"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 16])],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in w.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = d / "fp32.onnx"
    onnx.save(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
              location="fp32.onnx.data", size_threshold=0)
    return path


def quantize(src, dst):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul", "Gather"], per_channel=True,
                     weight_type=QuantType.QInt8, extra_options={"DefaultTensorType": TensorProto.FLOAT})


def test_streaming_quantizer_writes_the_same_graph_as_the_loaded_one(tmp_path):
    from onnx.external_data_helper import uses_external_data

    from edgeprune.export.large import internalize, streaming_quantizer

    (tmp_path / "plain").mkdir()
    (tmp_path / "big").mkdir()
    quantize(graph_with_weights(tmp_path / "plain", external=False), tmp_path / "plain" / "q.onnx")
    src = graph_with_weights(tmp_path / "big", external=True)
    assert all(uses_external_data(t) for t in onnx.load(str(src), load_external_data=False).graph.initializer)
    with streaming_quantizer(tmp_path / "big"):
        quantize(src, tmp_path / "big" / "q.onnx")
    left = onnx.load(str(tmp_path / "big" / "q.onnx"), load_external_data=False).graph.initializer
    assert [t.name for t in left if uses_external_data(t)] == ["g"]  # the fp32 scale still reads the data file
    internalize(tmp_path / "big" / "q.onnx")
    (tmp_path / "big" / "fp32.onnx.data").unlink()  # the artifact no longer needs it
    a = onnx.load(str(tmp_path / "plain" / "q.onnx")).graph
    b = onnx.load(str(tmp_path / "big" / "q.onnx")).graph
    assert [(n.op_type, list(n.input)) for n in a.node] == [(n.op_type, list(n.input)) for n in b.node]
    ta, tb = ({t.name: numpy_helper.to_array(t) for t in g.initializer} for g in (a, b))
    assert ta.keys() == tb.keys() and all(np.array_equal(ta[k], tb[k]) for k in ta)
    assert any(t.data_type == TensorProto.INT8 for t in b.initializer)


def test_the_quantizer_is_itself_again_after_the_stream():
    import importlib

    from onnxruntime.quantization import base_quantizer, onnx_quantizer

    from edgeprune.export.large import streaming_quantizer

    ort_quantize = importlib.import_module("onnxruntime.quantization.quantize")
    before = (ort_quantize.load_model_with_shape_infer, onnx_quantizer.save_and_reload_model_with_shape_infer,
              base_quantizer.tensor_proto_to_array)
    import os

    cwd = os.getcwd()
    with streaming_quantizer(os.path.dirname(__file__)):
        assert ort_quantize.load_model_with_shape_infer is not before[0]
    assert (ort_quantize.load_model_with_shape_infer, onnx_quantizer.save_and_reload_model_with_shape_infer,
            base_quantizer.tensor_proto_to_array) == before and os.getcwd() == cwd


def test_a_graph_over_onnx_file_limit_is_not_internalized(tmp_path, monkeypatch):
    import pytest

    from edgeprune.errors import ExportError
    from edgeprune.export.large import internalize
    from edgeprune.scale import memory

    src = graph_with_weights(tmp_path, external=True)
    monkeypatch.setattr(memory, "ONNX_FILE_LIMIT", 1000)  # the weights here are ~7 kB
    with pytest.raises(ExportError, match=r"the quantized graph \(0.00 GB\) is over ONNX's 2 GB limit for one file"):
        internalize(src)
    assert (tmp_path / "fp32.onnx.data").exists() and not list(tmp_path.glob("*.tmp"))
