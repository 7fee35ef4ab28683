"""edgeprune's own BERT-MoE (Switch top-1 routing, or top-k renormalised): folds into
``BertForSequenceClassification`` exactly; per-layer expert counts (``num_experts_per_layer``)."""
from __future__ import annotations

from transformers import BertConfig, BertForSequenceClassification

from edgeprune.models.adapter import DenseSibling, MoEAdapter
from edgeprune.models.bert_moe import BertMoeBlock

MOE_KEYS = ("moe_layers", "num_experts_per_layer", "router_aux_loss_coef", "router_z_loss_coef", "router_jitter")
# one expert's parameters -> the dense BERT layer's FFN parameters (upcycling reads this map the other way)
FFN_MAP = {"w_in.weight": "intermediate.dense.weight", "w_in.bias": "intermediate.dense.bias",
           "w_out.weight": "output.dense.weight", "w_out.bias": "output.dense.bias"}


class BertMoeAdapter(MoEAdapter):
    per_layer_counts = True

    def resize_config(self, config, k_per_layer):
        config.num_experts_per_layer = [k_per_layer.get(l, config.experts_in(l)) for l in config.moe_layers]

    def block_output(self, out, logits):
        return out


ADAPTER = BertMoeAdapter(
    model_type="bert_moe",
    block_class=BertMoeBlock,
    router_attr="router",
    expert_roles={"w_in.weight": "in", "w_in.bias": "in_bias", "w_out.weight": "out", "w_out.bias": "out_bias"},
    num_experts_key="num_experts",
    renormalise=lambda block: block.top_k > 1,
    dense=DenseSibling(BertConfig, BertForSequenceClassification, FFN_MAP,
                       mlp_path=lambda path: path.rsplit(".moe", 1)[0], drop_keys=MOE_KEYS,
                       extra_ffn={"layer": lambda l: f"bert.encoder.layer.{l}", "in": ("intermediate.dense",),
                                  "out": "output.dense"}),
    fold_exact="exact (bit for bit)",
    heads=("sequence-classification",),
    uses_token_type_ids=True,
    ort_model_type="bert",
    extra={"upcycle_from": "bert", "expert_prefix": lambda layer, e: f"encoder.layer.{layer}.moe.experts.{e}.",
           "dense_prefix": lambda layer: f"encoder.layer.{layer}.", "ffn_map": FFN_MAP,
           "progressive": True},  # the block masks dropped experts (``alive``) during fine-tuning
)
