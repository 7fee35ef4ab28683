"""How to prune: :class:`PruneConfig`, checked before any model is loaded (:meth:`PruneConfig.validate`), and
against the loaded model before any heavy work (:func:`check_model`). Checks that belong to one method live in
that method's file (:meth:`edgeprune.pruning.methods.MethodConfig.check`)."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Optional

from edgeprune.errors import ConfigError, ModelError
from edgeprune.pruning import methods


@dataclass
class PruneConfig:
    """How to prune: method (+ its options), k experts per layer or a routing-mass coverage, calibration
    size, recovery budget, the folded model's structural knobs, where the work runs. Validated before any
    model is loaded."""

    method: str = "reap"
    method_options: dict = field(default_factory=dict)
    experts: Optional[int] = 1
    coverage: Optional[float] = None
    calibration_examples: int = 1024
    recovery_steps: int = 200
    distill_alpha: float = 0.5
    recovery_mode: str = "full"  # or "router": train only the routers and gates (arXiv 2603.02217, 2606.03391)
    gate_scale: bool = True
    ffn_keep: float = 1.0
    drop_layers: int = 0  # remove this many layers of the folded model (ShortGPT block influence)
    heads_keep: float = 1.0  # keep this share of attention heads per layer (Michel et al. 2019 importance)
    seed: int = 0
    prompt: Optional[str] = None  # label-word scoring of language-model checkpoints (None: the task's default)
    verbalisers: Optional[tuple[str, ...]] = None
    label_map: Optional[tuple[tuple[str, str], ...]] = None  # checkpoint label name -> task label (--label-map)
    dtype: Optional[str] = None  # load dtype (None: the checkpoint's own)
    vocab_reserve: Optional[int] = None  # prune the WordPiece vocabulary to the task's tokens + this many words
    layerwise: Optional[bool] = None  # None: chosen by the memory estimate (edgeprune.scale.memory)
    max_memory_gb: Optional[float] = None  # cap for that choice (None: the memory available now)
    offload_dir: Optional[str] = None  # layer-wise hidden states beyond the cap (None: a temporary directory)
    generate: bool = False  # keep a language model's LM head: the pruned (folded) model generates (issue 14)
    fsdp: bool = False  # under torchrun: the recovery sharded over the processes (FSDP2) instead of DDP
    device: str = "auto"  # where calibration and recovery compute (edgeprune.scale.device: cpu, cuda, mps, auto)

    def load_options(self) -> dict:
        """How :func:`~edgeprune.models.loading.load_model` reads the original: dtype, and the label words of a
        language model."""
        return {"prompt": self.prompt, "verbalisers": self.verbalisers, "dtype": self.dtype,
                "label_map": self.label_map}

    def method_config(self) -> methods.MethodConfig:
        return methods.method_config(self.method, **self.method_options)

    @property
    def progressive(self) -> bool:
        return methods.get(self.method).progressive

    def validate(self) -> None:
        mcfg = self.method_config()
        if (self.experts is None) == (self.coverage is None):
            raise ConfigError("give exactly one of --experts K or --coverage SHARE")
        if self.experts is not None and self.experts < 1:
            raise ConfigError(f"--experts must be >= 1, got {self.experts}")
        self._validate_structure()
        if self.max_memory_gb is not None and self.max_memory_gb <= 0:
            raise ConfigError(f"--max-memory must be > 0 GB, got {self.max_memory_gb}")
        mcfg.check(self)
        self._validate_generate()
        self._validate_fsdp()
        from edgeprune.scale.device import resolve

        if resolve(self.device).type != "cpu" and self.layerwise:
            raise ConfigError(f"--device {self.device} with --layerwise: the layer-wise pass runs on the CPU so far; "
                              "drop one of them")
        if not 0 <= self.distill_alpha <= 1:
            raise ConfigError(f"distill alpha must be in [0, 1], got {self.distill_alpha}")
        if self.recovery_mode not in ("full", "router"):
            raise ConfigError(f"--recovery-mode {self.recovery_mode!r}: give full or router")
        if self.recovery_mode == "router" and self.experts == 1:
            raise ConfigError("--recovery-mode router trains the routers, and --experts 1 folds them away; use "
                              "--experts 2 or more, or full recovery")
        if self.recovery_mode == "router" and self.generate:
            raise ConfigError("--recovery-mode router: the generation recovery distils the whole language model so "
                              "far; drop --recovery-mode")

    def _validate_structure(self) -> None:
        """The folded model's knobs: ranges, and only with one expert per layer."""
        if not 0 < self.ffn_keep <= 1:
            raise ConfigError(f"--ffn-keep must be in (0, 1], got {self.ffn_keep}")
        if self.ffn_keep < 1 and self.experts != 1:
            raise ConfigError("--ffn-keep prunes neurons of the folded dense FFN: use it with --experts 1")
        if self.drop_layers < 0:
            raise ConfigError(f"--drop-layers must be >= 0, got {self.drop_layers}")
        if not 0 < self.heads_keep <= 1:
            raise ConfigError(f"--heads-keep must be in (0, 1], got {self.heads_keep}")
        for flag, on in (("--drop-layers", self.drop_layers > 0), ("--heads-keep", self.heads_keep < 1)):
            if on and self.experts != 1:
                raise ConfigError(f"{flag} prunes the folded dense model: use it with --experts 1")
        if self.vocab_reserve is not None and self.vocab_reserve < 0:
            raise ConfigError(f"--vocab-reserve must be >= 0, got {self.vocab_reserve}")

    def _validate_generate(self) -> None:
        if not self.generate:
            return
        for flag, on in (("--ffn-keep", self.ffn_keep < 1), ("--drop-layers", self.drop_layers > 0),
                         ("--heads-keep", self.heads_keep < 1), ("--vocab-reserve", self.vocab_reserve is not None)):
            if on:
                raise ConfigError(f"--generate prunes experts and folds the language model; {flag} is not there "
                                  "yet for it (drop it)")
        if self.fsdp:
            raise ConfigError("--fsdp: the generation recovery (KL distillation) runs in one process so far; drop "
                              "--fsdp")

    def _validate_fsdp(self) -> None:
        if self.fsdp and self.recovery_steps == 0:
            raise ConfigError("--fsdp shards the recovery fine-tuning, and --recovery-steps is 0; drop --fsdp")
        if self.fsdp and os.environ.get("WORLD_SIZE", "1") == "1":  # the launcher's, not after release_workers
            raise ConfigError("--fsdp shards the recovery over the processes of torchrun; run the command under "
                              "`torchrun --no-python --nproc_per_node N edgeprune ...` or drop --fsdp")

    def to_dict(self) -> dict:
        return asdict(self)


