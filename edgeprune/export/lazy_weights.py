"""A graph exported from a model whose parameters are on the meta device, its weights read from the checkpoint one
tensor at a time when the graph is saved (issue 26: the export of a checkpoint larger than memory).

``torch.onnx.export(dynamo=True)`` traces a model on the meta device as it traces a loaded one (inputs and buffers
moved there too: the tracer refuses an operation mixing devices, such as DeepSeek's router adding its real
correction bias to meta scores; the inputs' values are not read by the trace either way); the graph's
initializers are then shapes without data. :func:`attach` gives each one an ``onnx_ir.LazyTensor`` that reads its
tensor from the checkpoint (:class:`~edgeprune.scale.lazy.LazyCheckpoint`: each read maps and unmaps its shard)
when ``onnx_ir.save`` writes it into external data, so no more than one weight is in memory at a time.

:func:`fold_views` does, lazily, what constant folding does eagerly: a ``Transpose`` of a weight (``nn.Linear``)
and a ``Gather`` of one expert out of a fused expert tensor (``gate_up_proj[e]`` in the dense dispatch) become
initializers of their own, computed from the source when written. Without it the exporter's optimizer folds the
transposes into arrays held in memory, and leaves the fused ``[E, 2I, H]`` expert tensors whole (a ``Gather``
reads them at run time; they have more than one consumer), which ONNX Runtime's int8 quantizer then cannot
quantize: they are no ``MatMul`` weight. Exact: the folded tensors are the same numbers (``np.transpose`` /
``np.take``).
"""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np


def _as_numpy(t) -> np.ndarray:
    """A torch tensor as numpy (bfloat16 through ml_dtypes, which onnx_ir uses for it)."""
    import torch

    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _lazy(func: Callable[[], np.ndarray], dtype, shape, name: str):
    """A tensor of ``dtype`` and ``shape`` whose data is ``func()``, computed only when it is read."""
    import onnx_ir as ir

    return ir.LazyTensor(lambda: ir.tensor(func()), dtype=dtype, shape=ir.Shape(shape), name=name)


def attach(model, weights: Mapping, prefix: str = "", constants: Mapping | None = None) -> int:
    """Give every initializer of ``model`` (an ``onnx_ir.Model``) whose tensor is on the meta device the tensor
    ``constants[name]`` (buffers computed at construction, not in the checkpoint: rotary frequencies) or
    ``weights[name without prefix]``, read when needed; returns how many. A name neither has is an error (the
    checkpoint does not match the model that was traced)."""
    from edgeprune.errors import ExportError

    n = 0
    for name, value in model.graph.initializers.items():
        like = value.const_value
        if not getattr(getattr(like, "raw", None), "is_meta", False):
            continue  # a real tensor (a buffer computed at construction: rotary frequencies)
        key = name[len(prefix):] if name.startswith(prefix) else name
        if constants and name in constants:
            read = lambda t=constants[name]: _as_numpy(t)  # noqa: E731
        elif key in weights:
            read = lambda key=key: _as_numpy(weights[key])  # noqa: E731
        else:
            raise ExportError(f"the graph's weight {key!r} is not in the checkpoint; is the model the one saved there?")
        value.const_value = _lazy(read, like.dtype, like.shape, name)
        n += 1
    return n


def _constant(value) -> np.ndarray | None:
    """The value of a ``Constant`` node's output or an initializer, else None."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if node is not None and node.op_type == "Constant" and node.domain == "" and "value" in node.attributes:
        return node.attributes["value"].value.numpy()
    return None


def _view(node):
    """(function of the source array, the output's shape) of a Transpose or a constant-index Gather, else None."""
    if node.domain != "" or node.op_type not in ("Transpose", "Gather"):
        return None
    src = node.inputs[0]
    if src is None or not src.is_initializer() or src.const_value is None:
        return None
    shape = list(src.const_value.shape)
    if node.op_type == "Transpose":
        perm = node.attributes["perm"].value if "perm" in node.attributes else list(reversed(range(len(shape))))
        return (lambda a: np.transpose(a, perm)), [shape[p] for p in perm]
    index = _constant(node.inputs[1])
    if index is None:
        return None
    axis = node.attributes["axis"].value if "axis" in node.attributes else 0
    axis = axis % len(shape)
    return (lambda a: np.take(a, index, axis=axis)), shape[:axis] + list(index.shape) + shape[axis + 1:]


def fold_views(model) -> int:
    """Replace every Transpose / constant-index Gather of an initializer by an initializer computed lazily from it
    (see the module docstring); initializers left without a use are dropped. Returns the number of nodes folded."""
    import onnx_ir as ir

    graph, folded = model.graph, 0
    for node in list(graph):  # topological: a Gather's output folded first, then the Transpose that reads it
        view = _view(node)
        if view is None:
            continue
        fn, shape = view
        src, out = node.inputs[0], node.outputs[0]
        if out in graph.outputs:
            continue  # a graph output stays computed
        source = src.const_value
        tensor = _lazy(lambda fn=fn, source=source: np.ascontiguousarray(fn(source.numpy())), source.dtype, shape,
                       out.name)
        value = ir.Value(name=out.name, shape=ir.Shape(shape), type=ir.TensorType(source.dtype), const_value=tensor)
        ir.convenience.replace_all_uses_with(out, value)
        out.name = None
        graph.remove(node, safe=True)
        graph.register_initializer(value)
        if not src.uses() and src.name in graph.initializers:
            graph.initializers.pop(src.name)
        folded += 1
    return folded
