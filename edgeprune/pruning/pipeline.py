"""The pruning stage: score -> plan -> apply (fold at k = 1) -> what follows the plan -> recover.
``edgeprune score``, ``edgeprune prune`` and ``edgeprune build`` all call :func:`score` and :func:`prune` with a
:class:`~edgeprune.pruning.config.PruneConfig`.

Three paths share the plan and what follows it: in memory (the usual one), layer by layer for a checkpoint
that does not fit (:mod:`edgeprune.pruning.layerwise`, :mod:`edgeprune.pruning.stream`, chosen by
:func:`memory_path`), and the language-model path of ``--generate``. The family's adapter is resolved once,
where the model is loaded, and handed down. Methods are reached only through their registry
(:mod:`edgeprune.pruning.methods`): a progressive method runs its own training hook, a merging method its
``after_apply`` hook.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from edgeprune.errors import ConfigError
from edgeprune.models.label_words import of_model
from edgeprune.models.loading import family_of, load_language_model, load_model
from edgeprune.models.tokenizer import load_tokenizer
from edgeprune.pruning import methods, structure
from edgeprune.pruning.apply import apply_plan
from edgeprune.pruning.calibration import OUTPUT_ROWS, collect_routing
from edgeprune.pruning.config import PruneConfig, check_model, check_model_labels
from edgeprune.pruning.plan import PrunePlan, make_plan
from edgeprune.scale import distributed
from edgeprune.tasks.encoding import encode
from edgeprune.pruning.lm_data import lm_examples
from edgeprune.tasks.spec import DataSpec


def memory_path(original_dir: str | Path, task, cfg: PruneConfig, stage: str = "prune") -> tuple[bool, int, str]:
    """In memory or layer by layer (:func:`edgeprune.scale.memory.choose_path`), decided from the checkpoint's
    headers before anything is loaded: ``(layer-wise?, hidden-state bytes to keep in memory, why)``."""
    from edgeprune.scale import memory

    family_of(original_dir)  # a supported family, before anything is sized
    est = memory.estimate(original_dir, cfg.experts, task.max_length, cfg.calibration_examples, stage=stage)
    return memory.choose_path(est, cfg.layerwise, cfg.max_memory_gb)


def _say(msg: str, progress: bool) -> None:
    if progress:
        print(f"[edgeprune] {msg}", flush=True)


def score(original_dir: str | Path, task, data: DataSpec, cfg: PruneConfig, model=None,
          progress: bool = True, info: Optional[dict] = None, release: bool = True) -> PrunePlan:
    """Calibrate on the task's training split (bounded) and make the plan of ``cfg``: in memory, or layer by
    layer when the checkpoint does not fit (:mod:`edgeprune.scale`); under ``torchrun`` every process calibrates
    a share of the batches and only rank 0 goes on (:mod:`edgeprune.scale.distributed`)."""
    from edgeprune.pruning.layerwise import collect_routing_layerwise, skeleton

    cfg.validate()
    mcfg = cfg.method_config()
    if mcfg.progressive:
        raise ConfigError(f"{cfg.method} makes its plan while fine-tuning; run `edgeprune prune` instead")
    if cfg.generate:
        return _score_language_model(original_dir, task, data, cfg, model, progress, release, info)
    layerwise, keep, why = (False, 0, "") if model is not None else memory_path(original_dir, task, cfg, "score")
    if layerwise:  # the in-memory path is the usual one: said only in the record
        _say(f"calibration: {why}", progress)
    if info is not None and why:
        info["calibration"] = {"path": "layer-wise" if layerwise else "in memory", "why": why,
                               "processes": distributed.world_size()}
    if layerwise:
        model = skeleton(original_dir, cfg.dtype, task, cfg.prompt, cfg.verbalisers, cfg.label_map)
    model = model if model is not None else load_model(original_dir, task=task, **cfg.load_options())
    adapter = family_of(model)
    tok = load_tokenizer(original_dir)
    check_model(model, adapter, task, cfg, tok)
    # Calibrate for every method (cheap): data-free methods still need the gate statistics for the fold scale.
    enc = encode(data.load(task, "train", limit=cfg.calibration_examples), tok, task.max_length, of_model(model))
    if layerwise:
        stats, model = collect_routing_layerwise(original_dir, enc, max_examples=cfg.calibration_examples,
                                                 progress=progress, max_hidden_bytes=keep,
                                                 offload_dir=cfg.offload_dir, model=model,
                                                 output_rows=_output_rows(mcfg))
    else:
        stats = collect_routing(model, enc, max_examples=cfg.calibration_examples, progress=progress,
                                adapter=adapter, device=cfg.device, output_rows=_output_rows(mcfg))
    if release:  # every process has the same statistics; only rank 0 goes on (prune keeps them for recovery)
        distributed.release_workers()
    return _plan(original_dir, task, cfg, model, adapter, mcfg, stats)


def _output_rows(mcfg) -> int:
    """Tokens per batch on which calibration runs every expert: only for a method that reads their outputs."""
    return OUTPUT_ROWS if mcfg.expert_outputs else 0


def _plan(original_dir, task, cfg: PruneConfig, model, adapter, mcfg, stats) -> PrunePlan:
    blocks = adapter.blocks(model)
    scores = methods.score_experts(mcfg, model, stats, source_dir=str(original_dir), adapter=adapter)
    return make_plan(cfg.method, scores, {i: adapter.num_experts(b) for i, b in blocks.items()},
                     {i: adapter.top_k(b) for i, b in blocks.items()}, k=cfg.experts, coverage=cfg.coverage,
                     stats=stats, clusters=mcfg.clusters if mcfg.merges else None, gate_scale=cfg.gate_scale,
                     merge_rule=mcfg.merge_rule,
                     source=str(original_dir), task=task.name,
                     options=dict(cfg.method_options, calibration_examples=cfg.calibration_examples))


def _score_language_model(original_dir, task, data, cfg, model, progress, release, info=None) -> PrunePlan:
    """``--generate``: calibrate the language model itself over the prompt and completion tokens of the task's
    training split (bounded), in memory or, when the checkpoint does not fit, layer by layer on its causal-LM
    skeleton (the same statistics: the stack pass stops before the head), then the plan as for any model."""
    from edgeprune.pruning.layerwise import collect_routing_layerwise, skeleton

    layerwise, keep, why = (False, 0, "") if model is not None else memory_path(original_dir, task, cfg, "score")
    if layerwise:
        _say(f"calibration: {why}", progress)
    if info is not None and why:
        info["calibration"] = {"path": "layer-wise" if layerwise else "in memory", "why": why,
                               "processes": distributed.world_size()}
    if model is None:
        model = skeleton(original_dir, cfg.dtype, lm=True) if layerwise else load_language_model(original_dir, cfg.dtype)
    adapter = family_of(model)
    check_model(model, adapter, task, cfg, labels=False)
    enc = lm_examples(original_dir, task, data, cfg, "train", cfg.calibration_examples).as_encoded()
    rows = _output_rows(cfg.method_config())
    if layerwise:
        stats, model = collect_routing_layerwise(original_dir, enc, max_examples=cfg.calibration_examples,
                                                 progress=progress, max_hidden_bytes=keep, offload_dir=cfg.offload_dir,
                                                 model=model, output_rows=rows)
    else:
        stats = collect_routing(model, enc, max_examples=cfg.calibration_examples, progress=progress,
                                adapter=adapter, device=cfg.device, output_rows=rows)
    if release:
        distributed.release_workers()
    return _plan(original_dir, task, cfg, model, adapter, cfg.method_config(), stats)


def prune(original_dir: str | Path, task, data: DataSpec, cfg: PruneConfig, plan: Optional[PrunePlan] = None,
          progress: bool = True) -> tuple:
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
    return _prune_in_memory(original_dir, task, data, cfg, plan, progress, info)


def _prune_in_memory(original_dir, task, data, cfg: PruneConfig, plan, progress, info):
    original = load_model(original_dir, task=task, **cfg.load_options())
    adapter = family_of(original)
    tok = load_tokenizer(original_dir)
    check_model(original, adapter, task, cfg, tok)
    tok_json = _wordpiece_json(original_dir, cfg)  # before any heavy work
    train_enc = encode(data.load(task, "train"), tok, task.max_length, of_model(original))
    t0 = time.perf_counter()
    mcfg = cfg.method_config()
    if plan is None and mcfg.progressive:
        distributed.release_workers()  # it changes the model at every step: one process
        pruned, plan, record = methods.run_progressive(mcfg, original, train_enc, cfg, task, str(original_dir),
                                                       progress, adapter)
        info.update(record)
        return pruned, plan, info
    if plan is None:
        plan = score(original_dir, task, data, cfg, model=original, progress=progress, release=False)
    pruned = apply_plan(original, plan, adapter=adapter)
    return _after_plan(pruned, original, adapter, plan, task, data, cfg, tok, tok_json, train_enc, info, t0,
                       progress)


def _wordpiece_json(model_dir, cfg: PruneConfig) -> Optional[dict]:
    """``--vocab-reserve``: the checkpoint's tokenizer.json, refused up front unless it is WordPiece."""
    if cfg.vocab_reserve is None:
        return None
    from edgeprune.pruning.save import tokenizer_json
    from edgeprune.pruning.vocab import require_wordpiece

    tok_json = tokenizer_json(model_dir)
    require_wordpiece(tok_json, model_dir)
    return tok_json


