"""A causal LM (a folded MoE from ``prune --generate``, or one with k > 1 experts) to ONNX with a KV cache.

Export: onnxruntime-genai's model builder where it writes the architecture, else ``torch.onnx.export`` of the
model with its cache as flat tensors (:class:`WithPast`: ``input_ids``, ``attention_mask``, ``position_ids``,
``past_key_values.{i}.key / .value`` -> ``logits``, ``present.{i}.key / .value``, the inputs and outputs of
optimum's ``text-generation-with-past`` graphs, which optimum-onnx wrote on transformers 4.57 and cannot on 5).
A model that still has MoE blocks (k > 1, or a family kept with one expert, OLMoE) is traced under
its adapter's export patch (:meth:`~edgeprune.models.adapter.MoEAdapter.export_patch`: every kept expert
computed and combined with the routing weights, no data-dependent loop; the router skipped at one expert).

Parity gate (:func:`parity`): every prompt runs through ONNX Runtime (:class:`edgeprune.runtime.decoder.EdgeLM`, the
app's runtime, with its KV cache) and through PyTorch; the greedy continuations must be equal token for token
and the first step's logits within ``atol``; otherwise the export fails (exit 5) and nothing is written.

Weights for the edge (:func:`weight_variant`): ``int4`` / ``int8`` weight-only ``MatMulNBits`` (ONNX Runtime's
quantizer; RTN or HQQ; block size and accuracy level from the target) and the word embedding as 4-bit
``GatherBlockQuantized``; a tied LM head is untied first (:func:`untie_head`), so that the head becomes a
MatMul of its own initializer that the quantizer can take. Each variant's greedy agreement with the fp32 graph
is recorded (not gated: fewer bits change some tokens; validation measures what that costs).
"""
from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from onnxruntime.quantization import CalibrationDataReader

from edgeprune.errors import ExportError, ModelError
from edgeprune.export.genai_builder import build_graph, builder_supports, moe_operators

PROMPTS = ("a gorgeous , witty , seductive movie .", "the story is bland and the acting is flat", "it 's a charming film")
FILES = {"fp32": "onnx/model.onnx", "int8": "onnx/model_int8.onnx", "int4": "onnx/model_q4.onnx"}


