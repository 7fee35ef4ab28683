"""``com.microsoft.MoE`` nodes whose activation ONNX Runtime's CPU kernel lacks, rewritten into standard operators.

onnxruntime-genai 0.18's model builder writes Gemma 4's experts as one ``MoE`` node per layer with
``activation_type = "geglu"`` (GELU, tanh form, of the gate times the up projection), which only its CUDA kernel
runs: ONNX Runtime 1.32's CPU ``MoE`` / ``QMoE`` take relu, gelu, silu, identity and swiglu ("Unsupported MoE
activation type: geglu" at session creation). :func:`decompose` computes the same thing with standard operators:

    p = softmax(router_logits);  (w, i) = top-k(p);  w <- w / sum(w) if normalize_routing_weights
    y = sum_e  W[:, e] * (fc2_e( act(fc1_e(x)) ) + b2_e),  W = w scattered onto the experts (0 elsewhere)

every kept expert a plain ``MatMul`` pair (dense dispatch, as edgeprune exports classifiers' MoE layers): exact
against the operator's definition, and the weight-only quantizer turns each expert's matrices into ``MatMulNBits``
like any other weight. The cost is every kept expert per token instead of k; the build's report says so.
"""
from __future__ import annotations

import numpy as np

# activations ONNX Runtime's CPU MoE kernel does not run (each: GELU's tanh form of the gate, times up)
CPU_MISSING = ("geglu",)


def attributes(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def unsupported(graph, op: str = "MoE") -> list:
    """The graph's ``com.microsoft`` ``op`` nodes (``MoE``, ``QMoE``) whose activation the CPU kernel lacks."""
    return [n for n in graph.node if n.op_type == op and n.domain == "com.microsoft"
            and attributes(n).get("activation_type", b"relu").decode() in CPU_MISSING]


class _Writer:
    """The nodes and initializers of one rewritten node, named under ``prefix``."""

    def __init__(self, prefix: str):
        self.p, self.nodes, self.weights = prefix, [], []

    def const(self, name: str, array) -> str:
        from onnx import numpy_helper

        self.weights.append(numpy_helper.from_array(np.ascontiguousarray(array), f"{self.p}/{name}"))
        return f"{self.p}/{name}"

    def op(self, op_type: str, inputs: list, outputs: list, **attrs) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op_type, inputs, [f"{self.p}/{o}" for o in outputs], **attrs))
        return f"{self.p}/{outputs[0]}"


def _routing(w: _Writer, router: str, k: int, normalize: bool, dtype) -> str:
    """``[T, E]`` routing weights: softmax of the router's logits, its top-k (renormalised), zero elsewhere."""
    from onnx import numpy_helper

    probs = w.op("Softmax", [router], ["probs"], axis=-1)
    w.op("TopK", [probs, w.const("k", np.array([k], np.int64))], ["topv", "topi"], axis=-1)
    top = f"{w.p}/topv"
    if normalize:
        total = w.op("ReduceSum", [top, w.const("last", np.array([-1], np.int64))], ["topsum"], keepdims=1)
        top = w.op("Div", [top, total], ["topw"])
    zeros = w.op("ConstantOfShape", [w.op("Shape", [probs], ["pshape"])], ["zeros"],
                 value=numpy_helper.from_array(np.zeros(1, dtype)))
    return w.op("ScatterElements", [zeros, f"{w.p}/topi", top], ["route"], axis=1)


