"""Weight precision of the folded artifact: ONNX Runtime's dynamic int8 (what the CPU targets ship) against its
block-wise weight-only quantizer (``MatMulNBits`` for the linear layers, ``GatherBlockQuantized`` for the word
embedding), 4 and 8 bits, side by side in one run (issue 13's "weights" knob).

    python scripts/weight_bits.py                 # -> results/weight_bits.md / .json

The default sst2 build's pruned (folded, recovered) model from the cache, exported once in fp32 without the
transformer fusions (a fused Attention node hides its weights from ``MatMulNBits``), then quantized each way.
Per variant: size, accuracy and agreement with the original MoE on the whole validation split, p50 latency at
batch 1, 64 tokens, 1 thread, all variants timed in alternating rounds (validate.interleaved).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx

from edgeprune.build.config import BuildConfig

from edgeprune.build.stage import stage_prune
from edgeprune.cache import dir_sha256
from edgeprune.export.onnx_export import export_onnx, onnx_logits
from edgeprune.export.quantize import quantize, weight_only
from edgeprune.targets import load_target
from edgeprune.models.registry import load_classifier
from edgeprune.tasks.spec import DataSpec
from edgeprune.originals.classifier import OriginalSpec, ensure_original
from edgeprune.models.loading import load_model
from edgeprune.validate.results import command_line, write_results
from edgeprune.tasks import get_task
from edgeprune.models.tokenizer import load_tokenizer
from edgeprune.tasks.encoding import encode
from edgeprune.training.loop import predict_logits
from edgeprune.validate.classifier import interleaved, onnx_runner, percentiles


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--out", default="results/weight_bits")
    args = ap.parse_args()
    task, data = get_task(args.task), DataSpec()
    target = load_target("x86_64")
    original_dir = ensure_original(OriginalSpec(task, data, "moe"))
    cfg = BuildConfig(task=task, target=target, out=Path("unused"), data=data)
    pruned_dir = stage_prune(cfg, original_dir, dir_sha256(original_dir))
    original = load_model(original_dir, task=task)
    enc = encode(data.load(task, "validation"), load_tokenizer(original_dir), task.max_length)
    ref = predict_logits(original, enc, progress=True, desc="original")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = load_classifier(pruned_dir)
        fp32 = tmp / "fp32.onnx"
        export_onnx(model, pruned_dir, fp32, target)
        variants = {"fp32 (no quantization)": fp32}
        int8 = tmp / "int8.onnx"
        quantize(fp32, int8, target, calib=enc)
        variants["int8 dynamic, per channel (the x86_64 / arm64 targets)"] = int8
        for bits, gather in ((8, False), (4, False), (4, True)):  # ORT's Gather quantization is 4-bit only
            path = tmp / f"nbits{bits}{'g' if gather else ''}.onnx"
            weight_only(fp32, path, bits, ("MatMul", "Gather") if gather else ("MatMul",), accuracy_level=4)
            name = f"MatMulNBits {bits}-bit, block 32" + (f" + GatherBlockQuantized {bits}-bit embedding" if gather
                                                           else " (embedding fp32)")
            variants[name] = path
        # int8 dynamic for the linear layers (fast with VNNI) and a 4-bit block-quantized embedding (small)
        g4, mixed = tmp / "gather4.onnx", tmp / "mixed.onnx"
        weight_only(fp32, g4, 4, ("Gather",))
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(g4), str(mixed), op_types_to_quantize=["MatMul"], per_channel=True,
                         weight_type=QuantType.QInt8,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})  # shape inference stops at contrib ops
        variants["int8 dynamic linear layers + GatherBlockQuantized 4-bit embedding"] = mixed
        runners = {n: onnx_runner(p, 1, 64, 1, model.config.vocab_size) for n, p in variants.items()}
        ms = interleaved(runners, 1, max(3, args.iters // 10), args.iters)
        for name, path in variants.items():
            got = onnx_logits(path, enc)
            rows.append({"variant": name, "size_mb": round(path.stat().st_size / 1e6, 2),
                         "accuracy": round(float((got.argmax(-1) == np.asarray(enc.labels)).mean()), 4),
                         "agreement_with_original": round(float((got.argmax(-1) == ref.argmax(-1)).mean()), 4),
                         **percentiles(ms[name])})
            print(rows[-1], flush=True)
    orig_acc = round(float((ref.argmax(-1) == np.asarray(enc.labels)).mean()), 4)
    md = ["# Weight precision of the folded artifact", "", f"Command: `{command_line()}`", "",
          f"Task {task.name}, the default build's folded and recovered model (reap, k = 1, 200 recovery steps), "
          f"validation split ({len(enc)} examples; the original MoE: accuracy {orig_acc}). Exported in fp32 "
          "without transformer fusions, then quantized by ONNX Runtime each way; latency p50 / p95 at batch 1, 64 "
          "tokens, 1 thread on the build host, all variants in alternating rounds.", "",
          "| variant | size MB | accuracy | agreement with the original | p50 ms | p95 ms |",
          "| --- | --- | --- | --- | --- | --- |"]
    md += [f"| {r['variant']} | {r['size_mb']} | {r['accuracy']} | {r['agreement_with_original']} | {r['p50_ms']} | "
           f"{r['p95_ms']} |" for r in rows]
    write_results(args.out, {"original_accuracy": orig_acc, "rows": rows}, md)
    print("\n".join(md))


if __name__ == "__main__":
    main()
