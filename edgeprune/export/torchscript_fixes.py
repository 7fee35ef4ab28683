"""What the TorchScript exporter (``torch.onnx.export(dynamo=False)``) cannot take in transformers 5 models, replaced
while exporting by equivalents that compute the same numbers (:func:`exportable`); each is undone on exit. A fix
is a list of (owner, attribute, replacement); the replacement calls the original, bound when the module is imported.

* ``aten::rms_norm`` (``torch.nn.functional.rms_norm``, used by e.g. Ergo's norms) has no ONNX symbolic at opset 17:
  :func:`rms_norm_symbolic` writes it as ``x * 1 / sqrt(mean(x^2) + eps) * weight`` (RMSNorm, Zhang & Sennrich 2019),
  registered once.
* ``Tensor.scatter(dim, index, value)`` with a Python scalar value fails the tracer's alias analysis (DeepSeek sparse
  attention's index mask): :func:`scalar_scatter` passes the value as a tensor shaped like the index (``ScatterElements``).
* ``repeat_interleave(x, r, dim)`` traced to a ``Tile`` that kept the example's batch size (Qwen3-Next's gated delta
  rule), and its symbolic rewrote a shared ``-1`` constant, which put other nodes' axes past their rank (Cohere2-MoE,
  ERNIE 4.5, Ergo routers' TopK): :func:`expanded_repeat_interleave` writes it as unsqueeze, expand, flatten.
* ``torch.tensor_split(x, [i], dim)`` traced to a ``Tile`` over split sizes that failed at other lengths (Qwen3-Next
  splits its sequence so): :func:`sliced_tensor_split` writes slices.
* ``cumsum`` of a bool tensor (Llama 4's chunked-attention mask) has no ONNX form: :func:`integer_cumsum` casts
  it to int64 first (PyTorch's result type).
* ``permute`` with negative dims is written as a negative ``perm``, which ONNX Runtime refuses (Mamba layers):
  :func:`positive_permute` passes the dims counted from the front.
* ``Tensor.unfold(dim, size, 1)`` has no ONNX export when the input's size is not static (Inkling 2's short
  convolution): :func:`sliced_unfold` stacks ``size`` slices.
* Families that ask ``is_torchdynamo_exporting()`` to take an export-friendly branch (the gated delta rule of
  Qwen3-Next / LaraMini builds its triangular inverse by forward substitution there instead of
  ``torch.linalg.solve_triangular``, which has no ONNX export): :func:`export_branches` answers True in the
  model's own modeling modules.
* DeepSeek sparse attention (DSA: DeepSeek-V3.2, GLM-MoE-DSA, HY-V4, AXK-2): its indexer keeps the ``index_topk``
  keys of highest index score per query, and with at most ``index_topk`` keys it keeps every key (the mask it builds
  is all zeros), while the traced ``min(index_topk, T)`` would freeze the example's length. :func:`dsa_every_key`
  makes the indexer return every key while exporting, which is exact for sequences up to ``index_topk`` tokens;
  longer exported sequences are refused (the artifact's maximum length is checked against it).
"""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator
from unittest import mock

import torch
from torch import nn

_REGISTERED = False


