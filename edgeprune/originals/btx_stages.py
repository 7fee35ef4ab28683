"""Finished stages of a Branch-Train-MiX build kept on disk, so an interrupted build goes on at the next stage.

A BTX pretraining is a chain of independent runs (the masked-LM head, one branch per domain, the mixture): about
30 min on 2 idle cores, hours on a busy machine. Each finished stage's weights (safetensors), its record, and the
random states after it (torch's global generator and the Drop-Upcycling generator) are written atomically under
the cache's ``partial/`` entry of the build; a rerun of the same recipe loads them instead of training again, and
its result equals the uninterrupted build bit for bit (``tests/test_btx.py``). The directory is removed when the
build completes. A directory written for another recipe is ignored (its key differs).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

_RNG, _GEN = "__rng_torch__", "__rng_generator__"


class BtxStages:
    """``load(name)`` / ``save(name, tensors, record)`` of one build's stages (``directory`` None: nothing kept)."""

    def __init__(self, directory: Optional[Path], key: dict, gen: torch.Generator):
        self.dir, self.gen = (Path(directory) if directory else None), gen
        self.key = json.loads(json.dumps(key))  # as it reads back (tuples are lists)

    def _file(self, name: str) -> Path:
        slug = "".join(c if c.isalnum() else "-" for c in name)
        return self.dir / f"{slug}.safetensors"

    def load(self, name: str) -> Optional[tuple[dict, dict]]:
        """The stage's tensors and record, with the random states restored to those after it; None if not kept."""
        from safetensors.torch import load_file

        if self.dir is None or not self._file(name).is_file():
            return None
        try:
            meta = json.loads(self._file(name).with_suffix(".json").read_text())
            tensors = load_file(self._file(name))
        except (OSError, ValueError):
            return None
        if meta.get("key") != self.key:
            return None
        torch.set_rng_state(tensors.pop(_RNG))
        self.gen.set_state(tensors.pop(_GEN))
        return tensors, meta["record"]

    def save(self, name: str, tensors: dict, record: dict) -> None:
        from safetensors.torch import save_file

        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        data = {k: v.detach().clone().contiguous() for k, v in tensors.items()}  # tied weights saved apart
        data[_RNG], data[_GEN] = torch.get_rng_state(), self.gen.get_state()
        path = self._file(name)
        save_file(data, str(path) + ".tmp")
        path.with_suffix(".json.tmp").write_text(json.dumps({"key": self.key, "record": record}))
        os.replace(path.with_suffix(".json.tmp"), path.with_suffix(".json"))
        os.replace(str(path) + ".tmp", path)

    def run(self, name: str, module: torch.nn.Module, train, record: dict) -> None:
        """The stage ``name``: ``module`` loaded from its kept state, or trained by ``train()`` (which returns the
        stage's record) and kept; the record goes to ``record["stages"][name]`` either way."""
        kept = self.load(name)
        if kept is not None:
            module.load_state_dict(kept[0])
            record["stages"][name] = kept[1]
            return
        record["stages"][name] = train()
        self.save(name, module.state_dict(), record["stages"][name])

    def clear(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


__all__ = ["BtxStages"]
