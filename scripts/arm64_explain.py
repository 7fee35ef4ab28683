"""Where an int8 artifact's arm64 logits part from x86_64's: the same pruned model quantized step by step, each graph
run on ONNX Runtime's arm64 kernels (emulated neoverse-n1) and on the host, on the same batches.

    python scripts/arm64_explain.py ARTIFACT PRUNED_CHECKPOINT --limit 300 --out results/arm64_explain

PRUNED_CHECKPOINT is the build's prune stage (``<cache>/stages/prune-*``, the checkpoint the artifact was exported
from). Graphs, each a copy of ARTIFACT with its model file replaced: the fused fp32 graph; int8 dynamic on MatMul
only; int8 on MatMul and the fused Attention (QAttention); that plus the 4-bit GatherBlockQuantized embedding (what
the arm64 profile ships). The step at which the difference jumps is the kernel path that differs.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic

from edgeprune.build.classifier_export import attention_shape, ort_model_type
from edgeprune.export.onnx_export import export_onnx
from edgeprune.export.quantize import gather_4bit, mark_disabled_optimizers, optimize
from edgeprune.models.registry import find_adapter, load_classifier
from edgeprune.targets import load_target
from edgeprune.validate.arm64 import validate_on_arm64


def graphs(pruned: Path, target_name: str, tmp: Path) -> dict[str, Path]:
    t = load_target(target_name)
    model = load_classifier(pruned)
    export_onnx(model, pruned, tmp / "fp32.onnx", t)
    optimize(tmp / "fp32.onnx", tmp / "opt.onnx", replace(t, quantization=replace(t.quantization, embedding_bits=4)),
             *attention_shape(model.config), ort_model_type(model, find_adapter(model.config.model_type)))
    out = {"fp32 (fused)": tmp / "opt.onnx"}
    opts = dict(per_channel=t.quantization.per_channel, reduce_range=t.quantization.reduce_range,
                weight_type=QuantType.QInt8, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    quantize_dynamic(str(tmp / "opt.onnx"), str(tmp / "mm.onnx"), op_types_to_quantize=["MatMul"], **opts)
    out["int8 MatMul"] = tmp / "mm.onnx"
    quantize_dynamic(str(tmp / "opt.onnx"), str(tmp / "att.onnx"), op_types_to_quantize=["MatMul", "Attention"], **opts)
    out["int8 MatMul + Attention"] = tmp / "att.onnx"
    gather_4bit(tmp / "opt.onnx", tmp / "emb4.onnx")
    quantize_dynamic(str(tmp / "emb4.onnx"), str(tmp / "ship.onnx"), op_types_to_quantize=["MatMul", "Attention"],
                     **opts)
    out["+ 4-bit embedding (shipped)"] = tmp / "ship.onnx"
    gather_4bit(tmp / "opt.onnx", tmp / "emb4_only.onnx")
    out["fp32 + 4-bit embedding only"] = tmp / "emb4_only.onnx"
    for p in out.values():
        mark_disabled_optimizers(p, t.optimization.ort_disabled_optimizers)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("pruned", type=Path)
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument("--cpu", default="neoverse-n1")
    ap.add_argument("--out", type=Path, default=Path("results/arm64_explain"))
    args = ap.parse_args()
    manifest = json.loads((args.artifact / "edgeprune.json").read_text())
    rows = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name, graph in graphs(args.pruned, manifest["target"], tmp).items():
            art = tmp / "art"
            shutil.rmtree(art, ignore_errors=True)
            shutil.copytree(args.artifact, art, ignore=shutil.ignore_patterns("model.ort", "demo"))
            shutil.copy(graph, art / "onnx" / "model_quantized.onnx")
            m = {**manifest, "model_file": "onnx/model_quantized.onnx"}
            (art / "edgeprune.json").write_text(json.dumps(m))
            res = validate_on_arm64(art, [args.cpu], limit=args.limit, record=False)
            rows[name] = res["cpus"][args.cpu]
            print(name, rows[name]["max_abs_logit_diff"], flush=True)
    Path(f"{args.out}.json").write_text(json.dumps(rows, indent=1))
    lines = ["# Where the arm64 logits part from x86_64's", "",
             f"`python scripts/arm64_explain.py {args.artifact} {args.pruned} --limit {args.limit} --out {args.out}`: "
             f"{manifest['task']} / {manifest['target']}, {args.limit} validation examples in batches of 32, emulated "
             f"{args.cpu} (arm64 build of ONNX Runtime) against the host's x86_64 build. Each row is a copy of the "
             "artifact with its graph replaced, from the same pruned checkpoint.", "",
             "| graph | max logit diff | mean logit diff | agreement | accuracy arm64 | accuracy x86_64 |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {n} | {r['max_abs_logit_diff']} | {r['mean_abs_logit_diff']} | {r['agreement']} | "
              f"{r['accuracy_arm64']} | {r['accuracy_x86_64']} |" for n, r in rows.items()]
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}.md")


if __name__ == "__main__":
    main()
