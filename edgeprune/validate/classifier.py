"""Validation side by side with the original, in one run: accuracy and agreement on the task's
validation split, latency p50/p95 at batch 1 and throughput at batch 32 (original in PyTorch fp32, the
artifact in ONNX Runtime, same thread count), size on disk, and the peak memory of an app process that
loads the artifact with ONNX Runtime (measured in a fresh subprocess: what an app would see).

Latency here is the build host's: a proxy for the device. Ratios (original / artifact) carry over better
than milliseconds, and the report says so.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from edgeprune.export.onnx_export import onnx_logits, session, truncate
from edgeprune.export.quantize import disabled_optimizers, numpy_inputs
from edgeprune.tasks.encoding import Encoded, model_inputs
from edgeprune.training.loop import accuracy, predict_logits


def torch_runner(model: torch.nn.Module, batch: int, length: int) -> Callable[[], object]:
    """One forward pass of ``model`` on random ids of shape (batch, length), no autograd."""
    feeds = model_inputs(model, {k: torch.from_numpy(v) for k, v in numpy_inputs(
        ["input_ids", "attention_mask", "token_type_ids"], batch, length, model.config.vocab_size).items()})
    model.eval()

    def run():
        with torch.no_grad():
            return model(**feeds)
    return run


def onnx_runner(path: Path, batch: int, length: int, threads: int, vocab_size: int = 30522,
                extra: Optional[dict] = None) -> Callable[[], object]:
    """One ONNX Runtime run of ``path`` (a fresh session with ``threads`` intra-op threads; ``extra``: more feeds)."""
    sess = session(path, threads)
    feeds = {**numpy_inputs([i.name for i in sess.get_inputs()], batch, length, vocab_size), **(extra or {})}
    return lambda: sess.run(None, feeds)


def interleaved(runners: dict[str, Callable[[], object]], threads: int, warmup: int, iters: int,
                rounds: int = 10) -> dict[str, np.ndarray]:
    """Milliseconds per call of each runner, measured in ``rounds`` alternating blocks so that the host's
    drift (frequency, other load) falls on every model alike and the ratios stay fair."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for fn in runners.values():
            for _ in range(warmup):
                fn()
        times: dict[str, list[float]] = {name: [] for name in runners}
        per_round = max(1, -(-iters // rounds))
        for _ in range(rounds):
            for name, fn in runners.items():
                for _ in range(per_round):
                    t = time.perf_counter()
                    fn()
                    times[name].append((time.perf_counter() - t) * 1e3)
        return {name: np.asarray(v) for name, v in times.items()}
    finally:
        torch.set_num_threads(old)


_MEM_PROBE = """
import json, resource, sys
import numpy as np, onnxruntime as ort
def peak_mb():
    # VmHWM belongs to this process image; ru_maxrss on Linux keeps the parent's peak across fork + exec
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
base = peak_mb()
opts = ort.SessionOptions(); opts.intra_op_num_threads = int(sys.argv[2]); opts.log_severity_level = 3
s = ort.InferenceSession(sys.argv[1], opts, providers=["CPUExecutionProvider"],
                         disabled_optimizers=[n for n in sys.argv[3].split(",") if n])
shape = [d if isinstance(d, int) else v for d, v in zip(s.get_inputs()[0].shape, (1, 64))]
feeds = {i.name: np.ones(shape, dtype=np.int64) for i in s.get_inputs()}
for _ in range(3): s.run(None, feeds)
peak = peak_mb()
print(json.dumps({"peak_rss_mb": peak, "session_mb": peak - base}))
"""


def session_memory(path: Path, threads: int = 1) -> dict:
    """Peak RSS of a fresh process that imports onnxruntime, loads ``path`` and runs it (batch 1, 64 tokens);
    ``session_mb`` is the part above the bare onnxruntime import."""
    disabled = ",".join(disabled_optimizers(path))
    out = subprocess.run([sys.executable, "-c", _MEM_PROBE, str(path), str(threads), disabled], capture_output=True,
                         text=True, timeout=300)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "probe failed"}
    return {k: round(v, 1) for k, v in json.loads(out.stdout).items()}


def percentiles(ms: np.ndarray) -> dict:
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p95_ms": round(float(np.percentile(ms, 95)), 3)}


def throughput(ms: np.ndarray, batch: int) -> float:
    return round(batch / (float(np.median(ms)) / 1e3), 1)


def speed(original: Optional[torch.nn.Module], artifact: Path, threads: int, batch: int, length: int,
          iters: int = 100, throughput_batch: int = 32, throughput_iters: int = 10,
          fixed: Optional[tuple[int, int]] = None, artifact_vocab: Optional[int] = None) -> dict:
    """Latency at ``batch`` and throughput at ``throughput_batch``, original vs artifact, with ratios (the
    artifact's input ids drawn from its own vocabulary when it was pruned)."""
    res: dict = {"threads": threads, "batch": batch, "sequence_length": length,
                 "note": "measured on the build host, original and artifact in alternating rounds; a proxy for "
                         "the device (ratios carry over better)"}
    vocab = artifact_vocab or original.config.vocab_size
    a_batch, a_len = fixed if fixed else (batch, length)
    timed = original is not None and not getattr(original, "edgeprune_skeleton", False)
    runners = {"artifact": onnx_runner(artifact, a_batch, a_len, threads, vocab)}
    if timed:
        runners["original"] = torch_runner(original, batch, length)
    ms = interleaved(runners, threads, max(3, iters // 10), iters)
    a = percentiles(ms["artifact"])
    res["artifact_onnxruntime"] = a
    if not timed:  # a layer-wise build: the original is never in memory as a whole
        res["original_torch_fp32"] = {"p50_ms": None, "p95_ms": None}
        res["p50_speedup"] = res["p95_speedup"] = None
        res["original_note"] = "not timed: the original does not fit in memory (layer-wise build)"
        return res
    o = percentiles(ms["original"])
    res["original_torch_fp32"] = o
    res["p50_speedup"] = round(o["p50_ms"] / a["p50_ms"], 2)
    res["p95_speedup"] = round(o["p95_ms"] / a["p95_ms"], 2)
    if fixed is None:
        tp = interleaved({"original": torch_runner(original, throughput_batch, length),
                          "artifact": onnx_runner(artifact, throughput_batch, length, threads, vocab)},
                         threads, 2, throughput_iters, rounds=min(5, throughput_iters))
        res["throughput_batch"] = throughput_batch
        res["original_throughput_per_s"] = throughput(tp["original"], throughput_batch)
        res["artifact_throughput_per_s"] = throughput(tp["artifact"], throughput_batch)
        res["throughput_ratio"] = round(res["artifact_throughput_per_s"] / res["original_throughput_per_s"], 2)
    else:
        res["throughput"] = f"not measured: the artifact has a fixed batch of {fixed[0]}"
    return res


def quality(original_logits: np.ndarray, artifact: Path, enc: Encoded, fixed_length: Optional[int] = None) -> dict:
    """Accuracy of original and artifact, agreement of their predictions, on the same examples."""
    got = onnx_logits(artifact, truncate(enc, fixed_length) if fixed_length else enc, fixed_length=fixed_length)
    orig_acc = accuracy(original_logits, enc.labels)
    art_acc = accuracy(got, enc.labels)
    return {"examples": len(enc), "original_accuracy": round(orig_acc, 4), "artifact_accuracy": round(art_acc, 4),
            "accuracy_drop_points": round(100 * (orig_acc - art_acc), 2),
            "agreement": round(float((original_logits.argmax(-1) == got.argmax(-1)).mean()), 4)}


def original_logits(model: torch.nn.Module, enc: Encoded) -> np.ndarray:
    return predict_logits(model, enc, progress=True, desc="original on validation")


def top_k_sweep(original_logits: np.ndarray, artifact: Path, enc: Encoded, spec: dict, threads: int, batch: int,
                length: int, vocab_size: int, iters: int = 50, fixed: Optional[tuple[int, int]] = None) -> dict:
    """Accuracy, agreement with the original and latency of an artifact whose routers read ``top_k`` at run time,
    at every k from 1 to the kept experts (``spec``: the export's ``top_k``), latency in alternating rounds with
    ratios to the artifact at its own k."""
    ks = range(1, spec["max"] + 1)
    feeds = {k: {"top_k": np.array([k], dtype=np.int64)} for k in ks}
    e = truncate(enc, fixed[1]) if fixed else enc
    rows = {}
    for k in ks:
        got = onnx_logits(artifact, e, fixed_length=fixed[1] if fixed else None, extra=feeds[k])
        rows[k] = {"top_k": k, "accuracy": round(accuracy(got, enc.labels), 4),
                   "agreement": round(float((original_logits.argmax(-1) == got.argmax(-1)).mean()), 4)}
    b, s = fixed if fixed else (batch, length)
    times = interleaved({k: onnx_runner(artifact, b, s, threads, vocab_size, feeds[k]) for k in ks}, threads,
                        warmup=3, iters=iters)
    base = float(np.median(times[spec["default"]]))
    for k in ks:
        rows[k].update(p50_ms=round(float(np.median(times[k])), 3),
                       speedup_vs_default=round(base / float(np.median(times[k])), 3))
    return {"default": spec["default"], "batch": b, "sequence_length": s, "threads": threads,
            "rows": list(rows.values())}
