"""Phi-MoE (``mlp`` block: Mixtral's fused experts, a ``router`` routing by SparseMixer (Liu et al. 2024), top-2
only: the best expert, then the best of the rest, each weighted by a softmax over the logits within
``2 * router_jitter_noise`` (relative) of that pick). The router's own forward is what calibration sees. SparseMixer
needs two experts (with one, its second pick is a softmax over nothing: NaN), so k = 1 is refused; k >= 2 keeps
the class."""
from __future__ import annotations

from edgeprune.models.fused import NeedsTwo, fused_family

two_or_more = NeedsTwo("routes with SparseMixer, which picks exactly two experts (one expert gives NaN in its class)",
                       "SparseMixer needs two experts")


ADAPTER = fused_family(
    "phimoe",
    router_attr="router",
    check_k=two_or_more,
    fold_exact=f"k = 1 refused ({two_or_more.fold}); k >= 2 keeps Phi-MoE",
)
