"""Depth (--drop-layers, ShortGPT block influence) and attention heads (--heads-keep, Michel et al. importance) of the
folded model: exact where the removed part contributes nothing, end to end through build, every bad input."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import BertConfig, BertForSequenceClassification

from edgeprune.cli import main
from edgeprune.errors import ConfigError
from edgeprune.pruning import structure
from edgeprune.tasks.encoding import Encoded

FAST = ["--calibration-examples", "64", "--recovery-steps", "4", "--eval-examples", "48", "--latency-iters", "5"]


def tiny_bert(seed=0, layers=3, heads=4):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=48, max_position_embeddings=64, num_labels=2, attn_implementation="eager")
    return BertForSequenceClassification(cfg).eval()


def examples(n=24, seed=1):
    g = np.random.default_rng(seed)
    ids = [[2] + list(g.integers(5, 60, size=int(g.integers(3, 20)))) + [3] for _ in range(n)]
    return Encoded(ids, [[0] * len(i) for i in ids], [int(g.integers(0, 2)) for _ in range(n)], 0)


def logits(model, enc):
    from edgeprune.tasks.encoding import collate

    batch = collate(enc, list(range(len(enc))))
    batch.pop("labels")
    with torch.no_grad():
        return model(**batch).logits.numpy()


def make_identity(model, layer):
    """Layer ``layer`` adds nothing to the residual stream: attention and FFN outputs are zero, and its LayerNorms
    (weight 1, bias 0) re-normalise an input that the previous LayerNorm (weight 1, bias 0) already normalised."""
    block = model.bert.encoder.layer[layer]
    with torch.no_grad():
        for lin in (block.attention.output.dense, block.output.dense):
            lin.weight.zero_()
            lin.bias.zero_()


def test_dropping_an_identity_layer_changes_no_logit():
    model, enc = tiny_bert(), examples()
    make_identity(model, 1)
    before = logits(model, enc)
    bi = structure.block_influence(model, enc, progress=False)
    assert bi[1] < 1e-6 < bi[0] and bi[1] < bi[2]
    model, info = structure.drop_layers(model, structure.LayerDrop(1), enc, 64, progress=False)
    assert info["dropped"] == [1] and info["layers"] == [3, 2] and model.config.num_hidden_layers == 2
    assert len(model.bert.encoder.layer) == 2
    np.testing.assert_allclose(logits(model, enc), before, atol=1e-5)  # LayerNorm's eps: not bit for bit


def test_dropped_model_saves_and_reloads(tmp_path):
    model, enc = tiny_bert(), examples()
    model, _ = structure.drop_layers(model, structure.LayerDrop(2), enc, 64, progress=False)
    model.save_pretrained(tmp_path)
    again = BertForSequenceClassification.from_pretrained(tmp_path).eval()
    np.testing.assert_allclose(logits(again, enc), logits(model, enc), atol=1e-6)


def test_removing_a_head_whose_output_projection_is_zero_changes_no_logit():
    model, enc = tiny_bert(), examples()
    head_dim = 32 // 4
    for layer, head in ((0, 2), (1, 0), (2, 3)):
        with torch.no_grad():
            model.bert.encoder.layer[layer].attention.output.dense.weight[:, head * head_dim:(head + 1) * head_dim] = 0
    before = logits(model, enc)
    imp = structure.head_importance(model, enc, progress=False)
    assert imp.shape == (3, 4) and imp[0, 2] == 0 and imp[1, 0] == 0 and imp[2, 3] == 0
    assert (imp[0, [0, 1, 3]] > 0).all()
    model, info = structure.prune_heads(model, structure.HeadPrune(0.75), enc, 64, progress=False)
    assert info["heads"] == [4, 3] and info["pruned"] == {"0": [2], "1": [0], "2": [3]}
    assert model.bert.encoder.layer[0].attention.self.query.out_features == 24
    np.testing.assert_allclose(logits(model, enc), before, atol=1e-6)


def test_heads_need_head_mask_and_config_is_checked():
    from transformers import MistralConfig, MistralForSequenceClassification

    m = MistralForSequenceClassification(MistralConfig(vocab_size=60, hidden_size=32, intermediate_size=48,
                                                       num_hidden_layers=2, num_attention_heads=4,
                                                       num_key_value_heads=2, num_labels=2, pad_token_id=0))
    with pytest.raises(ConfigError, match="mistral is not a BERT-family encoder"):
        structure.prune_heads(m, structure.HeadPrune(0.5), examples(), 64, progress=False)
    with pytest.raises(ConfigError, match="--drop-layers 3: the model has 3 layers; drop between 1 and 2"):
        structure.drop_layers(tiny_bert(), structure.LayerDrop(3), examples(), 64, progress=False)
    with pytest.raises(ConfigError, match=r"--heads-keep must be in \(0, 1\], got 0"):
        structure.prune_heads(tiny_bert(), structure.HeadPrune(0), examples(), 64, progress=False)


def test_mistral_fold_drops_layers_and_renumbers_its_cache_index():
    from transformers import MistralConfig, MistralForSequenceClassification

    torch.manual_seed(0)
    m = MistralForSequenceClassification(MistralConfig(vocab_size=60, hidden_size=32, intermediate_size=48,
                                                       num_hidden_layers=3, num_attention_heads=4,
                                                       num_key_value_heads=2, num_labels=2, pad_token_id=0)).eval()
    m, info = structure.drop_layers(m, structure.LayerDrop(1), examples(), 64, progress=False)
    assert [l.self_attn.layer_idx for l in m.model.layers] == [0, 1] and m.config.num_hidden_layers == 2
    assert np.isfinite(logits(m, examples())).all()


@pytest.mark.parametrize("args,message", [
    (["--drop-layers", "1", "--experts", "2"], "--drop-layers prunes the folded dense model: use it with --experts 1"),
    (["--heads-keep", "0.5", "--experts", "2"], "--heads-keep prunes the folded dense model: use it with --experts 1"),
    (["--drop-layers", "1", "--method", "chen2022-eager", "--recovery-steps", "60"],
     "--drop-layers needs a one-shot method"),
    (["--drop-layers", "2"], "--drop-layers 2: the model has 2 layers; drop between 1 and 1"),
])
def test_bad_structure_options_are_one_line(tmp_path, cache, tiny_original, loose_targets, args, message):
    res = CliRunner().invoke(main, ["build", "--model", str(tiny_original), "--out", str(tmp_path / "o")] + FAST + args)
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o").exists()


def test_build_with_fewer_layers_and_heads_is_exact_after_fusion(tmp_path, cache, tiny_original, loose_targets):
    """--drop-layers 1 --heads-keep 0.5 on the tiny MoE (2 layers, 2 heads): one layer of one head is left; the
    fp32 artifact (ORT's attention fusion told the pruned head count) gives the pruned PyTorch model's logits."""
    fp32 = tmp_path / "fp32.toml"
    fp32.write_text((loose_targets / "x86_64.toml").read_text().replace('precision = "int8-dynamic"',
                                                                         'precision = "fp32"')
                    .replace("embedding_bits = 4", "embedding_bits = 8"))
    out = tmp_path / "art"
    res = CliRunner().invoke(main, ["build", "--model", str(tiny_original), "--target", str(fp32), "--drop-layers", "1",
                                    "--heads-keep", "0.5", "--out", str(out)] + FAST, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["prune"]["depth"]["layers"] == [2, 1] and report["prune"]["heads"]["heads"] == [2, 1]
    assert any(f.startswith("Attention=") for f in report["export"]["fusions"]), report["export"]["fusions"]
    manifest = json.loads((out / "edgeprune.json").read_text())
    assert manifest["depth"] == [2, 1] and manifest["heads"] == [2, 1]
    assert "layers 2 -> 1" in (out / "report.md").read_text() and "attention heads 2 -> 1" in (out / "README.md").read_text()
    from edgeprune.models.registry import load_classifier
    from edgeprune.runtime import EdgeModel
    from edgeprune.models.tokenizer import load_tokenizer

    pruned_dir = next((cache / "stages").glob("prune-*"))
    torch_model = load_classifier(pruned_dir)
    assert torch_model.config.num_hidden_layers == 1 and torch_model.config.pruned_heads
    texts = ["a gorgeous film", "dull , lifeless and far too long", ""]
    tok = load_tokenizer(pruned_dir)
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = torch_model(**batch).logits.numpy()
    np.testing.assert_allclose(EdgeModel(out).logits(texts, batch_size=8), want, atol=1e-4)


def test_a_preset_applies_where_the_command_line_is_silent(tmp_path, cache, tiny_original, loose_targets):
    preset = tmp_path / "preset.toml"
    preset.write_text("[prune]\ndrop_layers = 1\nheads_keep = 0.5\nrecovery_steps = 3\n")
    out = tmp_path / "art"
    args = ["build", "--model", str(tiny_original), "--target", "x86_64", "--preset", str(preset),
            "--calibration-examples", "64", "--eval-examples", "48", "--latency-iters", "5"]
    res = CliRunner().invoke(main, args + ["--out", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "preset --drop-layers 1 --heads-keep 0.5 --recovery-steps 3" in res.output
    assert "Input hidden size" not in res.output and "INFO" not in res.output  # expected fusion notes are not shown
    report = json.loads((out / "report.json").read_text())
    assert report["prune"]["depth"]["layers"] == [2, 1] and report["prune"]["recovery"]["steps"] == 3
    res = CliRunner().invoke(main, args + ["--drop-layers", "0", "--recovery-steps", "4", "--out", str(tmp_path / "b")],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "preset --heads-keep 0.5" in res.output and "--drop-layers 1" not in res.output
    assert json.loads((tmp_path / "b" / "report.json").read_text())["prune"].get("depth") is None
    res = CliRunner().invoke(main, args + ["--experts", "2", "--out", str(tmp_path / "c")], catch_exceptions=False)
    assert res.exit_code == 2 and "cannot be applied (it is for the folded model (--experts 1))" in res.output
    bad = tmp_path / "bad.toml"
    for body, msg in [("[prune]\nheads_keep = 0\n", r"\[prune\].heads_keep = 0 should be in \(0, 1\]"),
                      ("[prune]\ndrop_layers = -1\n", r"\[prune\].drop_layers = -1 should be an integer >= 0")]:
        bad.write_text(body)
        with pytest.raises(ConfigError, match=msg):
            from edgeprune.targets import load_target

            load_target(str(bad))


def test_vocab_reserve_minus_one_keeps_the_full_vocabulary_against_a_preset(tmp_path, cache, tiny_original,
                                                                            loose_targets):
    res = CliRunner().invoke(main, ["build", "--model", str(tiny_original), "--target", "web", "--vocab-reserve", "-1",
                                    "--out", str(tmp_path / "art")] + FAST, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "preset --vocab-reserve" not in res.output
    assert json.loads((tmp_path / "art" / "edgeprune.json").read_text())["vocabulary"] is None


def test_the_targets_recipe_is_the_default_originals_and_a_users_model_gets_the_plain_fold(tmp_path, cache,
                                                                                           tiny_original):
    """The CPU profiles' [prune] was chosen by a search on the default original: a --model gets the plain fold
    (said in one line), a --preset that does not fit the model is refused (exit 2), the recipe's knobs that do not
    fit are skipped with a line, never applied silently (issue 25, item 5)."""
    from edgeprune.build.presets import apply_presets
    from edgeprune.pruning.config import PruneConfig
    from edgeprune.targets import load_target

    target = load_target("x86_64")
    assert target.prune.drop_layers == 2  # the profile as shipped
    out = tmp_path / "art"
    res = CliRunner().invoke(main, ["build", "--model", str(tiny_original), "--target", "x86_64", "--experts", "1",
                                    "--recovery-steps", "0", "--out", str(out)] + FAST[:2] + FAST[4:],
                             catch_exceptions=False)
    assert res.exit_code in (0, 1), res.output  # built (a random tiny model may miss the real accuracy budget)
    assert "was chosen for the default original; not applied to --model" in res.output
    art = out if out.exists() else tmp_path / "art.rejected"
    manifest = json.loads((art / "edgeprune.json").read_text())
    assert manifest["depth"] is None and manifest["vocabulary"] is None and manifest["heads"] is None
    preset = tmp_path / "preset.toml"
    preset.write_text("[prune]\ndrop_layers = 2\nrecovery_steps = 3\n")
    res = CliRunner().invoke(main, ["build", "--model", str(tiny_original), "--target", "x86_64", "--preset",
                                    str(preset), "--out", str(tmp_path / "b")] + FAST)
    assert res.exit_code == 2 and res.output.strip() == (
        f"error: --preset {preset}: drop_layers = 2 does not fit the model (the model has 2 layers); edit the preset "
        "or give --drop-layers yourself") and not (tmp_path / "b").exists()
    said = []
    cfg = PruneConfig()
    apply_presets(cfg, target, None, set(), said.append)  # the default original: the recipe applies
    assert (cfg.drop_layers, cfg.heads_keep, cfg.ffn_keep, cfg.vocab_reserve) == (2, 0.75, 0.75, 2000)
    assert said == ["[edgeprune] target x86_64: preset --vocab-reserve 2000 --drop-layers 2 --heads-keep 0.75 "
                    "--ffn-keep 0.75 --recovery-steps 1000"]


def test_search_writes_a_preset_that_build_applies(tmp_path):
    from edgeprune.build.presets import load_preset, write_preset

    write_preset(tmp_path / "preset.toml", {"drop_layers": 1, "heads_keep": 0.75, "ffn_keep": 1.0,
                                            "vocab_reserve": -1, "embedding_bits": 4}, 500, "a test")
    assert load_preset(tmp_path / "preset.toml") == {"drop_layers": 1, "heads_keep": 0.75, "ffn_keep": 1.0,
                                                     "recovery_steps": 500}
    (tmp_path / "empty.toml").write_text("[budgets]\nmax_size_mb = 3\n")
    with pytest.raises(ConfigError, match="no \\[prune\\] table"):
        load_preset(tmp_path / "empty.toml")


def test_a_preset_that_does_not_fit_is_named_knob_by_knob(tmp_path):
    from edgeprune.build.presets import misfits

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "olmoe", "num_hidden_layers": 4}))
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE"}}))
    assert misfits({"drop_layers": 4, "heads_keep": 0.5, "vocab_reserve": 10}, tmp_path) == {
        "drop_layers": "the model has 4 layers", "vocab_reserve": "its tokenizer is not WordPiece",
        "heads_keep": "olmoe has no dense sibling to fold into"}
    assert misfits({"drop_layers": 1}, None) == {}
