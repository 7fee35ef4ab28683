"""Branch-Train-MiX for the decoder original (edgeprune.originals.btx_lm) on a tiny Llama built from its config
class: causal chunks, the mix (experts bit for bit from the branches, the rest their mean, identical branches give
the dense model back), a whole tiny build with its specialisation record, and a resumed build equal bit for bit."""
from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from edgeprune.originals.btx_lm import RECORD, LmBtxRecipe, build_lm_btx, causal_chunks, mix_lm

RECIPE = LmBtxRecipe(domains=("seed", "movies", "world"), branch_steps=2, mix_steps=2, texts_per_domain=120,
                     held_texts=12, chunk=16, batch_size=2)


def _llama(vocab: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                                        pad_token_id=0)).eval()


@pytest.fixture
def dense_lm(tmp_path, bpe_tokenizer):
    tok, vocab = bpe_tokenizer
    d = tmp_path / "smol"
    _llama(vocab).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_causal_chunks_join_texts_with_eos(bpe_tokenizer):
    tok, _ = bpe_tokenizer
    chunks = causal_chunks(["a gorgeous film", "the plot is thin", "dull"], tok, 4)
    flat = [i for c in chunks for i in c]
    assert all(len(c) == 4 for c in chunks) and tok.eos_token_id in flat
    assert causal_chunks([], tok, 4) == []


def test_mix_takes_each_branchs_mlp_as_an_expert_and_averages_the_rest(bpe_tokenizer):
    _, vocab = bpe_tokenizer
    seed = _llama(vocab)
    branches = [_llama(vocab, s) for s in (0, 1, 2)]
    moe = mix_lm(seed, branches, top_k=2)
    assert type(moe).__name__ == "MixtralForCausalLM" and moe.config.num_local_experts == 3
    st = moe.state_dict()
    for e, b in enumerate(branches):
        bs = b.state_dict()
        mlp = "model.layers.1.mlp."
        assert torch.equal(st[mlp + "experts.down_proj"][e], bs[mlp + "down_proj.weight"])
        assert torch.equal(st[mlp + "experts.gate_up_proj"][e],
                           torch.cat([bs[mlp + "gate_proj.weight"], bs[mlp + "up_proj.weight"]]))
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(st[q], torch.stack([b.state_dict()[q] for b in branches]).mean(0), atol=1e-7)
    same = mix_lm(seed, [seed, seed, seed], top_k=2)  # identical experts, weights summing to 1: the dense model
    ids = torch.tensor([[5, 9, 14, 3, 7]])
    with torch.no_grad():
        assert torch.allclose(same(ids).logits, seed(ids).logits, atol=1e-5)


def test_a_tiny_decoder_btx_build_and_its_resumed_twin(dense_lm, tmp_path, monkeypatch):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import edgeprune.originals.btx_lm as btx_lm

    record = build_lm_btx(dense_lm, tmp_path / "whole", RECIPE, progress=False)
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "whole")
    assert type(moe).__name__ == "MixtralForCausalLM" and moe.config.num_local_experts == 3
    assert json.loads((tmp_path / "whole" / RECORD).read_text())["experts"] == {"0": "seed", "1": "movies",
                                                                                  "2": "world"}
    assert set(record["stages"]) == {"branch movies", "branch world", "router"}
    assert all(0 <= js <= math.log(2) + 1e-9 for js in record["specialisation"].values())
    assert len(record["specialisation"]) == 2  # every layer is an MoE layer
    real = btx_lm._train

    def dies_on_world(model, chunks, recipe, steps, seed, desc, progress):
        if "world" in desc:
            raise KeyboardInterrupt
        return real(model, chunks, recipe, steps, seed, desc, progress)

    monkeypatch.setattr(btx_lm, "_train", dies_on_world)
    with pytest.raises(KeyboardInterrupt):
        build_lm_btx(dense_lm, tmp_path / "first", RECIPE, progress=False, resume_dir=tmp_path / "kept")
    monkeypatch.setattr(btx_lm, "_train", real)
    build_lm_btx(dense_lm, tmp_path / "resumed", RECIPE, progress=False, resume_dir=tmp_path / "kept")
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_decoder_original_by_btx_is_a_mixtral_fine_tuned_on_the_task(dense_lm, cache, monkeypatch):
    """``edgeprune original --family mixtral --recipe btx`` (ensure_lm_original with a recipe): the BTX MoE of the
    packaged SmolLM2 (here a tiny Llama in its place), fine-tuned on the task, its record in the original's meta;
    another recipe is another cache entry."""
    from dataclasses import replace

    import edgeprune.originals.decoder as decoder
    from edgeprune.originals.decoder import ensure_lm_original
    from edgeprune.tasks import get_task
    from edgeprune.tasks.spec import DataSpec

    monkeypatch.setattr(decoder, "ensure_dense_lm", lambda progress=True: dense_lm)
    out = ensure_lm_original(get_task("sst2"), DataSpec(), steps=2, batch_size=2, btx=RECIPE, progress=False)
    meta = json.loads((out / "edgeprune_original.json").read_text())
    assert meta["upcycling"] == {"num_experts": 3, "num_experts_per_tok": 2, "drop_fraction": 0.0, "recipe": "btx"}
    assert meta["btx"]["branch_steps"] == 2 and (meta_dir := __import__("pathlib").Path(meta["pretrained_moe"]))
    assert json.loads((meta_dir / RECORD).read_text())["experts"]["1"] == "movies"
    assert not (cache / "partial" / meta_dir.name).exists()  # the kept stages are gone once the build completes
    other = ensure_lm_original(get_task("sst2"), DataSpec(), steps=2, batch_size=2, progress=False,
                               btx=replace(RECIPE, drop_fraction=0.5))
    assert other != out


def test_build_generate_recipe_btx_takes_the_decoder_btx_original(tmp_path, monkeypatch):
    import edgeprune.originals.decoder as decoder
    from edgeprune.build.config import BuildConfig
    from edgeprune.build.decoder import DECODER
    from edgeprune.originals.btx_lm import LmBtxRecipe
    from edgeprune.targets import load_target
    from edgeprune.tasks import get_task

    asked = []
    monkeypatch.setattr(decoder, "ensure_lm_original", lambda task, data, **kw: asked.append(kw.get("btx")) or tmp_path)
    for recipe in ("btx", "upcycle"):
        DECODER.default_original(BuildConfig(task=get_task("sst2"), target=load_target("arm64"), out=tmp_path,
                                             recipe=recipe))
    assert asked == [LmBtxRecipe(), None]
