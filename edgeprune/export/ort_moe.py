"""MoE layers (k > 1) exported as ONNX Runtime's own ``com.microsoft.MoE`` operator.

The contrib operator takes the tokens (T, H), the router logits (T, Z) and every expert's weights stacked
(``fc1`` [Z, rows, H], ``fc2`` [Z, H, I], biases [Z, rows] / [Z, H]) and computes only the routed experts:
softmax over the logits, top-``k``, renormalised over the k when ``normalize_routing_weights``; the expert is
``fc2(act(fc1 x + b1)) + b2``. For gated experts (``activation_type = swiglu``, ``swiglu_fusion = 1``) fc1's
rows interleave gate and up (g0, u0, g1, u1, ...) and the activation is
``min(g, limit) * sigmoid(alpha * min(g, limit)) * (clamp(u, -limit, limit) + beta)``: SiLU-gated experts
(Mixtral, Qwen-MoE, OLMoE, Granite-MoE) with alpha 1, beta 0, no limit; gpt-oss with 1.702, 1, 7. Top-k of the
logits then softmax over the k (Granite-MoE, gpt-oss) is the same as the renormalised softmax top-k.

A family maps onto it when its adapter has ``ort_moe`` (the activation's constants); the routing is the
adapter's ``renormalise``. Shared experts stay outside the operator. Measured on this machine (CPU provider,
ONNX Runtime 1.32) and compared with the dense-dispatch graph in ``results/families.md``.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch

from edgeprune.models.adapter import MoEAdapter
from edgeprune.models.fused import FusedAdapter


class _MoE(torch.autograd.Function):
    """The operator's semantics in PyTorch (what tracing records the shapes from) and its ONNX node."""

    @staticmethod
    def forward(ctx, x, logits, fc1, b1, fc2, b2, k: int, normalize: bool, alpha: float, beta: float, limit: float):
        weight, idx = torch.softmax(logits.float(), dim=-1).topk(k, dim=-1)
        if normalize:
            weight = weight / weight.sum(dim=-1, keepdim=True)
        h = torch.einsum("th,zrh->tzr", x, fc1) + b1  # every expert, for the trace only
        gate, up = h[..., ::2].clamp(max=limit), h[..., 1::2].clamp(-limit, limit)
        act = gate * torch.sigmoid(alpha * gate) * (up + beta)
        out = torch.einsum("tzi,zhi->tzh", act, fc2) + b2
        w = torch.zeros(logits.shape, dtype=out.dtype).scatter(-1, idx, weight.to(out.dtype))
        return (w.unsqueeze(-1) * out).sum(dim=1)

    @staticmethod
    def symbolic(g, x, logits, fc1, b1, fc2, b2, k, normalize, alpha, beta, limit):
        attrs = {"k_i": k, "activation_type_s": "swiglu", "normalize_routing_weights_i": int(normalize),
                 "swiglu_fusion_i": 1, "activation_alpha_f": alpha, "activation_beta_f": beta}
        if math.isfinite(limit):
            attrs["swiglu_limit_f"] = limit
        out = g.op("com.microsoft::MoE", x, logits, fc1, b1, fc2, b2, **attrs)
        out.setType(x.type())
        return out


def expert_weights(adapter: MoEAdapter, block: torch.nn.Module, experts=None) -> tuple[torch.Tensor, ...]:
    """fc1 [Z, 2I, H] (gate and up rows interleaved), its bias, fc2 [Z, H, I] and its bias, from the adapter's
    roles: the first ``in`` tensor is the gate, the second the up projection (zeros where a family has no bias);
    ``experts``: only those slots, in that order (default every one)."""
    state = {f"b.{k}": v for k, v in block.state_dict().items()}
    roles = adapter.expert_roles
    ins = [n for n, r in roles.items() if r == "in"]
    in_b = [n for n, r in roles.items() if r == "in_bias"]
    out, out_b = next(n for n, r in roles.items() if r == "out"), [n for n, r in roles.items() if r == "out_bias"]
    fc1, b1, fc2, b2 = [], [], [], []
    for e in range(adapter.num_experts(block)) if experts is None else experts:
        t = adapter.expert_tensors(state, "b", e)
        gate, up = t[ins[0]], t[ins[1]]
        fc1.append(torch.stack([gate, up], dim=1).reshape(-1, gate.shape[1]))
        bias = [t[n] for n in in_b if n in t] or [torch.zeros(gate.shape[0], dtype=gate.dtype)] * 2
        b1.append(torch.stack(bias, dim=1).reshape(-1))
        fc2.append(t[out])
        b2.append(t[out_b[0]] if out_b and out_b[0] in t else torch.zeros(t[out].shape[0], dtype=gate.dtype))
    return tuple(torch.stack(v).detach().float().contiguous() for v in (fc1, b1, fc2, b2))


def maps_onto_ort_moe(adapter: MoEAdapter, model: torch.nn.Module) -> bool:
    """True when every MoE layer of ``model`` can be the operator: a family on transformers 5's fused layout with
    ``ort_moe`` and gated experts, and k > 1 (a one-expert layer is cheaper as a plain MLP)."""
    if not (isinstance(adapter, FusedAdapter) and adapter.ort_moe and adapter.layout["has_gate"]):
        return False
    blocks = adapter.blocks(model)
    return bool(blocks) and all(adapter.num_experts(b) > 1 for b in blocks.values())


@contextlib.contextmanager
def ort_moe_patch(adapter: FusedAdapter, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Every MoE block's experts module runs as one ``com.microsoft.MoE`` node, fed with the logits of the family's own
    router (caught by a forward hook); the rest of the block is the family's code. Slots that per-layer pruning
    padded (:func:`~edgeprune.models.adapter.padded_slots`: a -1e9 router bias, never selected) are left out of
    the node, weights and logits alike: the softmax gives them 0, so the node computes the same. Undone on exit,
    whatever happens."""
    from edgeprune.models.adapter import padded_slots

    seen, hooks = {}, []
    layers = {id(b): layer for layer, b in adapter.blocks(model).items()}

    def make(block, ex):
        skip = padded_slots(model.config, layers[id(block)])
        keep = [e for e in range(adapter.num_experts(block)) if e not in skip]
        ws, spec = expert_weights(adapter, block, keep), adapter.ort_moe
        hooks.append(adapter.router(block).register_forward_hook(lambda _m, _a, out: seen.__setitem__(id(block), out[0])))

        def forward(hidden, idx, weight):
            flat = hidden.reshape(-1, hidden.shape[-1])
            logits = seen.pop(id(block))
            logits = logits[..., keep] if skip else logits
            out = _MoE.apply(flat, logits, *ws, adapter.top_k(block), bool(adapter.renormalise(block)),
                             float(spec["alpha"]), float(spec["beta"]), float(spec["limit"]))
            return out.to(hidden.dtype).reshape(hidden.shape)
        return forward

    try:
        with adapter.experts_patch(model, make) as m:
            yield m
    finally:
        for h in hooks:
            h.remove()
