"""``edgeprune build`` (the whole pipeline) and ``edgeprune search`` (its structural knobs, searched)."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from edgeprune.cli.app import main
from edgeprune.cli.options import data_inputs, data_options, guard_output, plan_option, prune_options, target_option
from edgeprune.errors import BudgetError, ConfigError


@main.command()
@data_options
@prune_options(structure=True)
@target_option
@plan_option
@click.option("--eval-examples", type=click.IntRange(1), help="Validate on this many examples (default: all).")
@click.option("--latency-iters", default=100, show_default=True, type=click.IntRange(5))
@click.option("--embedding-bits", type=click.Choice(["8", "4"]), default=None,
              help="The word embedding's precision: 8 (int8, the dynamic quantizer) or 4 (GatherBlockQuantized) "
                   "[default: the target's].")
@click.option("--preset", "preset_file", type=click.Path(dir_okay=False, exists=True),
              help="Apply a preset of structural knobs ([prune]: drop_layers, heads_keep, ffn_keep, vocab_reserve, "
                   "recovery_steps), e.g. the preset.toml `edgeprune search` wrote for this model; options given "
                   "win. Without it a --model gets the plain fold (the target's own [prune] is the default original's "
                   "recipe).")
@click.option("--search", "search_trials", type=click.IntRange(1), default=None, metavar="TRIALS",
              help="First search TRIALS candidates (edgeprune search) and build the smallest within the budgets; the "
                   "Pareto table and plot go into the artifact.")
@click.option("--emulate", is_flag=True,
              help="Also run the artifact on arm64 kernels under qemu (neoverse-n1, cortex-a72) before publishing it, "
                   "against x86_64 on the validation data (`edgeprune emulate setup` once; classifiers).")
@click.option("--recipe", type=click.Choice(["upcycle", "btx"]), default="upcycle", show_default=True,
              help="Without --model: the default original upcycled, or by Branch-Train-MiX (`edgeprune original "
                   "--recipe btx`, with --generate `--family mixtral --recipe btx`; the target's [prune] preset was "
                   "chosen on the upcycled one and is not applied).")
@click.option("--out", type=click.Path(file_okay=False),
              help="Artifact directory [default: build/<task>-<target>, build/<task>-<target>-generate with --generate].")
def build(task, data, prune_cfg, model_dir, given, target_name, plan_file, eval_examples, latency_iters,
          embedding_bits, preset_file, search_trials, emulate, recipe, out) -> None:
    """The whole pipeline: prune, recover, export, quantize, validate against the original, check budgets."""
    from edgeprune.build.config import BuildConfig
    from edgeprune.build.presets import apply_presets, with_embedding_bits
    from edgeprune.guard import writer_lock
    from edgeprune.targets import load_target

    target = with_embedding_bits(load_target(target_name), embedding_bits)
    if search_trials and (plan_file or preset_file):
        raise ConfigError(f"--search chooses the knobs itself; drop {'--plan' if plan_file else '--preset'}")
    if emulate:  # before any heavy work: the machine can emulate and the root is set up
        if prune_cfg.generate:
            raise ConfigError("--emulate runs classifier artifacts (EdgeModel); drop it with --generate")
        from edgeprune.validate.arm64_env import require

        require()
    if prune_cfg.generate:
        if search_trials or embedding_bits or preset_file:
            raise ConfigError("--search, --preset and --embedding-bits are for classifiers; a --generate build takes "
                              "its weights from the target's [generate] section")
    else:
        if recipe == "btx" and model_dir:
            raise ConfigError("--recipe picks the default original; with --model DIR drop it")
        apply_presets(prune_cfg, target, plan_file, given, click.echo, model_dir=model_dir, preset_file=preset_file,
                      other="the BTX original" if recipe == "btx" else None)
    prune_cfg.validate()
    if plan_file:
        from edgeprune.pruning.plan import PrunePlan

        PrunePlan.load(plan_file)
    inputs = {"checkpoint (--model)": model_dir, "plan (--plan)": plan_file, "preset (--preset)": preset_file,
              **data_inputs(data)}
    out = guard_output(out or f"build/{task.name}-{target.name}" + ("-generate" if prune_cfg.generate else ""), inputs)
    guard_output(out.parent / f"{out.name}.rejected", inputs)
    if search_trials:
        guard_output(out.parent / f"{out.name}.search", {"checkpoint (--model)": model_dir, **data_inputs(data)},
                     replace=False)  # the search adds trial folders; it replaces nothing
    cfg = BuildConfig(task=task, target=target, out=out, data=data, model_dir=model_dir, prune=prune_cfg,
                      plan_file=plan_file, eval_examples=eval_examples, latency_iters=latency_iters,
                      command=" ".join(["edgeprune"] + sys.argv[1:]), emulate=emulate, recipe=recipe)
    with writer_lock(out):
        if search_trials:
            from edgeprune.build.search import choose_by_search

            cfg = choose_by_search(cfg, search_trials, log=click.echo)
        from edgeprune.build.spine import build as run_build

        final, report = run_build(cfg)
    _summary(final, report)


def _summary(final: Path, report: dict) -> None:
    if report.get("kind") == "causal-lm":
        a, o = report["validation"]["models"]["artifact"], report["validation"]["models"]["original"]
        click.echo(f"perplexity {a['perplexity']} (original {o['perplexity']}, {a['perplexity_ratio']}x); next-token "
                   f"agreement {a['next_token_agreement']}" +
                   (f"; label accuracy {a['label_accuracy']} (original {o['label_accuracy']})" if "label_accuracy" in a
                    else "") + f"; {report['size']['artifact_mb']:.1f} MB ({report['size']['size_ratio']}x smaller); "
                   f"decode {a['decode_tokens_per_s']} tokens/s" +
                   (f" ({a['decode_speedup']}x the original)" if "decode_speedup" in a else " (the original's: not measured)"))
    else:
        q, sp, size = report["quality"], report["speed"], report["size"]
        click.echo(f"accuracy {q['artifact_accuracy']:.4f} (original {q['original_accuracy']:.4f}, drop "
                   f"{q['accuracy_drop_points']} points, agreement {q['agreement']:.4f}); "
                   f"{size['artifact_mb']:.1f} MB ({size['size_ratio']}x smaller); p50 "
                   f"{sp['artifact_onnxruntime']['p50_ms']} ms " +
                   (f"({sp['p50_speedup']}x faster than the original)" if sp["p50_speedup"] else "(original not timed)"))
    click.echo(f"artifact: {final}")
    click.echo(f"report:   {final / 'report.md'}")


@main.command()
@data_options
@prune_options(recovery_only=True, recovery_default=1000)
@target_option
@click.option("--trials", default=8, show_default=True, type=click.IntRange(1), help="Candidates to build at most.")
@click.option("--timeout", type=click.FloatRange(0, min_open=True), help="Stop starting new trials after this many seconds.")
@click.option("--eval-examples", type=click.IntRange(1), help="Validate on this many examples (default: all).")
@click.option("--latency-iters", default=30, show_default=True, type=click.IntRange(5))
@click.option("--max-accuracy-drop", type=click.FloatRange(0), help="Replace the target's accuracy budget (points).")
@click.option("--try", "tries", multiple=True, metavar="KNOBS",
              help="A candidate to build first, e.g. drop_layers=2,heads_keep=0.75,ffn_keep=0.75,vocab_reserve=2000,"
                   "embedding_bits=4 (knobs left out: TPE picks them); repeatable.")
@click.option("--peer/--no-peer", default=True, show_default=True,
              help="Measure and mark the optimum-cli dense peer (the default original's task only).")
@click.option("--out", type=click.Path(file_okay=False),
              help="Where the candidates, pareto.md / .json / .png go [default: build/search-<task>-<target>].")
def search(task, data, prune_cfg, model_dir, given, target_name, trials, timeout, eval_examples, latency_iters,
           max_accuracy_drop, tries, peer, out) -> None:
    """Search layers, heads, FFN width and vocabulary for the smallest artifact within the target's budgets."""
    from dataclasses import replace

    from edgeprune.build.config import BuildConfig
    from edgeprune.build.search import knob_options, parse_knobs, run_search
    from edgeprune.guard import output_lock
    from edgeprune.targets import load_target

    seeds = tuple(parse_knobs(t) for t in tries)
    target = load_target(target_name)
    if max_accuracy_drop is not None:
        target = replace(target, budgets=replace(target.budgets, max_accuracy_drop=max_accuracy_drop))
    prune_cfg.validate()
    out = Path(out or f"build/search-{task.name}-{target.name}")
    guard_output(out, {"checkpoint (--model)": model_dir, **data_inputs(data)}, replace=False)
    cfg = BuildConfig(task=task, target=target, out=out, data=data, model_dir=model_dir, prune=prune_cfg,
                      eval_examples=eval_examples, latency_iters=latency_iters,
                      command=" ".join(["edgeprune"] + sys.argv[1:]))
    with output_lock(out):
        result = run_search(cfg, out, trials=trials, timeout=timeout, log=click.echo, seeds=seeds, peer=peer)
    click.echo(Path(result.files["table"]).read_text())
    if result.chosen is None:
        raise BudgetError(f"none of {len(result.candidates)} candidates met the budgets of {target.name}")
    model = f" --model {model_dir}" if model_dir else ""
    click.echo(f"build it: edgeprune build --task {task.name} --target {target.name}{model} --preset "
               f"{result.files['preset']}" + (f" --embedding-bits {result.chosen.knobs['embedding_bits']}"
                                              if "embedding_bits" in result.chosen.knobs else ""))
    click.echo(f"plot: {result.files['plot']}")
