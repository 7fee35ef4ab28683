"""k > 1 experts with 8- or 4-bit weights inside ONNX Runtime's ``com.microsoft.QMoE`` operator.

The build exports the MoE layers as ``com.microsoft.MoE`` (:mod:`.ort_moe`, fp32 experts), then this rewrite
turns each such node into ``QMoE`` with the same inputs, attributes and routing: ``fc1`` [Z, 2I, H] and ``fc2``
[Z, H, I] quantized block-wise along their input axis with ONNX Runtime's own MatMulNBits quantizer
(``quantize_matmul_4bits`` / ``quantize_matmul_8bits``, symmetric, signed block scales: the encoding the CPU
kernel reads, as onnxruntime-genai's model builder writes it for CPU), raw storage [Z, N, K * bits / 8] and scales
[Z, N, K / block]; biases stay fp32. ONNX Runtime 1.32's CPU kernel packs such weights once at session load for
the MLAS n-bit GEMM kernels when K is a multiple of the block (``PrePackQNBitExperts``), otherwise it dequantizes
to fp32 and runs SGEMM: :func:`block_size` picks the largest block that divides both H and I.

Exactness: with 4-bit weights the operator equals the fp32 experts computed from the dequantized weights within
3e-7 (``tests/test_qmoe.py``); with 8-bit weights ONNX Runtime also quantizes the activations to int8 inside its
n-bit GEMM, so the output differs from the dequantized weights' by the activation rounding too (the test bounds
both against the fp32 operator).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

BLOCKS = (128, 64, 32)


def block_size(hidden: int, inter: int) -> int:
    """The largest of 128, 64, 32 dividing both widths (the kernel's fast path), else 32."""
    return next((b for b in BLOCKS if hidden % b == 0 and inter % b == 0), 32)


def quantize_experts(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """[Z, N, K] fp32 -> (uint8 [Z, N, K * bits / 8], fp32 scales [Z, N, ceil(K / block)])."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    fn = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    z, n, k = w.shape
    blocks = -(-k // block)
    packed, scales = [], []
    for e in range(z):
        q = np.zeros((n, blocks, block * bits // 8), dtype=np.uint8)
        s = np.zeros(n * blocks, dtype=np.float32)
        zp = np.zeros(n * -(-blocks * bits // 8), dtype=np.uint8)  # unused: symmetric
        fn(q, np.ascontiguousarray(w[e].T, dtype=np.float32), s, zp, block, n, k, True)
        packed.append(q.reshape(n, -1)[:, : k * bits // 8])
        scales.append(s.reshape(n, blocks))
    return np.stack(packed), np.stack(scales)


def dequantize_experts(packed: np.ndarray, scales: np.ndarray, bits: int, block: int, k: int) -> np.ndarray:
    """The fp32 weights a QMoE node computes with (the inverse of :func:`quantize_experts` up to rounding)."""
    if bits == 8:
        v = packed.astype(np.float32) - 128.0
    else:
        v = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:2], -1).astype(np.float32) - 8.0
    pad = scales.shape[-1] * block - k
    v = np.concatenate([v[..., :k], np.zeros((*v.shape[:2], pad), np.float32)], axis=-1)
    return (v.reshape(*v.shape[:2], -1, block) * scales[..., None]).reshape(*v.shape[:2], -1)[..., :k]


def to_qmoe(model: onnx.ModelProto, bits: int) -> dict:
    """Rewrite every ``com.microsoft.MoE`` node of ``model`` (in place) into ``QMoE`` with ``bits``-bit experts
    (the weights are initializers or, as torch.onnx writes them before ORT's optimizer, Constant nodes). Returns
    what was done: nodes, bits, block size(s), bytes of expert weights before and after."""
    if bits not in (4, 8):
        raise ValueError(f"QMoE expert weights are 4 or 8 bits, not {bits}")
    tensors = {t.name: t for t in model.graph.initializer}  # read as arrays only where an MoE node takes them
    tensors.update({n.output[0]: n.attribute[0].t for n in model.graph.node
                    if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    done = {"nodes": 0, "bits": bits, "blocks": set(), "fp32_bytes": 0, "quantized_bytes": 0}
    for node in model.graph.node:
        if node.domain != "com.microsoft" or node.op_type != "MoE":
            continue
        x, router, fc1, b1, fc2, b2 = (list(node.input) + [""] * 6)[:6]
        w1, w2 = numpy_helper.to_array(tensors[fc1]), numpy_helper.to_array(tensors[fc2])
        block = block_size(w1.shape[2], w2.shape[2])
        new = []
        for name, w in ((fc1, w1), (fc2, w2)):
            q, s = quantize_experts(w, bits, block)
            new += [numpy_helper.from_array(q, name + f"_q{bits}"),
                    numpy_helper.from_array(s, name + f"_q{bits}_scales")]
            done["fp32_bytes"] += w.nbytes
            done["quantized_bytes"] += q.nbytes + s.nbytes
        model.graph.initializer.extend(new)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}
        q_node = helper.make_node("QMoE", [x, router, new[0].name, new[1].name, b1, new[2].name, new[3].name, b2],
                                  list(node.output), name=(node.name or "moe") + "_qmoe", domain="com.microsoft",
                                  expert_weight_bits=bits, block_size=block, **attrs)
        node.CopyFrom(q_node)
        done["nodes"] += 1
        done["blocks"].add(block)
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    nodes = [n for n in model.graph.node if n.op_type != "Constant" or n.output[0] in used]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    done["blocks"] = sorted(done["blocks"])
    return done
