"""The transformers 5 families registered from one row of data each (edgeprune/models/families/table.py): a tiny
checkpoint of each, built from its config class the way a user's directory looks, through score (two methods),
prune to k = 2 and to one expert, and the build on a CPU target with export parity at both k."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText,
                          AutoModelForSequenceClassification)

from edgeprune.cli import main
from edgeprune.models.families.table import ROWS
from edgeprune.models.fused import FusedAdapter
from edgeprune.models.registry import adapter_for
from edgeprune.pruning.apply import apply_plan
from tests.test_families import plan_keeping

# a tiny configuration: these keys where the family's config has them (hidden 32, 2 layers, 4 experts, top-2)
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            intermediate_size=48, moe_intermediate_size=16, max_position_embeddings=128, num_experts_per_tok=2,
            shared_expert_intermediate_size=16, first_k_dense_replace=0, n_shared_experts=1, n_group=1,
            topk_group=1, num_experts=4, num_local_experts=4, n_routed_experts=4, moe_num_experts=4,
            decoder_sparse_step=1, moe_layer_freq=1, mlp_only_layers=[], pad_token_id=0, bos_token_id=1,
            eos_token_id=2, tie_word_embeddings=False, mlp_layer_types=["sparse", "sparse"])
# what a family needs beyond TINY to build at that size
# multi-head latent attention: small ranks, and as many key/value heads as heads (MLA expands keys per head)
MLA = dict(q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, num_key_value_heads=4)
EXTRA: dict[str, dict] = {
    **{mt: MLA for mt in ("axk1", "axk2", "deepseek_v32", "glm_moe_dsa", "glm4_moe_lite", "hy_v4")},
    "mistral4": dict(MLA, qk_head_dim=16, head_dim=16),
    "mistral_large4_text": MLA,
    # hybrids: one linear-attention layer and one attention layer
    "qwen3_next": dict(layer_types=["linear_attention", "full_attention"], linear_key_head_dim=8,
                       linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4),
    "kimi_linear": dict(MLA, layer_types=["linear_attention", "full_attention"], linear_head_dim=8, linear_num_heads=4),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=1, expert_layer_offset=0,
                  use_mamba_kernels=False, mamba_dt_rank=8, mamba_d_state=8),
    "granitemoehybrid": dict(layer_types=["linear_attention", "full_attention"], mamba_n_heads=4, mamba_d_head=16,
                             mamba_d_state=8, mamba_chunk_size=8),
    "nemotron_h": dict(num_hidden_layers=3, layers_block_type=["linear_attention", "full_attention", "moe"],
                       mamba_num_heads=4, mamba_head_dim=8, n_groups=1, ssm_state_size=8, chunk_size=8,
                       use_mamba_kernels=False, moe_shared_expert_intermediate_size=16),
    "aria_text": dict(moe_topk=2, moe_num_shared_experts=1),
    "inkling_text": dict(swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=8, sliding_window_size=16,
                         rel_extent=32),
    "bailing_hybrid": dict(MLA, layer_types=["linear_attention", "full_attention"], linear_head_dim=8,
                           linear_num_heads=4),
    "lara_mini": dict(layer_types=["linear_attention", "full_attention"], linear_key_head_dim=8,
                      linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4),
    "qwen3_5_moe_text": dict(layer_types=["linear_attention", "full_attention"], linear_key_head_dim=8,
                             linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=0),
    # multimodal rotary sections sized to the tiny heads (their sum is the rotary half-width)
    "glm4v_moe_text": dict(rope_parameters=dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.5,
                                                mrope_section=[1, 1, 0])),
    "hy_v4_vl_text": dict(MLA, rope_parameters=dict(rope_type="default", rope_theta=1e4, mrope_section=[2, 1, 1]),
                          index_head_dim=8, index_n_heads=2),
    "inkling2_text": dict(swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=8, sliding_window_size=16,
                          rel_extent=32, layer_types=["hybrid_sliding", "hybrid"]),
    "muse_spark_text": dict(moe_hidden_size=32),
    # DeepSeek-V4: a hash-routed layer then a top-k one, with both compressed attentions (windows of 4 and 8 tokens)
    "deepseek_v4": dict(num_key_value_heads=1, head_dim=16, q_lora_rank=16, qk_rope_head_dim=8, o_groups=2,
                        o_lora_rank=16, index_n_heads=2, index_head_dim=8, index_topk=4, sliding_window=8,
                        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
                        layer_types=["compressed_sparse_attention", "heavily_compressed_attention"],
                        mlp_layer_types=["hash_moe", "moe"], num_nextn_predict_layers=0),
    "inkling2_loop_text": dict(swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=8,
                               sliding_window_size=16, rel_extent=32, layer_types=["hybrid_sliding", "hybrid"],
                               loop_layer_index_start=1, loop_layer_index_end=2, loop_num_passes=2, loop_gate_rank=8,
                               n_layers_per_attn_res_block=1),  # layer 1 runs twice
}
FAST = ["--calibration-examples", "32", "--recovery-steps", "0", "--eval-examples", "24", "--latency-iters", "5"]


# multimodal checkpoints: edgeprune prunes their text MoE (registered as the text model type); the test builds the
# whole image-text-to-text model, as a user's directory holds it, with these vision / audio sizes
PARENT = {"qwen3_vl_moe_text": "qwen3_vl_moe", "mistral_large4_text": "mistral_large4"}
TOWER = dict(hidden_size=32, num_hidden_layers=1, depth=1, num_heads=2, num_attention_heads=2, intermediate_size=48,
             out_hidden_size=32, embed_dim=32, num_key_value_heads=2, head_dim=16)


def shrink(config, values: dict) -> None:
    """``values`` where the config has them, its per-layer lists cut to its (new) number of layers."""
    layers = getattr(config, "num_hidden_layers", 0)
    for k, v in values.items():
        if hasattr(config, k):
            setattr(config, k, v)
    for key, value in list(config.to_dict().items()):  # per-layer lists follow the two layers
        per_layer = key.endswith("layer_types") or (isinstance(value, list) and layers > 2 and len(value) == layers)
        if per_layer and isinstance(value, list) and len(value) > config.num_hidden_layers:
            setattr(config, key, value[: config.num_hidden_layers])


# configs whose sizes are per layer (transformers refuses to set them afterwards): built at the tiny size directly
BUILT = {"gemma4_text": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=8, global_head_dim=8, hidden_size_per_layer_input=0,
                             enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=16,
                             layer_types=["sliding_attention", "full_attention"], sliding_window=16,
                             max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                             tie_word_embeddings=False),
         # DBRX: transformers 5.25 reads attn_config.rope_theta and clamps with clip_qkv (None fails): as released
         "dbrx": dict(d_model=32, n_heads=4, n_layers=2, max_seq_len=128,
                      attn_config=dict(kv_n_heads=2, rope_theta=1e4, clip_qkv=8.0),
                      ffn_config=dict(ffn_hidden_size=16, moe_num_experts=4, moe_top_k=2), pad_token_id=0,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False),
         "jetmoe": dict(hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_key_value_heads=2, kv_channels=8,
                        num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)}


def tiny_config(model_type: str, vocab: int):
    if model_type in BUILT:
        return AutoConfig.for_model(model_type, **BUILT[model_type], vocab_size=vocab,
                                    **({"vocab_size_per_layer_input": vocab} if model_type == "gemma4_text" else {}))
    config = AutoConfig.for_model(PARENT.get(model_type, model_type))
    shrink(config.get_text_config(), {**TINY, **EXTRA.get(model_type, {}), "vocab_size": vocab,
                                      "unpadded_vocab_size": vocab})
    for tower in ("vision_config", "audio_config"):
        if getattr(config, tower, None) is not None:
            shrink(getattr(config, tower), TOWER)
    return config


# model types whose tokenizer class transformers fixes whatever tokenizer_config.json says (a BPE one for these)
BPE = {"qwen3_5_moe_text"}


@pytest.fixture(scope="module")
def table_dir(tmp_path_factory, tiny_tokenizer, bpe_tokenizer):
    """The family's tiny checkpoint directory (built on first use)."""
    made = {}

    def make(mt: str):
        if mt not in made:
            made[mt] = save_tiny(mt, tmp_path_factory.mktemp(mt), *(bpe_tokenizer if mt in BPE else tiny_tokenizer))
        return made[mt]
    return make


