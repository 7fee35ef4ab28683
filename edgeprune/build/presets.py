"""What a target profile contributes to a build beyond its device settings: the ``[prune]`` preset (structural
knobs a search chose) applied to the options the user left at their defaults, and a target with another word
embedding precision (``--embedding-bits``)."""
from __future__ import annotations

from typing import Callable, Optional

from edgeprune.errors import ConfigError


def apply_presets(prune_cfg, target, plan_file: Optional[str], given: set[str], say: Callable[[str], None]) -> None:
    """The target's ``[prune]`` preset for every option of ``prune_cfg`` that is not in ``given`` (the options the
    user gave), said in one line; none with a progressive method or an explicit --plan / --experts other than 1
    (the preset is for the folded model). ``vocab_reserve = -1`` keeps the full vocabulary against a preset."""
    presets = target.prune.presets()
    if prune_cfg.vocab_reserve == -1:  # explicitly the full vocabulary
        prune_cfg.vocab_reserve = None
        presets.pop("vocab_reserve", None)
    if not presets:
        return
    if prune_cfg.progressive or plan_file or prune_cfg.experts != 1:
        why = (f"{prune_cfg.method} makes its plan while fine-tuning" if prune_cfg.progressive
               else "--plan given" if plan_file else "it is for the folded model (--experts 1)")
        say(f"[edgeprune] target {target.name}: preset not applied ({why})")
        return
    used = {k: v for k, v in presets.items() if k not in given}
    for key, value in used.items():
        setattr(prune_cfg, key, value)
    if used:
        say(f"[edgeprune] target {target.name}: preset " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in used.items()))


def with_embedding_bits(target, bits: Optional[str]):
    """``target`` with the word embedding at ``bits`` (``--embedding-bits``; 4 needs an int8-dynamic target)."""
    if bits is None:
        return target
    from edgeprune.build.search import target_for

    if bits == "4" and target.quantization.precision != "int8-dynamic":
        raise ConfigError(f"--embedding-bits 4 goes with int8-dynamic targets; {target.name} is "
                          f"{target.quantization.precision}")
    return target_for(target, {"embedding_bits": int(bits)})
