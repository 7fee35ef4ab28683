"""A causal LM whose weights exceed :data:`~edgeprune.export.onnx_export.LARGE_BYTES` to a KV-cache artifact
within a memory bound (issue 26: the causal-LM twin of the multi-gigabyte build, ``scripts/scale_build.py
--generate``). No step holds the model, or its fp32 graph, whole:

* **export** (:func:`export_lazy`): the pruned checkpoint's causal-LM skeleton (parameters on the meta device) in
  :class:`~edgeprune.export.lm_export.WithPast`, traced by ``torch.onnx.export(dynamo=True)`` on the meta device
  with dynamic batch, sequence and past lengths; each initializer read from the checkpoint when the graph is
  written into external data (:mod:`edgeprune.export.lazy_weights`). The graph's inputs and outputs are those of
  every decoder graph here (``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values.{i}.key /
  .value`` -> ``logits``, ``present.{i}.*``), so :class:`~edgeprune.runtime.decoder.EdgeLM` runs it as it is.
* **weights** (:func:`quantize_lazy`): ONNX Runtime's weight-only quantizer on the graph loaded without its
  weights; it reads each MatMul weight when it quantizes it (``onnx_ir``: from the external data file, relative to
  the working directory, which is the graph's folder meanwhile), then the word embedding 4-bit, and the variant is
  written with its own external data, tensor by tensor.
* **parity** (:func:`parity_lazy`): the greedy continuation of every prompt, both sides recomputing the whole
  sequence at each step (no cache): ONNX Runtime one layer segment at a time (:mod:`edgeprune.export.segments`),
  PyTorch one layer at a time (:func:`edgeprune.pruning.layerwise.logits_layerwise`); the tokens equal and the
  logits of every position within ``atol``. The KV-cache path of the graph is the same nodes with a non-empty
  past; the artifact's greedy agreement with the original (validation) runs it.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from edgeprune.errors import ExportError

OPSET = 18  # the dynamo exporter's lowest


@contextlib.contextmanager
def _inside(folder: Path) -> Iterator[None]:
    """The working directory is ``folder`` meanwhile: a tensor's external data resolves from there."""
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(cwd)


def _cache_shapes(model) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    from edgeprune.export.lm_export import cache_shapes

    with torch.device("meta"):
        return cache_shapes(model)


def export_lazy(model_dir: Path, out_dir: Path) -> str:
    """``model_dir``'s causal LM -> ``out_dir/model.onnx`` (+ ``model.onnx.data``, config.json,
    generation_config.json) from its skeleton on the meta device (see the module docstring); returns how."""
    import onnx_ir as ir
    import onnxscript

    from edgeprune.export import lazy_weights
    from edgeprune.export.lm_export import WithPast
    from edgeprune.models.registry import adapter_for
    from edgeprune.pruning.layerwise import skeleton
    from edgeprune.scale.lazy import LazyCheckpoint
    from edgeprune.errors import ModelError

    model = skeleton(model_dir, lm=True)
    weights = LazyCheckpoint(model_dir, model=model)
    try:
        adapter = adapter_for(model.config)
        moe = bool(adapter.blocks(model))
    except ModelError:
        adapter, moe = None, False
    wrapper = WithPast(model).eval()
    constants = {n: b for n, b in wrapper.named_buffers() if not b.is_meta}
    wrapper = wrapper.to("meta")
    with (adapter.export_patch(model) if moe else contextlib.nullcontext()):  # (the MoE forward of transformers 5
        shapes = _cache_shapes(model)  # runs grouped_mm, which the meta device takes in bf16 only)
    b, s, p = 1, 3, 2
    feeds = (torch.ones(b, s, dtype=torch.long), torch.ones(b, s + p, dtype=torch.long),
             torch.arange(p, p + s, dtype=torch.long)[None])
    past = tuple(torch.zeros(b, shape[1], p, shape[3], dtype=model.dtype) for kv in shapes for shape in kv)
    args = tuple(a.to("meta") for a in feeds + past)
    n = len(shapes)
    names = ["input_ids", "attention_mask", "position_ids"] + [f"past_key_values.{i}.{w}" for i in range(n)
                                                               for w in ("key", "value")]
    outputs = ["logits"] + [f"present.{i}.{w}" for i in range(n) for w in ("key", "value")]
    batch, seq = torch.export.Dim("batch_size"), torch.export.Dim("sequence_length")
    total, past_len = torch.export.Dim("total_length"), torch.export.Dim("past_length")
    dyn = ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq}, tuple({0: batch, 2: past_len} for _ in past))
    patch = adapter.export_patch(model) if moe else contextlib.nullcontext()
    try:
        with patch, torch.no_grad():
            program = torch.onnx.export(wrapper, args, input_names=names, output_names=outputs, dynamo=True,
                                        dynamic_shapes=dyn, opset_version=OPSET, optimize=False, verbose=False)
    except Exception as exc:
        raise ExportError(f"the KV-cache export of the {model.config.model_type} model from its skeleton failed "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})") from None
    lazy_weights.attach(program.model, weights, prefix="model.", constants=constants)
    lazy_weights.fold_views(program.model)
    onnxscript.optimizer.optimize(program.model)
    out_dir.mkdir(parents=True, exist_ok=True)
    ir.save(program.model, str(out_dir / "model.onnx"), external_data="model.onnx.data")
    for name in ("config.json", "generation_config.json"):
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out_dir / name)
    return "torch.onnx.dynamo (weights read lazily)" + ("+dense_dispatch" if moe else "")


