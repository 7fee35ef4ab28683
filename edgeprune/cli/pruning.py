"""``edgeprune score`` and ``edgeprune prune``: the first stages of a build, on their own."""
from __future__ import annotations

import click

from edgeprune.cli.app import main
from edgeprune.cli.options import data_inputs, data_options, guard_output, plan_option, prune_options


@main.command()
@data_options
@prune_options()
@click.option("--out", "out", type=click.Path(dir_okay=False), default="prune_plan.json", show_default=True,
              help="Where to write the plan (JSON).")
def score(task, data, prune_cfg, model_dir, given, out) -> None:
    """Score experts on task data and write a prune plan (JSON) to inspect, edit and reapply."""
    from edgeprune.originals.classifier import original_dir_for
    from edgeprune.pruning import methods
    from edgeprune.pruning.pipeline import score as run_score
    from edgeprune.pruning.save import write_plan

    prune_cfg.validate()
    guard_output(out, {"checkpoint (--model)": model_dir, **data_inputs(data)}, directory=False)
    original_dir = original_dir_for(model_dir, task, data)
    plan = run_score(original_dir, task, data, prune_cfg)  # under torchrun, ranks > 0 leave inside, rank 0 writes
    write_plan(plan, out)
    merges = methods.get(plan.method).merges
    for lp in plan.layers:
        click.echo(f"layer {lp.layer}: keep {lp.kept} of {lp.num_experts}" +
                   (f" (merge groups {[[e for e, _ in g] for g in lp.groups]})" if merges else ""))
    click.echo(f"plan: {out}")


@main.command()
@data_options
@prune_options(structure=True)
@plan_option
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Output checkpoint directory.")
def prune(task, data, prune_cfg, model_dir, given, plan_file, out) -> None:
    """Prune (or merge) to k experts per layer, fold the router at k = 1, recover; save a checkpoint."""
    from edgeprune.guard import writer_lock
    from edgeprune.originals.classifier import original_dir_for
    from edgeprune.pruning.pipeline import prune as run_prune
    from edgeprune.pruning.plan import PrunePlan
    from edgeprune.pruning.save import save_atomic

    if prune_cfg.vocab_reserve == -1:  # the full vocabulary (there is no preset here to keep it against)
        prune_cfg.vocab_reserve = None
    prune_cfg.validate()
    out = guard_output(out, {"checkpoint (--model)": model_dir, "plan (--plan)": plan_file, **data_inputs(data)})
    plan = PrunePlan.load(plan_file) if plan_file else None
    original_dir = original_dir_for(model_dir, task, data)
    with writer_lock(out):
        model, plan, info = run_prune(original_dir, task, data, prune_cfg, plan=plan)
        save_atomic(model, original_dir, out, plan, info)
    click.echo(f"{(model.config.architectures or [type(model).__name__])[0]}: k per layer "
               f"{plan.summary()['k_per_layer']}; checkpoint: {out}")
