"""Per-stage wall time and peak memory of a build (edgeprune.scale.meter): the peak is reset at each stage, so a stage
that allocates shows it and the next one, which does not, shows less."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from edgeprune.scale.meter import Meter, reset_peak


@pytest.mark.skipif(not sys.platform.startswith("linux") or not reset_peak(), reason="needs Linux's clear_refs")
def test_each_stage_has_its_own_peak():
    meter = Meter()
    with meter.stage("allocates"):
        block = np.ones(64 * 1024 ** 2 // 8 * 4)  # 256 MiB, touched
        del block
    with meter.stage("quiet"):
        pass
    big, quiet = meter.rows
    assert big["stage"] == "allocates" and big["peak_gib"] - big["start_gib"] > 0.2
    assert quiet["peak_gib"] < big["peak_gib"] - 0.2 and "cumulative" not in quiet
    assert "allocates" in meter.line() and "GiB" in meter.line()


def test_a_stage_that_fails_is_still_recorded():
    meter = Meter()
    with pytest.raises(RuntimeError):
        with meter.stage("fails"):
            raise RuntimeError("boom")
    assert meter.rows[0]["stage"] == "fails" and meter.rows[0]["seconds"] >= 0
