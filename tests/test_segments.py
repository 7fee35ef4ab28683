"""edgeprune.export.segments: a graph traced by the dynamo exporter, run one layer at a time, gives the logits the
whole graph gives (exact here; the module allows ONNX Runtime's fusions across a cut to differ within 1e-5)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    from transformers import MixtralConfig, MixtralForSequenceClassification

    from edgeprune.export.onnx_export import export_onnx
    from edgeprune.targets import load_target

    torch.manual_seed(0)
    c = MixtralConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                      num_labels=3, pad_token_id=0)
    d = tmp_path_factory.mktemp("mixtral")
    model = MixtralForSequenceClassification(c).eval()
    model.save_pretrained(d)
    export_onnx(model, d, d / "fp32.onnx", load_target("x86_64"), large=True)
    return d / "fp32.onnx", model


def batches():
    rng = np.random.default_rng(0)
    out = []
    for n, s in ((1, 5), (3, 9)):
        ids = rng.integers(1, 100, size=(n, s)).astype(np.int64)
        mask = np.ones_like(ids)
        mask[-1, s - 2:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def test_the_graph_is_cut_at_each_layer_and_computes_the_same_logits(traced):
    from edgeprune.export import segments
    from edgeprune.export.ort_session import session

    path, model = traced
    segs = segments.Segments(path)
    assert len(segs) == 3  # one per layer: the embedding joins the first, the head the last
    assert all(segs.keep[i] for i in range(len(segs) - 1)) and segs.keep[-1] == {"logits"}
    whole = session(path)
    got = segments.run(segs, batches())
    for b, (logits,) in zip(batches(), got):
        want = whole.run(["logits"], b)[0]
        assert logits.shape == want.shape and np.abs(logits - want).max() <= 1e-5
        with torch.no_grad():
            ref = model(**{k: torch.from_numpy(v) for k, v in b.items()}).logits.numpy()
        assert np.abs(logits - ref).max() < 1e-4  # and PyTorch's
    assert not list(path.parent.glob(".*segment*"))  # the segment graphs are gone


def test_a_graph_without_layer_scopes_is_one_segment(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    from edgeprune.export import segments

    w = numpy_helper.from_array(np.eye(3, dtype=np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["logits"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    segs = segments.Segments(tmp_path / "m.onnx")
    assert len(segs) == 1
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert np.array_equal(segments.run(segs, [{"x": x}])[0][0], x)


def test_a_cut_through_a_value_of_unknown_type_is_a_clear_error(tmp_path):
    from onnx import TensorProto, helper

    from edgeprune.errors import ExportError
    from edgeprune.export import segments

    def scoped(node, layer):
        node.metadata_props.add(key="pkg.torch.onnx.name_scopes", value=str(["", "m", f"m.model.layers.{layer}"]))
        return node

    nodes = [scoped(helper.make_node("Mystery", ["x"], ["h"], domain="org.unknown"), 0),  # no shape inference
             scoped(helper.make_node("Relu", ["h"], ["logits"]), 1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("org.unknown", 1)])
    onnx.save(m, str(tmp_path / "m.onnx"))
    segs = segments.Segments(tmp_path / "m.onnx")
    assert len(segs) == 2
    with pytest.raises(ExportError, match=r"^the graph's value 'h' has no type after shape inference; its segments "
                                          r"cannot be cut there$"):
        segs.graph(0)
