"""The report (``report.md``) and model card (``README.md``) of a decoder artifact (``build --generate``)."""
from __future__ import annotations

from edgeprune.validate.report import stage_lines


def _table(v: dict, sizes: dict) -> list[str]:
    cols = ("perplexity", "perplexity_ratio", "next_token_agreement", "greedy_exact", "greedy_prefix",
            "label_accuracy", "ttft_ms", "decode_tokens_per_s", "decode_speedup")
    rows = ["| model | MB | " + " | ".join(c.replace("_", " ") for c in cols) + " |",
            "|---|---|" + "---|" * len(cols)]
    for name, m in v["models"].items():
        if name == "artifact":
            continue
        rows.append(f"| {name} | {sizes.get(name, '')} | " + " | ".join(str(m.get(c, "")) for c in cols) + " |")
    return rows


def experts_line(r: dict) -> list[str]:
    """How a k > 1 decoder holds its experts, and the target setting that chose it; empty where no routed expert
    is left in the graph (k = 1, folded)."""
    exporter = r["export"]["exporter"]
    in_variant = {v.get("experts") for v in (r["export"].get("variants") or {}).values()} - {None}
    if "ort_moe" in exporter or in_variant:
        how = "; ".join(sorted(in_variant)) or "com.microsoft.MoE, fp32 expert weights"
        how = f"in ONNX Runtime's MoE operator (fp32 graph: com.microsoft.MoE; variants: {how})"
    elif "dense_dispatch" in exporter:
        how = "dense dispatch: every kept expert as MatMulNBits pairs, combined by the routing weights"
    else:
        return []
    op = r["weights"].get("moe_operator", "auto")
    tk, fixed = r["export"].get("top_k"), r["export"].get("top_k_fixed")
    run_time = ([f"Top-k at run time: the routers read their top-k from the input `top_k` (default {tk['default']}, "
                 f"1..{tk['max']}): `EdgeLM(DIR, top_k=k)`, `edgeprune generate DIR --top-k k`; the rows "
                 f"\"{r['weights']['weights']} top-k k\" above are the artifact's graph at that k.", ""] if tk else
                [f"Top-k fixed in the graph: {fixed}.", ""] if fixed else [])
    return run_time + [f"Experts: {how} (target {r['target']}: `[generate].moe_operator = \"{op}\"`; dense dispatch and QMoE "
            "decoding measured side by side in results/moe_operators_lm.md).", ""]


def report_markdown(r: dict) -> str:
    v = r["validation"]
    sizes = {"original": r["size"]["original_mb"], **r["size"]["graphs_mb"]}
    lines = [f"# edgeprune generation build: {r['task']} / {r['target']}", "",
             f"Original: `{r['original']}` ({r['size']['original_mb']} MB); artifact graph: {r['weights']['weights']} "
             f"({r['size']['artifact_mb']} MB, {r['size']['size_ratio']}x smaller). Plan: k per layer "
             f"{r['plan'].get('k_per_layer')}; {r['prune'].get('generate', {}).get('class', '')}; recovery: "
             f"{r['prune'].get('recovery', {}).get('steps', 0)} steps.", "",
             f"Validation: {v['examples']} examples ({v['completion_tokens']} completion tokens), greedy agreement on "
             f"{v['greedy_prompts']} prompts x {v['new_tokens']} tokens, speed at batch 1, {v['threads']} thread(s), "
             f"{v['speed_prompt_tokens']}-token prompt (" + ("the original computed one layer at a time from its "
                                                               "checkpoint, not timed" if "original_speed" in v
                                                               else "the original in PyTorch with its cache")
             + ", the graphs in ONNX Runtime with theirs; the build host is a proxy for the device).", "",
             *_table(v, sizes), "",
             f"Parity (fp32 graph vs PyTorch): greedy tokens equal on {r['export']['parity']['prompts']} prompts, "
             f"{'logits' if 'how' in r['export']['parity'] else 'first-step logits'} within "
             f"{r['export']['parity']['max_abs_logit_diff']:.2e} (tolerance {r['export']['parity']['atol']}"
             + (f"; {r['export']['parity']['how']}" if "how" in r['export']['parity'] else "") + ").", "",
             *experts_line(r),
             *([f"Original: {v['original_speed']}."] if "original_speed" in v else []),
             "Peak memory of a process that loads the graph and generates: " +
             ", ".join(f"{p} {m.get('peak_mb', m.get('error'))} MB" for p, m in r["memory"].items()) + ".", "",
             "Budgets: " + (", ".join(f"{k} = {b}" for k, b in r["budgets"].items() if b is not None) or "none") + ".",
             "", ("Violations:\n" + "\n".join(f"- {x}" for x in r["violations"])) if r["violations"]
             else "All budgets hold.", "", f"Data: {r['data']['note']}.", ""]
    return "\n".join(lines + stage_lines(r) + [""])


def model_card(r: dict, manifest: dict) -> str:
    art = r["validation"]["models"]["artifact"]
    return "\n".join([
        "---", "library_name: onnxruntime", "pipeline_tag: text-generation", "tags: [edgeprune, onnx, kv-cache]", "---",
        f"# {r['task']} language model for {r['target']} (edgeprune)", "",
        f"Pruned from `{r['original']}` by edgeprune (task {r['task']}), exported with a KV cache, weights "
        f"{manifest['precision']} ({manifest['model_file']}).", "",
        f"- perplexity on the validation completions {art['perplexity']} (original {r['validation']['models']['original']['perplexity']})",
        f"- next-token agreement with the original {art['next_token_agreement']}; greedy continuations equal on "
        f"{art['greedy_exact']:.0%} of the prompts",
        f"- decode {art['decode_tokens_per_s']} tokens/s ("
        + (f"{art['decode_speedup']}x the original" if "decode_speedup" in art else "the original's not measured")
        + "), first token "
        f"{art['ttft_ms']} ms; {r['size']['artifact_mb']} MB ({r['size']['size_ratio']}x smaller)", "",
        "Use it without PyTorch:", "", "```python", "from edgeprune.runtime import EdgeLM",
        "lm = EdgeLM('.')  # onnxruntime + tokenizers + numpy",
        "print(lm.generate('...', max_new_tokens=32, temperature=0.7, top_p=0.9, stop=['\\n']))", "```", "",
        "Or `edgeprune generate . \"prompt\"`. See report.md for every measurement.", ""])
