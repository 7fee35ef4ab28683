"""Where calibration, recovery and the layer-wise passes compute: ``--device cpu|cuda|mps|auto`` (``cuda:N`` too).

``auto`` follows accelerate's choice of the default device (a CUDA GPU, else Apple's MPS, else the CPU). The model
is moved to the device for the pass and its batches follow it; statistics come back to the CPU as numpy, and the
saved checkpoints and the ONNX export are the CPU's as always. Only the CPU runs on this project's machines: GPU runs
are not measured here (README).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Union

import torch

from edgeprune.errors import ConfigError

NAMES = ("auto", "cpu", "cuda", "mps")


def resolve(name: Union[str, torch.device, None]) -> torch.device:
    """The device ``name`` stands for on this machine; one line (exit 2) for one it does not have."""
    if isinstance(name, torch.device):
        return name
    name = (name or "auto").strip().lower()
    kind = name.split(":", 1)[0]
    if kind == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if _mps() else "cpu")
    if kind not in NAMES[1:] + ("meta",):  # meta: placement without memory (tests, shape passes)
        raise ConfigError(f"--device {name}: not a device edgeprune knows; give one of {', '.join(NAMES)} (or cuda:N)")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: PyTorch sees no CUDA device here (torch.cuda.is_available() is False); "
                          "use --device cpu or auto")
    if kind == "mps" and not _mps():
        raise ConfigError(f"--device {name}: PyTorch has no MPS backend here (Apple silicon only); use --device cpu "
                          "or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name}: not a device name PyTorch reads (e.g. cuda:0)") from None


def _mps() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


@contextlib.contextmanager
def borrowed(device, *modules) -> Iterator[torch.device]:
    """The modules (None and non-modules skipped) on ``device`` for the pass, each back on its own device after it
    (the meta device holds no data to bring back: placement checks only); yields the resolved device."""
    dev = resolve(device)
    nets = [m for m in modules if isinstance(m, torch.nn.Module)]
    homes = [next(m.parameters()).device for m in nets]
    for m in nets:
        m.to(dev)
    try:
        yield dev
    finally:
        if dev.type != "meta":
            for m, home in zip(nets, homes):
                m.to(home)


def to(batch: dict, device: torch.device) -> dict:
    """A batch of tensors on ``device`` (other values as they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def autocast_type(device: torch.device) -> str:
    """torch.autocast's device type for ``device`` (bf16 autocast runs on CPU and CUDA)."""
    return device.type if device.type in ("cpu", "cuda") else "cpu"
