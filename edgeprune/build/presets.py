"""What a build takes beyond the device settings of its target, and from where.

A target profile says what the device needs (precision, operators, shapes, budgets). Structural choices a search
made for one model and task (layers dropped, heads and FFN neurons kept, vocabulary cut, recovery steps) are a
*preset* of that model: the CPU profiles' ``[prune]`` table is the recipe ``edgeprune search`` chose for the
embedded default original on sst2, applied only when the build prunes that original; ``edgeprune search`` writes
``preset.toml`` for the model it searched, which ``build --preset FILE`` applies to any model. A user's ``--model``
gets the plain fold unless the user asks for more. A preset that does not fit the model (more layers dropped than
it has, a vocabulary cut on a tokenizer that is not WordPiece, a structural knob on a family without a dense
sibling) is never applied silently: from the target's recipe the knob is skipped with one line that says why; from
``--preset`` (asked for explicitly) the build refuses with exit 2. Options given on the command line always win.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

from edgeprune.errors import ConfigError

STRUCTURAL = ("drop_layers", "heads_keep", "ffn_keep", "vocab_reserve")


def load_preset(path: str | Path) -> dict:
    """The ``[prune]`` table of a preset file (what ``edgeprune search`` writes; a target profile works too)."""
    from edgeprune.targets import PruneSpec, _typed, read_toml

    data = read_toml(Path(path), "preset")
    table = data.get("prune")
    if not isinstance(table, dict) or not table:
        raise ConfigError(f"--preset {path}: no [prune] table (a preset has e.g. drop_layers, heads_keep, ffn_keep, "
                          "vocab_reserve, recovery_steps)")
    return _typed("prune", PruneSpec, table, str(path)).presets()


def write_preset(path: Path, knobs: dict, recovery_steps: int, about: str) -> None:
    """``preset.toml`` for ``build --preset``: the chosen candidate's knobs (``vocab_reserve`` -1: full vocabulary)."""
    lines = [f"# {line}" for line in about.splitlines()] + ["[prune]"]
    for key in STRUCTURAL:
        if key in knobs and not (key == "vocab_reserve" and knobs[key] < 0):
            lines.append(f"{key} = {knobs[key]}")
    lines.append(f"recovery_steps = {recovery_steps}")
    path.write_text("\n".join(lines) + "\n")


def misfits(presets: dict, model_dir: Optional[str | Path]) -> dict[str, str]:
    """Knob -> why it does not fit the checkpoint in ``model_dir`` (empty where everything fits)."""
    if model_dir is None:
        return {}
    from edgeprune.models.checkpoint import read_config

    raw = read_config(model_dir)
    out = {}
    layers = raw.get("num_hidden_layers") or raw.get("num_layers")
    if presets.get("drop_layers") and isinstance(layers, int) and presets["drop_layers"] >= layers:
        out["drop_layers"] = f"the model has {layers} layers"
    if presets.get("vocab_reserve") is not None and not _wordpiece(model_dir):
        out["vocab_reserve"] = "its tokenizer is not WordPiece"
    structural = [k for k in ("drop_layers", "heads_keep", "ffn_keep") if presets.get(k) not in (None, 0, 1, 1.0)]
    if structural and not _has_dense_sibling(raw.get("model_type")):
        for k in structural:
            out.setdefault(k, f"{raw.get('model_type')} has no dense sibling to fold into")
    return out


def _wordpiece(model_dir) -> bool:
    try:
        tok = json.loads((Path(model_dir) / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (tok.get("model") or {}).get("type") == "WordPiece"


def _has_dense_sibling(model_type) -> bool:
    from edgeprune.models.registry import find_adapter

    adapter = find_adapter(model_type)
    return adapter is not None and adapter.dense is not None


def apply_presets(prune_cfg, target, plan_file: Optional[str], given: set[str], say: Callable[[str], None],
                  model_dir: Optional[str] = None, preset_file: Optional[str] = None, other: Optional[str] = None) -> None:
    """Set on ``prune_cfg`` the preset's knobs the user left at their defaults (``given``: the options given):
    ``--preset FILE`` for any model, else the target's ``[prune]`` recipe when the build prunes the default
    original (no ``model_dir``, and ``other`` None: not another default such as ``"the BTX original"``). Said in one
    line; see the module docstring for what does not fit."""
    if prune_cfg.vocab_reserve == -1:  # explicitly the full vocabulary
        prune_cfg.vocab_reserve = None
        given = given | {"vocab_reserve"}
    source = f"--preset {preset_file}" if preset_file else f"target {target.name}"
    presets = load_preset(preset_file) if preset_file else target.prune.presets()
    if not presets:
        return
    if not preset_file and (model_dir is not None or other):
        left = {k: v for k, v in presets.items() if k not in given}
        if left:
            say(f"[edgeprune] {source}: its [prune] preset ({_options(left)}) was chosen for the default original; "
                f"not applied to {other or '--model'} (give --preset FILE, e.g. the one `edgeprune search` wrote for "
                "this model, or the options)")
        return
    if prune_cfg.progressive or plan_file or prune_cfg.experts != 1:
        why = (f"{prune_cfg.method} makes its plan while fine-tuning" if prune_cfg.progressive
               else "--plan given" if plan_file else "it is for the folded model (--experts 1)")
        if preset_file:
            raise ConfigError(f"{source}: cannot be applied ({why}); drop --preset or change the options")
        say(f"[edgeprune] {source}: preset not applied ({why})")
        return
    used = {k: v for k, v in presets.items() if k not in given}
    bad = misfits(used, model_dir)
    if bad and preset_file:
        key, why = next(iter(bad.items()))
        raise ConfigError(f"{source}: {key} = {used[key]} does not fit the model ({why}); edit the preset or give "
                          f"--{key.replace('_', '-')} yourself")
    for key, why in bad.items():
        say(f"[edgeprune] {source}: {key} = {used.pop(key)} skipped ({why})")
    for key, value in used.items():
        setattr(prune_cfg, key, value)
    if used:
        say(f"[edgeprune] {source}: preset {_options(used)}")


def _options(presets: dict) -> str:
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in presets.items())


def with_embedding_bits(target, bits: Optional[str]):
    """``target`` with the word embedding at ``bits`` (``--embedding-bits``; 4 needs an int8-dynamic target)."""
    if bits is None:
        return target
    from edgeprune.build.search import target_for

    if bits == "4" and target.quantization.precision != "int8-dynamic":
        raise ConfigError(f"--embedding-bits 4 goes with int8-dynamic targets; {target.name} is "
                          f"{target.quantization.precision}")
    return target_for(target, {"embedding_bits": int(bits)})
