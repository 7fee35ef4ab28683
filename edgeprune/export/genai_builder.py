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
# builder takes Qwen3.5-MoE only as its multimodal checkpoint and writes its text decoder. Not Gemma 4: genai 0.18
# reads text_config.global_head_dim, which transformers 5.25 parses into per-layer settings (AttributeError)
BUILDER_MOE = ("GptOssForCausalLM", "Lfm2MoeForCausalLM", "Qwen3_5MoeForConditionalGeneration")


def builder_supports(model) -> bool:
    """onnxruntime-genai is installed and its model builder writes ``model``'s (dense) architecture, with heads
    that ONNX Runtime's GroupQueryAttention takes (CPU: a head size that is a multiple of 16)."""
    import importlib.util

    c = model.config.get_text_config()
    head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return (type(model).__name__ in BUILDER_ARCHITECTURES + BUILDER_MOE and head % 16 == 0
            and importlib.util.find_spec("onnxruntime_genai") is not None)


def build_graph(model_dir: Path, out_dir: Path, precision: str = "fp32", name: str = "model.onnx",
                block: int = 32) -> str:
    """onnxruntime-genai's model builder (``python -m onnxruntime_genai.models.builder -p fp32 -e cpu``): the fp32
    graph with ONNX Runtime's fused decoder operators (GroupQueryAttention with the rotary embedding inside,
    SkipSimplifiedLayerNormalization, and for :data:`BUILDER_MOE` families ``com.microsoft.MoE``), which the
    weight-only quantizer then takes like any other; ``precision`` ``int4`` / ``int8``: the builder's own quantized
    graph (``MatMulNBits``, experts in ``QMoE``, blocks of ``block``), written as ``name``."""
    import os
    import subprocess
    import sys

    with tempfile.TemporaryDirectory(prefix="edgeprune-genai-") as tmp:
        res = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o",
                              str(Path(tmp) / "out"), "-p", precision, "-e", "cpu", "-c", str(Path(tmp) / "cache"),
                              "--extra_options", "hf_token=false", f"block_size={block}", f"qmoe_block_size={block}",
                              "windowed_kv_cache=false"],  # EdgeLM's cache grows; no window-sized ring buffers
                             capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=3600)
        if res.returncode != 0:
            last = (res.stderr.strip().splitlines() or ["no output"])[-1]
            raise ExportError(f"onnxruntime-genai's model builder failed on {model_dir}: {last[:200]}")
        import onnx

        graph = onnx.load(str(Path(tmp) / "out" / "model.onnx"))  # its weights are in model.onnx.data
        onnx.save(graph, str(out_dir / name), save_as_external_data=graph.ByteSize() > 1_900_000_000)
        if name == "model.onnx":  # its genai_config.json names the graph's states (convolution, recurrent) as well
            shutil.copy2(Path(tmp) / "out" / "genai_config.json", out_dir / "genai_config.json")
    for name in ("config.json", "generation_config.json"):
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out_dir / name)
    return "onnxruntime-genai model builder"


def moe_operators(path: Path) -> int:
    """How many ``com.microsoft.MoE`` / ``QMoE`` nodes the graph at ``path`` has."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return sum(n.op_type in ("MoE", "QMoE") and n.domain == "com.microsoft" for n in graph.node)
