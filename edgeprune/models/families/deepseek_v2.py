"""DeepSeek-V2 (DeepSeek-V3's block layout: ``experts``, ungated ``shared_experts``, ``gate`` with a ``weight``):
softmax in fp32, top-k ``greedy`` or ``group_limited_greedy`` (best expert per group, ``topk_group`` groups),
weights the chosen probabilities times ``routed_scaling_factor``, never renormalised (transformers 4.57 ignores
``norm_topk_prob`` here; the router's own code). A pruned layer routes greedily (``n_group = topk_group = 1``): exact for ``greedy``
checkpoints and where the group limit was inactive. One expert has weight exactly the scaling factor and folds
into its own class with every layer dense, routed and shared experts in one MLP."""
from __future__ import annotations

import contextlib

import torch
from transformers import DeepseekV2Config, DeepseekV2ForSequenceClassification
from transformers.models.deepseek_v2 import modeling_deepseek_v2 as modeling
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2RotaryEmbedding

from edgeprune.models.families.deepseek_v3 import DEEPSEEK, own_dense
from edgeprune.models.fused import FusedAdapter, fused_family


class DeepseekV2Adapter(FusedAdapter):
    @contextlib.contextmanager
    def export_patch(self, model):
        """Dense dispatch, and rotary embeddings in real arithmetic: DeepSeek-V2 rotates with complex numbers
        (``torch.polar``, ``view_as_complex``), which ONNX cannot express; (a + ib)(c + is) is computed as
        (ac - bs, as + bc) on the same fp32 values. Undone on exit."""
        ropes = [m for m in model.modules() if isinstance(m, DeepseekV2RotaryEmbedding)]
        original = modeling.apply_rotary_emb
        try:
            with super().export_patch(model):
                for r in ropes:
                    r.forward = (lambda rope: (lambda x, position_ids: _real_freqs(rope, position_ids)))(r)
                modeling.apply_rotary_emb = _real_rotary
                yield model
        finally:
            modeling.apply_rotary_emb = original
            for r in ropes:
                r.__dict__.pop("forward", None)


def _real_freqs(rope, position_ids):
    """``freqs_cis`` of the rotary embedding as (..., d/2, 2) real pairs (cos, sin) times its attention scaling."""
    inv = rope.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
    freqs = (inv @ position_ids[:, None, :].float()).transpose(1, 2)
    return torch.stack([freqs.cos(), freqs.sin()], dim=-1) * rope.attention_scaling


def _real_rotary(xq, xk, freqs):
    f = freqs.unsqueeze(1)
    c, s = f[..., 0], f[..., 1]

    def rotate(x):
        pairs = x.float().reshape(*x.shape[:-1], -1, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(3).type_as(x)

    return rotate(xq), rotate(xk)


ADAPTER = fused_family(
    "deepseek_v2", cls=DeepseekV2Adapter, **DEEPSEEK,
    dense=own_dense(DeepseekV2Config, DeepseekV2ForSequenceClassification),
    fold_exact="own class, every layer dense, routed (x routed_scaling_factor) and shared experts in one MLP: exact "
               "to float rounding",
)
