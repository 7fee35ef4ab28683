"""Granite-MoE-Shared: Granite-MoE plus an ungated ``shared_mlp`` beside the block in every layer (fused
``input_linear`` [2S, H], ``output_linear`` [H, S]). One expert folds into Granite exactly: the dense MLP is
[routed expert | shared expert] side by side (intermediate size I + S), whose output is the sum of both."""
from __future__ import annotations

from transformers import GraniteMoeSharedConfig
from transformers.models.granitemoeshared.modeling_granitemoeshared import GraniteMoeSharedPreTrainedModel

from edgeprune.models.families.granitemoe import GRANITE_LAYOUT, granite_sibling
from edgeprune.models.fused import FusedAdapter, fused_family
from edgeprune.models.label_words import classifier_class

CLASSIFIER = classifier_class(GraniteMoeSharedConfig, GraniteMoeSharedPreTrainedModel,
                              "GraniteMoeSharedForSequenceClassification")


def layer_shared_mlp(state, path):
    """The shared MLP sits beside the block, in the decoder layer (absent with shared_intermediate_size 0)."""
    layer = path.rsplit(".block_sparse_moe", 1)[0]
    if f"{layer}.shared_mlp.input_linear.weight" not in state:
        return {}
    gate, up = state[f"{layer}.shared_mlp.input_linear.weight"].chunk(2, dim=0)
    return {"gate": gate, "up": up, "down": state[f"{layer}.shared_mlp.output_linear.weight"]}


class GraniteMoeSharedAdapter(FusedAdapter):
    def shared_tensors(self, state, path):
        return layer_shared_mlp(state, path)


ADAPTER = fused_family(
    "granitemoeshared", cls=GraniteMoeSharedAdapter, **GRANITE_LAYOUT,
    dense=granite_sibling(("shared_intermediate_size",), overrides=lambda cfg: {
        "intermediate_size": cfg["intermediate_size"] + cfg.get("shared_intermediate_size", 0)}),
    fold_exact="exact (routed and shared experts side by side in one MLP)",
)
