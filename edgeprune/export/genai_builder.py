"""onnxruntime-genai's model builder as edgeprune's decoder exporter: which architectures it writes, and the call.

The builder (``python -m onnxruntime_genai.models.builder``) writes a decoder with ONNX Runtime's fused operators
(GroupQueryAttention with the rotary embedding inside, SkipSimplifiedLayerNormalization) and, for the MoE families
of :data:`BUILDER_MOE`, the experts of each layer in one ``com.microsoft.MoE`` (fp32) or ``QMoE`` (int4 / int8)
node. :mod:`edgeprune.export.lm_export` uses it where it writes the model, ``torch.onnx`` elsewhere.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from edgeprune.errors import ExportError


BUILDER_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                         "GraniteForCausalLM", "OlmoForCausalLM", "Phi3ForCausalLM", "PhiForCausalLM",
                         "GemmaForCausalLM", "Gemma2ForCausalLM", "NemotronForCausalLM", "SmolLM3ForCausalLM")
# MoE decoders the builder writes with ONNX Runtime's MoE operator (fp32) and QMoE (int4 / int8 expert weights, its
# own quantizer): a k > 1 (or one-expert) model of these families keeps its experts in one operator per layer; the
# builder takes Qwen3.5-MoE and Gemma 4 only as their multimodal checkpoints and writes their text decoders (Gemma 4
# through genai_compat: genai 0.18 reads the flat head sizes that transformers 5.25 keeps per layer; its geglu MoE
# nodes, which ONNX Runtime's CPU kernel does not run, become dense dispatch: moe_decompose)
BUILDER_MOE = ("GptOssForCausalLM", "Lfm2MoeForCausalLM", "Qwen3_5MoeForConditionalGeneration",
               "Gemma4ForConditionalGeneration")


def builder_supports(model) -> bool:
    """onnxruntime-genai is installed and its model builder writes ``model``'s (dense) architecture, with heads
    that ONNX Runtime's GroupQueryAttention takes (CPU: a head size that is a multiple of 16)."""
    import importlib.util

    return (type(model).__name__ in BUILDER_ARCHITECTURES + BUILDER_MOE
            and all(head % 16 == 0 for head in head_sizes(model.config.get_text_config()))
            and importlib.util.find_spec("onnxruntime_genai") is not None)


def head_sizes(c) -> set[int]:
    """The attention head sizes of a text config: one, or one per layer where transformers keeps them per layer
    (Gemma 4's ``per_layer_config``, whose global ``head_dim`` it refuses to read)."""
    per_layer = getattr(c, "per_layer_config", None)
    if per_layer is not None:
        return {per_layer[i].head_dim for i in range(c.num_hidden_layers)}
    return {getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads}


def build_graph(model_dir: Path, out_dir: Path, precision: str = "fp32", name: str = "model.onnx",
                block: int = 32) -> str:
    """onnxruntime-genai's model builder (``python -m onnxruntime_genai.models.builder -p fp32 -e cpu``, run through
    :mod:`edgeprune.export.genai_compat` for transformers 5.25's per-layer Gemma 4 configs): the fp32
    graph with ONNX Runtime's fused decoder operators (GroupQueryAttention with the rotary embedding inside,
    SkipSimplifiedLayerNormalization, and for :data:`BUILDER_MOE` families ``com.microsoft.MoE``), which the
    weight-only quantizer then takes like any other; ``precision`` ``int4`` / ``int8``: the builder's own quantized
    graph (``MatMulNBits``, experts in ``QMoE``, blocks of ``block``), written as ``name``."""
    import os
    import subprocess
    import sys

    from edgeprune.export.moe_decompose import decompose, unsupported

    how = "onnxruntime-genai model builder"
    with tempfile.TemporaryDirectory(prefix="edgeprune-genai-") as tmp:
        compat = str(Path(__file__).with_name("genai_compat.py"))  # a script: the child needs no edgeprune import
        res = subprocess.run([sys.executable, compat, "-i", str(model_dir), "-o",
                              str(Path(tmp) / "out"), "-p", precision, "-e", "cpu", "-c", str(Path(tmp) / "cache"),
                              "--extra_options", "hf_token=false", f"block_size={block}", f"qmoe_block_size={block}",
                              "windowed_kv_cache=false"],  # EdgeLM's cache grows; no window-sized ring buffers
                             capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=3600)
        if res.returncode != 0:
            last = (res.stderr.strip().splitlines() or ["no output"])[-1]
            raise ExportError(f"onnxruntime-genai's model builder failed on {model_dir}: {last[:200]}")
        import onnx

        graph = onnx.load(str(Path(tmp) / "out" / "model.onnx"))  # its weights are in model.onnx.data
        if unsupported(graph.graph, "QMoE"):
            raise ExportError("onnxruntime-genai's model builder wrote QMoE experts with the geglu activation, "
                              "which ONNX Runtime's CPU kernel does not run")
        try:
            rewritten = decompose(graph)
        except ValueError as exc:
            raise ExportError(f"onnxruntime-genai's model builder wrote a MoE node ONNX Runtime's CPU kernel does not "
                              f"run: {exc}") from None
        how += f" (experts of {rewritten} layers as dense dispatch)" if rewritten else ""
        onnx.save(graph, str(out_dir / name), save_as_external_data=graph.ByteSize() > 1_900_000_000)
        if name == "model.onnx":  # its genai_config.json names the graph's states (convolution, recurrent) as well
            shutil.copy2(Path(tmp) / "out" / "genai_config.json", out_dir / "genai_config.json")
    for name in ("config.json", "generation_config.json"):
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out_dir / name)
    return how


def moe_operators(path: Path) -> int:
    """How many ``com.microsoft.MoE`` / ``QMoE`` nodes the graph at ``path`` has."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return sum(n.op_type in ("MoE", "QMoE") and n.domain == "com.microsoft" for n in graph.node)
