"""The first steps of the generation path (issue 14): a language-model MoE pruned and folded into its dense
sibling's causal LM, exported with a KV cache (optimum) under a greedy-parity gate, and EdgeLM (onnxruntime +
tokenizers + numpy) generating from it; every bad input one line."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from edgeprune.errors import ConfigError, ModelError
from edgeprune.pruning.apply import apply_plan
from tests.test_families import cli, plan_keeping

LMS = {
    "mixtral": (MixtralConfig, MixtralForCausalLM, dict(num_local_experts=6, num_experts_per_tok=2, intermediate_size=48)),
    "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM, dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24,
                                                            intermediate_size=64, norm_topk_prob=True)),
}


def tiny_lm(family: str, vocab: int, context: int = 128):
    cfg_cls, cls, kw = LMS[family]
    torch.manual_seed(0)
    return cls(cfg_cls(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=8, max_position_embeddings=context, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                       **kw)).eval()


@pytest.mark.parametrize("family", list(LMS))
def test_a_language_model_folds_into_its_siblings_causal_lm_exactly(family):
    lm = tiny_lm(family, 100)
    plan = plan_keeping(lm, [4])
    dense, one_expert = apply_plan(lm, plan), apply_plan(lm, plan, fold=False)
    assert type(dense).__name__ in ("MistralForCausalLM", "Qwen3ForCausalLM")
    x = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        # transformers 5 computes gate and up in one fused matmul, the dense MLP in two: float rounding (<= 6e-8 measured)
        assert (dense(input_ids=x).logits - one_expert(input_ids=x).logits).abs().max() <= 1e-6


@pytest.fixture(scope="module")
def lm_artifact(tmp_path_factory, tiny_tokenizer):
    tok, vocab = tiny_tokenizer
    root = tmp_path_factory.mktemp("lm")
    tiny_lm("mixtral", vocab).save_pretrained(root / "moe")
    tok.save_pretrained(root / "moe")
    cli(["prune", "--model", str(root / "moe"), "--generate", "--experts", "1", "--recovery-steps", "0",
         "--calibration-examples", "48", "--verbalisers", "bad,good", "--out", str(root / "pruned")])
    res = cli(["export-lm", str(root / "pruned"), "--int4", "--out", str(root / "art")])
    assert "greedy tokens equal on 3 prompts" in res.output
    return root


def test_prune_generate_export_and_edgelm_match_pytorch_token_for_token(lm_artifact):
    from transformers import AutoModelForCausalLM

    from edgeprune.runtime.decoder import EdgeLM

    pruned = AutoModelForCausalLM.from_pretrained(lm_artifact / "pruned").eval()
    assert type(pruned).__name__ == "MistralForCausalLM"
    info = json.loads((lm_artifact / "pruned" / "edgeprune_prune.json").read_text())
    assert info["generate"]["class"] == "MistralForCausalLM"
    manifest = json.loads((lm_artifact / "art" / "edgeprune.json").read_text())
    assert manifest["kind"] == "causal-lm" and manifest["parity"]["max_abs_logit_diff"] < 1e-4
    lm = EdgeLM(lm_artifact / "art")
    for prompt in ("a dull , lifeless film", "one of the best movies of the year"):
        ids = lm.tokenizer.encode(prompt).ids
        with torch.no_grad():
            ref = pruned.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, pad_token_id=0,
                                  eos_token_id=3)[0, len(ids):].tolist()
        got = list(lm.tokens(prompt, 10))
        assert got == ref[: len(got)] and len(got) >= 1


def test_edgelm_sampling_stop_strings_and_long_prompts(lm_artifact):
    from edgeprune.runtime.decoder import EdgeLM

    lm = EdgeLM(lm_artifact / "art")
    a = lm.generate("a gorgeous film", 12, temperature=0.9, top_p=0.9, seed=3)
    assert a == lm.generate("a gorgeous film", 12, temperature=0.9, top_p=0.9, seed=3)  # seeded
    greedy = lm.generate("a gorgeous film", 12)
    assert greedy == "".join(lm.stream("a gorgeous film", 12))
    words = greedy.split()
    if len(words) > 2:  # stop before the third word: the text ends before it
        cut = lm.generate("a gorgeous film", 12, stop=[words[2]])
        assert words[2] not in cut and greedy.startswith(cut.rstrip())
    lm.generate("a gorgeous film " * 200, 5)  # longer than the 128-token context: the oldest tokens go
    assert lm.last["truncated"] > 0
    res = cli(["generate", str(lm_artifact / "art"), "a gorgeous film " * 200, "--max-new-tokens", "3"])
    assert "tokens were dropped to fit the 128-token context" in res.output


def test_edgelm_and_generate_errors_are_one_line(lm_artifact, tmp_path, tiny_original):
    from edgeprune.runtime.decoder import EdgeLM

    lm = EdgeLM(lm_artifact / "art")
    with pytest.raises(ConfigError, match="leaves no room"):
        lm.generate("hi", 500)
    with pytest.raises(ConfigError, match="temperature must be >= 0"):
        lm.generate("hi", 3, temperature=-1)
    with pytest.raises(ModelError, match="no such artifact folder"):
        EdgeLM(tmp_path / "nope")
    res = cli(["prune", "--model", str(tiny_original), "--generate", "--recovery-steps", "0", "--out",
               str(tmp_path / "p")], code=2)
    assert "--generate needs a language-model checkpoint" in res.output
    res = cli(["prune", "--model", str(lm_artifact / "moe"), "--generate", "--ffn-keep", "0.5", "--out",
               str(tmp_path / "p")], code=2)
    assert "--ffn-keep is not there yet" in res.output
    res = cli(["export-lm", str(tiny_original), "--out", str(tmp_path / "e")], code=4)
    assert "export-lm takes a causal language model" in res.output


def test_the_int4_variant_is_matmulnbits_and_generates(lm_artifact):
    import onnx

    manifest = json.loads((lm_artifact / "art" / "edgeprune.json").read_text())
    v = manifest["variants"]["int4"]
    graph = onnx.load(str(lm_artifact / "art" / v["model_file"])).graph
    weights = {i.name for i in graph.initializer}
    assert any(n.op_type == "MatMulNBits" for n in graph.node)
    assert not [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]  # only activations left
    assert 0 <= v["greedy_token_agreement_with_fp32"] <= 1
    res = cli(["generate", str(lm_artifact / "art"), "a gorgeous film", "--max-new-tokens", "4", "--variant", "int4"])
    assert res.output.strip()
    res = cli(["generate", str(lm_artifact / "art"), "hi", "--variant", "int8"], code=2)
    assert "no 'int8' variant" in res.output


def test_export_lm_validates_against_the_original_side_by_side(lm_artifact, tmp_path):
    out = tmp_path / "art"
    res = cli(["export-lm", str(lm_artifact / "pruned"), "--original", str(lm_artifact / "moe"), "--verbalisers",
               "bad,good", "--out", str(out)])
    v = json.loads((out / "edgeprune.json").read_text())["validation"]
    assert set(v["models"]) == {"original", "artifact fp32"} and v["tokens"] > 100
    art = v["models"]["artifact fp32"]
    assert art["perplexity"] > 1 and 0 <= art["next_token_agreement"] <= 1 and art["decode_tokens_per_s"] > 0
    assert "artifact fp32: perplexity" in res.output


def test_upcycling_a_llama_without_dropping_is_the_llama():
    """``upcycle_lm`` (the decoder original: SmolLM2 into Mixtral) writes transformers 5's fused experts: with no
    drop-upcycling every expert is the dense MLP and the routing weights sum to 1, so the MoE computes the dense
    model's logits (float32 rounding: 1e-6)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from edgeprune.originals.decoder import upcycle_lm

    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=50)).eval()
    moe = upcycle_lm(dense, num_experts=4, top_k=2, drop_fraction=0.0)
    assert type(moe).__name__ == "MixtralForCausalLM" and moe.config.rope_parameters == dense.config.rope_parameters
    x = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        assert (moe(x).logits - dense(x).logits).abs().max() < 1e-6
    assert not torch.equal(upcycle_lm(dense, drop_fraction=0.1).model.layers[0].mlp.experts.down_proj[0],
                           dense.model.layers[0].mlp.down_proj.weight)
