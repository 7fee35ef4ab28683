"""``build --generate`` at k = 2 of the MoE decoders onnxruntime-genai's model builder writes (LFM2-MoE, gpt-oss):
the fp32 graph keeps the experts in ``com.microsoft.MoE`` (one per layer), greedy tokens equal PyTorch's through
EdgeLM (LFM2's convolution state carried step to step), and the int4 variant puts the experts in ``QMoE`` where the
builder can (LFM2-MoE; its gpt-oss path quantizes only the released MXFP4 experts: fp32 experts, said)."""
from __future__ import annotations

import importlib.util
import json

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
    else:
        assert int4["experts"].startswith("fp32 in com.microsoft.MoE") and "MXFP4" in int4["experts"]
    manifest = json.loads((out / "edgeprune.json").read_text())
    assert manifest["model_file"] == "onnx/model_q4.onnx" and (out / manifest["model_file"]).is_file()
