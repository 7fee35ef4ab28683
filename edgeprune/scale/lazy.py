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
    layer of the stack at ``prefix`` (``"model.layers"``) a tensor belongs to.

    With ``model`` (a skeleton of the checkpoint's class), the names are the model's own: transformers 5 keeps some
    families' experts fused in memory (``mlp.experts.gate_up_proj`` [E, 2I, H]) and per expert on disk
    (``block_sparse_moe.experts.3.w1.weight``, what 4.57 and 5 both save), and converts when it loads. The same
    conversion (transformers' own list for the model, ``get_model_conversion_mapping``: its renamings, then its
    converters' operations on the tensors read) is applied here, per name, when the name is read."""

    def __init__(self, model_dir: str | Path, extra: Optional[dict[str, torch.Tensor]] = None, model=None):
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
        self.disk: dict[str, TensorInfo] = dict(self.info)
        self.recipes: dict[str, tuple] = {}  # model name -> (converter, {source pattern: [disk names by expert]})
        self.renamed: dict[str, str] = {}  # model name -> disk name, where only renamed
        if model is not None:
            self._convert_names(model)

    def _convert_names(self, model) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter

        transforms = get_model_conversion_mapping(model)
        renames = [t for t in transforms if not isinstance(t, WeightConverter)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        info, groups = {}, {}
        for disk, ti in self.disk.items():
            name = disk
            for t in renames:
                name, _ = t.rename_source_key(name)
            for t in converters:
                matched = t._scoped_match(name)
                if matched is None:
                    continue
                target, pattern = t.rename_source_key(name)
                index = re.search(r"\.(\d+)\.", matched[2].group(0))
                groups.setdefault(target, (t, {}))[1].setdefault(pattern, []).append(
                    (int(index.group(1)) if index else 0, disk))
                break
            else:
                info[name] = ti
                if name != disk:
                    self.renamed[name] = disk
        for target, (t, by_pattern) in groups.items():
            sources = {p: [d for _, d in sorted(v)] for p, v in by_pattern.items()}
            self.recipes[target] = (t, sources)
            first = self.disk[next(iter(sources.values()))[0]]
            info[target] = TensorInfo(first.file, tuple(self._build(target, meta=True).shape), first.dtype)
        self.info = info

    def _read(self, disk: str) -> torch.Tensor:
        # each read maps and unmaps its shard: only the copy stays resident, never the shard's mapped pages
        with safe_open(str(self.disk[disk].file), framework="pt") as fh:
            return fh.get_tensor(disk)

    def _build(self, name: str, meta: bool = False) -> torch.Tensor:
        """A converted tensor: the sources read (or, ``meta``, their shapes on the meta device), then the
        converter's operations in order, as transformers applies them when it loads."""
        t, sources = self.recipes[name]
        read = (lambda d: torch.empty(self.disk[d].shape, device="meta")) if meta else self._read
        data = {p: [read(d) for d in names] for p, names in sources.items()}
        patterns = [p for p in t.source_patterns if p in data]
        for op in t.operations:
            data = op.convert(data, source_patterns=patterns, target_patterns=t.target_patterns, full_layer_name=name,
                              model=None, config=None)
            patterns = list(data)
        return next(iter(data.values()))

    # -- Mapping -------------------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self.extra:
            return self.extra[name]
        t = self._build(name) if name in self.recipes else self._read(self._disk_name(name))
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
        disk = self._disk_name(name)
        with safe_open(str(self.disk[disk].file), framework="pt") as fh:
            sl = fh.get_slice(disk)
            t = torch.cat([sl[int(i) : int(i) + 1] for i in ids])
        check_finite({name: t}, self.dir)
        return t

    def _disk_name(self, name: str) -> str:
        """The on-disk name of an unconverted (maybe renamed) tensor."""
        return self.renamed.get(name, name)

    # -- sizes ---------------------------------------------------------------------------------------------
    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.info.values())


def layer_of(name: str, prefix: str) -> Optional[int]:
    """The layer index of ``name`` in the stack at ``prefix`` (``model.layers.3.mlp...`` -> 3), else None."""
    m = re.match(re.escape(prefix) + r"\.(\d+)\.", name)
    return int(m.group(1)) if m else None
