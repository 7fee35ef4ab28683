"""Commands that run an artifact on another architecture's kernels: ``emulate setup`` (the cached arm64 root,
:mod:`edgeprune.validate.arm64_env`) and ``validate DIR --on arm64`` (:mod:`edgeprune.validate.arm64`)."""
from __future__ import annotations

import click

from edgeprune.cli.app import main


@main.group()
def emulate() -> None:
    """The emulated arm64 environment (qemu user mode, an arm64 Debian root, ONNX Runtime's aarch64 build)."""


@emulate.command("setup")
@click.option("--force", is_flag=True, help="Build the root again even if a complete one is cached.")
def emulate_setup(force) -> None:
    """Set up the arm64 root once (root and binfmt_misc needed; a few minutes and 1 GB; cached)."""
    from edgeprune.validate.arm64_env import setup

    setup(echo=lambda line: click.echo(line, err=True), force=force)


@main.command()
@click.argument("directory", type=click.Path(file_okay=False, exists=True))
@click.option("--on", "platform", type=click.Choice(["arm64"]), required=True,
              help="Run the artifact on this architecture's ONNX Runtime build, emulated (`emulate setup` first).")
@click.option("--cpu", "cpus", multiple=True, type=click.Choice(["neoverse-n1", "cortex-a72"]),
              help="Emulated CPU (repeatable); default both: neoverse-n1 (dot product) and cortex-a72 (plain NEON).")
@click.option("--limit", type=click.IntRange(1), help="First N examples of a seeded shuffle of the validation split.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--no-record", is_flag=True, help="Print only; leave the artifact's manifest and report as they are.")
def validate(directory, platform, cpus, limit, batch_size, no_record) -> None:
    """Validate a classifier artifact on arm64 kernels: accuracy, agreement and logit difference against x86_64,
    recorded in its manifest and report (no latency: emulated time is not device time)."""
    from edgeprune.validate.arm64 import validate_on_arm64

    validate_on_arm64(directory, cpus or ("neoverse-n1", "cortex-a72"), limit, batch_size, not no_record,
                      echo=click.echo)
