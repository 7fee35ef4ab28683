"""``edgeprune build``: original -> prune (+ recover) -> export (+ parity) -> optimise / quantize -> validate
-> report, model card, budgets. One calling convention per stage; stages whose inputs did not change are
reused from the cache (keyed by the hash of their inputs); the artifact directory is replaced atomically.

A build whose budgets fail leaves the previous artifact in ``--out`` untouched and puts the rejected one,
with its report, in ``<out>.rejected`` for inspection; the command exits 1.
"""
from __future__ import annotations

import json
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import onnx

from edgeprune import __version__
from edgeprune.cache import atomic_dir, cache_root, dir_sha256, fingerprint, reusable, seal
from edgeprune.check import violations
from edgeprune.errors import BudgetError, ConfigError
from edgeprune.export import layout
from edgeprune.export.targets import Target
from edgeprune.export.demo import write_demo
from edgeprune.original import DataSpec, OriginalSpec, ensure_original
from edgeprune.models.label_words import of_model
from edgeprune.pruning.pipeline import PruneConfig, check_model, load_model, prune, save_pruned
from edgeprune.pruning.plan import PrunePlan
from edgeprune.report import model_card, report_markdown
from edgeprune.tasks import Task
from edgeprune.tokenization import load_tokenizer
from edgeprune.training import encode


@dataclass
class BuildConfig:
    """Everything a build depends on; written next to the artifact as ``build_config.json``."""

    task: Task
    target: Target
    out: Path
    data: DataSpec = field(default_factory=DataSpec)
    model_dir: Optional[str] = None
    prune: PruneConfig = field(default_factory=PruneConfig)
    plan_file: Optional[str] = None
    eval_examples: Optional[int] = None
    parity_examples: int = 256
    latency_iters: int = 100
    throughput_iters: int = 10
    command: str = ""
    extra_files: dict = field(default_factory=dict)  # artifact-relative name -> file to copy in (the search's front)

    def to_dict(self) -> dict:
        return {"task": self.task.name, "target": self.target.to_dict(), "out": str(self.out),
                "data": asdict(self.data), "model": self.model_dir, "prune": self.prune.to_dict(),
                "plan_file": self.plan_file, "eval_examples": self.eval_examples,
                "parity_examples": self.parity_examples, "latency_iters": self.latency_iters,
                "command": self.command}


def log(msg: str) -> None:
    print(f"[edgeprune] {msg}", flush=True)


def versions() -> dict:
    import onnx
    import onnxruntime
    import optimum
    import torch
    import transformers

    return {"edgeprune": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "optimum": getattr(optimum, "__version__", "?"), "python": platform.python_version()}


def stage_prune(cfg: BuildConfig, original_dir: Path, original_hash: str) -> Path:
    plan = PrunePlan.load(cfg.plan_file) if cfg.plan_file else None
    key = fingerprint("prune", original_hash, prune_key(cfg, original_dir), cfg.data.key(), cfg.task.name,
                      plan.to_json() if plan else None)
    out = cache_root() / "stages" / f"prune-{key}"
    if reusable(out, log):
        log(f"prune: reusing {out} (files verified)")
        return out
    log(f"prune: {cfg.prune.method}, k={cfg.prune.experts or 'adaptive'}, recovery {cfg.prune.recovery_steps} steps")
    model, plan, info = prune(original_dir, cfg.task, cfg.data, cfg.prune, plan=plan)
    with atomic_dir(out) as tmp:
        save_pruned(model, original_dir, tmp, plan, info)
        seal(tmp)
    return out


def prune_key(cfg: BuildConfig, original_dir: Path) -> dict:
    """The prune options that change the pruned model: not where memory goes (--max-memory, --offload-dir), and
    the path only when it is layer-wise (its recovery has no teacher)."""
    from edgeprune.pruning.pipeline import memory_path

    key = {k: v for k, v in cfg.prune.to_dict().items() if k not in ("layerwise", "max_memory_gb", "offload_dir")}
    if memory_path(original_dir, cfg.task, cfg.prune)[0]:
        key["layerwise"] = True
    return key