def cache_shapes(model) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(key shape, value shape) of each layer's cache after one step of the model: heads and head sizes as the
    family lays them out (DeepSeek's latent attention caches keys and values of different sizes)."""
    with torch.no_grad():
        out = model(input_ids=torch.ones(1, 2, dtype=torch.long), use_cache=True)
    cache = out.cache
    other = [type(layer).__name__ for layer in cache.layers if not hasattr(layer, "keys")]
    if other:  # LFM2's convolution, Qwen3.5's linear attention: states the flat KV-cache graph does not carry
        raise ExportError(f"torch.onnx's KV-cache export takes decoders whose every layer caches keys and values; "
                          f"{type(model).__name__} has {other[0]} layers (onnxruntime-genai's model builder writes "
                          "it: [generate].exporter = \"auto\" and moe_operator = \"auto\" or \"qmoe\")")
    return [(tuple(layer.keys.shape), tuple(layer.values.shape)) for layer in cache.layers]


class WithPast(torch.nn.Module):
    """The decoder with its cache as flat tensors (the layout optimum's ``text-generation-with-past`` export had and
    :class:`edgeprune.runtime.decoder.EdgeLM` reads): ``input_ids``, ``attention_mask``, ``position_ids``,
    ``past_key_values.{i}.key / .value`` [batch, kv heads, past, head] -> ``logits``, ``present.{i}.key / .value``.
    The past goes into a transformers ``DynamicCache``; the present is that cache after the step."""

    def __init__(self, model, routing: Optional[tuple[int, int]] = None):
        super().__init__()
        self.model, self.routing = model, routing  # routing (Z, k): the last input is the routers' top_k

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        from edgeprune.export.runtime_top_k import routed_top_k

        routed = routed_top_k(past[-1], *self.routing) if self.routing else contextlib.nullcontext()
        past = past[:-1] if self.routing else past
        cache = DynamicCache(config=self.model.config)
        for i in range(len(past) // 2):
            cache.update(past[2 * i], past[2 * i + 1], i)
        with routed:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=cache, use_cache=True)
        present = out.cache
        return (out.logits, *[t for layer in present.layers for t in (layer.keys, layer.values)])


def export_graph(model, out_dir: Path, opset: Optional[int] = None, moe_operator: str = "auto") -> str:
    """``model`` -> ``out_dir/model.onnx`` (+ config.json, generation_config.json) by ``torch.onnx.export`` of
    :class:`WithPast` (an MoE under its adapter's export patch, or its experts as ``com.microsoft.MoE`` where
    ``moe_operator`` is ``qmoe``: :mod:`edgeprune.export.lm_moe`); returns how it was exported."""
    from edgeprune.export.lm_moe import export_patch
    from edgeprune.export.onnx_export import routing_of
    from edgeprune.export.runtime_top_k import INPUT as TOP_K, overridable
    from edgeprune.models.registry import adapter_for

    try:
        adapter = adapter_for(model.config)
    except ModelError:
        adapter = None  # a dense sibling (Mistral, Qwen3, ...)
    moe = adapter is not None and bool(adapter.blocks(model))
    shapes = cache_shapes(model)
    n = len(shapes)
    b, s, p = 1, 3, 2  # a past of 2 tokens, a step of 3: no axis of length 1 for the trace to specialise on
    feeds = (torch.ones(b, s, dtype=torch.long), torch.ones(b, s + p, dtype=torch.long),
             torch.arange(p, p + s, dtype=torch.long)[None])
    past = tuple(torch.zeros(b, shape[1], p, shape[3], dtype=model.dtype) for kv in shapes for shape in kv)
    past_names = [f"past_key_values.{i}.{w}" for i in range(n) for w in ("key", "value")]
    names = ["input_ids", "attention_mask", "position_ids"] + past_names
    outputs = ["logits"] + [f"present.{i}.{w}" for i in range(n) for w in ("key", "value")]
    axes = {"input_ids": {0: "batch_size", 1: "sequence_length"}, "attention_mask": {0: "batch_size", 1: "total_length"},
            "position_ids": {0: "batch_size", 1: "sequence_length"}, "logits": {0: "batch_size", 1: "sequence_length"}}
    axes.update({x: {0: "batch_size", 2: "past_length"} for x in past_names})
    axes.update({x: {0: "batch_size", 2: "total_length"} for x in outputs[1:]})
    patch, how = export_patch(adapter, model, moe_operator) if moe else (contextlib.nullcontext(), "")
    routing = routing_of(adapter, model) if how == "+dense_dispatch" else None
    if routing is not None:  # the routers' top-k as the overridable input top_k (edgeprune.export.runtime_top_k)
        past, names = past + (torch.tensor([routing[1]]),), names + [TOP_K]
    model.eval()
    try:
        with patch, torch.no_grad():
            torch.onnx.export(WithPast(model, routing), feeds + past, str(out_dir / "model.onnx"), input_names=names,
                              output_names=outputs, dynamic_axes=axes, opset_version=opset or 17, dynamo=False)
    except Exception as exc:
        raise ExportError(f"the KV-cache export of the {model.config.model_type} model failed "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})") from None
    retie_head(out_dir / "model.onnx")
    if routing is not None:
        overridable(out_dir / "model.onnx", routing[1])
    model.config.save_pretrained(out_dir)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    return "torch.onnx" + how


