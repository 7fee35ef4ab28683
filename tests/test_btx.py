"""Branch-Train-MiX originals (edgeprune.originals.btx): domains, masked-LM chunks, the mix, the routers, the
specialisation measure and a whole tiny build, on tiny BERTs built from config classes."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from transformers import AutoModel, BertConfig, BertModel

from edgeprune.originals.btx import RECORD, BtxRecipe, MaskedLM, build_btx, centroid_routers, mix
from edgeprune.originals.domains import DOMAINS, MaskedBatches, domain_texts, mlm_chunks
from edgeprune.originals.specialisation import js_divergence, mean_pairwise_js, usage_by_domain
from edgeprune.tasks import get_task, load_split


def _dense(vocab: int, seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    return BertModel(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=128)).eval()


@pytest.fixture
def dense_dir(tmp_path, tiny_tokenizer):
    tok, vocab = tiny_tokenizer
    d = tmp_path / "dense"
    _dense(vocab).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_js_divergence_is_zero_for_equal_and_ln2_for_disjoint_usage():
    assert js_divergence([0.5, 0.5, 0], [0.5, 0.5, 0]) == pytest.approx(0, abs=1e-12)
    assert js_divergence([1, 0, 0], [0, 0.5, 0.5]) == pytest.approx(math.log(2), abs=1e-12)
    assert mean_pairwise_js({"a": [1, 0], "b": [0, 1], "c": [1, 0]}) == pytest.approx(2 / 3 * math.log(2))


def test_domains_read_training_text_only_and_hold_some_aside():
    world, held = domain_texts("world", 500, held=50)
    assert len(world) == 500 and len(held) == 50 and not set(world) & set(held)
    train = {ex.text for ex in load_split(get_task("agnews"), "train") if ex.label == 0}  # World
    assert set(world) <= train
    movies, _ = domain_texts("movies", 100000)
    assert movies and set(movies) <= {ex.text for ex in load_split(get_task("sst2"), "train")}
    assert domain_texts("seed", 10) == ([], [])
    assert list(DOMAINS) == ["seed", "movies", "world", "sports", "business", "scitech", "mnli", "rte"]


def test_mlm_chunks_are_framed_and_masked_like_bert(tiny_tokenizer):
    tok, _ = tiny_tokenizer
    chunks = mlm_chunks(domain_texts("movies", 200)[0], tok, 16)
    assert chunks and all(len(c) == 16 and c[0] == tok.cls_token_id and c[-1] == tok.sep_token_id for c in chunks)
    assert mlm_chunks([], tok, 16) == []
    batch = next(MaskedBatches(chunks, tok, 64, seed=0))
    masked = batch["labels"] != -100
    assert 0.05 < masked.float().mean() < 0.3  # 15% of the tokens chosen
    assert (batch["input_ids"][masked] == tok.mask_token_id).float().mean() > 0.6  # 80% of them [MASK]
    with pytest.raises(ValueError, match="no text"):
        MaskedBatches([], tok, 4)


def test_mix_takes_each_branch_ffn_as_an_expert_and_averages_the_rest():
    seed = _dense(50)
    branches = [_dense(50, seed=s) for s in range(3)]
    moe = mix(seed, branches, moe_layers=[1])
    for e, b in enumerate(branches):
        ex = moe.encoder.layer[1].moe.experts[e]
        assert torch.equal(ex.w_in.weight, b.encoder.layer[1].intermediate.dense.weight)
        assert torch.equal(ex.w_out.bias, b.encoder.layer[1].output.dense.bias)
    mean = torch.stack([b.encoder.layer[0].attention.self.query.weight for b in branches]).mean(0)
    assert torch.allclose(moe.encoder.layer[0].attention.self.query.weight, mean, atol=1e-7)
    mean_ffn0 = torch.stack([b.encoder.layer[0].intermediate.dense.weight for b in branches]).mean(0)
    assert torch.allclose(moe.encoder.layer[0].intermediate.dense.weight, mean_ffn0, atol=1e-7)  # dense layer
    same = mix(seed, [seed, seed], moe_layers=[1])  # identical branches: the seed comes back
    assert torch.allclose(same.encoder.layer[0].attention.output.dense.weight,
                          seed.encoder.layer[0].attention.output.dense.weight, rtol=0, atol=1e-7)


def test_centroid_routers_send_each_domain_to_its_own_expert():
    seed = _dense(60)
    moe = mix(seed, [seed, seed], moe_layers=[0, 1])
    a = [[2] + list(range(5, 19)) + [3]] * 8  # two "domains" with disjoint words
    b = [[2] + list(range(30, 44)) + [3]] * 8
    centroid_routers(moe, [a, b])
    usage = usage_by_domain(moe, {"a": a, "b": b})
    for layer in (0, 1):
        assert usage[layer]["a"][0] > 0.5 and usage[layer]["b"][1] > 0.5, usage


def test_masked_lm_loss_only_at_masked_positions_and_adds_the_balance_loss(tiny_tokenizer):
    tok, vocab = tiny_tokenizer
    seed = _dense(vocab)
    batch = next(MaskedBatches(mlm_chunks(domain_texts("movies", 200)[0], tok, 16), tok, 8, seed=0))
    ones = torch.ones_like(batch["input_ids"])
    dense = MaskedLM(seed)
    loss = dense(batch["input_ids"], ones, batch["labels"])
    hidden = seed(input_ids=batch["input_ids"], attention_mask=ones).last_hidden_state
    at = batch["labels"] != -100
    expect = torch.nn.functional.cross_entropy(dense.head(hidden[at]), batch["labels"][at])
    assert torch.allclose(loss, expect, atol=1e-6)
    assert dense.head.predictions.decoder.weight is seed.embeddings.word_embeddings.weight  # tied
    moe = mix(seed, [seed, seed], moe_layers=[1]).eval()
    moe_loss = MaskedLM(moe, dense.head)(batch["input_ids"], ones, batch["labels"])
    assert moe_loss > 0 and moe.encoder.layer[1].moe.last is not None


def test_tiny_btx_build_writes_a_bert_moe_with_its_record_and_fine_tunes(dense_dir, tmp_path, cache):
    from edgeprune.models.checkpoint import load_meta
    from edgeprune.originals.classifier import OriginalSpec, ensure_original

    recipe = BtxRecipe(domains=("seed", "movies", "sports"), head_steps=3, branch_steps=3, mix_steps=3,
                       texts_per_domain=300, held_texts=30, chunk=16, batch_size=4)
    out = tmp_path / "btx"
    record = build_btx(dense_dir, out, recipe, progress=False)
    moe = AutoModel.from_pretrained(out)
    assert type(moe).__name__ == "BertMoeModel" and moe.config.num_experts == 3
    assert json.loads((out / RECORD).read_text())["experts"] == {"0": "seed", "1": "movies", "2": "sports"}
    assert (out / "tokenizer.json").is_file() or (out / "vocab.txt").is_file()
    for layer, js in record["specialisation"].items():
        assert 0 <= js <= math.log(2) + 1e-9
    assert set(record["stages"]) == {"head", "branch movies", "branch sports", "router"}
    spec = OriginalSpec(get_task("sst2"), kind="moe", dense_dir=str(dense_dir), steps=2, btx=recipe)
    assert spec.num_experts == 3 and spec.recipe == "btx" and spec.router_learning_rate is None  # trained routers
    meta = load_meta(ensure_original(spec, progress=False))
    assert meta["btx"]["branch_steps"] == 3 and meta["upcycling"]["recipe"] == "btx"
    other = OriginalSpec(get_task("sst2"), kind="moe", dense_dir=str(dense_dir), steps=2,
                         btx=replace(recipe, drop_fraction=0.5))
    assert other.pretrained_dir() != spec.pretrained_dir() and other.directory() != spec.directory()


@pytest.mark.parametrize("args, message", [
    (["--branch-steps", "3"], "--branch-steps is an option of --recipe btx"),
    (["--recipe", "btx", "--num-experts", "4"], "a BTX original has one expert per shipped domain"),
    (["--recipe", "btx", "--family", "mixtral", "--num-experts", "3"], "one expert per shipped domain (4)"),
])
def test_original_recipe_options_that_do_not_fit_are_one_line(args, message, cache):
    from click.testing import CliRunner

    from edgeprune.cli import main

    res = CliRunner().invoke(main, ["original", "--task", "sst2"] + args)
    assert res.exit_code == 2 and message in res.output, res.output


def test_dense_twin_has_the_same_masked_lm_budget(dense_dir, tmp_path, cache):
    from edgeprune.models.checkpoint import load_meta
    from edgeprune.originals.btx import build_dense_twin
    from edgeprune.originals.classifier import OriginalSpec, ensure_original

    recipe = BtxRecipe(domains=("seed", "movies", "sports"), head_steps=2, branch_steps=3, mix_steps=4,
                       texts_per_domain=300, held_texts=30, chunk=16, batch_size=4)
    record = build_dense_twin(dense_dir, tmp_path / "twin", recipe, progress=False)
    assert record["stages"]["mixture"]["steps"] == 2 * 3 + 4 and record["stages"]["head"]["steps"] == 2
    assert type(AutoModel.from_pretrained(tmp_path / "twin")).__name__ == "BertModel"
    spec = OriginalSpec(get_task("sst2"), kind="dense", dense_dir=str(dense_dir), steps=2, btx=recipe)
    meta = load_meta(ensure_original(spec, progress=False))
    assert meta["kind"] == "dense" and meta["btx"]["mix_steps"] == 4 and "mlm-twin" in spec.directory().name


def test_build_recipe_btx_takes_the_btx_original_and_not_the_upcycled_ones_preset(tmp_path):
    from edgeprune.build.config import BuildConfig
    from edgeprune.build.presets import apply_presets
    from edgeprune.pruning.config import PruneConfig
    from edgeprune.targets import load_target

    target = load_target("arm64")
    assert target.prune.presets()  # the recipe chosen on the upcycled default original
    cfg, said = PruneConfig(), []
    apply_presets(cfg, target, None, set(), said.append, other="the BTX original")
    assert cfg.drop_layers == 0 and cfg.ffn_keep == 1.0 and "not applied to the BTX original" in said[0]
    spec = BuildConfig(task=get_task("mnli"), target=target, out=tmp_path, recipe="btx").original_spec()
    assert spec.btx == BtxRecipe() and spec.kind == "moe"
    assert BuildConfig(task=get_task("mnli"), target=target, out=tmp_path).original_spec().btx is None


def test_build_recipe_btx_with_a_model_is_one_line(tmp_path, cache):
    from click.testing import CliRunner

    from edgeprune.cli import main

    (tmp_path / "m").mkdir()
    res = CliRunner().invoke(main, ["build", "--task", "sst2", "--recipe", "btx", "--model", str(tmp_path / "m"),
                                    "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--recipe picks the default original; with --model DIR drop it" in res.output


@pytest.mark.parametrize("drop", [0.0, 0.5])
def test_an_interrupted_btx_build_goes_on_at_its_next_stage_and_equals_the_whole_run(dense_dir, tmp_path,
                                                                                      monkeypatch, drop):
    from safetensors.torch import load_file

    import edgeprune.originals.btx as btx

    recipe = BtxRecipe(domains=("seed", "movies", "sports", "world"), head_steps=2, branch_steps=2, mix_steps=2,
                       texts_per_domain=200, held_texts=20, chunk=16, batch_size=4, drop_fraction=drop)
    build_btx(dense_dir, tmp_path / "whole", recipe, progress=False)
    real, calls = btx.mlm_train, []

    def dies_on_the_third_branch(*args, **kwargs):
        calls.append(args[5])
        if "3/4" in args[5]:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    kept = tmp_path / "kept"
    monkeypatch.setattr(btx, "mlm_train", dies_on_the_third_branch)
    with pytest.raises(KeyboardInterrupt):
        build_btx(dense_dir, tmp_path / "first", recipe, progress=False, resume_dir=kept)
    assert sorted(p.name for p in kept.glob("*.safetensors")) == ["branch-movies.safetensors", "head.safetensors"]
    calls.clear()
    monkeypatch.setattr(btx, "mlm_train", lambda *a, **k: (calls.append(a[5]), real(*a, **k))[1])
    record = build_btx(dense_dir, tmp_path / "resumed", recipe, progress=False, resume_dir=kept)
    assert calls == ["btx: branch 3/4 (sports)", "btx: branch 4/4 (world)", "btx: router + MoE on the mixture"]
    whole, resumed = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)  # bit for bit
    assert set(record["stages"]) == {"head", "branch movies", "branch sports", "branch world", "router"}
    other = replace(recipe, branch_steps=3)  # a kept stage of another recipe is not used
    calls.clear()
    build_btx(dense_dir, tmp_path / "other", other, progress=False, resume_dir=kept)
    assert calls[0] == "btx: masked-LM head on the seed"
