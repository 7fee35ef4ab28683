"""``edgeprune build --generate``: a causal-LM MoE -> a small on-device language model, proven against the original.

original LM ─ calibrate on prompt + completion tokens ─ plan ─ prune, fold (k = 1: ``...ForCausalLM``)
            ─ recovery: KL distillation on completion tokens (:mod:`edgeprune.generation.distill`)
            ─ KV-cache ONNX export, parity-gated (:mod:`edgeprune.export.lm_export`)
            ─ int4 / int8 weight-only MatMulNBits + 4-bit embedding, per the target's ``[generate]``
            ─ validation side by side (:mod:`edgeprune.validate_lm`) ─ report, model card, budgets (exit 1)

The stages are cached as in the classifier build (prune and export keyed by their inputs' hashes); the artifact
directory is replaced atomically, and a build whose budgets fail keeps the previous artifact and puts the
rejected one in ``<out>.rejected``.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from edgeprune.cache import atomic_dir, cache_root, dir_sha256, fingerprint, reusable, seal
from edgeprune.errors import ConfigError
from edgeprune.export.genai import write_genai_config
from edgeprune.export.lm_export import FILES, parity, weight_variant, write_decoder


def log(msg: str) -> None:
    print(f"[edgeprune] {msg}", flush=True)


def stage_export(pruned_dir: Path, spec, prompts: list[str], calibration: list[list[int]]) -> Path:
    """The fp32 KV-cache graph (parity-gated) and the target's weight variants, cached by their inputs
    (``calibration``: GPTQ's token sequences)."""
    from edgeprune.pruning.pipeline import load_language_model

    key = fingerprint("export-lm", dir_sha256(pruned_dir), spec.settings(), prompts,
                      calibration if spec.algorithm == "gptq" else None)
    out = cache_root() / "stages" / f"export-lm-{key}"
    if reusable(out, log):
        log(f"export: reusing {out} (files verified)")
        return out
    model = load_language_model(pruned_dir, moe=False)
    with atomic_dir(out) as tmp:
        log(f"export: ONNX with a KV cache ({spec.exporter} exporter)")
        manifest = write_decoder(model, pruned_dir, tmp, exporter=spec.exporter)
        manifest["parity"] = parity(model, tmp, prompts, 8, spec.parity_atol)
        log(f"export: greedy tokens equal on {len(prompts)} prompts, first-step logits within "
            f"{manifest['parity']['max_abs_logit_diff']:.2e}")
        manifest["variants"] = {}
        for precision in spec.precisions():
            if precision == "fp32":
                continue
            log(f"quantize: {precision} weight-only ({spec.algorithm.upper()}, blocks of {spec.block_size}"
                + (", 4-bit embedding)" if spec.embedding_weights == "int4" else ")"))
            algorithm = spec.algorithm if precision == "int4" or spec.algorithm != "gptq" else "rtn"
            manifest["variants"][precision] = weight_variant(tmp, precision, prompts, 8, spec.block_size,
                                                             spec.accuracy_level, algorithm, spec.embedding_weights,
                                                             calibration=calibration, symmetric=spec.symmetric)
        (tmp / "edgeprune.json").write_text(json.dumps(manifest, indent=1))
        seal(tmp)
    return out


def lm_violations(report: dict, spec) -> list[str]:
    """One line per violated ``[generate]`` budget of the artifact's graph."""
    m = report["validation"]["models"]["artifact"]
    out = []
    checks = (("max_size_mb", report["size"]["artifact_mb"], ">", "size {:.2f} MB"),
              ("max_perplexity_ratio", m["perplexity_ratio"], ">", "perplexity {:.4g}x the original's"),
              ("max_quantization_perplexity_ratio", report["validation"].get("quantization_perplexity_ratio"), ">",
               "perplexity {:.4g}x the fp32 graph's"),
              ("min_next_token_agreement", m["next_token_agreement"], "<", "next-token agreement {:.4f}"),
              ("max_label_accuracy_drop", report["validation"].get("label_accuracy_drop_points"), ">",
               "label accuracy drop {:.2f} points"),
              ("min_decode_speedup", m["decode_speedup"], "<", "decode speed {:.2f}x the original's"),
              ("max_ttft_ms", m["ttft_ms"], ">", "time to first token {:.2f} ms"))
    for key, value, op, what in checks:
        limit = getattr(spec, key)
        if limit is None or value is None:
            continue
        if (value > limit) if op == ">" else (value < limit):
            out.append(f"{what.format(value)} {'exceeds' if op == '>' else 'is below'} the budget {key} = {limit}")
    return out


def is_decoder_artifact(directory) -> bool:
    path = Path(directory) / "edgeprune.json"
    try:
        return json.loads(path.read_text()).get("kind") == "causal-lm"
    except (OSError, ValueError, AttributeError):
        return False


def check_decoder(directory, budget_file=None, max_size_mb=None) -> list[str]:
    """``edgeprune check`` of a decoder artifact: its report against the ``[generate]`` budgets it was built with,
    those of ``budget_file``'s ``[generate]`` table instead, and ``max_size_mb``."""
    from dataclasses import replace

    from edgeprune.errors import ModelError
    from edgeprune.export.targets import GenerateSpec, _typed, read_toml

    directory = Path(directory)
    try:
        report = json.loads((directory / "report.json").read_text())
        report["validation"]["models"]["artifact"], report["size"]["artifact_mb"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ModelError(f"{directory / 'report.json'}: missing or without the decoder measurements; rebuild the "
                         "artifact") from None
    if budget_file:
        table = read_toml(Path(budget_file), "budget file").get("generate", {})
        spec = _typed("generate", GenerateSpec, {k: v for k, v in table.items() if GenerateSpec.is_budget(k)},
                      str(budget_file))
    else:
        spec = GenerateSpec(**{k: v for k, v in (report.get("budgets") or {}).items()
                               if k in GenerateSpec.__dataclass_fields__})
    if max_size_mb is not None:
        spec = replace(spec, max_size_mb=max_size_mb)
    return lm_violations(report, spec)


def default_original(cfg) -> Path:
    """Without ``--model``: the decoder original of the task (``edgeprune original --family mixtral``), built on
    first use and cached."""
    from edgeprune.generation.original import ensure_lm_original

    log(f"original: the default decoder MoE for {cfg.task.name} (SmolLM2 upcycled into Mixtral; built once, then "
        "cached)")
    return ensure_lm_original(cfg.task, cfg.data)


def build_lm(cfg) -> tuple[Path, dict]:
    """:func:`edgeprune.build.build` for ``--generate`` (``cfg`` a :class:`~edgeprune.build.BuildConfig`)."""
    from edgeprune.build import finish, stage_prune, versions, write_records
    from edgeprune.lm_runtime import EdgeLM
    from edgeprune.pruning.pipeline import check_model, lm_examples, load_language_model, verbaliser_ids
    from edgeprune.pruning.plan import PrunePlan
    from edgeprune.validate_lm import evaluate, process_memory

    t0 = time.perf_counter()
    cfg.prune.validate()
    original_dir = Path(cfg.model_dir) if cfg.model_dir else default_original(cfg)
    spec, t = cfg.target.generate, cfg.target
    original = load_language_model(original_dir, cfg.prune.dtype)
    check_model(original, cfg.task, cfg.prune, labels=False)
    positions = getattr(original.config, "max_position_embeddings", None)
    if positions and cfg.task.max_length + spec.new_tokens > positions:
        raise ConfigError(f"task {cfg.task.name}'s {cfg.task.max_length} tokens + [generate].new_tokens "
                          f"{spec.new_tokens} exceed the model's {positions} positions; lower new_tokens")
    val = lm_examples(original_dir, cfg.task, cfg.data, cfg.prune, "validation", cfg.eval_examples)
    label_ids = verbaliser_ids(original_dir, cfg.task, cfg.prune, cfg.data)
    original_hash = dir_sha256(original_dir)
    pruned_dir = stage_prune(cfg, original_dir, original_hash)
    prune_info = json.loads((pruned_dir / "edgeprune_prune.json").read_text())
    from edgeprune.tokenization import load_tokenizer

    tok = load_tokenizer(original_dir)
    prompts = [tok.decode(val.prompt_ids(i), skip_special_tokens=True) for i in range(min(4, len(val)))]
    calibration = lm_examples(original_dir, cfg.task, cfg.data, cfg.prune, "train",
                              spec.calibration_examples).input_ids if spec.algorithm == "gptq" else []
    export_dir = stage_export(pruned_dir, spec, prompts, calibration)
    export_info = json.loads((export_dir / "edgeprune.json").read_text())
    precisions = spec.precisions()
    measured = ["fp32"] + [p for p in precisions if p != "fp32"]
    log(f"validate: {len(val)} validation examples; the original in PyTorch and {', '.join(measured)} in ONNX Runtime, "
        f"{t.runtime.threads} thread(s)")
    graphs = {p: EdgeLM(export_dir, threads=t.runtime.threads, model_file=FILES[p]) for p in measured}
    v = evaluate(original, graphs, val, label_ids, new_tokens=spec.new_tokens, threads=t.runtime.threads)
    v["models"]["artifact"] = v["models"][spec.weights]
    art = v["models"]["artifact"]
    if spec.weights != "fp32":
        v["quantization_perplexity_ratio"] = round(art["perplexity"] / v["models"]["fp32"]["perplexity"], 4)
    if "label_accuracy" in art:
        v["label_accuracy_drop_points"] = round(100 * (v["models"]["original"]["label_accuracy"]
                                                       - art["label_accuracy"]), 2)
    memory = {p: process_memory(export_dir, FILES[p], t.runtime.threads) for p in precisions}
    original_mb = round(sum(f.stat().st_size for f in original_dir.glob("*.safetensors")) / 1e6, 3)
    sizes = {p: round((export_dir / FILES[p]).stat().st_size / 1e6, 3) for p in measured}
    report = {
        "kind": "causal-lm", "task": cfg.task.name, "target": t.name, "original": str(original_dir),
        "original_sha256": original_hash, "plan": PrunePlan.load(pruned_dir / "prune_plan.json").summary(),
        "prune": {k: v2 for k, v2 in prune_info.items() if k in ("recovery", "generate", "seconds",
                                                                  "score_and_apply_seconds")},
        "export": {k: export_info.get(k) for k in ("exporter", "parity", "variants")},
        "validation": v, "memory": memory,
        "size": {"original_mb": original_mb, "artifact_mb": sizes[spec.weights], "graphs_mb": sizes,
                 "size_ratio": round(original_mb / sizes[spec.weights], 2)},
        "weights": spec.settings(), "budgets": spec.settings(budgets=True),
        "data": {"validation_split": "validation", "examples": len(val),
                 "note": "validation split of the task data; not a held-out test set"},
    }
    report["violations"] = lm_violations(report, spec)
    report["build_seconds"] = round(time.perf_counter() - t0, 1)
    manifest = {**{k: export_info[k] for k in ("kind", "model_type", "context", "eos_token_ids", "bos_token_id",
                                                "exporter", "parity")},
                "model_file": FILES[spec.weights], "precision": spec.weights, "task": cfg.task.name,
                "target": t.name, "threads": t.runtime.threads,
                "variants": {p: {**(export_info["variants"].get(p) or {}), "model_file": FILES[p]}
                             for p in precisions if p != spec.weights},
                "weights": report["weights"], "prune_plan": report["plan"], "source_checkpoint": str(original_dir),
                "source_sha256": original_hash, "versions": versions(), "command": cfg.command,
                "budgets": report["budgets"]}
    final = Path(cfg.out)
    dest = final if not report["violations"] else final.parent / f"{final.name}.rejected"
    with atomic_dir(dest) as tmp:
        (tmp / "onnx").mkdir()
        for p in precisions:
            shutil.copy2(export_dir / FILES[p], tmp / FILES[p])
        for f in export_dir.iterdir():
            if f.is_file() and not f.name.startswith(("edgeprune", ".")):
                shutil.copy2(f, tmp / f.name)
        manifest["genai"] = write_genai_config(tmp, FILES[spec.weights], export_info["eos_token_ids"])
        write_records(tmp, cfg, pruned_dir, manifest, report, report_markdown, model_card)
    return finish(final, dest, report)


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
             f"{v['speed_prompt_tokens']}-token prompt (the original in PyTorch with its cache, the graphs in ONNX "
             "Runtime with theirs; the build host is a proxy for the device).", "", *_table(v, sizes), "",
             f"Parity (fp32 graph vs PyTorch): greedy tokens equal on {r['export']['parity']['prompts']} prompts, "
             f"first-step logits within {r['export']['parity']['max_abs_logit_diff']:.2e} "
             f"(tolerance {r['export']['parity']['atol']}).", "",
             "Peak memory of a process that loads the graph and generates: " +
             ", ".join(f"{p} {m.get('peak_mb', m.get('error'))} MB" for p, m in r["memory"].items()) + ".", "",
             "Budgets: " + (", ".join(f"{k} = {b}" for k, b in r["budgets"].items() if b is not None) or "none") + ".",
             "", ("Violations:\n" + "\n".join(f"- {x}" for x in r["violations"])) if r["violations"]
             else "All budgets hold.", "", f"Data: {r['data']['note']}.", ""]
    return "\n".join(lines)


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
        f"- decode {art['decode_tokens_per_s']} tokens/s ({art['decode_speedup']}x the original), first token "
        f"{art['ttft_ms']} ms; {r['size']['artifact_mb']} MB ({r['size']['size_ratio']}x smaller)", "",
        "Use it without PyTorch:", "", "```python", "from edgeprune.lm_runtime import EdgeLM",
        "lm = EdgeLM('.')  # onnxruntime + tokenizers + numpy",
        "print(lm.generate('...', max_new_tokens=32, temperature=0.7, top_p=0.9, stop=['\\n']))", "```", "",
        "Or `edgeprune generate . \"prompt\"`. See report.md for every measurement.", ""])
