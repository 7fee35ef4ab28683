"""The ``edgeprune`` command line: a thin click layer; every subcommand builds a config and calls the
same library functions the pipeline uses. Errors are one line (``error: ...``) with a distinct exit code
(see :mod:`edgeprune.errors`)."""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from edgeprune.errors import EdgepruneError


class Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EdgepruneError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgeprune")
def main() -> None:
    """Prune a task-fine-tuned Mixture-of-Experts into a small, fast ONNX model for an edge target,
    and prove it against the original."""


def data_options(fn):
    """--task plus the custom-data options, resolved into (Task, DataSpec)."""

    @click.option("--task", "task_name", default="sst2", show_default=True,
                  help="Task: sst2, agnews, rte (data shipped) or mnli (give files).")
    @click.option("--train-file", type=click.Path(dir_okay=False), help="Training data (TSV, CSV or JSONL).")
    @click.option("--eval-file", type=click.Path(dir_okay=False), help="Validation data (TSV, CSV or JSONL).")
    @click.option("--text-column", help="Column of the (first) text.")
    @click.option("--text-pair-column", help="Column of the second text (pair tasks).")
    @click.option("--label-column", help="Column of the label.")
    @functools.wraps(fn)
    def wrapper(task_name, train_file, eval_file, text_column, text_pair_column, label_column, **kw):
        from edgeprune.original import DataSpec
        from edgeprune.tasks import get_task
        from edgeprune.tasks.loading import Columns

        task = get_task(task_name)
        columns = None
        if text_column or text_pair_column or label_column:
            columns = Columns.for_task(task, text_column, text_pair_column, label_column)
        data = DataSpec(train_file, eval_file, columns)
        for split in ("train", "validation"):  # fail on bad data before any model work
            data.load(task, split)
        return fn(task=task, data=data, **kw)

    return wrapper


def moe_options(fn):
    @click.option("--experts", "num_experts", default=8, show_default=True, type=click.IntRange(1),
                  help="Experts per MoE layer of the upcycled default original (Z).")
    @click.option("--drop-fraction", default=0.2, show_default=True, type=click.FloatRange(0, 1),
                  help="Drop-upcycling: share of each expert's hidden units re-initialised.")
    @click.option("--steps", type=click.IntRange(1), help="Fine-tuning steps (default: the task's budget).")
    @click.option("--dense", "dense_dir", type=click.Path(file_okay=False, exists=True),
                  help="Local dense BERT checkpoint to upcycle (default: the packaged MiniLM-L6).")
    @click.option("--force", is_flag=True, help="Rebuild even if cached.")
    @functools.wraps(fn)
    def wrapper(**kw):
        return fn(**kw)

    return wrapper


@main.command()
def tasks() -> None:
    """List the tasks."""
    from edgeprune.tasks import TASKS

    for t in TASKS.values():
        data = ", ".join(t.shipped_splits) or "none shipped (--train-file/--eval-file)"
        click.echo(f"{t.name:8s} {t.num_labels} labels ({', '.join(t.labels)}); data: {data}. {t.description}")


@main.command()
@data_options
@moe_options
def original(task, data, num_experts, drop_fraction, steps, dense_dir, force) -> None:
    """Build (or reuse) the original MoE: upcycle the packaged MiniLM and fine-tune it on the task."""
    from edgeprune.original import OriginalSpec, ensure_original, load_meta

    spec = OriginalSpec(task, data, "moe", num_experts=num_experts, drop_fraction=drop_fraction, steps=steps,
                        dense_dir=dense_dir)
    out = ensure_original(spec, force=force)
    _print_meta(out, load_meta(out))


@main.command()
@data_options
@click.option("--steps", type=click.IntRange(1), help="Fine-tuning steps (default: the task's budget).")
@click.option("--dense", "dense_dir", type=click.Path(file_okay=False, exists=True),
              help="Local dense BERT checkpoint (default: the packaged MiniLM-L6).")
@click.option("--force", is_flag=True, help="Rebuild even if cached.")
def baseline(task, data, steps, dense_dir, force) -> None:
    """Build (or reuse) the dense baseline: the dense model fine-tuned on the task with the same loop."""
    from edgeprune.original import OriginalSpec, ensure_original, load_meta

    out = ensure_original(OriginalSpec(task, data, "dense", steps=steps, dense_dir=dense_dir), force=force)
    _print_meta(out, load_meta(out))


def _print_meta(out: Path, meta: dict) -> None:
    click.echo(f"{meta['kind']} {meta['task']}: validation accuracy {meta['validation_accuracy']:.4f}, "
               f"{meta['parameters'] / 1e6:.1f}M parameters, fine-tune {meta['train']['seconds']} s")
    click.echo(f"checkpoint: {out}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
