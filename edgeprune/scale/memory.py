"""Memory stated and checked before work starts: the peak resident memory of scoring and pruning, estimated
from the checkpoint's safetensors headers (:class:`edgeprune.scale.lazy.LazyCheckpoint`) and the options, for
the in-memory and the layer-wise path; the choice between them; a one-line refusal when neither fits.

The estimate (bytes; ``C`` the checkpoint, ``O`` its tensors outside the layer stack, ``L`` its largest layer,
``P`` the pruned model: ``C`` less the share ``1 - k / Z`` of the expert tensors, ``H`` the calibration set's
hidden states, ``n x max_length x hidden x 4``, ``A`` one calibration batch's activations,
``64 x max_length x (24 hidden + 4 top-k x expert width + heads x max_length) x 4``):

* scoring in memory: ``C + A``; pruning in memory: ``C + 3 P + A`` (the original, and the pruned model three
  times over while ``apply_plan`` and the fold build it: a fresh model, the copied tensors, the dense sibling);
* layer-wise (both): ``O + 2 L + A`` at least (a layer of the original and the pruned layer written from it),
  plus as much of ``H`` as the cap leaves (the rest goes to disk).

It is deliberately an upper bound of the tensors' bytes plus the framework's working set (``BASE``); measured
against VmHWM in ``results/scale.md`` (``python scripts/scale.py``).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import psutil

from edgeprune.errors import ConfigError
from edgeprune.models.checkpoint import read_config
from edgeprune.scale.lazy import LazyCheckpoint

GB = 1024 ** 3  # "GB" in messages and --max-memory: 2^30 bytes (GiB)
BASE = int(0.6 * GB)  # Python, torch, transformers and tokenizers loaded, before any tensor
_EXPERT = re.compile(r"\.experts?[._]")
_STACK = re.compile(r"^(.*?(?:layers|layer|h|block|blocks))\.(\d+)\.")


@dataclass
class MemoryEstimate:
    checkpoint: int
    outside: int
    largest_layer: int
    pruned: int
    hidden: int
    activations: int
    largest_tensor: int = 0

    stage: str = "prune"  # "score": no pruned copy

    @property
    def in_memory(self) -> int:
        copies = 3 * self.pruned if self.stage == "prune" else 0
        return BASE + self.checkpoint + copies + self.activations

    @property
    def layerwise_min(self) -> int:
        return BASE + self.outside + 2 * self.largest_layer + self.activations

    @property
    def layerwise(self) -> int:
        return self.layerwise_min + self.hidden

    def to_dict(self) -> dict:
        return {**{k: round(v / GB, 3) if isinstance(v, int) else v for k, v in asdict(self).items()},
                "in_memory_gb": round(self.in_memory / GB, 3), "layerwise_gb": round(self.layerwise / GB, 3),
                "layerwise_min_gb": round(self.layerwise_min / GB, 3)}


def _config_int(cfg: dict, *keys: str, default: int = 0) -> int:
    for k in keys:
        v = cfg.get(k)
        if isinstance(v, int) and v > 0:
            return v
    return default


def estimate(model_dir: str | Path, experts: Optional[int], max_length: int, examples: int,
             batch_size: int = 64, stage: str = "prune") -> MemoryEstimate:
    """The estimate for ``model_dir`` (headers only: nothing is loaded)."""
    ckpt = LazyCheckpoint(model_dir)
    cfg = read_config(model_dir)
    by_layer: dict[Optional[int], int] = {}
    expert_bytes = 0
    for name, info in ckpt.info.items():
        m = _STACK.match(name)
        layer = int(m.group(2)) if m else None
        by_layer[layer] = by_layer.get(layer, 0) + info.nbytes
        if _EXPERT.search(name):
            expert_bytes += info.nbytes
    z = _config_int(cfg, "num_local_experts", "num_experts", "n_routed_experts", default=1)
    kept = min(1.0, (experts or z) / z)
    hidden = _config_int(cfg, "hidden_size", "d_model", default=1024)
    heads = _config_int(cfg, "num_attention_heads", "num_heads", default=16)
    top_k = _config_int(cfg, "num_experts_per_tok", "moe_topk", default=1)
    width = _config_int(cfg, "moe_intermediate_size", "intermediate_size", "d_ff", default=4 * hidden)
    return MemoryEstimate(
        checkpoint=ckpt.total_bytes,
        outside=by_layer.get(None, 0),
        largest_layer=max((v for k, v in by_layer.items() if k is not None), default=0),
        pruned=int(ckpt.total_bytes - (1 - kept) * expert_bytes),
        hidden=examples * max_length * hidden * 4,  # fp32
        activations=batch_size * max_length * (24 * hidden + 4 * top_k * width + heads * max_length) * 4,
        largest_tensor=max((i.nbytes for i in ckpt.info.values()), default=0), stage=stage)


#: bytes of the artifact per fp32 byte of the pruned model, by the target's precision (the decoders' weight-only
#: int8 / int4 with one fp32 scale and one zero point per block of 32, the smallest block a profile uses for them)
PRECISION_SHARE = {"fp32": 1.0, "fp16": 0.5, "int8-dynamic": 0.25, "int8-static": 0.25, "int8": 0.29, "int4": 0.165}
ONNX_FILE_LIMIT = 2 ** 31 - 1  # one serialised ONNX graph


def check_export(est: MemoryEstimate, precision: str, max_memory_gb: Optional[float], large_bytes: int,
                 one_file: bool = True) -> None:
    """Refuse, before anything is pruned, a build whose export cannot succeed: an artifact over ONNX's 2 GB
    single-file limit, or (a pruned model above ``large_bytes``, exported one weight at a time:
    :mod:`edgeprune.export.large`) an export stage above ``--max-memory``. That stage's peak is the larger of the
    layer-wise parity logits (``O + 2 L + A``, as the pruning, already checked) and the quantizer, which holds
    the quantized weights until it writes them (``Q``, the pruned model at the precision's share) beside a few
    weights in fp32 (``3 x`` the largest tensor): 1.03 GiB (0.38 of it the process before) for ``Q`` = 0.45 GiB,
    on the k = 2 graph of ``scripts/scale_build.py`` in a one-off probe; the whole build's export stage peaked at
    2.05 GiB there (``results/scale_build.md``), under the layer-wise term's bound. A decoder's large variants keep
    their weights in external data (not ``one_file``): no file limit, the same memory term
    (:mod:`edgeprune.export.lm_large`)."""
    share = PRECISION_SHARE.get(precision, 1.0)
    artifact = int(est.pruned * share)
    if one_file and artifact > ONNX_FILE_LIMIT:
        raise ConfigError(f"the {precision} artifact would be ~{artifact / GB:.2f} GB ({est.pruned / GB:.2f} GB of "
                          "pruned weights), over ONNX's 2 GB limit for one file; keep fewer experts (--experts) or "
                          "choose a lower-precision target")
    if max_memory_gb is None or est.pruned <= large_bytes:
        return
    need = BASE + artifact + 3 * est.largest_tensor
    if need > max_memory_gb * GB:
        raise ConfigError(f"the export would need ~{need / GB:.2f} GB (the {precision} weights {artifact / GB:.2f} GB "
                          f"held by the quantizer + working set), more than --max-memory {max_memory_gb:g} GB; raise "
                          "--max-memory or keep fewer experts")


def available_bytes() -> int:
    return int(psutil.virtual_memory().available)


def choose_path(est: MemoryEstimate, layerwise: Optional[bool], max_memory_gb: Optional[float]) -> tuple[bool, int, str]:
    """``(layer-wise?, bytes of hidden states to keep in memory, why)``; a :class:`ConfigError` when even the
    layer-wise path cannot fit ``--max-memory`` (or, without it, the memory available now)."""
    cap = int(max_memory_gb * GB) if max_memory_gb is not None else available_bytes()
    what = f"--max-memory {max_memory_gb:g} GB" if max_memory_gb is not None else f"{cap / GB:.1f} GB available"
    if layerwise is False:
        if max_memory_gb is not None and est.in_memory > cap:
            raise ConfigError(f"--in-memory needs ~{est.in_memory / GB:.2f} GB, more than {what}; use --layerwise "
                              "or raise --max-memory")
        return False, est.hidden, f"in memory (--in-memory): needs ~{est.in_memory / GB:.2f} GB"
    if layerwise is None and est.in_memory <= cap:
        return False, est.hidden, f"in memory: needs ~{est.in_memory / GB:.2f} GB, {what}"
    if est.layerwise_min > cap:
        raise ConfigError(
            f"the checkpoint ({est.checkpoint / GB:.2f} GB) needs ~{est.layerwise_min / GB:.2f} GB even layer by layer "
            f"(outside the layers {est.outside / GB:.2f} GB + two of its largest layer {est.largest_layer / GB:.2f} GB "
            f"+ working set), more than {what}; raise --max-memory or use a machine with more memory")
    keep = max(0, min(est.hidden, cap - est.layerwise_min))
    why = ("layer-wise (--layerwise)" if layerwise else
           f"layer-wise: in memory would need ~{est.in_memory / GB:.2f} GB, {what}")
    spill = "" if keep >= est.hidden else f"; hidden states beyond {keep / GB:.2f} GB go to disk"
    return True, keep, f"{why}; peak ~{(est.layerwise_min + keep) / GB:.2f} GB{spill}"
