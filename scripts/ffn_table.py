"""How far can width pruning of the folded FFNs go? Accuracy vs latency for --ffn-keep P, per task, in one run.

    python scripts/ffn_table.py                       # sst2 agnews, P = 1 (expert pruning only), 0.75, 0.5, 0.375

Each row is the real pipeline (edgeprune.build.classifier stages: prune with the default method at k = 1, then --ffn-keep P
and recovery, export for the target): accuracy and agreement with the original on the full validation split,
size, and p50 / p95 at batch 1, 64 tokens, the target's threads, every model of a task timed in alternating rounds
with the original MoE in PyTorch fp32 (edgeprune.validate.classifier.interleaved). P = 1 uses the default 200 recovery steps,
P < 1 uses --recovery-steps (default 1000: slimming needs the longer recovery).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from edgeprune.build.config import BuildConfig

from edgeprune.build.classifier import original_logits_cached
from edgeprune.build.spine import Prepared

from edgeprune.build.classifier_export import stage_export

from edgeprune.build.stage import stage_prune
from edgeprune.cache import dir_sha256
from edgeprune.export.quantize import size_mb
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["sst2", "agnews"])
    ap.add_argument("--keeps", nargs="+", type=float, default=[1.0, 0.75, 0.5, 0.375])
    ap.add_argument("--target", default="x86_64")
    ap.add_argument("--method", default="reap")
    ap.add_argument("--recovery-steps", type=int, default=1000)
    ap.add_argument("--latency-iters", type=int, default=200)
    ap.add_argument("--out", default="results/ffn_table")
    args = ap.parse_args()
    t = load_target(args.target)
    rows = []
    for name in args.tasks:
        task = get_task(name)
        odir = ensure_original(OriginalSpec(task, kind="moe"))
        original = load_model(odir)
        va = encode(DataSpec().load(task, "validation"), load_tokenizer(odir), task.max_length)
        ohash = dir_sha256(odir)
        paths, task_rows, ref = {}, {}, None
        for keep in args.keeps:
            steps = 200 if keep == 1.0 else args.recovery_steps
            cfg = BuildConfig(task=task, target=t, out=Path("build/unused"),
                              prune=PruneConfig(method=args.method, experts=1, recovery_steps=steps, ffn_keep=keep))
            if ref is None:  # the original's logits depend on task and data only, not on the prune config
                ref = original_logits_cached(cfg, Prepared(odir, ohash, original), va)
            pruned = stage_prune(cfg, odir, ohash)
            paths[keep] = stage_export(cfg, pruned, va) / "model.onnx"
            q = quality(ref, paths[keep], va)
            task_rows[keep] = {"task": name, "ffn_keep": keep, "recovery_steps": steps,
                               "original_accuracy": q["original_accuracy"], "accuracy": q["artifact_accuracy"],
                               "drop_points": q["accuracy_drop_points"], "agreement": q["agreement"],
                               "size_mb": size_mb(paths[keep])}
        ms = interleaved({"original": torch_runner(original, 1, 64),
                          **{k: onnx_runner(p, 1, 64, t.runtime.threads, original.config.vocab_size)
                             for k, p in paths.items()}}, t.runtime.threads, 10, args.latency_iters)
        orig = percentiles(ms.pop("original"))
        for keep, v in ms.items():
            r = task_rows[keep]
            r.update(percentiles(v))
            r["original_p50_ms"] = orig["p50_ms"]
            r["p50_speedup"] = round(orig["p50_ms"] / r["p50_ms"], 2)
            rows.append(r)
        print(task_rows, flush=True)
    lines = ["# Width pruning of the folded FFNs (--ffn-keep)", "", f"Produced by `{command_line()}` on the build host "
             f"(2 cores): target {args.target}, {args.method}, k = 1; latency at batch 1, 64 tokens, "
             f"{t.runtime.threads} thread(s), alternating rounds with the original MoE in PyTorch fp32 per task. "
             "Accuracy on the full validation split.", "",
             "| task | --ffn-keep | recovery steps | accuracy (original) | drop points | agreement | size MB | p50 ms | p95 ms | p50 speed-up |",
             "|" + " --- |" * 10]
    for r in rows:
        lines.append(f"| {r['task']} | {r['ffn_keep']} | {r['recovery_steps']} | {r['accuracy']} ({r['original_accuracy']}) | "
                     f"{r['drop_points']} | {r['agreement']} | {r['size_mb']} | {r['p50_ms']} | {r['p95_ms']} | "
                     f"{r['p50_speedup']} |")
    write_results(args.out, {"rows": rows}, lines)


if __name__ == "__main__":
    main()