def quantize_lazy(out: Path, precision: str, dst_name: str, block: int = 32, accuracy_level: int = 0,
                  symmetric: bool = True, embedding: str = "int4") -> dict:
    """``out/onnx/model.onnx``'s weight-only variant ``dst_name`` (``MatMulNBits`` of ``precision``'s bits, RTN,
    blocks of ``block``; the word embedding 4-bit with ``embedding`` ``int4``), one fp32 weight in memory at a time:
    the quantizer reads each from the fp32 graph's external data when it takes it (see the module docstring); the
    variant is written with its weights in ``<dst_name>.data`` (as the model builder writes its graphs), tensor by
    tensor, so that the graph is never serialised whole beside itself. The same graph as the in-memory quantizer's
    (:func:`~edgeprune.export.lm_export.weight_variant`), tensor for tensor."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    from edgeprune.export.lm_export import untie_head
    from edgeprune.export.quantize import gather_4bit_model, weight_only

    bits = {"int4": 4, "int8": 8}[precision]
    folder = out / "onnx"
    for old in (folder / dst_name, folder / (dst_name + ".data")):
        old.unlink(missing_ok=True)
    with _inside(folder):
        g = onnx.load("model.onnx", load_external_data=False)
        untied = untie_head(g)
        g = weight_only(g, None, bits, ("MatMul",), block=block, accuracy_level=accuracy_level or None,
                        symmetric=symmetric)
        if embedding == "int4":
            g = gather_4bit_model(g)
    for t in g.graph.initializer:  # what stayed fp32 (norms, biases) moves from the fp32 graph's data into the variant's
        if uses_external_data(t):
            load_external_data_for_tensor(t, str(folder))
            t.data_location = onnx.TensorProto.DEFAULT
            del t.external_data[:]
    onnx.save_model(g, str(folder / dst_name), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=dst_name + ".data", size_threshold=1024)
    return {"bits": bits, "block_size": block, "algorithm": "RTN", "symmetric": symmetric,
            "accuracy_level": accuracy_level, "embedding": embedding, "untied_heads": untied,
            "note": "quantized one weight at a time (the fp32 graph is larger than the export's memory share)"}


def _batch(seqs: Sequence[Sequence[int]], pad: int) -> dict[str, np.ndarray]:
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for r, s in enumerate(seqs):
        ids[r, : len(s)], mask[r, : len(s)] = s, 1
    return {"input_ids": ids, "attention_mask": mask}


def onnx_step_logits(segs, seqs: Sequence[Sequence[int]], pad: int, past: dict, threads: int) -> np.ndarray:
    """The fp32 graph's logits over every position of ``seqs`` (right-padded, empty past), run in segments."""
    from edgeprune.export.segments import run

    feeds = _batch(seqs, pad)
    feeds["position_ids"] = np.broadcast_to(np.arange(feeds["input_ids"].shape[1]), feeds["input_ids"].shape).copy()
    feeds.update({n: np.zeros((len(seqs), shape[1], 0, shape[3]), np.float32) for n, shape in past.items()})
    outs = run(segs, [feeds], threads)[0]
    return outs[[o.name for o in segs.model.graph.output].index("logits")]


