"""The peer a user would ship instead of edgeprune: the dense model the default original was upcycled from,
exported to ONNX and int8-quantized the way ``optimum-cli export onnx`` + ``optimum-cli onnxruntime quantize
--arm64 / --avx512_vnni`` did (dynamic quantization, per-tensor, int8 weights, uint8 activations; optimum-onnx cannot
be installed beside transformers 5, so its steps are done here with ``torch.onnx.export`` and ONNX Runtime's own
``quantize_dynamic``, which optimum-cli called). ``scripts/benchmark.py`` times it next to the artifact;
``edgeprune search`` marks it in its Pareto plot."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

# what optimum-cli's AutoQuantizationConfig.arm64 / avx512_vnni (is_static=False, per_channel=False) quantize
PEER_OPERATORS = ["MatMul", "Attention", "Gather", "EmbedLayerNormalization"]


def peer_flag(target: str) -> str:
    return "--avx512_vnni" if target.startswith("x86") else "--arm64"


def dense_peer(dense_dir: Path, target: str, opset: int, root: Path = Path("build")) -> Path:
    """``root/peer-<dense>-<target>/quantized/model_quantized.onnx``, built once."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from dataclasses import replace

    from transformers import AutoModelForSequenceClassification

    from edgeprune.export.onnx_export import export_onnx
    from edgeprune.models.checkpoint import load_checked
    from edgeprune.targets import load_target

    out = Path(root) / f"peer-{Path(dense_dir).name}-{target}"
    model = out / "quantized" / "model_quantized.onnx"
    if model.is_file():
        return model
    (out / "onnx").mkdir(parents=True, exist_ok=True)
    model.parent.mkdir(parents=True, exist_ok=True)
    t = load_target(target)
    t = replace(t, export=replace(t.export, opset=opset, fixed_shapes=False, moe_operator="dense"))
    export_onnx(load_checked(AutoModelForSequenceClassification, dense_dir), dense_dir, out / "onnx" / "model.onnx", t)
    quantize_dynamic(str(out / "onnx" / "model.onnx"), str(model), per_channel=False, reduce_range=False,
                     weight_type=QuantType.QInt8, op_types_to_quantize=PEER_OPERATORS)
    return model


def measure_peer(cfg, iters: int = 30) -> Optional[dict]:
    """The peer's size (MB), p50 (ms, the target's batch / length / threads) and validation accuracy, for the
    default original's task (None for a user's checkpoint: its dense counterpart is unknown)."""
    if cfg.model_dir:
        return None
    from edgeprune.export.quantize import size_mb
    from edgeprune.export.onnx_export import onnx_logits
    from edgeprune.originals.classifier import OriginalSpec, ensure_original
    from edgeprune.models.tokenizer import load_tokenizer
    from edgeprune.tasks.encoding import encode
    from edgeprune.training.loop import accuracy
    from edgeprune.validate.classifier import interleaved, onnx_runner, percentiles

    dense_dir = ensure_original(OriginalSpec(cfg.task, cfg.data, "dense"))
    t = cfg.target
    model = dense_peer(dense_dir, t.name, t.export.opset)
    enc = encode(cfg.data.load(cfg.task, "validation", limit=cfg.eval_examples), load_tokenizer(dense_dir),
                 cfg.task.max_length)
    ms = interleaved({"peer": onnx_runner(model, t.budgets.latency_batch, t.budgets.latency_seq_len, t.runtime.threads)}, t.runtime.threads, 3, iters)
    return {"size_mb": size_mb(model), "p50_ms": percentiles(ms["peer"])["p50_ms"],
            "accuracy": round(accuracy(onnx_logits(model, enc), enc.labels), 4), "model": str(model)}
