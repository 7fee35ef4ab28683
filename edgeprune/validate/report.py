"""Human-readable outputs of a build: ``report.md`` (the side-by-side numbers) and the model card
``README.md`` (what the artifact is, how to use it, its limits). Both are rendered from ``report.json``."""
from __future__ import annotations


def _row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _ffn(r: dict) -> str:
    """', FFN width 1536 -> 1152 (--ffn-keep 0.75)' when the folded FFNs were slimmed (and the vocabulary when it
    was pruned), else ''."""
    ffn = r.get("prune", {}).get("ffn")
    out = f", FFN width {ffn['intermediate_size'][0]} -> {ffn['intermediate_size'][1]} (--ffn-keep {ffn['keep']})" if ffn else ""
    depth = r.get("prune", {}).get("depth")
    if depth:
        out += (f", layers {depth['layers'][0]} -> {depth['layers'][1]} (--drop-layers: dropped {depth['dropped']}, "
                "least block influence)")
    heads = r.get("prune", {}).get("heads")
    if heads:
        out += f", attention heads {heads['heads'][0]} -> {heads['heads'][1]} per layer (--heads-keep {heads['keep']})"
    vocab = r.get("prune", {}).get("vocab")
    if vocab:
        out += (f", vocabulary {vocab['of']} -> {vocab['kept']} tokens (--vocab-reserve {vocab['reserve']}; "
                f"{vocab['validation_tokens_resegmented']:.2%} of validation tokens re-segmented)")
    return out


def _faster(ratio) -> str:
    return f"{ratio}x faster" if ratio is not None else "(original not timed)"


def report_markdown(r: dict) -> str:
    q, sp, size, mem = r["quality"], r["speed"], r["size"], r.get("memory", {})
    o, a = sp["original_torch_fp32"], sp["artifact_onnxruntime"]
    lines = [f"# edgeprune report: {r['task']} on {r['target']}", "",
             f"Original: `{r['original']}` (sha256 {r['original_sha256'][:12]}). Plan: {r['plan']['method']}, "
             f"k per layer {r['plan']['k_per_layer']}, folded to dense: {r['plan']['folded']}{_ffn(r)}.", "",
             "## Side by side", "",
             _row("", "original (PyTorch fp32)", "artifact (ONNX Runtime)", "ratio"),
             _row("---", "---", "---", "---"),
             _row(f"accuracy ({q['examples']} validation examples)", q["original_accuracy"], q["artifact_accuracy"],
                  f"drop {q['accuracy_drop_points']} points"),
             _row("prediction agreement", "", q["agreement"], ""),
             _row("size on disk (MB)", size["original_mb"], size["artifact_mb"], f"{size['size_ratio']}x smaller"),
             _row(f"p50 latency, batch {sp['batch']}, {sp['sequence_length']} tokens, {sp['threads']} thread (ms)",
                  o["p50_ms"] or "not timed", a["p50_ms"], _faster(sp["p50_speedup"])),
             _row("p95 latency (ms)", o["p95_ms"] or "not timed", a["p95_ms"], _faster(sp["p95_speedup"]))]
    if sp.get("original_note"):
        lines.append(_row("", sp["original_note"], "", ""))
    if "throughput_ratio" in sp:
        lines.append(_row(f"throughput, batch {sp['throughput_batch']} (examples/s)", sp["original_throughput_per_s"],
                          sp["artifact_throughput_per_s"], f"{sp['throughput_ratio']}x"))
    if "peak_rss_mb" in mem:
        lines.append(_row("peak RSS of an app process running the artifact (MB)", "", mem["peak_rss_mb"],
                          f"{mem['session_mb']} MB above a bare onnxruntime import"))
    lines += ["", f"Latency and memory: {sp['note']}.",
              f"Accuracy is on the task's {r['data']['validation_split']} split ({r['data']['note']}).", ""]
    if r.get("top_k"):
        tk = r["top_k"]
        lines += ["## Top-k at run time", "",
                  f"The routers read their top-k from the input `top_k` (default {tk['default']}): "
                  f"`EdgeModel(DIR, top_k=k)`, `edgeprune predict DIR --top-k k`. Latency at batch {tk['batch']}, "
                  f"{tk['sequence_length']} tokens, {tk['threads']} thread(s), alternating rounds.", "",
                  "| top-k | accuracy | agreement with the original | p50 ms | speed vs default |", "|---|---|---|---|---|"]
        lines += [f"| {row['top_k']}{' (default)' if row['top_k'] == tk['default'] else ''} | {row['accuracy']} | "
                  f"{row['agreement']} | {row['p50_ms']} | {row['speedup_vs_default']}x |" for row in tk["rows"]]
        lines.append("")
    lines += ["## Export", "",
              f"- exporter: {r['export']['exporter']}; parity with PyTorch (fp32 ONNX, "
              f"{r['export']['parity_fp32']['examples']} examples): max logit difference "
              f"{r['export']['parity_fp32']['max_abs_logit_diff']:.2e}, agreement {r['export']['parity_fp32']['agreement']}",
              f"- fusions: {', '.join(r['export']['fusions']) or 'none'}",
              f"- quantization: {r['export']['quantization']}"]
    experts = experts_line(r["export"], r.get("target", ""))
    if experts:
        lines.append(experts)
    if "mobile_usability" in r["export"]:
        mu = r["export"]["mobile_usability"]
        lines += [f"- ORT mobile usability checker: NNAPI or CoreML may work: {mu.get('nnapi_or_coreml_may_work')}"]
        lines += [f"  - {v}" for v in mu.get("verdicts", [])]
    lines += ["", "## Budgets", ""]
    b = r["budgets"]
    lines.append(f"max size {b['max_size_mb']} MB, max p95 {b['max_p95_latency_ms']} ms, max accuracy drop "
                 f"{b['max_accuracy_drop']} points, min agreement {b['min_agreement']}")
    lines.append("")
    lines += ([f"- VIOLATED: {v}" for v in r["violations"]] or ["All budgets hold."])
    lines += stage_lines(r)
    if r.get("search"):
        lines += ["", "## Search", "", "The knobs were chosen by `build --search` (edgeprune search): the candidates and "
                  "the Pareto front are in `search/pareto.md`, the plot in `search/pareto.png`."]
    return "\n".join(lines) + "\n"


