"""What each registered family supports (heads, the k = 1 fold, the export path), as ``edgeprune families`` lists
it from ``models/families.json`` without importing torch."""
from __future__ import annotations

import json
from pathlib import Path

from edgeprune.models.registry import all_adapters

TABLE = Path(__file__).parents[1] / "models" / "families.json"
"""``edgeprune families``' lines, written from the adapters (:func:`family_lines`) so that listing the families
imports no torch; tests/test_layout.py fails when the file and the registry disagree (then run
``python -c "from edgeprune.export.support import write_table; write_table()"``)."""


def family_lines() -> list[str]:
    """One line per registered family (heads, fold target (exact or not), export path), then one per MoE model type
    of transformers that is not supported, with the reason (:mod:`edgeprune.models.families.refused`)."""
    from edgeprune.models.families.multimodal import VIA_TEXT
    from edgeprune.models.families.refused import REFUSED

    lines = []
    for a in all_adapters():
        fold = a.dense.classifier_class.__name__ if a.dense else "its own class"
        k1 = "torch.onnx"
        k2 = "torch.onnx + dense dispatch" + (" or com.microsoft.MoE" if a.ort_moe else "")
        heads = ", ".join(h + (" (label words)" if h.endswith("-lm") else "") for h in a.heads)
        lines.append(f"{a.model_type:19s} heads: {heads}; k = 1 -> {fold}: {a.fold_exact}; export: {k1} (k = 1), "
                     f"{k2} (k > 1)")
    lines += [f"{mt:19s} multimodal: its text MoE as {text} (the artifact is the text model; the vision / audio "
              "towers are left out)" for mt, text in sorted(VIA_TEXT.items())]
    lines += [f"{mt:19s} not supported: {why}" for mt, why in sorted(REFUSED.items())]
    return lines


def write_table() -> None:
    TABLE.write_text(json.dumps(family_lines(), indent=1) + "\n")