def rms_norm_symbolic() -> None:
    """Register an ONNX symbolic for ``aten::rms_norm`` at opset 17 and up (once per process)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from torch.onnx import register_custom_op_symbolic, symbolic_helper

    @symbolic_helper.parse_args("v", "is", "v", "f")
    def rms_norm(g, x, normalized_shape, weight, eps):
        axes = list(range(-len(normalized_shape), 0))
        eps = torch.finfo(torch.float32).eps if eps is None else eps
        mean = g.op("ReduceMean", g.op("Mul", x, x), axes_i=axes, keepdims_i=1)
        denom = g.op("Sqrt", g.op("Add", mean, g.op("Constant", value_t=torch.tensor(eps, dtype=torch.float32))))
        out = g.op("Div", x, denom)
        return out if symbolic_helper._is_none(weight) else g.op("Mul", out, weight)

    register_custom_op_symbolic("aten::rms_norm", rms_norm, 17)
    _REGISTERED = True


def scalar_scatter(original=torch.Tensor.scatter):
    """``t.scatter(dim, index, <python scalar>)`` as ``t.scatter(dim, index, full_like(index, scalar))``."""
    def scatter(self, dim, index, src=None, *args, **kw):
        if isinstance(src, bool) and not args and not kw:  # a bool scalar fails in full_like too
            src = (torch.ones_like if src else torch.zeros_like)(index, dtype=self.dtype)
        elif isinstance(src, (int, float)) and not args and not kw:
            src = torch.full_like(index, src, dtype=self.dtype)
        return original(self, dim, index, src, *args, **kw)

    return [(torch.Tensor, "scatter", scatter)]


def expanded_repeat_interleave(original=torch.Tensor.repeat_interleave):
    """``repeat_interleave(x, r, dim)`` (function or method) with an int ``r`` as unsqueeze, expand and flatten.
    Traced, the original's ONNX ``Tile`` kept the example's batch size (Qwen3-Next's gated delta rule at batch 1
    failed), and its symbolic rewrote a ``-1`` constant that the trace shares with other nodes into a positive axis
    for its own rank, so that a router's ``topk(dim=-1)`` was written with an axis past its tensor's rank
    (Cohere2-MoE's and ERNIE 4.5's interleaved rotary embedding; ONNX Runtime refused the graph)."""
    def repeat_interleave(self, repeats, dim=None, *args, **kw):
        if isinstance(repeats, torch.Tensor) and repeats.dim() == 0:  # a ratio of head counts read from shapes
            repeats = int(repeats)
        if isinstance(repeats, int) and dim is not None and not args and not kw:
            d = dim % self.dim()
            shape = list(self.shape)
            return self.unsqueeze(d + 1).expand(*shape[: d + 1], repeats, *shape[d + 1 :]).flatten(d, d + 1)
        return original(self, repeats, dim, *args, **kw)

    return [(torch, "repeat_interleave", repeat_interleave), (torch.Tensor, "repeat_interleave", repeat_interleave)]


def sliced_tensor_split(original=torch.tensor_split):
    """``torch.tensor_split(x, [i, j, ...], dim)`` as slices ``x[..., :i]``, ``x[..., i:j]``, ...: traced, the
    original's ONNX graph (``Tile`` over the split sizes) failed at other lengths (Qwen3-Next's linear attention)."""
    def tensor_split(x, indices, dim=0):
        if not isinstance(indices, (list, tuple)):
            return original(x, indices, dim)
        d = dim % x.dim()
        bounds = [0, *indices, None]
        return tuple(x[(slice(None),) * d + (slice(a, b),)] for a, b in zip(bounds, bounds[1:]))

    return [(torch, "tensor_split", tensor_split)]


def integer_cumsum(original=torch.cumsum):
    """``cumsum`` of a bool tensor as a cumsum of its int64 cast (what PyTorch returns anyway): ONNX's ``CumSum``
    takes no bool input (Llama 4's attention-chunk mask)."""
    def cumsum(x, dim, *args, **kw):
        return original(x.long() if x.dtype == torch.bool else x, dim, *args, **kw)

    return [(torch, "cumsum", cumsum), (torch.Tensor, "cumsum", cumsum)]


def positive_permute(original=torch.Tensor.permute):
    """``permute`` with negative dims as their positive equals: the exporter writes a negative ``perm`` as it is,
    which ONNX Runtime refuses (Mamba layers' ``permute(0, -2, -1, 1)``)."""
    def permute(self, *dims):
        dims = dims[0] if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else dims
        return original(self, [d % self.dim() for d in dims])

    return [(torch.Tensor, "permute", permute), (torch, "permute", permute)]


def sliced_unfold(original=torch.Tensor.unfold):
    """``x.unfold(dim, size, 1)`` (sliding windows of ``size`` along ``dim``, step 1) as ``size`` slices stacked on a
    new last axis, ``x[i : n - size + 1 + i]``, each end counted from the back so that any length works: the
    original has no ONNX export without a static input size (Inkling 2's short convolution)."""
    def unfold(self, dimension, size, step):
        if step != 1:
            return original(self, dimension, size, step)
        d = dimension % self.dim()
        cut = [(slice(None),) * d + (slice(i, i - size + 1 or None),) for i in range(size)]
        return torch.stack([self[c] for c in cut], dim=-1)

    return [(torch.Tensor, "unfold", unfold)]


def export_branches(model: nn.Module):
    """``is_torchdynamo_exporting()`` answers True in the modeling modules of the model's own classes."""
    modules = {sys.modules[type(m).__module__] for m in model.modules()
               if type(m).__module__.startswith("transformers.models.")}
    return [(m, "is_torchdynamo_exporting", lambda: True) for m in modules if hasattr(m, "is_torchdynamo_exporting")]


# indexers that pick among compressed entries, not keys (DeepSeek-V4's CSA): their family exports at one fixed shape,
# where the traced min(index_topk, entries) is the right constant, so they are left as they are
NOT_DSA = ("DeepseekV4Indexer",)


def dsa_indexers(model: nn.Module) -> list[nn.Module]:
    """DeepSeek sparse attention indexers (modules with ``index_topk`` that pick keys) of the model."""
    return [m for m in model.modules() if type(m).__name__.endswith("Indexer") and hasattr(m, "index_topk")
            and type(m).__name__ not in NOT_DSA]


def check_dsa_length(model: nn.Module, max_length: int) -> None:
    """The artifact takes up to ``max_length`` tokens: with more than ``index_topk`` keys the indexer would drop
    some, which the exported graph (every key) does not: refuse with one line."""
    from edgeprune.errors import ConfigError

    for m in dsa_indexers(model):
        if max_length > m.index_topk:
            raise ConfigError(f"{model.config.model_type}: sparse attention keeps {m.index_topk} keys per query and the "
                              f"artifact would take {max_length} tokens (the task's max_length, or a fixed-shape target's "
                              f"[export].sequence_length); keep it at {m.index_topk} or less")


@contextlib.contextmanager
def dsa_every_key(model: nn.Module) -> Iterator[None]:
    """Every DSA indexer returns all key positions (exact up to ``index_topk`` keys, see the module docstring)."""
    indexers = dsa_indexers(model)

    def every_key(hidden_states, *args, **kw):
        b, s = hidden_states.shape[:2]
        return torch.arange(s, dtype=torch.int32).expand(b, s, s)

    for m in indexers:
        m.forward = every_key
    try:
        yield
    finally:
        for m in indexers:
            m.__dict__.pop("forward", None)


@contextlib.contextmanager
def exportable(model: nn.Module) -> Iterator[None]:
    """All of the above while exporting ``model``: each replacement (owner, attribute, new) put in place with
    ``unittest.mock.patch.object`` and undone on exit."""
    rms_norm_symbolic()
    replacements = (scalar_scatter() + expanded_repeat_interleave() + sliced_tensor_split() + integer_cumsum()
                    + positive_permute() + sliced_unfold() + export_branches(model))
    with contextlib.ExitStack() as stack:
        for owner, name, new in replacements:
            stack.enter_context(mock.patch.object(owner, name, new))
        stack.enter_context(dsa_every_key(model))
        yield
