"""The MoE model types of transformers 5.25 that edgeprune does not prune, each with the reason, in one line.

``edgeprune families`` lists them after the supported families, and loading a checkpoint of one of them ends in
its line (:func:`edgeprune.models.registry.adapter_for`). tests/test_table_families.py checks that every model
directory of the installed transformers with MoE experts is either registered or here. "Probed" means a tiny
checkpoint of the family was built from its config class and taken through edgeprune's build; what failed is
said. Multimodal models pruned through their text model are in ``multimodal.py``.
"""
from __future__ import annotations

_MULTIMODAL = ("not done yet: multimodal; its text model is not registered (not probed, or its tiny multimodal "
               "checkpoint did not build here)")
REFUSED: dict[str, str] = {
    "deepseek_ocr2": _MULTIMODAL,
    "diffusion_gemma": _MULTIMODAL + " (a diffusion LM besides)",
    "doge": ("its CDMoE is product-key retrieval over single-neuron experts (no expert FFNs behind a top-k "
             "router): nothing for expert pruning to act on"),
    "dots3_note": ("not done yet: multimodal, and its text model (dots3_note_text) has per-layer attention settings "
                   "(its tiny config did not build in the probe)"),
    "ergo": ("not done yet: every expert has its own output RMSNorm indexed by expert (ErgoExpertNorm), applied per "
             "route before the weighted sum; edgeprune's dense dispatch and expert slicing do not carry it yet"),
    "ernie4_5_vl_moe": _MULTIMODAL,
    "glm5_next": ("not done yet: multimodal, and its text model's pooled sparse attention (keys averaged in pools of "
                  "index_kpool, the pools kept chosen from the data) exported with the first batch's shapes (ONNX "
                  "Runtime failed at batch 1); probed on a tiny checkpoint"),
    "kolibri1_1": ("not done yet: its indexed-attention layers round keys and values to NVFP4 through float8 casts "
                   "(no ONNX export) and pick keys in Python loops over the data; probed on a tiny checkpoint"),
    "longcat_flash": "not done yet: zero-computation experts and its own FFN sizes; the probe's tiny config did not run",
    "nllb-moe": ("not done yet: an encoder-decoder translation model (NLLB-MoE); label-word classification from its "
                 "decoder's first step, as for switch_transformers, needs its own adapter file"),
    "openai_privacy_filter": ("a token classifier (span labels per token); edgeprune builds sequence classifiers "
                              "and decoders"),
    "qwen4_exp": ("not done yet: its query-sparse attention indexer's tiny config did not build in the probe "
                  "(indexer sizes); multimodal besides"),
    "qwen3_omni_moe": _MULTIMODAL + " (an omni thinker-talker model)",
    "step3p7": _MULTIMODAL,
    "unlimited_ocr": _MULTIMODAL,
    "vitpose_backbone": ("a vision backbone whose 'experts' are per-dataset output heads picked by a dataset index, "
                         "not routed tokens: no router to prune against"),
    "zaya": ("its router reads a state carried from the previous layer's router (EDA router_states): pruning one "
             "layer's experts changes the next layer's routing input; not supported"),
}
