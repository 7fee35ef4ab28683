"""An ONNX graph run one layer at a time: the export's parity check of a model whose fp32 weights do not fit beside
the build (issue 26).

A session of the whole fp32 graph holds every weight (ONNX Runtime maps or copies them all; at k = 2 the 6.27 GiB
checkpoint's pruned graph alone is 1.8 GiB): it was the large export's peak, 2.62 GiB on that graph in a one-off
probe, against 0.94 run in segments (the whole build's figures: ``results/scale_build.md``).
Here the graph's nodes are cut, in their (topological) order, where the transformer layer they were traced in
changes: the dynamo exporter records each node's module scope (``pkg.torch.onnx.name_scopes``: ``m.model.layers.3``).
Each segment becomes a graph of its own (its nodes, the initializers they read, in the same external data file;
its inputs the values earlier segments or the caller produced, its outputs the values later segments or the caller
read), and runs over every batch before the next is loaded: one layer's weights in memory at a time, plus the
batches' hidden states. The same nodes compute the same values; only ONNX Runtime's fusions across a cut are lost
(equal to the whole graph's run within 1e-5: ``tests/test_segments.py``).
"""
from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx

_LAYER = re.compile(r"\.(?:layers?|h|blocks?)\.(\d+)$")
_SCOPES = "pkg.torch.onnx.name_scopes"


def _layer(node: onnx.NodeProto):
    """The index of the layer ``node`` was traced in (its innermost ``....layers.N`` scope), else None."""
    for prop in node.metadata_props:
        if prop.key == _SCOPES:
            found = [m.group(1) for s in ast.literal_eval(prop.value) if (m := _LAYER.search(s))]
            return int(found[-1]) if found else None
    return None


def _reads(node: onnx.NodeProto) -> set[str]:
    """The names ``node`` reads, its subgraphs' outer-scope reads included."""
    names = {i for i in node.input if i}
    for attr in node.attribute:
        for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            inner = {o for n in g.node for o in n.output} | {i.name for i in g.input} | {t.name for t in g.initializer}
            names |= {r for n in g.node for r in _reads(n)} - inner
    return names


def cut(graph: onnx.GraphProto) -> list[list[onnx.NodeProto]]:
    """The graph's nodes in order, cut where the layer they belong to changes (nodes of no layer stay with the
    segment they follow)."""
    parts, now = [[]], None
    for node in graph.node:
        layer = _layer(node)
        if layer is not None and layer != now:
            if parts[-1] and now is not None:
                parts.append([])
            now = layer
        parts[-1].append(node)
    return [p for p in parts if p]


class Segments:
    """The segments of the graph at ``path`` (weights in external data beside it), each as a loadable graph."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        model = onnx.load(str(self.path), load_external_data=False)
        inferred = onnx.shape_inference.infer_shapes(model)
        self.model = model
        self.types = {v.name: v for v in list(inferred.graph.value_info) + list(model.graph.input) +
                      list(model.graph.output)}
        self.inits = {t.name: t for t in model.graph.initializer}
        self.parts = cut(model.graph)
        outputs = {o.name for o in model.graph.output}
        self.reads = [set().union(*(_reads(n) for n in p)) - set(self.inits) for p in self.parts]
        self.writes = [{o for n in p for o in n.output if o} for p in self.parts]
        later: set[str] = set(outputs)
        self.keep: list[set[str]] = [set()] * len(self.parts)
        self.live: list[set[str]] = [set()] * len(self.parts)  # the values still read after segment i
        for i in reversed(range(len(self.parts))):  # what each segment must hand on
            self.keep[i], self.live[i] = self.writes[i] & later, set(later)
            later = (later - self.writes[i]) | self.reads[i]

    def __len__(self) -> int:
        return len(self.parts)

    def graph(self, i: int) -> onnx.ModelProto:
        """Segment ``i`` as a model of its own (initializers still in the external data file)."""
        from onnx import helper

        nodes, needed = self.parts[i], self.reads[i] - self.writes[i]
        missing = [n for n in sorted(needed | self.keep[i]) if n not in self.types]
        if missing:
            from edgeprune.errors import ExportError

            raise ExportError(f"the graph's value {missing[0]!r} has no type after shape inference; its segments "
                              "cannot be cut there")
        used = set().union(*(_reads(n) for n in nodes))
        g = helper.make_graph(nodes, f"segment{i}", [self.types[n] for n in sorted(needed)],
                              [self.types[n] for n in sorted(self.keep[i])],
                              [self.inits[n] for n in sorted(used & set(self.inits))])
        m = helper.make_model(g, opset_imports=self.model.opset_import, ir_version=self.model.ir_version)
        m.functions.extend(self.model.functions)
        return m

    def sessions(self, threads: int) -> Iterator[tuple[int, object]]:
        """(i, an ONNX Runtime session of segment i), one at a time: saved beside the graph (its external data
        resolves from there) and removed when the next is asked for."""
        from edgeprune.export.ort_session import session

        for i in range(len(self)):
            tmp = self.path.with_name(f".{self.path.stem}-segment{i}.onnx")
            onnx.save(self.graph(i), str(tmp))
            try:
                yield i, session(tmp, threads)
            finally:
                tmp.unlink(missing_ok=True)


def run(segs: Segments, batches: list[dict[str, np.ndarray]], threads: int = 2) -> list[list]:
    """The graph's outputs on each of ``batches`` (feeds by input name), one segment at a time."""
    values = [dict(b) for b in batches]
    for i, sess in segs.sessions(threads):
        names = [o.name for o in sess.get_outputs()]
        inputs = [x.name for x in sess.get_inputs()]
        for v in values:
            v.update(zip(names, sess.run(names, {n: v[n] for n in inputs})))
            for gone in [n for n in v if n not in segs.live[i]]:
                del v[gone]
        del sess
    return [[v[o.name] for o in segs.model.graph.output] for v in values]
