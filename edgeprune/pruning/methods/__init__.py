"""Expert-pruning methods: each is a frozen config object plus a registered handler (torchao's
``quantize_(model, Config())`` pattern), one file per method in this package.

A one-shot method's handler returns, per MoE layer, one score per expert (higher = keep); a merging method
(``merges``) also gets its clusters made when the plan knows k (:func:`edgeprune.pruning.plan.make_plan`); a
progressive method (``progressive``) makes its plan while fine-tuning, through its :meth:`MethodConfig.run_progressive`
hook. A method declares its own command-line options (:class:`MethodOption`), its checks of the prune
configuration (:meth:`MethodConfig.check`) and what it does after the plan is applied
(:meth:`MethodConfig.after_apply`): the CLI, the pipeline, the plan and the scripts read them here and never
name a method.

Add a method: one file here with a config dataclass (a unique ``name``, the paper and formula in its
docstring), its handler decorated with ``@register(YourConfig)``, and its module name in :data:`MODULES`.

Importing this package does not import torch (the CLI lists the methods and their options at once).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional

from edgeprune.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

MODULES = ("frequency", "chen2022", "chowdhury2024", "reap", "random_scores", "uncurl", "hc_smoe", "m_smoe", "ties")


@dataclass(frozen=True)
class MethodOption:
    """A command-line option a method adds to ``score`` / ``prune`` / ``build`` (``--flag``), passed to the
    config field of the same name when given (``None``: not given)."""

    flag: str
    field: str
    type: Any = str  # a click type or a Python type
    help: str = ""


@dataclass(frozen=True)
class MethodConfig:
    """Base of all method configs. ``needs_calibration``: task data must be run through the model;
    ``merges``: the plan merges clusters of experts; ``progressive``: the plan is made while fine-tuning;
    ``options``: the command-line options this method adds (besides the shared ``--seed``, which every method
    with a ``seed`` field receives); ``merge_rule``: how a merging method combines a group's experts
    (:data:`edgeprune.pruning.merge.MERGE_RULES`); ``expert_outputs``: calibration also runs every expert on a sample
    of tokens (``LayerStats.out_sum``)."""

    name: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = True
    merges: ClassVar[bool] = False
    merge_rule: ClassVar[str] = "average"
    expert_outputs: ClassVar[bool] = False
    progressive: ClassVar[bool] = False
    options: ClassVar[tuple[MethodOption, ...]] = ()

    def check(self, prune) -> None:
        """One-line :class:`ConfigError` when ``prune`` (a :class:`~edgeprune.pruning.config.PruneConfig`) does
        not suit this method; called before any model is loaded."""

    def after_apply(self, pruned, plan, train_enc, teacher, prune, task, progress: bool,
                    adapter=None) -> Optional[dict]:
        """Work between applying the plan and recovery (UNCURL trains its new routers); a record or None."""
        return None

    def needs_after_apply(self, plan) -> bool:
        return False

    def clusters(self, stats, k: int) -> list[list[tuple[int, float]]]:
        """A merging method's k groups of one layer from its statistics: ``[[(expert, weight), ...], ...]``, the
        group's reference (the expert the others are aligned to) first."""
        raise NotImplementedError(f"{self.name} does not merge")


Handler = Callable[..., "dict[int, np.ndarray]"]
METHODS: dict[str, type[MethodConfig]] = {}
_HANDLERS: dict[type[MethodConfig], Callable] = {}


def register(cfg_cls: type[MethodConfig]) -> Callable[[Callable], Callable]:
    """Register ``cfg_cls`` with its handler: a scorer ``(cfg, model, stats, source_dir) -> {layer: scores}``,
    or for a progressive method ``(cfg, original, train_enc, prune, task, source, progress) -> (model, plan,
    record)``."""
    def deco(fn: Callable) -> Callable:
        if cfg_cls.name in METHODS and METHODS[cfg_cls.name] is not cfg_cls:
            raise ValueError(f"two pruning methods are named {cfg_cls.name!r}")
        METHODS[cfg_cls.name] = cfg_cls
        _HANDLERS[cfg_cls] = fn
        return fn

    return deco


def usage_scores(cfg: MethodConfig, model, stats, **_) -> "dict[int, np.ndarray]":
    """A merging method's scores: each expert's usage (the groups themselves come from its :meth:`clusters` when
    the plan knows k)."""
    return {i: s.counts.astype(float) for i, s in stats.items()}


def _load() -> None:
    for m in MODULES:
        importlib.import_module(f"{__name__}.{m}")


def names() -> list[str]:
    """Every registered method, in registration order."""
    return list(METHODS)


def all_options() -> list[MethodOption]:
    """The methods' own command-line options, each flag once."""
    seen: dict[str, MethodOption] = {}
    for cls in METHODS.values():
        for o in cls.options:
            seen.setdefault(o.flag, o)
    return list(seen.values())


def cli_values(name: str, given: dict) -> dict:
    """The options of method ``name`` among the command line's values ``given`` (field -> value; ``None``: not
    given): the shared ``--seed`` for a method with a ``seed`` field, and its own options. An option of another
    method that was given is a one-line error."""
    cls = get(name)
    own = {f.name for f in fields(cls)}
    mine = {o.field for o in cls.options}
    for o in all_options():
        if o.field not in mine and o.field not in own and given.get(o.field) is not None:
            users = [c.name for c in METHODS.values() if o in c.options]
            raise ConfigError(f"{o.flag} is an option of {', '.join(users)}, not of {name}; drop it")
    return {k: v for k, v in given.items() if k in own and v is not None}


def get(name: str) -> type[MethodConfig]:
    if name not in METHODS:
        raise ConfigError(f"unknown pruning method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]


def method_config(name: str, **options) -> MethodConfig:
    """Build the config of method ``name``; unknown names and options are one-line errors."""
    cls = get(name)
    allowed = {f.name for f in fields(cls)}
    bad = sorted(set(options) - allowed)
    if bad:
        raise ConfigError(f"method {name} has no option {bad[0]!r}" + (f" (options: {', '.join(sorted(allowed))})"
                                                                      if allowed else ""))
    return cls(**options)


def score_experts(cfg: MethodConfig, model, stats, source_dir: Optional[str] = None,
                  adapter=None) -> "dict[int, np.ndarray]":
    """Per-layer expert scores (higher = more important) by the handler of ``cfg``; ``adapter`` is the model's
    family (looked up when not given)."""
    if cfg.progressive:
        raise ConfigError(f"{cfg.name} makes its plan while fine-tuning; run `edgeprune prune` instead")
    if cfg.needs_calibration and stats is None:
        raise ConfigError(f"method {cfg.name} needs calibration statistics on task data")
    if adapter is None:
        from edgeprune.models.registry import adapter_for

        adapter = adapter_for(model.config)
    return _HANDLERS[type(cfg)](cfg, model=model, stats=stats, source_dir=source_dir, adapter=adapter)


def run_progressive(cfg: MethodConfig, original, train_enc, prune, task, source: str, progress: bool = True,
                    adapter=None):
    """A progressive method's plan, made while fine-tuning a copy of ``original``: ``(model, plan, record)``."""
    return _HANDLERS[type(cfg)](cfg, original=original, train_enc=train_enc, prune=prune, task=task, source=source,
                                progress=progress, adapter=adapter)


_load()