def _prune_streamed(original_dir, task, data, cfg: PruneConfig, plan, progress, info):
    """:func:`prune` for a checkpoint that does not fit: layer-wise scoring, the plan applied (and folded)
    checkpoint to checkpoint one layer at a time (:func:`edgeprune.pruning.stream.stream_apply`), then the small
    pruned model loaded for the rest. Recovery learns from the labels alone: the original, the teacher of the
    in-memory path, is never in memory here (said in the record)."""
    from edgeprune.models.checkpoint import load_checked, read_config, torch_dtype
    from edgeprune.models.registry import class_for

    _refuse_progressive(cfg, plan)
    tok = load_tokenizer(original_dir)
    tok_json = _wordpiece_json(original_dir, cfg)
    t0 = time.perf_counter()
    plan = _layerwise_plan(original_dir, task, data, cfg, plan, progress, info)
    raw = read_config(original_dir)
    streamed = _stream(original_dir, plan, cfg, task, progress)
    if _nothing_after_plan(cfg, plan):  # the streamed checkpoint is the result: never loaded as a whole
        if not distributed.is_writer():
            streamed.discard()
        distributed.release_workers()
        info["seconds"] = round(time.perf_counter() - t0, 1)
        return streamed, plan, info
    pruned = load_checked(class_for(read_config(streamed.dir)), streamed.dir,
                          dtype=torch_dtype(cfg.dtype, raw))
    streamed.discard()
    check_model_labels(pruned, task)
    train_enc = encode(data.load(task, "train"), tok, task.max_length, of_model(pruned))
    info["teacher"] = "none: the original is not loaded on the layer-wise path (recovery on labels only)"
    return _after_plan(pruned, None, family_of(original_dir), plan, task, data, cfg, tok, tok_json, train_enc,
                       info, t0, progress)


