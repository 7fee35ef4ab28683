"""The hidden states of a layer-wise pass between layers (:mod:`edgeprune.pruning.layerwise`): in memory up to a
bound, the rest in files."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

import torch


class HiddenStore:
    """Per-batch hidden states between layers: in memory up to ``max_bytes``, the rest in files."""

    def __init__(self, max_bytes: Optional[int], offload_dir: Optional[str | Path] = None):
        self.max_bytes = max_bytes
        self.in_memory: dict[int, torch.Tensor] = {}
        self.bytes = 0
        self._tmp = None
        self.dir = Path(offload_dir) if offload_dir else None

    def _path(self, b: int) -> Path:
        if self.dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="edgeprune-hidden-")
            self.dir = Path(self._tmp.name)
        self.dir.mkdir(parents=True, exist_ok=True)
        return self.dir / f"hidden-{b}.pt"

    def put(self, b: int, t: torch.Tensor) -> None:
        self.pop(b)
        size = t.numel() * t.element_size()
        if self.max_bytes is None or self.bytes + size <= self.max_bytes:
            self.in_memory[b] = t
            self.bytes += size
        else:
            torch.save(t, self._path(b))

    def get(self, b: int) -> torch.Tensor:
        if b in self.in_memory:
            return self.in_memory[b]
        return torch.load(self._path(b), weights_only=True)

    def pop(self, b: int) -> None:
        t = self.in_memory.pop(b, None)
        if t is not None:
            self.bytes -= t.numel() * t.element_size()

    def close(self) -> None:
        self.in_memory.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
