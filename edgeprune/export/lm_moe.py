"""A decoder's k > 1 experts in its ONNX graph: dense dispatch or ONNX Runtime's ``MoE`` / ``QMoE`` operator
(the target's ``[generate].moe_operator``).

- ``dense``: every kept expert a ``MatMul`` pair weighted by its routing weight (the adapter's export patch);
  the weight-only quantizer turns each into ``MatMulNBits``. A family the model builder writes only with its
  operator (:data:`~edgeprune.export.genai_builder.BUILDER_MOE`) is exported by ``torch.onnx`` instead.
- ``qmoe``: the fp32 graph keeps each layer's experts in one ``com.microsoft.MoE`` node (only the routed k
  experts computed per token), and the int4 / int8 variants hold them in ``QMoE`` with 4- / 8-bit weights:
  written by the model builder for its MoE families, and by edgeprune's own export (:mod:`.ort_moe`, then
  :func:`.qmoe.to_qmoe`) for families that map onto the operator (gated experts on transformers 5's fused
  layout: Mixtral, Qwen-MoE, OLMoE, Granite-MoE, gpt-oss, ...). Other families stay dense dispatch, said in the
  manifest's ``exporter``.
- ``auto``: the builder's operator where the builder writes the family, dense dispatch elsewhere.

Which one a profile takes is measured side by side on decoding (``python scripts/moe_operators_lm.py``,
``results/moe_operators_lm.md``).
"""
from __future__ import annotations

from edgeprune.errors import ExportError


def use_builder(model, exporter: str, moe_operator: str) -> bool:
    """Whether onnxruntime-genai's model builder writes ``model``'s fp32 graph."""
    from edgeprune.export.genai_builder import BUILDER_MOE, builder_supports

    if exporter not in ("auto", "genai") or not builder_supports(model):
        return False
    if moe_operator == "dense" and type(model).__name__ in BUILDER_MOE:
        if exporter == "genai":
            raise ExportError(f"onnxruntime-genai's model builder writes {type(model).__name__}'s experts only as "
                              "com.microsoft.MoE / QMoE; use [generate].moe_operator = \"qmoe\" or exporter = "
                              "\"torch.onnx\" for dense dispatch")
        return False
    return True


def export_patch(adapter, model, moe_operator: str):
    """(the patch to trace ``model`` under, the exporter's suffix): ``com.microsoft.MoE`` nodes where
    ``moe_operator`` is ``qmoe`` and the family maps onto the operator, else the adapter's dense dispatch."""
    from edgeprune.export.ort_moe import maps_onto_ort_moe, ort_moe_patch

    if moe_operator == "qmoe" and maps_onto_ort_moe(adapter, model):
        return ort_moe_patch(adapter, model), "+ort_moe"
    return adapter.export_patch(model), "+dense_dispatch"


def experts_in_qmoe(graph, bits: int) -> str | None:
    """Every ``com.microsoft.MoE`` node of ``graph`` (edgeprune's own export) as ``QMoE`` with ``bits``-bit
    experts, in place; what was done, or None where the graph has no such node."""
    from edgeprune.export.qmoe import to_qmoe

    if not any(n.op_type == "MoE" and n.domain == "com.microsoft" for n in graph.graph.node):
        return None
    done = to_qmoe(graph, bits)
    return (f"com.microsoft.QMoE ({done['nodes']} layers, {bits}-bit symmetric, blocks of "
            f"{', '.join(map(str, done['blocks']))}; quantized by edgeprune)")


def check_top_k(out, model, prompt: str = "a gorgeous , witty , seductive movie . the story is flat",
                atol: float = 1e-3) -> dict:
    """The manifest's ``top_k`` (``{"input", "default", "max"}``) of a dense-dispatch graph whose routers read
    their top-k from the input ``top_k``: the graph checked at every k from 1 to Z against PyTorch routing to that
    k (the same patch, eager) on the logits of a prompt; where any k fails or differs by more than ``atol`` the
    input is removed, the top-k stays the model's and ``top_k_fixed`` says why. ``{}`` for a graph without it."""
    import numpy as np
    import torch

    from edgeprune.export.onnx_export import routing_of
    from edgeprune.export.runtime_top_k import INPUT, compare_every_k, fix
    from edgeprune.models.registry import adapter_for
    from edgeprune.runtime.decoder import EdgeLM

    lm = EdgeLM(out)
    if INPUT not in {i.name for i in lm.session.get_overridable_initializers()}:
        return {}
    z, default = routing_of(adapter_for(model.config), model)
    ids = lm.prompt_ids(prompt, 1)

    def graph(k: int) -> np.ndarray:
        feeds = {**lm._feeds(ids, lm._empty_past(), len(ids)), INPUT: np.array([k], dtype=np.int64)}
        return lm.session.run(["logits"], feeds)[0][0]

    diffs, why = compare_every_k(z, default, lambda k: model(torch.tensor([ids])).logits[0].float().numpy(), graph,
                                 atol)
    if why:
        del lm
        fix(out / "onnx" / "model.onnx")
        return {"top_k_fixed": why}
    return {"top_k": {"input": INPUT, "default": default, "max": z, "max_abs_logit_diff": diffs}}


def no_operator(moe_operator: str, exporter: str) -> bool:
    """True where ``qmoe`` was asked for and the graph came out dense dispatch (said in the log)."""
    return moe_operator == "qmoe" and "dense_dispatch" in exporter


__all__ = ["use_builder", "export_patch", "experts_in_qmoe", "check_top_k", "no_operator"]
