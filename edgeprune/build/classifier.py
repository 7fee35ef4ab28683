"""The classifier kind of the build spine (:mod:`edgeprune.build.spine`): a sequence classifier (or a language
model scoring label words) pruned, exported (:mod:`edgeprune.build.classifier_export`), validated side by side
with the original on the task's validation split (accuracy, agreement, latency, throughput, size, memory) and
published in the Hugging Face / transformers.js layout with a demo page."""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np

from edgeprune.build.classifier_export import fixed_shape, stage_export
from edgeprune.build.config import BuildConfig, log, versions
from edgeprune.build.spine import Prepared
from edgeprune.cache import Stage, dir_sha256
from edgeprune.errors import ConfigError


def check_lengths(cfg: BuildConfig, config) -> None:
    """The target's sequence lengths fit the model's positions (before any heavy work)."""
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    t = cfg.target
    for what, n in (("[export].sequence_length", t.export.sequence_length if t.export.fixed_shapes else 0),
                    ("[budgets].latency_seq_len", t.budgets.latency_seq_len)):
        if positions and n > positions:
            raise ConfigError(f"{t.source}: {what} = {n} exceeds the model's {positions} positions "
                              "(max_position_embeddings); lower it")


def fixed_for_family(cfg: BuildConfig, adapter) -> None:
    """A family whose traced graph keeps its example's shapes (Mamba layers: transformers' PyTorch scan pads to its
    chunk size with lengths read as Python numbers) is exported at one shape: batch 1 x the task's maximum length,
    inputs padded on the right (the layers are causal and the classifier reads the last real token, so padding
    changes no logit; export parity checks it). Said in one line; a target with fixed shapes keeps its own."""
    from dataclasses import replace

    if adapter is None or not adapter.extra.get("fixed_shapes") or cfg.target.export.fixed_shapes:
        return
    t = cfg.target
    cfg.target = replace(t, export=replace(t.export, fixed_shapes=True, batch_size=1,
                                           sequence_length=cfg.task.max_length))
    log(f"export: {adapter.model_type}'s {adapter.extra['fixed_shapes']} trace to fixed shapes only: the artifact takes "
        f"batch 1 x {cfg.task.max_length} tokens (inputs padded)")


def export_fits(original_dir: Path, cfg: BuildConfig) -> None:
    """Refuse up front a build whose export cannot fit (:func:`edgeprune.scale.memory.check_export`)."""
    from edgeprune.export.onnx_export import LARGE_BYTES
    from edgeprune.scale import memory

    p = cfg.prune
    est = memory.estimate(original_dir, p.experts, cfg.task.max_length, p.calibration_examples)
    memory.check_export(est, cfg.target.quantization.precision, p.max_memory_gb, LARGE_BYTES)


def original_logits_cached(cfg: BuildConfig, prep: Prepared, enc) -> np.ndarray:
    """The original's validation logits, a cached stage like the others (sealed and verified when reused),
    computed layer by layer for a layer-wise build."""
    from edgeprune.validate.classifier import original_logits

    p = cfg.prune
    extra = [p.load_options()] if p.prompt or p.verbalisers or p.dtype or p.label_map else []
    stage = Stage("logits", prep.original_hash, cfg.data.key(), cfg.task.name, cfg.eval_examples, *extra,
                  label="original logits")

    def build(tmp: Path) -> None:
        if getattr(prep.original, "edgeprune_skeleton", False):  # a layer-wise build
            from edgeprune.pruning.layerwise import logits_layerwise

            logits = logits_layerwise(prep.original_dir, enc, dtype=cfg.prune.dtype,
                                      offload_dir=cfg.prune.offload_dir, model=prep.original)
        else:
            logits = original_logits(prep.original, enc)
        np.save(tmp / "logits.npy", logits)

    def shaped(d: Path):
        got = np.load(d / "logits.npy").shape
        return None if got == (len(enc), cfg.task.num_labels) else f"holds logits of shape {got}"

    return np.load(stage.run(build, check=shaped) / "logits.npy")


