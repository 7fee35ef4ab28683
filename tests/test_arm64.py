"""Validation on arm64 kernels (edgeprune/validate/arm64.py, arm64_env.py): the emulated CPUs' cpuinfo, the
one-line refusals where the machine cannot emulate, the comparison and the record in the artifact; and, marked
``emulation`` (out of the default command: it needs root and `edgeprune emulate setup`), a tiny artifact run on
both emulated CPUs against the host."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from edgeprune.cli import main
from edgeprune.errors import EmulationError
from edgeprune.validate import arm64, arm64_env


def test_the_emulated_cpus_claim_what_they_have():
    n1, a72 = arm64_env.CPUS["neoverse-n1"].cpuinfo(), arm64_env.CPUS["cortex-a72"].cpuinfo()
    assert "asimddp" in n1 and "asimddp" not in a72  # dot product: MLAS's SDOT/UDOT kernels, or plain NEON
    for text in (n1, a72):
        assert text.count("processor\t:") == 2 and "CPU implementer\t: 0x41" in text
        assert not any(f in text.split() for f in ("sve", "sme", "i8mm"))  # never the SME paths (DESIGN.md 11)


def test_no_environment_is_one_line_with_the_command_to_run(tmp_path, monkeypatch, tiny_original):
    monkeypatch.setenv("EDGEPRUNE_CACHE", str(tmp_path / "cache"))
    res = CliRunner().invoke(main, ["validate", str(tiny_original), "--on", "arm64"])
    assert res.exit_code == 6 and res.output.count("\n") == 1
    assert "no arm64 environment" in res.output and "edgeprune emulate setup" in res.output


def test_setup_needs_root(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGEPRUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(arm64_env.os, "geteuid", lambda: 1000)
    res = CliRunner().invoke(main, ["emulate", "setup"])
    assert res.exit_code == 6 and "needs root" in res.output and res.output.count("\n") == 1
    assert not (tmp_path / "arm64").exists()  # nothing half-made


def test_setup_without_qemu_and_without_apt_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGEPRUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(arm64_env.os, "geteuid", lambda: 0)
    monkeypatch.setattr(arm64_env.shutil, "which", lambda name: None)
    with pytest.raises(EmulationError, match="install qemu-user-static, binfmt-support and debootstrap"):
        arm64_env.setup(echo=lambda line: None)


def test_a_machine_without_binfmt_misc_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(arm64_env.os, "geteuid", lambda: 0)
    monkeypatch.setattr(arm64_env.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(arm64_env, "Path", lambda p: tmp_path / "no-binfmt" if p == "/proc/sys/fs/binfmt_misc" else p)

    class Failed:
        returncode, stderr = 32, "mount: permission denied"

    monkeypatch.setattr(arm64_env.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(EmulationError, match=r"no binfmt_misc.*permission denied"):
        arm64_env.check_machine(install=False)


def test_compare_counts_agreement_differences_and_accuracy():
    host = np.array([[1.0, 0.0], [0.0, 1.0], [0.2, 0.1], [0.0, 3.0]])
    guest = host + np.array([[0.0, 0.0], [0.0, 0.01], [0.0, 0.2], [0.0, 0.0]])
    got = arm64.compare(host, guest, [0, 1, 0, 0])
    assert got["agreement"] == 0.75 and got["max_abs_logit_diff"] == 0.2
    assert got["accuracy_x86_64"] == 0.75 and got["accuracy_arm64"] == 0.5


def test_the_record_goes_into_manifest_and_report_and_replaces_itself(tmp_path):
    (tmp_path / "edgeprune.json").write_text(json.dumps({"task": "sst2"}))
    (tmp_path / "report.json").write_text(json.dumps({"accuracy": 0.9}))
    (tmp_path / "report.md").write_text("# Report\n\n## Budgets\n\nAll budgets hold.\n")
    row = {"agreement": 1.0, "max_abs_logit_diff": 0.02, "mean_abs_logit_diff": 0.003, "accuracy_arm64": 0.9,
           "accuracy_x86_64": 0.9, "kernels": "plain NEON"}
    result = {"split": "validation", "examples": 10, "batch_size": 32, "cpus": {"cortex-a72": row}}
    arm64.write_record(tmp_path, result)
    arm64.write_record(tmp_path, {**result, "examples": 20})
    text = (tmp_path / "report.md").read_text()
    assert text.count("## On arm64 kernels (emulated)") == 1 and "20 examples" in text and "## Budgets" in text
    assert "| cortex-a72 | plain NEON | 0.9 | 0.9 | 1.0 | 0.02 | 0.003 |" in text
    assert json.loads((tmp_path / "edgeprune.json").read_text())["arm64_emulation"]["examples"] == 20
    assert json.loads((tmp_path / "report.json").read_text())["accuracy"] == 0.9
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.emulation
def test_a_tiny_artifact_on_both_emulated_cpus_matches_the_host(tmp_path, tiny_original):
    """The real thing: ONNX Runtime's aarch64 build under qemu, both CPUs, labels equal to x86_64's and the logits
    within the int8 graph's rounding (the tiny int8 artifact: 1e-3), the dot product seen only on neoverse-n1."""
    from tests.conftest import write_loose_profiles
    from tests.test_build import FAST

    if arm64_env.ready() is None:
        pytest.skip("no arm64 environment: run `edgeprune emulate setup` first")
    root = arm64_env.root_dir()  # the set-up one, whatever cache the builds below use
    tdir = write_loose_profiles(tmp_path / "targets", ["arm64"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEPRUNE_TARGETS", str(tdir))
        mp.setenv("EDGEPRUNE_CACHE", str(tmp_path / "cache"))
        res = CliRunner().invoke(main, ["build", "--model", str(tiny_original), "--target", "arm64", "--out",
                                        str(tmp_path / "art")] + FAST, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["validate", str(tmp_path / "art"), "--on", "arm64", "--limit", "40"])
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "art" / "edgeprune.json").read_text())["arm64_emulation"]
    assert rec["examples"] == 40 and set(rec["cpus"]) == {"neoverse-n1", "cortex-a72"}
    with pytest.MonkeyPatch.context() as mp:  # the build runs it itself with --emulate, on its validation data
        mp.setenv("EDGEPRUNE_TARGETS", str(tdir))
        mp.setenv("EDGEPRUNE_CACHE", str(tmp_path / "cache"))
        mp.setenv("EDGEPRUNE_ARM64_ROOT", str(root))
        res = CliRunner().invoke(main, ["build", "--model", str(tiny_original), "--target", "arm64", "--emulate",
                                        "--out", str(tmp_path / "art2")] + FAST, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    rec2 = json.loads((tmp_path / "art2" / "edgeprune.json").read_text())["arm64_emulation"]
    assert rec2["examples"] == 48 and all(r["agreement"] == 1.0 for r in rec2["cpus"].values())
    for cpu, row in rec["cpus"].items():
        assert row["machine"] == "aarch64" and row["agreement"] == 1.0 and row["max_abs_logit_diff"] <= 1e-3
        assert row["hwcaps"]["asimddp"] == (cpu == "neoverse-n1") and not row["hwcaps"]["sme"]
    assert "## On arm64 kernels (emulated)" in (tmp_path / "art" / "report.md").read_text()


def test_build_emulate_without_the_environment_stops_before_any_work(tmp_path, monkeypatch, tiny_original):
    monkeypatch.setenv("EDGEPRUNE_CACHE", str(tmp_path / "cache"))
    res = CliRunner().invoke(main, ["build", "--model", str(tiny_original), "--target", "arm64", "--emulate",
                                    "--out", str(tmp_path / "art")])
    assert res.exit_code == 6 and "edgeprune emulate setup" in res.output and not (tmp_path / "art").exists()
    assert not (tmp_path / "cache" / "stages").exists()  # nothing built
    res = CliRunner().invoke(main, ["build", "--model", str(tiny_original), "--generate", "--emulate",
                                    "--out", str(tmp_path / "art")])
    assert res.exit_code == 2 and "--emulate runs classifier artifacts" in res.output


def test_a_decoder_artifact_is_refused_in_one_line(tmp_path, monkeypatch):
    (tmp_path / "edgeprune.json").write_text(json.dumps({"kind": "causal-lm", "task": "sst2"}))
    monkeypatch.setattr(arm64, "require", lambda: None)  # as if the root were set up
    res = CliRunner().invoke(main, ["validate", str(tmp_path), "--on", "arm64"])
    assert res.exit_code == 2 and res.output.count("\n") == 1
    assert "runs classifier artifacts; this one is a decoder" in res.output
