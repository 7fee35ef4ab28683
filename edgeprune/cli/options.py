"""Option stacks shared by the commands, each declared once: the task's data, the upcycled original, pruning
(method, k, the methods' own options from their registry, loading, memory), the folded model's structure and
recovery; and the guards every output goes through before any work."""
from __future__ import annotations

import functools
from pathlib import Path

import click
from click.core import ParameterSource



def given_options() -> set[str]:
    """The parameters of the running command that the user gave (not left at their defaults)."""
    ctx = click.get_current_context()
    return {name for name in ctx.params if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None)}


def data_options(fn):
    """--task plus the custom-data options, resolved into (Task, DataSpec); bad data fail before any model work."""

    @click.option("--task", "task_name", default="sst2", show_default=True,
                  help="Task: sst2, agnews, rte, mnli (data shipped), or completion (give files).")
    @click.option("--train-file", type=click.Path(dir_okay=False), help="Training data (TSV, CSV or JSONL).")
    @click.option("--eval-file", type=click.Path(dir_okay=False), help="Validation data (TSV, CSV or JSONL).")
    @click.option("--text-column", help="Column of the (first) text.")
    @click.option("--text-pair-column", help="Column of the second text (pair tasks).")
    @click.option("--label-column", help="Column of the label.")
    @functools.wraps(fn)
    def wrapper(task_name, train_file, eval_file, text_column, text_pair_column, label_column, **kw):
        from edgeprune.tasks.spec import resolve_data

        task, data = resolve_data(task_name, train_file, eval_file, text_column, text_pair_column, label_column,
                                  generate=bool(kw.get("generate")))
        return fn(task=task, data=data, **kw)

    return wrapper


def moe_options(fn):
    """The default original's upcycling and fine-tuning."""
    fn = click.option("--force", is_flag=True, help="Rebuild even if cached.")(fn)
    fn = click.option("--dense", "dense_dir", type=click.Path(file_okay=False, exists=True),
                      help="Local dense BERT checkpoint to upcycle (default: the packaged MiniLM-L6).")(fn)
    fn = click.option("--steps", type=click.IntRange(1), help="Fine-tuning steps (default: the task's budget).")(fn)
    fn = click.option("--drop-fraction", default=0.2, show_default=True, type=click.FloatRange(0, 1),
                      help="Drop-upcycling: share of each expert's hidden units re-initialised.")(fn)
    return click.option("--num-experts", "num_experts", default=8, show_default=True, type=click.IntRange(1),
                        help="Experts per MoE layer of the upcycled default original (Z).")(fn)


def _method_options(fn):
    """Each method's own options (``MethodConfig.options``), declared by the method's file."""
    from edgeprune.pruning import methods

    for o in reversed(methods.all_options()):
        fn = click.option(o.flag, o.field, type=o.type, default=None, help=o.help)(fn)
    return fn


def _structure_options(fn, recovery_default: int):
    """The folded model's structure and recovery (prune and build)."""
    fn = click.option("--fsdp", is_flag=True,
                      help="Under torchrun: shard the recovery fine-tuning's parameters, gradients and optimizer state "
                           "over the processes (PyTorch FSDP2) instead of replicating them (DDP).")(fn)
    fn = _recovery_options(fn, recovery_default)
    fn = click.option("--vocab-reserve", type=click.IntRange(-1), default=None,
                      help="Prune the WordPiece vocabulary to the task's tokens (training split) plus every character "
                           "piece and this many of the most frequent words; the embedding and tokenizer.json shrink "
                           "together. -1: keep the full vocabulary (also against a preset).")(fn)
    fn = click.option("--heads-keep", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True),
                      help="With --experts 1: keep this share of attention heads per layer (Michel et al. 2019 "
                           "importance on task data).")(fn)
    fn = click.option("--drop-layers", default=0, show_default=True, type=click.IntRange(0),
                      help="With --experts 1: remove this many layers, those that change the hidden state least on "
                           "task data (ShortGPT block influence).")(fn)
    return click.option("--ffn-keep", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True),
                        help="With --experts 1: keep this share of each folded FFN's neurons (task-aware "
                             "saliency).")(fn)


def _recovery_options(fn, default: int):
    """``--recovery-steps``, ``--recovery-mode`` and ``--distill`` (prune, build, search)."""
    fn = click.option("--recovery-mode", type=click.Choice(["full", "router"]), default="full", show_default=True,
                      help="full: fine-tune the whole pruned model; router: train only the routers and gates, "
                           "distilled from the original (k >= 2).")(fn)
    fn = click.option("--distill", default=0.5, show_default=True, type=click.FloatRange(0, 1),
                      help="Weight of distillation from the original's logits during recovery (0: labels only).")(fn)
    return click.option("--recovery-steps", default=default, show_default=True, type=click.IntRange(0))(fn)


STRUCTURE = ("ffn_keep", "drop_layers", "heads_keep", "vocab_reserve", "recovery_steps", "distill", "fsdp",
             "recovery_mode")


