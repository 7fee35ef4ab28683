"""The pruning stage: score -> plan -> apply (fold at k = 1) -> recover. ``edgeprune score``,
``edgeprune prune`` and ``edgeprune build`` all call these functions with a :class:`PruneConfig`."""
from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from edgeprune.errors import ConfigError, ModelError
from edgeprune.original import DataSpec, load_meta
from edgeprune.models.label_words import of_model
from edgeprune.models.registry import adapter_for
from edgeprune.pruning.apply import apply_plan
from edgeprune.pruning.calibration import collect_routing
from edgeprune.pruning.methods import METHODS, method_config, score_experts
from edgeprune.pruning.neurons import neuron_saliency, slim_ffn
from edgeprune.pruning.plan import PrunePlan, make_plan, validate_k
from edgeprune.pruning.progressive import ProgressiveDropper
from edgeprune.pruning.recover import recover, train_router
from edgeprune.pruning.vocab import prune_vocabulary, require_wordpiece
from edgeprune.pruning import structure
from edgeprune.tasks import Task
from edgeprune.tokenization import copy_tokenizer, load_tokenizer
from edgeprune.training import encode

PROGRESSIVE = {"chen2022-progressive": False, "chen2022-eager": True}


def all_methods() -> list[str]:
    return list(METHODS) + list(PROGRESSIVE)


