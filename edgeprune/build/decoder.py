"""The decoder kind of the build spine (``edgeprune build --generate``): a causal-LM MoE -> a small on-device
language model, proven against the original.

original LM ─ calibrate on prompt + completion tokens ─ plan ─ prune, fold (k = 1: ``...ForCausalLM``)
            ─ recovery: KL distillation on completion tokens (:mod:`edgeprune.pruning.distill`)
            ─ KV-cache ONNX export, parity-gated (:mod:`edgeprune.export.lm_export`)
            ─ int4 / int8 weight-only MatMulNBits + 4-bit embedding, per the target's ``[generate]``
            ─ validation side by side (:mod:`edgeprune.validate.decoder`) ─ report, model card, budgets (exit 1)

The stages are those of every build (:mod:`edgeprune.build.spine`): cached, verified, the artifact directory
replaced atomically.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from edgeprune.build.config import BuildConfig, log, versions
from edgeprune.build.spine import Prepared
from edgeprune.cache import Stage, dir_sha256
from edgeprune.errors import ConfigError
from edgeprune.export.lm_export import FILES


def stage_export(pruned_dir: Path, spec, prompts: list[str], calibration: list[list[int]]) -> Path:
    """The fp32 KV-cache graph (parity-gated) and the target's weight variants, cached by their inputs
    (``calibration``: GPTQ's token sequences); a model whose weights exceed ``LARGE_BYTES`` by the large path."""
    large = is_large(pruned_dir)
    stage = Stage("export-lm", dir_sha256(pruned_dir), spec.settings(), prompts,
                  calibration if spec.algorithm == "gptq" and not large else None, large, label="export")
    return stage.run(lambda tmp: (_export_large if large else _export)(tmp, pruned_dir, spec, prompts, calibration))


def is_large(pruned_dir: Path) -> bool:
    """The pruned model's weights exceed :data:`~edgeprune.export.onnx_export.LARGE_BYTES`: it is exported, quantized
    and checked without being loaded whole (:mod:`edgeprune.export.lm_large`)."""
    from edgeprune.export import onnx_export

    return sum(f.stat().st_size for f in Path(pruned_dir).glob("*.safetensors")) > onnx_export.LARGE_BYTES


def _export_large(tmp: Path, pruned_dir: Path, spec, prompts: list[str], _calibration) -> None:
    from edgeprune.export.lm_export import write_decoder
    from edgeprune.export.lm_large import parity_lazy, quantize_lazy, variant_agreement
    from edgeprune.export.quantize import size_mb

    log("export: the pruned model exceeds the in-memory export's share: ONNX with a KV cache from its skeleton on the "
        "meta device, weights read one at a time (dynamo exporter"
        + ("; k > 1 experts as dense dispatch on this path, whatever [generate].moe_operator says)"
           if spec.moe_operator == "qmoe" else ")"))
    manifest = write_decoder(None, pruned_dir, tmp, exporter="lazy")
    manifest["parity"] = parity_lazy(pruned_dir, tmp, prompts, 8, spec.parity_atol)
    log(f"export: greedy tokens equal on {len(prompts)} prompts (whole-sequence steps, layer by layer), logits within "
        f"{manifest['parity']['max_abs_logit_diff']:.2e}")
    manifest["variants"] = {}
    for precision in spec.precisions():
        if precision == "fp32":
            continue
        log(f"quantize: {precision} weight-only (RTN, blocks of {spec.block_size}), one weight at a time"
            + (f"; {spec.algorithm.upper()} needs the whole graph: RTN instead" if spec.algorithm != "rtn" else ""))
        name = FILES[precision]
        v = quantize_lazy(tmp, precision, Path(name).name, spec.block_size, spec.accuracy_level, spec.symmetric,
                          spec.embedding_weights)
        manifest["variants"][precision] = {**v, "model_file": name, "size_mb": size_mb(tmp / name),
                                           **variant_agreement(tmp, name, prompts, manifest["parity"])}
    manifest["large"] = True
    (tmp / "edgeprune.json").write_text(json.dumps(manifest, indent=1))


def _export(tmp: Path, pruned_dir: Path, spec, prompts: list[str], calibration: list[list[int]]) -> None:
    from edgeprune.export.genai_builder import moe_operators
    from edgeprune.export.lm_export import FILES, parity, weight_variant, write_decoder
    from edgeprune.export.lm_moe import no_operator
    from edgeprune.models.loading import load_language_model

    model = load_language_model(pruned_dir, moe=False)
    log(f"export: ONNX with a KV cache ({spec.exporter} exporter)")
    manifest = write_decoder(model, pruned_dir, tmp, exporter=spec.exporter, moe_operator=spec.moe_operator)
    if no_operator(spec.moe_operator, manifest["exporter"]):
        log(f"export: moe_operator = \"qmoe\", but the {manifest['model_type']} experts do not map onto ONNX Runtime's "
            "MoE operator: dense dispatch")
    manifest["parity"] = parity(model, tmp, prompts, 8, spec.parity_atol)
    log(f"export: greedy tokens equal on {len(prompts)} prompts, first-step logits within "
        f"{manifest['parity']['max_abs_logit_diff']:.2e}")
    manifest["variants"] = {}
    moe = moe_operators(tmp / FILES["fp32"])
    builder_moe = moe and not manifest["exporter"].startswith("torch.onnx")
    for precision in spec.precisions():
        if precision == "fp32":
            continue
        if builder_moe:
            log(f"quantize: {precision} by onnxruntime-genai's model builder (experts in QMoE in {moe} layers, the "
                f"other weights MatMulNBits, RTN, blocks of {spec.block_size}; where it cannot, edgeprune's QMoE rewrite)")
        else:
            log(f"quantize: {precision} weight-only ({spec.algorithm.upper()}, blocks of {spec.block_size}"
                + (", 4-bit embedding" if spec.embedding_weights == "int4" else "")
                + (f"; experts of {moe} layers in QMoE)" if moe else ")"))
        algorithm = spec.algorithm if precision == "int4" or spec.algorithm != "gptq" else "rtn"
        manifest["variants"][precision] = v = weight_variant(tmp, precision, prompts, 8, spec.block_size,
                                                             spec.accuracy_level, algorithm, spec.embedding_weights,
                                                             calibration=calibration, symmetric=spec.symmetric,
                                                             source=pruned_dir if builder_moe else None)
        if "experts" in v:
            log(f"quantize: experts as {v['experts']}")
    (tmp / "edgeprune.json").write_text(json.dumps(manifest, indent=1))


GREEDY_PROMPTS = 16  # validation prompts whose greedy continuations are compared with the original's


def _export_fits(original_dir: Path, cfg: BuildConfig) -> None:
    """Refuse up front a layer-wise build whose export cannot fit ``--max-memory``: the quantizer holds the largest
    variant's weights (:func:`edgeprune.scale.memory.check_export`)."""
    from edgeprune.export.onnx_export import LARGE_BYTES
    from edgeprune.scale import memory

    p, spec = cfg.prune, cfg.target.generate
    est = memory.estimate(original_dir, p.experts, cfg.task.max_length, p.calibration_examples)
    quantized = [x for x in spec.precisions() if x != "fp32"]  # (the fp32 graph is written one weight at a time)
    if quantized:
        heaviest = max(quantized, key=lambda x: memory.PRECISION_SHARE[x])
        memory.check_export(est, heaviest, p.max_memory_gb, LARGE_BYTES, one_file=False)


class DecoderBuild:
    """The decoder's stages for :func:`edgeprune.build.spine.run`."""

    def default_original(self, cfg: BuildConfig) -> Path:
        """Without ``--model``: the decoder original of the task (``edgeprune original --family mixtral``), built
        on first use and cached."""
        from edgeprune.originals.btx_lm import LmBtxRecipe
        from edgeprune.originals.decoder import ensure_lm_original

        how = "its Branch-Train-MiX" if cfg.recipe == "btx" else "upcycled into Mixtral"
        log(f"original: the default decoder MoE for {cfg.task.name} (SmolLM2 {how}; built once, then cached)")
        return ensure_lm_original(cfg.task, cfg.data, btx=LmBtxRecipe() if cfg.recipe == "btx" else None)

    def prepare(self, cfg: BuildConfig, original_dir: Path) -> Prepared:
        from edgeprune.models.loading import family_of, load_language_model
        from edgeprune.pruning.config import check_model
        from edgeprune.pruning.lm_data import lm_examples, verbaliser_ids

        from edgeprune.pruning.layerwise import skeleton
        from edgeprune.pruning.pipeline import memory_path

        spec = cfg.target.generate
        layerwise, _, why = memory_path(original_dir, cfg.task, cfg.prune)
        if layerwise:
            log(f"original: {why}; validated one layer at a time")
            _export_fits(original_dir, cfg)
        original = (skeleton(original_dir, cfg.prune.dtype, lm=True) if layerwise
                    else load_language_model(original_dir, cfg.prune.dtype))
        check_model(original, family_of(original), cfg.task, cfg.prune, labels=False)
        positions = getattr(original.config, "max_position_embeddings", None)
        if positions and cfg.task.max_length + spec.new_tokens > positions:
            raise ConfigError(f"task {cfg.task.name}'s {cfg.task.max_length} tokens + [generate].new_tokens "
                              f"{spec.new_tokens} exceed the model's {positions} positions; lower new_tokens")
        val = lm_examples(original_dir, cfg.task, cfg.data, cfg.prune, "validation", cfg.eval_examples)
        return Prepared(original_dir, dir_sha256(original_dir), original,
                        {"val": val, "label_ids": verbaliser_ids(original_dir, cfg.task, cfg.prune, cfg.data),
                         "layerwise": layerwise, "why": why})

    def export(self, cfg: BuildConfig, pruned_dir: Path, prep: Prepared) -> Path:
        from edgeprune.models.tokenizer import load_tokenizer
        from edgeprune.pruning.lm_data import lm_examples

        spec, val = cfg.target.generate, prep.extra["val"]
        tok = load_tokenizer(prep.original_dir)
        prompts = [tok.decode(val.prompt_ids(i), skip_special_tokens=True) for i in range(min(4, len(val)))]
        calibration = lm_examples(prep.original_dir, cfg.task, cfg.data, cfg.prune, "train",
                                  spec.calibration_examples).input_ids if spec.algorithm == "gptq" else []
        return stage_export(pruned_dir, spec, prompts, calibration)

    def validate(self, cfg: BuildConfig, prep: Prepared, pruned_dir: Path, export_dir: Path) -> tuple[dict, dict]:
        from edgeprune.runtime import EdgeLM
        from edgeprune.validate.decoder import evaluate

        from edgeprune.validate.decoder_reference import LayerwiseReference

        spec, t, val = cfg.target.generate, cfg.target, prep.extra["val"]
        export_info = json.loads((export_dir / "edgeprune.json").read_text())
        # the large path leaves the fp32 graph out: an ONNX Runtime session of it holds every fp32 weight
        measured = ([] if export_info.get("large") else ["fp32"]) + [p for p in spec.precisions() if p != "fp32"]
        measured = measured or ["fp32"]
        where = "one layer at a time from its checkpoint" if prep.extra["layerwise"] else "in PyTorch"
        log(f"validate: {len(val)} validation examples; the original {where} and {', '.join(measured)} in ONNX "
            f"Runtime, {t.runtime.threads} thread(s)")
        # the layer-wise reference first: no graph's weights beside the original's layers
        original = (LayerwiseReference(prep.original_dir, val, prep.extra["label_ids"], GREEDY_PROMPTS,
                                       spec.new_tokens, frozenset(export_info["eos_token_ids"]))
                    if prep.extra["layerwise"] else prep.original)
        graphs = {p: EdgeLM(export_dir, threads=t.runtime.threads, model_file=FILES[p]) for p in measured}
        tk = export_info.get("top_k")
        for k in range(1, tk["max"] + 1) if tk else ():  # the artifact's graph at every other run-time top-k
            if k != tk["default"]:
                graphs[f"{spec.weights} top-k {k}"] = EdgeLM(export_dir, threads=t.runtime.threads,
                                                             model_file=FILES[spec.weights], top_k=k)
        v = evaluate(original, graphs, val, prep.extra["label_ids"], greedy_prompts=GREEDY_PROMPTS,
                     new_tokens=spec.new_tokens, threads=t.runtime.threads)
        v["models"]["artifact"] = art = v["models"][spec.weights]
        if "original_speed" in v and spec.min_decode_speedup is not None:
            v["original_speed"] += f"; the budget min_decode_speedup = {spec.min_decode_speedup} is not checked"
            log(f"budgets: min_decode_speedup not checked ({v['original_speed']})")
        if spec.weights != "fp32" and "fp32" in v["models"]:
            v["quantization_perplexity_ratio"] = round(art["perplexity"] / v["models"]["fp32"]["perplexity"], 4)
        if "label_accuracy" in art:
            v["label_accuracy_drop_points"] = round(100 * (v["models"]["original"]["label_accuracy"]
                                                           - art["label_accuracy"]), 2)
        report = _report(cfg, prep, pruned_dir, export_dir, export_info, v, measured)
        return report, _manifest(cfg, prep, report, export_info)

    def violations(self, report: dict, cfg: BuildConfig) -> list[str]:
        from edgeprune.validate.budgets import decoder_violations

        return decoder_violations(report, cfg.target.generate)

    def place(self, tmp: Path, cfg: BuildConfig, pruned_dir: Path, export_dir: Path, manifest: dict) -> None:
        from edgeprune.export.genai import write_genai_config

        spec = cfg.target.generate
        (tmp / "onnx").mkdir()
        for p in spec.precisions():
            for f in (FILES[p], FILES[p] + ".data"):  # (a large model's variants keep their weights beside them)
                if (export_dir / f).is_file():
                    shutil.copy2(export_dir / f, tmp / f)
        for f in export_dir.iterdir():
            if f.is_file() and not f.name.startswith(("edgeprune", ".")):
                shutil.copy2(f, tmp / f.name)
        manifest["genai"] = write_genai_config(tmp, FILES[spec.weights], manifest["eos_token_ids"])

    def markdown(self, report: dict) -> str:
        from edgeprune.validate.report_decoder import report_markdown

        return report_markdown(report)

    def card(self, report: dict, manifest: dict) -> str:
        from edgeprune.validate.report_decoder import model_card

        return model_card(report, manifest)


DECODER = DecoderBuild()


def _report(cfg: BuildConfig, prep: Prepared, pruned_dir: Path, export_dir: Path, export_info: dict, v: dict,
            measured: list) -> dict:
    from edgeprune.export.quantize import size_mb
    from edgeprune.pruning.plan import PrunePlan
    from edgeprune.validate.decoder import process_memory

    spec, t = cfg.target.generate, cfg.target
    prune_info = json.loads((pruned_dir / "edgeprune_prune.json").read_text())
    original_mb = round(sum(f.stat().st_size for f in prep.original_dir.glob("*.safetensors")) / 1e6, 3)
    sizes = {p: size_mb(export_dir / FILES[p]) for p in measured}
    return {
        "kind": "causal-lm", "task": cfg.task.name, "target": t.name, "original": str(prep.original_dir),
        "original_sha256": prep.original_hash, "plan": PrunePlan.load(pruned_dir / "prune_plan.json").summary(),
        "prune": {k: x for k, x in prune_info.items() if k in ("recovery", "generate", "seconds",
                                                               "score_and_apply_seconds")},
        "export": {k: export_info.get(k) for k in ("exporter", "parity", "variants", "top_k", "top_k_fixed")},
        "validation": v,
        "memory": {p: process_memory(export_dir, FILES[p], t.runtime.threads) for p in spec.precisions()
                   if p in measured},
        "original_memory": {"path": "layer-wise" if prep.extra["layerwise"] else "in memory",
                            "why": prep.extra["why"]},
        "size": {"original_mb": original_mb, "artifact_mb": sizes[spec.weights], "graphs_mb": sizes,
                 "size_ratio": round(original_mb / sizes[spec.weights], 2)},
        "weights": spec.settings(), "budgets": spec.settings(budgets=True),
        "data": {"validation_split": "validation", "examples": len(prep.extra["val"]),
                 "note": "validation split of the task data; not a held-out test set"},
    }


def _manifest(cfg: BuildConfig, prep: Prepared, report: dict, export_info: dict) -> dict:
    spec, t = cfg.target.generate, cfg.target
    return {**{k: export_info[k] for k in ("kind", "model_type", "context", "eos_token_ids", "bos_token_id",
                                           "exporter", "parity")},
            "model_file": FILES[spec.weights], "precision": spec.weights, "task": cfg.task.name,
            "target": t.name, "threads": t.runtime.threads,
            "variants": {p: {**(export_info["variants"].get(p) or {}), "model_file": FILES[p]}
                         for p in spec.precisions() if p != spec.weights},
            "weights": report["weights"], "prune_plan": report["plan"], "source_checkpoint": str(prep.original_dir),
            "source_sha256": prep.original_hash, "versions": versions(), "command": cfg.command,
            "budgets": report["budgets"], **{k: export_info[k] for k in ("top_k", "top_k_fixed") if k in export_info}}


def export_lm_artifact(model_dir, out: Path, prompts, int4: bool, original_dir=None, task_name: str = "sst2",
                       verbalisers=None) -> dict:
    """``edgeprune export-lm``: a saved dense causal LM exported with a KV cache (parity-gated) into ``out``,
    atomically, and with ``original_dir`` validated side by side with the MoE it was pruned from."""
    from edgeprune.cache import atomic_dir
    from edgeprune.export.lm_export import export_lm

    with atomic_dir(out) as tmp:
        info = export_lm(model_dir, tmp, list(prompts) or None, int4=int4)
        if original_dir:
            from edgeprune.validate.decoder import validate_artifact

            info["validation"] = validate_artifact(tmp, original_dir, task_name, verbalisers, info)
            (Path(tmp) / "edgeprune.json").write_text(json.dumps(info, indent=1))
    return info
