"""What a build depends on (:class:`BuildConfig`, written next to the artifact as ``build_config.json``), the
build's log line and the versions it records."""
from __future__ import annotations

import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from edgeprune import __version__
from edgeprune.pruning.config import PruneConfig
from edgeprune.targets import Target
from edgeprune.tasks.registry import Task
from edgeprune.tasks.spec import DataSpec


@dataclass
class BuildConfig:
    """Everything a build depends on; written next to the artifact as ``build_config.json``."""

    task: Task
    target: Target
    out: Path
    data: DataSpec = field(default_factory=DataSpec)
    model_dir: Optional[str] = None
    prune: PruneConfig = field(default_factory=PruneConfig)
    plan_file: Optional[str] = None
    eval_examples: Optional[int] = None
    parity_examples: int = 256
    latency_iters: int = 100
    throughput_iters: int = 10
    command: str = ""
    extra_files: dict = field(default_factory=dict)  # artifact-relative name -> file to copy in (the search's front)
    emulate: bool = False  # also run the artifact on arm64 kernels under qemu before publishing (validate/arm64.py)
    recipe: str = "upcycle"  # the default original when there is no model_dir: upcycled, or "btx" (originals/btx.py)

    def original_spec(self):
        """The default original of this build (used when ``model_dir`` is None)."""
        from edgeprune.originals.classifier import OriginalSpec

        if self.recipe == "btx":
            from edgeprune.originals.btx import BtxRecipe

            return OriginalSpec(self.task, self.data, "moe", btx=BtxRecipe())
        return OriginalSpec(self.task, self.data, "moe")

    def to_dict(self) -> dict:
        return {"task": self.task.name, "target": self.target.to_dict(), "out": str(self.out),
                "data": asdict(self.data), "model": self.model_dir, "prune": self.prune.to_dict(),
                "plan_file": self.plan_file, "eval_examples": self.eval_examples,
                "parity_examples": self.parity_examples, "latency_iters": self.latency_iters,
                "command": self.command, "recipe": self.recipe}


def log(msg: str) -> None:
    print(f"[edgeprune] {msg}", flush=True)


def versions() -> dict:
    import onnx
    import onnxruntime
    import torch
    import transformers

    return {"edgeprune": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version()}
