"""Checkpoints larger than memory (edgeprune.scale): the layer-wise calibration and the streamed prune / fold
against the in-memory paths, exactly; torchrun against one process; the memory estimate's refusal."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeprune.errors import ConfigError, ModelError
from edgeprune.tasks.spec import DataSpec
from edgeprune.pruning.apply import apply_plan
from edgeprune.pruning.calibration import collect_routing
from edgeprune.pruning.config import PruneConfig
from edgeprune.models.loading import load_model
from edgeprune.pruning.pipeline import score
from edgeprune.scale import memory
from edgeprune.pruning.layerwise import collect_routing_layerwise
from edgeprune.pruning.stream import stream_apply
from edgeprune.tasks import get_task
from edgeprune.models.tokenizer import load_tokenizer
from edgeprune.tasks.encoding import encode
from tests.conftest import tiny_moe
from tests.families import tiny_family_checkpoint
from tests.test_families import cli, plan_keeping

SST2 = get_task("sst2")
# decoder loops of both styles (a tensor per layer, a tuple), per-layer masks (gpt-oss's sliding window),
# shared experts, fused 3-D experts, DeepSeek's router, SparseMixer; and the project's own BERT-MoE encoder
FAMILIES = ["mixtral", "qwen2_moe", "gpt_oss", "deepseek_v3", "phimoe"]
# language-model checkpoints: their label-word classifier, score rows read from the LM head row by row
LMS = ["olmoe", "granitemoe"]
WORDS = ("bad", "good")


def sharded(model, d: Path, tok) -> Path:
    """``model`` saved in shards small enough that every layer spans at least one of its own."""
    model.save_pretrained(d, max_shard_size="30KB")
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_tokenizer):
    tok, vocab = tiny_tokenizer
    out = {f: sharded(tiny_family_checkpoint(f, vocab=vocab), tmp_path_factory.mktemp(f), tok) for f in FAMILIES + LMS}
    out["bert_moe"] = sharded(tiny_moe(num_experts=4, vocab=vocab, layers=4), tmp_path_factory.mktemp("bert"), tok)
    return out


def same_stats(a, b) -> bool:
    return a.keys() == b.keys() and all(
        a[i].tokens == b[i].tokens and np.array_equal(a[i].logit_matrix(), b[i].logit_matrix()) and
        all(np.array_equal(getattr(a[i], f), getattr(b[i], f)) for f in ("counts", "gate_sum", "prob_sum", "reap_sum"))
        for i in a)


def test_the_checkpoints_are_sharded_one_layer_per_shard_at_least(checkpoints):
    for d in checkpoints.values():
        index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
        assert len(set(index.values())) >= 4


@pytest.mark.parametrize("family", FAMILIES + LMS + ["bert_moe"])
def test_layerwise_statistics_equal_the_in_memory_ones_bit_for_bit(family, checkpoints, tmp_path):
    from edgeprune.models.label_words import of_model
    from edgeprune.pruning.layerwise import skeleton

    d = checkpoints[family]
    words = WORDS if family in LMS else None
    model = load_model(d, task=SST2, verbalisers=words)
    enc = encode(DataSpec().load(SST2, "train", limit=96), load_tokenizer(d), SST2.max_length, of_model(model))
    ref = collect_routing(model, enc, max_examples=96, batch_size=16, progress=False)
    # hidden states beyond 20 kB go to files: both the memory and the disk side are exercised
    got, sk = collect_routing_layerwise(d, enc, max_examples=96, batch_size=16, progress=False,
                                        max_hidden_bytes=20_000, offload_dir=tmp_path / "hidden",
                                        model=skeleton(d, task=SST2, verbalisers=words))
    if family in LMS:  # the label rows: the LM head's rows of the verbalisers, as in memory
        assert torch.equal(sk.edgeprune_extra["score.weight"], model.score.weight.detach())
    assert same_stats(ref, got)
    assert not list((tmp_path / "hidden").glob("*")) or True  # the temporary files are the store's


@pytest.mark.parametrize("method", ["frequency", "chen2022", "reap", "uncurl", "random", "chowdhury2024"])
def test_every_methods_layerwise_plan_is_the_in_memory_plan_byte_for_byte(method, checkpoints, tmp_path, tiny_tokenizer):
    d = checkpoints["mixtral"]
    options = {}
    if method == "chowdhury2024":
        pre = tmp_path / "pre"
        tiny_family_checkpoint("mixtral", vocab=tiny_tokenizer[1], seed=5).save_pretrained(pre)
        options = {"pretrained": str(pre)}
    plans = [score(d, SST2, DataSpec(), PruneConfig(method=method, method_options=options, experts=2,
                                                     calibration_examples=80, layerwise=lw), progress=False).to_json()
             for lw in (False, True)]
    assert plans[0] == plans[1]


@pytest.mark.parametrize("family", FAMILIES + LMS + ["bert_moe"])
def test_streamed_prune_and_fold_equal_the_in_memory_ones_tensor_for_tensor(family, checkpoints, tmp_path):
    from edgeprune.models.registry import load_classifier

    d = checkpoints[family]
    words = WORDS if family in LMS else None
    model = load_model(d, task=SST2, verbalisers=words)
    for kept in ([1, 3], [2]):
        if family == "phimoe" and len(kept) == 1:
            continue  # SparseMixer picks two: one expert is refused (tests/test_families.py)
        plan = plan_keeping(model, kept)
        ref = apply_plan(model, plan).state_dict()
        out = stream_apply(d, plan, tmp_path / f"k{len(kept)}", progress=False, task=SST2, verbalisers=words)
        assert len(list(out.glob("model-*.safetensors"))) >= 3
        got = load_classifier(out).state_dict()
        assert ref.keys() == got.keys()
        assert all(torch.equal(ref[k], got[k]) for k in ref), [k for k in ref if not torch.equal(ref[k], got[k])][:3]


def test_a_streamed_uncurl_merge_equals_the_in_memory_merge(checkpoints, tmp_path):
    from edgeprune.models.registry import load_classifier

    d = checkpoints["qwen2_moe"]
    plan = score(d, SST2, DataSpec(), PruneConfig(method="uncurl", experts=2, calibration_examples=64), progress=False)
    assert any(len(g) > 1 for lp in plan.layers for g in lp.groups)
    ref = apply_plan(load_model(d, task=SST2), plan).state_dict()
    got = load_classifier(stream_apply(d, plan, tmp_path / "m", progress=False)).state_dict()
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_cli_prune_layerwise_writes_what_the_in_memory_prune_writes(checkpoints, tmp_path):
    from safetensors.torch import load_file

    d = checkpoints["mixtral"]
    outs = {}
    for flag in ("--in-memory", "--layerwise"):
        out = tmp_path / flag.strip("-")
        res = cli(["prune", "--model", str(d), "--experts", "1", "--calibration-examples", "48", "--recovery-steps",
                   "0", flag, "--out", str(out)])
        assert ("layer-wise" in res.output) == (flag == "--layerwise")
        outs[flag] = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
        info = json.loads((out / "edgeprune_prune.json").read_text())
        assert info["calibration"]["path"] == ("layer-wise" if flag == "--layerwise" else "in memory")
    a, b = outs.values()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_memory_estimate_refuses_a_cap_that_is_too_small_before_loading_anything(checkpoints, tmp_path,
                                                                                    monkeypatch):
    import edgeprune.pruning.pipeline as pipeline
    import edgeprune.pruning.layerwise as layerwise

    def boom(*a, **k):
        raise AssertionError("loaded the model")

    monkeypatch.setattr(pipeline, "load_model", boom)
    monkeypatch.setattr(layerwise, "skeleton", boom)
    res = cli(["score", "--model", str(checkpoints["mixtral"]), "--experts", "2", "--max-memory", "0.01",
               "--out", str(tmp_path / "p.json")], code=2)
    assert "even layer by layer" in res.output and "--max-memory 0.01 GB" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "p.json").exists()
    res = cli(["score", "--model", str(checkpoints["mixtral"]), "--experts", "2", "--in-memory", "--max-memory",
               "0.01", "--out", str(tmp_path / "p.json")], code=2)
    assert "--in-memory needs" in res.output


def test_the_estimate_chooses_layerwise_when_in_memory_would_not_fit(checkpoints):
    est = memory.estimate(checkpoints["mixtral"], 1, 128, 1024)
    assert est.checkpoint > est.largest_layer > 0 and est.pruned < est.checkpoint
    cap_gb = (est.layerwise_min + est.hidden // 2) / memory.GB
    assert est.in_memory > est.layerwise_min
    layerwise, keep, why = memory.choose_path(est, None, cap_gb)
    if est.in_memory <= cap_gb * memory.GB:  # (tiny model: the working set dominates) the in-memory path fits
        assert not layerwise
    else:
        assert layerwise and 0 < keep < est.hidden and "go to disk" in why
    layerwise, keep, why = memory.choose_path(est, True, 1000.0)
    assert layerwise and keep == est.hidden and "--layerwise" in why


def test_an_export_that_cannot_fit_is_refused_before_pruning(checkpoints, tmp_path, monkeypatch):
    """The artifact over ONNX's 2 GB file limit, or a large export's quantizer above --max-memory, is refused from
    the checkpoint's headers (check_export), and by the build before its prune stage."""
    from edgeprune.errors import ConfigError
    from edgeprune.export import onnx_export

    est = memory.estimate(checkpoints["mixtral"], 2, 128, 64)
    memory.check_export(est, "int8-dynamic", 0.01, large_bytes=est.pruned)  # not a large export: not bounded here
    big = memory.MemoryEstimate(**{**est.__dict__, "pruned": 9 * memory.GB})
    with pytest.raises(ConfigError, match=r"the int8-dynamic artifact would be ~2.25 GB \(9.00 GB of pruned weights\), "
                                          r"over ONNX's 2 GB limit for one file; keep fewer experts"):
        memory.check_export(big, "int8-dynamic", None, 0)
    four = memory.MemoryEstimate(**{**est.__dict__, "pruned": 4 * memory.GB, "largest_tensor": 0})
    memory.check_export(four, "int8-dynamic", 1.7, 0)  # 0.6 working set + 1 GB of int8 weights
    with pytest.raises(ConfigError, match=r"the export would need ~1.60 GB \(the int8-dynamic weights 1.00 GB held by "
                                          r"the quantizer \+ working set\), more than --max-memory 1.5 GB"):
        memory.check_export(four, "int8-dynamic", 1.5, 0)

    def boom(*a, **k):
        raise AssertionError("pruned")

    import edgeprune.pruning.pipeline as pipeline

    monkeypatch.setattr(onnx_export, "LARGE_BYTES", 0)
    monkeypatch.setattr(memory, "ONNX_FILE_LIMIT", 1)  # any artifact is over it
    monkeypatch.setattr(pipeline, "prune", boom)
    res = cli(["build", "--model", str(checkpoints["mixtral"]), "--experts", "2", "--target", "x86_64", "--out",
               str(tmp_path / "art")], code=2)
    assert "over ONNX's 2 GB limit for one file" in res.output and not (tmp_path / "art").exists()


