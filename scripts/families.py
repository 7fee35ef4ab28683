"""Every registered Hugging Face MoE family through the real pipeline, on random configs large enough to time.

    python scripts/families.py                 # -> results/families.md / .json
    python scripts/families.py --families mixtral qwen3_moe --k 8 --out results/families_keep_all
                                               # no pruning: dense dispatch vs com.microsoft.MoE at 8 experts

Per family: a random checkpoint of the class users hold (the sequence classifier where transformers has one, else
the causal or seq2seq LM, classified by label words with sst2's default prompt and the label names), hidden 256,
4 layers, 8 experts, the packaged MiniLM tokenizer, routers drawn N(0, 1) so that tokens spread over the experts (sigmoid routers: logits of std 2),
saved with ``save_pretrained``; then
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
from typing import Optional

import torch
import transformers as tf
from transformers import AutoTokenizer

from edgeprune.build.config import BuildConfig

from edgeprune.build.spine import build
from edgeprune.errors import ConfigError
from edgeprune.models.label_words import of_model
from edgeprune.models.registry import adapter_for
from edgeprune.targets import Budgets, load_target
from edgeprune.originals.upcycle import default_dense_path
from edgeprune.tasks.spec import DataSpec
from edgeprune.pruning.apply import apply_plan
from edgeprune.pruning.config import PruneConfig
from edgeprune.models.loading import load_model
from edgeprune.pruning.pipeline import score
from edgeprune.validate.results import command_line, write_results
from edgeprune.tasks import get_task
from edgeprune.models.tokenizer import load_tokenizer
from edgeprune.tasks.encoding import encode
from edgeprune.training.loop import predict_logits

COMMON = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
              max_position_embeddings=512, num_labels=2, pad_token_id=0, vocab_size=30522)
DEEPSEEK = dict(intermediate_size=1024, moe_intermediate_size=256, n_routed_experts=8, num_experts_per_tok=2,
                n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=32,
                qk_rope_head_dim=16, v_head_dim=32, num_key_value_heads=8, head_dim=16)  # head_dim: the rope part
GRANITE = dict(intermediate_size=512, num_local_experts=8, num_experts_per_tok=2, embedding_multiplier=12.0,
               logits_scaling=8.0, residual_multiplier=0.22, attention_multiplier=0.03)
# family -> (config class, the class a user's checkpoint has, config values)
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForSequenceClassification",
                dict(intermediate_size=512, num_local_experts=8, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForSequenceClassification",
                  dict(intermediate_size=1024, moe_intermediate_size=512, num_experts=8, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForSequenceClassification",
                  dict(intermediate_size=1024, moe_intermediate_size=512, shared_expert_intermediate_size=512,
                       num_experts=8, num_experts_per_tok=2)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(intermediate_size=512, num_experts=8, num_experts_per_tok=2)),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", GRANITE),
    "granitemoeshared": ("GraniteMoeSharedConfig", "GraniteMoeSharedForCausalLM",
                         dict(GRANITE, shared_intermediate_size=512)),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForSequenceClassification",
                    dict(DEEPSEEK, routed_scaling_factor=1.0)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForSequenceClassification",
                    dict(DEEPSEEK, n_group=2, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5)),
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM", dict(DEEPSEEK, n_group=1, topk_group=1, norm_topk_prob=True,
                                                           routed_scaling_factor=1.0, partial_rotary_factor=0.5)),
    "gpt_oss": ("GptOssConfig", "GptOssForSequenceClassification",
                dict(intermediate_size=512, num_local_experts=8, num_experts_per_tok=2, sliding_window=32)),
    "phimoe": ("PhimoeConfig", "PhimoeForSequenceClassification",
               dict(intermediate_size=512, num_local_experts=8, num_experts_per_tok=2)),
    "switch_transformers": ("SwitchTransformersConfig", "SwitchTransformersForConditionalGeneration", dict(
        d_model=256, d_kv=32, d_ff=1024, num_layers=4, num_decoder_layers=4, num_heads=8, num_experts=8,
        expert_capacity=64, encoder_sparse_step=2, decoder_sparse_step=2, decoder_start_token_id=0)),
}
ROUTERS = ("mlp.gate.weight", "block_sparse_moe.gate.weight", "router.layer.weight", "mlp.router.weight",
           "router.classifier.weight")


def make_checkpoint(family: str, out: Path) -> None:
    config_name, model_name, kw = FAMILIES[family]
    config_cls, model_cls = getattr(tf, config_name), getattr(tf, model_name)
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**COMMON, **kw})).eval()
    # routers that spread tokens: N(0, 1) for softmax routers; sigmoid routers (DeepSeek-V3, GLM-4-MoE) would
    # saturate at 1.0 (ties that no real router has), so theirs give logits of std 2
    std = 2 / model.config.hidden_size ** 0.5 if family in ("deepseek_v3", "glm4_moe") else 1.0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(ROUTERS):
                p.normal_(0, std)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(default_dense_path()).save_pretrained(out)


def fold_difference(model_dir: Path, task, data) -> tuple[Optional[float], str]:
    """Max |logit| difference between the one-expert model of the family's class and its fold (None where the
    class cannot run one expert: the tests compare the fold with the masked original there)."""
    cfg = PruneConfig(method="reap", experts=1, calibration_examples=256)
    model = load_model(model_dir, task=task)
    try:
        plan = score(model_dir, task, data, cfg, model=model, progress=False)
    except ConfigError as exc:
        return None, f"refused ({str(exc).split(';')[0].split(', which')[0]})"
    enc = encode(data.load(task, "validation", limit=64), load_tokenizer(model_dir), task.max_length,
                 of_model(model))
    folded = apply_plan(model, plan, fold=True)
    try:
        one = apply_plan(model, plan, fold=False)
        diff = float(abs(predict_logits(one, enc) - predict_logits(folded, enc)).max())
    except Exception:  # DeepSeek-V3 / GLM-4-MoE: their class cannot route one expert
        diff = None
    return diff, type(folded).__name__


def ort_cell(row: dict) -> str:
    o = row.get("k2_ort")
    if o is None:
        return "routing does not map onto the operator"
    return f"{o['parity_max_abs_logit_diff']:.1e}, {o['size_ratio']}x, {o['p50_speedup']}x"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="+", default=list(FAMILIES))
    ap.add_argument("--latency-iters", type=int, default=100)
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2], help="experts kept per layer (8 = all: no pruning)")
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
            diff, fold_class = fold_difference(ckpt, task, data) if 1 in args.k else (None, "-")
            row = {"family": family, "fold_target": fold_class, "fold_max_abs_diff": diff}
            ks = [k for k in args.k if not (k == 1 and fold_class.startswith("refused"))]
            runs = [(k, "dense") for k in ks]
            if adapter_for(family).ort_moe:  # the same models through com.microsoft.MoE
                runs += [(k, "ort") for k in ks if k > 1]
            for k, operator in runs:
                t = replace(target, export=replace(target.export, moe_operator=operator))
                cfg = BuildConfig(task=task, target=t, out=Path(tmp) / f"{family}-k{k}-{operator}", data=data,
                                  model_dir=str(ckpt), eval_examples=200, latency_iters=args.latency_iters,
                                  prune=PruneConfig(method="reap", experts=k, recovery_steps=0,
                                                    calibration_examples=256), command=command_line())
                _, report = build(cfg)
                name = f"k{k}" + ("_ort" if operator == "ort" else "")
                row[name] = {"exporter": report["export"]["exporter"],
                             "parity_max_abs_logit_diff": report["export"]["parity_fp32"]["max_abs_logit_diff"],
                             "size_ratio": report["size"]["size_ratio"],
                             "p50_speedup": report["speed"]["p50_speedup"],
                             "original_p50_ms": report["speed"]["original_torch_fp32"]["p50_ms"],
                             "artifact_p50_ms": report["speed"]["artifact_onnxruntime"]["p50_ms"]}
                row[name]["k"], row[name]["operator"] = k, operator
                print(family, name, row[name], flush=True)
            rows.append(row)
    md = ["# Hugging Face MoE families through the pipeline", "",
          f"Command: `{command_line()}`", "",
          "Random checkpoints of the class users hold (sequence classifier where transformers has one; else the "
          "causal / seq2seq LM, classified by label words, whose 30,522-row LM head the artifact reduces to the two "
          "verbaliser rows: that is part of the size ratio), hidden 256, 4 layers (Switch: 4 + 4, every other "
          "one sparse), 8 experts, top-2 (Switch top-1), MiniLM tokenizer with its 30,522-row embedding, reap, no "
          "recovery, x86_64 target (int8 dynamic). Fold max diff: one-expert model of the family's class vs its "
          "fold, on 64 sst2 sentences (n/a where the class cannot run one expert; phimoe refuses k = 1). "
          "Accuracy is not reported: "
          "the weights are random. Size and p50 ratios are original (PyTorch fp32 safetensors) / artifact (ONNX "
          "Runtime int8), batch 1, 64 tokens, 1 thread, alternating rounds on the build host. The last column is the "
          "same k = 2 model exported with ONNX Runtime's com.microsoft.MoE operator (target `moe_operator = \"ort\"`: "
          "only the routed experts computed; its expert weights stay fp32, the dynamic int8 quantizer does not "
          "touch a contrib operator's inputs), where the family's routing maps onto it.", "",
          ]
    table = ["| family | k = 1 folds to | fold max diff | k = 1 export | parity k=1 | size k=1 | p50 k=1 | k = 2 export "
          "| parity k=2 | size k=2 | p50 k=2 | k = 2 com.microsoft.MoE: parity, size, p50 |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows if {1, 2} <= set(args.k) else []:
        na = {"exporter": "-", "parity_max_abs_logit_diff": float("nan"), "size_ratio": "-", "p50_speedup": "-"}
        a, b = r.get("k1", na), r["k2"]
        diff = "n/a" if r["fold_max_abs_diff"] is None else f"{r['fold_max_abs_diff']:.1e}"
        table.append(f"| {r['family']} | {r['fold_target']} | {diff} | {a['exporter']} | "
                  f"{a['parity_max_abs_logit_diff']:.1e} | {a['size_ratio']}x | {a['p50_speedup']}x | {b['exporter']} | "
                  f"{b['parity_max_abs_logit_diff']:.1e} | {b['size_ratio']}x | {b['p50_speedup']}x | {ort_cell(r)} |")
    if {1, 2} <= set(args.k):
        md += table
    md += ["", "Every run:", "", "| family | k | MoE layers as | exporter | parity | size ratio | p50 ratio | artifact p50 ms |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        for name, v in r.items():
            if isinstance(v, dict):
                md.append(f"| {r['family']} | {v['k']} | {v['operator']} | {v['exporter']} | "
                          f"{v['parity_max_abs_logit_diff']:.1e} | {v['size_ratio']}x | {v['p50_speedup']}x | "
                          f"{v['artifact_p50_ms']} |")
    write_results(args.out, {"rows": rows}, md)
    print("\n".join(md))


if __name__ == "__main__":
    main()
