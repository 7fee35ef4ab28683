"""The web target and the artifact's Hugging Face / transformers.js layout, the demo page and its server, and the
artifact run by transformers.js in Node (onnxruntime-node) and in headless Chromium (onnxruntime-web, WASM),
compared with EdgeModel on the same texts.

The Node and browser tests need ``npm ci --ignore-scripts --prefix tests/js`` and Debian's ``chromium``
(the README's set-up and ``.ci/run`` install both); they are marked ``web`` and skip with the reason where
those are missing.
"""
import http.client
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgeprune.cli import main
from edgeprune.errors import ConfigError, ModelError
from edgeprune.targets import load_target
from tests.conftest import write_loose_profiles

FAST = ["--calibration-examples", "64", "--recovery-steps", "4", "--eval-examples", "48", "--latency-iters", "5"]
JS = Path(__file__).parent / "js"
# transformers.js 4's dist/ and ONNX Runtime Web's (the WASM binaries transformers.js 4 no longer ships)
LIB = [JS / "node_modules" / "@huggingface" / "transformers" / "dist", JS / "node_modules" / "onnxruntime-web" / "dist"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TEXTS = ["a gorgeous , witty film", "", "the film is dull and the plot is thin . " * 40, "😀 a fun movie 🎬 !",
         "זה סרט נהדר", "فيلم رائع", "it 's not bad at all"]
web = pytest.mark.web
needs_node = pytest.mark.skipif(shutil.which("node") is None or not LIB[0].is_dir(),
                                reason="needs node and `npm ci --ignore-scripts --prefix tests/js`")
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")


def build_web(root: Path, tiny_original: Path, *extra: str):
    """``edgeprune build --target web`` of the tiny MoE into ``root/art``, with the web profile's budgets loosened
    (conftest's write_loose_profiles) and a cache of its own; returns the CLI result and the artifact."""
    tdir = write_loose_profiles(root / "targets", ["web"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEPRUNE_TARGETS", str(tdir))
        mp.setenv("EDGEPRUNE_CACHE", str(root / "cache"))
        res = CliRunner().invoke(main, ["build", "--model", str(tiny_original), "--target", "web", "--vocab-reserve",
                                        "2000", "--out", str(root / "art"), *extra] + FAST, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res, root / "art"


@pytest.fixture(scope="module")
def web_artifact(tmp_path_factory, tiny_original):
    """A tiny MoE built for the web target."""
    res, art = build_web(tmp_path_factory.mktemp("web"), tiny_original)
    assert "preset" not in res.output  # the web profile's own vocabulary preset is the default original's recipe
    return art


def test_web_artifact_has_the_transformers_js_layout(web_artifact):
    art = web_artifact
    manifest = json.loads((art / "edgeprune.json").read_text())
    assert manifest["model_file"] == "onnx/model_quantized.onnx" and (art / manifest["model_file"]).is_file()
    assert manifest["variants"] == {"fp16": "onnx/model_fp16.onnx"} and (art / "onnx" / "model_fp16.onnx").is_file()
    assert manifest["transformers_js"] is True and not (art / "model.ort").exists() and not (art / "model.onnx").exists()
    assert manifest["vocabulary"]["reserve"] == 2000
    config = json.loads((art / "config.json").read_text())
    assert config["model_type"] == "bert" and config["architectures"] == ["BertForSequenceClassification"]
    assert config["id2label"] == {"0": "negative", "1": "positive"} and config["label2id"] == {"negative": 0, "positive": 1}
    assert config["transformers.js_config"] == {"dtype": "q8", "device_config": {"webgpu": {"dtype": "fp16"}}}
    assert json.loads((art / "tokenizer_config.json").read_text())["model_max_length"] == manifest["max_length"]
    page = (art / "demo" / "index.html").read_text()
    assert len(page.encode()) < 8000 and "4.3.2" in page and 'pipeline("text-classification", ".."' in page
    # the fp16 variant: fp16 weights, fp32 inputs / outputs, agreeing with the fp32 graph
    import onnx

    ops = {n.op_type for n in onnx.load(str(art / manifest["model_file"])).graph.node}
    # what the browser test then runs in WASM: transformers.js 4's ORT Web build has no GatherBlockQuantized
    assert "GatherBlockQuantized" not in ops and "MatMulInteger" in ops
    fp16 = onnx.load(str(art / "onnx" / "model_fp16.onnx"))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in fp16.graph.initializer)
    assert fp16.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    report = json.loads((art / "report.json").read_text())
    v = report["export"]["variants"]["fp16"]
    assert v["max_abs_logit_diff_vs_fp32"] < 1e-2 and v["agreement_vs_fp32"] >= 0.97, v
    # transformers' own loaders read the same files (config, tokenizer: what optimum and AutoTokenizer use)
    from transformers import AutoConfig, AutoTokenizer

    assert AutoConfig.from_pretrained(art).id2label == {0: "negative", 1: "positive"}
    tok = AutoTokenizer.from_pretrained(art)
    from edgeprune.runtime import EdgeModel

    model = EdgeModel(art)
    assert tok("a gorgeous film")["input_ids"] == model.tokenizer.encode("a gorgeous film").ids


def test_target_variants_and_preset_are_checked(tmp_path):
    t = load_target("web")
    assert t.export.variants == ["fp16"] and t.prune.vocab_reserve == 2000 and t.quantization.precision == "int8-dynamic"
    bad = tmp_path / "t.toml"
    for body, msg in [('[export]\nvariants = ["int4"]\n', r"\[export\].variants: 'int4' is not one of fp16"),
                      ('[export]\nvariants = "fp16"\n', r"\[export\].variants = 'fp16' should be list"),
                      ('[export]\nvariants = ["fp16"]\n[quantization]\nprecision = "fp16"\n',
                       "variants repeats the precision 'fp16'"),
                      ("[prune]\nvocab_reserve = -1\n", r"\[prune\].vocab_reserve = -1 should be an integer >= 0"),
                      ("[prune]\nvocab_reserve = 2.5\n", r"\[prune\].vocab_reserve = 2.5 should be an integer"),
                      ("[prune]\nexperts = 1\n", r"unknown field \[prune\].experts")]:
        bad.write_text(body)
        with pytest.raises(ConfigError, match=msg):
            load_target(str(bad))


def test_command_line_vocab_reserve_wins_over_the_preset(tmp_path, cache, tiny_original, loose_targets):
    out = tmp_path / "art"
    res = CliRunner().invoke(main, ["build", "--model", str(tiny_original), "--target", "web", "--vocab-reserve", "0",
                                    "--out", str(out)] + FAST, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "preset --vocab-reserve" not in res.output
    assert json.loads((out / "edgeprune.json").read_text())["vocabulary"]["reserve"] == 0
    preset = tmp_path / "preset.toml"
    preset.write_text("[prune]\nvocab_reserve = 2000\n")
    res = CliRunner().invoke(main, ["build", "--model", str(tiny_original), "--target", "web", "--method",
                                    "chen2022-progressive", "--experts", "1", "--preset", str(preset), "--out",
                                    str(tmp_path / "p")] + FAST)
    assert res.exit_code == 2 and res.output.strip() == (
        f"error: --preset {preset}: cannot be applied (chen2022-progressive makes its plan while fine-tuning); drop "
        "--preset or change the options")


def get(url_base: str, path: str) -> tuple[int, dict, bytes]:
    host = url_base.split("//")[1].split("/")[0]
    conn = http.client.HTTPConnection(host, timeout=10)
    conn.request("GET", path)
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return r.status, dict(r.getheaders()), body


def test_serve_gives_the_demo_cross_origin_isolated_and_refuses_bad_input(web_artifact, tmp_path):
    from edgeprune.runtime.serve import server, serve_in_background

    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "transformers.min.js").write_text("export const x = 1;")
    (lib / "ort.wasm").write_bytes(b"\0asm")
    url, stop = serve_in_background(web_artifact, lib=lib)
    try:
        status, headers, body = get(url, "/demo/index.html")
        assert status == 200 and b"transformers.js" in body
        assert headers["Cross-Origin-Opener-Policy"] == "same-origin"
        assert headers["Cross-Origin-Embedder-Policy"] == "require-corp"
        assert get(url, "/edgeprune.json")[0] == 200 and get(url, "/onnx/model_quantized.onnx")[0] == 200
        status, headers, body = get(url, "/lib/transformers.min.js?v=1")
        assert status == 200 and body == b"export const x = 1;" and headers["Content-type"] == "text/javascript"
        assert get(url, "/lib/ort.wasm")[1]["Content-type"] == "application/wasm"
        assert get(url, "/lib/../../../etc/passwd")[0] == 404
        assert get(url, "/lib/%2e%2e/%2e%2e/etc/passwd")[0] == 404
        port = int(url.split(":")[2].split("/")[0])
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port} .*; choose another --port"):
            server(web_artifact, port=port)
    finally:
        stop()
    with pytest.raises(ModelError, match="no edgeprune.json"):
        server(tmp_path)
    with pytest.raises(ConfigError, match="no transformers.min.js there"):
        server(web_artifact, port=0, lib=tmp_path)
    broken = tmp_path / "old"
    shutil.copytree(web_artifact, broken)
    (broken / "demo" / "index.html").unlink()
    res = CliRunner().invoke(main, ["serve", str(broken)])
    assert res.exit_code == 4 and "no demo/index.html" in res.output and "rebuild the artifact" in res.output


def run_js(script: str, *args: str, env: dict | None = None) -> dict:
    res = subprocess.run(["node", str(JS / script), *args], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **(env or {})})
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def compare_with_edgemodel(art: Path, got: dict, atol: float = 1e-4) -> None:
    """Labels equal and probabilities within ``atol`` of EdgeModel's at batch 1 (one text per call, as the page)."""
    from edgeprune.runtime import EdgeModel

    model = EdgeModel(art)
    want = model.predict_proba(TEXTS, batch_size=1)
    probs = np.array([r["probs"] for r in got["results"]])
    assert [r["label"] for r in got["results"]] == [model.labels[i] for i in want.argmax(-1)]
    np.testing.assert_allclose(probs, want, atol=atol)


@web
@needs_node
def test_node_transformers_js_matches_edgemodel(web_artifact, tmp_path):
    (tmp_path / "in.json").write_text(json.dumps({"texts": TEXTS, "pairs": None, "repeat": 1}))
    compare_with_edgemodel(web_artifact, run_js("classify_node.mjs", str(web_artifact), str(tmp_path / "in.json")))


@web
@needs_node
@needs_browser
def test_browser_demo_page_matches_edgemodel(web_artifact, tmp_path):
    from edgeprune.runtime.serve import serve_in_background

    (tmp_path / "in.json").write_text(json.dumps({"texts": TEXTS, "pairs": None, "repeat": 1}))
    url, stop = serve_in_background(web_artifact, lib=LIB)
    try:
        got = run_js("classify_browser.mjs", url, str(tmp_path / "in.json"), str(tmp_path / "shot.png"))
    finally:
        stop()
    compare_with_edgemodel(web_artifact, got)
    assert got["load_ms"] > 0 and got["threads"] == 1
    assert got["backend"].startswith("WASM, int8 graph") and "WebGPU" in got["backend"]  # says why not WebGPU
    assert (tmp_path / "shot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@web
@needs_node
@needs_browser
def test_the_demo_page_takes_webgpu_only_with_fp16_shaders_and_says_why_not(web_artifact, tmp_path):
    """Headless Chromium with WebGPU on: this machine's only adapter is SwiftShader's, which has no shader-f16, so
    the fp16 variant cannot run (transformers.js: "The device (webgpu) does not support fp16"); the page names the
    reason and runs the int8 graph on WASM, with EdgeModel's labels."""
    from edgeprune.runtime.serve import serve_in_background

    (tmp_path / "in.json").write_text(json.dumps({"texts": TEXTS, "pairs": None, "repeat": 1}))
    url, stop = serve_in_background(web_artifact, lib=LIB)
    try:
        got = run_js("classify_browser.mjs", url, str(tmp_path / "in.json"),
                     env={"CHROMIUM_ARGS": "--enable-unsafe-webgpu"})
    finally:
        stop()
    assert got["backend"] in ("WASM, int8 graph, 1 thread(s) (the WebGPU adapter has no shader-f16)",
                              "WebGPU, fp16 graph")  # the latter on a machine whose adapter has fp16 shaders
    compare_with_edgemodel(web_artifact, got, atol=1e-4 if got["backend"].startswith("WASM") else 2e-2)


@web
@needs_node
@needs_browser
def test_browser_demo_page_says_when_transformers_js_cannot_run_the_model(web_artifact, tmp_path):
    """A label-word decoder or an unfolded MoE has no transformers.js classifier: the page says so in one line."""
    art = tmp_path / "art"
    shutil.copytree(web_artifact, art)
    manifest = json.loads((art / "edgeprune.json").read_text())
    manifest.update(transformers_js=False, model_type="bert_moe")
    (art / "edgeprune.json").write_text(json.dumps(manifest))
    (tmp_path / "in.json").write_text(json.dumps({"texts": ["x"], "pairs": None}))
    from edgeprune.runtime.serve import serve_in_background

    url, stop = serve_in_background(art, lib=LIB)
    try:
        res = subprocess.run(["node", str(JS / "classify_browser.mjs"), url, str(tmp_path / "in.json")],
                             capture_output=True, text=True, timeout=300)
    finally:
        stop()
    assert res.returncode != 0
    assert "bert_moe: transformers.js has no sequence classifier for this model type; use EdgeModel" in res.stderr


@web
@needs_node
@needs_browser
def test_pair_task_in_node_and_the_browser_matches_edgemodel(tmp_path, tiny_original):
    """Text pairs (rte): transformers.js' text-classification pipeline takes single texts, so the demo page and
    the Node runner use its AutoTokenizer with text_pair and AutoModelForSequenceClassification; labels and
    probabilities equal EdgeModel's, long pairs truncated alike."""
    from edgeprune.runtime import EdgeModel
    from edgeprune.runtime.serve import serve_in_background

    _, art = build_web(tmp_path, tiny_original, "--task", "rte")
    texts = ["the cat sat on the mat .", "", "a film . " * 60, "😀 it rains"]
    pairs = ["a cat sat .", "nothing", "a movie . " * 60, "זה סרט"]
    (tmp_path / "in.json").write_text(json.dumps({"texts": texts, "pairs": pairs}))
    model = EdgeModel(art)
    want = model.predict_proba(texts, pairs, batch_size=1)
    url, stop = serve_in_background(art, lib=LIB)
    try:
        runs = [run_js("classify_node.mjs", str(art), str(tmp_path / "in.json")),
                run_js("classify_browser.mjs", url, str(tmp_path / "in.json"))]
    finally:
        stop()
    for got in runs:
        probs = np.array([r["probs"] for r in got["results"]])
        assert [r["label"] for r in got["results"]] == [model.labels[i] for i in want.argmax(-1)]
        np.testing.assert_allclose(probs, want, atol=1e-4)


def test_artifacts_from_before_the_onnx_folder_still_load(web_artifact, tmp_path):
    """An artifact built before the transformers.js layout (model.onnx at the top, no model_file) loads as before."""
    from edgeprune.validate.budgets import load_artifact
    from edgeprune.runtime import EdgeModel

    old = tmp_path / "old"
    shutil.copytree(web_artifact, old)
    (old / "onnx" / "model_quantized.onnx").rename(old / "model.onnx")
    manifest = json.loads((old / "edgeprune.json").read_text())
    del manifest["model_file"]
    (old / "edgeprune.json").write_text(json.dumps(manifest))
    np.testing.assert_allclose(EdgeModel(old).logits(TEXTS), EdgeModel(web_artifact).logits(TEXTS), atol=1e-6)
    load_artifact(old)