ROUTERS = ("gate.weight", "router.weight", "router.layer.weight", "router.proj.weight")


def save_tiny(mt: str, d, tok, vocab: int, **sizes):
    """The family's tiny checkpoint in ``d``, as a user's directory holds it (also scripts/table_families.py): the
    causal LM, the classifier where transformers maps only that, the whole model where it is multimodal; routers
    N(0, 1), so that tokens spread over the experts. ``sizes``: config values set over the tiny ones."""
    torch.manual_seed(0)
    config = tiny_config(mt, vocab)
    for k, v in sizes.items():
        setattr(config, k, v)
    auto = (AutoModelForImageTextToText if mt in PARENT else AutoModelForCausalLM
            if type(config) in AutoModelForCausalLM._model_mapping else AutoModelForSequenceClassification)
    model = auto.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(ROUTERS) and p.dim() == 2:
                p.normal_(0, 1.0)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def cli(args, code=0):
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == code, res.output
    return res


WORDS = ["--verbalisers", "bad,good"]


# linear-attention families whose gated delta rule (its 64-step forward substitution, traced twice) makes each test
# 30-50 s: qwen3_next stays in the default run for that code path, these run with -m slow (the default suite had
# reached 28.6 min with them)
SLOW = {"lara_mini", "qwen3_5_moe_text", "bailing_hybrid", "kimi_linear"}


