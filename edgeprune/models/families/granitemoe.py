"""Granite-MoE (``block_sparse_moe``: fused experts ``input_linear.weight`` [E, 2I, H] (gate rows then up rows)
and ``output_linear.weight`` [E, H, I]; ``router.layer`` Linear; top-k on the logits, then softmax over the
k chosen). transformers has only ``GraniteMoeForCausalLM``: the checkpoint classifies by label words
(:mod:`edgeprune.models.label_words`; Granite's ``logits_scaling`` is folded into the label rows). One expert
(softmax over one logit: weight exactly 1) folds into Granite, whose config carries the same multipliers, bit
for bit."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import GraniteConfig, GraniteMoeConfig
from transformers.models.granite.modeling_granite import GranitePreTrainedModel
from transformers.models.granitemoe.modeling_granitemoe import GraniteMoeMoE, GraniteMoePreTrainedModel

from edgeprune.models.adapter import SILU_GLU, DenseSibling, MoEAdapter, topk_then_softmax
from edgeprune.models.label_words import classifier_class

CLASSIFIER = classifier_class(GraniteMoeConfig, GraniteMoePreTrainedModel, "GraniteMoeForSequenceClassification")
GRANITE = classifier_class(GraniteConfig, GranitePreTrainedModel, "GraniteForSequenceClassification")
ROLES = {"input_linear.gate": "in", "input_linear.up": "in", "output_linear": "out"}
MLP = {"input_linear.gate": "gate_proj.weight", "input_linear.up": "up_proj.weight", "output_linear": "down_proj.weight"}
MOE_KEYS = ("router_aux_loss_coef", "output_router_logits", "position_embedding_type")


class GraniteMoeAdapter(MoEAdapter):
    """Fused 3-D expert tensors: expert ``e`` is row ``e`` of each, its gate and up halves named apart."""

    def num_experts(self, block):
        return block.input_linear.num_experts

    def top_k(self, block):
        return min(block.router.top_k, self.num_experts(block))

    def route(self, block, logits):
        return topk_then_softmax(logits, self.top_k(block))

    def expert_forward(self, block, e, x):
        gate, up = F.linear(x, block.input_linear.weight[e]).chunk(2, dim=-1)
        return F.linear(block.activation(gate) * up, block.output_linear.weight[e])

    def expert_tensors(self, state, path, e):
        gate, up = state[f"{path}.input_linear.weight"][e].chunk(2, dim=0)
        return {"input_linear.gate": gate, "input_linear.up": up, "output_linear": state[f"{path}.output_linear.weight"][e]}

    def set_expert_tensors(self, state, path, e, tensors):
        state[f"{path}.input_linear.weight"][e] = torch.cat([tensors["input_linear.gate"], tensors["input_linear.up"]])
        state[f"{path}.output_linear.weight"][e] = tensors["output_linear"]


def granite_sibling(drop: tuple[str, ...] = (), overrides=lambda cfg: {}) -> DenseSibling:
    return DenseSibling(GraniteConfig, GRANITE, MLP, mlp_path=lambda path: path.replace(".block_sparse_moe", ".mlp"),
                        drop_keys=MOE_KEYS + drop, overrides=overrides,
                        extra_ffn={"layer": lambda l: f"model.layers.{l}.mlp", "in": ("gate_proj", "up_proj"),
                                   "out": "down_proj"})


# what Granite-MoE and Granite-MoE-Shared adapters have in common
GRANITE_LAYOUT = dict(
    router_attr="router.layer",
    expert_roles=ROLES,
    num_experts_key="num_local_experts",
    renormalise=lambda block: True,  # softmax over the top-k logits = renormalised softmax top-k
    ort_moe=SILU_GLU,
    heads=("causal-lm",),
)

ADAPTER = GraniteMoeAdapter(
    model_type="granitemoe",
    block_class=GraniteMoeMoE,
    **GRANITE_LAYOUT,
    dense=granite_sibling(),
    fold_exact="exact (bit for bit)",
)
