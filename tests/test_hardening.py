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


def test_non_finite_weights_are_refused_where_they_are_read(tmp_path, user_model):
    """In memory (the whole model) and layer by layer (each tensor as it is read), naming the tensor (exit 4)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(user_model / "model.safetensors"))
    name = sorted(k for k in tensors if "moe.experts.1.w_out.weight" in k)[0]
    tensors[name][3, 2] = float("nan")
    save_file(tensors, str(user_model / "model.safetensors"), metadata={"format": "pt"})
    for extra in ([], ["--layerwise"]):
        res = run(["score", "--model", str(user_model), "--experts", "1", "--calibration-examples", "8",
                   "--out", str(tmp_path / "p.json")] + extra, 4)
        errors = [line for line in res.output.splitlines() if line.startswith("error:")]
        assert errors == [f"error: {user_model}: tensor {name} holds NaN; the checkpoint is damaged (re-save or "
                          "re-train it; edgeprune does not prune non-finite weights)"]
        assert not (tmp_path / "p.json").exists()


def test_check_finite_is_exact_also_where_the_fast_sum_overflows():
    import torch

    from edgeprune.errors import ModelError
    from edgeprune.models.checkpoint import check_finite

    big = torch.full((4,), 3e38)  # finite, but its fp32 sum overflows: every element is then looked at
    check_finite({"big": big}, "here")
    big[1] = float("-inf")
    with pytest.raises(ModelError, match="tensor big holds infinity"):
        check_finite({"big": big}, "here")


def test_plans_are_standard_json_and_non_finite_scores_are_refused(tmp_path):
    import math

    from edgeprune.errors import ConfigError
    from edgeprune.pruning.plan import LayerPlan, PrunePlan

    plan = PrunePlan("reap", [LayerPlan(1, 2, [0.5, math.nan], [[(0, 1.0)]])])
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        plan.to_json()
    (tmp_path / "p.json").write_text(json.dumps({"method": "reap", "layers": [
        {"layer": 1, "num_experts": 2, "scores": [0.5, float("nan")], "groups": [[[0, 1.0]]]}]}))
    with pytest.raises(ConfigError, match="layer 1: score nan is not a finite number"):
        PrunePlan.load(tmp_path / "p.json")


def test_a_shard_index_never_leads_outside_the_checkpoint(tmp_path, user_model):
    (user_model / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"x": "../../../../etc/passwd"}}))
    res = run(["score", "--model", str(user_model), "--out", str(tmp_path / "p.json")], 4)
    assert "model.safetensors.index.json: names '../../../../etc/passwd', which lies outside" in res.output


@pytest.mark.parametrize("where", ["file", "proc"])
def test_a_cache_location_that_cannot_be_used_is_exit_2(where, tmp_path, monkeypatch, user_model):
    from edgeprune import cache as cache_module

    bad = tmp_path / "a-file" if where == "file" else Path("/proc/edgeprune-cache")
    if where == "file":
        bad.write_text("x")
    monkeypatch.setenv("EDGEPRUNE_CACHE", str(bad))
    monkeypatch.setattr(cache_module, "_USABLE", set())
    res = run(["score", "--model", str(user_model), "--out", str(tmp_path / "p.json")], 2)
    line = res.output.strip()
    assert line.startswith(f"error: EDGEPRUNE_CACHE {bad} ") and "point EDGEPRUNE_CACHE at a" in line


def test_a_budget_file_whose_budgets_are_not_a_table_is_exit_2(tmp_path):
    from edgeprune.errors import ConfigError
    from edgeprune.validate.budgets import load_budget_file

    (tmp_path / "b.toml").write_text("budgets = 5\n")
    with pytest.raises(ConfigError, match="budgets = 5 should be a \\[budgets\\] table"):
        load_budget_file(tmp_path / "b.toml")


def test_a_substituted_cached_logits_file_is_caught_and_rebuilt(tmp_path, cache, user_model, loose_targets):
    """The original's validation logits are a sealed stage: a valid but different array is caught by its SHA-256
    record, rebuilt, and the log says which entry and why."""
    import numpy as np

    out = tmp_path / "art"
    args = ["build", "--model", str(user_model), "--out", str(out)] + FAST
    first = run(args, 0)
    report = json.loads((out / "report.json").read_text())
    entry = next((cache / "stages").glob("logits-*"))
    logits = np.load(entry / "logits.npy")
    np.save(entry / "logits.npy", -logits)  # valid, and wrong
    res = run(args, 0)
    assert f"cache: {entry.name} is damaged (logits.npy was modified); rebuilding it" in res.output
    assert json.loads((out / "report.json").read_text())["quality"] == report["quality"]
    assert first.exit_code == 0


def test_labels_are_matched_by_name_and_the_head_follows_the_task(tmp_path, user_model, cache):
    """A checkpoint whose id2label is the task's in another order is put into the task's order (the same
    predictions, by name); names that are not the task's are refused (exit 4) unless mapped (--label-map)."""
    import torch
    from safetensors.torch import load_file, save_file

    from edgeprune.models.loading import load_model
    from edgeprune.tasks import get_task

    task = get_task("sst2")
    base = load_model(user_model, task=task)
    swapped = tmp_path / "swapped"
    shutil.copytree(user_model, swapped)
    cfg = json.loads((swapped / "config.json").read_text())
    cfg["id2label"], cfg["label2id"] = {"0": "Positive", "1": "negative"}, {"Positive": 0, "negative": 1}
    (swapped / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(swapped / "model.safetensors"))
    for k in ("classifier.weight", "classifier.bias"):
        tensors[k] = tensors[k].flip(0).contiguous()
    save_file(tensors, str(swapped / "model.safetensors"), metadata={"format": "pt"})
    model = load_model(swapped, task=task)
    ids = torch.tensor([[2, 10, 11, 12, 3]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    other = tmp_path / "other"
    shutil.copytree(user_model, other)
    cfg["id2label"], cfg["label2id"] = {"0": "bad", "1": "good"}, {"bad": 0, "good": 1}
    (other / "config.json").write_text(json.dumps(cfg))
    res = run(["score", "--model", str(other), "--out", str(tmp_path / "p.json")], 4)
    assert "the checkpoint's labels ['bad', 'good'] are not task sst2's (negative, positive); map them with " \
           "--label-map" in res.output
    run(["score", "--model", str(other), "--label-map", "bad=negative,good=positive", "--experts", "1",
         "--calibration-examples", "8", "--out", str(tmp_path / "p.json")], 0)
    res = run(["score", "--model", str(other), "--label-map", "bad=awful", "--out", str(tmp_path / "q.json")], 2)
    assert "'awful' is not a label of task sst2" in res.output
