"""DBRX (Databricks 2024): its own MoE layout.

``DbrxFFN`` (the block, the decoder layer's ``ffn``) holds ``router.layer`` (Linear E x H, no bias) and
``experts.mlp`` (``DbrxExpertGLU``): the E experts' weights stacked along rows in three 2-D tensors, ``w1``
(gate), ``v1`` (up) and ``w2`` (down, stored transposed), each [E * I, H]; expert e is rows e*I .. (e+1)*I and
computes ``(act(x w1_e^T) * (x v1_e^T)) w2_e``. Routing: softmax over the experts, top-``moe_top_k``, the kept
probabilities divided by their ``moe_normalize_expert_weights``-norm (p = 1 in the released model: the usual
renormalisation; None: none). Expert count and top-k live in the nested ``ffn_config``.

One expert's tensors in the Linear layout: gate = w1_e, up = v1_e, down = w2_e^T. I is read from the state
itself (rows of ``w1`` over rows of the router), so the same code slices the original's and the pruned model's
tensors. Export: the block's dense dispatch (:meth:`MoEAdapter.export_forward`; one expert: weight exactly 1).
No dense sibling in transformers: one expert keeps the class.
"""
from __future__ import annotations

import torch
from transformers import AutoConfig
from transformers.models.dbrx.modeling_dbrx import DbrxFFN

from edgeprune.errors import ConfigError
from edgeprune.models.adapter import MoEAdapter
from edgeprune.models.families.table import label_word_class

ROLES = {"gate": "in", "up": "in", "down": "out"}
STACKED = {"gate": "w1", "up": "v1", "down": "w2"}


class DbrxAdapter(MoEAdapter):
    def num_experts(self, block):
        return int(block.router.layer.out_features)

    def top_k(self, block):
        return min(int(block.top_k), self.num_experts(block))

    def route(self, block, logits):
        probs = torch.softmax(logits.float(), dim=-1)
        weight, idx = torch.topk(probs, self.top_k(block), dim=-1)
        p = block.moe_normalize_expert_weights
        if p is not None:
            weight = weight / torch.norm(weight, p=p, dim=-1, keepdim=True)
        return idx, weight

    def expert_forward(self, block, e, x):
        mlp, i = block.experts.mlp, block.experts.ffn_hidden_size
        rows = slice(e * i, (e + 1) * i)
        return mlp(x, mlp.w1[rows], mlp.v1[rows], mlp.w2[rows])

    def block_output(self, out, logits):
        return out

    def _rows(self, state, path, e):
        width = state[f"{path}.experts.mlp.w1"].shape[0] // state[f"{path}.router.layer.weight"].shape[0]
        return slice(e * width, (e + 1) * width)

    def expert_tensors(self, state, path, e):
        rows = self._rows(state, path, e)
        t = {role: state[f"{path}.experts.mlp.{name}"][rows] for role, name in STACKED.items()}
        t["down"] = t["down"].T
        return t

    def set_expert_tensors(self, state, path, e, tensors):
        rows = self._rows(state, path, e)
        for role, name in STACKED.items():
            state[f"{path}.experts.mlp.{name}"][rows] = tensors[role].T if role == "down" else tensors[role]

    def router_keys(self, model, layer):
        return [f"{self.block_paths(model)[layer]}.router.layer.weight"]

    def resize_config(self, config, k_per_layer):
        ks = set(k_per_layer.values())
        if len(ks) != 1:
            raise ConfigError(f"dbrx stores one expert count for all layers; the plan keeps {sorted(ks)}: use "
                              "--experts K (the same k in every layer)")
        k = ks.pop()
        ffn = config.ffn_config
        ffn.moe_num_experts, ffn.moe_top_k = k, min(int(ffn.moe_top_k), k)


label_word_class(AutoConfig.for_model("dbrx"))
ADAPTER = DbrxAdapter(model_type="dbrx", block_class=DbrxFFN, router_attr="router.layer", expert_roles=ROLES,
                      num_experts_key="ffn_config.moe_num_experts", top_k_key="ffn_config.moe_top_k",
                      heads=("causal-lm",), fold_exact="no sibling: keeps its class with one expert per layer",
                      note="its own stacked 2-D expert layout (models/families/dbrx.py)")
