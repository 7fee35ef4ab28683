"""The peer a user would ship instead of edgeprune: the dense model the default original was upcycled from,
exported by ``optimum-cli export onnx`` and quantized by ``optimum-cli onnxruntime quantize`` with the
target's CPU flag (``--arm64``; ``--avx512_vnni`` for x86_64). ``scripts/benchmark.py`` times it next to the
artifact; ``edgeprune search`` marks it in its Pareto plot."""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Optional

from edgeprune.errors import ExportError


def peer_flag(target: str) -> str:
    return "--avx512_vnni" if target.startswith("x86") else "--arm64"


def optimum_cli_peer(dense_dir: Path, target: str, opset: int, root: Path = Path("build")) -> Path:
    """``root/peer-<dense>-<target>/quantized/model_quantized.onnx``, built once by optimum's command line."""
    out = Path(root) / f"peer-{Path(dense_dir).name}-{target}"
    model = out / "quantized" / "model_quantized.onnx"
    if model.is_file():
        return model
    for cmd in (["optimum-cli", "export", "onnx", "--model", str(dense_dir), "--task", "text-classification",
                 "--opset", str(opset), str(out / "onnx")],
                ["optimum-cli", "onnxruntime", "quantize", "--onnx_model", str(out / "onnx"), peer_flag(target),
                 "-o", str(out / "quantized")]):
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise ExportError(f"{' '.join(cmd[:3])} failed for the peer: {(res.stderr.strip().splitlines() or ['?'])[-1]}")
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
    model = optimum_cli_peer(dense_dir, t.name, t.export.opset)
    enc = encode(cfg.data.load(cfg.task, "validation", limit=cfg.eval_examples), load_tokenizer(dense_dir),
                 cfg.task.max_length)
    ms = interleaved({"peer": onnx_runner(model, t.budgets.latency_batch, t.budgets.latency_seq_len, t.runtime.threads)}, t.runtime.threads, 3, iters)
    return {"size_mb": size_mb(model), "p50_ms": percentiles(ms["peer"])["p50_ms"],
            "accuracy": round(accuracy(onnx_logits(model, enc), enc.labels), 4), "model": str(model)}
