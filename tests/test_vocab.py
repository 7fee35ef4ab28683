"""Vocabulary pruning (--vocab-reserve): the kept tokens keep their order, the task's training sentences get the
same tokens (and exactly the same logits) from the rewritten tokenizer.json and embedding, dropped words fall back
to sub-word pieces, and the build's artifact and EdgeModel use the pruned vocabulary consistently."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from edgeprune.originals.upcycle import default_dense_path
from edgeprune.pruning.vocab import kept_ids, prune_vocabulary, slim_tokenizer_json
from edgeprune.tasks import get_task, load_split
from tests.conftest import tiny_moe

TRAIN = ["a gorgeous, witty film", "the plot is thin and dull", "an utterly charming movie"]


@pytest.fixture(scope="module")
def minilm_tok():
    return AutoTokenizer.from_pretrained(default_dense_path())


@pytest.fixture(scope="module")
def tok_json():
    return json.loads((default_dense_path() / "tokenizer.json").read_text())


def test_kept_tokens_cover_training_specials_pieces_and_the_reserve(minilm_tok, tok_json):
    used = {i for t in TRAIN for i in minilm_tok(t)["input_ids"]}
    keep = kept_ids(tok_json, used, reserve=10)
    vocab = tok_json["model"]["vocab"]
    assert used <= set(keep) and {0, 100, 101, 102, 103} <= set(keep)
    assert vocab["a"] in keep and vocab["##z"] in keep  # every character and ## character
    assert [vocab[w] in keep for w in ("the", "of", "and")] == [True] * 3  # the most frequent words (reserve)
    assert keep == sorted(keep) and len(keep) < 2100  # ~2,000 character pieces, the rest words


def test_training_sentences_keep_their_tokens_and_dropped_words_fall_back_to_pieces(minilm_tok, tok_json):
    used = {i for t in TRAIN for i in minilm_tok(t)["input_ids"]}
    keep = kept_ids(tok_json, used, reserve=0)
    slim = Tokenizer.from_str(json.dumps(slim_tokenizer_json(tok_json, keep)))
    slim.no_padding()  # the packaged tokenizer.json pads to 128
    rank = {old: new for new, old in enumerate(keep)}
    for t in TRAIN:
        old = minilm_tok(t)["input_ids"]
        assert slim.encode(t).ids == [rank[i] for i in old]
    enc = slim.encode("extraordinary cinematography")  # words not in the kept vocabulary
    assert "[UNK]" not in enc.tokens and len(enc.tokens) > 4 and all(len(p.strip("#")) >= 1 for p in enc.tokens)


def test_slim_embedding_gives_exactly_the_same_logits_on_training_sentences(minilm_tok, tok_json):
    model = tiny_moe(num_experts=2, vocab=tok_json and len(tok_json["model"]["vocab"]))
    train_ids = [minilm_tok(t)["input_ids"] for t in TRAIN]
    val_ids = [minilm_tok("a gorgeous and extraordinary film")["input_ids"]]
    ids = torch.tensor([train_ids[0]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    new_json, record = prune_vocabulary(model, tok_json, train_ids, val_ids, reserve=0)
    keep = sorted({i for s in train_ids for i in s} | set(kept_ids(tok_json, set(), 0)))
    rank = {old: new for new, old in enumerate(keep)}
    with torch.no_grad():
        after = model(input_ids=torch.tensor([[rank[i] for i in train_ids[0]]])).logits
    assert torch.equal(before, after)
    assert model.config.vocab_size == record["kept"] == len(new_json["model"]["vocab"]) < 2100
    assert 0 < record["validation_tokens_resegmented"] < 1  # "extraordinary" was dropped


def test_build_with_a_pruned_vocabulary(tmp_path, cache, loose_targets, minilm_tok):
    from click.testing import CliRunner

    from edgeprune.cli import main
    from edgeprune.runtime import EdgeModel

    d = tmp_path / "moe"
    tiny_moe(num_experts=4, vocab=minilm_tok.vocab_size).save_pretrained(d)
    minilm_tok.save_pretrained(d)
    out = tmp_path / "art"
    res = CliRunner().invoke(main, ["build", "--model", str(d), "--target", "x86_64", "--vocab-reserve", "500",
                                    "--out", str(out), "--calibration-examples", "32", "--recovery-steps", "2",
                                    "--eval-examples", "64", "--latency-iters", "5"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "edgeprune.json").read_text())
    vocab = manifest["vocabulary"]
    assert vocab["of"] == 30522 and vocab["kept"] < 30522 / 2 and vocab["embedding_fp32_mb_saved"] > 0
    report = json.loads((out / "report.json").read_text())
    assert report["prune"]["vocab"] == vocab and report["export"]["parity_fp32"]["max_abs_logit_diff"] < 1e-3
    assert "vocabulary 30522 -> " in (out / "report.md").read_text()
    model = EdgeModel(out)
    assert len(Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab()) == vocab["kept"]
    text = load_split(get_task("sst2"), "train", limit=1)[0].text  # training text: same tokens, renumbered
    feeds = model._feeds([text], None)
    ids = minilm_tok(text, truncation=True, max_length=manifest["max_length"])["input_ids"]
    assert feeds["input_ids"][0, : len(ids)].max() < vocab["kept"] and len(ids) == int(feeds["attention_mask"].sum())
    assert np.isfinite(model.logits(["an unseen, extraordinary word"])).all()


def test_vocab_reserve_on_a_byte_level_tokenizer_is_refused(tmp_path):
    from click.testing import CliRunner

    from edgeprune.cli import main
    from tests.families import tiny_family_checkpoint

    tok = AutoTokenizer.from_pretrained(default_dense_path())
    d = tmp_path / "m"
    tiny_family_checkpoint("mixtral", vocab=tok.vocab_size).save_pretrained(d)
    tok.save_pretrained(d)
    data = json.loads((d / "tokenizer.json").read_text())
    data["model"]["type"] = "BPE"  # what a Llama / Qwen tokenizer says
    (d / "tokenizer.json").write_text(json.dumps(data))
    res = CliRunner().invoke(main, ["prune", "--model", str(d), "--experts", "1", "--vocab-reserve", "10",
                                    "--out", str(tmp_path / "o")])
    assert res.exit_code in (2, 4) and "error:" in res.output and not (tmp_path / "o").exists()
