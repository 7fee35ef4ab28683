"""The adapter protocol: how every stage of edgeprune sees an MoE layer, whatever the family.

Calibration, scoring, plans, prune / merge, fold, ``--ffn-keep``, recovery and export call only these
methods; no stage calls a family's own code. A family is one :class:`MoEAdapter` (usually a few attribute
values, sometimes an overridden method) in one file under ``edgeprune/models/families/``, registered in
:mod:`edgeprune.models.registry`.

What an adapter knows about one MoE block:

* where it is: :meth:`blocks` (by decoder / encoder layer index, found as instances of ``block_class``);
* its router: the module whose output is the router logits (``router_attr``, hooked by calibration) and
  every per-expert router parameter (weight rows, bias, score-correction bias: :meth:`router_keys`);
* its experts: one expert's tensors as a dict ``name -> tensor`` (:meth:`expert_tensors`), each name with a
  role (``expert_roles``): ``in`` (rows = hidden units: gate / up / W_in), ``in_bias``, ``out`` (columns =
  hidden units: down / W_out) and ``out_bias``. Merging (UNCURL's alignment), output scaling and neuron
  pruning work on roles, so gated and plain MLPs, ModuleLists and fused 3-D tensors look alike;
* its routing rule, from fp32 logits exactly as transformers computes it (:meth:`route`);
* how the config states the expert count and top-k (:meth:`resize_config`), and the dense sibling that a
  one-expert model folds into, if any (:meth:`fold`);
* an export-friendly forward (:meth:`export_forward`): every kept expert computed and combined with the
  routing weights, no data-dependent indexing (``torch.onnx.export`` cannot trace the families' own loops).
"""
from __future__ import annotations

import contextlib
import copy
import re
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from edgeprune.errors import ConfigError

ROLES = ("in", "in_bias", "out", "out_bias")
# experts silu(gate) * up as com.microsoft.MoE's swiglu computes them (see edgeprune.export.ort_moe)
SILU_GLU = {"activation": "swiglu", "alpha": 1.0, "beta": 0.0, "limit": float("inf")}
_LAYER = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class DenseSibling:
    """The dense family a one-expert model folds into: its config and classifier classes, the config keys of
    the MoE that the sibling does not have, config overrides computed from the MoE config, and the dense MLP's
    parameter name for each expert parameter (``expert_to_mlp``)."""

    config_class: type
    classifier_class: type
    expert_to_mlp: dict[str, str]
    mlp_path: Callable[[str], str]  # block path -> dense MLP path
    drop_keys: tuple[str, ...] = ()
    overrides: Callable[[dict], dict] = lambda cfg: {}
    # the dense model's FFN by layer, for --ffn-keep: {"layer": l -> MLP path (or "modules": model -> [MLP
    # paths]), "in": (in-projection names,), "out": out-projection name, "width": config key (intermediate_size)}
    extra_ffn: dict = field(default_factory=dict)


PADDED_KEY = "edgeprune_padded_experts"  # config.json: layer -> expert slots padded to one count (pruning/padding.py)


def padded_slots(config, layer: int) -> set[int]:
    """The expert slots of ``layer`` that pruning padded and the router never selects (none without padding)."""
    return set((getattr(config.get_text_config(), PADDED_KEY, None) or {}).get(str(layer), ()))


