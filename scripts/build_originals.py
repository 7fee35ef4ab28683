"""Build the original MoEs and the dense baselines for each task and write a results file.

    python scripts/build_originals.py                      # sst2 agnews mnli, upcycled and BTX -> results/originals
    python scripts/build_originals.py --tasks sst2 --recipes upcycle --experts 8 16 32 --out results/originals_z16_z32

Records, per task and recipe: validation accuracy of the original MoE and of the dense baselines (the packaged
MiniLM fine-tuned with the same budget; for BTX also its dense twin, the MiniLM given the same masked-LM budget on
the mixture of domains first), parameters, size on disk, fine-tune wall time, per-layer expert usage on validation,
and whether the experts specialise: the mean pairwise Jensen-Shannon divergence between the domains' expert usage
per MoE layer (:mod:`edgeprune.originals.specialisation`), on held-aside training text of every shipped domain,
for the pretrained MoE and for the task-fine-tuned original. Every model is cached (``$EDGEPRUNE_CACHE``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform

import torch

from edgeprune.models.checkpoint import load_meta
from edgeprune.originals.btx import BtxRecipe
from edgeprune.originals.classifier import OriginalSpec, ensure_original, ensure_pretrained
from edgeprune.tasks import get_task
from edgeprune.validate.results import command_line, write_results


def balance(usage: list[float]) -> float:
    """Normalised entropy of the usage distribution: 1 = perfectly balanced, 0 = collapsed."""
    h = -sum(u * math.log(u) for u in usage if u > 0)
    return h / math.log(len(usage)) if len(usage) > 1 else 1.0


def specialisation_of(model_dir, recipe: BtxRecipe) -> dict:
    """Usage by domain and mean pairwise JS per layer of the MoE in ``model_dir`` on the held-aside domain text."""
    from transformers import AutoModel

    from edgeprune.models.tokenizer import load_tokenizer
    from edgeprune.originals.btx import domain_chunks
    from edgeprune.originals.specialisation import specialisation, usage_by_domain

    tok = load_tokenizer(model_dir)
    held = domain_chunks(recipe, tok, train=False)[1]
    body = AutoModel.from_pretrained(model_dir)
    body = getattr(body, "bert", body)
    usage = usage_by_domain(body, held)
    return {"usage": {str(k): v for k, v in usage.items()}, "js": specialisation(usage)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["sst2", "agnews", "mnli"])
    ap.add_argument("--recipes", nargs="+", choices=["upcycle", "btx"], default=["upcycle", "btx"])
    ap.add_argument("--experts", nargs="+", type=int, default=[8], help="Z of the upcycled originals")
    ap.add_argument("--dense-twin", action=argparse.BooleanOptionalAction, default=True,
                    help="for btx: also the dense twin of equal masked-LM budget (about as long as BTX itself)")
    ap.add_argument("--btx-drop-fraction", type=float, default=0.0,
                    help="the BTX branches' Drop-Upcycling share (BtxRecipe.drop_fraction)")
    ap.add_argument("--out", default="results/originals")
    args = ap.parse_args()
    recipe = BtxRecipe(drop_fraction=args.btx_drop_fraction)
    rows, special = [], {}
    for name in args.tasks:
        task = get_task(name)
        dense_dir = ensure_original(OriginalSpec(task, kind="dense"))
        dense = load_meta(dense_dir)
        specs = [OriginalSpec(task, kind="moe", num_experts=z) for z in args.experts] if "upcycle" in args.recipes else []
        specs += [OriginalSpec(task, kind="moe", btx=recipe)] if "btx" in args.recipes else []
        for spec in specs:
            moe_dir = ensure_original(spec)
            moe = load_meta(moe_dir)
            twin = None
            if spec.btx is not None and args.dense_twin:
                twin = load_meta(ensure_original(OriginalSpec(task, kind="dense", btx=recipe)))
            usage = {layer: r["usage"] for layer, r in moe["routing_validation"].items()}
            key = f"{spec.recipe} Z={spec.num_experts}"
            if key not in special:
                special[key] = {"pretrained": specialisation_of(ensure_pretrained(spec), recipe)}
            special[key][name] = specialisation_of(moe_dir, recipe)
            rows.append({"task": name, "recipe": spec.recipe, "experts": spec.num_experts,
                         "moe_accuracy": moe["validation_accuracy"], "dense_accuracy": dense["validation_accuracy"],
                         "twin_accuracy": twin["validation_accuracy"] if twin else None,
                         "moe_parameters": moe["parameters"], "dense_parameters": dense["parameters"],
                         "moe_size_mb": round(moe["size_bytes"] / 1e6, 1),
                         "dense_size_mb": round(dense["size_bytes"] / 1e6, 1), "moe_seconds": moe["train"]["seconds"],
                         "dense_seconds": dense["train"]["seconds"], "steps": moe["train"]["steps"],
                         "usage": usage, "balance": {k: round(balance(u), 3) for k, u in usage.items()},
                         "js": special[key][name]["js"], "moe_dir": str(moe_dir), "dense_dir": str(dense_dir)})
            print(json.dumps(rows[-1]), flush=True)
    write(args, rows, special, recipe)


def write(args, rows, special, recipe: BtxRecipe) -> None:
    meta = {"host": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "torch_threads": torch.get_num_threads(), "btx_recipe": recipe.to_dict()}
    lines = ["# Originals and dense baselines", "", f"Produced by `{command_line()}` ({meta['host']}).",
             "Validation split of each task (agnews: a fixed seeded 10% of train). Batch 32, bf16 autocast where the "
             "CPU has it, word embeddings frozen. `upcycle`: MiniLM-L6 upcycled (every other layer, drop-upcycling "
             "r=0.2). `btx`: Branch-Train-MiX (`edgeprune/originals/btx.py`): one expert per shipped domain, "
             f"branches of {recipe.branch_steps} masked-LM steps, {recipe.mix_steps} steps of the mixed MoE. "
             "`dense` = the packaged MiniLM fine-tuned with the same budget; `dense twin` = the MiniLM first given "
             "BTX's masked-LM budget on the mixture of domains, then fine-tuned alike (the fair dense peer of BTX).",
             "", "| task | recipe | Z | steps | MoE acc | dense acc | dense twin acc | MoE params | dense params | MoE MB "
             "| MoE s | load balance per MoE layer (1 = uniform) | domains' JS per MoE layer (ln 2 = 0.693) |",
             "|" + " --- |" * 13]
    for r in rows:
        twin = "" if r["twin_accuracy"] is None else f"{r['twin_accuracy']:.4f}"
        lines.append(f"| {r['task']} | {r['recipe']} | {r['experts']} | {r['steps']} | {r['moe_accuracy']:.4f} | "
                     f"{r['dense_accuracy']:.4f} | {twin} | {r['moe_parameters'] / 1e6:.1f}M | "
                     f"{r['dense_parameters'] / 1e6:.1f}M | {r['moe_size_mb']} | {r['moe_seconds']} | "
                     f"{', '.join(f'L{k}: {v}' for k, v in r['balance'].items())} | "
                     f"{', '.join(f'L{k}: {v:.3f}' for k, v in r['js'].items())} |")
    lines += ["", "## Do the experts specialise?", "",
              "Mean pairwise Jensen-Shannon divergence between the domains' top-1 expert usage, per MoE layer, on "
              f"{recipe.held_texts} held-aside training texts of each domain ({', '.join(recipe.domains[1:])}); "
              "0 = every domain routed alike, ln 2 = 0.693 = disjoint experts.", "",
              "| original | model | " + " | ".join(f"L{k}" for k in next(iter(special.values()))["pretrained"]["js"])
              + " |", "|" + " --- |" * (2 + len(next(iter(special.values()))["pretrained"]["js"]))]
    for key, per in special.items():
        for model, sp in per.items():
            what = "pretrained MoE (before the task)" if model == "pretrained" else f"fine-tuned on {model}"
            lines.append(f"| {key} | {what} | " + " | ".join(f"{v:.3f}" for v in sp["js"].values()) + " |")
    for key, per in special.items():
        lines += ["", f"Expert usage by domain, {key}, pretrained MoE (share of each domain's tokens per expert):", ""]
        for layer, by_domain in per["pretrained"]["usage"].items():
            for d, u in by_domain.items():
                lines.append(f"- layer {layer}, {d}: {', '.join(f'{x:.2f}' for x in u)}")
    lines += ["", "Per-layer expert usage of the original on its task's validation split (share of tokens per expert):",
              ""]
    for r in rows:
        for layer, u in r["usage"].items():
            lines.append(f"- {r['task']} {r['recipe']} Z={r['experts']} layer {layer}: {', '.join(f'{x:.3f}' for x in u)}")
    write_results(args.out, {"meta": meta, "rows": rows, "specialisation": special}, lines)
    print(f"wrote {args.out}.md and {args.out}.json")


if __name__ == "__main__":
    main()
