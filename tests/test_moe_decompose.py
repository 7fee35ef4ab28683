"""The builder's geglu ``MoE`` nodes (Gemma 4), which ONNX Runtime's CPU kernel refuses, rewritten as dense
dispatch: equal to the operator's definition computed in numpy (softmax, top-k, renormalised, interleaved gate / up
rows, biases) within 1e-5; nodes it cannot reproduce refused; Gemma 4's per-layer config flattened for the builder."""
from __future__ import annotations

import numpy as np
import pytest

E, H, I, K = 4, 8, 6, 2


def moe_model(normalize: int = 1, alpha: float = 1.0, seed: int = 0):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = {"fc1": rng.normal(size=(E, 2 * I, H)), "b1": rng.normal(size=(E, 2 * I)),
         "fc2": rng.normal(size=(E, H, I)), "b2": rng.normal(size=(E, H))}
    w = {k: v.astype(np.float32) for k, v in w.items()}
    node = helper.make_node("MoE", ["x", "router", "fc1", "b1", "fc2", "b2"], ["y"], domain="com.microsoft",
                            name="/model/layers.0/moe/MoE", k=K, activation_type="geglu", swiglu_fusion=1,
                            normalize_routing_weights=normalize, activation_alpha=alpha, activation_beta=0.0)
    graph = helper.make_graph([node], "moe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, H]),
                                              helper.make_tensor_value_info("router", TensorProto.FLOAT, [3, E])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in w.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 22),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model, w


def reference(x, router, w, normalize: bool):
    """The MoE operator's definition: softmax over the router's logits, top-k, optionally renormalised; each chosen
    expert's GELU (tanh form) of the gate rows (even) times the up rows (odd), then fc2, weighted."""
    p = np.exp(router - router.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        top = np.argsort(-p[t])[:K]
        weights = p[t, top] / (p[t, top].sum() if normalize else 1.0)
        for e, wt in zip(top, weights):
            h = w["fc1"][e] @ x[t] + w["b1"][e]
            g, u = h[0::2], h[1::2]
            act = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3))) * u
            out[t] += wt * (w["fc2"][e] @ act + w["b2"][e])
    return out


@pytest.mark.parametrize("normalize", [1, 0])
def test_a_geglu_moe_node_becomes_dense_dispatch_equal_to_the_operator(normalize):
    import onnxruntime as ort

    from edgeprune.export.moe_decompose import decompose, unsupported

    model, w = moe_model(normalize)
    assert len(unsupported(model.graph)) == 1
    assert decompose(model) == 1 and not unsupported(model.graph)
    assert {i.name for i in model.graph.initializer}.isdisjoint({"fc1", "b1", "fc2", "b2"})  # replaced, not kept
    rng = np.random.default_rng(1)
    x, router = rng.normal(size=(1, 3, H)).astype(np.float32), rng.normal(size=(3, E)).astype(np.float32)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": x, "router": router})
    assert y.shape == x.shape
    np.testing.assert_allclose(y[0], reference(x[0], router, w, bool(normalize)), atol=1e-5, rtol=1e-5)


def test_the_cpu_kernel_refuses_what_the_rewrite_replaces():
    """The reason for the rewrite, kept as a test: when ONNX Runtime's CPU MoE runs geglu, this fails and the
    rewrite can go."""
    import onnxruntime as ort

    model, _ = moe_model()
    with pytest.raises(Exception, match="Unsupported MoE activation type: geglu"):
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_a_node_the_rewrite_does_not_reproduce_is_refused():
    from edgeprune.export.moe_decompose import decompose

    model, _ = moe_model(alpha=1.702)
    with pytest.raises(ValueError, match="does not reproduce"):
        decompose(model)


def gemma4_text(**over):
    from transformers import Gemma4TextConfig

    kw = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True,
              layer_types=["sliding_attention", "sliding_attention", "full_attention"], vocab_size=64,
              vocab_size_per_layer_input=64, hidden_size_per_layer_input=0)
    return Gemma4TextConfig(**{**kw, **over})


def test_gemma4_per_layer_config_is_flattened_for_the_builder():
    from edgeprune.export.genai_compat import flatten_gemma4

    c = gemma4_text()
    flatten_gemma4(c)
    assert (c.head_dim, c.num_key_value_heads) == (16, 2)  # the sliding layers', now readable globally
    assert (c.global_head_dim, c.num_global_key_value_heads) == (32, 1)


def test_gemma4_layers_outside_the_builders_two_profiles_are_refused():
    from edgeprune.export.genai_compat import flatten_gemma4

    c = gemma4_text(per_layer_config={1: {"head_dim": 8}, 2: {"head_dim": 32, "num_key_value_heads": 1}})
    with pytest.raises(SystemExit, match="do not come in onnxruntime-genai's two profiles"):
        flatten_gemma4(c)
