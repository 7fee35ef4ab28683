"""Chen et al. 2022, "Task-Specific Expert Pruning for Sparse Mixture-of-Experts" (arXiv 2206.00277): the
alpha score one-shot, and expert dropping during fine-tuning (progressive and eager, section 3)."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import ClassVar

from edgeprune.errors import ConfigError
from edgeprune.pruning.methods import MethodConfig, MethodOption, register


@dataclass(frozen=True)
class Chen2022(MethodConfig):
    """Proficiency ("alpha score") of expert e: alpha_e = sum over tokens routed to e of the gate value
    g_e(x), normalised over the experts: alpha_e / sum_j alpha_j. One-shot form, accumulated over the
    calibration pass; the progressive forms are :class:`Chen2022Progressive` and :class:`Chen2022Eager`."""

    name: ClassVar[str] = "chen2022"


@register(Chen2022)
def score(cfg: Chen2022, model, stats, **_):
    return {i: s.gate_sum / max(s.gate_sum.sum(), 1e-12) for i, s in stats.items()}


WINDOW = MethodOption("--window", "window", int, "chen2022-progressive / -eager: fine-tuning steps per alpha window "
                                                 "[default: 25].")
BETA = MethodOption("--beta", "beta", float, "chen2022-progressive: drop experts whose alpha is below beta / "
                                             "Z_alive at the end of a window [default: 0.5].")


@dataclass(frozen=True)
class Chen2022Progressive(MethodConfig):
    """Progressive dropping (:class:`~edgeprune.pruning.progressive.ProgressiveDropper`): the alpha score over
    each window of ``window`` fine-tuning steps, normalised over the experts alive, a_e = A_e / sum_alive A_j;
    experts with a_e < beta / Z_alive are dropped for good at the end of the window. The alive experts at the
    end are the plan (the k with the largest alpha where more stay alive)."""

    name: ClassVar[str] = "chen2022-progressive"
    progressive: ClassVar[bool] = True
    needs_calibration: ClassVar[bool] = False
    options: ClassVar[tuple[MethodOption, ...]] = (WINDOW, BETA)
    eager: ClassVar[bool] = False
    window: int = 25
    beta: float = 0.5

    def check(self, prune) -> None:
        for flag, on in (("--ffn-keep", prune.ffn_keep < 1), ("--drop-layers", prune.drop_layers > 0),
                         ("--heads-keep", prune.heads_keep < 1), ("--vocab-reserve", prune.vocab_reserve is not None)):
            if on:
                raise ConfigError(f"{flag} needs a one-shot method ({self.name} makes its plan while fine-tuning)")
        if prune.recovery_steps < 2 * self.window:
            raise ConfigError(f"{self.name} drops experts during fine-tuning: give --recovery-steps >= "
                              f"{2 * self.window}")
        if prune.layerwise:
            raise ConfigError(f"{self.name} fine-tunes the whole original while dropping experts, which needs it in "
                              "memory; use a one-shot method (reap, frequency, ...) with --layerwise")
        if prune.generate:
            raise ConfigError("--generate prunes experts and folds the language model; a progressive method is not "
                              "there yet for it (drop it)")
        if prune.fsdp:
            raise ConfigError(f"--fsdp shards the recovery over torchrun's processes; {self.name} drops experts "
                              "while it trains, in one process")


@dataclass(frozen=True)
class Chen2022Eager(Chen2022Progressive):
    """Eager variant: at the middle of fine-tuning every layer keeps only its top expert (largest alpha so
    far), trained alone for the second half: the layer is then a dense FFN (one expert, so ``--experts 1``)."""

    name: ClassVar[str] = "chen2022-eager"
    options: ClassVar[tuple[MethodOption, ...]] = (WINDOW,)
    eager: ClassVar[bool] = True

    def check(self, prune) -> None:
        if prune.experts != 1:
            raise ConfigError("chen2022-eager reaches one expert per layer; use --experts 1")
        super().check(prune)


@register(Chen2022Eager)
@register(Chen2022Progressive)
def run(cfg: Chen2022Progressive, original, train_enc, prune, task, source, progress=True, adapter=None):
    """Fine-tune a copy of ``original`` with the dropper on every step (it doubles as recovery, distilled from
    the original), then apply the plan of the experts left alive."""
    from edgeprune.pruning.apply import apply_plan
    from edgeprune.pruning.progressive import ProgressiveDropper, top_alive
    from edgeprune.pruning.recover import recover

    t0 = time.perf_counter()
    model = copy.deepcopy(original)
    dropper = ProgressiveDropper(model, prune.recovery_steps, window=cfg.window, beta=cfg.beta,
                                 min_experts=prune.experts or 1, eager=cfg.eager, adapter=adapter)
    record = {"recovery": recover(model, train_enc, prune.recovery_steps, teacher=original,
                                  distill_alpha=prune.distill_alpha, max_length=task.max_length, progress=progress,
                                  seed=prune.seed, on_step=dropper, desc=cfg.name)}
    plan = top_alive(dropper.plan(cfg.name, source=source, task=task.name), prune.experts)
    dropper.reset()
    record["seconds"] = round(time.perf_counter() - t0, 1)
    return apply_plan(model, plan, adapter=adapter), plan, record
