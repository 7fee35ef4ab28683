"""Wall time and peak resident memory of each stage of a build, measured in the build's own process.

The peak is the kernel's ``VmHWM`` (``/proc/self/status``), reset at the start of each stage by writing ``5`` to
``/proc/self/clear_refs`` (Linux 4.0+), so a stage's figure is the largest resident set the process reached during
that stage (what was already resident included); a stage that ran a child process (the large export:
:mod:`edgeprune.export.large`, which reports its peak through :func:`note_child_peak`) has as its peak the larger of
its own and the child's plus what this process held meanwhile (``child_peak_gib``, ``own_peak_gib`` kept). Where the reset is not allowed or there is no ``/proc``, the figure
is the process's peak so far and the record says ``"cumulative": true``. ``results/scale.md`` compares these with
the checkpoint's size (``python scripts/scale.py --whole-build``).
"""
from __future__ import annotations

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


_CHILD_PEAKS: list[tuple[float, float]] = []


def resident_gib() -> float:
    """The process's resident set now (``VmRSS``), GiB; 0 without ``/proc``."""
    return (_status_kib("VmRSS") or 0) * 1024 / GIB


def note_child_peak(gib: float, beside_gib: float) -> None:
    """A child process this one ran and waited for peaked at ``gib`` (its own ``VmHWM``) while this one held
    ``beside_gib``: the running stage's peak is at least their sum. (``RUSAGE_CHILDREN`` cannot tell: a forked
    child's ``ru_maxrss`` starts from its parent's resident set.)"""
    _CHILD_PEAKS.append((gib, beside_gib))


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
        start, children = _status_kib("VmRSS"), len(_CHILD_PEAKS)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            peak = peak_gib()
            row = {"stage": name, "seconds": round(time.perf_counter() - t0, 1),
                   "peak_gib": None if peak is None else round(peak, 3),
                   "start_gib": None if start is None else round(start * 1024 / GIB, 3)}
            if len(_CHILD_PEAKS) > children:  # a child process ran (the large export) while this one waited
                ran = _CHILD_PEAKS[children:]
                row["child_peak_gib"] = round(max(c for c, _ in ran), 3)
                row["own_peak_gib"] = row["peak_gib"]
                row["peak_gib"] = round(max([row["peak_gib"] or 0] + [c + b for c, b in ran]), 3)
            if not fresh:
                row["cumulative"] = True
            self.rows.append(row)

    def line(self) -> str:
        """One line for the log: each stage's seconds and peak."""
        return "; ".join(f"{r['stage']} {r['seconds']} s, peak {r['peak_gib']} GiB" for r in self.rows)