def ort_model_type(model) -> Optional[str]:
    """The ORT transformer optimizer's model type for ``model`` (a dense sibling's or an MoE family's)."""
    from edgeprune.errors import ModelError
    from edgeprune.models.registry import adapter_for

    if model.config.model_type == "bert":
        return "bert"
    try:
        return adapter_for(model.config).ort_model_type
    except ModelError:  # a folded decoder (Mistral, Qwen3): plain ORT optimisation
        return None


def attention_shape(config) -> tuple[int, int]:
    """Heads and attention width for ONNX Runtime's attention fusion: after ``--heads-keep`` every layer has the
    same, smaller number of heads (config ``pruned_heads``) and the attention width shrinks with it."""
    heads, hidden = config.num_attention_heads, config.hidden_size
    pruned = getattr(config, "pruned_heads", None) or {}
    if pruned:
        left = {heads - len(set(h)) for h in pruned.values()}
        if len(pruned) != config.num_hidden_layers or len(left) != 1:
            return 0, 0  # uneven: the optimizer reads each attention's shape from the graph
        kept = left.pop()
        return kept, kept * (hidden // heads)
    return heads, hidden


def stage_export(cfg: BuildConfig, pruned_dir: Path, val_enc) -> Path:
    from edgeprune.export.onnx_export import export_onnx, onnx_logits, parity
    from edgeprune.export.quantize import (fix_shapes, mark_disabled_optimizers, mobile_usability, optimize, quantize,
                                          to_ort_format)

    t = cfg.target
    key = fingerprint("export", dir_sha256(pruned_dir), asdict(t.export), asdict(t.quantization),
                      asdict(t.optimization), t.runtime.ort_format, t.runtime.mobile_usability, cfg.parity_examples)
    out = cache_root() / "stages" / f"export-{key}"
    fixed = (t.export.batch_size, t.export.sequence_length) if t.export.fixed_shapes else None
    fixed_len = fixed[1] if fixed else None
    sample = type(val_enc)(val_enc.input_ids[: cfg.parity_examples], val_enc.token_type_ids[: cfg.parity_examples],
                           val_enc.labels[: cfg.parity_examples], val_enc.pad_id)
    if reusable(out, log):
        # the quantized graph's logits on the parity sample must be those recorded when it was built
        got = onnx_logits(out / "model.onnx", sample, fixed_length=fixed_len)
        want = np.load(out / "parity_logits.npy")
        if got.shape == want.shape and np.allclose(got, want, atol=1e-4):
            log(f"export: reusing {out} (files verified, parity re-checked)")
            return out
        log(f"cache: {out.name} no longer reproduces its recorded logits; rebuilding it")
        shutil.rmtree(out, ignore_errors=True)
    from edgeprune.models.label_words import load_classifier

    model = load_classifier(pruned_dir)  # MoE (k > 1) or folded dense sibling
    info: dict = {}
    with atomic_dir(out) as tmp:
        log(f"export: ONNX opset {t.export.opset}" + (f", fixed shape {fixed}" if fixed else ", dynamic shapes"))
        info["exporter"] = export_onnx(model, pruned_dir, tmp / "fp32.onnx", t)
        if fixed:
            fix_shapes(tmp / "fp32.onnx", *fixed)
        info["parity_fp32"] = parity(tmp / "fp32.onnx", model, sample, fixed_length=fixed_len)
        log(f"export: parity with PyTorch ok (max logit diff {info['parity_fp32']['max_abs_logit_diff']:.2e})")
        info["fusions"] = optimize(tmp / "fp32.onnx", tmp / "opt.onnx", t, *attention_shape(model.config),
                                   ort_model_type(model))
        log(f"quantize: {t.quantization.precision}")
        info["quantization"] = quantize(tmp / "opt.onnx", tmp / "model.onnx", t, calib=sample)
        info["variants"] = export_variants(tmp, t, sample, fixed_len)
        info["ort_disabled_optimizers"] = t.optimization.ort_disabled_optimizers
        mark_disabled_optimizers(tmp / "model.onnx", info["ort_disabled_optimizers"])
        for f in ("fp32.onnx", "opt.onnx"):
            (tmp / f).unlink()
        if t.runtime.ort_format:
            to_ort_format(tmp / "model.onnx", tmp / "model.ort")
        if t.runtime.mobile_usability:
            log("mobile usability check (NNAPI / CoreML)")
            info["mobile_usability"] = mobile_usability(tmp / "model.onnx")
        info["input_names"] = [i.name for i in onnx.load(str(tmp / "model.onnx")).graph.input]
        (tmp / "export.json").write_text(json.dumps(info, indent=1))
        np.save(tmp / "parity_logits.npy", onnx_logits(tmp / "model.onnx", sample, fixed_length=fixed_len))
        seal(tmp)
    return out


def export_variants(tmp: Path, t: Target, sample, fixed_len: Optional[int]) -> dict:
    """The target's extra precisions (``[export] variants``), from the same fused fp32 graph as the artifact,
    each compared with the fp32 graph on the parity sample (the quantized artifact's own check is the build's
    validation). fp16 keeps fp32 inputs and outputs (keep_io_types), as transformers.js' fp16 models do."""
    from dataclasses import replace

    from edgeprune.export.onnx_export import onnx_logits
    from edgeprune.export.quantize import quantize

    out = {}
    if not t.export.variants:
        return out
    ref = onnx_logits(tmp / "fp32.onnx", sample, fixed_length=fixed_len)
    for v in t.export.variants:
        log(f"export: variant {v}")
        vt = replace(t, quantization=replace(t.quantization, precision=v, embedding_bits=8))
        quantize(tmp / "opt.onnx", tmp / f"model_{v}.onnx", vt)
        got = onnx_logits(tmp / f"model_{v}.onnx", sample, fixed_length=fixed_len)
        out[v] = {"max_abs_logit_diff_vs_fp32": float(np.abs(ref - got).max()),
                  "agreement_vs_fp32": float((ref.argmax(-1) == got.argmax(-1)).mean()),
                  "examples": len(sample), "mb": round((tmp / f"model_{v}.onnx").stat().st_size / 1e6, 3)}
    return out


def original_logits_cached(original_dir: Path, original_hash: str, cfg: BuildConfig, enc, original) -> np.ndarray:
    from edgeprune.validate import original_logits

    key = fingerprint("logits", original_hash, cfg.data.key(), cfg.task.name, cfg.eval_examples,
                      *([cfg.prune.load_options()] if cfg.prune.prompt or cfg.prune.verbalisers or cfg.prune.dtype else []))
    path = cache_root() / "stages" / f"logits-{key}.npy"
    if path.is_file():
        return np.load(path)
    if getattr(original, "edgeprune_skeleton", False):  # a layer-wise build
        from edgeprune.scale.layerwise import logits_layerwise

        logits = logits_layerwise(original_dir, enc, dtype=cfg.prune.dtype, offload_dir=cfg.prune.offload_dir,
                                  model=original)
    else:
        logits = original_logits(original, enc)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path.with_suffix(".tmp.npy"), logits)
    path.with_suffix(".tmp.npy").replace(path)
    return logits


