"""results/moe_operators.md: how a k > 1 artifact stores and runs its experts, side by side at realistic widths.

    python scripts/moe_operators.py --out results/moe_operators

A Mixtral-shaped classifier (hidden 1024 x 2 layers and 2048 x 1, FFN 3.5x, 8 experts, random weights: speed, size and
parity do not depend on training) is pruned to 4 experts with top-2 and to 2 of 2, then exported through the build's
own export and quantization (``export_onnx``, ``optimize``, ``quantize``) with each ``[export].moe_operator`` of the
x86_64 profile: ``dense`` (dense dispatch, int8 MatMuls), ``ort`` (com.microsoft.MoE, fp32 experts), ``qmoe`` with
8- and 4-bit experts. For each: file size and its ratio to the fp32 original (8 experts), p50 latency at batch 1 x
128 tokens with 1 and 2 threads (ratios to dense dispatch in the same run, interleaved rounds), and parity with
PyTorch's fp32 logits of the pruned model (max abs difference, label agreement on 64 random inputs).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from transformers import MixtralConfig, MixtralForSequenceClassification

from edgeprune.build.classifier_export import ort_model_type
from edgeprune.export.onnx_export import export_onnx
from edgeprune.export.quantize import optimize, quantize
from edgeprune.models.registry import adapter_for
from edgeprune.pruning.apply import apply_plan
from edgeprune.pruning.plan import LayerPlan, PrunePlan
from edgeprune.targets import load_target

VARIANTS = {"dense": ("dense", 8), "ort (fp32 experts)": ("ort", 8), "qmoe int8": ("qmoe", 8), "qmoe int4": ("qmoe", 4)}


def original(hidden: int, layers: int, seed: int = 0) -> MixtralForSequenceClassification:
    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=8000, hidden_size=hidden, intermediate_size=int(hidden * 3.5),
                        num_hidden_layers=layers,
                        num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256), num_local_experts=8,
                        num_experts_per_tok=2, max_position_embeddings=512, num_labels=3, pad_token_id=0)
    return MixtralForSequenceClassification(cfg).eval()


def pruned(model, keep: int):
    adapter = adapter_for(model.config)
    layers = [LayerPlan(l, adapter.num_experts(b), [0.0] * adapter.num_experts(b), [[(e, 1.0)] for e in range(keep)])
              for l, b in adapter.blocks(model).items()]
    return apply_plan(model, PrunePlan("first-k", layers), fold=False)


def inputs(n: int, length: int, seed: int = 1) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    ids = g.integers(5, 8000, (n, length)).astype(np.int64)
    mask = np.ones_like(ids)
    return {"input_ids": ids, "attention_mask": mask}


def session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def build(model, tmp: Path, name: str, op: str, bits: int) -> tuple[Path, dict]:
    base = load_target("x86_64")
    t = replace(base, export=replace(base.export, moe_operator=op),
                quantization=replace(base.quantization, moe_bits=bits, embedding_bits=8))
    fp32, opt, out = tmp / f"{name}.fp32.onnx", tmp / f"{name}.opt.onnx", tmp / f"{name}.onnx"
    start = time.perf_counter()
    exporter = export_onnx(model, tmp, fp32, t)
    optimize(fp32, opt, t, model.config.num_attention_heads, model.config.hidden_size,
             ort_model_type(model, adapter_for(model.config)))
    info = quantize(opt, out, t)
    fp32.unlink()
    opt.unlink()
    return out, {"exporter": exporter, "experts_storage": info.get("experts", ""),
                 "seconds": round(time.perf_counter() - start)}


def latency(sessions: dict, feed: dict, rounds: int, per_round: int) -> dict:
    """p50 of each session, rounds interleaved so that load on the machine hits every variant alike."""
    times = {k: [] for k in sessions}
    for s in sessions.values():
        s.run(["logits"], feed)
    for _ in range(rounds):
        for k, s in sessions.items():
            for _ in range(per_round):
                t0 = time.perf_counter()
                s.run(["logits"], feed)
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def measure(hidden: int, layers: int, keep: int, rounds: int) -> list[dict]:
    orig = original(hidden, layers)
    orig_mb = sum(p.numel() * 4 for p in orig.parameters()) / 2**20
    model = pruned(orig, keep)
    parity_in = inputs(64, 32)
    with torch.no_grad():
        want = model(**{k: torch.from_numpy(v) for k, v in parity_in.items()}).logits.numpy()
    rows, paths = [], {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name, (op, bits) in VARIANTS.items():
            path, info = build(model, tmp, name.split()[0] + str(bits), op, bits)
            paths[name] = path
            got = np.concatenate([session(path, 2).run(["logits"], {k: v[i:i + 16] for k, v in parity_in.items()})[0]
                                  for i in range(0, 64, 16)])
            rows.append({"hidden": hidden, "layers": layers, "experts": f"{keep} of 8, top-2", "variant": name, **info,
                         "mb": round(path.stat().st_size / 2**20, 1), "x_smaller_than_original": 0.0,
                         "max_abs_logit_diff": float(f"{np.abs(got - want).max():.3g}"),
                         "agreement": float((got.argmax(-1) == want.argmax(-1)).mean())})
            rows[-1]["x_smaller_than_original"] = round(orig_mb / rows[-1]["mb"], 2)
            print(f"hidden {hidden}, {keep} experts, {name}: {rows[-1]['mb']} MB, parity "
                  f"{rows[-1]['max_abs_logit_diff']}", flush=True)
        feed = inputs(1, 128)
        for threads in (1, 2):
            p50 = latency({k: session(p, threads) for k, p in paths.items()}, feed, rounds, 5)
            for r in rows:
                r[f"p50_ms_{threads}t"] = round(p50[r["variant"]], 2)
                r[f"vs_dense_{threads}t"] = round(p50["dense"] / p50[r["variant"]], 2)
    for r in rows:
        r["original_fp32_mb"] = round(orig_mb, 1)
    return rows


def table(rows: list[dict]) -> str:
    head = ("| hidden x layers | experts | variant | MB | x smaller than fp32 original | p50 ms 1 thread | "
            "speed vs dense 1t | "
            "p50 ms 2 threads | speed vs dense 2t | max logit diff | agreement |\n|" + "---|" * 11 + "\n")
    return head + "".join(
        f"| {r['hidden']} x {r['layers']} | {r['experts']} | {r['variant']} | {r['mb']} | "
        f"{r['x_smaller_than_original']} | "
        f"{r['p50_ms_1t']} | {r['vs_dense_1t']}x | {r['p50_ms_2t']} | {r['vs_dense_2t']}x | "
        f"{r['max_abs_logit_diff']} | {r['agreement']} |\n" for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 1], help="layers at each --hidden")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--out", type=Path, default=Path("results/moe_operators"))
    args = ap.parse_args()
    rows = []
    for hidden, layers in zip(args.hidden, args.layers):
        for keep in (4, 2):
            rows += measure(hidden, layers, keep, args.rounds)
    Path(f"{args.out}.json").write_text(json.dumps({"onnxruntime": ort.__version__, "rows": rows}, indent=1))
    Path(f"{args.out}.md").write_text(
        "# k > 1 experts: dense dispatch, com.microsoft.MoE and QMoE side by side\n\n"
        f"`python scripts/moe_operators.py --hidden {' '.join(map(str, args.hidden))} --layers "
        f"{' '.join(map(str, args.layers))} --out {args.out}` (ONNX Runtime "
        f"{ort.__version__}, CPU provider, this host). {__doc__.split(chr(10), 3)[3]}\n" + table(rows))
    print(f"wrote {args.out}.md")


if __name__ == "__main__":
    main()