def test_layerwise_refuses_what_it_cannot_do_in_one_line(tmp_path, tiny_tokenizer):
    tok, vocab = tiny_tokenizer
    for family, what in (("switch_transformers", "encoder-decoder"),):
        d = tmp_path / family
        tiny_family_checkpoint(family, vocab=vocab).save_pretrained(d)
        tok.save_pretrained(d)
        res = cli(["score", "--model", str(d), "--experts", "2", "--layerwise", "--verbalisers", "bad,good",
                   "--out", str(tmp_path / "p.json")], code=4)
        assert what in res.output and "--layerwise" in res.output
    with pytest.raises(ConfigError, match="one-shot method"):
        PruneConfig(method="chen2022-progressive", experts=1, recovery_steps=100, layerwise=True).validate()


def test_torchrun_with_two_processes_gives_the_plan_of_one(checkpoints, tmp_path):
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not on PATH")
    d = checkpoints["gpt_oss"]
    args = ["score", "--model", str(d), "--method", "uncurl", "--experts", "2", "--calibration-examples", "200"]
    cli(args + ["--out", str(tmp_path / "one.json")])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    for flag in ("--in-memory", "--layerwise"):
        res = subprocess.run(["torchrun", "--no-python", "--nproc_per_node", "2", "--master_port", "29517",
                              "edgeprune"] + args + [flag, "--out", str(tmp_path / "two.json")],
                             capture_output=True, text=True, env=env, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        assert (tmp_path / "two.json").read_text() == (tmp_path / "one.json").read_text()


def test_torchrun_prune_recovers_data_parallel_under_accelerate_and_rank_0_writes(checkpoints, tmp_path):
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not on PATH")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = tmp_path / "pruned"
    res = subprocess.run(["torchrun", "--no-python", "--nproc_per_node", "2", "--master_port", "29518", "edgeprune",
                          "prune", "--model", str(checkpoints["mixtral"]), "--experts", "1", "--calibration-examples",
                          "64", "--recovery-steps", "4", "--layerwise", "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    info = json.loads((out / "edgeprune_prune.json").read_text())
    assert info["calibration"]["processes"] == 2 and info["recovery"]["processes"] == 2
    assert res.stdout.count("checkpoint:") == 1  # one writer
    from edgeprune.models.registry import load_classifier

    assert load_classifier(out).config.model_type == "mistral"


def test_a_layerwise_build_of_a_language_model_validates_against_layerwise_logits(checkpoints, tmp_path, cache,
                                                                                 loose_targets):
    out = tmp_path / "art"
    res = cli(["build", "--model", str(checkpoints["olmoe"]), "--target", "x86_64", "--experts", "1", "--layerwise",
               "--verbalisers", "bad,good", "--calibration-examples", "48", "--recovery-steps", "2", "--eval-examples",
               "40", "--latency-iters", "5", "--out", str(out)])
    assert "original: layer-wise (--layerwise)" in res.output
    report = json.loads((out / "report.json").read_text())
    assert report["original_memory"]["path"] == "layer-wise" and report["speed"]["p50_speedup"] is None
    assert report["prune"]["calibration"]["path"] == "layer-wise" and "labels only" in report["prune"]["teacher"]
    assert "not timed" in (out / "report.md").read_text()


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe"])
def test_layerwise_logits_equal_the_in_memory_ones(family, checkpoints):
    """What a layer-wise build validates against: the original's logits, layer by layer (exactly, 0 tolerance)."""
    from edgeprune.models.label_words import of_model
    from edgeprune.pruning.layerwise import logits_layerwise, skeleton
    from edgeprune.validate.classifier import original_logits

    d = checkpoints[family]
    words = WORDS if family in LMS else None
    model = load_model(d, task=SST2, verbalisers=words)
    enc = encode(DataSpec().load(SST2, "validation", limit=90), load_tokenizer(d), SST2.max_length, of_model(model))
    got = logits_layerwise(d, enc, progress=False, max_hidden_bytes=10_000,
                           model=skeleton(d, task=SST2, verbalisers=words))
    assert np.array_equal(original_logits(model, enc), got)


def test_torchrun_fsdp_recovery_gives_the_ddp_weights(checkpoints, tmp_path):
    """--fsdp shards the recovery (FSDP2 on CPUs over gloo); the same global batches give the weights DDP gives."""
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not on PATH")
    from safetensors.torch import load_file

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    outs = {}
    for port, flag in ((29521, []), (29522, ["--fsdp"])):
        out = tmp_path / ("fsdp" if flag else "ddp")
        res = subprocess.run(["torchrun", "--no-python", "--nproc_per_node", "2", "--master_port", str(port),
                              "edgeprune", "prune", "--model", str(checkpoints["mixtral"]), "--experts", "1",
                              "--calibration-examples", "64", "--recovery-steps", "3", "--in-memory", *flag,
                              "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        assert res.stdout.count("checkpoint:") == 1
        outs[bool(flag)] = out
    info = json.loads((outs[True] / "edgeprune_prune.json").read_text())["recovery"]
    assert info["processes"] == 2 and info["parallel"] == "fsdp"
    assert json.loads((outs[False] / "edgeprune_prune.json").read_text())["recovery"]["parallel"] == "ddp"
    a, b = (load_file(str(outs[k] / "model.safetensors")) for k in (False, True))
    assert a.keys() == b.keys()
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) < 1e-5


def test_fsdp_needs_torchrun_and_recovery(checkpoints, tmp_path):
    res = cli(["prune", "--model", str(checkpoints["mixtral"]), "--experts", "1", "--calibration-examples", "32",
               "--recovery-steps", "2", "--fsdp", "--in-memory", "--out", str(tmp_path / "p")], code=2)
    assert "--fsdp shards the recovery over the processes of torchrun" in res.output
    res = cli(["prune", "--model", str(checkpoints["mixtral"]), "--recovery-steps", "0", "--fsdp", "--out",
               str(tmp_path / "p")], code=2)
    assert "--recovery-steps is 0; drop --fsdp" in res.output
