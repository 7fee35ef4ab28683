"""k > 1 experts inside ONNX Runtime's QMoE (edgeprune/export/qmoe.py): the rewrite of com.microsoft.MoE nodes,
its exactness against the fp32 operator fed the dequantized weights, and a k = 2 family through the build's export
and quantization with ``moe_operator = "qmoe"``."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from edgeprune.export.qmoe import block_size, dequantize_experts, quantize_experts, to_qmoe


def moe_graph(fc1: np.ndarray, fc2: np.ndarray, k: int = 2) -> onnx.ModelProto:
    z, rows, h = fc1.shape
    inits = [numpy_helper.from_array(fc1, "fc1"), numpy_helper.from_array(np.zeros((z, rows), np.float32), "b1"),
             numpy_helper.from_array(fc2, "fc2"), numpy_helper.from_array(np.full((z, h), 0.01, np.float32), "b2")]
    node = helper.make_node("MoE", ["x", "r", "fc1", "b1", "fc2", "b2"], ["y"], domain="com.microsoft", k=k,
                            activation_type="swiglu", normalize_routing_weights=1, swiglu_fusion=1,
                            activation_alpha=1.0, activation_beta=0.0)
    graph = helper.make_graph([node], "moe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, h]),
                                              helper.make_tensor_value_info("r", TensorProto.FLOAT, [None, z])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, h])], inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def experts(h: int, i: int, z: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    fc1 = (rng.standard_normal((z, 2 * i, h)) * 0.1).astype(np.float32)
    fc2 = (rng.standard_normal((z, h, i)) * 0.1).astype(np.float32)
    feeds = {"x": rng.standard_normal((13, h)).astype(np.float32), "r": rng.standard_normal((13, z)).astype(np.float32)}
    return fc1, fc2, feeds


def test_block_size_is_the_largest_that_divides_both_widths():
    assert block_size(1024, 2816) == 128 and block_size(64, 96) == 32 and block_size(64, 128) == 64
    assert block_size(40, 24) == 32  # none divides: 32, the kernel dequantizes (slower, same numbers)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_round_trip_error_is_within_one_step(bits):
    """Half a step, but a value of the sign opposite to its block's extreme may clip by one step (signed scales
    map the extreme to -2^(bits-1), the other side stops at 2^(bits-1) - 1)."""
    w = experts(64, 96)[0]
    block = block_size(64, 96)
    q, s = quantize_experts(w, bits, block)
    assert q.dtype == np.uint8 and q.shape == (4, 192, 64 * bits // 8) and s.shape == (4, 192, 64 // block)
    back = dequantize_experts(q, s, bits, block, 64)
    step = np.repeat(np.abs(s), block, axis=-1)[..., :64]
    assert np.all(np.abs(back - w) <= step + 1e-7) and np.mean(np.abs(back - w) <= step / 2 + 1e-7) > 0.99


@pytest.mark.parametrize("h,i", [(64, 128), (64, 96)])  # the packed fast path, and the dequantizing fallback
def test_4bit_qmoe_equals_the_fp32_operator_on_the_dequantized_weights(h, i):
    fc1, fc2, feeds = experts(h, i)
    model = moe_graph(fc1, fc2)
    done = to_qmoe(model, 4)
    assert done["nodes"] == 1 and [n.op_type for n in model.graph.node] == ["QMoE"]
    assert done["quantized_bytes"] < done["fp32_bytes"] / 6
    got = run(model, feeds)
    block = block_size(h, i)
    deq = moe_graph(dequantize_experts(*quantize_experts(fc1, 4, block), 4, block, h),
                    dequantize_experts(*quantize_experts(fc2, 4, block), 4, block, i))
    assert np.abs(got - run(deq, feeds)).max() <= 1e-5
    exact = run(moe_graph(fc1, fc2), feeds)
    assert 1e-4 < np.abs(got - exact).max() <= 0.25 * np.abs(exact).max()  # quantized, and not garbage


def test_8bit_qmoe_is_close_to_the_fp32_operator():
    """8-bit: ONNX Runtime quantizes the activations too inside its n-bit GEMM, so the bound is against fp32."""
    fc1, fc2, feeds = experts(64, 128)
    model = moe_graph(fc1, fc2)
    assert to_qmoe(model, 8)["nodes"] == 1
    got, exact = run(model, feeds), run(moe_graph(fc1, fc2), feeds)
    assert np.abs(got - exact).max() <= 0.03 * np.abs(exact).max()


def test_to_qmoe_refuses_other_widths():
    with pytest.raises(ValueError, match="4 or 8 bits"):
        to_qmoe(moe_graph(*experts(64, 128)[:2]), 2)


def test_a_k2_family_exports_its_experts_into_qmoe_through_the_build_quantizer(tmp_path):
    """Mixtral at k = 2 of 4 kept experts, the x86_64 profile with moe_operator = "qmoe": the quantized graph has
    QMoE (no MoE), is smaller than with fp32 experts in MoE, and gives the PyTorch labels."""
    from edgeprune.export.onnx_export import export_onnx
    from edgeprune.export.quantize import quantize
    from edgeprune.models.registry import adapter_for
    from edgeprune.pruning.apply import apply_plan
    from edgeprune.targets import load_target
    from tests.families import tiny_family_model
    from tests.test_families import batch, plan_keeping

    model = tiny_family_model("mixtral", vocab=100)
    model = apply_plan(model, plan_keeping(model, [0, 2, 3, 5]), fold=False)
    assert adapter_for(model.config).top_k(next(iter(adapter_for(model.config).blocks(model).values()))) == 2
    x = batch(100, b=4, s=11)
    with torch.no_grad():
        want = model(**x).logits.numpy()
    base = load_target("x86_64")
    sizes = {}
    for op in ("ort", "qmoe"):
        t = replace(base, export=replace(base.export, moe_operator=op),
                    quantization=replace(base.quantization, moe_bits=4))
        export_onnx(model, tmp_path, tmp_path / f"{op}.fp32.onnx", t)
        info = quantize(tmp_path / f"{op}.fp32.onnx", tmp_path / f"{op}.onnx", t)
        ops = [n.op_type for n in onnx.load(str(tmp_path / f"{op}.onnx")).graph.node]
        assert ("QMoE" in ops) == (op == "qmoe") and ("MoE" in ops) == (op == "ort")
        sizes[op] = (tmp_path / f"{op}.onnx").stat().st_size
        got = ort.InferenceSession(str(tmp_path / f"{op}.onnx"), providers=["CPUExecutionProvider"]).run(
            ["logits"], {k: v.numpy() for k, v in x.items()})[0]
        assert (got.argmax(-1) == want.argmax(-1)).all() and np.abs(got - want).max() < 0.1
    assert "QMoE, 4-bit" in info["experts"] and not list(tmp_path.glob("*.qmoe.onnx"))
    assert sizes["qmoe"] < sizes["ort"]


def test_the_profile_refuses_other_expert_widths(tmp_path):
    from edgeprune.errors import ConfigError
    from edgeprune.targets import load_target

    bad = tmp_path / "t.toml"
    bad.write_text('name = "t"\n[export]\nmoe_operator = "qmoe"\n[quantization]\nmoe_bits = 3\n')
    with pytest.raises(ConfigError, match=r"moe_bits 3 is not 4 or 8"):
        load_target(str(bad))
