"""The common MoE layout of transformers 5, described as data: :class:`FusedAdapter`.

In transformers 5 almost every MoE family has the same parts (``transformers.integrations.moe``):

* an ``experts`` module decorated with ``use_experts_implementation``: 3-D ``gate_up_proj`` [E, 2I, H] (gate rows,
  then up rows; ``is_concatenated=False``: interleaved g0, u0, g1, ...; ``is_transposed``: [E, H, 2I]) or ``up_proj``
  without a gate (``has_gate=False``), ``down_proj`` [E, H, I] ([E, I, H] transposed), biases beside when
  ``has_bias``; its ``_apply_gate`` / ``act_fn`` is the activation; its forward takes
  ``(hidden (T, H), top_k_index (T, k), top_k_weights (T, k))``;
* a router module (``gate`` or ``router``) that returns ``(router_logits, top_k_weights, top_k_index)``: the
  family's routing rule (softmax then top-k, top-k then softmax, ``norm_topk_prob``, sigmoid with a correction bias
  and group-limited top-k, routed scaling factor) is its own code, which edgeprune calls rather than re-implements.

So a family on this layout is a few values (:func:`fused_family`): the router's attribute, the config keys of the
expert count and top-k, the layout flags (checked against the modules: a mismatch is refused, never guessed), its
shared expert, the dense sibling a one-expert model folds into. Everything else is here, once:

* routing (:meth:`FusedAdapter.routing`): the router's own forward, so calibration sees the family's exact choice
  and weights (REAP, Chen's alpha) and its logits (UNCURL, frequency of softmax);
* one expert's tensors in the Linear layout (gate / up rows = hidden units, down columns = hidden units), whatever
  the storage (transposed, interleaved, biases): merging, scaling, neuron pruning and folds work on roles;
* export (:meth:`FusedAdapter.export_patch`): only the experts' forward is replaced, by dense dispatch (every kept
  expert computed by its two matmuls and combined with a [T, E] weight matrix summed from the router's
  top-k), so the router, shared experts and everything else in the block run as the family wrote them and the
  graph has no data-dependent loop (``torch.onnx.export`` cannot trace the families' own expert loops).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from edgeprune.errors import ConfigError, ModelError
from edgeprune.models.adapter import _LAYER, MoEAdapter, padded_slots

# one expert's tensors in the Linear layout, by role (an ungated family has no "gate"; biases only with has_bias)
FUSED_ROLES = {"gate": "in", "up": "in", "gate_bias": "in_bias", "up_bias": "in_bias", "down": "out",
               "down_bias": "out_bias"}
MLP_NAMES = {"gate": "gate_proj.weight", "up": "up_proj.weight", "down": "down_proj.weight"}
LAYOUT_FLAGS = ("has_gate", "has_bias", "is_transposed", "is_concatenated")
COMMON_LAYOUT = {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True}


class FusedAdapter(MoEAdapter):
    """A transformers 5 family on the common fused layout (see the module docstring); ``extra`` holds its data:
    ``layout`` (the flags), ``router_args`` (block attributes the router takes after the hidden states),
    ``router_3d`` (the router reads (batch, seq, hidden), not tokens), ``fixed_shapes`` (what in the family traces
    only at one shape, e.g. "Mamba layers": the build exports it at batch 1 x max length),
    ``shared`` (an ungated shared expert's path in the block, for the fold), ``fold_scale`` and ``check_k``."""

    # -- where the blocks are ---------------------------------------------------------------------------------
    def block_paths(self, model: nn.Module) -> dict[int, str]:
        out = {}
        for name, module in model.named_modules():
            if self.is_block(module):
                m = _LAYER.search(name + ".")
                out[int(m.group(1)) if m else len(out)] = name
        return out

    def is_block(self, module: nn.Module) -> bool:
        if self.block_class is not None:
            return isinstance(module, self.block_class)
        experts = getattr(module, self.experts_attr, None)
        return (isinstance(experts, nn.Module) and getattr(experts, "down_proj", None) is not None
                and getattr(experts.down_proj, "dim", lambda: 0)() == 3 and self._router_of(module) is not None)

    def _router_of(self, block: nn.Module) -> Optional[nn.Module]:
        try:
            return block.get_submodule(self.router_attr)
        except AttributeError:
            return None

    def blocks(self, model: nn.Module) -> dict[int, nn.Module]:
        blocks = super().blocks(model)
        for b in blocks.values():
            self.check_layout(b)
        return blocks

    @property
    def layout(self) -> dict:
        return {**COMMON_LAYOUT, **self.extra.get("layout", {})}

    def check_layout(self, block: nn.Module) -> None:
        """The declared layout must be the module's: a family whose storage changed is refused, not guessed."""
        ex = getattr(block, self.experts_attr)
        seen = {f: getattr(ex, f) for f in LAYOUT_FLAGS if hasattr(ex, f)}
        wrong = {f: v for f, v in seen.items() if self.layout[f] != v}
        if wrong:
            raise ModelError(f"{self.model_type}: its experts are stored as {wrong}, the adapter declares "
                             f"{ {f: self.layout[f] for f in wrong} }; this transformers version changed the family's "
                             "layout: please report it")

    # -- routing: the family's own router ---------------------------------------------------------------------
    def _router_out(self, block: nn.Module, x: torch.Tensor):
        """The router's own forward on tokens ``x`` (T, H): with the block attributes it takes (None where the block
        has not got one: LFM2-MoE without an expert bias), as (1, T, H) for routers that read a batch (AFMoE)."""
        args = [getattr(block, a, None) for a in self.extra.get("router_args", ())]
        return self.router(block)(x.unsqueeze(0) if self.extra.get("router_3d") else x, *args)

    def router_logits(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self._router_out(block, x)[0].float()

    def routing(self, block: nn.Module, x: torch.Tensor):
        """``(logits, top_k_index, top_k_weights)`` of tokens ``x`` (T, H), exactly as the family routes."""
        logits, weight, idx = self._router_out(block, x)[:3]
        return logits.float(), idx, weight.float()

    def route(self, block, logits):
        raise NotImplementedError(f"{self.model_type} routes from the hidden states: use routing(block, x)")

    def num_experts(self, block: nn.Module) -> int:
        return int(getattr(block, self.experts_attr).down_proj.shape[0])

    def top_k(self, block: nn.Module) -> int:
        k = getattr(self.router(block), "top_k", None) or getattr(block, "top_k")
        return min(int(k), self.num_experts(block))

    def check_k(self, block, k):
        check = self.extra.get("check_k")
        if check:
            check(self, block, k)

    def fold_scale(self, block):
        scale = self.extra.get("fold_scale")
        return float(scale(block)) if scale else 1.0

    # -- one expert in the Linear layout ----------------------------------------------------------------------
    def _split(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """gate and up halves of a fused row block (axis 0 in the Linear layout)."""
        if self.layout["is_concatenated"]:
            return t.chunk(2, dim=0)
        return t[0::2], t[1::2]

    def _join(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.layout["is_concatenated"]:
            return torch.cat([gate, up], dim=0)
        return torch.stack([gate, up], dim=1).reshape(-1, *gate.shape[1:])

    def expert_tensors(self, state, path, e):
        lay, pre = self.layout, f"{path}.{self.experts_attr}."
        t_ = (lambda t: t.T) if lay["is_transposed"] else (lambda t: t)
        first = "gate_up_proj" if lay["has_gate"] else "up_proj"
        w_in, w_out = t_(state[pre + first][e]), t_(state[pre + "down_proj"][e])
        out = {"down": w_out}
        if lay["has_gate"]:
            out["gate"], out["up"] = self._split(w_in)
        else:
            out["up"] = w_in
        if lay["has_bias"]:
            b_in = state[pre + first + "_bias"][e]
            if lay["has_gate"]:
                out["gate_bias"], out["up_bias"] = self._split(b_in)
            else:
                out["up_bias"] = b_in
            out["down_bias"] = state[pre + "down_proj_bias"][e]
        return out

    def set_expert_tensors(self, state, path, e, t):
        lay, pre = self.layout, f"{path}.{self.experts_attr}."
        t_ = (lambda x: x.T) if lay["is_transposed"] else (lambda x: x)
        first = "gate_up_proj" if lay["has_gate"] else "up_proj"
        state[pre + first][e] = t_(self._join(t["gate"], t["up"]) if lay["has_gate"] else t["up"])
        state[pre + "down_proj"][e] = t_(t["down"])
        if lay["has_bias"]:
            state[pre + first + "_bias"][e] = self._join(t["gate_bias"], t["up_bias"]) if lay["has_gate"] else t["up_bias"]
            state[pre + "down_proj_bias"][e] = t["down_bias"]

    def expert_forward(self, block, e, x):
        return self.all_experts(getattr(block, self.experts_attr), x, [e])[0]

    @staticmethod
    def all_experts(ex: nn.Module, x: torch.Tensor, which=None) -> torch.Tensor:
        """Outputs (len(which), T, H) of the experts ``which`` (all by default) on tokens ``x`` (T, H), before their
        routing weights, with the family's own activation (``_apply_gate`` / ``act_fn``)."""
        gated = getattr(ex, "has_gate", True)
        tr, bias = getattr(ex, "is_transposed", False), getattr(ex, "has_bias", False)
        w1, w2 = (ex.gate_up_proj if gated else ex.up_proj), ex.down_proj
        outs = []
        for e in (range(w2.shape[0]) if which is None else which):
            h = x @ w1[e] if tr else x @ w1[e].T
            if bias:
                h = h + (ex.gate_up_proj_bias if gated else ex.up_proj_bias)[e]
            h = (ex._apply_gate(h) if hasattr(ex, "_apply_gate") else glu(ex.act_fn, h)) if gated else ex.act_fn(h)
            out = h @ w2[e] if tr else h @ w2[e].T
            if bias:
                out = out + ex.down_proj_bias[e]
            if getattr(ex, "has_post_expert_norm", False):
                out = ex.post_expert_norm(out)
            outs.append(out)
        return torch.stack(outs)

    # -- the state dict: per-expert router rows ---------------------------------------------------------------
    def router_keys(self, model, layer):
        """The router's parameters and buffers with one row per expert, and the block's own (a correction bias kept
        on the block: MiniMax-M2, LFM2-MoE)."""
        path = self.block_paths(model)[layer]
        block = model.get_submodule(path)
        z = self.num_experts(block)
        keys = [f"{path}.{self.router_attr}.{n}" for n, t in
                list(self.router(block).named_parameters()) + list(self.router(block).named_buffers())
                if t.dim() >= 1 and t.shape[0] == z]
        own = list(block.named_parameters(recurse=False)) + list(block.named_buffers(recurse=False))
        return keys + [f"{path}.{n}" for n, t in own if t.dim() >= 1 and t.shape[0] == z]

    def shared_tensors(self, state, path):
        shared = self.extra.get("shared")
        if not shared:
            return {}
        return {n: state[f"{path}.{shared}.{m}"] for n, m in MLP_NAMES.items()}

    # -- config -----------------------------------------------------------------------------------------------
    def resize_config(self, config, k_per_layer):
        before = getattr(config, self.num_experts_key)
        super().resize_config(config, k_per_layer)
        after = getattr(config, self.num_experts_key)
        if after != before:  # a group limit needs the full, equal groups: a pruned layer routes without it
            for key in self.extra.get("group_keys", ()):
                if hasattr(config, key):
                    setattr(config, key, 1)

    # -- export: dense dispatch in the experts module only ----------------------------------------------------
    @contextlib.contextmanager
    def experts_patch(self, model: nn.Module, make: Callable) -> Iterator[nn.Module]:
        """Every block's experts run ``make(block, experts)(hidden, top_k_index, top_k_weights)``; undone on exit."""
        blocks = list(self.blocks(model).values())
        mods = [getattr(b, self.experts_attr) for b in blocks]
        try:
            for b, ex in zip(blocks, mods):
                ex.forward = make(b, ex)
            yield model
        finally:
            for ex in mods:
                ex.__dict__.pop("forward", None)

    def export_patch(self, model):
        layers = {id(b): layer for layer, b in self.blocks(model).items()}

        def make(block, ex):
            skip = padded_slots(model.config, layers[id(block)])  # padded experts are never selected: not computed

            def forward(hidden, idx, weight):
                if ex.down_proj.shape[0] == 1:
                    weight = self.one_expert_weight(block, hidden, weight)
                return dense_dispatch(ex, hidden, idx, weight, skip)
            return forward
        return self.experts_patch(model, make)

    def one_expert_weight(self, block: nn.Module, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """A one-expert layer's weight without 0/0. Routers that renormalise sigmoid scores (Flint, Laguna, Kolibri:
        ``s / sum(s) * c``) give ``c`` for one expert, except where the score underflows to 0 and the division gives
        NaN (ONNX Runtime's Sigmoid is 0 below about -20, PyTorch's below about -88). Where the weight is NaN it is
        replaced by the router's own weight at the zero vector (logit 0: no underflow), which for such a router is
        that constant ``c`` (its limit); routers that do not divide give no NaN and are unchanged. Exact."""
        at_zero = self._router_out(block, hidden.new_zeros(1, hidden.shape[-1]))[1].reshape(1, -1)
        return torch.where(torch.isnan(weight), at_zero.to(weight.dtype), weight)


def glu(act, h: torch.Tensor) -> torch.Tensor:
    """``act(gate) * up`` of a concatenated gate / up output (experts without ``_apply_gate``: Gemma 4)."""
    gate, up = h.chunk(2, dim=-1)
    return act(gate) * up


def dense_dispatch(ex: nn.Module, hidden: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor,
                   skip=()) -> torch.Tensor:
    """Every expert on every token, combined with a (T, E) weight matrix that is zero off the top-k: exactly the
    family's sum, with no data-dependent indexing. The matrix sums one-hot rows of the routed indices times their
    weights, so an expert named twice for a token counts twice, as the families' own expert loops do (DeepSeek-V4's
    hash table, all zeros in a fresh checkpoint, names expert 0 twice); a top-k never repeats one. One 2-D matmul
    pair per expert (unrolled when traced), so that ONNX Runtime's quantizers see plain MatMuls with 2-D weights.
    ``skip``: experts whose weight is always 0 (padded slots, :mod:`edgeprune.pruning.padding`), not computed."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    z = ex.down_proj.shape[0]
    w = (F.one_hot(idx.reshape(flat.shape[0], -1), z).to(weight.dtype) * weight.reshape(flat.shape[0], -1, 1)).sum(1)
    out = sum(w[:, e : e + 1].to(flat.dtype) * FusedAdapter.all_experts(ex, flat, [e])[0]
              for e in range(z) if e not in skip)
    return out.reshape(hidden.shape).to(hidden.dtype)


def fused_family(model_type: str, num_experts_key: str = "num_local_experts", router_attr: str = "gate",
                 layout: Optional[dict] = None, cls: type = None, **kw) -> FusedAdapter:
    """A family on the common layout, as data. ``kw``: any :class:`~edgeprune.models.adapter.MoEAdapter` field
    (dense, heads, ort_moe, fold_exact, note, ...) and the ``extra`` data keys (router_args, shared, fold_scale,
    check_k, group_keys, router_3d, fixed_shapes); ``cls``: a subclass where the family needs code beside the data."""
    extra = {k: kw.pop(k) for k in ("router_args", "router_3d", "shared", "fold_scale", "check_k", "group_keys",
                                    "fixed_shapes") if k in kw}
    extra["layout"] = layout or {}
    return (cls or FusedAdapter)(model_type=model_type, block_class=kw.pop("block_class", None), expert_roles=FUSED_ROLES,
                        num_experts_key=num_experts_key, router_attr=router_attr, extra=extra, **kw)


class NeedsTwo:
    """A ``check_k`` for a family that cannot keep one expert per layer: refuses k < 2 with "<model_type> <why>; use
    --experts 2 or more"; ``fold`` says why in the families listing."""

    def __init__(self, why: str, fold: str):
        self.why, self.fold = why, fold

    def __call__(self, adapter, block, k):
        if k < 2:
            raise ConfigError(f"{adapter.model_type} {self.why}; use --experts 2 or more")


def refuse_one_expert_without_norm(adapter, block, k):
    """DeepSeek-V3-style routers: one expert's weight sigmoid(logit) is constant only with ``norm_topk_prob``."""
    if k == 1 and not adapter.router(block).norm_topk_prob:
        raise ConfigError(f"{adapter.model_type} without norm_topk_prob cannot keep one expert: its weight "
                          "sigmoid(logit) is not constant and its class cannot route one expert; use --experts 2")


__all__ = ["FusedAdapter", "NeedsTwo", "fused_family", "dense_dispatch", "FUSED_ROLES", "MLP_NAMES"]
