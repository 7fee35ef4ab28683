"""``demo/index.html`` in every artifact: a page of a few kilobytes that loads the model from its own folder with
transformers.js (``pipeline('text-classification', ...)``; for text pairs, which that pipeline does not take,
its ``AutoTokenizer`` with ``text_pair`` and ``AutoModelForSequenceClassification``) on ONNX Runtime Web, and shows the label, the
probabilities and the latency of a sentence typed into it. ``edgeprune serve DIR`` serves it on loopback. It runs the
artifact's fp16 variant on WebGPU where the browser has an adapter with ``shader-f16``, else the int8 graph on WASM,
and says which backend ran and why (``window.edgeprune.backend``; ``?device=wasm`` forces WASM).

The library comes from ``../lib/transformers.min.js`` when the server provides one (``edgeprune serve --lib``:
offline, and what the browser tests use; ONNX Runtime Web's WASM files from the same folder), else from jsDelivr at
the version the project tests (``TRANSFORMERS_JS``) with ONNX Runtime Web from where transformers.js 4 takes it. The page also exposes ``window.edgeprune.classify(text, pair)`` for tests.
"""
from __future__ import annotations

import json
from pathlib import Path

TRANSFORMERS_JS = "4.3.2"  # tests/js/package.json pins the same version
CDN = f"https://cdn.jsdelivr.net/npm/@huggingface/transformers@{TRANSFORMERS_JS}/dist/"

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>edgeprune: __TITLE__</title>
<style>
body{font:16px system-ui,sans-serif;max-width:40em;margin:2em auto;padding:0 1em;color:#222}
textarea{width:100%;font:inherit;padding:.4em;box-sizing:border-box}
button{font:inherit;padding:.3em 1.2em;margin:.5em 0}
.row{display:flex;align-items:center;gap:.5em;margin:.2em 0}.name{width:8em}
.bar{height:1em;background:#3b7dd8}#label{font-size:1.4em;font-weight:600}small{color:#666}
</style></head><body>
<h1>__TITLE__</h1>
<p><small>__SUBTITLE__</small></p>
<textarea id="text" rows="3" placeholder="Type a sentence">a gorgeous, witty, seductive movie.</textarea>
<textarea id="pair" rows="2" placeholder="Second text" hidden></textarea>
<button id="go" disabled>Classify</button>
<div id="label"></div><div id="probs"></div>
<p><small id="status">loading the model...</small></p>
<script type="module">
const CDN = "__CDN__";
const M = await (await fetch("../edgeprune.json")).json();
const local = await fetch("../lib/transformers.min.js", {method: "HEAD"}).then(r => r.ok, () => false);
const base = local ? new URL("../lib/", location.href).href : CDN;
const T = await import(base + "transformers.min.js");
T.env.allowRemoteModels = false; T.env.allowLocalModels = true; T.env.useBrowserCache = false;
if (local) T.env.backends.onnx.wasm.wasmPaths = base;  // else transformers.js' own CDN of ONNX Runtime Web
T.env.backends.onnx.wasm.numThreads = M.threads || 1;
const $ = id => document.getElementById(id);
$("pair").hidden = !M.pair;
// WebGPU where the browser has an adapter that computes in fp16 (shader-f16) and the artifact has its fp16 variant;
// otherwise ONNX Runtime Web's WASM backend with the int8 graph. ?device=wasm forces WASM.
let device = "wasm", dtype = "q8", why = "";
if ((M.variants || {}).fp16 && new URLSearchParams(location.search).get("device") !== "wasm") {
  const adapter = navigator.gpu ? await navigator.gpu.requestAdapter().catch(() => null) : null;
  if (!adapter) why = navigator.gpu ? "no WebGPU adapter" : "no WebGPU in this browser";
  else if (!adapter.features.has("shader-f16")) why = "the WebGPU adapter has no shader-f16";
  else { device = "webgpu"; dtype = "fp16"; }
}
const t0 = performance.now();
let clf = null, error = null;
try {
  if (!M.transformers_js) throw new Error(M.model_type + ": transformers.js has no sequence classifier for this model type; use EdgeModel");
  if (M.pair) {  // the text-classification pipeline takes single texts: tokenizer + model for pairs
    const [tok, model] = await Promise.all([T.AutoTokenizer.from_pretrained(".."),
      T.AutoModelForSequenceClassification.from_pretrained("..", {device, dtype})]);
    clf = async (x) => {
      const z = Array.from((await model(tok(x.text, {text_pair: x.text_pair, truncation: true}))).logits.data);
      const e = z.map(v => Math.exp(v - Math.max(...z))), s = e.reduce((a, b) => a + b);
      return e.map((v, i) => ({label: M.labels[i], score: v / s})).sort((a, b) => b.score - a.score);
    };
  } else clf = await T.pipeline("text-classification", "..", {device, dtype});  // the artifact: this page's parent
} catch (e) { error = String(e && e.message || e); }
if (error && device === "webgpu") {  // WebGPU failed: say why and run on WASM
  why = "WebGPU failed: " + error; device = "wasm"; dtype = "q8"; error = null;
  try { clf = await T.pipeline("text-classification", "..", {device, dtype}); }
  catch (e) { error = String(e && e.message || e); }
}
const backend = device === "webgpu" ? "WebGPU, fp16 graph" :
  `WASM, int8 graph, ${T.env.backends.onnx.wasm.numThreads} thread(s)` + (why ? ` (${why})` : "");
const loadMs = performance.now() - t0;
async function classify(text, pair) {
  const s = performance.now();
  const out = await clf(M.pair ? {text, text_pair: pair || ""} : text, {top_k: null});
  const ms = performance.now() - s;
  const scores = Object.fromEntries(out.map(o => [o.label, o.score]));
  return {label: out[0].label, probs: M.labels.map(l => scores[l]), ms};
}
async function show() {
  const r = await classify($("text").value, $("pair").value);
  $("label").textContent = r.label;
  $("probs").innerHTML = M.labels.map((l, i) => `<div class="row"><span class="name">${l}</span>` +
    `<span class="bar" style="width:${(r.probs[i] * 20).toFixed(2)}em"></span>${r.probs[i].toFixed(4)}</div>`).join("");
  $("status").textContent = `${r.ms.toFixed(1)} ms for this text; model loaded in ${loadMs.toFixed(0)} ms ` +
    `(ONNX Runtime Web: ${backend})`;
  return r;
}
window.edgeprune = {manifest: M, loadMs, error, classify, show, backend};
if (error) { $("status").textContent = "cannot load the model: " + error; }
else { $("go").disabled = false; $("go").onclick = show; await show(); }
document.body.dataset.ready = "1";
</script></body></html>
"""


def write_demo(directory: Path, manifest: dict) -> None:
    """Write ``demo/index.html`` for the artifact in ``directory`` described by ``manifest``."""
    title = f"{manifest['task']} ({manifest['target']})"
    subtitle = (f"edgeprune artifact: {', '.join(manifest['labels'])}; {manifest.get('precision', '')} "
                f"ONNX, {manifest.get('model_type', '')} original. Runs in this page with transformers.js.")
    page = (PAGE.replace("__TITLE__", _html(title)).replace("__SUBTITLE__", _html(subtitle))
            .replace("__CDN__", json.dumps(CDN)[1:-1]))
    (directory / "demo").mkdir(exist_ok=True)
    (directory / "demo" / "index.html").write_text(page, encoding="utf-8")


def _html(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