class ClassifierBuild:
    """The classifier's stages for :func:`edgeprune.build.spine.run`."""

    def default_original(self, cfg: BuildConfig) -> Path:
        from edgeprune.originals.classifier import ensure_original

        log(f"original: default {'BTX ' if cfg.recipe == 'btx' else ''}MoE for {cfg.task.name} (built once, then cached)")
        return ensure_original(cfg.original_spec())

    def prepare(self, cfg: BuildConfig, original_dir: Path) -> Prepared:
        """The original (its skeleton when it is too large for memory: scoring, pruning and its validation logits
        then go layer by layer), checked, and the encoded validation split."""
        from edgeprune.models.label_words import of_model
        from edgeprune.models.loading import family_of, load_model
        from edgeprune.models.tokenizer import load_tokenizer
        from edgeprune.pruning.config import check_model
        from edgeprune.pruning.layerwise import skeleton
        from edgeprune.pruning.pipeline import memory_path
        from edgeprune.tasks.encoding import encode

        layerwise, _, why = memory_path(original_dir, cfg.task, cfg.prune)
        if layerwise:
            log(f"original: {why}")
        export_fits(original_dir, cfg)
        p = cfg.prune
        original = skeleton(original_dir, p.dtype, cfg.task, p.prompt, p.verbalisers, p.label_map) if layerwise else \
            load_model(original_dir, task=cfg.task, **p.load_options())
        words = of_model(original)
        tok = load_tokenizer(original_dir)
        adapter = family_of(original)
        check_model(original, adapter, cfg.task, p, tok)
        fixed_for_family(cfg, adapter)
        check_lengths(cfg, original.config)
        val_examples = cfg.data.load(cfg.task, "validation", limit=cfg.eval_examples)
        return Prepared(original_dir, dir_sha256(original_dir), original,
                        {"words": words, "val_examples": val_examples, "layerwise": layerwise, "why": why,
                         "val_enc": encode(val_examples, tok, cfg.task.max_length, words)})

    def export(self, cfg: BuildConfig, pruned_dir: Path, prep: Prepared) -> Path:
        from edgeprune.models.tokenizer import load_tokenizer
        from edgeprune.tasks.encoding import encode

        x = prep.extra
        x["prune_info"] = json.loads((pruned_dir / "edgeprune_prune.json").read_text())
        x["art_val_enc"] = x["val_enc"]
        if x["prune_info"].get("vocab"):  # a pruned vocabulary: the artifact reads its own tokenizer.json
            x["art_val_enc"] = encode(x["val_examples"], load_tokenizer(pruned_dir), cfg.task.max_length, x["words"])
        return stage_export(cfg, pruned_dir, x["art_val_enc"])

    def validate(self, cfg: BuildConfig, prep: Prepared, pruned_dir: Path, export_dir: Path) -> tuple[dict, dict]:
        from edgeprune.validate.classifier import quality, session_memory, speed, top_k_sweep

        t, x = cfg.target, prep.extra
        fixed = fixed_shape(t)
        log(f"validate: {len(x['val_enc'])} validation examples, latency at batch {t.budgets.latency_batch}, "
            f"{t.budgets.latency_seq_len} tokens, {t.runtime.threads} thread(s)")
        ref_logits = original_logits_cached(cfg, prep, x["val_enc"])
        artifact_model = export_dir / "model.onnx"
        vocab = (x["prune_info"].get("vocab") or {}).get("kept")  # a pruned vocabulary: the artifact's own
        measured = {
            "quality": quality(ref_logits, artifact_model, x["art_val_enc"], fixed_length=fixed[1] if fixed else None),
            "speed": speed(prep.original, artifact_model, t.runtime.threads, t.budgets.latency_batch,
                           t.budgets.latency_seq_len, iters=cfg.latency_iters, throughput_iters=cfg.throughput_iters,
                           fixed=fixed, artifact_vocab=vocab),
            "memory": session_memory(artifact_model, t.runtime.threads)}
        spec = json.loads((export_dir / "export.json").read_text()).get("top_k")
        if spec:  # the routers read top_k at run time: accuracy and speed at each k
            log(f"validate: top-k at run time, k = 1..{spec['max']}")
            measured["top_k"] = top_k_sweep(ref_logits, artifact_model, x["art_val_enc"], spec, t.runtime.threads,
                                            t.budgets.latency_batch, t.budgets.latency_seq_len,
                                            vocab or prep.original.config.get_text_config().vocab_size,
                                            iters=cfg.latency_iters, fixed=fixed)
        report = _report(cfg, prep, pruned_dir, export_dir, measured)
        return report, _manifest(cfg, prep, report)

    def violations(self, report: dict, cfg: BuildConfig) -> list[str]:
        from edgeprune.validate.budgets import violations

        return violations(report, cfg.target.budgets)

    def place(self, tmp: Path, cfg: BuildConfig, pruned_dir: Path, export_dir: Path, manifest: dict) -> None:
        from edgeprune.runtime import layout
        from edgeprune.export.demo import write_demo

        t = cfg.target
        manifest["files"] = layout.place(export_dir, tmp, t.quantization.precision, t.export.variants)
        layout.copy_tokenizer(pruned_dir, tmp, cfg.task.max_length)  # the pruned vocabulary's, if any
        manifest["transformers_js"] = layout.write_config(pruned_dir, tmp, list(cfg.task.labels),
                                                          t.quantization.precision, t.export.variants)
        write_demo(tmp, manifest)
        for name, src in cfg.extra_files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, tmp / name)

    def markdown(self, report: dict) -> str:
        from edgeprune.validate.report import report_markdown

        return report_markdown(report)

    def card(self, report: dict, manifest: dict) -> str:
        from edgeprune.validate.report import model_card

        return model_card(report, manifest)


