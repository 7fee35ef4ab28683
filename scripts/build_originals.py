"""Build the original MoE and the dense baseline for each task and write a results file.

    python scripts/build_originals.py                      # sst2, agnews, rte -> results/originals.md/.json
    python scripts/build_originals.py --tasks sst2 --experts 8 16 32

Records, per task: validation accuracy of the original MoE and of the dense baseline, parameters, size on
disk, fine-tune wall time, and per-layer expert usage (load balance) of the original on validation.
Both models are cached (``$EDGEPRUNE_CACHE``): later commands reuse them.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform

import torch

from edgeprune.originals.classifier import OriginalSpec, ensure_original

from edgeprune.models.checkpoint import load_meta
from edgeprune.validate.results import command_line, write_results
from edgeprune.tasks import get_task


def balance(usage: list[float]) -> float:
    """Normalised entropy of the usage distribution: 1 = perfectly balanced, 0 = collapsed."""
    h = -sum(u * math.log(u) for u in usage if u > 0)
    return h / math.log(len(usage)) if len(usage) > 1 else 1.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["sst2", "agnews", "rte"])
    ap.add_argument("--experts", nargs="+", type=int, default=[8])
    ap.add_argument("--out", default="results/originals")
    args = ap.parse_args()
    rows = []
    for name in args.tasks:
        task = get_task(name)
        dense_dir = ensure_original(OriginalSpec(task, kind="dense"))
        dense = load_meta(dense_dir)
        for z in args.experts:
            moe_dir = ensure_original(OriginalSpec(task, kind="moe", num_experts=z))
            moe = load_meta(moe_dir)
            usage = {layer: r["usage"] for layer, r in moe["routing_validation"].items()}
            rows.append({"task": name, "experts": z, "moe_accuracy": moe["validation_accuracy"],
                         "dense_accuracy": dense["validation_accuracy"], "moe_parameters": moe["parameters"],
                         "dense_parameters": dense["parameters"], "moe_size_mb": round(moe["size_bytes"] / 1e6, 1),
                         "dense_size_mb": round(dense["size_bytes"] / 1e6, 1), "moe_seconds": moe["train"]["seconds"],
                         "dense_seconds": dense["train"]["seconds"], "steps": moe["train"]["steps"],
                         "usage": usage, "balance": {k: round(balance(u), 3) for k, u in usage.items()},
                         "moe_dir": str(moe_dir), "dense_dir": str(dense_dir)})
            print(json.dumps(rows[-1]), flush=True)
    cmd = command_line()
    meta = {"host": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "torch_threads": torch.get_num_threads()}
    lines = ["# Originals and dense baselines", "", f"Produced by `{cmd}` ({meta['host']}).",
             "Validation split of each task (agnews: a fixed seeded 10% of train). Batch 32, bf16 autocast,",
             "word embeddings frozen; the MoE is MiniLM-L6 upcycled (every other layer, drop-upcycling r=0.2).", "",
             "| task | Z | steps | MoE acc | dense acc | MoE params | dense params | MoE MB | dense MB | MoE s | dense s | "
             "load balance per MoE layer (1 = uniform) |", "|" + " --- |" * 12]
    for r in rows:
        lines.append(f"| {r['task']} | {r['experts']} | {r['steps']} | {r['moe_accuracy']:.4f} | {r['dense_accuracy']:.4f} | "
                     f"{r['moe_parameters'] / 1e6:.1f}M | {r['dense_parameters'] / 1e6:.1f}M | {r['moe_size_mb']} | "
                     f"{r['dense_size_mb']} | {r['moe_seconds']} | {r['dense_seconds']} | "
                     f"{', '.join(f'L{k}: {v}' for k, v in r['balance'].items())} |")
    lines += ["", "Per-layer expert usage of the original on validation (share of tokens per expert):", ""]
    for r in rows:
        for layer, u in r["usage"].items():
            lines.append(f"- {r['task']} Z={r['experts']} layer {layer}: {', '.join(f'{x:.3f}' for x in u)}")
    write_results(args.out, {"meta": meta, "rows": rows}, lines)
    print(f"wrote {args.out}.md and {args.out}.json")


if __name__ == "__main__":
    main()
