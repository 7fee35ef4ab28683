"""A decoder's k > 1 experts as the target's ``[generate].moe_operator`` says (edgeprune.export.lm_moe): dense
dispatch, or ONNX Runtime's ``com.microsoft.MoE`` in the fp32 graph and ``QMoE`` with the variant's bits, written
by edgeprune's own export for a family that maps onto the operator (Mixtral) and by the model builder for its MoE
families; numbers compared with PyTorch, not shapes."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import pytest
import torch

from edgeprune.errors import ExportError
from tests.test_generation_build import build, gen_targets, lm_dirs, tiny_causal_lm  # noqa: F401 (fixture)

PROMPTS = ["a gorgeous , witty film", "the plot is thin and dull", "x " * 30]


def ops(path) -> dict:
    g = onnx.load(str(path)).graph
    weights = {i.name for i in g.initializer}
    out: dict = {}
    for n in g.node:
        out[n.op_type] = out.get(n.op_type, 0) + 1
    out["weight MatMul"] = sum(n.op_type == "MatMul" and n.input[1] in weights for n in g.node)
    return out


def overridable(lm) -> set:
    return {i.name for i in lm.session.get_overridable_initializers()}


@pytest.fixture(scope="module")
def k2_mixtral(tmp_path_factory, bpe_tokenizer):
    """A tiny Mixtral causal LM with 4 experts, top-2 (the shape a pruned 8-expert model has)."""
    tok, vocab = bpe_tokenizer
    d = tmp_path_factory.mktemp("k2") / "mixtral"
    model = tiny_causal_lm("mixtral", vocab, num_local_experts=4, num_experts_per_tok=2)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return model, d


def test_qmoe_exports_the_experts_in_the_moe_operator_and_quantizes_them_into_qmoe(k2_mixtral, tmp_path):
    from edgeprune.export.lm_export import parity, weight_variant, write_decoder
    from edgeprune.runtime.decoder import EdgeLM

    model, d = k2_mixtral
    art = tmp_path / "art"
    manifest = write_decoder(model, d, art, exporter="auto", moe_operator="qmoe")
    assert manifest["exporter"] == "torch.onnx+ort_moe"
    fp32 = ops(art / "onnx" / "model.onnx")
    assert fp32.get("MoE") == 2 and fp32["weight MatMul"] == 2 * (4 + 1) + 1  # attention, routers, head: no expert
    gate = parity(model, art, PROMPTS, 8, 1e-4)  # greedy tokens equal, logits within 1e-4
    assert gate["greedy_equal"] and gate["max_abs_logit_diff"] < 1e-4
    ids = EdgeLM(art).prompt_ids(PROMPTS[2], 4)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(EdgeLM(art).logits(ids) - ref).max() < 1e-4  # every position, not only the first step
    for precision, bits, tol in (("int8", 8, 0.1), ("int4", 4, 0.5)):
        info = weight_variant(art, precision, PROMPTS, 8)
        q = ops(art / info["model_file"])
        assert q.get("QMoE") == 2 and "MoE" not in q and q["weight MatMul"] == 0
        assert info["experts"].startswith(f"com.microsoft.QMoE (2 layers, {bits}-bit")
        g = onnx.load(str(art / info["model_file"])).graph
        assert {a.i for n in g.node if n.op_type == "QMoE" for a in n.attribute if a.name == "expert_weight_bits"} \
            == {bits}
        assert 0 <= info["greedy_token_agreement_with_fp32"] <= 1
        diff = np.abs(EdgeLM(art, model_file=info["model_file"]).logits(ids) - ref).max()
        assert diff < tol  # quantized weights (and the 4-bit embedding in both)


def test_dense_and_auto_keep_dense_dispatch_for_a_family_the_builder_does_not_write(k2_mixtral, tmp_path):
    from edgeprune.export.lm_export import write_decoder

    model, d = k2_mixtral
    for op in ("dense", "auto"):
        manifest = write_decoder(model, d, tmp_path / op, moe_operator=op)
        assert manifest["exporter"] == "torch.onnx+dense_dispatch"
        assert "MoE" not in ops(tmp_path / op / "onnx" / "model.onnx")


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime_genai") is None, reason="onnxruntime-genai not installed")
def test_dense_takes_a_builder_moe_family_through_torch_onnx_and_genai_with_dense_is_one_line(bpe_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from edgeprune.export.lm_export import parity, write_decoder
    from tests.test_generation_moe_builder import DECODER
    from tests.test_table_families import save_tiny

    d = save_tiny("gpt_oss", tmp_path / "ckpt", *bpe_tokenizer, **DECODER)
    model = AutoModelForCausalLM.from_pretrained(d).eval()
    manifest = write_decoder(model, d, tmp_path / "dense", moe_operator="dense")
    assert manifest["exporter"] == "torch.onnx+dense_dispatch" and "MoE" not in ops(tmp_path / "dense/onnx/model.onnx")
    assert parity(model, tmp_path / "dense", PROMPTS[:2], 6, 1e-4)["greedy_equal"]
    with pytest.raises(ExportError, match=r"writes GptOssForCausalLM's experts only as com.microsoft.MoE / QMoE; "
                                          r"use \[generate\].moe_operator = \"qmoe\" or exporter = \"torch.onnx\""):
        write_decoder(model, d, tmp_path / "genai", exporter="genai", moe_operator="dense")
    hybrid = save_tiny("lfm2_moe", tmp_path / "lfm2", *bpe_tokenizer, **DECODER)  # convolution states: builder only
    with pytest.raises(ExportError, match=r"^torch.onnx's KV-cache export takes decoders whose every layer caches "
                                          r"keys and values; Lfm2MoeForCausalLM has \w+ layers"):
        write_decoder(AutoModelForCausalLM.from_pretrained(hybrid).eval(), hybrid, tmp_path / "l", moe_operator="dense")


def test_build_with_moe_operator_qmoe_says_so_in_the_report(lm_dirs, tmp_path, cache, monkeypatch):
    gen_targets(tmp_path, monkeypatch, moe_operator='"qmoe"')
    out = tmp_path / "art"
    res = build(lm_dirs["mixtral"], out, "--experts", "2", "--recovery-steps", "0")
    report = json.loads((out / "report.json").read_text())
    assert report["export"]["exporter"] == "torch.onnx+ort_moe"
    assert report["export"]["parity"]["max_abs_logit_diff"] < 1e-4
    variants = report["export"]["variants"]
    assert all(v["experts"].startswith("com.microsoft.QMoE (2 layers") for v in variants.values())
    assert "experts of 2 layers in QMoE" in res.output
    text = (out / "report.md").read_text()
    assert "com.microsoft.QMoE" in text and "moe_operator = \"qmoe\"" in text


def test_moe_operator_of_generate_is_checked(tmp_path):
    from edgeprune.errors import ConfigError
    from edgeprune.targets import load_target

    f = tmp_path / "t.toml"
    f.write_text('name = "t"\n[generate]\nmoe_operator = "ort"\n')
    with pytest.raises(ConfigError, match=r"\[generate\].moe_operator 'ort' is not one of auto, dense, qmoe"):
        load_target(str(f))


def test_a_dense_dispatch_decoder_reads_its_top_k_at_run_time(k2_mixtral, tmp_path):
    """EdgeLM(top_k=) / generate --top-k: the routers of a k > 1 dense-dispatch decoder read the input top_k (an
    overridable initializer holding the model's own k); at every k the graph's greedy tokens and logits equal
    PyTorch routing to that k, with the KV cache, and the int4 variant keeps the input."""
    from edgeprune.export.lm_export import weight_variant, write_decoder
    from edgeprune.export.runtime_top_k import routed_top_k
    from edgeprune.runtime.decoder import EdgeLM
    from tests.test_families import cli

    model, d = k2_mixtral
    art = tmp_path / "art"
    manifest = write_decoder(model, d, art, moe_operator="dense")
    assert manifest["top_k"]["default"] == 2 and manifest["top_k"]["max"] == 4
    assert all(v < 1e-4 for v in manifest["top_k"]["max_abs_logit_diff"].values())
    assert json.loads((art / "edgeprune.json").read_text())["top_k"]["input"] == "top_k"
    prompt = PROMPTS[0]
    for k in (1, 3, 4):
        lm = EdgeLM(art, top_k=k)
        ids = lm.prompt_ids(prompt, 6)
        with routed_top_k(torch.tensor([k]), 4, 2), torch.no_grad():
            x = torch.tensor([ids])
            ref = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False,
                                 pad_token_id=0, eos_token_id=None)[0, len(ids):].tolist()
            logits = model(x).logits[0].numpy()
        assert list(lm.tokens(prompt, 6)) == ref[: len(list(lm.tokens(prompt, 6)))]
        assert np.abs(lm.logits(ids) - logits).max() < 1e-4
    own = EdgeLM(art).logits(ids)
    assert np.abs(EdgeLM(art, top_k=2).logits(ids) - own).max() == 0  # feeding its own k is the model as built
    assert np.abs(EdgeLM(art, top_k=1).logits(ids) - own).max() > 1e-3  # and another k other numbers
    info = weight_variant(art, "int4", PROMPTS[:1], 4)
    q = EdgeLM(art, model_file=info["model_file"], top_k=1)
    assert "top_k" in overridable(q) and np.abs(q.logits(ids) - EdgeLM(art, model_file=info["model_file"]).logits(ids)).max() > 0
    with pytest.raises(ValueError, match=r"top_k=5: this artifact keeps 4 experts per layer; give 1..4 \(its own is 2\)"):
        EdgeLM(art, top_k=5)
    res = cli(["generate", str(art), "a film", "--top-k", "0"], code=2)
    assert "--top-k: top_k=0: this artifact keeps 4 experts per layer; give 1..4" in res.output
    assert cli(["generate", str(art), "a film", "--top-k", "1", "--max-new-tokens", "3"]).output.strip()


def test_a_moe_operator_decoder_has_a_fixed_top_k(k2_mixtral, tmp_path):
    from edgeprune.export.lm_export import write_decoder
    from edgeprune.runtime.decoder import EdgeLM

    model, d = k2_mixtral
    manifest = write_decoder(model, d, tmp_path / "art", moe_operator="qmoe")
    assert "top_k" not in manifest and "top_k" not in overridable(EdgeLM(tmp_path / "art"))
    with pytest.raises(ValueError, match="fixed top-k .* ONNX Runtime's MoE operator"):
        EdgeLM(tmp_path / "art", top_k=1)


def test_a_k2_dense_dispatch_build_measures_every_top_k_and_its_manifest_carries_it(lm_dirs, tmp_path, cache,
                                                                                   monkeypatch):
    from edgeprune.runtime.decoder import EdgeLM

    gen_targets(tmp_path, monkeypatch, moe_operator='"dense"')
    out = tmp_path / "art"
    build(lm_dirs["mixtral"], out, "--experts", "3", "--recovery-steps", "0")
    report = json.loads((out / "report.json").read_text())
    manifest = json.loads((out / "edgeprune.json").read_text())
    assert manifest["top_k"]["default"] == 2 and manifest["top_k"]["max"] == 3  # the tiny Mixtral routes top-2
    models = report["validation"]["models"]
    weights = report["weights"]["weights"]
    for k in (1, 3):
        row = models[f"{weights} top-k {k}"]
        assert row["decode_tokens_per_s"] > 0 and 0 <= row["next_token_agreement"] <= 1
    assert models[f"{weights} top-k 1"]["perplexity"] != models[weights]["perplexity"]
    text = (out / "report.md").read_text()
    assert "Top-k at run time: the routers read their top-k from the input `top_k` (default 2, 1..3)" in text
    assert f"| {weights} top-k 1 |" in text
    ids = EdgeLM(out).prompt_ids("a film", 2)
    assert np.abs(EdgeLM(out, top_k=1).logits(ids) - EdgeLM(out).logits(ids)).max() > 0  # the artifact reads it
