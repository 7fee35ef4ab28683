"""edgeprune.export.lazy_weights: a graph traced on the meta device gets its weights from the checkpoint when it is
written, and transposes / per-expert gathers of weights become initializers of their own: the same numbers."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper


def expert_graph(w: np.ndarray, b: np.ndarray):
    """y = x @ W[1]^T + x @ B^T, W a fused [E, out, in] expert tensor read twice (two consumers), as the dense
    dispatch's dynamo graph reads it."""
    import onnx_ir as ir

    nodes = [helper.make_node("Constant", [], ["one"], value=numpy_helper.from_array(np.array(1, np.int64))),
             helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0, np.int64))),
             helper.make_node("Gather", ["W", "one"], ["w1"], axis=0),
             helper.make_node("Gather", ["W", "zero"], ["w0"], axis=0),
             helper.make_node("Transpose", ["w1"], ["w1t"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "w1t"], ["h"]),
             helper.make_node("Transpose", ["B"], ["bt"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "bt"], ["g"]),
             helper.make_node("ReduceSum", ["w0"], ["s0"], keepdims=0),
             helper.make_node("Add", ["h", "g"], ["hg"]),
             helper.make_node("Mul", ["hg", "s0"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
                              [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return ir.serde.deserialize_model(model)


def run(model, x):
    import onnx_ir as ir
    import onnxruntime as ort

    proto = ir.serde.serialize_model(model)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_folded_views_are_initializers_with_the_same_numbers():
    from edgeprune.export.lazy_weights import fold_views

    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(2, 3, 4)).astype(np.float32), rng.normal(size=(3, 4)).astype(np.float32)
    x = rng.normal(size=(5, 4)).astype(np.float32)
    model = expert_graph(w, b)
    want = run(model, x)
    assert fold_views(model) == 4  # two gathers, the two transposes after them
    ops = [n.op_type for n in model.graph]
    assert "Gather" not in ops and "Transpose" not in ops
    inits = {k: v.const_value.numpy() for k, v in model.graph.initializers.items()}
    assert "W" not in inits and "B" not in inits  # the sources are gone with their last use
    assert sorted(a.shape for a in inits.values()) == [(3, 4), (4, 3), (4, 3)]
    assert np.array_equal(run(model, x), want)  # exact: the same numbers, moved


def test_attached_weights_are_read_when_written(tmp_path):
    """A traced model's meta initializers read from the checkpoint mapping only when the graph is saved."""
    import onnx_ir as ir
    import torch

    from edgeprune.export.lazy_weights import attach, fold_views

    class Lin(torch.nn.Module):  # ids in, as a transformer's inputs (a float input would meet meta weights)
        def __init__(self):
            super().__init__()
            self.emb, self.proj = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 3, bias=False)

        def forward(self, ids):
            return self.proj(self.emb(ids))

    from accelerate import init_empty_weights

    real = Lin()
    with init_empty_weights():  # as the layer-wise skeleton is made
        meta = Lin()
    program = torch.onnx.export(meta, (torch.ones(2, 4, dtype=torch.long),), dynamo=True, optimize=False,
                                input_names=["ids"])
    reads = []

    class Weights(dict):
        def __getitem__(self, k):
            reads.append(k)
            return super().__getitem__(k)

    state = {k: v.detach() for k, v in real.state_dict().items()}
    assert attach(program.model, Weights(state)) == 2
    fold_views(program.model)
    assert reads == []  # nothing read before the graph is written
    ir.save(program.model, str(tmp_path / "m.onnx"), external_data="m.onnx.data")
    assert sorted(reads) == ["emb.weight", "proj.weight"]  # each once
    import onnxruntime as ort

    ids = np.array([[1, 2, 3, 9], [0, 5, 5, 7]], dtype=np.int64)
    got = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"ids": ids})[0]
    assert np.allclose(got, real(torch.from_numpy(ids)).detach().numpy(), rtol=0, atol=1e-6)  # kernels' rounding
    assert all(len(t.dims) == 2 for t in onnx.load(str(tmp_path / "m.onnx")).graph.initializer)


def test_a_weight_the_checkpoint_lacks_is_a_clear_error():
    import torch

    from edgeprune.errors import ExportError
    from edgeprune.export.lazy_weights import attach

    from accelerate import init_empty_weights

    with init_empty_weights():
        meta = torch.nn.Embedding(10, 4)
    program = torch.onnx.export(meta, (torch.ones(2, 4, dtype=torch.long),), dynamo=True, optimize=False)
    with pytest.raises(ExportError, match=r"the graph's weight 'weight' is not in the checkpoint; is the model the "
                                          r"one saved there\?"):
        attach(program.model, {"bias": torch.zeros(3)})
