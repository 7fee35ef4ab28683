"""Checkpoints of a fine-tuning run, so that an interrupted run (Ctrl-C, SIGTERM, a crash) continues where it was.

Where: a directory in the cache that names the run (:func:`checkpoints_under` sets it for every run inside a
block, e.g. a build's prune stage or an original; ``train(checkpoint=DIR)`` for one run). What: every
``every`` steps, the model's parameters and buffers, AdamW's state, the learning-rate schedule's position, the
torch and Python random states, the batches left of the epoch and the losses so far, written atomically
(safetensors for tensors, JSON for the rest: nothing is unpickled when it is read back). A rerun with the same
run directory loads it and goes on; the result equals the uninterrupted run bit for bit on one process (same
batches, same random draws, same arithmetic; ``tests/test_training.py``). The checkpoint is removed when the run
completes. Runs under torchrun and runs with a per-step hook (progressive pruning) are not checkpointed: their
state lives outside the loop.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator, Optional

import torch

_ROOT: list[Path] = []


@contextlib.contextmanager
def checkpoints_under(directory: str | Path) -> Iterator[None]:
    """Every :func:`~edgeprune.training.loop.train` inside the block checkpoints into ``directory / <its desc>``."""
    _ROOT.append(Path(directory))
    try:
        yield
    finally:
        _ROOT.pop()


def run_dir(desc: str, explicit: Optional[str | Path] = None) -> Optional[Path]:
    """The checkpoint directory of the run named ``desc`` (None: no checkpoints)."""
    if explicit is not None:
        return Path(explicit)
    if not _ROOT:
        return None
    slug = "".join(c if c.isalnum() else "-" for c in desc).strip("-") or "run"
    return _ROOT[-1] / slug


class Checkpoint:
    """The state of one run at a step boundary (see the module docstring)."""

    def __init__(self, directory: Path, key: str):
        self.dir = directory
        self.key = key  # what the run is (its config): a checkpoint of another run is ignored

    def load(self, model, opt, sched) -> Optional[dict]:
        """The saved state (``step``, ``losses``, ``batches``, ``rng``) after restoring model, optimizer and
        schedule in place, or None where there is no usable checkpoint."""
        from safetensors.torch import load_file

        try:
            meta = json.loads((self.dir / "state.json").read_text())
            if meta.get("key") != self.key:
                return None
            tensors = load_file(str(self.dir / "tensors.safetensors"))
        except (OSError, ValueError):
            return None
        model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        opt.load_state_dict({"state": {int(i): {n: tensors[f"opt.{i}.{n}"] for n in names}
                                       for i, names in meta["opt_state"].items()},
                             "param_groups": meta["opt_groups"]})  # the learning rates the schedule set
        sched.load_state_dict(meta["sched"])
        torch.set_rng_state(tensors["rng.torch"])
        meta["rng"] = _tuples(meta["rng"])
        return meta

    def save(self, step: int, model, opt, sched, losses: list, batches: list, rng_state,
             extra: Optional[dict] = None) -> None:
        from safetensors.torch import save_file

        tensors = {f"model.{k}": v.detach().contiguous().clone() for k, v in model.state_dict().items()}
        opt_names = {}
        for i, st in opt.state_dict()["state"].items():
            opt_names[str(i)] = sorted(st)
            for n, v in st.items():
                tensors[f"opt.{i}.{n}"] = (v if torch.is_tensor(v) else torch.tensor(v)).contiguous().clone()
        tensors["rng.torch"] = torch.get_rng_state()
        meta = {"key": self.key, "step": step, "losses": losses, "batches": batches, "rng": rng_state,
                "opt_state": opt_names, "opt_groups": opt.state_dict()["param_groups"], "sched": sched.state_dict(),
                "extra": extra or {}}
        tmp = self.dir.with_name(f".{self.dir.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / "tensors.safetensors"))  # each tensor cloned above: no shared (tied) memory
        (tmp / "state.json").write_text(json.dumps(meta))
        shutil.rmtree(self.dir, ignore_errors=True)
        os.replace(tmp, self.dir)

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def for_loop(desc: str, *key, explicit: Optional[str | Path] = None) -> Optional[Checkpoint]:
    """The checkpoint of the run named ``desc`` whose inputs are ``key`` (in ``explicit``, or inside
    :func:`checkpoints_under`); None where the run is not checkpointed."""
    from edgeprune.cache import fingerprint

    directory = run_dir(desc, explicit)
    return Checkpoint(directory, fingerprint(desc, *key)) if directory is not None else None


def resume(ck: Optional[Checkpoint], model, opt, sched, rng, desc: str, steps: int, progress: bool) -> dict:
    """The state of a run resumed from ``ck`` (model, optimizer, schedule and random states restored in place;
    ``step``, ``losses``, ``batches``, ``extra``), or a fresh run's (step 0) where there is no checkpoint."""
    state = ck.load(model, opt, sched) if ck is not None else None
    if state is None:
        return {"step": 0, "losses": [], "batches": [], "extra": {}}
    rng.setstate(state["rng"])
    if progress:
        print(f"[edgeprune] {desc}: resuming at step {state['step']} of {steps} from the checkpoint in {ck.dir}",
              flush=True)
    return {"extra": {}, **state}


def _tuples(x):
    """JSON turned Python's random state (nested tuples) into lists: back to tuples."""
    return tuple(_tuples(i) for i in x) if isinstance(x, list) else x