def _refuse_progressive(cfg: PruneConfig, plan) -> None:
    if plan is None and cfg.progressive:
        raise ConfigError(f"{cfg.method} fine-tunes the whole original while dropping experts, which needs it in "
                          "memory; use a one-shot method (reap, frequency, ...) for a checkpoint this large")


def _layerwise_plan(original_dir, task, data, cfg: PruneConfig, plan, progress, info):
    """The plan given, or made by the layer-wise calibration (recorded in ``info`` either way)."""
    if plan is None:
        return score(original_dir, task, data, cfg, progress=progress, info=info, release=False)
    info["calibration"] = {"path": "layer-wise", "why": "plan given: no calibration"}
    return plan


def _stream(original_dir, plan, cfg: PruneConfig, task, progress, lm: bool = False):
    import tempfile

    from edgeprune.pruning.save import StreamedCheckpoint
    from edgeprune.pruning.stream import stream_apply

    streamed = StreamedCheckpoint(tempfile.mkdtemp(prefix="edgeprune-streamed-", dir=cfg.offload_dir))
    try:
        stream_apply(original_dir, plan, streamed.dir, dtype=cfg.dtype, progress=progress, task=task,
                     prompt=cfg.prompt, verbalisers=cfg.verbalisers, lm=lm)
    except BaseException:
        streamed.discard()
        raise
    return streamed