@dataclass
class PruneConfig:
    """How to prune: method (+ its options), k experts per layer or a routing-mass coverage, calibration
    size, recovery budget. Validated before any model is loaded."""

    method: str = "reap"
    method_options: dict = field(default_factory=dict)
    experts: Optional[int] = 1
    coverage: Optional[float] = None
    calibration_examples: int = 1024
    recovery_steps: int = 200
    distill_alpha: float = 0.5
    window: int = 25
    beta: float = 0.5
    gate_scale: bool = True
    ffn_keep: float = 1.0
    drop_layers: int = 0  # remove this many layers of the folded model (ShortGPT block influence)
    heads_keep: float = 1.0  # keep this share of attention heads per layer (Michel et al. 2019 importance)
    seed: int = 0
    prompt: Optional[str] = None  # label-word scoring of language-model checkpoints (None: the task's default)
    verbalisers: Optional[tuple[str, ...]] = None
    dtype: Optional[str] = None  # load dtype (None: the checkpoint's own)
    vocab_reserve: Optional[int] = None  # prune the WordPiece vocabulary to the task's tokens + this many words
    layerwise: Optional[bool] = None  # None: chosen by the memory estimate (edgeprune.scale.memory)
    max_memory_gb: Optional[float] = None  # cap for that choice (None: the memory available now)
    offload_dir: Optional[str] = None  # layer-wise hidden states beyond the cap (None: a temporary directory)
    generate: bool = False  # keep a language model's LM head: the pruned (folded) model generates (issue 14)
    fsdp: bool = False  # under torchrun: the recovery sharded over the processes (FSDP2) instead of DDP

    def load_options(self) -> dict:
        """How :func:`load_model` reads the original: dtype, and the label words of a language model."""
        return {"prompt": self.prompt, "verbalisers": self.verbalisers, "dtype": self.dtype}

    def validate(self) -> None:
        if self.method not in all_methods():
            raise ConfigError(f"unknown pruning method {self.method!r}; known: {', '.join(all_methods())}")
        if self.method in METHODS:
            method_config(self.method, **self.method_options)
        if (self.experts is None) == (self.coverage is None):
            raise ConfigError("give exactly one of --experts K or --coverage SHARE")
        if self.experts is not None and self.experts < 1:
            raise ConfigError(f"--experts must be >= 1, got {self.experts}")
        if not 0 < self.ffn_keep <= 1:
            raise ConfigError(f"--ffn-keep must be in (0, 1], got {self.ffn_keep}")
        if self.ffn_keep < 1 and self.experts != 1:
            raise ConfigError("--ffn-keep prunes neurons of the folded dense FFN: use it with --experts 1")
        if self.ffn_keep < 1 and self.method in PROGRESSIVE:
            raise ConfigError(f"--ffn-keep needs a one-shot method ({self.method} recovers while dropping experts, "
                              "before neurons could be pruned)")
        if self.drop_layers < 0:
            raise ConfigError(f"--drop-layers must be >= 0, got {self.drop_layers}")
        if not 0 < self.heads_keep <= 1:
            raise ConfigError(f"--heads-keep must be in (0, 1], got {self.heads_keep}")
        for flag, on in (("--drop-layers", self.drop_layers > 0), ("--heads-keep", self.heads_keep < 1)):
            if on and self.experts != 1:
                raise ConfigError(f"{flag} prunes the folded dense model: use it with --experts 1")
            if on and self.method in PROGRESSIVE:
                raise ConfigError(f"{flag} needs a one-shot method ({self.method} makes its plan while fine-tuning)")
        if self.method == "chen2022-eager" and self.experts != 1:
            raise ConfigError("chen2022-eager reaches one expert per layer; use --experts 1")
        if self.method in PROGRESSIVE and self.recovery_steps < 2 * self.window:
            raise ConfigError(f"{self.method} drops experts during fine-tuning: give --recovery-steps >= "
                              f"{2 * self.window}")
        if self.vocab_reserve is not None and self.vocab_reserve < 0:
            raise ConfigError(f"--vocab-reserve must be >= 0, got {self.vocab_reserve}")
        if self.vocab_reserve is not None and self.method in PROGRESSIVE:
            raise ConfigError(f"--vocab-reserve needs a one-shot method ({self.method} makes its plan while "
                              "fine-tuning)")
        if self.max_memory_gb is not None and self.max_memory_gb <= 0:
            raise ConfigError(f"--max-memory must be > 0 GB, got {self.max_memory_gb}")
        if self.layerwise and self.method in PROGRESSIVE:
            raise ConfigError(f"{self.method} fine-tunes the whole original while dropping experts, which needs it in "
                              "memory; use a one-shot method (reap, frequency, ...) with --layerwise")
        if self.generate:
            for flag, on in (("--ffn-keep", self.ffn_keep < 1),
                             ("--drop-layers", self.drop_layers > 0), ("--heads-keep", self.heads_keep < 1),
                             ("--vocab-reserve", self.vocab_reserve is not None), ("--layerwise", bool(self.layerwise)),
                             ("a progressive method", self.method in PROGRESSIVE)):
                if on:
                    raise ConfigError(f"--generate prunes experts and folds the language model; {flag} is not there "
                                      "yet for it (drop it)")
        if self.fsdp and self.method in PROGRESSIVE:
            raise ConfigError(f"--fsdp shards the recovery over torchrun's processes; {self.method} drops experts "
                              "while it trains, in one process")
        if self.fsdp and self.generate:
            raise ConfigError("--fsdp: the generation recovery (KL distillation) runs in one process so far; drop "
                              "--fsdp")
        if self.fsdp and self.recovery_steps == 0:
            raise ConfigError("--fsdp shards the recovery fine-tuning, and --recovery-steps is 0; drop --fsdp")
        import os

        if self.fsdp and os.environ.get("WORLD_SIZE", "1") == "1":  # the launcher's, not after release_workers
            raise ConfigError("--fsdp shards the recovery over the processes of torchrun; run the command under "
                              "`torchrun --no-python --nproc_per_node N edgeprune ...` or drop --fsdp")
        if not 0 <= self.distill_alpha <= 1:
            raise ConfigError(f"distill alpha must be in [0, 1], got {self.distill_alpha}")

    def to_dict(self) -> dict:
        return asdict(self)


