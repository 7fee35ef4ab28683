"""Every registered Hugging Face MoE family through the real pipeline, on random configs large enough to time.

    python scripts/families.py                 # -> results/families.md / .json

Per family: a random sequence-classification checkpoint (hidden 256, 4 layers, 8 experts, the packaged MiniLM
tokenizer, routers drawn N(0, 1) so that tokens spread over the experts), saved with ``save_pretrained``; then
at k = 1 and k = 2 (method reap, calibration on sst2's training split, no recovery: the weights are random,
so accuracy means nothing here and is not reported) `edgeprune build` for x86_64 gives the export path, the
parity with PyTorch and original-vs-artifact size and p50 ratios (batch 1, 64 tokens, 1 thread, original in
PyTorch fp32 and artifact in ONNX Runtime int8, alternating rounds). The fold difference is the max |logit|
difference between the one-expert model and its folded form on 64 sst2 validation sentences.
"""
from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from transformers import (AutoTokenizer, MixtralConfig, MixtralForSequenceClassification, Qwen2MoeConfig,
                          Qwen2MoeForSequenceClassification, Qwen3MoeConfig, Qwen3MoeForSequenceClassification)

from edgeprune.build import BuildConfig, build
from edgeprune.export.targets import Budgets, load_target
from edgeprune.models.upcycle import default_dense_path
from edgeprune.original import DataSpec
from edgeprune.pruning.apply import apply_plan
from edgeprune.pruning.pipeline import PruneConfig, load_model, score
from edgeprune.results import command_line, write_results
from edgeprune.tasks import get_task
from edgeprune.tokenization import load_tokenizer
from edgeprune.training import encode, predict_logits

COMMON = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
              max_position_embeddings=512, num_labels=2, pad_token_id=0, vocab_size=30522)
FAMILIES = {
    "mixtral": (MixtralConfig, MixtralForSequenceClassification,
                dict(intermediate_size=512, num_local_experts=8, num_experts_per_tok=2)),
    "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForSequenceClassification,
                  dict(intermediate_size=1024, moe_intermediate_size=512, num_experts=8, num_experts_per_tok=2)),
    "qwen2_moe": (Qwen2MoeConfig, Qwen2MoeForSequenceClassification,
                  dict(intermediate_size=1024, moe_intermediate_size=512, shared_expert_intermediate_size=512,
                       num_experts=8, num_experts_per_tok=2)),
}


def make_checkpoint(family: str, out: Path) -> None:
    config_cls, model_cls, kw = FAMILIES[family]
    torch.manual_seed(0)
    model = model_cls(config_cls(**COMMON, **kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")):
                p.normal_(0, 1.0)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(default_dense_path()).save_pretrained(out)


def fold_difference(model_dir: Path, task, data) -> float:
    cfg = PruneConfig(method="reap", experts=1, calibration_examples=256)
    model = load_model(model_dir)
    plan = score(model_dir, task, data, cfg, model=model, progress=False)
    enc = encode(data.load(task, "validation", limit=64), load_tokenizer(model_dir), task.max_length)
    one, folded = apply_plan(model, plan, fold=False), apply_plan(model, plan, fold=True)
    return float(abs(predict_logits(one, enc) - predict_logits(folded, enc)).max()), type(folded).__name__


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="+", default=list(FAMILIES))
    ap.add_argument("--latency-iters", type=int, default=100)
    ap.add_argument("--out", default="results/families")
    args = ap.parse_args()
    task, data = get_task("sst2"), DataSpec()
    target = load_target("x86_64")
    target = replace(target, budgets=replace(Budgets(), latency_batch=1, latency_seq_len=64))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            ckpt = Path(tmp) / family
            make_checkpoint(family, ckpt)
            diff, fold_class = fold_difference(ckpt, task, data)
            row = {"family": family, "fold_target": fold_class, "fold_max_abs_diff": diff}
            for k in (1, 2):
                cfg = BuildConfig(task=task, target=target, out=Path(tmp) / f"{family}-k{k}", data=data,
                                  model_dir=str(ckpt), eval_examples=200, latency_iters=args.latency_iters,
                                  prune=PruneConfig(method="reap", experts=k, recovery_steps=0,
                                                    calibration_examples=256), command=command_line())
                _, report = build(cfg)
                row[f"k{k}"] = {"exporter": report["export"]["exporter"],
                                "parity_max_abs_logit_diff": report["export"]["parity_fp32"]["max_abs_logit_diff"],
                                "size_ratio": report["size"]["size_ratio"],
                                "p50_speedup": report["speed"]["p50_speedup"],
                                "original_p50_ms": report["speed"]["original_torch_fp32"]["p50_ms"],
                                "artifact_p50_ms": report["speed"]["artifact_onnxruntime"]["p50_ms"]}
                print(family, k, row[f"k{k}"], flush=True)
            rows.append(row)
    md = ["# Hugging Face MoE families through the pipeline", "",
          f"Command: `{command_line()}`", "",
          "Random sequence-classification checkpoints (hidden 256, 4 layers, 8 experts, top-2, MiniLM tokenizer "
          "with its 30,522-row embedding), reap, no recovery, x86_64 target (int8 dynamic). Accuracy is not reported: "
          "the weights are random. Size and p50 ratios are original (PyTorch fp32 safetensors) / artifact (ONNX "
          "Runtime int8), batch 1, 64 tokens, 1 thread, alternating rounds on the build host.", "",
          "| family | k = 1 folds to | fold max diff | k = 1 export | parity k=1 | size k=1 | p50 k=1 | k = 2 export "
          "| parity k=2 | size k=2 | p50 k=2 |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        a, b = r["k1"], r["k2"]
        md.append(f"| {r['family']} | {r['fold_target']} | {r['fold_max_abs_diff']:.1e} | {a['exporter']} | "
                  f"{a['parity_max_abs_logit_diff']:.1e} | {a['size_ratio']}x | {a['p50_speedup']}x | {b['exporter']} | "
                  f"{b['parity_max_abs_logit_diff']:.1e} | {b['size_ratio']}x | {b['p50_speedup']}x |")
    write_results(args.out, {"rows": rows}, md)
    print("\n".join(md))


if __name__ == "__main__":
    main()
