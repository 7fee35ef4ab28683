"""End-to-end builds on a tiny MoE (seconds each): every target, parity, budgets, atomicity, bad input."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from edgeprune.cli import main
from edgeprune.targets import load_target

FAST = ["--calibration-examples", "64", "--recovery-steps", "4", "--eval-examples", "48", "--latency-iters", "5"]


def onnx_file(out):
    """The artifact's ONNX file, where its manifest says (onnx/model_quantized.onnx for int8)."""
    from edgeprune.runtime.layout import model_file

    return model_file(out, json.loads((out / "edgeprune.json").read_text()))


def run(args, code=0):
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == code, res.output
    return res


@pytest.mark.parametrize("target,k", [("x86_64", 1), ("arm64", 2), ("mobile-gpu", 1)])
def test_build_end_to_end(tmp_path, cache, tiny_original, loose_targets, target, k):
    out = tmp_path / "art"
    res = run(["build", "--model", str(tiny_original), "--target", target, "--experts", str(k), "--out", str(out)]
              + FAST)
    assert f"artifact: {out}" in res.output
    for f in ("tokenizer.json", "tokenizer_config.json", "config.json", "edgeprune.json", "report.json", "report.md",
              "README.md", "demo/index.html"):
        assert (out / f).is_file(), f
    assert onnx_file(out).is_file() and onnx_file(out).parent.name == "onnx"
    t = load_target(target)
    assert (out / "model.ort").is_file() == t.runtime.ort_format
    manifest = json.loads((out / "edgeprune.json").read_text())
    assert manifest["labels"] == ["negative", "positive"] and manifest["target"] == target
    assert manifest["prune_plan"]["folded"] == (k == 1)
    report = json.loads((out / "report.json").read_text())
    assert report["export"]["parity_fp32"]["max_abs_logit_diff"] < 1e-3
    assert report["export"]["exporter"] == ("torch.onnx" if k == 1 else "torch.onnx+dense_dispatch")
    assert report["speed"]["p50_speedup"] > 0 and report["memory"]["peak_rss_mb"] > 0
    assert [r["stage"] for r in report["stages"]] == ["prepare", "prune", "export", "validate"]
    assert all(r["seconds"] >= 0 and r["peak_gib"] > 0 for r in report["stages"]) and "## Stages" in \
        (out / "report.md").read_text()
    if t.runtime.mobile_usability:
        assert "nnapi_or_coreml_may_work" in report["export"]["mobile_usability"]
    run(["check", str(out)])
    res = run(["predict", str(out), "a gorgeous film", "", "ünïcödé ☃ " * 200])
    assert len(res.output.strip().splitlines()) == 3
    # rebuilding reuses the prune and export stages
    res = run(["build", "--model", str(tiny_original), "--target", target, "--experts", str(k), "--out", str(out)]
              + FAST)
    assert "prune: reusing" in res.output and "export: reusing" in res.output


def test_build_with_slimmed_ffn(tmp_path, cache, tiny_original, loose_targets):
    """--ffn-keep 0.5: the folded FFNs keep half their neurons, export and parity hold, the report says so."""
    out = tmp_path / "art"
    res = run(["build", "--model", str(tiny_original), "--target", "x86_64", "--ffn-keep", "0.5", "--out", str(out)]
              + FAST)
    assert "neuron saliency" in res.output or f"artifact: {out}" in res.output
    report = json.loads((out / "report.json").read_text())
    assert report["prune"]["ffn"]["intermediate_size"] == [64, 32]
    assert report["export"]["parity_fp32"]["max_abs_logit_diff"] < 1e-3
    assert json.loads((out / "edgeprune.json").read_text())["ffn_width"] == [64, 32]
    assert "FFN width 64 -> 32 (--ffn-keep 0.5)" in (out / "report.md").read_text()
    assert "FFN width 64 -> 32" in (out / "README.md").read_text()
    res = run(["predict", str(out), "a gorgeous film"])
    assert res.output.split("\t")[0] in ("negative", "positive")


