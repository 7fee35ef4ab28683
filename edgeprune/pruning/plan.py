"""The prune plan: per MoE layer, the scores, the experts kept (or the clusters merged) and k.

A plan is JSON so that it can be inspected, edited by hand and reapplied (``edgeprune prune --plan``).
Each layer has ``groups``: a list of new experts, each a list of ``[original expert, weight]`` pairs; a
plain prune has one member of weight 1 per group, a merge (UNCURL) several with usage weights.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from scipy.special import softmax

from edgeprune.errors import ConfigError
from edgeprune.pruning.calibration import LayerStats


@dataclass
class LayerPlan:
    """One MoE layer: ``groups`` are the new experts; ``output_scale`` multiplies their outputs (W_out, b_out).

    With Switch top-1 routing the original scales each expert's output by its gate g (about 0.2 with 8
    experts here); after pruning the softmax runs over the kept experts only and the gate grows (to exactly 1
    at k = 1: a 1/g jump in the FFN output). The plan then sets ``output_scale`` (:func:`gate_output_scale`:
    mean original top-1 gate / mean pruned top-1 gate on the calibration tokens), so the pruned FFN keeps the
    output scale the rest of the network was trained with (1.0 = plain renormalisation).
    """

    layer: int
    num_experts: int
    scores: list[float]
    groups: list[list[tuple[int, float]]]
    output_scale: float = 1.0
    # expert sets of the layer that share its expert count (JetMoE's attention experts): name -> the k kept
    companions: dict[str, list[int]] = field(default_factory=dict)

    @property
    def k(self) -> int:
        return len(self.groups)

    @property
    def kept(self) -> list[int]:
        """The expert that represents each group (its first member: the kept one, or the merge reference)."""
        return [g[0][0] for g in self.groups]


@dataclass
class PrunePlan:
    method: str
    layers: list[LayerPlan]
    source: Optional[str] = None
    task: Optional[str] = None
    options: dict = field(default_factory=dict)
    merge_rule: str = "average"  # how a group's members combine: edgeprune.pruning.merge.MERGE_RULES

    @property
    def folds(self) -> bool:
        """True when every MoE layer keeps one expert: the router folds away and the model is dense."""
        return all(lp.k == 1 for lp in self.layers)

    def summary(self) -> dict:
        return {"method": self.method, "k_per_layer": {str(lp.layer): lp.k for lp in self.layers},
                "kept": {str(lp.layer): lp.kept for lp in self.layers}, "folded": self.folds}

    def to_json(self) -> str:
        """Standard JSON (a non-finite number has no JSON form: such a plan is refused where it is made)."""
        return json.dumps(asdict(self), indent=1, allow_nan=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def from_dict(cls, d: dict) -> "PrunePlan":
        """A plan from its JSON form, every field type-checked: integer layer and expert ids, finite numbers,
        merge weights of positive sum, a positive finite output scale, a known method."""
        from edgeprune.pruning.methods import names as all_methods

        if not isinstance(d, dict):
            raise ValueError(f"the plan is a JSON {type(d).__name__}, not an object")
        if d["method"] not in all_methods() + ["manual"]:
            raise ValueError(f"method {d['method']!r} is not one of {', '.join(all_methods())} (or manual)")
        layers = []
        for lp in d["layers"]:
            layer = _integer(lp["layer"], "layer")
            groups = [[(_integer(e, f"layer {layer}: expert id"), _finite(w, f"layer {layer}: merge weight"))
                       for e, w in g] for g in lp["groups"]]
            for g in groups:
                if g and sum(w for _, w in g) <= 0:
                    raise ValueError(f"layer {layer}: merge weights {[w for _, w in g]} must sum to a positive number")
            scale = _finite(lp.get("output_scale", 1.0), f"layer {layer}: output_scale")
            if scale <= 0:
                raise ValueError(f"layer {layer}: output_scale {scale} must be positive")
            companions = {str(name): [_integer(e, f"layer {layer}: {name} expert id") for e in kept]
                          for name, kept in lp.get("companions", {}).items()}
            layers.append(LayerPlan(layer, _integer(lp["num_experts"], f"layer {layer}: num_experts"),
                                    [_finite(s, f"layer {layer}: score") for s in lp["scores"]],
                                    groups, scale, companions))
        from edgeprune.pruning.merge import MERGE_RULES

        rule = d.get("merge_rule", "average")
        if rule not in MERGE_RULES:
            raise ValueError(f"merge_rule {rule!r} is not one of {', '.join(MERGE_RULES)}")
        return cls(d["method"], layers, d.get("source"), d.get("task"), d.get("options", {}), rule)

    @classmethod
    def load(cls, path: str | Path) -> "PrunePlan":
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise ConfigError(f"{path}: plan file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not a JSON prune plan ({exc})") from None
        except KeyError as exc:
            raise ConfigError(f"{path}: not a valid prune plan (no field {exc})") from None
        except (TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"{path}: not a valid prune plan ({exc})") from None


def _integer(v, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise ValueError(f"{what} {v!r} is not an integer")
    return v


def _finite(v, what: str, nan_ok: bool = False) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or (not math.isfinite(v) and not (nan_ok and v != v)):
        raise ValueError(f"{what} {v!r} is not a finite number")
    return float(v)


def validate_k(k: int, num_experts: int, top_k: int, layer: int) -> None:
    """1 <= k <= Z, and k >= the model's top-k routing unless k = 1 (where the router folds away)."""
    if k < 1:
        raise ConfigError(f"layer {layer}: k={k} experts; keep at least 1")
    if k > num_experts:
        raise ConfigError(f"layer {layer}: k={k} experts but the layer has only Z={num_experts}")
    if 1 < k < top_k:
        raise ConfigError(f"layer {layer}: k={k} is below the model's top-{top_k} routing; use k=1 (fold) "
                          f"or k>={top_k}")


