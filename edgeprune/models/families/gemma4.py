"""Gemma 4 (text; ``gemma4`` checkpoints through their text model): experts beside a dense MLP in the decoder layer.

Gemma 4 has no MoE block module: where ``enable_moe_block`` is set, each decoder layer holds a router and an
experts module (``Gemma4TextExperts``, the common fused storage: ``gate_up_proj`` [E, 2I, H] gate rows then up
rows, ``down_proj`` [E, H, I]) beside its dense MLP, and computes::

    h = residual after attention
    out = norm_1(mlp(norm_pre(h))) + norm_2( sum_e w_e * expert_e(norm_pre2(h)) )

with the router reading ``h`` itself: RMS-normed without scale, times a learnt scale and H^-1/2, a linear
projection, softmax over the experts, top-k renormalised, times a learnt ``per_expert_scale[e]``. So the
"block" edgeprune prunes is the decoder layer (it holds both), calibration hooks the router (its input is ``h``:
:meth:`Gemma4Adapter.routing_input`), and one expert's contribution, what REAP and Chen's alpha read, is
``expert_e(norm_pre2(h))`` before ``norm_2`` (an RMSNorm of the weighted sum, not a sum over experts). The router's
per-expert rows are ``proj.weight`` and ``per_expert_scale``; the dense MLP stays. One expert keeps the class (its
weight ``per_expert_scale[e]`` is a constant, but the experts' sum is normed with the dense MLP's beside it:
there is no dense sibling to fold into).
"""
from __future__ import annotations

from edgeprune.models.fused import FusedAdapter


class Gemma4Adapter(FusedAdapter):
    def routing_input(self, block):
        return block.router

    def expert_forward(self, block, e, x):
        return self.all_experts(block.experts, block.pre_feedforward_layernorm_2(x), [e])[0]

    def top_k(self, block):
        return min(int(block.router.config.top_k_experts), self.num_experts(block))

    def router_keys(self, model, layer):
        path = self.block_paths(model)[layer]
        return [f"{path}.router.proj.weight", f"{path}.router.per_expert_scale"]
