"""Label-word scoring of language-model checkpoints: the classifier equals the LM's next-token scores of the
verbalisers (1e-6, fp32), the prompt reaches the artifact, EdgeModel tokenizes as training did, errors are one line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edgeprune.tasks.prompts import LabelWords, for_task
from edgeprune.tasks import get_task, load_split
from tests.families import tiny_family_checkpoint


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory, tiny_tokenizer):
    tok, vocab = tiny_tokenizer
    d = tmp_path_factory.mktemp("olmoe_lm")
    tiny_family_checkpoint("olmoe", vocab=vocab).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def cli(args, code=0):
    from click.testing import CliRunner

    from edgeprune.cli import main

    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == code, res.output
    return res


@pytest.mark.parametrize("family", ["olmoe", "granitemoe", "granitemoeshared"])  # granite: logits_scaling 4
def test_classifier_equals_the_language_models_next_token_scores(family, tmp_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from edgeprune.models.loading import load_model
    from edgeprune.tasks.encoding import collate, encode

    tok, vocab = tiny_tokenizer
    lm_dir = tmp_path / family
    tiny_family_checkpoint(family, vocab=vocab).save_pretrained(lm_dir)
    tok.save_pretrained(lm_dir)
    task = get_task("sst2")
    clf = load_model(lm_dir, task=task, verbalisers=("bad", "good"))
    lm = AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    words = LabelWords.from_dict(clf.config.edgeprune_label_words)
    assert list(words.token_ids) == [tok.convert_tokens_to_ids("bad"), tok.convert_tokens_to_ids("good")]
    assert type(clf).__name__.endswith("ForSequenceClassification") and clf.config.id2label == {0: "negative", 1: "positive"}
    enc = encode(load_split(task, "validation", limit=6), tok, task.max_length, words)
    batch = collate(enc, list(range(6)))
    with torch.no_grad():
        got = clf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        full = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    last = batch["attention_mask"].sum(1) - 1  # right padding: the prompt's last token
    want = full[torch.arange(6), last][:, list(words.token_ids)]
    assert torch.allclose(got, want, atol=1e-6, rtol=0)


def test_prompt_is_rendered_in_one_pass_and_truncated_on_the_left(tiny_tokenizer):
    from edgeprune.tasks.loading import Example
    from edgeprune.tasks.encoding import encode

    words = for_task(get_task("rte"))
    assert words.render("a {text_pair} b", "c") == "Premise: a {text_pair} b\nHypothesis: c\nEntailment:"
    tok, _ = tiny_tokenizer
    sst2 = for_task(get_task("sst2"), template="{text} so it was")
    enc = encode([Example("good " * 100, None, 0)], tok, 16, sst2)
    assert len(enc.input_ids[0]) == 16
    assert tok.convert_ids_to_tokens(enc.input_ids[0])[-4:-1] == ["so", "it", "was"]  # the cue survives


@pytest.mark.parametrize("args,needle", [
    (["--prompt", "no placeholder"], "needs the placeholder(s) {text}"),
    (["--prompt", "{text} {oops}"], "and no others"),
    (["--verbalisers", "bad"], "gives 1 words but task sst2 has 2 labels"),
    (["--verbalisers", "bad,bad"], "start with the same token"),
])
def test_bad_label_words_are_one_line_exit_2(lm_dir, tmp_path, args, needle):
    res = cli(["score", "--model", str(lm_dir), "--experts", "2", "--out", str(tmp_path / "p.json")] + args, code=2)
    assert needle in res.output and res.output.count("\n") == 1 and not (tmp_path / "p.json").exists()


def test_prompt_on_a_classifier_checkpoint_is_refused(family_classifier_dir, tmp_path):
    res = cli(["score", "--model", str(family_classifier_dir), "--prompt", "{text} x", "--out", str(tmp_path / "p.json")],
              code=2)
    assert "has its own classification head" in res.output


@pytest.fixture
def family_classifier_dir(tmp_path, tiny_tokenizer):
    tok, vocab = tiny_tokenizer
    tiny_family_checkpoint("mixtral", vocab=vocab).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_artifact_records_the_prompt_and_edgemodel_tokenizes_like_training(lm_dir, tmp_path, cache, loose_targets,
                                                                        tiny_tokenizer):
    from edgeprune.runtime import EdgeModel
    from edgeprune.tasks.loading import Example
    from edgeprune.tasks.encoding import encode

    out = tmp_path / "art"
    cli(["build", "--model", str(lm_dir), "--target", "x86_64", "--experts", "1", "--out", str(out),
         "--prompt", "{text} all in all it was", "--verbalisers", "bad,good", "--calibration-examples", "32",
         "--recovery-steps", "2", "--eval-examples", "24", "--latency-iters", "5"])
    manifest = json.loads((out / "edgeprune.json").read_text())
    assert manifest["label_words"]["template"] == "{text} all in all it was"
    assert manifest["label_words"]["verbalisers"] == ["bad", "good"]
    assert "negative -> 'bad'" in (out / "README.md").read_text()  # the model card says how texts are scored
    m = EdgeModel(out)
    tok, _ = tiny_tokenizer
    texts = ["a gorgeous film " * 40, "dull", ""]
    feeds = m._feeds(texts, None)
    enc = encode([Example(t, None, 0) for t in texts], tok, manifest["max_length"], m.label_words)
    for row, ids in enumerate(enc.input_ids):
        assert feeds["input_ids"][row, : len(ids)].tolist() == ids
    assert m.predict_proba(texts).shape == (3, 2) and np.isfinite(m.logits(texts)).all()