def adaptive_k(usage: np.ndarray, coverage: float) -> int:
    """Smallest number of experts whose routing mass (usage share, sorted) reaches ``coverage``."""
    if not 0 < coverage <= 1:
        raise ConfigError(f"coverage must be in (0, 1], got {coverage}")
    mass = np.sort(usage)[::-1].cumsum()
    return int(np.searchsorted(mass, coverage - 1e-9) + 1)


def validate_plan(plan: PrunePlan, model, adapter=None) -> None:
    """Check a (possibly hand-edited) plan against ``model`` (of the family ``adapter``) before any weights move."""
    from edgeprune.models.registry import adapter_for

    adapter = adapter or adapter_for(model.config)
    blocks = adapter.blocks(model)
    if sorted(lp.layer for lp in plan.layers) != sorted(blocks):
        raise ConfigError(f"plan covers layers {[lp.layer for lp in plan.layers]} but the model's MoE layers are "
                          f"{sorted(blocks)}")
    for lp in plan.layers:
        z = adapter.num_experts(blocks[lp.layer])
        if lp.num_experts != z:
            raise ConfigError(f"layer {lp.layer}: the plan was made for {lp.num_experts} experts but the model has {z}; "
                              "score this model again")
        validate_k(lp.k, z, adapter.top_k(blocks[lp.layer]), lp.layer)
        members = [e for g in lp.groups for e, _ in g]
        if any(not 0 <= e < z for e in members):
            raise ConfigError(f"layer {lp.layer}: expert index out of range 0..{z - 1} in {members}")
        if len(set(members)) != len(members):
            raise ConfigError(f"layer {lp.layer}: an expert appears in two groups")
        if any(not g for g in lp.groups):
            raise ConfigError(f"layer {lp.layer}: empty group")
        for name, kept in lp.companions.items():
            if len(kept) != lp.k or len(set(kept)) != len(kept) or any(not 0 <= e < z for e in kept):
                raise ConfigError(f"layer {lp.layer}: {name} experts {kept} must be {lp.k} distinct indices in "
                                  f"0..{z - 1} (as many as the layer keeps)")