def check_lengths(cfg: BuildConfig, config) -> None:
    """The target's sequence lengths fit the model's positions (before any heavy work)."""
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    t = cfg.target
    for what, n in (("[export].sequence_length", t.export.sequence_length if t.export.fixed_shapes else 0),
                    ("[budgets].latency_seq_len", t.budgets.latency_seq_len)):
        if positions and n > positions:
            raise ConfigError(f"{t.source}: {what} = {n} exceeds the model's {positions} positions "
                              "(max_position_embeddings); lower it")


def build(cfg: BuildConfig) -> tuple[Path, dict]:
    """Run the whole pipeline; returns the artifact directory and the report. Raises BudgetError (exit 1)
    when a budget fails, leaving the previous artifact in place."""
    from edgeprune.validate import quality, session_memory, speed

    t0 = time.perf_counter()
    cfg.prune.validate()
    if cfg.model_dir:
        original_dir = Path(cfg.model_dir)
    else:
        log(f"original: default MoE for {cfg.task.name} (built once, then cached)")
        original_dir = ensure_original(OriginalSpec(cfg.task, cfg.data, "moe"))
    from edgeprune.pruning.pipeline import memory_path
    from edgeprune.scale.layerwise import skeleton

    layerwise, _, why = memory_path(original_dir, cfg.task, cfg.prune)
    if layerwise:
        log(f"original: {why}")
    # too large for memory: its skeleton (config, blocks) here; scoring, pruning and its validation logits layer by layer
    original = skeleton(original_dir, cfg.prune.dtype, cfg.task, cfg.prune.prompt, cfg.prune.verbalisers) if layerwise else \
        load_model(original_dir, task=cfg.task, **cfg.prune.load_options())
    words = of_model(original)
    tok = load_tokenizer(original_dir)
    check_model(original, cfg.task, cfg.prune, tok)
    check_lengths(cfg, original.config)
    original_hash = dir_sha256(original_dir)
    val_examples = cfg.data.load(cfg.task, "validation", limit=cfg.eval_examples)
    val_enc = encode(val_examples, tok, cfg.task.max_length, words)
    pruned_dir = stage_prune(cfg, original_dir, original_hash)
    from edgeprune.scale import distributed

    distributed.release_workers()  # under torchrun (if the prune stage was cached): export and validation are rank 0's
    prune_info = json.loads((pruned_dir / "edgeprune_prune.json").read_text())
    art_val_enc = val_enc
    if prune_info.get("vocab"):  # a pruned vocabulary: the artifact reads its own tokenizer.json
        art_val_enc = encode(val_examples, load_tokenizer(pruned_dir), cfg.task.max_length, words)
    export_dir = stage_export(cfg, pruned_dir, art_val_enc)
    export_info = json.loads((export_dir / "export.json").read_text())
    t = cfg.target
    fixed = (t.export.batch_size, t.export.sequence_length) if t.export.fixed_shapes else None
    log(f"validate: {len(val_enc)} validation examples, latency at batch {t.budgets.latency_batch}, "
        f"{t.budgets.latency_seq_len} tokens, {t.runtime.threads} thread(s)")
    ref_logits = original_logits_cached(original_dir, original_hash, cfg, val_enc, original)
    artifact_model = export_dir / "model.onnx"
    q = quality(ref_logits, artifact_model, art_val_enc, fixed_length=fixed[1] if fixed else None)
    sp = speed(original, artifact_model, t.runtime.threads, t.budgets.latency_batch, t.budgets.latency_seq_len,
               iters=cfg.latency_iters, throughput_iters=cfg.throughput_iters, fixed=fixed,
               artifact_vocab=(prune_info.get("vocab") or {}).get("kept"))
    mem = session_memory(artifact_model, t.runtime.threads)
    original_mb = round(sum(f.stat().st_size for f in original_dir.glob("*.safetensors")) / 1e6, 3)
    artifact_mb = round(artifact_model.stat().st_size / 1e6, 3)
    plan = PrunePlan.load(pruned_dir / "prune_plan.json")
    report = {
        "task": cfg.task.name, "target": t.name, "original": str(original_dir), "original_sha256": original_hash,
        "plan": plan.summary(),
        "prune": {k: v for k, v in prune_info.items() if k in ("recovery", "router", "ffn", "depth", "heads", "vocab",
                                                                  "seconds", "calibration", "teacher")},
        "original_memory": {"path": "layer-wise" if layerwise else "in memory", "why": why},
        "export": export_info, "quality": q, "speed": sp, "memory": mem,
        "size": {"original_mb": original_mb, "artifact_mb": artifact_mb,
                 "artifact_ort_mb": round((export_dir / "model.ort").stat().st_size / 1e6, 3)
                 if (export_dir / "model.ort").is_file() else None,
                 "size_ratio": round(original_mb / artifact_mb, 2)},
        "budgets": asdict(t.budgets), "data": {"validation_split": "validation", "examples": len(val_enc),
                                               "note": "validation split of the task data; not a held-out test set"},
    }
    if cfg.extra_files:
        report["search"] = sorted(cfg.extra_files)
    report["violations"] = violations(report, t.budgets)
    report["build_seconds"] = round(time.perf_counter() - t0, 1)
    manifest = {
        "task": cfg.task.name, "labels": list(cfg.task.labels), "max_length": cfg.task.max_length,
        "pair": cfg.task.is_pair, "input_names": export_info["input_names"], "target": t.name,
        "pad_id": val_enc.pad_id, "model_type": original.config.model_type,
        "label_words": words.to_dict() if words else None,  # prompt template + verbalisers of a language model
        "fixed_shape": list(fixed) if fixed else None, "threads": t.runtime.threads,
        "ort_disabled_optimizers": export_info.get("ort_disabled_optimizers", []),
        "precision": t.quantization.precision, "quantization": export_info.get("quantization"),
        "prune_plan": plan.summary(), "ffn_width": (prune_info.get("ffn") or {}).get("intermediate_size"),
        "vocabulary": prune_info.get("vocab"),
        "depth": (prune_info.get("depth") or {}).get("layers"), "heads": (prune_info.get("heads") or {}).get("heads"),
        "source_checkpoint": str(original_dir), "source_sha256": original_hash,
        "versions": versions(), "command": cfg.command, "budgets": asdict(t.budgets),
        "model_file": layout.onnx_name(t.quantization.precision),
        "variants": {v: layout.onnx_name(v) for v in t.export.variants},
    }
    final = Path(cfg.out)
    dest = final if not report["violations"] else final.parent / f"{final.name}.rejected"
    with atomic_dir(dest) as tmp:
        manifest["files"] = layout.place(export_dir, tmp, t.quantization.precision, t.export.variants)
        layout.copy_tokenizer(pruned_dir, tmp, cfg.task.max_length)  # the pruned vocabulary's, if any
        manifest["transformers_js"] = layout.write_config(pruned_dir, tmp, list(cfg.task.labels),
                                                          t.quantization.precision, t.export.variants)
        write_demo(tmp, manifest)
        for name, src in cfg.extra_files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, tmp / name)
        write_records(tmp, cfg, pruned_dir, manifest, report, report_markdown, model_card)
    return finish(final, dest, report)


def write_records(tmp: Path, cfg: BuildConfig, pruned_dir: Path, manifest: dict, report: dict, markdown, card) -> None:
    """The plan, manifest, report (JSON and ``markdown(report)``), model card and resolved config into ``tmp``."""
    shutil.copy2(pruned_dir / "prune_plan.json", tmp / "prune_plan.json")
    (tmp / "edgeprune.json").write_text(json.dumps(manifest, indent=1))
    (tmp / "report.json").write_text(json.dumps(report, indent=1))
    (tmp / "report.md").write_text(markdown(report))
    (tmp / "README.md").write_text(card(report, manifest))
    (tmp / "build_config.json").write_text(json.dumps(cfg.to_dict(), indent=1, default=str))


def finish(final: Path, dest: Path, report: dict) -> tuple[Path, dict]:
    """Exit 1 (:class:`BudgetError`) when a budget failed (the artifact went to ``dest``, ``<out>.rejected``)."""
    if report["violations"]:
        raise BudgetError("budgets failed (previous artifact kept; this one is in "
                          f"{dest}):\n" + "\n".join(f"  - {v}" for v in report["violations"]))
    return final, report
