"""``build --generate`` at k = 2 of the MoE decoders onnxruntime-genai's model builder writes (LFM2-MoE, gpt-oss):
the fp32 graph keeps the experts in ``com.microsoft.MoE`` (one per layer), greedy tokens equal PyTorch's through
EdgeLM (LFM2's convolution state carried step to step), and the int4 variant puts the experts in ``QMoE`` where the
builder can (LFM2-MoE; its gpt-oss path quantizes only the released MXFP4 experts: edgeprune's own QMoE rewrite)."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from tests.test_generation_build import build, gen_targets
from tests.test_table_families import save_tiny

pytestmark = pytest.mark.skipif(importlib.util.find_spec("onnxruntime_genai") is None,
                                reason="onnxruntime-genai (the dev extra) is not installed")
# GroupQueryAttention on CPUs takes head sizes that are multiples of 16
DECODER = dict(hidden_size=64, head_dim=16, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=320,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)


@pytest.mark.parametrize("family", ["lfm2_moe", "gpt_oss"])
def test_a_k2_decoder_keeps_its_experts_in_the_moe_operator(family, bpe_tokenizer, tmp_path, cache, monkeypatch):
    from edgeprune.export.genai_builder import moe_operators

    d = save_tiny(family, tmp_path / "ckpt", *bpe_tokenizer, **DECODER)
    gen_targets(tmp_path, monkeypatch)
    out = tmp_path / "art"
    res = build(d, out, "--experts", "2")
    export = json.loads((out / "report.json").read_text())["export"]
    assert export["exporter"] == "onnxruntime-genai model builder"
    assert export["parity"]["greedy_equal"] and export["parity"]["max_abs_logit_diff"] < 1e-4
    fp32_dir = next(cache.glob("stages/export-lm-*"))
    assert moe_operators(fp32_dir / "onnx" / "model.onnx") == 2  # one MoE operator per layer
    int4 = export["variants"]["int4"]
    if family == "lfm2_moe":
        assert int4["experts"].startswith("com.microsoft.QMoE (2 layers")
        assert "experts in QMoE" in res.output
    else:  # the builder's int4 takes only the released MXFP4 experts: its MoE nodes are made QMoE here instead
        assert int4["experts"].startswith("com.microsoft.QMoE (2 layers, 4-bit symmetric")
        from edgeprune.runtime.decoder import EdgeLM

        fp32, q = EdgeLM(fp32_dir), EdgeLM(fp32_dir, model_file="onnx/model_q4.onnx")
        ids = fp32.prompt_ids("a gorgeous , witty film about nothing", 4)
        assert np.abs(q.logits(ids) - fp32.logits(ids)).max() < 0.5  # 4-bit weights and embedding
    manifest = json.loads((out / "edgeprune.json").read_text())
    assert manifest["model_file"] == "onnx/model_q4.onnx" and (out / manifest["model_file"]).is_file()


def save_qwen3_5_moe(d, tok, vocab: int):
    """A tiny Qwen3.5-MoE as its users hold it: the whole multimodal checkpoint (Qwen3_5MoeForConditionalGeneration,
    vision tower included), one linear-attention and one attention layer, mrope sections as released."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from tests.test_table_families import EXTRA, TINY, TOWER, shrink

    config = AutoConfig.for_model("qwen3_5_moe")
    text = config.get_text_config()
    shrink(text, {**TINY, **EXTRA["qwen3_5_moe_text"], **DECODER, "vocab_size": vocab, "num_attention_heads": 2,
                  "num_key_value_heads": 1})
    text.rope_parameters = {**text.rope_parameters, "mrope_section": [1, 1, 0], "mrope_interleaved": True}
    shrink(config.vision_config, TOWER)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight") and p.dim() == 2:
                p.normal_(0, 1.0)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_a_multimodal_qwen3_5_moe_decoder_goes_through_the_builder_whole(bpe_tokenizer, tmp_path, cache, monkeypatch):
    """Qwen3.5-MoE's text MoE pruned to k = 2 inside the multimodal checkpoint (the builder takes only that class and
    writes its text decoder): MoE / QMoE operators, greedy parity through EdgeLM (recurrent and convolution states,
    3-row mrope position ids), the builder's genai_config.json naming those states, and a pruned checkpoint that
    stock transformers loads."""
    from transformers import AutoModelForImageTextToText

    from edgeprune.export.genai_builder import moe_operators

    d = save_qwen3_5_moe(tmp_path / "ckpt", *bpe_tokenizer)
    gen_targets(tmp_path, monkeypatch)
    out = tmp_path / "art"
    build(d, out, "--experts", "2")
    export = json.loads((out / "report.json").read_text())["export"]
    assert export["exporter"] == "onnxruntime-genai model builder"
    assert export["parity"]["greedy_equal"] and export["parity"]["max_abs_logit_diff"] < 1e-3
    assert export["variants"]["int4"]["experts"].startswith("com.microsoft.QMoE (2 layers")
    fp32_dir = next(cache.glob("stages/export-lm-*"))
    assert moe_operators(fp32_dir / "onnx" / "model.onnx") == 2
    genai = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
    assert genai["filename"] == "onnx/model_q4.onnx" and genai["inputs"]["past_recurrent_names"] == "past.%d.recurrent"
    pruned = next(cache.glob("stages/prune-*"))
    raw = json.loads((pruned / "config.json").read_text())
    assert raw["architectures"] == ["Qwen3_5MoeForConditionalGeneration"] and raw["text_config"]["num_experts"] == 2
    model = AutoModelForImageTextToText.from_pretrained(pruned)
    assert model.model.language_model.layers[0].mlp.experts.gate_up_proj.shape[0] == 2