@dataclass(frozen=True)
class MoEAdapter:
    """One MoE family (see the module docstring). Defaults fit the Mixtral-style ModuleList block."""

    model_type: str
    block_class: type
    expert_roles: dict[str, str]
    num_experts_key: str
    router_attr: str = "gate"
    experts_attr: str = "experts"
    top_k_key: str = "num_experts_per_tok"
    renormalise: Callable[[nn.Module], bool] = lambda block: True
    dense: Optional[DenseSibling] = None
    fold_exact: str = ""  # how exact the fold is (shown by `edgeprune families`)
    heads: tuple[str, ...] = ("sequence-classification", "causal-lm")  # causal-lm: by label words
    uses_token_type_ids: bool = False
    # the experts' activation as ONNX Runtime's com.microsoft.MoE computes it (edgeprune.export.ort_moe), if it can
    ort_moe: Optional[dict] = None
    autocast_safe: bool = True  # the family's forward runs under bf16 autocast (recovery fine-tuning)
    runtime_top_k: bool = True  # a k > 1 export may read its routers' top-k from a graph input (export.runtime_top_k)
    ort_model_type: Optional[str] = None  # the ORT transformer optimizer's model type, where one fits
    note: str = ""
    extra: dict = field(default_factory=dict)
    # keyword arguments of the block's call that its routing reads besides the hidden states (DeepSeek-V4's hash
    # layers: input_ids); calibration records them per token and passes them to routing()
    routing_kwargs: ClassVar[tuple[str, ...]] = ()
    per_layer_counts: ClassVar[bool] = False  # the config stores an expert count per layer (BERT-MoE)

    # -- where the blocks are -------------------------------------------------------------------------------
    def block_paths(self, model: nn.Module) -> dict[int, str]:
        """State-dict path of every MoE block, by layer index."""
        out = {}
        for name, module in model.named_modules():
            if isinstance(module, self.block_class):
                m = _LAYER.search(name + ".")
                out[int(m.group(1)) if m else len(out)] = name
        return out

    def blocks(self, model: nn.Module) -> dict[int, nn.Module]:
        """MoE blocks by layer index: the one accessor calibration, pruning and export use."""
        return {l: model.get_submodule(p) for l, p in self.block_paths(model).items()}

    def router(self, block: nn.Module) -> nn.Module:
        """The module whose output is the router logits (a Linear for most families)."""
        return block.get_submodule(self.router_attr)

    def router_logits(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Router logits (T, Z) of tokens ``x`` (T, H) entering the block, as the family computes them."""
        return self.router(block)(x)

    def num_experts(self, block: nn.Module) -> int:
        return len(getattr(block, self.experts_attr))

    def top_k(self, block: nn.Module) -> int:
        return min(int(getattr(block, "top_k")), self.num_experts(block))

    def check_k(self, block: nn.Module, k: int) -> None:
        """Refuse (ConfigError) a k this family cannot keep; every k is fine by default."""

    # -- routing ----------------------------------------------------------------------------------------------
    def route(self, block: nn.Module, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k expert indices and their combination weights from router logits (T, Z), in fp32.
        Default: softmax -> top-k -> renormalise when ``renormalise(block)`` (Mixtral, Qwen-MoE)."""
        probs = F.softmax(logits.float(), dim=-1)
        weight, idx = torch.topk(probs, self.top_k(block), dim=-1)
        if self.renormalise(block):
            weight = weight / weight.sum(dim=-1, keepdim=True)
        return idx, weight

    def routing(self, block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logits, top_k_index, top_k_weights)`` of tokens ``x`` (T, H) entering the block: what calibration
        records. Default: :meth:`router_logits`, then :meth:`route` (the fused families call their own router)."""
        logits = self.router_logits(block, x).float()
        idx, weight = self.route(block, logits)
        return logits, idx, weight

    def routing_input(self, block: nn.Module) -> nn.Module:
        """The module whose input is the tokens the block routes (calibration hooks it): the block itself, except
        where the block is a whole decoder layer whose router reads a later residual (Gemma 4: its router)."""
        return block

    def expert_forward(self, block: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
        """Output of expert ``e`` on tokens ``x`` (T, H), before its routing weight."""
        return getattr(block, self.experts_attr)[e](x)

    def shared_forward(self, block: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Output of the block's shared expert(s), gate included (None for families without)."""
        return None

    def shared_tensors(self, state: dict, path: str) -> dict[str, torch.Tensor]:
        """An ungated shared expert beside the block at ``path``, named like the routed experts (``expert_roles``):
        the fold concatenates it with the one routed expert into one wider MLP (DeepSeek, Granite-MoE-Shared)."""
        return {}

    def fold_scale(self, block: nn.Module) -> float:
        """The constant weight of a one-expert layer (1 for softmax routing; DeepSeek's routed_scaling_factor),
        folded into the expert's output projection."""
        return 1.0

    # -- tensors in the state dict ---------------------------------------------------------------------------
    def router_keys(self, model: nn.Module, layer: int) -> list[str]:
        """State-dict keys of the per-expert router parameters of ``layer`` (expert axis 0)."""
        path = self.block_paths(model)[layer]
        router = self.router(model.get_submodule(path))
        return [f"{path}.{self.router_attr}.{n}" for n, _ in router.named_parameters()] + \
               [f"{path}.{self.router_attr}.{n}" for n, _ in router.named_buffers() if "bias" in n]

    def expert_tensors(self, state: dict, path: str, e: int) -> dict[str, torch.Tensor]:
        """Expert ``e`` of the block at ``path``: name -> tensor (names are ``expert_roles``' keys)."""
        return {n: state[f"{path}.{self.experts_attr}.{e}.{n}"] for n in self.expert_roles
                if f"{path}.{self.experts_attr}.{e}.{n}" in state}

    def set_expert_tensors(self, state: dict, path: str, e: int, tensors: dict[str, torch.Tensor]) -> None:
        for n, t in tensors.items():
            state[f"{path}.{self.experts_attr}.{e}.{n}"] = t

    # -- companions: other expert sets of the layer that share the config's expert count (JetMoE's MoA) --------
    def companions(self, model: nn.Module, block_path: str) -> dict[str, tuple[nn.Module, Callable]]:
        """name -> (module whose output is the companion's router logits (T, Z), logits -> (top-k index, weight)):
        calibration records each companion's routing mass, the plan keeps its top-k (``LayerPlan.companions``)."""
        return {}

    def prune_layer_state(self, src: dict, dst: dict, path: str, lp) -> None:
        """Write the rest of the layer's state that follows the plan ``lp`` into ``dst``, after its experts and router
        rows: each companion's kept experts (``lp.companions``: JetMoE's attention experts), a token-to-expert table
        renumbered for the kept experts (DeepSeek-V4's hash layers). Nothing by default."""

    # -- config --------------------------------------------------------------------------------------------
    def resize_config(self, config, k_per_layer: dict[int, int]) -> None:
        """Set the config's expert count to k (one value for every layer: the families store one) and top-k
        to min(top-k, k)."""
        ks = set(k_per_layer.values())
        if len(ks) != 1:
            raise ConfigError(f"{self.model_type} stores one expert count for all layers; the plan keeps "
                              f"{sorted(ks)}: use --experts K (the same k in every layer)")
        k = ks.pop()
        setattr(config, self.num_experts_key, k)
        setattr(config, self.top_k_key, min(int(getattr(config, self.top_k_key)), k))

    # -- export ------------------------------------------------------------------------------------------------
    def export_forward(self, block: nn.Module, hidden: torch.Tensor):
        """Dense dispatch: every expert computed, combined with a Z-wide weight matrix that is zero off the
        top-k (exactly the family's sum); with one expert the router is skipped (its weight is exactly 1)."""
        shape = hidden.shape
        flat = hidden.reshape(-1, shape[-1])
        z = self.num_experts(block)
        logits = self.router_logits(block, flat)
        if z == 1 and self.route_is_trivial(block):
            out = self.expert_forward(block, 0, flat)
        else:
            idx, weight = self.route(block, logits)
            w = torch.zeros(flat.shape[0], z, dtype=weight.dtype).scatter(-1, idx, weight).to(flat.dtype)
            out = sum(w[:, e : e + 1] * self.expert_forward(block, e, flat) for e in range(z))
        shared = self.shared_forward(block, flat)
        if shared is not None:
            out = out + shared
        return self.block_output(out.reshape(shape), logits)

    def route_is_trivial(self, block: nn.Module) -> bool:
        """True when a one-expert layer's weight is exactly 1 (softmax over one logit)."""
        return True

    def block_output(self, out: torch.Tensor, logits: torch.Tensor):
        """What the family's block returns (transformers' blocks return ``(hidden, router_logits)``)."""
        return out, logits

    @contextlib.contextmanager
    def export_patch(self, model: nn.Module) -> Iterator[nn.Module]:
        """Every block runs :meth:`export_forward` inside the block; undone on exit, whatever happens."""
        blocks = list(self.blocks(model).values())
        try:
            for b in blocks:
                b.forward = (lambda blk: (lambda hidden, *a, **kw: self.export_forward(blk, hidden)))(b)
            yield model
        finally:
            for b in blocks:
                b.__dict__.pop("forward", None)

    # -- fold ----------------------------------------------------------------------------------------------
    def fold(self, model: nn.Module) -> Optional[nn.Module]:
        """The dense sibling equal to ``model`` whose every MoE layer has one expert (None without sibling)."""
        if self.dense is None:
            return None
        paths = self.block_paths(model)
        if any(self.num_experts(model.get_submodule(p)) != 1 for p in paths.values()):
            raise ValueError("fold needs exactly one expert in every MoE layer")
        dense_cls = self.fold_class(model)
        dense_cfg = self.fold_config(model.config, dense_cls)
        dense = dense_cls(dense_cfg).to(model.dtype)
        src, dst = model.state_dict(), dense.state_dict()
        mapped = {}
        for layer, path in paths.items():
            mapped.update(self.fold_layer(src, path, model.get_submodule(path)))
        for key in dst:
            t = mapped.get(key, src.get(key))
            if t is None:
                raise ValueError(f"fold of {self.model_type}: no source for {key}")
            dst[key] = zero_pad(t, dst[key].shape, key)
        dense.load_state_dict(dst)
        return dense.eval()

    def fold_class(self, model: nn.Module) -> type:
        """The sibling's class for ``model``: its sequence classifier, or its language model (``...ForCausalLM``,
        transformers' Auto mapping) when ``model`` is one (the generation path keeps the LM head)."""
        if type(model).__name__.endswith("ForCausalLM"):
            from transformers import AutoModelForCausalLM

            try:
                return AutoModelForCausalLM._model_mapping[self.dense.config_class]
            except KeyError:
                raise ConfigError(f"{self.model_type}: transformers has no causal LM for the dense sibling "
                                  f"{self.dense.config_class.__name__}") from None
        return self.dense.classifier_class

    def fold_config(self, config, dense_cls: Optional[type] = None):
        """The dense sibling's config for a one-expert ``config``."""
        cfg = config.to_dict()
        for k in ("model_type", "architectures", "transformers_version", "auto_map", self.num_experts_key,
                  self.top_k_key) + self.dense.drop_keys:
            cfg.pop(k, None)
        cfg.update(self.dense.overrides(config.to_dict()))
        dense_cfg = self.dense.config_class(**cfg)
        dense_cfg.architectures = [(dense_cls or self.dense.classifier_class).__name__]
        return dense_cfg

    def fold_layer(self, state, path: str, block: nn.Module) -> dict[str, torch.Tensor]:
        """The dense MLP tensors of the one-expert block at ``path`` (the routed expert scaled by
        :meth:`fold_scale`, the shared experts' hidden units concatenated), by the sibling's state-dict keys."""
        mlp = self.dense.mlp_path(path)
        routed = scale_outputs(self, self.expert_tensors(state, path, 0), self.fold_scale(block))
        shared = self.shared_tensors(state, path)
        mapped = {}
        for n, t in routed.items():
            if n in shared:  # [routed | shared] hidden units: the sum of both MLPs
                t = torch.cat([t, shared[n]], dim=unit_axis(self.expert_roles[n]))
            mapped[f"{mlp}.{self.dense.expert_to_mlp[n]}"] = t
        return mapped


def topk_then_softmax(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k on the logits, then softmax over the k chosen (Granite-MoE, gpt-oss): indices and weights."""
    top, idx = logits.float().topk(k, dim=-1)
    return idx, torch.softmax(top, dim=-1)


def zero_pad(t: torch.Tensor, shape: torch.Size, key: str) -> torch.Tensor:
    """``t`` zero-padded at the end to ``shape`` (an MLP narrower than the sibling's single width: the extra
    hidden units have zero weights in and out, so the output is unchanged)."""
    if t.shape == shape:
        return t.clone()
    if len(t.shape) != len(shape) or any(a > b for a, b in zip(t.shape, shape)) or ".mlp." not in f".{key}":
        raise ValueError(f"fold: {key} has shape {tuple(t.shape)}, the dense sibling {tuple(shape)}")
    out = torch.zeros(shape, dtype=t.dtype)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


def scale_outputs(adapter: MoEAdapter, tensors: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """Multiply an expert's output projection (and its bias) by ``scale``."""
    if scale == 1.0:
        return tensors
    return {n: t * scale if adapter.expert_roles[n] in ("out", "out_bias") else t for n, t in tensors.items()}


def unit_axis(role: str) -> Optional[int]:
    """Axis of an expert tensor that indexes hidden units (None for the output bias)."""
    return {"in": 0, "in_bias": 0, "out": 1, "out_bias": None}[role]


def clone_model(model: nn.Module, config) -> nn.Module:
    """A new, randomly initialised model of the same class and dtype with ``config``."""
    new = type(model)(copy.deepcopy(config))
    return new.to(next(model.parameters()).dtype).eval()