def retie_head(path: Path) -> int:
    """One weight for a tied embedding and LM head, as optimum's graphs had: the TorchScript exporter folds the
    head's transpose into a second initializer (the vocabulary twice); each initializer that is the transpose of
    another becomes a ``Transpose`` of it (:func:`untie_head` gives the quantizer its own copy again). Returns how
    many were re-tied."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    by_shape: dict[tuple, list] = {}
    for i in inits.values():
        if len(i.dims) == 2:
            by_shape.setdefault(tuple(i.dims), []).append(i)
    done, gone = 0, set()
    for i in list(inits.values()):
        if len(i.dims) != 2 or i.dims[0] == i.dims[1] or i.name in gone:
            continue
        a = None
        for other in by_shape.get((i.dims[1], i.dims[0]), []):
            if other.name in gone:
                continue
            a = numpy_helper.to_array(i) if a is None else a
            if np.array_equal(a, numpy_helper.to_array(other).T):
                model.graph.initializer.remove(i)
                model.graph.node.insert(0, helper.make_node("Transpose", [other.name], [i.name], perm=[1, 0],
                                                            name=f"retie/{i.name}"))
                gone.add(i.name)
                done += 1
                break
    if done:
        onnx.save(model, str(path))
    return done


# architectures onnxruntime-genai 0.11's model builder writes (its create_model); MoE blocks excluded (PhiMoE's own)
def write_decoder(model, model_dir: Path, out: Path, opset: Optional[int] = None, exporter: str = "auto",
                  moe_operator: str = "auto") -> dict:
    """The fp32 graph, tokenizer and ``edgeprune.json`` (``kind: causal-lm``) of ``model`` into ``out``: from
    onnxruntime-genai's model builder (fused decoder operators; ``exporter`` ``auto`` where it supports the
    architecture, or ``genai``), or torch.onnx (``torch.onnx``, and every other model); ``lazy`` (``model`` None):
    from the checkpoint's skeleton, its weights read one at a time (:mod:`edgeprune.export.lm_large`). k > 1
    experts as ``moe_operator`` says (:mod:`edgeprune.export.lm_moe`)."""
    from edgeprune.export.lm_moe import use_builder
    from edgeprune.models.tokenizer import copy_tokenizer

    if exporter == "genai" and not builder_supports(model):
        raise ExportError(f"onnxruntime-genai's model builder does not write {type(model).__name__} (or is not "
                          "installed); use [generate].exporter = \"torch.onnx\"")
    with tempfile.TemporaryDirectory(prefix="edgeprune-lm-") as tmp:
        if exporter == "lazy":
            from edgeprune.export.lm_large import export_lazy

            how = export_lazy(Path(model_dir), Path(tmp))
        elif use_builder(model, exporter, moe_operator):
            how = build_graph(model_dir, Path(tmp))
        else:
            how = export_graph(model, Path(tmp), opset, moe_operator)
        (out / "onnx").mkdir(parents=True, exist_ok=True)
        for f in Path(tmp).iterdir():
            onnx_file = f.suffix in (".onnx", ".onnx_data", ".data") or f.name.endswith(".onnx.data")
            shutil.move(str(f), out / ("onnx" if onnx_file else "") / f.name)
    if not (model_dir / "tokenizer.json").is_file():
        raise ModelError(f"{model_dir}: no tokenizer.json; save the tokenizer with the model")
    copy_tokenizer(model_dir, out)
    raw = json.loads((out / "config.json").read_text())
    gen = json.loads((out / "generation_config.json").read_text()) if (out / "generation_config.json").is_file() else {}
    eos = gen.get("eos_token_id", raw.get("eos_token_id"))
    manifest = {"kind": "causal-lm", "model_file": FILES["fp32"], "model_type": raw["model_type"], "exporter": how,
                "context": int(raw.get("max_position_embeddings") or 2048),
                "eos_token_ids": eos if isinstance(eos, list) else [eos] if eos is not None else [],
                "bos_token_id": gen.get("bos_token_id", raw.get("bos_token_id")), "precision": "fp32"}
    if model is not None:
        from edgeprune.export.lm_moe import check_top_k

        manifest.update(check_top_k(out, model))
    (out / "edgeprune.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def parity(model, out: Path, prompts: Sequence[str], max_new_tokens: int, atol: float) -> dict:
    """ONNX Runtime's greedy continuation of every prompt equals PyTorch's token for token and the first-step
    logits agree within ``atol``; else :class:`ExportError`."""
    import torch

    from edgeprune.runtime.decoder import EdgeLM

    lm = EdgeLM(out)
    diffs = []
    for prompt in prompts:
        try:
            got = list(lm.tokens(prompt, max_new_tokens))
        except Exception as exc:  # onnxruntime's own failures (a kernel's constraint, a shape)
            raise ExportError(f"ONNX Runtime cannot run the exported graph: {str(exc).splitlines()[0][:200]}") from None
        ids = lm.prompt_ids(prompt, max_new_tokens)
        with torch.no_grad():
            x = torch.tensor([ids])
            ref = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=model.config.get_text_config().pad_token_id or 0,
                                 eos_token_id=sorted(lm.eos) or None)[0, len(ids):].tolist()
            first = model(x).logits[0, -1].float().numpy()
        diffs.append(float(np.abs(first - lm.logits(ids)[-1]).max()))
        if got != ref[: len(got)] or diffs[-1] > atol:
            raise ExportError(f"parity: ONNX Runtime's greedy continuation of {prompt[:60]!r} differs from PyTorch's "
                              f"({got[:8]} vs {ref[:8]}; first-step logits differ by {diffs[-1]:.2e}, tolerance {atol})")
    return {"prompts": len(prompts), "max_new_tokens": max_new_tokens, "greedy_equal": True,
            "max_abs_logit_diff": max(diffs), "atol": atol}


def export_lm(model_dir: str | Path, out: str | Path, prompts: Optional[Sequence[str]] = None,
              max_new_tokens: int = 8, atol: float = 1e-4, int4: bool = False, block: int = 32) -> dict:
    """``edgeprune export-lm``: a saved causal LM to a parity-gated artifact in ``out`` (+ the int4 variant)."""
    from transformers import AutoModelForCausalLM

    from edgeprune.models.checkpoint import load_checked, read_config, weight_files

    model_dir, out = Path(model_dir), Path(out)
    raw = read_config(model_dir)
    weight_files(model_dir)
    if not any("CausalLM" in a for a in raw.get("architectures") or []):
        raise ModelError(f"{model_dir}: export-lm takes a causal language model (...ForCausalLM), not "
                         f"{', '.join(raw.get('architectures') or ['unknown'])}")
    if not (model_dir / "tokenizer.json").is_file():
        raise ModelError(f"{model_dir}: no tokenizer.json; save the tokenizer with the model")
    model = load_checked(AutoModelForCausalLM, model_dir)
    manifest = write_decoder(model, model_dir, out)
    prompts = list(prompts or PROMPTS)
    manifest["parity"] = parity(model, out, prompts, max_new_tokens, atol)
    if int4:
        manifest["variants"] = {"int4": weight_variant(out, "int4", prompts, max_new_tokens, block=block)}
    from edgeprune.export.genai import write_genai_config

    manifest["genai"] = write_genai_config(out, FILES["fp32"], manifest["eos_token_ids"])
    (out / "edgeprune.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def untie_head(model) -> int:
    """Tied embeddings export as one initializer read through a run-time ``Transpose``: the torch.onnx graph feeds the LM
    head's ``MatMul`` with the transposed embedding, the model builder's feeds the embedding ``Gather`` with the
    transposed head. Each such ``MatMul`` (its weight) or ``Gather`` (its data) gets the transposed initializer of
    its own, so that the quantizer takes both (the head as MatMulNBits, the embedding as GatherBlockQuantized);
    returns how many were untied."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    done = 0
    for node in model.graph.node:
        slot = {"MatMul": 1, "Gather": 0}.get(node.op_type)
        t = producers.get(node.input[slot]) if slot is not None and len(node.input) > slot else None
        if t is None or t.op_type != "Transpose" or t.input[0] not in inits:
            continue
        w = numpy_helper.to_array(inits[t.input[0]])
        perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), None)
        name = f"{t.input[0]}.untied"
        if name not in inits:
            inits[name] = numpy_helper.from_array(np.ascontiguousarray(w.transpose(perm)), name)
            model.graph.initializer.append(inits[name])
        node.input[slot] = name
        done += 1
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [n for n in model.graph.node if n.op_type != "Transpose" or any(o in used for o in n.output)]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return done


