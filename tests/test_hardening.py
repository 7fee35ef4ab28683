"""Hardening: inputs are never touched, every failure is one line with its exit code, the cache is verified,
the artifact swap has no window, one writer per output."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeprune.cli import main

FAST = ["--calibration-examples", "32", "--recovery-steps", "2", "--eval-examples", "32", "--latency-iters", "5"]


def run(args, code):
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == code, res.output
    return res


def tree_hash(d: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(d.rglob("*")):
        h.update(str(p.relative_to(d)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture
def user_model(tmp_path, tiny_original):
    d = tmp_path / "user-model"
    shutil.copytree(tiny_original, d)
    return d


@pytest.mark.parametrize("command", ["build", "prune"])
@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_out_overlapping_the_model_is_refused_and_model_untouched(command, where, user_model, cache, loose_targets):
    before = tree_hash(user_model)
    out = {"same": user_model, "inside": user_model / "art", "parent": user_model.parent}[where]
    extra = FAST if command == "build" else FAST[:4]
    res = run([command, "--model", str(user_model), "--out", str(out)] + extra, 2)
    line = res.output.strip().splitlines()
    assert len(line) == 1 and line[0].startswith("error: --out") and "checkpoint (--model)" in line[0]
    assert tree_hash(user_model) == before


def test_out_inside_the_cache_or_over_data_or_plan_is_refused(tmp_path, cache, user_model, loose_targets):
    res = run(["build", "--model", str(user_model), "--out", str(cache / "x")], 2)
    assert "edgeprune cache" in res.output
    data = tmp_path / "data" / "train.tsv"
    data.parent.mkdir()
    data.write_text("sentence\tlabel\n" + "a fine film\t1\nawful\t0\n" * 20)
    res = run(["build", "--model", str(user_model), "--train-file", str(data), "--eval-file", str(data),
               "--out", str(data.parent)], 2)
    assert "training data (--train-file)" in res.output and data.read_text().startswith("sentence")
    plan = tmp_path / "plan.json"
    plan.write_text("{}")
    res = run(["score", "--model", str(user_model), "--out", str(user_model / "plan.json")], 2)
    assert "lies inside the checkpoint" in res.output


def test_unwritable_out_is_refused_before_any_work(tmp_path, cache, user_model, loose_targets):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = run(["build", "--model", str(user_model), "--out", str(blocker / "art")], 2)
    assert "is a file" in res.output and "prune:" not in res.output
    res = run(["score", "--model", str(user_model), "--out", str(tmp_path)], 2)
    assert "is a directory" in res.output


def test_pickle_only_checkpoint_is_refused_with_the_fix(tmp_path, user_model, cache):
    import torch

    d = tmp_path / "pickled"
    shutil.copytree(user_model, d)
    (d / "model.safetensors").unlink()
    torch.save({}, d / "pytorch_model.bin")
    res = run(["score", "--model", str(d), "--out", str(tmp_path / "p.json")], 4)
    assert "only pickle weights (pytorch_model.bin)" in res.output and "save_pretrained" in res.output


@pytest.mark.parametrize("damage,message", [
    ("truncate", "not a readable safetensors file"),
    ("config", "invalid JSON"),
    ("model_type", "not a supported MoE family"),
    ("shapes", "do not match config.json"),
    ("shard", "shard(s) named in model.safetensors.index.json are missing"),
])
def test_damaged_checkpoints_get_one_line_exit_4(tmp_path, user_model, cache, damage, message):
    d = tmp_path / "bad"
    shutil.copytree(user_model, d)
    cfg = json.loads((d / "config.json").read_text())
    if damage == "truncate":
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[: len(data) // 3])
    elif damage == "config":
        (d / "config.json").write_text("{not json")
    elif damage == "model_type":
        (d / "config.json").write_text(json.dumps({**cfg, "model_type": "mamba"}))
    elif damage == "shapes":
        (d / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    elif damage == "shard":
        (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
            "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    res = run(["score", "--model", str(d), "--out", str(tmp_path / "p.json")], 4)
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], res.output
    assert not (tmp_path / "p.json").exists()


def test_swap_exchanges_without_a_window_and_recovers_a_stranded_artifact(tmp_path):
    from edgeprune.cache import atomic_dir, recover_stranded

    final = tmp_path / "art"
    with atomic_dir(final) as tmp:
        (tmp / "v").write_text("1")
    with atomic_dir(final) as tmp:
        (tmp / "v").write_text("2")
    assert (final / "v").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
    # a kill between the two renames of the fallback swap: only ".art.old-<dead pid>" is left
    os.rename(final, tmp_path / ".art.old-999999999")
    (tmp_path / ".art.tmp-999999999-abc").mkdir()
    done = recover_stranded(final)
    assert (final / "v").read_text() == "2" and len(done) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_second_writer_of_the_same_out_fails_with_one_line(tmp_path):
    from edgeprune.errors import ConfigError
    from edgeprune.guard import output_lock

    with output_lock(tmp_path / "art"):
        with pytest.raises(ConfigError, match="another edgeprune process is writing"):
            with output_lock(tmp_path / "art"):
                pass
    with output_lock(tmp_path / "art"):  # released
        pass


def test_damaged_cached_stage_is_rebuilt_and_says_so(tmp_path, cache, user_model, loose_targets):
    out = tmp_path / "art"
    args = ["build", "--model", str(user_model), "--out", str(out)] + FAST
    run(args, 0)
    exports = list((cache / "stages").glob("export-*"))
    assert len(exports) == 1
    onnx_file = exports[0] / "model.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[-100] ^= 0xFF  # alter a weight byte
    onnx_file.write_bytes(bytes(data))
    res = run(args, 0)
    assert "is damaged (model.onnx was modified); rebuilding it" in res.output
    assert "export: reusing" not in res.output


def test_unexpected_exception_is_one_line(monkeypatch, tmp_path):
    import edgeprune.targets as targets

    def boom(*a, **k):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(targets, "available", boom)
    res = run(["targets"], 70)
    assert res.output.strip().startswith("error: unexpected ZeroDivisionError") and len(res.output.strip().splitlines()) == 1


def test_sigterm_is_an_interruption_with_one_line(monkeypatch):
    import signal

    import edgeprune.targets as targets

    def term(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(targets, "available", term)
    res = run(["targets"], 130)
    assert res.output.strip() == "error: interrupted; nothing was written (the previous output and the cache are as they were)"


def test_upcycle_refuses_duplicate_moe_layers(tmp_path):
    res = run(["upcycle", "--moe-layers", "1,1", "--out", str(tmp_path / "m")], 2)
    assert "names a layer twice" in res.output and not (tmp_path / "m").exists()


def test_sigterm_during_a_build_stage_keeps_the_previous_artifact_and_a_clean_cache(tmp_path, cache, user_model,
                                                                                    loose_targets, monkeypatch):
    import signal

    import edgeprune.export.onnx_export as onnx_export

    out = tmp_path / "art"
    run(["build", "--model", str(user_model), "--out", str(out)] + FAST, 0)
    before = tree_hash(out)
    stages_before = sorted(p.name for p in (cache / "stages").iterdir())

    def term(*a, **k):  # the signal arrives in the middle of the export stage of a new build
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(onnx_export, "export_onnx", term)
    res = run(["build", "--model", str(user_model), "--experts", "2", "--out", str(out)] + FAST, 130)
    assert res.output.strip().splitlines()[-1].startswith("error: interrupted")
    assert tree_hash(out) == before  # the previous artifact, byte for byte
    leftovers = [p.name for p in (cache / "stages").iterdir() if ".tmp-" in p.name]
    assert not leftovers and not list(tmp_path.glob(".art.tmp-*")) and not list(tmp_path.glob(".art.old-*"))
    new_stages = set(p.name for p in (cache / "stages").iterdir()) - set(stages_before)
    assert all(p.startswith("prune-") for p in new_stages)  # the finished prune stage is kept, sealed
    monkeypatch.undo()
    run(["build", "--model", str(user_model), "--experts", "2", "--out", str(out)] + FAST, 0)


@pytest.mark.parametrize("command", ["build", "prune", "upcycle"])
def test_a_users_folder_as_out_is_refused_and_kept(command, tmp_path, user_model, cache, loose_targets):
    folder = tmp_path / "my-project"
    (folder / "src").mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    before = tree_hash(folder)
    args = ["upcycle"] if command == "upcycle" else [command, "--model", str(user_model)] + FAST[:4]
    res = run(args + ["--out", str(folder)], 2)
    line = res.output.strip().splitlines()
    assert len(line) == 1 and "is an existing folder that edgeprune did not write (2 entries: notes.txt, src)" in line[0]
    assert tree_hash(folder) == before and not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_out_links_dot_and_previous_artifacts(tmp_path, user_model, cache, loose_targets, monkeypatch):
    args = ["build", "--model", str(user_model)] + FAST
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    res = run(args + ["--out", str(dangling)], 2)
    assert "is a symbolic link to" in res.output and "which does not exist" in res.output
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "a.txt").write_text("x")
    monkeypatch.chdir(folder)
    res = run(args + ["--out", "."], 2)
    assert "is the current directory or contains it" in res.output and (folder / "a.txt").read_text() == "x"
    monkeypatch.chdir(tmp_path)
    # a link to an empty folder: the artifact is written where the link points; no litter beside the link
    (tmp_path / "real").mkdir()
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "real")
    run(args + ["--out", str(link)], 0)
    assert link.is_symlink() and (tmp_path / "real" / "edgeprune.json").is_file()
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    # an edgeprune artifact (and an empty folder) may be replaced
    run(args + ["--experts", "2", "--out", str(link)], 0)
    assert json.loads((tmp_path / "real" / "edgeprune.json").read_text())["prune_plan"]["k_per_layer"]
    (tmp_path / "empty").mkdir()
    run(args + ["--out", str(tmp_path / "empty")], 0)
