"""The app runtime (no torch) and the CLI commands around the build."""
import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from edgeprune.cli import main
from tests.test_build import FAST, run


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_original):
    import os

    out = tmp_path_factory.mktemp("art") / "sst2"
    env_cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("EDGEPRUNE_CACHE")
    os.environ["EDGEPRUNE_CACHE"] = str(env_cache)
    try:
        CliRunner().invoke(main, ["build", "--model", str(tiny_original), "--target", "x86_64", "--out", str(out),
                                  "--drop-layers", "1"] + FAST)  # the tiny MoE has 2 layers; the preset drops 2
    finally:
        if old is None:
            os.environ.pop("EDGEPRUNE_CACHE")
        else:
            os.environ["EDGEPRUNE_CACHE"] = old
    # the tiny model is random: its accuracy budget may fail, in which case the artifact is in .rejected
    return out if out.exists() else out.parent / "sst2.rejected"


def test_runtime_imports_no_torch_and_handles_odd_inputs(artifact):
    code = f"""
import sys, json
from edgeprune.runtime import EdgeModel
m = EdgeModel({str(artifact)!r})
texts = ["a gorgeous, witty film", "", "x " * 5000, "très émouvant 映画 ☃"]
labels = m.predict(texts)
p = m.predict_proba(texts)
print(json.dumps({{"labels": labels, "sums": p.sum(1).tolist(), "empty": m.predict([]),
                  "mods": sorted(k for k in sys.modules if k.split(".")[0] in ("torch", "transformers"))}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    res = json.loads(out.stdout)
    assert res["mods"] == []
    assert len(res["labels"]) == 4 and set(res["labels"]) <= {"negative", "positive"}
    assert np.allclose(res["sums"], 1.0, atol=1e-5)
    assert res["empty"] == []


def test_runtime_tokenizes_like_transformers(artifact, tiny_original):
    from transformers import AutoTokenizer

    from edgeprune.runtime import EdgeModel

    build_cfg = json.loads((artifact / "build_config.json").read_text())
    assert build_cfg["task"] == "sst2"
    m = EdgeModel(artifact)
    texts = ["the best film of the year", "dull and lifeless", "an uneven but often moving story"]
    tok = AutoTokenizer.from_pretrained(tiny_original)
    enc = tok(texts, padding=True, return_tensors="np")
    ids = m.tokenizer.encode_batch(texts)
    for row, e in enumerate(ids):
        n = len(e.ids)
        assert e.ids == enc["input_ids"][row][:n].tolist()


def test_predict_cli_and_errors(artifact, tmp_path):
    res = run(["predict", str(artifact), "--proba", "good", "bad"])
    lines = [json.loads(l) for l in res.output.strip().splitlines()]
    assert [l["text"] for l in lines] == ["good", "bad"]
    assert abs(lines[0]["negative"] + lines[0]["positive"] - 1) < 1e-3
    res = CliRunner().invoke(main, ["predict", str(tmp_path), "x"])
    assert res.exit_code == 4 and "not an edgeprune artifact (no edgeprune.json); give the --out folder of an edgeprune build" in res.output


@pytest.mark.parametrize("command", [["predict", "{}", "x"], ["check", "{}"], ["serve", "{}", "--port", "0"],
                                     ["generate", "{}", "hello"]])
def test_one_message_per_situation_across_commands(command, tmp_path):
    """A missing folder, and a folder that is not an artifact, get the same line (exit 4) from every command."""
    for folder, message in ((tmp_path / "missing", "no such artifact folder; give the --out folder of an edgeprune "
                                                   "build"),
                            (tmp_path, "not an edgeprune artifact (no edgeprune.json); give the --out folder of an "
                                       "edgeprune build")):
        if command[0] == "generate" and folder == tmp_path:
            continue  # a folder without edgeprune.json is a plain KV-cache export for EdgeLM (tests/test_generation.py)
        res = CliRunner().invoke(main, [a.replace("{}", str(folder)) for a in command])
        assert res.exit_code == 4 and res.output.strip() == f"error: {folder}: {message}", res.output


def test_help_lists_every_subcommand():
    res = run(["--help"])
    for cmd in ("build", "check", "predict", "targets", "tasks", "original", "baseline", "score", "prune"):
        assert cmd in res.output
    assert "x86_64" in run(["targets"]).output


def test_score_writes_plan_and_prune_reapplies_it(tmp_path, cache, tiny_original):
    plan = tmp_path / "plan.json"
    res = run(["score", "--model", str(tiny_original), "--method", "uncurl", "--experts", "2",
               "--calibration-examples", "32", "--out", str(plan)])
    assert "layer 1: keep" in res.output
    data = json.loads(plan.read_text())
    assert data["method"] == "uncurl" and len(data["layers"][0]["groups"]) == 2
    two = tmp_path / "plan_k2.json"
    two.write_text(plan.read_text())
    data["layers"][0]["groups"] = [[[0, 1.0]]]  # hand edit: keep expert 0 only
    plan.write_text(json.dumps(data))
    out = tmp_path / "pruned"
    res = run(["prune", "--model", str(tiny_original), "--plan", str(plan), "--recovery-steps", "2", "--out", str(out)])
    assert "BertForSequenceClassification" in res.output
    assert json.loads((out / "config.json").read_text())["model_type"] == "bert"
    assert json.loads((out / "prune_plan.json").read_text())["layers"][0]["groups"] == [[[0, 1.0]]]
    slim = tmp_path / "slim"
    run(["prune", "--model", str(tiny_original), "--plan", str(plan), "--ffn-keep", "0.25", "--recovery-steps", "2",
         "--out", str(slim)])
    assert json.loads((slim / "config.json").read_text())["intermediate_size"] == 16
    assert json.loads((slim / "edgeprune_prune.json").read_text())["ffn"]["intermediate_size"] == [64, 16]
    res = CliRunner().invoke(main, ["prune", "--model", str(tiny_original), "--plan", str(two), "--ffn-keep", "0.5",
                                    "--out", str(tmp_path / "no")])
    assert res.exit_code == 2 and res.output.strip() == (
        "error: --ffn-keep needs a plan that keeps one expert in every layer (the folded model)")
    assert not (tmp_path / "no").exists()


def test_original_command_errors():
    res = CliRunner().invoke(main, ["original", "--task", "completion"])
    assert res.exit_code == 3
    assert res.output.strip() == ("error: task completion ships no data; pass --train-file (TSV, CSV or JSONL with "
                                  "columns prompt, completion)")
    res = CliRunner().invoke(main, ["original", "--task", "nope"])
    assert res.exit_code == 2 and "unknown task 'nope'" in res.output


def test_upcycle_command(tmp_path, tiny_tokenizer):
    import torch
    from transformers import AutoModel, BertConfig, BertModel

    tok, vocab = tiny_tokenizer
    dense_dir = tmp_path / "dense"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(dense_dir)
    tok.save_pretrained(dense_dir)
    out = tmp_path / "moe"
    res = run(["upcycle", "--dense", str(dense_dir), "--num-experts", "16", "--moe-layers", "0,2", "--out", str(out)])
    assert "16 experts in layers [0, 2]" in res.output
    moe = AutoModel.from_pretrained(out)
    assert type(moe).__name__ == "BertMoeModel" and (out / "tokenizer.json").is_file()
    res = CliRunner().invoke(main, ["upcycle", "--dense", str(dense_dir), "--moe-layers", "1;3", "--out", str(out)])
    assert res.exit_code == 2 and "--moe-layers '1;3': give comma-separated layer indices" in res.output
    res = CliRunner().invoke(main, ["upcycle", "--dense", str(dense_dir), "--moe-layers", "9", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "out of range for 4 layers" in res.output
    assert not (tmp_path / "x").exists()