def _nothing_after_plan(cfg: PruneConfig, plan) -> bool:
    return (cfg.recovery_steps == 0 and cfg.ffn_keep == 1 and not structure.requested(cfg.drop_layers, cfg.heads_keep)
            and cfg.vocab_reserve is None and not cfg.method_config().needs_after_apply(plan))


def _prune_language_model(original_dir, task, data, cfg: PruneConfig, plan, progress, info):
    """``--generate``: the plan made on the language model over the task's prompt and completion tokens, applied
    to the language model itself, which folds into its dense sibling's ``...ForCausalLM`` at k = 1
    (:meth:`~edgeprune.models.adapter.MoEAdapter.fold_class`), then recovered by distillation of the original's
    next-token distribution on the completion tokens (:mod:`edgeprune.pruning.distill`)."""
    from edgeprune.pruning.distill import distill

    if memory_path(original_dir, task, cfg)[0]:
        return _prune_language_model_streamed(original_dir, task, data, cfg, plan, progress, info)
    t0 = time.perf_counter()
    lm = load_language_model(original_dir, cfg.dtype)
    adapter = family_of(lm)
    check_model(lm, adapter, task, cfg, labels=False)
    if plan is None:
        plan = score(original_dir, task, data, cfg, model=lm, progress=progress, info=info, release=False)
    pruned = apply_plan(lm, plan, adapter=adapter)
    info["score_and_apply_seconds"] = round(time.perf_counter() - t0, 1)
    train = lm_examples(original_dir, task, data, cfg, "train") if cfg.recovery_steps else None
    info["recovery"] = distill(pruned, lm, train, cfg.recovery_steps, alpha=cfg.distill_alpha, seed=cfg.seed,
                               progress=progress, device=cfg.device) if train is not None else {"steps": 0, "seconds": 0.0}
    distributed.release_workers()
    info["generate"] = {"class": type(pruned).__name__, "recovery": "KL distillation on completion tokens"
                        if cfg.recovery_steps else "none (--recovery-steps 0)"}
    info["seconds"] = round(time.perf_counter() - t0, 1)
    return pruned, plan, info


