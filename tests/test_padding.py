"""Different k per layer that stock transformers loads (edgeprune.pruning.padding): every layer padded to the largest
k with slots the router never selects, on tiny family checkpoints built from config classes. Exactness: the padded
model against the original with each layer's dropped experts' router logits at -inf (1e-5, as the equal-k test), the
reload and the streamed path against the in-memory model bit for bit (torch.equal)."""
from __future__ import annotations

import pytest
import torch

from edgeprune.errors import ConfigError
from edgeprune.models.fused import FusedAdapter
from edgeprune.models.registry import adapter_for
from edgeprune.pruning.apply import apply_plan
from edgeprune.models.adapter import PADDED_KEY, padded_slots
from edgeprune.pruning.padding import PAD_BIAS
from edgeprune.pruning.plan import LayerPlan, PrunePlan
from tests.families import tiny_family_model
from tests.test_families import batch, masked_per_layer

KEPT = {0: [0, 2, 5], 1: [1, 2, 3, 4]}


def plan_per_layer(kept: dict[int, list[int]], z: int = 6) -> PrunePlan:
    return PrunePlan("manual", [LayerPlan(l, z, [0.0] * z, [[(e, 1.0)] for e in ks]) for l, ks in kept.items()])


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe", "gpt_oss"])
def test_per_layer_k_is_padded_to_the_largest_and_computes_what_the_plan_keeps(family, tmp_path, monkeypatch):
    model = tiny_family_model(family, vocab=100)
    x = batch(100)
    pruned = apply_plan(model, plan_per_layer(KEPT), fold=False)
    adapter = adapter_for(pruned.config)
    assert [adapter.num_experts(b) for b in adapter.blocks(pruned).values()] == [4, 4]
    assert getattr(pruned.config.get_text_config(), PADDED_KEY) == {"0": [3]} and padded_slots(pruned.config, 0) == {3}
    with torch.no_grad():
        got = pruned(**x).logits
    assert torch.allclose(got, masked_per_layer(model, KEPT, x), atol=1e-5, rtol=0)
    bias = [k for k in adapter.router_keys(pruned, 0) if k.endswith("bias")][0]
    assert pruned.state_dict()[bias][3] == PAD_BIAS
    pruned.save_pretrained(tmp_path)  # the family's own class loads it: no remote code, one expert count
    again = type(pruned).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(again(**x).logits, got)
    computed = []
    real = FusedAdapter.all_experts

    def counting(ex, flat, which=None):
        computed.append((id(ex), tuple(which or ())))
        return real(ex, flat, which)

    monkeypatch.setattr(FusedAdapter, "all_experts", staticmethod(counting))
    with torch.no_grad(), adapter.export_patch(again):
        exported = again(**x).logits
    assert torch.allclose(exported, got, atol=1e-5, rtol=0)
    layer0 = id(getattr(adapter.blocks(again)[0], adapter.experts_attr))
    assert sorted(w for ex, w in computed if ex == layer0) == [(0,), (1,), (2,)]  # the padded slot is not computed


def test_per_layer_k_streamed_equals_in_memory(tmp_path, tiny_tokenizer):
    from safetensors.torch import load_file

    from edgeprune.pruning.stream import stream_apply

    tok, vocab = tiny_tokenizer
    model = tiny_family_model("deepseek_v3", vocab=vocab)
    model.save_pretrained(tmp_path / "orig")
    tok.save_pretrained(tmp_path / "orig")
    stream_apply(tmp_path / "orig", plan_per_layer(KEPT), tmp_path / "out", progress=False)
    streamed = {}
    for f in sorted((tmp_path / "out").glob("*.safetensors")):
        streamed.update(load_file(str(f)))
    memory = apply_plan(model, plan_per_layer(KEPT), fold=False).state_dict()
    assert set(streamed) == {k for k in memory if k in streamed} and len(streamed) >= len(memory) - 2
    for k, t in streamed.items():
        assert torch.equal(t, memory[k]), k


def test_a_router_without_a_selection_bias_keeps_one_k_per_model():
    model = tiny_family_model("mixtral", vocab=100)
    with pytest.raises(ConfigError, match="^mixtral stores one expert count for all layers and its router has no "
                                          "selection bias"):
        apply_plan(model, plan_per_layer(KEPT), fold=False)


@pytest.mark.parametrize("op", ["ort", "qmoe"])
def test_padded_slots_are_left_out_of_the_moe_operator(op, tmp_path):
    """gpt-oss padded per layer, exported with com.microsoft.MoE / QMoE: the padded slot is not in the node (its
    weights and its logit column left out) and the graph computes the padded model (fp32: 1e-4)."""
    from dataclasses import replace

    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from edgeprune.export.onnx_export import export_onnx
    from edgeprune.export.qmoe import to_qmoe
    from edgeprune.targets import load_target

    model = tiny_family_model("gpt_oss", vocab=100)
    pruned = apply_plan(model, plan_per_layer(KEPT), fold=False).eval()
    base = load_target("x86_64")
    t = replace(base, export=replace(base.export, moe_operator=op))
    path = tmp_path / "m.onnx"
    assert export_onnx(pruned, tmp_path, path, t) == "torch.onnx+ort_moe"
    g = onnx.load(str(path))
    tensors = {i.name: i for i in g.graph.initializer}
    tensors.update({n.output[0]: n.attribute[0].t for n in g.graph.node if n.op_type == "Constant"})
    experts = [numpy_helper.to_array(tensors[n.input[2]]).shape[0] for n in g.graph.node if n.op_type == "MoE"]
    assert experts == [3, 4]  # layer 0 keeps 3 of its 4 slots (one padded), layer 1 all 4
    if op == "qmoe":
        to_qmoe(g, 4)
        onnx.save(g, str(path))
    x = batch(100)
    feeds = {i.name: x[i.name].numpy() for i in ort.InferenceSession(str(path)).get_inputs() if i.name in x}
    got = ort.InferenceSession(str(path)).run(["logits"], feeds)[0]
    with torch.no_grad():
        want = pruned(**x).logits.numpy()
    assert np.abs(got - want).max() < (1e-4 if op == "ort" else 0.1)