CLASSIFIER = ClassifierBuild()


def _report(cfg: BuildConfig, prep: Prepared, pruned_dir: Path, export_dir: Path, measured: dict) -> dict:
    from edgeprune.pruning.plan import PrunePlan

    t, x = cfg.target, prep.extra
    original_mb = round(sum(f.stat().st_size for f in prep.original_dir.glob("*.safetensors")) / 1e6, 3)
    artifact_mb = round((export_dir / "model.onnx").stat().st_size / 1e6, 3)
    ort = export_dir / "model.ort"
    report = {
        "task": cfg.task.name, "target": t.name, "original": str(prep.original_dir),
        "original_sha256": prep.original_hash, "plan": PrunePlan.load(pruned_dir / "prune_plan.json").summary(),
        "prune": {k: v for k, v in x["prune_info"].items() if k in ("recovery", "router", "ffn", "depth", "heads",
                                                                    "vocab", "seconds", "calibration", "teacher")},
        "original_memory": {"path": "layer-wise" if x["layerwise"] else "in memory", "why": x["why"]},
        "export": json.loads((export_dir / "export.json").read_text()), **measured,
        "size": {"original_mb": original_mb, "artifact_mb": artifact_mb,
                 "artifact_ort_mb": round(ort.stat().st_size / 1e6, 3) if ort.is_file() else None,
                 "size_ratio": round(original_mb / artifact_mb, 2)},
        "budgets": asdict(t.budgets), "data": {"validation_split": "selection" if cfg.data.selection else "validation",
                                               "examples": len(x["val_enc"]),
                                               "note": f"{cfg.data.validation_name} of the task data; not a held-out "
                                                       "test set"},
    }
    if cfg.extra_files:
        report["search"] = sorted(cfg.extra_files)
    return report


def _manifest(cfg: BuildConfig, prep: Prepared, report: dict) -> dict:
    """``edgeprune.json``: what an app needs to run the artifact (:mod:`edgeprune.runtime`) and where it came from."""
    from edgeprune.runtime import layout

    t, x, export_info, info = cfg.target, prep.extra, report["export"], prep.extra["prune_info"]
    fixed = fixed_shape(t)
    words = x["words"]
    return {
        "task": cfg.task.name, "labels": list(cfg.task.labels), "max_length": cfg.task.max_length,
        "pair": cfg.task.is_pair, "input_names": export_info["input_names"], "target": t.name,
        "pad_id": x["val_enc"].pad_id, "model_type": prep.original.config.model_type,
        "label_words": words.to_dict() if words else None,  # prompt template + verbalisers of a language model
        "fixed_shape": list(fixed) if fixed else None, "threads": t.runtime.threads,
        "ort_disabled_optimizers": export_info.get("ort_disabled_optimizers", []),
        "precision": t.quantization.precision, "quantization": export_info.get("quantization"),
        "prune_plan": report["plan"], "ffn_width": (info.get("ffn") or {}).get("intermediate_size"),
        "vocabulary": info.get("vocab"),
        "depth": (info.get("depth") or {}).get("layers"), "heads": (info.get("heads") or {}).get("heads"),
        "source_checkpoint": str(prep.original_dir), "source_sha256": prep.original_hash,
        "versions": versions(), "command": cfg.command, "budgets": asdict(t.budgets),
        "model_file": layout.onnx_name(t.quantization.precision),
        "variants": {v: layout.onnx_name(v) for v in t.export.variants},
        # the routers' top-k as a run-time input (edgeprune.export.runtime_top_k)
        "top_k": {k: v for k, v in export_info["top_k"].items() if k != "parity_by_k"} if export_info.get("top_k")
        else None,
    }
