"""Which ONNX Runtime fusions make the int8 artifact fastest? The same pruned model (default method, k = 1),
exported for one CPU target with each fusion variant, side by side with the original in one run.

    python scripts/fusion_variants.py                 # sst2, x86_64 -> results/fusion_variants.{md,json}

Variants of the target's [optimization] table, set explicitly whatever the profile says: fully fused
(SkipLayerNormalization, BiasGelu), `skip_layer_norm = false` (residual Add + LayerNormalization left unfused,
and ORT's SkipLayerNormFusion disabled in every session), and that plus `gelu_approximation = true` (FastGelu,
the CPU profiles' choice). Accuracy and agreement with the original on the validation split;
latency p50/p95 at batch 1, 64 tokens, the target's threads, all models timed in alternating rounds
(edgeprune.validate.classifier.interleaved); ratios vs the original MoE in PyTorch fp32 and vs the fully fused graph.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from edgeprune.build.config import BuildConfig

from edgeprune.build.classifier import original_logits_cached
from edgeprune.build.spine import Prepared

from edgeprune.build.classifier_export import stage_export

from edgeprune.build.stage import stage_prune
from edgeprune.cache import dir_sha256
from edgeprune.targets import load_target
from edgeprune.tasks.spec import DataSpec
from edgeprune.originals.classifier import OriginalSpec, ensure_original
from edgeprune.pruning.config import PruneConfig
from edgeprune.models.loading import load_model
from edgeprune.validate.results import command_line, write_results
from edgeprune.tasks import get_task
from edgeprune.models.tokenizer import load_tokenizer
from edgeprune.tasks.encoding import encode
from edgeprune.validate.classifier import interleaved, onnx_runner, percentiles, quality, torch_runner

VARIANTS = {"fully fused": {"skip_layer_norm": True, "gelu_approximation": False},
            "skip_layer_norm = false": {"skip_layer_norm": False, "gelu_approximation": False},
            "skip_layer_norm = false, gelu_approximation = true": {"skip_layer_norm": False,
                                                                   "gelu_approximation": True}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--target", default="x86_64")
    ap.add_argument("--method", default="reap")
    ap.add_argument("--recovery-steps", type=int, default=200)
    ap.add_argument("--latency-iters", type=int, default=300)
    ap.add_argument("--out", default="results/fusion_variants")
    args = ap.parse_args()
    task, t = get_task(args.task), load_target(args.target)
    odir = ensure_original(OriginalSpec(task, kind="moe"))
    original = load_model(odir)
    va = encode(DataSpec().load(task, "validation"), load_tokenizer(odir), task.max_length)
    cfg = BuildConfig(task=task, target=t, out=Path("build/unused"),
                      prune=PruneConfig(method=args.method, experts=1, recovery_steps=args.recovery_steps))
    ohash = dir_sha256(odir)
    ref = original_logits_cached(cfg, Prepared(odir, ohash, original), va)
    pruned = stage_prune(cfg, odir, ohash)
    rows, paths = {}, {}
    for name, change in VARIANTS.items():
        vt = replace(t, optimization=replace(t.optimization, **change))
        paths[name] = stage_export(replace(cfg, target=vt), pruned, va) / "model.onnx"
        rows[name] = quality(ref, paths[name], va)
    ms = interleaved({"original": torch_runner(original, 1, 64),
                      **{k: onnx_runner(p, 1, 64, t.runtime.threads, original.config.vocab_size)
                         for k, p in paths.items()}}, t.runtime.threads, 10, args.latency_iters)
    orig = percentiles(ms.pop("original"))
    for name, v in ms.items():
        rows[name].update(percentiles(v))
    base = rows["fully fused"]["p50_ms"]
    for name in ms:
        rows[name]["speedup_vs_original"] = round(orig["p50_ms"] / rows[name]["p50_ms"], 2)
        rows[name]["p50_vs_fully_fused"] = round(rows[name]["p50_ms"] / base, 3)
    print(json.dumps({"original": orig, **rows}, indent=1))
    lines = ["# ORT fusion variants of the int8 artifact", "", f"Produced by `{command_line()}` on the build host "
             f"(2 cores): {args.task}, target {args.target}, {args.method}, k = 1, recovery {args.recovery_steps} "
             f"steps; latency at batch 1, 64 tokens, {t.runtime.threads} thread(s), alternating rounds with the "
             f"original MoE in PyTorch fp32 (p50 {orig['p50_ms']} ms, p95 {orig['p95_ms']} ms). Accuracy on the "
             f"full validation split ({len(va)} examples).", "",
             "| [optimization] | accuracy | agreement | p50 ms | p95 ms | speed-up vs original | p50 vs fully fused |",
             "|" + " --- |" * 7]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['artifact_accuracy']} | {r['agreement']} | {r['p50_ms']} | {r['p95_ms']} | "
                     f"{r['speedup_vs_original']} | {r['p50_vs_fully_fused']} |")
    write_results(args.out, {"task": args.task, "target": args.target, "original": orig, "variants": rows}, lines)


if __name__ == "__main__":
    main()
