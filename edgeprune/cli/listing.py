"""``edgeprune families``, ``tasks``, ``targets``: what edgeprune knows, listed."""
from __future__ import annotations

import click

from edgeprune.cli.app import main


@main.command()
def families() -> None:
    """List the supported MoE families: heads, fold target (exact or not), export path."""
    from edgeprune.export.onnx_export import optimum_supports
    from edgeprune.models.registry import all_adapters

    for a in all_adapters():
        fold = a.dense.classifier_class.__name__ if a.dense else "its own class"
        k1 = "optimum" if a.dense and optimum_supports(a.dense.config_class.model_type) else "torch.onnx"
        k2 = "torch.onnx + dense dispatch" + (" or com.microsoft.MoE" if a.ort_moe else "")
        export = f"{k1} (k = 1), {k2} (k > 1)"
        heads = ", ".join(h + (" (label words)" if h.endswith("-lm") else "") for h in a.heads)
        click.echo(f"{a.model_type:19s} heads: {heads}; k = 1 -> {fold}: {a.fold_exact}; export: {export}")


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