def load_model(model_dir: str | Path, dtype: Optional[str] = None, task: Optional[Task] = None,
               prompt: Optional[str] = None, verbalisers: Optional[Sequence[str]] = None) -> torch.nn.Module:
    """A local Hugging Face checkpoint of a supported MoE family as a sequence classifier: safetensors only, no
    remote code, tensors checked against the config (:mod:`edgeprune.models.checkpoint`); ``dtype`` defaults to
    the checkpoint's own. A checkpoint with only a language-model head becomes the family's classifier by
    label-word scoring (:mod:`edgeprune.models.label_words`; ``task`` gives the labels, ``prompt`` and
    ``verbalisers`` override the defaults)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from edgeprune.models import label_words
    from edgeprune.models.checkpoint import load_checked, read_config, torch_dtype, weight_files

    raw = read_config(model_dir)
    adapter = adapter_for(raw["model_type"])
    weight_files(model_dir)
    arch = " ".join(raw.get("architectures") or [])
    if arch and "SequenceClassification" not in arch:
        lm_class = AutoModelForSeq2SeqLM if "ConditionalGeneration" in arch else AutoModelForCausalLM
        is_lm = "CausalLM" in arch or "ConditionalGeneration" in arch
        if not is_lm or not {"causal-lm", "seq2seq-lm"} & set(adapter.heads):
            raise ModelError(f"{model_dir}: a {arch} checkpoint has neither a sequence-classification nor a "
                             f"language-model head that edgeprune can use (heads of {adapter.model_type}: "
                             f"{', '.join(adapter.heads)})")
        if task is None:
            raise ModelError(f"{model_dir}: a language model classifies by label words; give the task")
        lm = load_checked(lm_class, model_dir, dtype=torch_dtype(dtype, raw))
        words = label_words.for_task(task, prompt, verbalisers).resolve(load_tokenizer(model_dir))
        return label_words.to_classifier(lm, words, task)
    if prompt is not None or verbalisers:
        raise ConfigError(f"{model_dir} has its own classification head; --prompt and --verbalisers are for "
                          "checkpoints with only a language-model head")
    return load_checked(label_words.class_for(raw), model_dir, dtype=torch_dtype(dtype, raw))


def check_model(model: torch.nn.Module, task: Task, cfg: PruneConfig, tokenizer=None, labels: bool = True) -> None:
    """Labels match the task (a classifier's: ``labels``), k fits every layer, a decoder classifier pads with its
    tokenizer's padding id: checked before any heavy work."""
    if labels:
        check_model_labels(model, task)
    adapter = adapter_for(model.config)
    blocks = adapter.blocks(model)
    if not blocks:
        raise ModelError(f"the {adapter.model_type} checkpoint has no MoE layer to prune (every layer is dense)")
    declared = getattr(model.config, adapter.top_k_key, None)
    for layer, b in blocks.items():
        if isinstance(declared, int) and not 1 <= declared <= adapter.num_experts(b):
            raise ModelError(f"config.json {adapter.top_k_key} = {declared} but layer {layer} has "
                             f"{adapter.num_experts(b)} experts; fix the checkpoint's config")
    if cfg.method in PROGRESSIVE and not adapter.extra.get("progressive"):
        raise ConfigError(f"{cfg.method} drops experts during fine-tuning, which only bert_moe supports so far; "
                          f"use a one-shot method (frequency, chen2022, reap, ...) for {adapter.model_type}")
    if tokenizer is not None and not adapter.uses_token_type_ids:
        pad = tokenizer.pad_token_id
        if pad is None or model.config.pad_token_id != pad:
            raise ModelError(f"the classifier finds each text's last token by pad_token_id "
                             f"({model.config.pad_token_id}) but the tokenizer pads with {pad}; set both to the "
                             "same id (config.json pad_token_id and the tokenizer's pad_token)")
    if cfg.experts is not None:
        for layer, b in blocks.items():
            validate_k(cfg.experts, adapter.num_experts(b), adapter.top_k(b), layer)
            adapter.check_k(b, cfg.experts)


def memory_path(original_dir: str | Path, task: Task, cfg: PruneConfig, stage: str = "prune") -> tuple[bool, int, str]:
    """In memory or layer by layer (:func:`edgeprune.scale.memory.choose_path`), decided from the checkpoint's
    headers before anything is loaded: ``(layer-wise?, hidden-state bytes to keep in memory, why)``."""
    from edgeprune.models.checkpoint import read_config
    from edgeprune.scale import memory

    adapter_for(read_config(original_dir)["model_type"])  # a supported family, before anything is sized
    est = memory.estimate(original_dir, cfg.experts, task.max_length, cfg.calibration_examples, stage=stage)
    return memory.choose_path(est, cfg.layerwise, cfg.max_memory_gb)


def score(original_dir: str | Path, task: Task, data: DataSpec, cfg: PruneConfig, model=None,
          progress: bool = True, info: Optional[dict] = None, release: bool = True) -> PrunePlan:
    """Calibrate on the task's training split (bounded) and make the plan of ``cfg``: in memory, or layer by
    layer when the checkpoint does not fit (:mod:`edgeprune.scale`); under ``torchrun`` every process calibrates
    a share of the batches and only rank 0 goes on (:mod:`edgeprune.scale.distributed`)."""
    from edgeprune.scale import distributed
    from edgeprune.scale.layerwise import collect_routing_layerwise, skeleton

    cfg.validate()
    if cfg.method in PROGRESSIVE:
        raise ConfigError(f"{cfg.method} makes its plan while fine-tuning; run `edgeprune prune` instead")
    if cfg.generate:
        return _score_language_model(original_dir, task, data, cfg, model, progress, release)
    layerwise, keep, why = (False, 0, "") if model is not None else memory_path(original_dir, task, cfg, "score")
    if layerwise:  # the in-memory path is the usual one: said only in the record
        _say(f"calibration: {why}", progress)
    if info is not None and why:
        info["calibration"] = {"path": "layer-wise" if layerwise else "in memory", "why": why,
                               "processes": distributed.world_size()}
    if layerwise:
        model = skeleton(original_dir, cfg.dtype, task, cfg.prompt, cfg.verbalisers)
    model = model if model is not None else load_model(original_dir, task=task, **cfg.load_options())
    tok = load_tokenizer(original_dir)
    check_model(model, task, cfg, tok)
    mcfg = method_config(cfg.method, **cfg.method_options)
    # Calibrate for every method (cheap): data-free methods still need the gate statistics for the fold scale.
    enc = encode(data.load(task, "train", limit=cfg.calibration_examples), tok, task.max_length, of_model(model))
    if layerwise:
        stats, model = collect_routing_layerwise(original_dir, enc, max_examples=cfg.calibration_examples,
                                                 progress=progress, max_hidden_bytes=keep,
                                                 offload_dir=cfg.offload_dir, model=model)
    else:
        stats = collect_routing(model, enc, max_examples=cfg.calibration_examples, progress=progress)
    if release:  # every process has the same statistics; only rank 0 goes on (prune keeps them for recovery)
        distributed.release_workers()
    return _plan(original_dir, task, cfg, model, mcfg, stats)


def _plan(original_dir, task: Task, cfg: PruneConfig, model, mcfg, stats) -> PrunePlan:
    adapter = adapter_for(model.config)
    blocks = adapter.blocks(model)
    scores = score_experts(mcfg, model, stats, source_dir=str(original_dir))
    return make_plan(cfg.method, scores, {i: adapter.num_experts(b) for i, b in blocks.items()},
                     {i: adapter.top_k(b) for i, b in blocks.items()}, k=cfg.experts, coverage=cfg.coverage, stats=stats,
                     merge=mcfg.merges, seed=cfg.seed, gate_scale=cfg.gate_scale, source=str(original_dir), task=task.name,
                     options=dict(cfg.method_options, calibration_examples=cfg.calibration_examples))


def load_language_model(original_dir: str | Path, dtype: Optional[str] = None, moe: bool = True) -> torch.nn.Module:
    """``--generate``: the checkpoint's own causal LM (safetensors, checked against its config), of a supported
    MoE family unless not ``moe`` (a pruned and folded one)."""
    from transformers import AutoModelForCausalLM

    from edgeprune.models.checkpoint import load_checked, read_config, torch_dtype, weight_files

    raw = read_config(original_dir)
    if moe:
        adapter_for(raw["model_type"])
    if not any("CausalLM" in a for a in raw.get("architectures") or []):
        raise ConfigError(f"--generate needs a language-model checkpoint (...ForCausalLM); {original_dir} is "
                          f"{', '.join(raw.get('architectures') or ['unknown'])}")
    weight_files(original_dir)
    return load_checked(AutoModelForCausalLM, original_dir, dtype=torch_dtype(dtype, raw))


def lm_examples(original_dir, task: Task, data: DataSpec, cfg: PruneConfig, split: str, limit: Optional[int] = None):
    """The generation data of ``split`` tokenised for the checkpoint (:mod:`edgeprune.generation.data`)."""
    from edgeprune.generation.data import encode_lm, load_examples
    from edgeprune.prompts import for_task

    words = for_task(task, cfg.prompt, cfg.verbalisers)
    return encode_lm(load_examples(task, data, split, words, limit), load_tokenizer(original_dir), task.max_length)


def verbaliser_ids(original_dir, task: Task, cfg: PruneConfig, data: Optional[DataSpec] = None) -> Optional[tuple]:
    """The label words' first token ids (the task metric of a cast classification task), or None when the
    task has no labels or the validation data are the user's prompt / completion file."""
    from edgeprune.generation.data import is_generation_file
    from edgeprune.prompts import for_task

    if not task.labels or (data is not None and is_generation_file(data.eval_file)):
        return None
    return for_task(task, cfg.prompt, cfg.verbalisers).resolve(load_tokenizer(original_dir)).token_ids


def _score_language_model(original_dir, task, data, cfg, model, progress, release) -> PrunePlan:
    """``--generate``: calibrate the language model itself over the prompt and completion tokens of the task's
    training split (bounded), in memory, then the plan as for any model."""
    from edgeprune.scale import distributed

    if model is None:
        if memory_path(original_dir, task, cfg, "score")[0]:
            raise ConfigError(f"--generate holds the language model in memory and {original_dir} does not fit "
                              "(see --max-memory); the layer-wise path is for classifiers so far")
        model = load_language_model(original_dir, cfg.dtype)
    check_model(model, task, cfg, labels=False)
    enc = lm_examples(original_dir, task, data, cfg, "train", cfg.calibration_examples)
    stats = collect_routing(model, enc.as_encoded(), max_examples=cfg.calibration_examples, progress=progress)
    if release:
        distributed.release_workers()
    return _plan(original_dir, task, cfg, model, method_config(cfg.method, **cfg.method_options), stats)


def _say(msg: str, progress: bool) -> None:
    if progress:
        print(f"[edgeprune] {msg}", flush=True)


def prune(original_dir: str | Path, task: Task, data: DataSpec, cfg: PruneConfig, plan: Optional[PrunePlan] = None,
          progress: bool = True) -> tuple[torch.nn.Module, PrunePlan, dict]:
    """Prune the original in ``original_dir`` by ``plan`` (or by ``cfg``'s method), then recover.

    Returns the pruned model (the dense class when every layer keeps one expert), the plan and a record
    of what was done (timings, recovery losses)."""
    cfg.validate()
    if plan is not None and not plan.folds:
        for flag, on in (("--ffn-keep", cfg.ffn_keep < 1), ("--drop-layers", cfg.drop_layers > 0),
                         ("--heads-keep", cfg.heads_keep < 1)):
            if on:
                raise ConfigError(f"{flag} needs a plan that keeps one expert in every layer (the folded model)")
    info: dict = {"config": cfg.to_dict()}
    if cfg.generate:
        return _prune_language_model(original_dir, task, data, cfg, plan, progress, info)
    layerwise, _, why = memory_path(original_dir, task, cfg)
    if layerwise:
        return _prune_streamed(original_dir, task, data, cfg, plan, progress, info)
    info["calibration"] = {"path": "in memory", "why": why}
    original = load_model(original_dir, task=task, **cfg.load_options())
    tok = load_tokenizer(original_dir)
    check_model(original, task, cfg, tok)
    tok_json = tokenizer_json(original_dir) if cfg.vocab_reserve is not None else None
    if tok_json is not None:
        require_wordpiece(tok_json, original_dir)  # before any heavy work
    train_enc = encode(data.load(task, "train"), tok, task.max_length, of_model(original))
    t0 = time.perf_counter()
    if plan is None and cfg.method in PROGRESSIVE:
        from edgeprune.scale import distributed

        distributed.release_workers()  # it changes the model at every step: one process
        model = copy.deepcopy(original)
        dropper = ProgressiveDropper(model, cfg.recovery_steps, window=cfg.window, beta=cfg.beta,
                                     min_experts=cfg.experts or 1, eager=PROGRESSIVE[cfg.method])
        info["recovery"] = recover(model, train_enc, cfg.recovery_steps, teacher=original,
                                   distill_alpha=cfg.distill_alpha, max_length=task.max_length, progress=progress,
                                   seed=cfg.seed, on_step=dropper, desc=cfg.method)
        plan = _top_alive(dropper.plan(cfg.method, source=str(original_dir), task=task.name), cfg.experts)
        dropper.reset()
        pruned = apply_plan(model, plan)
        info["seconds"] = round(time.perf_counter() - t0, 1)
        return pruned, plan, info
    if plan is None:
        plan = score(original_dir, task, data, cfg, model=original, progress=progress, release=False)
    pruned = apply_plan(original, plan)
    return _finish(pruned, original, adapter_for(original.config), plan, task, data, cfg, tok, tok_json, train_enc,
                   info, t0, progress)


def _prune_streamed(original_dir, task, data, cfg, plan, progress, info):
    """:func:`prune` for a checkpoint that does not fit: layer-wise scoring, the plan applied (and folded)
    checkpoint to checkpoint one layer at a time (:func:`edgeprune.scale.stream.stream_apply`), then the small
    pruned model loaded for the rest. Recovery learns from the labels alone: the original, the teacher of the
    in-memory path, is never in memory here (said in the record)."""
    import tempfile

    from edgeprune.models import label_words
    from edgeprune.models.checkpoint import load_checked, read_config, torch_dtype
    from edgeprune.scale.stream import stream_apply

    if plan is None and cfg.method in PROGRESSIVE:
        raise ConfigError(f"{cfg.method} fine-tunes the whole original while dropping experts, which needs it in "
                          "memory; use a one-shot method (reap, frequency, ...) for a checkpoint this large")
    tok = load_tokenizer(original_dir)
    tok_json = tokenizer_json(original_dir) if cfg.vocab_reserve is not None else None
    if tok_json is not None:
        require_wordpiece(tok_json, original_dir)
    t0 = time.perf_counter()
    if plan is None:
        plan = score(original_dir, task, data, cfg, progress=progress, info=info, release=False)
    else:
        info["calibration"] = {"path": "layer-wise", "why": "plan given: no calibration"}
    raw = read_config(original_dir)
    streamed = StreamedCheckpoint(tempfile.mkdtemp(prefix="edgeprune-streamed-", dir=cfg.offload_dir))
    try:
        stream_apply(original_dir, plan, streamed.dir, dtype=cfg.dtype, progress=progress, task=task,
                     prompt=cfg.prompt, verbalisers=cfg.verbalisers)
    except BaseException:
        streamed.discard()
        raise
    nothing_else = (cfg.recovery_steps == 0 and cfg.ffn_keep == 1 and not structure.requested(cfg.drop_layers,
                    cfg.heads_keep) and cfg.vocab_reserve is None and (plan.method != "uncurl" or plan.folds))
    if nothing_else:  # the streamed checkpoint is the result: never loaded as a whole
        from edgeprune.scale import distributed

        if not distributed.is_writer():
            streamed.discard()
        distributed.release_workers()
        info["seconds"] = round(time.perf_counter() - t0, 1)
        return streamed, plan, info
    pruned = load_checked(label_words.class_for(read_config(streamed.dir)), streamed.dir,
                          dtype=torch_dtype(cfg.dtype, raw))
    streamed.discard()
    check_model_labels(pruned, task)
    train_enc = encode(data.load(task, "train"), tok, task.max_length, of_model(pruned))
    info["teacher"] = "none: the original is not loaded on the layer-wise path (recovery on labels only)"
    return _finish(pruned, None, adapter_for(raw["model_type"]), plan, task, data, cfg, tok, tok_json, train_enc,
                   info, t0, progress)


def _prune_language_model(original_dir, task, data, cfg, plan, progress, info):
    """``--generate``: the plan made on the language model over the task's prompt and completion tokens, applied
    to the language model itself, which folds into its dense sibling's ``...ForCausalLM`` at k = 1
    (:meth:`~edgeprune.models.adapter.MoEAdapter.fold_class`), then recovered by distillation of the original's
    next-token distribution on the completion tokens (:mod:`edgeprune.generation.distill`)."""
    from edgeprune.generation.distill import distill

    t0 = time.perf_counter()
    lm = load_language_model(original_dir, cfg.dtype)
    check_model(lm, task, cfg, labels=False)
    if plan is None:
        plan = score(original_dir, task, data, cfg, model=lm, progress=progress, info=info, release=False)
    pruned = apply_plan(lm, plan)
    info["score_and_apply_seconds"] = round(time.perf_counter() - t0, 1)
    train = lm_examples(original_dir, task, data, cfg, "train") if cfg.recovery_steps else None
    info["recovery"] = distill(pruned, lm, train, cfg.recovery_steps, alpha=cfg.distill_alpha, seed=cfg.seed,
                               progress=progress) if train is not None else {"steps": 0, "seconds": 0.0}
    from edgeprune.scale import distributed

    distributed.release_workers()
    info["generate"] = {"class": type(pruned).__name__, "recovery": "KL distillation on completion tokens"
                        if cfg.recovery_steps else "none (--recovery-steps 0)"}
    info["seconds"] = round(time.perf_counter() - t0, 1)
    return pruned, plan, info


class StreamedCheckpoint:
    """A pruned checkpoint written by :func:`edgeprune.scale.stream.stream_apply` into a temporary directory and
    returned as it is when nothing after the plan needs the model in memory (``save_pretrained`` moves its files)."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self._config = None

    @property
    def config(self):
        if self._config is None:
            from transformers import AutoConfig

            self._config = AutoConfig.from_pretrained(self.dir, local_files_only=True)
        return self._config

    def save_pretrained(self, out: str | Path) -> None:
        import shutil

        self.config  # read before the files move
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for f in self.dir.iterdir():
            shutil.move(str(f), out / f.name)
        self.discard()

    def discard(self) -> None:
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


def check_model_labels(model, task: Task) -> None:
    if model.config.num_labels != task.num_labels:
        raise ConfigError(f"the model has {model.config.num_labels} labels but task {task.name} has "
                          f"{task.num_labels} ({', '.join(task.labels)})")


def _finish(pruned, original, adapter, plan, task, data, cfg, tok, tok_json, train_enc, info, t0, progress):
    """What follows the expert plan on either path: FFN neurons, depth and heads of the folded model, UNCURL's
    router, recovery (distilled from ``original`` when it is there), the vocabulary."""
    if cfg.ffn_keep < 1:
        if adapter.dense is None:
            raise ConfigError(f"--ffn-keep slims the folded dense sibling; {adapter.model_type} has none")
        saliency = neuron_saliency(pruned, adapter, train_enc, max_examples=cfg.calibration_examples,
                                   progress=progress)
        pruned, info["ffn"] = slim_ffn(pruned, adapter, saliency, cfg.ffn_keep)
    shrink = structure.requested(cfg.drop_layers, cfg.heads_keep)
    if shrink:
        pruned, done = structure.apply(pruned, shrink, train_enc, cfg.calibration_examples, progress)
        info["depth"], info["heads"] = done.get("LayerDrop"), done.get("HeadPrune")
    info["score_and_apply_seconds"] = round(time.perf_counter() - t0, 1)
    if plan.method == "uncurl" and not plan.folds:
        info["router"] = train_router(pruned, train_enc, int(cfg.method_options.get("router_steps", 50)),
                                      teacher=original, max_length=task.max_length, progress=progress)
    info["recovery"] = recover(pruned, train_enc, cfg.recovery_steps, teacher=original,
                               distill_alpha=cfg.distill_alpha, max_length=task.max_length, progress=progress,
                               seed=cfg.seed, fsdp=cfg.fsdp)
    from edgeprune.scale import distributed

    distributed.release_workers()  # under torchrun, recovery was data-parallel; the rest is rank 0's
    if cfg.vocab_reserve is not None:  # the training split's tokens keep their segmentation: after recovery
        val = encode(data.load(task, "validation"), tok, task.max_length, of_model(pruned))
        pruned.edgeprune_tokenizer_json, info["vocab"] = prune_vocabulary(
            pruned, tok_json, train_enc.input_ids, val.input_ids, cfg.vocab_reserve)
    info["seconds"] = round(time.perf_counter() - t0, 1)
    return pruned, plan, info


def _top_alive(plan: PrunePlan, k: Optional[int]) -> PrunePlan:
    """Chen et al.'s threshold may leave more than k alive: keep the k with the largest alpha."""
    if k is None:
        return plan
    for lp in plan.layers:
        if lp.k > k:
            alive = [g[0][0] for g in lp.groups]
            best = sorted(alive, key=lambda e: -lp.scores[e])[:k]
            lp.groups = [[(e, 1.0)] for e in sorted(best)]
    return plan


def tokenizer_json(model_dir: str | Path) -> dict:
    return json.loads((Path(model_dir) / "tokenizer.json").read_text(encoding="utf-8"))


def save_pruned(model: torch.nn.Module, original_dir: str | Path, out: str | Path, plan: PrunePlan,
                info: dict) -> None:
    """Checkpoint + tokenizer + ``prune_plan.json`` + ``edgeprune_prune.json`` into ``out``."""
    out = Path(out)
    model.save_pretrained(out)
    copy_tokenizer(original_dir, out)
    slim = getattr(model, "edgeprune_tokenizer_json", None)
    if slim is not None:  # a pruned vocabulary: tokenizer.json (and vocab.txt) rewritten to the kept tokens
        (out / "tokenizer.json").write_text(json.dumps(slim, ensure_ascii=False))
        if (out / "vocab.txt").is_file():
            vocab = slim["model"]["vocab"]
            (out / "vocab.txt").write_text("".join(t + "\n" for t in sorted(vocab, key=vocab.get)), encoding="utf-8")
    plan.save(out / "prune_plan.json")
    meta = load_meta(original_dir)
    (out / "edgeprune_prune.json").write_text(json.dumps({"original": str(original_dir), "task": meta.get("task"),
                                                          "plan": plan.summary(), **info}, indent=1, default=str))
