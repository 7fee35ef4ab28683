"""``edgeprune families``, ``tasks``, ``targets``: what edgeprune knows, listed."""
from __future__ import annotations

import click

from edgeprune.cli.app import main


@main.command()
def families() -> None:
    """List the MoE families of transformers: what each supports (heads, fold, export path) or why it is not."""
    import json
    from pathlib import Path

    # written from the registry (edgeprune.export.support.write_table; a test keeps them equal): no torch here
    for line in json.loads((Path(__file__).parents[1] / "models" / "families.json").read_text()):
        click.echo(line)


@main.command()
def tasks() -> None:
    """List the tasks."""
    from edgeprune.tasks import TASKS

    for t in TASKS.values():
        data = ", ".join(t.shipped_splits) or "none shipped (--train-file/--eval-file)"
        labels = f"{t.num_labels} labels ({', '.join(t.labels)})" if t.labels else "generation only"
        click.echo(f"{t.name:10s} {labels}; data: {data}. {t.description}")


@main.command()
def targets() -> None:
    """List the target profiles (targets/*.toml)."""
    from edgeprune import targets as profiles

    for name, path in profiles.available().items():
        t = profiles.load_target(str(path))
        b = t.budgets
        click.echo(f"{name:11s} {t.quantization.precision:12s} ort={str(t.runtime.ort_format).lower():5s} "
                   f"shapes={'fixed' if t.export.fixed_shapes else 'dynamic':7s} budgets: <= {b.max_size_mb} MB, "
                   f"p95 <= {b.max_p95_latency_ms} ms, drop <= {b.max_accuracy_drop} pts; --generate: "
                   f"{t.generate.weights} ({t.generate.algorithm}, blocks of {t.generate.block_size}). {t.description}")