def make_plan(method: str, scores: dict[int, np.ndarray], num_experts: dict[int, int], top_k: dict[int, int],
              k: Optional[int] = None, coverage: Optional[float] = None,
              stats: Optional[dict[int, LayerStats]] = None, clusters: Optional[Callable] = None,
              gate_scale: bool = True, **meta) -> PrunePlan:
    """Keep the top-``k`` experts by score per layer (or an adaptive k from routing ``coverage``);
    with ``clusters`` (a merging method's :meth:`~edgeprune.pruning.methods.MethodConfig.clusters`: layer statistics
    and k -> groups) cluster the experts into k groups instead. With ``gate_scale`` and statistics,
    a top-1 layer gets the ``output_scale`` of :func:`gate_output_scale` (at k = 1: its mean top-1 gate)."""
    if (k is None) == (coverage is None):
        raise ConfigError("give exactly one of --experts K or --coverage SHARE")
    layers = []
    for layer in sorted(scores):
        s = np.asarray(scores[layer], dtype=float)
        if not np.isfinite(s).all():
            from edgeprune.errors import ModelError

            e = int(np.flatnonzero(~np.isfinite(s))[0])
            raise ModelError(f"layer {layer}: {method} scored expert {e} {s[e]} (not a number the plan can rank); the "
                             "model's outputs on the task data are not finite: check the checkpoint")
        if coverage is not None:
            if stats is None:
                raise ConfigError("--coverage needs calibration statistics (a method that runs on task data)")
            k_l = max(adaptive_k(stats[layer].usage, coverage), top_k[layer])
        else:
            k_l = k
        validate_k(k_l, num_experts[layer], top_k[layer], layer)
        if clusters is not None:
            if stats is None:
                raise ConfigError(f"{method} merges clusters of experts and needs calibration statistics")
            groups = clusters(stats[layer], k_l)
        else:
            order = sorted(range(len(s)), key=lambda e: (-s[e], e))
            groups = [[(e, 1.0)] for e in sorted(order[:k_l])]
        scale = 1.0
        if gate_scale and stats is not None and top_k[layer] == 1 and stats[layer].tokens:
            scale = round(gate_output_scale(stats[layer], groups), 6)
        layers.append(LayerPlan(layer, num_experts[layer], [round(float(x), 6) for x in s], groups, scale,
                                companion_choice(stats[layer], k_l) if stats is not None else {}))
    return PrunePlan(method, layers, **meta)


def companion_choice(stats: LayerStats, k: int) -> dict[str, list[int]]:
    """Each companion expert set (JetMoE's MoA) keeps its ``k`` experts of largest routing mass sum_t w_e(x_t) on
    the calibration tokens (Chen et al. 2022's frequency, gate-weighted), in index order."""
    return {name: sorted(int(e) for e in sorted(range(len(mass)), key=lambda e: (-mass[e], e))[:k])
            for name, mass in stats.companions.items()}


def gate_output_scale(stats: LayerStats, groups: list[list[tuple[int, float]]]) -> float:
    """Output scale that keeps a top-1 (Switch) layer's FFN output magnitude after pruning.

    Switch routing multiplies the chosen expert's output by its gate g_top(x) = max_e softmax(h(x))_e. After
    pruning, the softmax runs over the k kept router rows only (a merged group's row is the weighted mean of
    its members' rows, so its logit is the same mean of theirs: the router has no bias), and g'_top grows,
    to exactly 1 at k = 1. The scale is mean_t g_top(x_t) / mean_t g'_top(x_t) over the calibration tokens:
    at k = 1 the layer's mean top-1 gate (from every calibration token), otherwise from the sampled router
    logit rows. Keeping every expert unmerged gives 1.
    """
    z = len(stats.counts)
    if len(groups) == 1:
        return float(stats.gate_sum.sum() / stats.tokens)
    if len(groups) == z and all(len(g) == 1 for g in groups):
        return 1.0
    h = stats.logit_matrix().astype(np.float64)
    if not len(h):
        return 1.0
    top_gate = lambda logits: float(softmax(logits, axis=1).max(1).mean())  # noqa: E731
    return top_gate(h) / top_gate(h @ group_mixing(groups, z))


def group_mixing(groups: list[list[tuple[int, float]]], num_experts: int) -> np.ndarray:
    """(num_experts, k) matrix whose column j holds group j's member weights normalised to sum to 1: the
    pruned router's row j is ``mixing[:, j] @ rows`` (a kept expert's own row, or a merged group's weighted mean)."""
    mix = np.zeros((num_experts, len(groups)))
    for j, group in enumerate(groups):
        total = sum(w for _, w in group)
        for e, w in group:
            mix[e, j] = w / total
    return mix