def test_budgets_fail_and_keep_previous_artifact(tmp_path, cache, tiny_original, loose_targets):
    out = tmp_path / "art"
    run(["build", "--model", str(tiny_original), "--target", "x86_64", "--out", str(out)] + FAST)
    before = (out / "report.json").read_bytes()
    strict = tmp_path / "strict.toml"
    strict.write_text((loose_targets / "x86_64.toml").read_text().replace("max_size_mb = 30.0", "max_size_mb = 0.001"))
    res = CliRunner().invoke(main, ["build", "--model", str(tiny_original), "--target", str(strict), "--out", str(out)]
                             + FAST)
    assert res.exit_code == 1
    assert "exceeds the budget of 0.001 MB" in res.output
    assert (out / "report.json").read_bytes() == before
    assert (tmp_path / "art.rejected" / "report.json").is_file()
    res = CliRunner().invoke(main, ["check", str(out), "--max-size-mb", "0.001", "--max-p95-latency-ms", "0.0001"])
    assert res.exit_code == 1
    assert "budget violated: size" in res.output and "p95 latency" in res.output
    assert len([l for l in res.output.splitlines() if l.startswith("budget violated")]) == 2
    run(["check", str(out), "--budget", str(loose_targets / "x86_64.toml")])


def test_parity_check_fails_on_corrupted_weight(tmp_path, tiny_original):
    import torch
    from transformers import AutoModelForSequenceClassification

    from edgeprune.errors import ExportError
    from edgeprune.export.onnx_export import export_onnx, parity
    from edgeprune.tasks.encoding import Encoded

    model = AutoModelForSequenceClassification.from_pretrained(tiny_original).eval()
    target = load_target("x86_64")
    export_onnx(model, tiny_original, tmp_path / "m.onnx", target)
    rng = np.random.default_rng(0)
    ids = [[2] + rng.integers(5, 100, 8).tolist() + [3] for _ in range(16)]
    enc = Encoded(ids, [[0] * 10] * 16, [0] * 16)
    assert parity(tmp_path / "m.onnx", model, enc)["max_abs_logit_diff"] < 1e-4
    with torch.no_grad():
        model.classifier.weight.add_(1.0)  # the PyTorch side changes: the exported graph no longer matches
    with pytest.raises(ExportError, match="ONNX export lost parity with PyTorch on 16 task examples"):
        parity(tmp_path / "m.onnx", model, enc)


