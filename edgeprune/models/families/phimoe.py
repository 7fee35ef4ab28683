"""Phi-MoE (``block_sparse_moe``: Mixtral's experts w1 gate / w3 up / w2 down and ``gate`` Linear; routing by
SparseMixer (Liu et al. 2024), top-2 only: the best expert, then the best of the rest, each weighted by a softmax
over the logits within ``2 * router_jitter_noise`` (relative) of that pick). The adapter calls transformers' own
``sparsemixer`` in eval mode, so calibration sees exactly the family's choice. SparseMixer needs two experts (with
one, its second pick is a softmax over nothing: NaN), so k = 1 is refused; k >= 2 keeps the class."""
from __future__ import annotations

from transformers.models.phimoe.modeling_phimoe import PhimoeSparseMoeBlock, sparsemixer

from edgeprune.errors import ConfigError
from edgeprune.models.adapter import MoEAdapter


class PhimoeAdapter(MoEAdapter):
    def route(self, block, logits):
        weight, idx = sparsemixer(logits.float(), jitter_eps=block.router_jitter_noise, training=False)
        return idx, weight

    def check_k(self, block, k):
        if k < 2:
            raise ConfigError("phimoe routes with SparseMixer, which picks exactly two experts (one expert gives NaN "
                              "in its class); use --experts 2 or more")


ADAPTER = PhimoeAdapter(
    model_type="phimoe",
    block_class=PhimoeSparseMoeBlock,
    expert_roles={"w1.weight": "in", "w3.weight": "in", "w2.weight": "out"},
    num_experts_key="num_local_experts",
    fold_exact="k = 1 refused (SparseMixer needs two experts); k >= 2 keeps Phi-MoE",
)
