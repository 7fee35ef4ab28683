"""``edgeprune build``: one spine for every kind of model.

original ─ prepare (load or skeleton, checks before heavy work, validation data)
         ─ prune stage (cached: :func:`edgeprune.build.stage.stage_prune`)
         ─ export stage (cached, parity-gated; the kind's)
         ─ validate side by side with the original (the kind's) ─ budgets
         ─ publish: the artifact directory replaced atomically, or ``<out>.rejected`` and exit 1

A kind is the classifier (:mod:`edgeprune.build.classifier`) or the decoder of ``--generate``
(:mod:`edgeprune.build.decoder`): the same stages, each kind saying how it prepares, exports, validates and
places its files. A build whose budgets fail keeps the previous artifact in ``--out`` untouched and puts the
rejected one, with its report, in ``<out>.rejected`` for inspection; the command exits 1.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from edgeprune.build.config import BuildConfig, log
from edgeprune.build.stage import stage_prune
from edgeprune.cache import atomic_dir
from edgeprune.errors import BudgetError


@dataclass
class Prepared:
    """What a kind prepared from the original before the stages run: its directory and hash, the model (or a
    layer-wise skeleton), and the kind's own validation data (``extra``)."""

    original_dir: Path
    original_hash: str
    original: Any
    extra: dict = field(default_factory=dict)


class Kind(Protocol):
    """The part of a build that differs between a classifier and a decoder."""

    def default_original(self, cfg: BuildConfig) -> Path: ...
    def prepare(self, cfg: BuildConfig, original_dir: Path) -> Prepared: ...
    def export(self, cfg: BuildConfig, pruned_dir: Path, prep: Prepared) -> Path: ...
    def validate(self, cfg: BuildConfig, prep: Prepared, pruned_dir: Path, export_dir: Path) -> tuple[dict, dict]: ...
    def violations(self, report: dict, cfg: BuildConfig) -> list[str]: ...
    def place(self, tmp: Path, cfg: BuildConfig, pruned_dir: Path, export_dir: Path, manifest: dict) -> None: ...
    def markdown(self, report: dict) -> str: ...
    def card(self, report: dict, manifest: dict) -> str: ...


def run(cfg: BuildConfig, kind: Kind) -> tuple[Path, dict]:
    """Run the whole pipeline for ``kind``; returns the artifact directory and the report. Raises
    :class:`BudgetError` (exit 1) when a budget fails, leaving the previous artifact in place."""
    from edgeprune.scale import distributed
    from edgeprune.scale.meter import Meter

    t0, meter = time.perf_counter(), Meter()
    cfg.prune.validate()
    original_dir = Path(cfg.model_dir) if cfg.model_dir else kind.default_original(cfg)
    with meter.stage("prepare"):
        prep = kind.prepare(cfg, original_dir)
    with meter.stage("prune"):
        pruned_dir = stage_prune(cfg, original_dir, prep.original_hash)
    distributed.release_workers()  # under torchrun (if the prune stage was cached): the rest is rank 0's
    with meter.stage("export"):
        export_dir = kind.export(cfg, pruned_dir, prep)
    with meter.stage("validate"):
        report, manifest = kind.validate(cfg, prep, pruned_dir, export_dir)
    report["violations"] = kind.violations(report, cfg)
    report["build_seconds"] = round(time.perf_counter() - t0, 1)
    report["stages"] = meter.rows  # wall time and peak resident memory (VmHWM) of each stage; cached stages are quick
    log(f"stages: {meter.line()}")
    return publish(cfg, pruned_dir, report, manifest,
                   lambda tmp: kind.place(tmp, cfg, pruned_dir, export_dir, manifest), kind.markdown, kind.card)


def build(cfg: BuildConfig) -> tuple[Path, dict]:
    """The build of ``cfg``'s kind: a decoder with ``--generate``, else a classifier."""
    if cfg.prune.generate:
        from edgeprune.build.decoder import DECODER as kind
    else:
        from edgeprune.build.classifier import CLASSIFIER as kind
    return run(cfg, kind)


def publish(cfg: BuildConfig, pruned_dir: Path, report: dict, manifest: dict, place: Callable[[Path], None],
            markdown: Callable[[dict], str], card: Callable[[dict, dict], str]) -> tuple[Path, dict]:
    """Write the artifact (``place`` its files, then the records) atomically into ``--out``, or into
    ``<out>.rejected`` and exit 1 (:class:`BudgetError`) when a budget failed."""
    final = Path(cfg.out)
    dest = final if not report["violations"] else final.parent / f"{final.name}.rejected"
    with atomic_dir(dest) as tmp:
        place(tmp)
        write_records(tmp, cfg, pruned_dir, manifest, report, markdown, card)
        if cfg.emulate:  # on arm64 kernels before the artifact is published (recorded in its manifest and report)
            from edgeprune.validate.arm64 import validate_on_arm64

            log("validate on arm64 kernels (qemu): neoverse-n1 and cortex-a72")
            validate_on_arm64(tmp, examples=cfg.data.load(cfg.task, "validation", cfg.eval_examples), echo=log)
    if report["violations"]:
        raise BudgetError("budgets failed (previous artifact kept; this one is in "
                          f"{dest}):\n" + "\n".join(f"  - {v}" for v in report["violations"]))
    return final, report


def write_records(tmp: Path, cfg: BuildConfig, pruned_dir: Path, manifest: dict, report: dict, markdown, card) -> None:
    """The plan, manifest, report (JSON and ``markdown(report)``), model card and resolved config into ``tmp``."""
    shutil.copy2(pruned_dir / "prune_plan.json", tmp / "prune_plan.json")
    (tmp / "edgeprune.json").write_text(json.dumps(manifest, indent=1))
    (tmp / "report.json").write_text(json.dumps(report, indent=1))
    (tmp / "report.md").write_text(markdown(report))
    (tmp / "README.md").write_text(card(report, manifest))
    (tmp / "build_config.json").write_text(json.dumps(cfg.to_dict(), indent=1, default=str))