# transformers 5 families with an adapter file of their own (not a table row), tested the same way
FILES = ["dbrx", "deepseek_v4", "jetmoe"]


@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.slow) if f in SLOW else f
                                    for f in sorted(ROWS) + FILES])
def test_a_table_family_scores_prunes_and_builds(family, table_dir, tmp_path, cache, loose_targets):
    from edgeprune.models.loading import load_model
    from edgeprune.tasks import get_task

    d = table_dir(family)  # label words where the checkpoint has only a language-model head
    arch = json.loads((d / "config.json").read_text())["architectures"][0]
    words = [] if arch.endswith("ForSequenceClassification") else WORDS
    for method in ("reap", "frequency"):
        plan = tmp_path / f"{method}.json"
        cli(["score", "--model", str(d), "--method", method, "--experts", "2", "--calibration-examples", "32",
             "--out", str(plan)] + words)
        assert all(len(lp["groups"]) == 2 for lp in json.loads(plan.read_text())["layers"])
    model = load_model(d, task=get_task("sst2"), verbalisers=words[1].split(",") if words else None)
    adapter = adapter_for(model.config)
    x = {"input_ids": torch.randint(5, 100, (3, 9)), "attention_mask": torch.ones(3, 9, dtype=torch.long)}
    with torch.no_grad():  # keeping every expert is the original, exactly
        ref = model(**x).logits
        assert torch.equal(apply_plan(model, plan_keeping(model, list(range(4))))(**x).logits, ref)
    for k in (2, 1):
        out = tmp_path / f"art{k}"
        res = CliRunner().invoke(main, ["build", "--model", str(d), "--target", "x86_64", "--experts", str(k),
                                        "--out", str(out)] + FAST + words, catch_exceptions=False)
        if k == 1 and res.exit_code == 2:  # a family whose router cannot route one expert says so
            assert "one expert" in res.output, res.output
            continue
        assert res.exit_code == 0, res.output
        report = json.loads((out / "report.json").read_text())
        assert report["export"]["parity_fp32"]["max_abs_logit_diff"] < 1e-3
        assert adapter.blocks(model)


def moe_model_types() -> dict[str, list[str]]:
    """The model directories of the installed transformers whose modeling code reads an expert count from its
    config, each with the model types it declares."""
    import re
    from pathlib import Path

    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name

    expert_count = re.compile(r"config\.(num_local_experts|num_experts|n_routed_experts|moe_num_experts|"
                              r"num_routed_experts)\b")
    types: dict[str, list[str]] = {}
    for mt in CONFIG_MAPPING_NAMES:
        types.setdefault(model_type_to_module_name(mt), []).append(mt)
    root = Path(transformers.__file__).parent / "models"
    return {d.name: types.get(d.name, []) for d in sorted(root.iterdir())
            if any(expert_count.search(f.read_text()) for f in d.glob("modeling_*.py"))}


def test_every_moe_model_type_of_transformers_is_supported_or_refused_with_a_reason():
    from edgeprune.cli import main
    from edgeprune.models.families.multimodal import VIA_TEXT
    from edgeprune.models.families.refused import REFUSED
    from edgeprune.models.registry import ADAPTERS

    dirs = moe_model_types()
    assert len(dirs) >= 77, sorted(dirs)
    known = set(ADAPTERS) | set(REFUSED) | set(VIA_TEXT)
    missing = {d: mts for d, mts in dirs.items() if not known & set(mts)}
    assert not missing, f"MoE model types neither registered nor in models/families/refused.py: {missing}"
    assert not set(ADAPTERS) & set(REFUSED) and not set(VIA_TEXT) & (set(REFUSED) | set(ADAPTERS))
    assert set(VIA_TEXT.values()) <= set(ADAPTERS)
    supported = [d for d, mts in dirs.items() if set(mts) & (set(ADAPTERS) | set(VIA_TEXT))]
    assert len(supported) >= 62, f"{len(supported)} of {len(dirs)} MoE model directories supported"
    listed = CliRunner().invoke(main, ["families"]).output.splitlines()
    for mt, why in REFUSED.items():
        assert f"{mt:19s} not supported: {why}" in listed
    from edgeprune.errors import ModelError

    with pytest.raises(ModelError, match="model_type 'zaya' is not supported: its router reads a state carried"):
        adapter_for("zaya")


