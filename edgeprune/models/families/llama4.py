"""Llama 4 (text): its own MoE (``Llama4TextMoe``), which is not on transformers' experts interface.

* router ``router`` (a Linear, E x H): top-k of the logits, each kept expert's weight ``sigmoid(logit)``, the
  others 0 (Llama 4's sigmoid routing; top-1 in the released models);
* experts ``experts``: ``gate_up_proj`` [E, H, 2I] (transposed; gate columns, then up), ``down_proj`` [E, I, H];
  the weight scales the expert's *input*: out = shared(x) + sum_e expert_e(w_e * x), every expert computed on
  every token (a batched matmul: the family's own forward exports as it is, no patch);
* ``shared_expert``: a gated MLP on every token.

Because the weight multiplies the input, calibration's per-expert output ``expert_e(x)`` times ``w_e`` (REAP,
Chen's alpha) is a first-order reading of the contribution ``expert_e(w_e x)``; the pruned model itself computes
the family's exact sum. One expert keeps the class (its weight sigmoid(logit) is not constant: no fold).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from edgeprune.models.fused import FusedAdapter

LAYOUT = dict(is_transposed=True)


class Llama4Adapter(FusedAdapter):
    def routing(self, block: nn.Module, x: torch.Tensor):
        router = self.router(block)
        logits = nn.functional.linear(x, router.weight, router.bias).float()
        top, idx = torch.topk(logits, router.top_k, dim=-1)
        return logits, idx, torch.sigmoid(top)

    def router_logits(self, block, x):
        return self.routing(block, x)[0]

    def expert_forward(self, block, e, x):
        ex = getattr(block, self.experts_attr)
        gate, up = (x @ ex.gate_up_proj[e]).chunk(2, dim=-1)
        return (ex.act_fn(gate) * up) @ ex.down_proj[e]

    def shared_forward(self, block, x):
        return block.shared_expert(x)

    def shared_tensors(self, state, path):
        return {n: state[f"{path}.shared_expert.{n}_proj.weight"] for n in ("gate", "up", "down")}

    @contextlib.contextmanager
    def export_patch(self, model):
        """The experts need no patch (every expert on every token, one batched matmul); the rotary embedding does:
        Llama 4 rotates queries and keys as complex numbers (``torch.polar``, ``view_as_complex``), which ONNX has
        not got, so while exporting it is the same rotation in real arithmetic (:func:`real_rotary`)."""
        from transformers.models.llama4 import modeling_llama4 as m

        rotaries = [r for r in model.modules() if isinstance(r, m.Llama4TextRotaryEmbedding)]
        original = m.apply_rotary_emb
        for r in rotaries:
            r.forward = (lambda rot: lambda x, position_ids: real_frequencies(rot, position_ids))(r)
        m.apply_rotary_emb = real_rotary
        try:
            yield model
        finally:
            m.apply_rotary_emb = original
            for r in rotaries:
                r.__dict__.pop("forward", None)


def real_frequencies(rotary: nn.Module, position_ids: torch.Tensor) -> torch.Tensor:
    """``Llama4TextRotaryEmbedding``'s ``polar(1, theta) * scaling`` as the last axis (cos, sin) * scaling."""
    freqs = position_ids[..., None].float() * rotary.inv_freq.float()
    return torch.stack([freqs.cos(), freqs.sin()], dim=-1) * rotary.attention_scaling


def real_rotary(xq: torch.Tensor, xk: torch.Tensor, freqs: torch.Tensor):
    """``apply_rotary_emb`` on (cos, sin) pairs: the pair (a, b) of x times cos + i sin is (a cos - b sin,
    a sin + b cos), exactly the complex product Llama 4 computes."""
    cos, sin = freqs[..., 0][:, :, None, :], freqs[..., 1][:, :, None, :]

    def rotate(x):
        pairs = x.float().reshape(*x.shape[:-1], -1, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(3).type_as(x)

    return rotate(xq), rotate(xk)
