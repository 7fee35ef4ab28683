"""gpt-oss (``mlp``: ``router`` with ``weight`` and ``bias``, returning scores and indices rather than logits;
fused ``experts``: ``gate_up_proj`` [E, H, 2I] with gate and up *interleaved* on the last axis, its bias
[E, 2I], ``down_proj`` [E, I, H] and its bias [E, H]; top-k on the logits, then softmax over the k chosen;
the expert is ``(clamp(up) + 1) * g * sigmoid(1.702 g)``, g = clamp(gate, max 7)). Expert ``e`` is seen as
Linear-layout tensors (gate / up rows = hidden units, down columns = hidden units, biases beside), so merging,
scaling and alignment work by roles. No dense sibling in transformers (the clamped GLU with biases is the
family's own): a one-expert model keeps its class, weight exactly 1, router skipped in export."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

from edgeprune.models.adapter import MoEAdapter, topk_then_softmax

ROLES = {"gate": "in", "up": "in", "gate_bias": "in_bias", "up_bias": "in_bias", "down": "out", "down_bias": "out_bias"}


class GptOssAdapter(MoEAdapter):
    def router_logits(self, block, x):
        return F.linear(x, block.router.weight, block.router.bias)

    def num_experts(self, block):
        return block.experts.gate_up_proj.shape[0]

    def top_k(self, block):
        return min(int(block.router.top_k), self.num_experts(block))

    def route(self, block, logits):
        return topk_then_softmax(logits, self.top_k(block))

    def expert_forward(self, block, e, x):
        ex = block.experts
        gate_up = x @ ex.gate_up_proj[e] + ex.gate_up_proj_bias[e]
        gate, up = gate_up[..., ::2].clamp(max=ex.limit), gate_up[..., 1::2].clamp(-ex.limit, ex.limit)
        return ((up + 1) * gate * torch.sigmoid(gate * ex.alpha)) @ ex.down_proj[e] + ex.down_proj_bias[e]

    def expert_tensors(self, state, path, e):
        gu, gub = state[f"{path}.experts.gate_up_proj"][e], state[f"{path}.experts.gate_up_proj_bias"][e]
        return {"gate": gu[:, ::2].T, "up": gu[:, 1::2].T, "gate_bias": gub[::2], "up_bias": gub[1::2],
                "down": state[f"{path}.experts.down_proj"][e].T, "down_bias": state[f"{path}.experts.down_proj_bias"][e]}

    def set_expert_tensors(self, state, path, e, t):
        gu, gub = state[f"{path}.experts.gate_up_proj"][e], state[f"{path}.experts.gate_up_proj_bias"][e]
        gu[:, ::2], gu[:, 1::2] = t["gate"].T, t["up"].T
        gub[::2], gub[1::2] = t["gate_bias"], t["up_bias"]
        state[f"{path}.experts.down_proj"][e] = t["down"].T
        state[f"{path}.experts.down_proj_bias"][e] = t["down_bias"]


ADAPTER = GptOssAdapter(
    model_type="gpt_oss",
    block_class=GptOssMLP,
    router_attr="router",
    expert_roles=ROLES,
    num_experts_key="num_local_experts",
    renormalise=lambda block: True,  # softmax over the top-k logits = renormalised softmax top-k
    ort_moe={"activation": "swiglu", "alpha": 1.702, "beta": 1.0, "limit": 7.0},  # (clamp(up) + 1) * g sigmoid(1.702 g)
    fold_exact="no sibling: keeps gpt-oss with one expert per layer (router skipped in export, exact)",
)