def test_sparse_attention_longer_than_its_key_budget_is_refused_before_export():
    """The export keeps every key of a DeepSeek sparse-attention indexer, exact only up to ``index_topk`` keys."""
    from types import SimpleNamespace

    from edgeprune.errors import ConfigError
    from edgeprune.export.torchscript_fixes import check_dsa_length

    class FakeIndexer(torch.nn.Module):
        index_topk = 64

    model = torch.nn.Sequential(FakeIndexer())
    model.config = SimpleNamespace(model_type="deepseek_v32")
    check_dsa_length(model, 64)
    with pytest.raises(ConfigError, match=r"^deepseek_v32: sparse attention keeps 64 keys per query and the artifact "
                                          r"would take 128 tokens \(the task's max_length, or a fixed-shape target's "
                                          r"\[export\].sequence_length\); keep it at 64 or less$"):
        check_dsa_length(model, 128)


def test_a_one_expert_layer_whose_score_underflows_keeps_the_constant_weight(table_dir):
    """Flint renormalises its sigmoid scores (s / sum(s)): with one expert that is 1, except where the score
    underflows to 0 and the division gives NaN (ONNX Runtime's Sigmoid underflows near -20: a k = 1 build failed
    validation on NaN logits). The export patch puts the router's constant back there, and leaves finite weights
    alone; compared exactly."""
    from edgeprune.models.loading import load_model
    from edgeprune.tasks import get_task

    model = load_model(table_dir("flint"), task=get_task("sst2"), verbalisers=["bad", "good"])
    one = apply_plan(model, plan_keeping(model, [2]))
    adapter = adapter_for(one.config)
    block = next(iter(adapter.blocks(one).values()))
    ex = block.experts
    hidden = torch.randn(5, ex.down_proj.shape[1])
    idx = torch.zeros(5, 1, dtype=torch.long)
    weight = torch.tensor([[1.0], [float("nan")], [1.0], [float("nan")], [1.0]])
    with torch.no_grad():
        expert = FusedAdapter.all_experts(ex, hidden)[0]
        with adapter.export_patch(one):
            out = ex(hidden, idx, weight)
        assert torch.equal(out, expert)
        with adapter.export_patch(one):
            assert torch.equal(ex(hidden, idx, torch.full((5, 1), 0.5)), 0.5 * expert)


def test_a_layer_that_runs_twice_is_calibrated_on_both_passes(table_dir, tiny_tokenizer):
    """Inkling 2 Loop runs its looped layers several times per forward (the tiny one: layer 1 twice): calibration
    counts the real tokens of every pass, so layer 1 routes twice the tokens of layer 0."""
    from edgeprune.models.loading import load_model
    from edgeprune.pruning.calibration import collect_routing
    from edgeprune.tasks import get_task, load_split
    from edgeprune.tasks.encoding import encode

    model = load_model(table_dir("inkling2_loop_text"), task=get_task("sst2"), verbalisers=["bad", "good"])
    enc = encode(load_split(get_task("sst2"), "train", limit=12), tiny_tokenizer[0], 32)
    stats = collect_routing(model, enc, max_examples=12, batch_size=4, progress=False)
    real = int(sum(len(ids) for ids in enc.input_ids))
    assert stats[0].tokens == real and stats[1].tokens == 2 * real
    assert stats[1].counts.sum() == 2 * real * 2  # top-2


def test_a_top_k_above_the_expert_count_is_refused_also_in_a_nested_config(table_dir, tmp_path):
    """check_model reads top-k by the adapter's key, a dotted path for DBRX's nested ffn_config."""
    import shutil

    d = tmp_path / "dbrx"
    shutil.copytree(table_dir("dbrx"), d)
    raw = json.loads((d / "config.json").read_text())
    raw["ffn_config"]["moe_top_k"] = 9
    (d / "config.json").write_text(json.dumps(raw))
    res = cli(["score", "--model", str(d), "--experts", "2", "--out", str(tmp_path / "p.json")] + WORDS, code=4)
    assert "config.json ffn_config.moe_top_k = 9 but layer 0 has 4 experts; fix the checkpoint's config" in res.output
