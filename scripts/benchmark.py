"""Side-by-side benchmark: the original MoE vs the edgeprune artifact, per task and target, in one run.

    python scripts/benchmark.py                     # sst2 agnews x x86_64 arm64 mobile-gpu -> results/benchmark.*
    python scripts/benchmark.py --ffn-keep 0.5 --recovery-steps 1000 --out results/benchmark_ffn
                                                    # plus width pruning of the folded FFNs (edgeprune.pruning.neurons)
    python scripts/benchmark.py --targets arm64 --drop-layers 2 --heads-keep 0.5 --vocab-reserve 2000 ...
                                                    # below the dense floor (edgeprune.pruning.structure, vocab)

For each task and target it runs the real `edgeprune build` pipeline (default method and k = 1), then
measures in the same process, with the same thread count and inputs: the original MoE in PyTorch fp32
(the reference), the artifact, the dense baseline exported and quantized the same way (the floor for
k = 1: folding must cost nothing over a natively dense model), and the original exported to ONNX fp32
with all its experts (dense dispatch; separates what pruning buys from what ONNX Runtime buys), and the peer a
user would pick instead of edgeprune: the dense baseline exported and int8-quantized the way `optimum-cli export onnx` +
`optimum-cli onnxruntime quantize --arm64` (`--avx512_vnni` for x86_64) do (edgeprune.build.peer: optimum-onnx
cannot be installed beside transformers 5). With
--ffn-keep < 1 the artifact is narrower than the dense baseline, which then stops being its floor.
Latency: p50/p95 at batch 1, 64 tokens, 1 thread; throughput at batch 32; every model of a row is timed in
alternating rounds (edgeprune.validate.classifier.interleaved) so that host drift falls on all alike. Ratios are vs the original.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from edgeprune.build.config import BuildConfig

from edgeprune.build.spine import build

from edgeprune.build.classifier_export import stage_export
from edgeprune.errors import BudgetError
from edgeprune.export.quantize import size_mb
from edgeprune.targets import load_target
from edgeprune.tasks.spec import DataSpec
from edgeprune.originals.classifier import OriginalSpec, ensure_original
from edgeprune.build.peer import dense_peer
from edgeprune.pruning.config import PruneConfig
from edgeprune.models.loading import load_model
from edgeprune.validate.results import command_line, write_results
from edgeprune.tasks import get_task
from edgeprune.models.tokenizer import load_tokenizer
from edgeprune.tasks.encoding import encode
from edgeprune.validate.classifier import (interleaved, onnx_runner, original_logits, percentiles, quality,
                                throughput, torch_runner)


def artifact_model(art: Path) -> Path:
    """The artifact's ONNX file (its manifest's model_file)."""
    from edgeprune.runtime.layout import model_file
    from edgeprune.runtime.manifest import read_manifest

    return model_file(art, read_manifest(art))


def accuracy_row(path: Path, ref_logits, va, t) -> dict:
    fixed = t.export.sequence_length if t.export.fixed_shapes else None
    q = quality(ref_logits, path, va, fixed_length=fixed)
    return {"accuracy": q["artifact_accuracy"], "agreement": q["agreement"], "size_mb": size_mb(path)}


def measure_speed(row: dict, original, paths: dict[str, Path], t, iters: int, vocabs: dict | None = None) -> None:
    """Latency (batch 1, 64 tokens) and batch-32 throughput of the original in PyTorch and every ONNX model,
    all in alternating rounds in this process (same threads, same inputs; random ids within each model's
    vocabulary, which is smaller for a pruned one)."""
    threads = t.runtime.threads
    vocabs = {k: (vocabs or {}).get(k) or original.config.vocab_size for k in paths}
    batch = t.export.batch_size if t.export.fixed_shapes else 1
    ms = interleaved({"original": torch_runner(original, 1, 64),
                      **{k: onnx_runner(p, batch, 64, threads, vocabs[k]) for k, p in paths.items()}},
                     threads, 10, iters)
    for key, v in ms.items():
        row[key].update(percentiles(v))
    if not t.export.fixed_shapes:
        tp = interleaved({"original": torch_runner(original, 32, 64),
                          **{k: onnx_runner(p, 32, 64, threads, vocabs[k]) for k, p in paths.items()}},
                         threads, 2, 10, rounds=5)
        for key, v in tp.items():
            row[key]["throughput_per_s"] = throughput(v, 32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["sst2", "agnews"])
    ap.add_argument("--targets", nargs="+", default=["x86_64", "arm64", "mobile-gpu"])
    ap.add_argument("--method", default="reap")
    # the knobs default to each target's [prune] preset, as `edgeprune build` does; given here, they win
    ap.add_argument("--recovery-steps", type=int, default=None)
    ap.add_argument("--ffn-keep", type=float, default=None, help="share of the folded FFN neurons to keep")
    ap.add_argument("--drop-layers", type=int, default=None)
    ap.add_argument("--heads-keep", type=float, default=None)
    ap.add_argument("--vocab-reserve", type=int, default=None)
    ap.add_argument("--latency-iters", type=int, default=200)
    ap.add_argument("--out", default="results/benchmark")
    args = ap.parse_args()
    knobs_given = {"recovery_steps": args.recovery_steps, "ffn_keep": args.ffn_keep, "drop_layers": args.drop_layers,
                   "heads_keep": args.heads_keep, "vocab_reserve": args.vocab_reserve}
    rows = []
    for name in args.tasks:
        task = get_task(name)
        odir = ensure_original(OriginalSpec(task, kind="moe"))
        ddir = ensure_original(OriginalSpec(task, kind="dense"))
        original = load_model(odir)
        va = encode(DataSpec().load(task, "validation"), load_tokenizer(odir), task.max_length)
        ref = original_logits(original, va)
        for tname in args.targets:
            t = load_target(tname)
            knobs = {**t.prune.presets(), **{k: v for k, v in knobs_given.items() if v is not None}}  # as build does
            cfg = BuildConfig(task=task, target=t, out=Path(f"build/bench-{name}-{tname}"),
                              prune=PruneConfig(method=args.method, experts=1, **{
                                  "recovery_steps": 200, "ffn_keep": 1.0, "drop_layers": 0, "heads_keep": 1.0, **knobs}),
                              latency_iters=args.latency_iters, command="scripts/benchmark.py")
            try:
                art, report = build(cfg)
                ok = True
            except BudgetError:
                art = cfg.out.parent / f"{cfg.out.name}.rejected"
                report = json.loads((art / "report.json").read_text())
                ok = False
            dense_art = stage_export(cfg, ddir, va)
            art_model = artifact_model(art)
            vocab = (report["prune"].get("vocab") or {}).get("kept")
            art_va = encode(DataSpec().load(task, "validation"), load_tokenizer(art), task.max_length) if vocab else va
            row = {"task": name, "target": tname, "budgets_hold": ok, "violations": report["violations"],
                   "original": {"accuracy": report["quality"]["original_accuracy"],
                                "size_mb": report["size"]["original_mb"]},
                   "artifact": accuracy_row(art_model, ref, art_va, t),
                   "dense_baseline": accuracy_row(dense_art / "model.onnx", ref, va, t)}
            paths = {"artifact": art_model, "dense_baseline": dense_art / "model.onnx"}
            if t.quantization.precision.startswith("int8"):  # the peer is optimum-cli's int8 (CPU targets)
                peer = dense_peer(ddir, tname, t.export.opset)
                row["optimum_cli_peer"] = accuracy_row(peer, ref, va, t)
                paths["optimum_cli_peer"] = peer
            if tname != "mobile-gpu":
                fp32 = replace(t, quantization=replace(t.quantization, precision="fp32"),
                               optimization=replace(t.optimization, fuse=False),
                               runtime=replace(t.runtime, ort_format=False, mobile_usability=False))
                try:
                    full = stage_export(replace(cfg, target=fp32), odir, va) / "model.onnx"
                    row["original_onnx_fp32"] = accuracy_row(full, ref, va, fp32)
                    paths["original_onnx_fp32"] = full
                except Exception as exc:  # report, do not hide
                    row["original_onnx_fp32"] = {"error": f"{type(exc).__name__}: {exc}"}
            measure_speed(row, original, paths, t, args.latency_iters, {"artifact": vocab})
            o = row["original"]
            for key in ("artifact", "dense_baseline", "optimum_cli_peer", "original_onnx_fp32"):
                r = row.get(key)
                if r and "p50_ms" in r:
                    r["p50_speedup"] = round(o["p50_ms"] / r["p50_ms"], 2)
                    r["size_ratio"] = round(o["size_mb"] / r["size_mb"], 2)
            a, d = row["artifact"], row["dense_baseline"]
            row["artifact_vs_dense"] = {"p50": round(a["p50_ms"] / d["p50_ms"], 3),
                                        "size": round(a["size_mb"] / d["size_mb"], 3)}
            if "optimum_cli_peer" in row:
                pr = row["optimum_cli_peer"]
                row["artifact_vs_peer"] = {"p50": round(a["p50_ms"] / pr["p50_ms"], 3),
                                           "size": round(a["size_mb"] / pr["size_mb"], 3)}
            row["knobs"] = {k: v for k, v in cfg.prune.to_dict().items()
                            if k in ("recovery_steps", "ffn_keep", "drop_layers", "heads_keep", "vocab_reserve")}
            rows.append(row)
            print(json.dumps(row), flush=True)
            write(args, rows)


def write(args, rows) -> None:
    cmd = command_line()
    lines = ["# Benchmark: original MoE vs edgeprune artifact", "", f"Produced by `{cmd}` on the build host "
             "(2 cores); latency at batch 1, 64 tokens, 1 thread (a proxy for the device); throughput at batch 32; "
             "all models of a row timed in the same process in alternating rounds. "
             "Accuracy on the full validation split. Method: " + args.method + ", k = 1 (folded); each row's "
             "structural knobs (the target's [prune] preset unless given on the command line) are listed under it.", "",
             "| task | target | model | accuracy | agreement | size MB | p50 ms | p95 ms | batch-32 /s | p50 speed-up | size ratio |",
             "|" + " --- |" * 11]
    for r in rows:
        for key, label in (("original", "original MoE, PyTorch fp32"), ("artifact", "edgeprune artifact"),
                           ("dense_baseline", "dense baseline, same export"),
                           ("optimum_cli_peer", "dense baseline, exported + quantized as optimum-cli does (the peer)"),
                           ("original_onnx_fp32", "original MoE, ONNX fp32, all experts")):
            m = r.get(key)
            if not m:
                continue
            if "error" in m:
                lines.append(f"| {r['task']} | {r['target']} | {label} | export failed: {m['error'][:80]} | | | | | | | |")
                continue
            lines.append(f"| {r['task']} | {r['target']} | {label} | {m.get('accuracy', '')} | {m.get('agreement', '')} | "
                         f"{m['size_mb']} | {m['p50_ms']} | {m['p95_ms']} | {m.get('throughput_per_s') or ''} | "
                         f"{m.get('p50_speedup', '')} | {m.get('size_ratio', '')} |")
        lines.append(f"| {r['task']} | {r['target']} | artifact / dense baseline | | | {r['artifact_vs_dense']['size']} | "
                     f"{r['artifact_vs_dense']['p50']} | | | | |")
        lines.append(f"| {r['task']} | {r['target']} | knobs: " + ", ".join(f"{k} {v}" for k, v in r.get("knobs", {}).items())
                     + " | | | | | | | | |")
        if "artifact_vs_peer" in r:
            lines.append(f"| {r['task']} | {r['target']} | artifact / optimum-cli peer | | | {r['artifact_vs_peer']['size']} | "
                         f"{r['artifact_vs_peer']['p50']} | | | | |")
    write_results(args.out, {"rows": rows}, lines)


if __name__ == "__main__":
    main()