def save_gemma4(d, tok, vocab: int):
    """A tiny Gemma 4 MoE as its users hold it: the multimodal checkpoint (Gemma4ForConditionalGeneration, vision
    tower included), one sliding and one full-attention layer with their own head sizes and key-value heads (the
    full layer's keys serve as values), experts beside the dense MLP in both."""
    import torch
    from transformers import AutoModelForImageTextToText, Gemma4Config

    text = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, global_head_dim=32, num_global_key_value_heads=1, attention_k_eq_v=True,
                enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32, vocab_size=vocab,
                vocab_size_per_layer_input=vocab, hidden_size_per_layer_input=0, max_position_embeddings=320,
                layer_types=["sliding_attention", "full_attention"], sliding_window=64, pad_token_id=0,
                bos_token_id=1, eos_token_id=2)
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                  num_key_value_heads=2, head_dim=16)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(Gemma4Config(text_config=text, vision_config=vision,
                                                                 audio_config=None)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("router.proj.weight"):
                p.normal_(0, 1.0)
            elif name.endswith("per_expert_scale"):  # folded into the experts' down projections by the builder
                p.uniform_(0.5, 1.5)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_a_multimodal_gemma4_decoder_goes_through_the_builder_whole(bpe_tokenizer, tmp_path, cache, monkeypatch):
    """Gemma 4's text MoE pruned to k = 2 inside its multimodal checkpoint: the builder (through genai_compat, which
    gives it the flat head sizes transformers 5.25 keeps per layer) writes one MoE operator per layer, greedy parity
    through EdgeLM with the sliding and the full layers' own head sizes, QMoE in the int4 variant."""
    import onnx
    from transformers import AutoModelForImageTextToText

    from edgeprune.export.genai_builder import moe_operators

    d = save_gemma4(tmp_path / "ckpt", *bpe_tokenizer)
    gen_targets(tmp_path, monkeypatch)
    out = tmp_path / "art"
    build(d, out, "--experts", "2")
    export = json.loads((out / "report.json").read_text())["export"]
    # ONNX Runtime's CPU MoE has no geglu: the builder's MoE nodes become dense dispatch, quantized like any MatMul
    assert export["exporter"] == "onnxruntime-genai model builder (experts of 2 layers as dense dispatch)"
    assert export["parity"]["greedy_equal"] and export["parity"]["max_abs_logit_diff"] < 1e-4
    fp32_dir = next(cache.glob("stages/export-lm-*"))
    assert moe_operators(fp32_dir / "onnx" / "model.onnx") == 0
    q4 = onnx.load(str(out / "onnx" / "model_q4.onnx"), load_external_data=False).graph
    expert_matmuls = [n for n in q4.node if n.op_type == "MatMulNBits" and "/moe/MoE/dense/" in n.name]
    assert len(expert_matmuls) == 2 * 2 * 2  # layers x kept experts x (fc1, fc2), all 4-bit
    pruned = next(cache.glob("stages/prune-*"))
    raw = json.loads((pruned / "config.json").read_text())
    assert raw["architectures"] == ["Gemma4ForConditionalGeneration"] and raw["text_config"]["num_experts"] == 2
    model = AutoModelForImageTextToText.from_pretrained(pruned)
    assert model.model.language_model.layers[1].experts.gate_up_proj.shape[0] == 2
