"""gpt-oss (``mlp`` block: ``router`` with ``weight`` and ``bias``; fused ``experts`` stored transposed
(``gate_up_proj`` [E, H, 2I], ``down_proj`` [E, I, H]), gate and up *interleaved*, with biases; top-k on the logits,
then softmax over the k chosen; the expert is ``(clamp(up) + 1) * g * sigmoid(1.702 g)``, g = clamp(gate, max 7),
the experts module's own ``_apply_gate``). Expert ``e`` is seen as Linear-layout tensors (gate / up rows = hidden
units, down columns = hidden units, biases beside), so merging, scaling and alignment work by roles. No dense
sibling in transformers (the clamped GLU with biases is the family's own): a one-expert model keeps its class
(weight exactly 1)."""
from __future__ import annotations

from edgeprune.models.fused import fused_family

ADAPTER = fused_family(
    "gpt_oss",
    router_attr="router",
    layout={"is_transposed": True, "is_concatenated": False, "has_bias": True},
    renormalise=lambda block: True,  # softmax over the top-k logits = renormalised softmax top-k
    ort_moe={"activation": "swiglu", "alpha": 1.702, "beta": 1.0, "limit": 7.0},  # (clamp(up) + 1) * g sigmoid(1.702 g)
    fold_exact="no sibling: keeps gpt-oss with one expert per layer (exact)",
)