def prune_options(structure: bool = False, recovery_default: int = 200, recovery_only: bool = False):
    """``--model``, the method and its options, k, calibration, loading and memory, parsed into ``prune_cfg`` (a
    :class:`~edgeprune.pruning.config.PruneConfig`); with ``structure`` also the folded model's knobs and recovery,
    with ``recovery_only`` just ``--recovery-steps`` / ``--distill``. The command gets ``prune_cfg``, ``model_dir``
    and ``given`` (the options the user gave, for presets)."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(**kw):
            from edgeprune.models.labels import parse_label_map
            from edgeprune.pruning import methods
            from edgeprune.pruning.config import PruneConfig

            own = {o.field: kw.pop(o.field) for o in methods.all_options()}
            knobs = {k: kw.pop(k) for k in STRUCTURE if k in kw}
            method, seed, verbalisers = kw.pop("method"), kw.pop("seed"), kw.pop("verbalisers")
            label_map = parse_label_map(kw.pop("label_map"))
            options = methods.cli_values(method, {"seed": seed, **own})
            k, coverage = kw.pop("k"), kw.pop("coverage")
            cfg = PruneConfig(
                method=method, method_options=options, experts=k if k is not None else (None if coverage is not None else 1),
                coverage=coverage, calibration_examples=kw.pop("calibration_examples"), seed=seed,
                prompt=kw.pop("prompt"), verbalisers=tuple(w.strip() for w in verbalisers.split(",")) if verbalisers
                else None, dtype=kw.pop("dtype"), layerwise=kw.pop("layerwise"), max_memory_gb=kw.pop("max_memory"),
                offload_dir=kw.pop("offload_dir"), generate=kw.pop("generate"), label_map=label_map,
                device=kw.pop("device"))
            for name, value in knobs.items():
                setattr(cfg, "distill_alpha" if name == "distill" else name, value)
            return fn(prune_cfg=cfg, given=given_options(), **kw)

        if structure:
            wrapper = _structure_options(wrapper, recovery_default)
        elif recovery_only:
            wrapper = _recovery_options(wrapper, recovery_default)
        return _common_prune_options(_method_options(wrapper))

    return deco


class MethodChoice(click.Choice):
    """``--method``: the methods registered when the command runs (a method's file registers it)."""

    def __init__(self):
        super().__init__([])

    @property
    def choices(self):
        from edgeprune.pruning import methods

        return tuple(methods.names())

    @choices.setter
    def choices(self, value):  # click.Choice sets it in __init__; the registry is the truth
        pass


def _common_prune_options(fn):

    for decorator in reversed((
        click.option("--model", "model_dir", type=click.Path(file_okay=False),
                     help="Local MoE checkpoint fine-tuned on the task (default: the embedded default original)."),
        click.option("--method", default="reap", show_default=True, type=MethodChoice(),
                     help="Expert scoring / pruning method."),
        click.option("--experts", "k", type=int, help="Experts to keep per layer (1 folds the router)."),
        click.option("--coverage", type=float,
                     help="Adaptive k: smallest expert set covering this share of routing."),
        click.option("--calibration-examples", default=1024, show_default=True, type=click.IntRange(1)),
        click.option("--seed", default=0, show_default=True),
        click.option("--prompt", help="Language-model checkpoints: the prompt template, with {text} (and {text_pair} "
                                      "for pair tasks); the label word follows it (default: the task's)."),
        click.option("--verbalisers", help="Language-model checkpoints: one word per label, comma-separated, in the "
                                           "task's label order (default: the label names)."),
        click.option("--label-map", "label_map", metavar="NAME=LABEL,...",
                     help="The checkpoint's label names (config.json id2label) as the task's labels, e.g. "
                          "pos=positive,neg=negative (default: matched by name; LABEL_0, LABEL_1, ... in order)."),
        click.option("--device", default="auto", show_default=True, metavar="cpu|cuda|mps|auto",
                     help="Where calibration and recovery compute (accelerate's convention: auto takes a GPU where "
                          "PyTorch sees one); export and validation run in ONNX Runtime on the CPU."),
        click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
                     help="Load the checkpoint in this dtype (default: the checkpoint's own)."),
        click.option("--layerwise/--in-memory", "layerwise", default=None,
                     help="Calibrate one layer at a time and prune checkpoint to checkpoint (for checkpoints larger "
                          "than memory), or hold the whole model [default: chosen by the memory estimate]."),
        click.option("--max-memory", "max_memory", type=click.FloatRange(0, min_open=True), metavar="GB",
                     help="Memory cap for that choice [default: the memory available now]."),
        click.option("--offload-dir", type=click.Path(file_okay=False),
                     help="Layer-wise: where hidden states beyond the cap go [default: a temporary directory]."),
        click.option("--generate", is_flag=True,
                     help="Language-model checkpoints: prune for generation (calibration over prompts and completions, "
                          "the LM head kept, the k = 1 fold a ...ForCausalLM, recovery by KL distillation, a KV-cache "
                          "ONNX artifact); the data are prompts with completions (JSONL) or the task cast as an "
                          "instruction."),
    )):
        fn = decorator(fn)
    return fn


target_option = click.option("--target", "target_name", default="x86_64", show_default=True,
                             help="Target profile name (see `edgeprune targets`) or path to a .toml profile.")
plan_option = click.option("--plan", "plan_file", type=click.Path(dir_okay=False),
                           help="Apply this plan instead of scoring.")


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