def _prune_language_model_streamed(original_dir, task, data, cfg: PruneConfig, plan, progress, info):
    """``--generate`` for a checkpoint that does not fit: the plan from the layer-wise calibration of the language
    model, applied (and folded into the dense sibling's ``...ForCausalLM`` at k = 1) checkpoint to checkpoint one
    layer at a time; handed on unloaded when nothing follows, else loaded (it is small) and recovered on the
    completion tokens' cross-entropy alone (the original, the distillation teacher, is never in memory here)."""
    from edgeprune.models.checkpoint import load_checked, read_config, torch_dtype
    from edgeprune.pruning.distill import distill
    from transformers import AutoModelForCausalLM

    _refuse_progressive(cfg, plan)
    t0 = time.perf_counter()
    plan = _layerwise_plan(original_dir, task, data, cfg, plan, progress, info)
    streamed = _stream(original_dir, plan, cfg, task, progress, lm=True)
    info["score_and_apply_seconds"] = round(time.perf_counter() - t0, 1)
    info["generate"] = {"class": read_config(streamed.dir)["architectures"][0],
                        "recovery": "CE on completion tokens (the original is not loaded on the layer-wise path)"
                        if cfg.recovery_steps else "none (--recovery-steps 0)"}
    if cfg.recovery_steps == 0:
        if not distributed.is_writer():
            streamed.discard()
        distributed.release_workers()
        info["recovery"], info["seconds"] = {"steps": 0, "seconds": 0.0}, round(time.perf_counter() - t0, 1)
        return streamed, plan, info
    distributed.release_workers()
    pruned = load_checked(AutoModelForCausalLM, streamed.dir, dtype=torch_dtype(cfg.dtype, read_config(original_dir)))
    streamed.discard()
    train = lm_examples(original_dir, task, data, cfg, "train")
    info["recovery"] = distill(pruned, None, train, cfg.recovery_steps, seed=cfg.seed, progress=progress,
                               device=cfg.device)
    info["seconds"] = round(time.perf_counter() - t0, 1)
    return pruned, plan, info


def _after_plan(pruned, original, adapter, plan, task, data, cfg: PruneConfig, tok, tok_json, train_enc, info, t0,
                progress):
    """What follows the expert plan on either path: FFN neurons, depth and heads of the folded model, the
    method's own step (UNCURL's router), recovery (distilled from ``original`` when it is there), the vocabulary."""
    from edgeprune.pruning.recover import recover

    pruned = _shrink(pruned, adapter, cfg, train_enc, info, progress)
    info["score_and_apply_seconds"] = round(time.perf_counter() - t0, 1)
    done = cfg.method_config().after_apply(pruned, plan, train_enc, original, cfg, task, progress, adapter)
    if done is not None:
        info["router"] = done
    info["recovery"] = recover(pruned, train_enc, cfg.recovery_steps, teacher=original,
                               distill_alpha=cfg.distill_alpha, max_length=task.max_length, progress=progress,
                               seed=cfg.seed, fsdp=cfg.fsdp, device=cfg.device, mode=cfg.recovery_mode)
    distributed.release_workers()  # under torchrun, recovery was data-parallel; the rest is rank 0's
    if cfg.vocab_reserve is not None:  # the training split's tokens keep their segmentation: after recovery
        from edgeprune.pruning.vocab import prune_vocabulary

        val = encode(data.load(task, "validation"), tok, task.max_length, of_model(pruned))
        pruned.edgeprune_tokenizer_json, info["vocab"] = prune_vocabulary(
            pruned, tok_json, train_enc.input_ids, val.input_ids, cfg.vocab_reserve)
    info["seconds"] = round(time.perf_counter() - t0, 1)
    return pruned, plan, info


def _shrink(pruned, adapter, cfg: PruneConfig, train_enc, info, progress):
    """The folded model's neurons (``--ffn-keep``), layers and heads (``--drop-layers`` / ``--heads-keep``)."""
    if cfg.ffn_keep < 1:
        from edgeprune.pruning.neurons import neuron_saliency, slim_ffn

        if adapter.dense is None:
            raise ConfigError(f"--ffn-keep slims the folded dense sibling; {adapter.model_type} has none")
        saliency = neuron_saliency(pruned, adapter, train_enc, max_examples=cfg.calibration_examples,
                                   progress=progress)
        pruned, info["ffn"] = slim_ffn(pruned, adapter, saliency, cfg.ffn_keep)
    shrink = structure.requested(cfg.drop_layers, cfg.heads_keep)
    if shrink:
        pruned, done = structure.apply(pruned, shrink, train_enc, cfg.calibration_examples, progress)
        info["depth"], info["heads"] = done.get("LayerDrop"), done.get("HeadPrune")
    return pruned