def torch_step_logits(model_dir: Path, seqs: Sequence[Sequence[int]], pad: int) -> np.ndarray:
    """PyTorch's logits over every position of ``seqs`` (right-padded), one layer at a time."""
    from edgeprune.pruning.layerwise import logits_layerwise
    from edgeprune.tasks.encoding import Encoded

    enc = Encoded([list(s) for s in seqs], [[0] * len(s) for s in seqs], [0] * len(seqs), pad)
    z = logits_layerwise(model_dir, enc, batch_size=len(seqs), progress=False, lm=True)
    out = np.zeros((len(seqs), max(len(s) for s in seqs), z[0].shape[-1]), np.float32)
    for r, zr in enumerate(z):
        out[r, : len(zr)] = zr
    return out


def greedy_layerwise(model_dir: Path, prompts: Sequence[Sequence[int]], pad: int, new_tokens: int, eos: set,
                     check=None) -> list[list[int]]:
    """The greedy continuations of ``prompts`` (token ids, all batched) by ``model_dir``'s causal LM, ``new_tokens``
    whole-sequence steps one layer at a time, each stopping after an ``eos`` token; ``check(step, sequences,
    logits)`` sees every step's logits before the next tokens are appended."""
    seqs, done = [list(q) for q in prompts], [False] * len(prompts)
    for step in range(new_tokens):
        z = torch_step_logits(model_dir, seqs, pad)
        if check is not None:
            check(step, seqs, z)
        for r, q in enumerate(seqs):
            if not done[r]:
                tok = int(z[r, len(q) - 1].argmax())
                q.append(tok)
                done[r] = tok in eos
        if all(done):
            break
    return [q[len(p):] for q, p in zip(seqs, prompts)]


def parity_lazy(model_dir: Path, out: Path, prompts: Sequence[str], max_new_tokens: int, atol: float,
                threads: int = 2) -> dict:
    """The large graph's parity gate (see the module docstring); else :class:`ExportError`."""
    from tokenizers import Tokenizer

    from edgeprune.export.segments import Segments

    manifest = json.loads((out / "edgeprune.json").read_text())
    config = json.loads((out / "config.json").read_text())
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    seqs = [tok.encode(p).ids or [int(manifest["bos_token_id"])] for p in prompts]
    eos, pad = set(manifest["eos_token_ids"]), int(config.get("pad_token_id") or 0)
    segs = Segments(out / "onnx" / "model.onnx")
    past = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in segs.model.graph.input
            if i.name.startswith("past_key_values.")}
    worst = [0.0]

    def check(step: int, now: list[list[int]], ref_z: np.ndarray) -> None:
        ort_z = onnx_step_logits(segs, now, pad, past, threads)
        for r, q in enumerate(now):
            n = len(q)
            worst[0] = max(worst[0], float(np.abs(ort_z[r, :n] - ref_z[r, :n]).max()))
            a, b = int(ort_z[r, n - 1].argmax()), int(ref_z[r, n - 1].argmax())
            if a != b or worst[0] > atol:
                raise ExportError(f"parity: ONNX Runtime's greedy continuation of {prompts[r][:60]!r} differs from "
                                  f"PyTorch's ({a} vs {b} at step {step}; logits differ by {worst[0]:.2e}, tolerance "
                                  f"{atol})")

    tokens = greedy_layerwise(model_dir, seqs, pad, max_new_tokens, eos, check)
    return {"prompts": len(prompts), "max_new_tokens": max_new_tokens, "greedy_equal": True,
            "max_abs_logit_diff": worst[0], "atol": atol, "how": "whole-sequence recomputation at each step: ONNX "
            "Runtime in layer segments, PyTorch one layer at a time", "tokens": tokens}


def variant_agreement(out: Path, file: str, prompts: Sequence[str], parity: dict) -> dict:
    """The share of the variant ``file``'s greedy tokens equal to the fp32 graph's (which the parity gate found equal
    to PyTorch's: ``parity["tokens"]``), as :func:`~edgeprune.export.lm_export.greedy_agreement` measures it,
    without a session of the fp32 graph."""
    from edgeprune.runtime.decoder import EdgeLM

    lm, same, total = EdgeLM(out, model_file=file), 0, 0
    for prompt, want in zip(prompts, parity["tokens"]):
        got = list(lm.tokens(prompt, parity["max_new_tokens"]))
        same += sum(x == y for x, y in zip(got, want))
        total += max(len(got), len(want))
    return {"greedy_token_agreement_with_fp32": round(same / max(1, total), 4)}
