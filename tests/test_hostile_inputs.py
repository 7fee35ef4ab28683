"""Every case of scripts/hostile_inputs.py (data files, checkpoints, artifacts, target profiles, plans, options
and outputs across every command) ends in one error line with a documented exit code, or succeeds where the
input is only unusual: no traceback, no exit 70, no output left behind, no input changed."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "hostile_inputs.py"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("hostile_inputs", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["hostile_inputs"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    import os

    saved = {k: os.environ.get(k) for k in ("EDGEPRUNE_TARGETS", "EDGEPRUNE_CACHE")}
    world = mod.build_world(tmp_path_factory.mktemp("hostile"))
    yield mod, world
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_there_are_at_least_150_cases_over_every_command(hostile):
    mod, world = hostile
    cases = mod.all_cases()
    assert len(cases) >= 150
    commands = {c.args(world)[0] for c in cases}
    assert {"score", "prune", "build", "check", "predict", "upcycle", "original", "baseline", "families", "tasks",
            "targets", "generate", "export-lm"} <= commands


@pytest.mark.parametrize("group", ["data", "model", "artifact", "target", "plan", "option", "output", "generation"])
def test_every_hostile_input_is_handled(hostile, group):
    mod, world = hostile
    rows = [mod.run_case(world, c) for c in mod.all_cases() if c.group == group]
    wrong = [f"{r['case']}: {r['verdict']} {r['problems']} exit {r['exit_code']}: {r['first_line']}" for r in rows
             if r["verdict"] != "ok"]
    assert not wrong, "\n".join(wrong)