def check_model_labels(model, task) -> None:
    if model.config.num_labels != task.num_labels:
        raise ConfigError(f"the model has {model.config.num_labels} labels but task {task.name} has "
                          f"{task.num_labels} ({', '.join(task.labels)})")


def config_value(config, key: str):
    """``key`` of ``config``, a dotted path for nested configs (DBRX's ``ffn_config.moe_top_k``); None if absent."""
    for part in key.split("."):
        config = config.get(part) if isinstance(config, dict) else getattr(config, part, None)
    return config


def check_model(model, adapter, task, cfg: PruneConfig, tokenizer=None, labels: bool = True) -> None:
    """Labels match the task (a classifier's: ``labels``), k fits every layer, a decoder classifier pads with its
    tokenizer's padding id: checked before any heavy work. ``adapter`` is the model's family
    (:func:`edgeprune.models.registry.adapter_for`, resolved where the model was loaded)."""
    if labels:
        check_model_labels(model, task)
    blocks = adapter.blocks(model)
    if not blocks:
        raise ModelError(f"the {adapter.model_type} checkpoint has no MoE layer to prune (every layer is dense)")
    declared = config_value(model.config.get_text_config(), adapter.top_k_key)
    for layer, b in blocks.items():
        if isinstance(declared, int) and not 1 <= declared <= adapter.num_experts(b):
            raise ModelError(f"config.json {adapter.top_k_key} = {declared} but layer {layer} has "
                             f"{adapter.num_experts(b)} experts; fix the checkpoint's config")
    if cfg.progressive and not adapter.extra.get("progressive"):
        raise ConfigError(f"{cfg.method} drops experts during fine-tuning, which only bert_moe supports so far; "
                          f"use a one-shot method (frequency, chen2022, reap, ...) for {adapter.model_type}")
    if tokenizer is not None and not adapter.uses_token_type_ids:
        pad = tokenizer.pad_token_id
        if pad is None or model.config.pad_token_id != pad:
            raise ModelError(f"the classifier finds each text's last token by pad_token_id "
                             f"({model.config.pad_token_id}) but the tokenizer pads with {pad}; set both to the "
                             "same id (config.json pad_token_id and the tokenizer's pad_token)")
    if cfg.experts is not None:
        from edgeprune.pruning.plan import validate_k

        for layer, b in blocks.items():
            validate_k(cfg.experts, adapter.num_experts(b), adapter.top_k(b), layer)
            adapter.check_k(b, cfg.experts)