class CalibrationReader(CalibrationDataReader):
    """The graph's feeds for each calibration sequence (empty cache), as ONNX Runtime's quantizers read them."""

    def __init__(self, graph: Path, sequences: Sequence[Sequence[int]], config: Optional[Path] = None):
        import onnx

        inputs = onnx.load(str(graph), load_external_data=False).graph.input
        self.past = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in inputs
                     if i.name.startswith("past_key_values.")}
        # a symbolic head size (genai 0.18's builder): the config's
        if config is not None and config.is_file() and any(not shape[3] for shape in self.past.values()):
            from edgeprune.runtime.decoder import config_head_dim

            head = config_head_dim(json.loads(config.read_text()))
            self.past = {n: shape[:3] + [shape[3] or head] for n, shape in self.past.items()}
        self.names = {i.name for i in inputs}
        self.sequences = [list(s) for s in sequences]
        self.rewind()

    def rewind(self) -> None:
        self._it = iter(self.sequences)

    def get_next(self):
        ids = next(self._it, None)
        if ids is None:
            return None
        feeds = {"input_ids": np.array([ids], dtype=np.int64), "attention_mask": np.ones((1, len(ids)), np.int64),
                 "position_ids": np.arange(len(ids), dtype=np.int64)[None]}
        feeds.update({n: np.zeros((1, shape[1], 0, shape[3]), np.float32) for n, shape in self.past.items()})
        return {k: v for k, v in feeds.items() if k in self.names}


