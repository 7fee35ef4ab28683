"""Top-k at run time: a k > 1 artifact whose routers read their top-k from the graph input ``top_k``.

llama.cpp users lower the number of active experts per token for speed (``--override-kv
<arch>.expert_used_count=int:N``); an edgeprune artifact offers the same: every MoE router's ``TopK`` takes its K
from the int64 input ``top_k`` (shape [1]), an *overridable initializer* whose stored value is the model's own
top-k, so an app that feeds nothing gets the model as trained and an app that feeds ``top_k`` routes each token to
that many of the kept experts (``EdgeModel(..., top_k=)``, ``edgeprune predict --top-k``). The family's routing
rule runs unchanged over the chosen k: renormalising families renormalise over k (weight exactly 1 at k = 1),
others keep their softmax weights. The K is clipped to 1..Z (Z = the kept experts) in the graph.

Export: while tracing, ``torch.topk`` / ``Tensor.topk`` calls over the last axis of size Z with K equal to the
model's top-k (the routers' own, in every family's :meth:`~edgeprune.models.adapter.MoEAdapter.route`) become
:class:`RuntimeTopK`, exported as ``TopK(scores, Clip(top_k, 1, Z))``. Group-limited routers' group top-k run
over the groups, not the Z experts, and stay as they are. Only the dense-dispatch export takes it: ONNX Runtime's
``com.microsoft.MoE`` carries k as an attribute.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch

INPUT = "top_k"
_TOPK = torch.topk  # the real one (patched while exporting)


class RuntimeTopK(torch.autograd.Function):
    """``topk(x, k, dim=-1)`` whose k is a tensor that the exported graph reads (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, k, z: int):
        return _TOPK(x, int(k.clamp(1, z).reshape(-1)[0]), dim=-1)

    @staticmethod
    def symbolic(g, x, k, z: int):
        lo = g.op("Constant", value_t=torch.tensor([1], dtype=torch.long))
        hi = g.op("Constant", value_t=torch.tensor([z], dtype=torch.long))
        kk = g.op("Max", g.op("Min", g.op("Reshape", k, g.op("Constant", value_t=torch.tensor([1]))), hi), lo)
        return g.op("TopK", x, kk, axis_i=-1, largest_i=1, sorted_i=1, outputs=2)


@contextlib.contextmanager
def routed_top_k(k_input: torch.Tensor, z: int, default: int) -> Iterator[None]:
    """While active, the routers' top-k over Z experts (K = ``default``) read ``k_input`` instead."""
    originals = torch.topk, torch.Tensor.topk

    def topk(x, k, dim=-1, largest=True, sorted=True, **kw):
        if x.shape[-1] == z and int(k) == default and dim in (-1, x.dim() - 1) and largest and not kw:
            values, idx = RuntimeTopK.apply(x, k_input, z)
            return torch.return_types.topk((values, idx))
        return originals[0](x, k, dim=dim, largest=largest, sorted=sorted, **kw)

    torch.topk = topk
    torch.Tensor.topk = topk
    try:
        yield
    finally:
        torch.topk, torch.Tensor.topk = originals


def overridable(path: Path, default: int) -> int:
    """Store ``default`` as the initializer of the graph input ``top_k`` (kept an input: ONNX Runtime lets a feed
    override it); returns how many TopK nodes read it. Where none does (a router without torch.topk, Switch's
    argmax), the input is removed instead, if the exporter kept it: the graph's top-k stays fixed."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    g = model.graph
    readers = sum(INPUT in n.input for n in g.node)
    if readers:
        g.initializer.append(numpy_helper.from_array(torch.tensor([default]).numpy(), INPUT))
    elif any(i.name == INPUT for i in g.input):
        g.input.remove(next(i for i in g.input if i.name == INPUT))
    onnx.save(model, str(path))
    return readers



def compare_every_k(z: int, default: int, reference, graph, atol: float) -> tuple[dict, str]:
    """The graph at every top-k from 1 to Z against PyTorch routing to that k (``reference(k)`` runs the model
    under :func:`routed_top_k`, ``graph(k)`` the exported graph fed ``top_k = k``): the max logit difference per
    k, and why the input cannot stay ('' when it can: every k runs and agrees within ``atol``)."""
    import numpy as np

    diffs: dict[str, float] = {}
    for k in range(1, z + 1):
        with routed_top_k(torch.tensor([k]), z, default), torch.no_grad():
            ref = reference(k)
        try:
            got = graph(k)
        except Exception as exc:  # ONNX Runtime's own failures: a shape the trace fixed at the model's k
            return diffs, f"the graph fails at top-k {k} ({str(exc).split(' : ')[-1].splitlines()[0][:120]})"
        diffs[str(k)] = float(np.abs(ref - got).max())
        if not diffs[str(k)] <= atol:
            return diffs, f"at top-k {k} the graph differs from PyTorch by {diffs[str(k)]:.2e}"
    return diffs, ""


def check(path: Path, model: torch.nn.Module, enc, z: int, default: int, atol: float = 1e-3,
          fixed_length=None) -> tuple[dict, str]:
    """:func:`compare_every_k` of a classifier graph on ``enc``. A family whose graph fixes k elsewhere (a shape
    traced with the model's own k) fails here."""
    import numpy as np

    from edgeprune.export.onnx_export import onnx_logits, truncate
    from edgeprune.training.loop import predict_logits

    enc = truncate(enc, fixed_length) if fixed_length else enc
    return compare_every_k(z, default, lambda k: predict_logits(model, enc),
                           lambda k: onnx_logits(path, enc, fixed_length=fixed_length,
                                                 extra={INPUT: np.array([k], dtype=np.int64)}), atol)


def fix(path: Path) -> None:
    """Keep the stored top-k as a constant: ``top_k`` no longer a graph input."""
    import onnx

    model = onnx.load(str(path))
    g = model.graph
    g.input.remove(next(i for i in g.input if i.name == INPUT))
    onnx.save(model, str(path))
