"""What the TorchScript exporter (``torch.onnx.export(dynamo=False)``) cannot take in transformers 5 models, replaced
while exporting by equivalents that compute the same numbers (:func:`exportable`); each is undone on exit.

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
  :func:`normalise_transposes` rewrites the exported file.
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


@contextlib.contextmanager
def scalar_scatter() -> Iterator[None]:
    """``t.scatter(dim, index, <python scalar>)`` as ``t.scatter(dim, index, full_like(index, scalar))``."""
    original = torch.Tensor.scatter

    def scatter(self, dim, index, src=None, *args, **kw):
        if isinstance(src, bool) and not args and not kw:  # a bool scalar fails in full_like too
            src = (torch.ones_like if src else torch.zeros_like)(index, dtype=self.dtype)
        elif isinstance(src, (int, float)) and not args and not kw:
            src = torch.full_like(index, src, dtype=self.dtype)
        return original(self, dim, index, src, *args, **kw)

    torch.Tensor.scatter = scatter
    try:
        yield
    finally:
        torch.Tensor.scatter = original


@contextlib.contextmanager
def expanded_repeat_interleave() -> Iterator[None]:
    """``repeat_interleave(x, r, dim)`` (function or method) with an int ``r`` as unsqueeze, expand and flatten.
    Traced, the original's ONNX ``Tile`` kept the example's batch size (Qwen3-Next's gated delta rule at batch 1
    failed), and its symbolic rewrote a ``-1`` constant that the trace shares with other nodes into a positive axis
    for its own rank, so that a router's ``topk(dim=-1)`` was written with an axis past its tensor's rank
    (Cohere2-MoE's and ERNIE 4.5's interleaved rotary embedding; ONNX Runtime refused the graph)."""
    originals = torch.repeat_interleave, torch.Tensor.repeat_interleave

    def repeat_interleave(self, repeats, dim=None, *args, **kw):
        if isinstance(repeats, torch.Tensor) and repeats.dim() == 0:  # a ratio of head counts read from shapes
            repeats = int(repeats)
        if isinstance(repeats, int) and dim is not None and not args and not kw:
            d = dim % self.dim()
            shape = list(self.shape)
            return self.unsqueeze(d + 1).expand(*shape[: d + 1], repeats, *shape[d + 1 :]).flatten(d, d + 1)
        return originals[1](self, repeats, dim, *args, **kw)

    torch.repeat_interleave = torch.Tensor.repeat_interleave = repeat_interleave
    try:
        yield
    finally:
        torch.repeat_interleave, torch.Tensor.repeat_interleave = originals


@contextlib.contextmanager
def sliced_tensor_split() -> Iterator[None]:
    """``torch.tensor_split(x, [i, j, ...], dim)`` as slices ``x[..., :i]``, ``x[..., i:j]``, ...: traced, the
    original's ONNX graph (``Tile`` over the split sizes) failed at other lengths (Qwen3-Next's linear attention)."""
    original = torch.tensor_split

    def tensor_split(x, indices, dim=0):
        if not isinstance(indices, (list, tuple)):
            return original(x, indices, dim)
        d = dim % x.dim()
        bounds = [0, *indices, None]
        return tuple(x[(slice(None),) * d + (slice(a, b),)] for a, b in zip(bounds, bounds[1:]))

    torch.tensor_split = tensor_split
    try:
        yield
    finally:
        torch.tensor_split = original


@contextlib.contextmanager
def integer_cumsum() -> Iterator[None]:
    """``cumsum`` of a bool tensor as a cumsum of its int64 cast (what PyTorch returns anyway): ONNX's ``CumSum``
    takes no bool input (Llama 4's attention-chunk mask)."""
    originals = torch.cumsum, torch.Tensor.cumsum

    def cumsum(x, dim, *args, **kw):
        return originals[0](x.long() if x.dtype == torch.bool else x, dim, *args, **kw)

    torch.cumsum, torch.Tensor.cumsum = cumsum, cumsum
    try:
        yield
    finally:
        torch.cumsum, torch.Tensor.cumsum = originals


@contextlib.contextmanager
def export_branches(model: nn.Module) -> Iterator[None]:
    """``is_torchdynamo_exporting()`` answers True in the modeling modules of the model's own classes."""
    modules = {sys.modules[type(m).__module__] for m in model.modules()
               if type(m).__module__.startswith("transformers.models.")}
    patched = [m for m in modules if hasattr(m, "is_torchdynamo_exporting")]
    saved = {m: m.is_torchdynamo_exporting for m in patched}
    for m in patched:
        m.is_torchdynamo_exporting = lambda: True
    try:
        yield
    finally:
        for m, f in saved.items():
            m.is_torchdynamo_exporting = f


def dsa_indexers(model: nn.Module) -> list[nn.Module]:
    """DeepSeek sparse attention indexers (modules with ``index_topk``) of the model."""
    return [m for m in model.modules() if type(m).__name__.endswith("Indexer") and hasattr(m, "index_topk")]


def check_dsa_length(model: nn.Module, max_length: int) -> None:
    """The artifact takes up to ``max_length`` tokens: with more than ``index_topk`` keys the indexer would drop
    some, which the exported graph (every key) does not: refuse with one line."""
    from edgeprune.errors import ConfigError

    for m in dsa_indexers(model):
        if max_length > m.index_topk:
            raise ConfigError(f"{model.config.model_type}: sparse attention keeps {m.index_topk} keys per query and the "
                              f"artifact would take {max_length} tokens; use --max-length {m.index_topk} or less")


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


def normalise_transposes(path) -> int:
    """Transpose nodes whose ``perm`` has negative entries (the exporter writes ``permute(0, -2, -1, 1)`` as it is:
    Mamba layers) get ``perm[i] + rank``, the rank being the perm's length: ONNX Runtime refuses a negative perm.
    Returns how many were rewritten (the file is rewritten only then)."""
    import onnx

    model = onnx.load(str(path))
    fixed = 0
    for node in model.graph.node:
        for attr in node.attribute:
            if node.op_type == "Transpose" and attr.name == "perm" and any(p < 0 for p in attr.ints):
                perm = [p + len(attr.ints) if p < 0 else p for p in attr.ints]
                del attr.ints[:]
                attr.ints.extend(perm)
                fixed += 1
    if fixed:
        onnx.save(model, str(path))
    return fixed


@contextlib.contextmanager
def exportable(model: nn.Module) -> Iterator[None]:
    """All of the above while exporting ``model``."""
    rms_norm_symbolic()
    with scalar_scatter(), expanded_repeat_interleave(), sliced_tensor_split(), integer_cumsum(), export_branches(model), dsa_every_key(model):
        yield