def weight_variant(out: Path, precision: str, prompts: Sequence[str], max_new_tokens: int, block: int = 32,
                   accuracy_level: int = 0, algorithm: str = "rtn", embedding: str = "int4",
                   file: Optional[str] = None, calibration: Optional[Sequence[Sequence[int]]] = None,
                   symmetric: bool = True, source: Optional[Path] = None) -> dict:
    """``FILES[precision]`` from the fp32 graph: the head untied, every weight MatMul as ``MatMulNBits`` of
    ``precision``'s bits (``algorithm``, blocks of ``block``), the word embedding 4-bit ``GatherBlockQuantized``
    when ``embedding`` is ``int4`` (into ``file``, default ``FILES[precision]``); ``gptq`` runs the fp32 graph over
    ``calibration`` (token id sequences: the training split's prompts and completions); with its greedy-token
    agreement with the fp32 graph on ``prompts``.

    ``source`` (given for a graph whose experts are ONNX Runtime's ``MoE`` operator: the model builder's
    :data:`BUILDER_MOE` families): the variant is rebuilt by the builder from that checkpoint instead, the experts
    as ``QMoE`` (int4 / int8, symmetric round to nearest, blocks of ``block``), the other MatMuls as
    ``MatMulNBits``; ONNX Runtime's quantizers do not touch a contrib operator's weights, so post-quantizing would
    leave the experts fp32. The ``MoE`` nodes of edgeprune's own export become ``QMoE`` with the variant's bits
    (:func:`edgeprune.export.lm_moe.experts_in_qmoe`) before the other weights are quantized.
    Where the builder cannot (its gpt-oss path quantizes only the released MXFP4 expert tensors), the variant is
    post-quantized as any other graph, its MoE nodes made ``QMoE`` by edgeprune's own rewrite (said in ``experts``)."""
    import onnx

    from edgeprune.export.lm_moe import experts_in_qmoe
    from edgeprune.export.quantize import gather_4bit, size_mb, weight_only

    bits = {"int4": 4, "int8": 8}[precision]
    file = file or FILES[precision]
    src, dst = out / FILES["fp32"], out / file
    experts = None
    if source is not None:
        try:
            build_graph(source, dst.parent, precision, dst.name, block)
            info = {"model_file": file, "bits": bits, "block_size": block, "algorithm": "RTN", "symmetric": True,
                    "experts": f"com.microsoft.QMoE ({moe_operators(dst)} layers, onnxruntime-genai's model builder)"}
            return {**info, **greedy_agreement(out, file, prompts, max_new_tokens), "size_mb": size_mb(dst)}
        except ExportError as exc:  # gpt-oss: the builder quantizes only the released MXFP4 experts
            why = str(exc).split(": ", 1)[-1][:160]  # the builder's own last line, without the checkpoint's path
            experts = f"fp32 in com.microsoft.MoE (the model builder's {precision} failed: {why})"
    with tempfile.TemporaryDirectory(prefix="edgeprune-q-") as tmp:
        untied = Path(tmp) / "untied.onnx"
        g = onnx.load(str(src))
        n_untied = untie_head(g)
        experts = experts_in_qmoe(g, bits) or experts  # edgeprune's own MoE nodes: QMoE with the variant's bits
        onnx.save(g, str(untied))
        reader = CalibrationReader(untied, calibration, out / "config.json") if algorithm == "gptq" and calibration else None
        weight_only(untied, Path(tmp) / "mm.onnx", bits, ("MatMul",), block=block,
                    accuracy_level=accuracy_level or None, algorithm=algorithm, calibration=reader,
                    symmetric=symmetric)
        if embedding == "int4":  # packed as uint8, the graph's own opset kept (see quantize.gather_4bit)
            gather_4bit(Path(tmp) / "mm.onnx", dst)
        else:
            shutil.move(str(Path(tmp) / "mm.onnx"), dst)
    return {"model_file": file, "bits": bits, "block_size": block, "algorithm": algorithm.upper(),
            "symmetric": symmetric if algorithm != "hqq" else False,
            "accuracy_level": accuracy_level, "embedding": embedding, "untied_heads": n_untied,
            **({"experts": experts} if experts else {}),
            **greedy_agreement(out, file, prompts, max_new_tokens), "size_mb": size_mb(dst)}


def greedy_agreement(out: Path, file: str, prompts: Sequence[str], max_new_tokens: int) -> dict:
    """The share of greedy tokens of the graph ``file`` equal to the fp32 graph's, over ``prompts``."""
    from edgeprune.runtime.decoder import EdgeLM

    fp32, qlm = EdgeLM(out, model_file=FILES["fp32"]), EdgeLM(out, model_file=file)
    same = total = 0
    for prompt in prompts:
        a, b = list(fp32.tokens(prompt, max_new_tokens)), list(qlm.tokens(prompt, max_new_tokens))
        same += sum(x == y for x, y in zip(a, b))
        total += max(len(a), len(b))
    return {"greedy_token_agreement_with_fp32": round(same / max(1, total), 4)}
