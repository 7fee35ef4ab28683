"""Muse Spark (text model of the ``muse_spark`` multimodal checkpoints): experts in their own width.

Its MoE block (``MuseSparkMoE``) is the common fused layout, except that the experts do not read the residual
stream: the block projects it to ``moe_hidden_size`` and norms it first, and projects the experts' weighted sum
back (both projections bias-free)::

    out = P_post( sum_e w_e * expert_e( norm(P_pre x) ) ) = sum_e w_e * P_post expert_e( norm(P_pre x) )

(linearity of P_post). So one expert's contribution in the residual stream, what calibration measures (REAP's
||w_e f_e(x)||, Chen's alpha), is ``P_post expert_e(norm(P_pre x))``: :meth:`MuseSparkAdapter.expert_forward`.
Slicing, merging and the dense-dispatch export act on the experts module alone and need nothing more; the
projections stay as they are. Its router (sigmoid scores, correction bias, top-k renormalised with an epsilon,
routed scaling factor) is called as written.
"""
from __future__ import annotations

from edgeprune.models.fused import FusedAdapter


class MuseSparkAdapter(FusedAdapter):
    def expert_forward(self, block, e, x):
        inner = block.pre_expert_norm(block.pre_expert_proj(x))
        return block.post_expert_proj(self.all_experts(block.experts, inner, [e])[0])
