"""Every pruning method at k = 1, 2, 4 (Z = 8) on each task: validation accuracy before and after recovery,
against the original and the dense baseline. Writes results/prune_table.{md,json}.

    python scripts/prune_table.py                                   # sst2 agnews rte, Z = 8
    python scripts/prune_table.py --tasks sst2 --experts 16 32 --factors 2 4 8 --out results/prune_factors

CPU budget (2 cores): calibration on --calibration-examples training examples, --recovery-steps steps of
recovery (distilled from the original, alpha 0.5), accuracy on the first --eval-examples validation examples
(seeded subsample); the header of the results file states the settings used. The defaults are the settings
of the committed results/prune_table_*.md and results/prune_factors.md (about 30-60 s a cell on 2 cores).
"""
from __future__ import annotations

import argparse
import json
import time

from edgeprune.tasks.spec import DataSpec

from edgeprune.originals.classifier import OriginalSpec, ensure_original

from edgeprune.models.checkpoint import load_meta
from edgeprune.pruning.apply import apply_plan
from edgeprune.pruning import methods
from edgeprune.pruning.config import PruneConfig
from edgeprune.models.loading import load_model
from edgeprune.pruning.pipeline import prune, score
from edgeprune.pruning.recover import recover
from edgeprune.validate.results import command_line, write_results
from edgeprune.tasks import get_task
from edgeprune.models.tokenizer import load_tokenizer
from edgeprune.tasks.encoding import encode
from edgeprune.training.loop import TeacherCache, accuracy, predict_logits

METHODS = ["random", "frequency", "chen2022", "chowdhury2024", "reap", "uncurl", "chen2022-progressive",
           "chen2022-eager"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["sst2", "agnews", "rte"])
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--experts", nargs="+", type=int, default=[8], help="Z of the originals")
    ap.add_argument("--ks", nargs="+", type=int, default=[1, 2, 4], help="experts kept (with Z = 8)")
    ap.add_argument("--factors", nargs="*", type=int, default=[], help="pruning factors Z/k instead of --ks")
    ap.add_argument("--calibration-examples", type=int, default=256)
    ap.add_argument("--recovery-steps", type=int, default=60)
    ap.add_argument("--eval-examples", type=int, default=1000)
    ap.add_argument("--out", default="results/prune_table")
    args = ap.parse_args()
    rows = []
    for name in args.tasks:
        task = get_task(name)
        data = DataSpec()
        dense = load_meta(ensure_original(OriginalSpec(task, kind="dense")))
        val = data.load(task, "validation", limit=args.eval_examples)
        for z in args.experts:
            odir = ensure_original(OriginalSpec(task, kind="moe", num_experts=z))
            original = load_model(odir)
            tok = load_tokenizer(odir)
            va = encode(val, tok, task.max_length)
            tr = encode(data.load(task, "train"), tok, task.max_length)
            orig_acc = accuracy(predict_logits(original, va), va.labels)
            teacher = TeacherCache(original)  # same seeded batches in every cell: one teacher pass
            ks = [z // f for f in args.factors] if args.factors else args.ks
            for k in ks:
                for method in args.methods:
                    if method == "chen2022-eager" and k != 1:
                        continue
                    t0 = time.perf_counter()
                    progressive = methods.get(method).progressive
                    cfg = PruneConfig(method=method, experts=k, calibration_examples=args.calibration_examples,
                                      recovery_steps=args.recovery_steps,
                                      method_options={"window": max(5, args.recovery_steps // 8)} if progressive else {})
                    if progressive:
                        model, plan, _ = prune(odir, task, data, cfg, progress=False)
                        before = None
                    else:
                        plan = score(odir, task, data, cfg, model=original, progress=False)
                        model = apply_plan(original, plan)
                        before = accuracy(predict_logits(model, va), va.labels)
                        cfg.method_config().after_apply(model, plan, tr, teacher, cfg, task, progress=False)
                        recover(model, tr, args.recovery_steps, teacher=teacher, max_length=task.max_length,
                                progress=False)
                    after = accuracy(predict_logits(model, va), va.labels)
                    row = {"task": name, "Z": z, "k": k, "factor": z // k, "method": method,
                           "before": None if before is None else round(before, 4), "after": round(after, 4),
                           "original": round(orig_acc, 4), "dense": dense["validation_accuracy"],
                           "retained": round(after / orig_acc, 4), "kept": plan.summary()["kept"],
                           "seconds": round(time.perf_counter() - t0, 1)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    write(args, rows)


def write(args, rows) -> None:
    cmd = command_line()
    settings = (f"calibration {args.calibration_examples} training examples; recovery {args.recovery_steps} steps "
                f"(batch 32, distilled from the original, alpha 0.5); accuracy on {args.eval_examples} validation "
                f"examples (seeded subsample; the dense baseline column is on the full validation split)")
    lines = ["# Expert pruning: methods x k", "", f"Produced by `{cmd}`.", "", f"Settings (CPU budget): {settings}.",
             "`before` = right after pruning (router renormalised / folded), `after` = after recovery;"
             " `retained` = after / original.", "",
             "| task | Z | k | method | before | after | original | dense baseline | retained | kept experts per layer |",
             "|" + " --- |" * 10]
    for r in rows:
        b = "" if r["before"] is None else f"{r['before']:.4f}"
        lines.append(f"| {r['task']} | {r['Z']} | {r['k']} | {r['method']} | {b} | {r['after']:.4f} | "
                     f"{r['original']:.4f} | {r['dense']:.4f} | {r['retained']:.4f} | {r['kept']} |")
    write_results(args.out, {"settings": settings, "rows": rows}, lines)


if __name__ == "__main__":
    main()