def _label_words(m: dict) -> str:
    """A language-model source classifies by label words: say how texts are turned into its input."""
    w = m.get("label_words")
    if not w:
        return ""
    words = ", ".join(f"{l} -> {v!r}" for l, v in zip(m["labels"], w["verbalisers"]))
    return (f"\n- Label words (the source is a language model): each text is rendered into the prompt "
            f"`{w['template']!r}` (truncated on the left) and scored by the next-token logit of {words}; "
            "`EdgeModel` does this itself")


def _js_use(m: dict) -> str:
    """The transformers.js snippet, for artifacts whose model type it classifies."""
    if not m.get("transformers_js"):
        return ""
    arg = '{text: "...", text_pair: "..."}' if m["pair"] else '"some text"'
    return f"""

In JavaScript (a web page or Node) with transformers.js, which reads this folder's config.json, tokenizer.json
and {m.get('model_file', 'onnx/model_quantized.onnx')}; `edgeprune serve DIR` serves demo/index.html:

```js
import {{ pipeline, env }} from "@huggingface/transformers";
env.allowRemoteModels = false; env.localModelPath = "/path/to/the/parent/folder/";
const classify = await pipeline("text-classification", "<this folder's name>");
await classify({arg}, {{ top_k: null }});
```"""


def model_card(r: dict, m: dict) -> str:
    q, sp, size = r["quality"], r["speed"], r["size"]
    pair = "texts, pairs=[...]" if m["pair"] else "texts"
    library = "transformers.js" if m.get("transformers_js") else "onnx"
    return f"""---
library_name: {library}
pipeline_tag: text-classification
tags: [onnx, edgeprune, {m['target']}]
---

# {m['task']} classifier for {m['target']} (edgeprune)

A task-pruned {'dense' if r['plan']['folded'] else 'Mixture-of-Experts'} transformer in ONNX
({m['precision']}), made by edgeprune from the MoE checkpoint `{m['source_checkpoint']}`
(sha256 {m['source_sha256'][:12]}) with the plan {r['plan']['method']}, k per MoE layer {r['plan']['k_per_layer']}{_ffn(r)}.

- Labels, in output order: {', '.join(m['labels'])}
- Inputs: {', '.join(m['input_names'])} (int64), at most {m['max_length']} tokens{', fixed shape ' + str(m['fixed_shape']) if m['fixed_shape'] else ''}{_label_words(m)}
- Files: {', '.join(m['files'])}, config.json, tokenizer.json, edgeprune.json (manifest), report.json / report.md, demo/index.html

## Use

```python
from edgeprune.runtime import EdgeModel   # needs only onnxruntime, tokenizers, numpy
model = EdgeModel("path/to/this/directory")
model.predict({pair})        # label names
model.predict_proba({pair})  # probabilities, columns in label order
```

or `edgeprune predict DIR "some text"`.{_js_use(m)}

## Quality and cost (validation split, build host)

| | original | this model |
| --- | --- | --- |
| accuracy | {q['original_accuracy']} | {q['artifact_accuracy']} |
| agreement with the original | | {q['agreement']} |
| size (MB) | {size['original_mb']} | {size['artifact_mb']} |
| p50 latency, batch {sp['batch']}, {sp['sequence_length']} tokens (ms) | {sp['original_torch_fp32']['p50_ms'] or 'not timed'} | {sp['artifact_onnxruntime']['p50_ms']} |

## Limitations

- Accuracy is measured on the {r.get('data', {}).get('note', "task's validation split; not a held-out test set")}.
- Latency is the build host's ({sp['threads']} thread): a proxy for the device; the ratios carry over better.
- Inputs longer than {m['max_length']} tokens are truncated.
- Built with: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}.
"""


def stage_lines(r: dict) -> list[str]:
    """The build's stages: wall time and the process's peak resident memory in each (``report["stages"]``)."""
    if not r.get("stages"):
        return []
    rows = ["", "## Stages", "", "Wall time and peak resident memory (VmHWM, reset at each stage) of the build process. "
            "A stage found in the cache takes seconds.", "",
            "| stage | seconds | peak GiB | resident at start GiB |", "|---|---|---|---|"]
    return rows + [f"| {x['stage']} | {x['seconds']} | {x['peak_gib']}{' (process so far)' if x.get('cumulative') else ''}"
                   f" | {x['start_gib']} |" for x in r["stages"]]


def experts_line(export: dict, target: str) -> str:
    """How a k > 1 artifact holds its experts, and the target setting that chose it (measured in
    results/moe_operators.md); empty for a model without routed experts in its graph."""
    exporter = export.get("exporter", "")
    if "ort_moe" in exporter:
        how = export.get("quantization", {}).get("experts") or "com.microsoft.MoE, fp32 expert weights"
    elif "dense_dispatch" in exporter:
        how = "dense dispatch: every kept expert as int8 MatMuls, combined by the routing weights"
    else:
        return ""
    op = export.get("moe_operator", "dense")
    return (f"- experts: {how} (target {target}: `[export].moe_operator = \"{op}\"`; dense dispatch, MoE and "
            "QMoE measured side by side in results/moe_operators.md)")