def test_killed_build_leaves_previous_artifact(tmp_path, cache, tiny_original, loose_targets):
    out = tmp_path / "art"
    run(["build", "--model", str(tiny_original), "--target", "x86_64", "--out", str(out)] + FAST)
    before = {f.relative_to(out): f.read_bytes() for f in out.rglob("*") if f.is_file()}
    env = dict(os.environ, EDGEPRUNE_CACHE=str(tmp_path / "other-cache"))
    proc = subprocess.Popen([sys.executable, "-m", "edgeprune.cli", "build", "--model", str(tiny_original),
                             "--target", "x86_64", "--experts", "2", "--out", str(out), "--recovery-steps", "100000"]
                            + FAST[:2] + FAST[4:], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for line in proc.stdout:  # kill it while it is recovering
        if b"prune:" in line:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert {f.relative_to(out): f.read_bytes() for f in out.rglob("*") if f.is_file()} == before


@pytest.mark.parametrize("args,code,message", [
    (["--target", "riscv"], 2, "unknown target 'riscv'; known: arm64, mobile-gpu, web, x86_64"),
    (["--experts", "0"], 2, "--experts must be >= 1, got 0"),
    (["--experts", "9"], 2, "layer 1: k=9 experts but the layer has only Z=4"),
    (["--task", "agnews"], 2, "the model has 2 labels but task agnews has 4"),
    (["--task", "completion"], 3, "task completion ships no data; pass --train-file"),
    (["--plan", "nope.json"], 2, "nope.json: plan file not found"),
    (["--experts", "2", "--ffn-keep", "0.5"], 2,
     "--ffn-keep prunes neurons of the folded dense FFN: use it with --experts 1"),
    (["--method", "chen2022-eager", "--ffn-keep", "0.5"], 2, "--ffn-keep needs a one-shot method"),
])
def test_bad_input_one_line_error(tmp_path, cache, tiny_original, loose_targets, args, code, message):
    res = CliRunner().invoke(main, ["build", "--model", str(tiny_original), "--out", str(tmp_path / "o")] + FAST + args)
    assert res.exit_code == code, res.output
    assert res.output.strip() == f"error: {message}" or message in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_bad_target_fields(tmp_path):
    from edgeprune.errors import ConfigError

    bad = tmp_path / "t.toml"
    bad.write_text('[quantization]\nprecision = "int4"\n')
    with pytest.raises(ConfigError, match=r"t.toml: \[quantization\].precision 'int4' is not one of"):
        load_target(str(bad))
    bad.write_text('[runtime]\nthreads = "two"\n')
    with pytest.raises(ConfigError, match=r"t.toml: \[runtime\].threads = 'two' should be int"):
        load_target(str(bad))
    bad.write_text('[budgets]\nmax_size = 3\n')
    with pytest.raises(ConfigError, match=r"t.toml: unknown field \[budgets\].max_size"):
        load_target(str(bad))
    with pytest.raises(ConfigError, match="missing.toml: target profile not found"):
        load_target(str(tmp_path / "missing.toml"))


def test_static_qdq_target(tmp_path, cache, tiny_original, loose_targets):
    custom = tmp_path / "static.toml"
    text = (loose_targets / "x86_64.toml").read_text().replace('precision = "int8-dynamic"', 'precision = "int8-static"')
    text = text.replace("embedding_bits = 4", "embedding_bits = 8")  # 4 bits go with int8-dynamic only
    custom.write_text(text.replace("fuse = true", "fuse = false"))
    out = tmp_path / "art"
    run(["build", "--model", str(tiny_original), "--target", str(custom), "--out", str(out)] + FAST)
    import onnx

    ops = {n.op_type for n in onnx.load(str(onnx_file(out))).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    report = json.loads((out / "report.json").read_text())
    assert report["export"]["quantization"]["precision"] == "int8-static"


def test_unfused_layer_norm_and_fast_gelu_target(tmp_path, cache, tiny_original, loose_targets):
    """The CPU profiles set skip_layer_norm = false (Add + LayerNormalization stay in the graph and every session:
    validation, memory probe, EdgeModel, disables ORT's SkipLayerNormFusion) and gelu_approximation = true
    (FastGelu); a profile that sets them back gets the fully fused graph."""
    out = tmp_path / "art"
    run(["build", "--model", str(tiny_original), "--target", str(loose_targets / "x86_64.toml"), "--out", str(out)]
        + FAST)
    import onnx

    from edgeprune.export.quantize import disabled_optimizers
    from edgeprune.runtime import EdgeModel

    ops = {n.op_type for n in onnx.load(str(onnx_file(out))).graph.node}
    assert "LayerNormalization" in ops and "SkipLayerNormalization" not in ops and "FastGelu" in ops
    assert disabled_optimizers(onnx_file(out)) == ["SkipLayerNormFusion"]
    assert json.loads((out / "edgeprune.json").read_text())["ort_disabled_optimizers"] == ["SkipLayerNormFusion"]
    assert EdgeModel(out).disabled_optimizers == ["SkipLayerNormFusion"]
    report = json.loads((out / "report.json").read_text())
    assert report["export"]["ort_disabled_optimizers"] == ["SkipLayerNormFusion"] and report["memory"]["peak_rss_mb"] > 0
    import onnxruntime as ort

    from edgeprune.export.quantize import numpy_inputs

    model = EdgeModel(out)
    feeds = numpy_inputs(model.input_names, 2, 12, vocab_size=100)
    refused = ort.InferenceSession(str(onnx_file(out)), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(model.session.run(None, feeds)[0], refused.run(None, feeds)[0], atol=1e-4)

    fused = tmp_path / "fused.toml"
    unfused_text = (loose_targets / "x86_64.toml").read_text()
    assert "skip_layer_norm = false" in unfused_text and "gelu_approximation = true" in unfused_text
    fused.write_text(unfused_text.replace("skip_layer_norm = false", "skip_layer_norm = true")
                     .replace("gelu_approximation = true", "gelu_approximation = false"))
    out_fused = tmp_path / "fused"
    run(["build", "--model", str(tiny_original), "--target", str(fused), "--out", str(out_fused)] + FAST)
    ops = {n.op_type for n in onnx.load(str(onnx_file(out_fused))).graph.node}
    assert "SkipLayerNormalization" in ops and "BiasGelu" in ops and "FastGelu" not in ops
    assert disabled_optimizers(onnx_file(out_fused)) == [] and EdgeModel(out_fused).disabled_optimizers == []
    with pytest.raises(Exception, match=r"\[optimization\].skip_layer_norm = 'no' should be bool"):
        bad = tmp_path / "bad.toml"
        bad.write_text(unfused_text.replace("skip_layer_norm = false", 'skip_layer_norm = "no"'))
        load_target(str(bad))


def test_session_memory_is_the_probe_process_not_its_parent(tmp_path):
    """ru_maxrss survives fork + exec on Linux: a large parent must not inflate the app-process peak."""
    import onnx
    from onnx import TensorProto, helper

    from edgeprune.validate.classifier import session_memory

    graph = helper.make_graph([helper.make_node("Cast", ["input_ids"], ["logits"], to=TensorProto.FLOAT)], "g",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq"])])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    ballast = np.ones(600 * 2**20, dtype=np.uint8)  # 600 MB resident in this (parent) process
    mem = session_memory(path)
    assert ballast.sum() > 0
    assert 0 < mem["peak_rss_mb"] < 400, mem


def test_four_bit_embedding_target_option(tmp_path, cache, tiny_original, loose_targets):
    """[quantization] embedding_bits = 4: the word embedding becomes GatherBlockQuantized (4-bit, block 32), the
    linear layers stay int8 dynamic, parity and EdgeModel hold; 4 bits with another precision is refused."""
    import onnx

    from edgeprune.runtime import EdgeModel

    import numpy as np
    import onnxruntime as ort

    profile = loose_targets / "arm64.toml"  # embedding_bits = 4 and the ORT format
    assert "embedding_bits = 4" in profile.read_text() and "ort_format = true" in profile.read_text()
    out = tmp_path / "art"
    run(["build", "--model", str(tiny_original), "--target", str(profile), "--out", str(out)] + FAST)
    graph = onnx.load(str(onnx_file(out))).graph
    ops = {n.op_type for n in graph.node}
    assert "GatherBlockQuantized" in ops and "EmbedLayerNormalization" not in ops
    # stored as packed uint8 (the ORT format has no int4 tensors), and the ORT-format model loads and agrees
    inits = {i.name: i for i in graph.initializer}
    assert all(inits[n.input[0]].data_type == onnx.TensorProto.UINT8 for n in graph.node
               if n.op_type == "GatherBlockQuantized")
    feeds = {"input_ids": np.array([[2, 7, 9, 3]], dtype=np.int64), "attention_mask": np.ones((1, 4), dtype=np.int64),
             "token_type_ids": np.zeros((1, 4), dtype=np.int64)}
    a, b = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (onnx_file(out), out / "model.ort"))
    feeds = {k: v for k, v in feeds.items() if k in {i.name for i in a.get_inputs()}}
    assert np.allclose(a.run(None, feeds)[0], b.run(None, feeds)[0], atol=1e-5)
    assert {"MatMulInteger", "DynamicQuantizeLinear"} & ops or "QAttention" in ops
    report = json.loads((out / "report.json").read_text())
    assert "GatherBlockQuantized" in report["export"]["quantization"]["embedding"]
    assert len(EdgeModel(out).predict(["a gorgeous film", "dull"])) == 2
    bad = tmp_path / "bad.toml"
    bad.write_text('[quantization]\nprecision = "fp16"\nembedding_bits = 4\n')
    res = CliRunner().invoke(main, ["build", "--model", str(tiny_original), "--target", str(bad), "--out",
                                    str(tmp_path / "b")])
    assert res.exit_code == 2 and "embedding_bits = 4 goes with precision int8-dynamic" in res.output


def test_packed_4bit_embedding_is_the_int4_one_bit_for_bit(tmp_path, tiny_original):
    """gather_4bit's uint8 packing (value + 8, two per byte, the operator's default zero point) changes no output."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from edgeprune.export.quantize import gather_4bit, weight_only
    from edgeprune.models.registry import load_classifier

    model = load_classifier(tiny_original)
    x = torch.tensor([[2, 7, 9, 11, 3]])
    src = tmp_path / "fp32.onnx"
    torch.onnx.export(model, (x,), str(src), input_names=["input_ids"], output_names=["logits"], opset_version=17,
                      dynamo=False)
    weight_only(src, tmp_path / "int4.onnx", 4, ("Gather",))
    gather_4bit(src, tmp_path / "packed.onnx")
    feeds = {"input_ids": x.numpy()}
    a, b = (ort.InferenceSession(str(tmp_path / f), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
            for f in ("int4.onnx", "packed.onnx"))
    assert np.array_equal(a, b)