def _expert(w: _Writer, e: int, x: str, route: str, fc1, b1, fc2, b2) -> str:
    """Expert ``e``'s output times its routing weight: ``route[:, e] * (fc2(gelu_tanh(gate) * up) + b2)``, the gate
    rows the even rows of ``fc1`` and the up rows the odd ones (``swiglu_fusion = 1``)."""
    h = w.op("MatMul", [x, w.const(f"e{e}/fc1", np.concatenate([fc1[0::2], fc1[1::2]]).T)], [f"e{e}/h"])
    if b1 is not None and np.any(b1):
        h = w.op("Add", [h, w.const(f"e{e}/b1", np.concatenate([b1[0::2], b1[1::2]]))], [f"e{e}/hb"])
    halves = w.const(f"e{e}/halves", np.array([fc2.shape[1]] * 2, np.int64))
    w.op("Split", [h, halves], [f"e{e}/gate", f"e{e}/up"], axis=-1)
    act = w.op("FastGelu", [f"{w.p}/e{e}/gate"], [f"e{e}/act"], domain="com.microsoft")
    a = w.op("Mul", [act, f"{w.p}/e{e}/up"], [f"e{e}/a"])
    y = w.op("MatMul", [a, w.const(f"e{e}/fc2", fc2.T)], [f"e{e}/y"])
    if b2 is not None and np.any(b2):
        y = w.op("Add", [y, w.const(f"e{e}/b2", b2)], [f"e{e}/yb"])
    share = w.op("Slice", [route, w.const(f"e{e}/at", np.array([e], np.int64)),
                           w.const(f"e{e}/to", np.array([e + 1], np.int64)),
                           w.const(f"e{e}/axis", np.array([1], np.int64))], [f"e{e}/w"])
    return w.op("Mul", [y, share], [f"e{e}/wy"])


def decompose(model) -> int:
    """Rewrite every node of :func:`unsupported` in ``model`` (an ``onnx.ModelProto``, changed in place) as dense
    dispatch over its experts; the number of nodes rewritten. Raises ``ValueError`` for a node this rewrite does
    not reproduce exactly (sparse mixer, a third expert projection, activation alpha / beta other than 1 / 0, the
    non-interleaved gate layout)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    nodes, replaced = unsupported(graph), set()
    for node in nodes:
        a = attributes(node)
        ins = list(node.input) + [""] * (8 - len(node.input))
        if a.get("use_sparse_mixer", 0) or ins[6] or a.get("activation_alpha", 1.0) != 1.0 \
                or a.get("activation_beta", 0.0) != 0.0 or a.get("swiglu_fusion", 1) != 1:
            raise ValueError(f"{node.name}: a MoE node this rewrite does not reproduce ({a})")
        fc1 = numpy_helper.to_array(inits[ins[2]])  # [E, 2I, H], gate and up rows interleaved
        fc2 = numpy_helper.to_array(inits[ins[4]])  # [E, H, I]
        b1 = numpy_helper.to_array(inits[ins[3]]) if ins[3] else [None] * len(fc1)
        b2 = numpy_helper.to_array(inits[ins[5]]) if ins[5] else [None] * len(fc1)
        w = _Writer(f"{node.name}/dense")
        x = w.op("Reshape", [ins[0], w.const("rows", np.array([-1, fc1.shape[2]], np.int64))], ["x"])
        route = _routing(w, ins[1], int(a["k"]), bool(a.get("normalize_routing_weights", 0)), fc1.dtype)
        total = None
        for e in range(len(fc1)):
            y = _expert(w, e, x, route, fc1[e], b1[e], fc2[e], b2[e])
            total = y if total is None else w.op("Add", [total, y], [f"e{e}/sum"])
        w.nodes.append(helper.make_node("Reshape", [total, w.op("Shape", [ins[0]], ["xshape"])], [node.output[0]]))
        at = list(graph.node).index(node)
        graph.node.remove(node)
        for j, m in enumerate(w.nodes):
            m.name = f"{w.p}/{m.op_type}_{j}"
            graph.node.insert(at + j, m)
        graph.initializer.extend(w.weights)
        replaced.update(n for n in ins[2:6] if n)
    used = {i for m in graph.node for i in m.input}
    for name in replaced - used:  # the operator's expert tensors, now in the per-expert MatMuls
        graph.initializer.remove(inits[name])
    return len(nodes)
