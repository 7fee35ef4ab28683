"""``--generate`` on a checkpoint that does not fit in memory (issue 26, the causal-LM twin of the whole build):
the language model calibrated one layer at a time gives the in-memory plan bit for bit, and the streamed prune
writes the pruned (k = 1: folded into the sibling's ``...ForCausalLM``) language model tensor for tensor as the
in-memory apply does."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from edgeprune.pruning.config import PruneConfig
from edgeprune.tasks import get_task
from edgeprune.tasks.spec import DataSpec
from tests.test_generation_build import FOLDS_TO, lm_dirs, tiny_causal_lm  # noqa: F401  (the fixture)

FAMILIES = ["mixtral", "qwen3_moe", "deepseek_v3"]


def _cfg(layerwise: bool, k: int = 1, **kw) -> PruneConfig:
    return PruneConfig(**{"generate": True, "recovery_steps": 0, "calibration_examples": 40, "experts": k,
                          "method": "reap", "layerwise": layerwise, **kw})


@pytest.mark.parametrize("family", FAMILIES)
def test_layerwise_language_model_calibration_gives_the_in_memory_plan(family, lm_dirs):
    from edgeprune.pruning.pipeline import score

    task, d = get_task("sst2"), lm_dirs[family]
    info: dict = {}
    lw = score(d, task, DataSpec(), _cfg(True), progress=False, info=info)
    mem = score(d, task, DataSpec(), _cfg(False), progress=False)
    assert info["calibration"]["path"] == "layer-wise"
    assert lw.to_json() == mem.to_json()


@pytest.mark.parametrize("family,k", [("mixtral", 1), ("mixtral", 2), ("qwen3_moe", 1), ("deepseek_v3", 1)])
def test_streamed_language_model_prune_equals_the_in_memory_one(family, k, lm_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    from edgeprune.pruning.apply import apply_plan
    from edgeprune.pruning.pipeline import prune

    task, d = get_task("sst2"), lm_dirs[family]
    streamed, plan, info = prune(d, task, DataSpec(), _cfg(True, k), progress=False)
    streamed.save_pretrained(tmp_path / "s")
    assert info["calibration"]["path"] == "layer-wise" and info["recovery"]["steps"] == 0
    want = apply_plan(AutoModelForCausalLM.from_pretrained(d).eval(), plan)
    assert info["generate"]["class"] == (FOLDS_TO[family] if k == 1 else type(want).__name__)
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "s").eval()
    assert type(got) is type(want)
    written = {}
    for f in (tmp_path / "s").glob("*.safetensors"):
        written.update(load_file(f))
    ref = want.state_dict()
    assert set(written) <= set(ref)
    for key, t in written.items():
        assert torch.equal(t, ref[key]), key
    x = torch.randint(3, 300, (2, 9))
    with torch.no_grad():
        assert torch.equal(got(input_ids=x).logits, want(input_ids=x).logits)


def test_streamed_language_model_recovery_learns_from_the_completions_alone(lm_dirs):
    from edgeprune.pruning.pipeline import prune

    pruned, _plan, info = prune(lm_dirs["mixtral"], get_task("sst2"), DataSpec(), _cfg(True, recovery_steps=4),
                                progress=False)
    assert type(pruned).__name__ == "MistralForCausalLM"
    assert info["recovery"]["steps"] == 4 and "0 * KL" in info["recovery"]["objective"]
    assert "CE on completion tokens" in info["generate"]["recovery"]


def test_layerwise_language_model_refusals_are_one_line(lm_dirs, tmp_path):
    from edgeprune.errors import ConfigError, ModelError
    from edgeprune.pruning.layerwise import skeleton
    from edgeprune.pruning.pipeline import prune

    with pytest.raises(ConfigError, match="fine-tunes the whole original while dropping experts"):
        prune(lm_dirs["mixtral"], get_task("sst2"), DataSpec(), _cfg(True, method="chen2022-progressive", recovery_steps=60),
              progress=False)
    cls_dir = tmp_path / "cls"
    from transformers import MixtralForSequenceClassification

    m = MixtralForSequenceClassification(tiny_causal_lm("mixtral", 300).config)
    m.save_pretrained(cls_dir)
    with pytest.raises(ModelError, match="takes a ...ForCausalLM checkpoint, not MixtralForSequenceClassification"):
        skeleton(cls_dir, lm=True)


def test_the_layerwise_reference_is_the_in_memory_one(lm_dirs):
    """What a decoder artifact is validated against, from the checkpoint one layer at a time: every example's next-
    token log-probabilities, argmax and label logits within 1e-5 of the model in memory, the same greedy tokens."""
    import numpy as np
    from transformers import AutoModelForCausalLM

    from edgeprune.pruning.lm_data import lm_examples, verbaliser_ids
    from edgeprune.validate.decoder_reference import InMemoryReference, LayerwiseReference

    task, d, cfg = get_task("sst2"), lm_dirs["mixtral"], _cfg(True)
    enc = lm_examples(d, task, DataSpec(), cfg, "validation", 12)
    labels = verbaliser_ids(d, task, cfg, DataSpec())
    lw = LayerwiseReference(d, enc, labels, greedy_prompts=4, new_tokens=6, eos=frozenset({2}), progress=False,
                            batch_size=5)
    mem = InMemoryReference(AutoModelForCausalLM.from_pretrained(d).eval())
    for i in range(len(enc)):
        for a, b in zip(lw.row(enc, i, labels), mem.row(enc, i, labels)):
            assert np.abs(np.asarray(a, float) - np.asarray(b, float)).max() < 1e-5
    prompts = [enc.prompt_ids(i) for i in range(4)]
    assert all(lw.greedy(p, 6, {2}) == mem.greedy(p, 6, {2}) for p in prompts)


def test_build_generate_of_a_checkpoint_that_does_not_fit(lm_dirs, tmp_path, cache, monkeypatch):
    """The whole decoder build on the layer-wise path: scored and pruned layer by layer, exported, quantized and
    checked without the model whole (LARGE_BYTES 0 here), validated against the original one layer at a time."""
    import json

    from edgeprune.export import onnx_export
    from tests.test_generation_build import build, gen_targets

    gen_targets(tmp_path, monkeypatch, min_decode_speedup=1000.0)  # relative to a speed that is not measured
    monkeypatch.setattr(onnx_export, "LARGE_BYTES", 0)
    out = tmp_path / "art"
    res = build(lm_dirs["mixtral"], out, "--layerwise", "--experts", "2", "--recovery-steps", "0")
    assert "validated one layer at a time" in res.output and "weights read one at a time" in res.output
    report = json.loads((out / "report.json").read_text())
    manifest = json.loads((out / "edgeprune.json").read_text())
    assert report["original_memory"]["path"] == "layer-wise" and report["prune"]["generate"]["class"] == "MixtralForCausalLM"
    assert manifest["exporter"].startswith("torch.onnx.dynamo (weights read lazily)") and manifest["parity"]["greedy_equal"]
    v = report["validation"]
    assert "fp32" not in v["models"] and "not measured" in v["original_speed"]
    assert 0 <= v["models"]["artifact"]["next_token_agreement"] <= 1 and report["violations"] == []
    assert "Original: not measured" in (out / "report.md").read_text()
    assert "min_decode_speedup not checked" in res.output and "is not checked" in v["original_speed"]


def test_a_layerwise_decoder_export_that_cannot_fit_is_refused_before_pruning(lm_dirs, tmp_path, monkeypatch):
    """The quantizer holds the largest variant's weights: above --max-memory the build stops before its prune stage,
    in one line; a decoder's variants keep external data, so ONNX's one-file limit does not apply."""
    from edgeprune.errors import ConfigError
    from edgeprune.export import onnx_export
    from edgeprune.scale import memory
    import edgeprune.pruning.pipeline as pipeline
    from tests.test_families import cli

    est = memory.estimate(lm_dirs["mixtral"], 1, 128, 64)
    big = memory.MemoryEstimate(**{**est.__dict__, "pruned": 9 * memory.GB, "largest_tensor": 0})
    memory.check_export(big, "int8", None, 0, one_file=False)  # 2.6 GB of int8 weights in external data: no limit
    with pytest.raises(ConfigError, match=r"the export would need ~2.0\d GB \(the int4 weights 1.4\d GB held by the "
                                          r"quantizer \+ working set\), more than --max-memory 1.5 GB"):
        memory.check_export(big, "int4", 1.5, 0, one_file=False)

    def boom(*a, **k):
        raise AssertionError("pruned")

    monkeypatch.setattr(onnx_export, "LARGE_BYTES", 0)
    monkeypatch.setattr(memory, "PRECISION_SHARE", {"int8": 1e6, "int4": 1e6})  # weights far over the cap
    monkeypatch.setattr(pipeline, "prune", boom)
    res = cli(["build", "--generate", "--model", str(lm_dirs["mixtral"]), "--layerwise", "--max-memory", "1",
               "--out", str(tmp_path / "art")], code=2)
    assert "the export would need" in res.output and not (tmp_path / "art").exists()
