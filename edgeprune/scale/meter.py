"""Wall time and peak resident memory of each stage of a build, measured in the build's own process.

The peak is the kernel's ``VmHWM`` (``/proc/self/status``), reset at the start of each stage by writing ``5`` to
``/proc/self/clear_refs`` (Linux 4.0+), so a stage's figure is the largest resident set the process reached during
that stage (what was already resident included). Where the reset is not allowed or there is no ``/proc``, the figure
is the process's peak so far and the record says ``"cumulative": true``. ``results/scale.md`` compares these with
the checkpoint's size (``python scripts/scale.py --whole-build``).
"""
from __future__ import annotations

import gc
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

GIB = 1024 ** 3


def _status_kib(key: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


_LIBC = None


def trim() -> None:
    """``malloc_trim(0)`` where the C library is glibc: freed tensors of a layer (16 MB each here, below glibc's
    adaptive mmap threshold, so on the heap) would otherwise stay in the resident set, layer after layer."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def reset_peak() -> bool:
    """Reset ``VmHWM`` to the current resident set; ``False`` where the system does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_gib() -> Optional[float]:
    """The process's ``VmHWM`` in GiB (``None`` without ``/proc``)."""
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024 / GIB


class Meter:
    """Records one row per stage: ``{"stage", "seconds", "peak_gib", "start_gib"}`` (+ ``"cumulative"``)."""

    def __init__(self):
        self.rows: list[dict] = []

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        fresh = reset_peak()
        start = _status_kib("VmRSS")
        t0 = time.perf_counter()
        try:
            yield
        finally:
            peak = peak_gib()
            row = {"stage": name, "seconds": round(time.perf_counter() - t0, 1),
                   "peak_gib": None if peak is None else round(peak, 3),
                   "start_gib": None if start is None else round(start * 1024 / GIB, 3)}
            if not fresh:
                row["cumulative"] = True
            self.rows.append(row)
            gc.collect()  # what the stage freed goes back to the system before the next one starts
            trim()

    def line(self) -> str:
        """One line for the log: each stage's seconds and peak."""
        return "; ".join(f"{r['stage']} {r['seconds']} s, peak {r['peak_gib']} GiB" for r in self.rows)
