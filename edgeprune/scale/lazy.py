"""A checkpoint's tensors without loading them: names, shapes, dtypes and bytes from the safetensors headers
(every shard of a sharded checkpoint), each tensor read from its file only when asked for.

This is what lets the layer-wise calibration (:mod:`edgeprune.pruning.layerwise`) and the streamed prune
(:mod:`edgeprune.pruning.stream`) hold one layer at a time, and the memory estimate (:mod:`edgeprune.scale.memory`)
size every stage before anything is loaded. It reads with ``safetensors.safe_open`` (memory-mapped; a
``get_tensor`` copies one tensor out), the same reader transformers uses.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
from safetensors import safe_open

from edgeprune.models.checkpoint import check_finite, weight_files

_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        n = _DTYPE_BYTES.get(self.dtype, 4)
        for d in self.shape:
            n *= d
        return n


class LazyCheckpoint(Mapping):
    """``name -> tensor`` over a checkpoint directory, read on access (a read-only state dict).

    ``ckpt.info[name]`` has the shape, dtype and bytes without reading; ``layer_of(name, prefix)`` says which
    layer of the stack at ``prefix`` (``"model.layers"``) a tensor belongs to."""

    def __init__(self, model_dir: str | Path, extra: Optional[dict[str, torch.Tensor]] = None):
        """``extra``: tensors that are in no shard but belong to the model (a label-word classifier's score rows)."""
        self.dir = Path(model_dir)
        self.extra = dict(extra or {})
        self.files = weight_files(self.dir)
        self.info: dict[str, TensorInfo] = {}
        for f in self.files:
            with safe_open(str(f), framework="pt") as fh:
                for name in fh.keys():
                    sl = fh.get_slice(name)
                    self.info[name] = TensorInfo(f, tuple(sl.get_shape()), sl.get_dtype())

    # -- Mapping -------------------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self.extra:
            return self.extra[name]
        info = self.info[name]
        # each read maps and unmaps its shard: only the copy stays resident, never the shard's mapped pages
        with safe_open(str(info.file), framework="pt") as fh:
            t = fh.get_tensor(name)
        check_finite({name: t}, self.dir)  # the streaming form of the in-memory check (models.checkpoint)
        return t

    def __iter__(self) -> Iterator[str]:
        return iter(list(self.info) + [k for k in self.extra if k not in self.info])

    def __len__(self) -> int:
        return len(set(self.info) | set(self.extra))

    def __contains__(self, name) -> bool:
        return name in self.info or name in self.extra

    def rows(self, name: str, ids) -> torch.Tensor:
        """Rows ``ids`` of a 2-D tensor, each read alone (a vocabulary-sized LM head is never read whole)."""
        info = self.info[name]
        with safe_open(str(info.file), framework="pt") as fh:
            sl = fh.get_slice(name)
            t = torch.cat([sl[int(i) : int(i) + 1] for i in ids])
        check_finite({name: t}, self.dir)
        return t

    # -- sizes ---------------------------------------------------------------------------------------------
    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.info.values())


def layer_of(name: str, prefix: str) -> Optional[int]:
    """The layer index of ``name`` in the stack at ``prefix`` (``model.layers.3.mlp...`` -> 3), else None."""
    m = re.match(re.escape(prefix) + r"\.(\d+)\.", name)
    return int(m.group(1)) if m else None
