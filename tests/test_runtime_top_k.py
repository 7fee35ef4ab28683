"""Top-k at run time (edgeprune/export/runtime_top_k.py): a k > 1 dense-dispatch graph reads its routers' top-k from
the overridable input ``top_k``; fed nothing it is the model, fed k it is the same family's model routing to k."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeprune.export.onnx_export import export_onnx
from edgeprune.models.registry import adapter_for
from edgeprune.targets import load_target
from tests.families import tiny_family_model
from tests.test_families import batch

VOCAB = 100


def run(path, x, top_k=None):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: x[i.name].numpy() for i in sess.get_inputs() if i.name in x}
    if top_k is not None:
        feeds["top_k"] = np.array([top_k], dtype=np.int64)
    return sess.run(["logits"], feeds)[0], sess


def routing_to(model, k: int):
    """The same weights in a model of the same family whose config routes to ``k`` experts."""
    adapter = adapter_for(model.config)
    config = model.config.__class__.from_dict(model.config.to_dict())
    setattr(config, adapter.top_k_key, k)
    other = type(model)(config).eval()
    other.load_state_dict(model.state_dict())
    return other


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe", "deepseek_v3"])
def test_the_graph_routes_to_the_top_k_it_is_fed(family, tmp_path):
    """Fed nothing: the model (atol 1e-5); fed k = 1 and k = Z: the family's own forward with that top-k."""
    model = tiny_family_model(family, VOCAB)
    path = tmp_path / "m.onnx"
    export_onnx(model, tmp_path, path, load_target("x86_64"))
    x = batch(VOCAB)
    got, sess = run(path, x)
    assert "top_k" in [i.name for i in sess.get_overridable_initializers()]
    with torch.no_grad():
        assert np.allclose(got, model(**x).logits.numpy(), atol=1e-5)
        z = adapter_for(model.config).num_experts(next(iter(adapter_for(model.config).blocks(model).values())))
        for k in (1, z):
            ref = routing_to(model, k)(**x).logits.numpy()
            fed = run(path, x, k)[0]
            assert np.allclose(fed, ref, atol=1e-5), (k, np.abs(fed - ref).max())
            assert np.abs(fed - got).max() > 1e-4  # another k is another model
        assert np.allclose(run(path, x, z + 5)[0], ref, atol=1e-5)  # clipped to the kept experts


def test_a_router_without_topk_keeps_a_fixed_graph(tmp_path):
    """Switch routes by argmax: no TopK reads top_k, so the graph has no such input."""
    model = tiny_family_model("switch_transformers", VOCAB)
    path = tmp_path / "m.onnx"
    export_onnx(model, tmp_path, path, load_target("x86_64"))
    _, sess = run(path, batch(VOCAB))
    names = [i.name for i in sess.get_inputs()] + [i.name for i in sess.get_overridable_initializers()]
    assert "top_k" not in names


@pytest.mark.parametrize("bad", [{"default": 3, "max": 2}, {"default": 0, "max": 2}, {"default": True, "max": 2}, 5])
def test_a_manifest_with_a_bad_top_k_is_refused(bad, tmp_path):
    import json

    from edgeprune.errors import ModelError
    from edgeprune.runtime.manifest import read_manifest

    (tmp_path / "edgeprune.json").write_text(json.dumps({"labels": ["a", "b"], "max_length": 8, "top_k": bad}))
    with pytest.raises(ModelError, match=r"edgeprune.json: field 'top_k' must be null or"):
        read_manifest(tmp_path)
