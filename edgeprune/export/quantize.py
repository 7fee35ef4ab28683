"""Per-target graph optimisation and quantization, with ONNX Runtime's own tools.

* fusions: ``onnxruntime.transformers.optimizer.optimize_model(model_type="bert")`` (Attention,
  SkipLayerNormalization, BiasGelu, EmbedLayerNormalization);
* int8 dynamic: ``onnxruntime.quantization.quantize_dynamic`` (MatMul / Attention weights per channel,
  Gather = embeddings when the target asks). On a fused graph shape inference cannot see through the
  contrib ops, so ``DefaultTensorType=FLOAT`` is passed (DESIGN.md section 2, ORT 1.32);
* int8 static QDQ: ``quantize_static`` with a calibration reader over task examples (option);
* fp16: ``OnnxModel.convert_float_to_float16(keep_io_types=True)`` of ONNX Runtime's transformer tools (its
  fork of onnxconverter-common's converter; the original leaves ``Cast(to=float)`` nodes whose outputs it
  retypes, which ORT 1.32 rejects: "Type (tensor(float16)) of output arg ... does not match");
* fixed shapes: ``onnxruntime.tools.onnx_model_utils.make_dim_param_fixed``;
* ORT format: an ORT session that saves its optimised model with ``session.save_model_format = ORT``,
  which is what ``python -m onnxruntime.tools.convert_onnx_models_to_ort`` does;
* mobile usability: ``onnxruntime.tools.mobile_helpers.usability_checker`` (NNAPI / CoreML partitions).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np
import onnx

from edgeprune.errors import ExportError
from edgeprune.export.ort_session import DISABLED_KEY, disabled_optimizers, mark_disabled_optimizers, pad_to  # noqa: F401
from edgeprune.targets import Target
from edgeprune.tasks.encoding import Encoded, collate


def optimize(src: Path, dst: Path, target: Target, num_heads: int, hidden_size: int,
             model_type: Optional[str] = "bert") -> list[str]:
    """Transformer fusions of the ORT transformer optimizer for ``model_type`` (``bert`` for BERT and BERT-MoE),
    or none where no optimizer model type fits the family (ONNX Runtime then applies its own graph
    optimisations when the session loads); returns the fused op counts."""
    from onnxruntime.transformers.optimizer import optimize_model

    if not target.optimization.fuse or model_type != "bert":
        copy_graph(src, dst)
        return []
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions("bert")
    options.enable_embed_layer_norm = target.quantization.embedding_bits == 8  # a fused op hides the Gather
    options.enable_skip_layer_norm = target.optimization.skip_layer_norm
    options.enable_gelu_approximation = target.optimization.gelu_approximation
    fusion_log = logging.getLogger("onnxruntime.transformers.fusion_attention")
    expected = _PrunedWidth(hidden_size)
    fusion_log.addFilter(expected)
    try:
        opt = optimize_model(str(src), model_type="bert", num_heads=num_heads, hidden_size=hidden_size,
                             opt_level=1,  # portable: no hardware-specific layouts in the saved graph
                             optimization_options=options)
    except Exception as exc:
        raise ExportError(f"ORT transformer optimisation failed: {type(exc).__name__}: {exc}") from None
    finally:
        fusion_log.removeFilter(expected)
    opt.save_model_to_file(str(dst))
    stats = opt.get_fused_operator_statistics()
    return [f"{k}={v}" for k, v in stats.items() if v]


def copy_graph(src: Path, dst: Path) -> None:
    """``src`` saved as ``dst``; weights in external data stay where they are (``dst`` in the same folder names the
    same data file), so a large graph is not read into memory for a copy."""
    onnx.save(onnx.load(str(src), load_external_data=False), str(dst))


class _PrunedWidth(logging.Filter):
    """After ``--heads-keep`` the attention is narrower than the model (q, k, v weights [H, kept x head size]), and
    ONNX Runtime's fusion wants that pruned width as ``hidden_size`` (its docstring), then warns that it differs
    from the weights' input size, once per layer. That warning is expected here and dropped; any other is kept."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size

    def filter(self, record: logging.LogRecord) -> bool:
        return not (str(record.msg).startswith("Input hidden size (%d) is not same as weight matrix dimension")
                    and record.args and record.args[0] == self.hidden_size)


class _Reader:
    """Calibration data reader for static quantization (task examples, padded per batch)."""

    def __init__(self, enc: Encoded, names: set[str], batch_size: int = 8, fixed: Optional[tuple[int, int]] = None):
        self.batches = []
        for start in range(0, len(enc), batch_size):
            b = collate(enc, list(range(start, min(len(enc), start + batch_size))))
            feeds = {k: v.numpy() for k, v in b.items() if k in names}
            if fixed:
                feeds = pad_to(feeds, *fixed, enc.pad_id)
            self.batches.append(feeds)
        self.it = iter(self.batches)

    def get_next(self):
        return next(self.it, None)

    def rewind(self):
        self.it = iter(self.batches)


def fp32_nodes(path) -> list[str]:
    """Nodes ONNX Runtime's int8 quantizer must leave in fp32: MatMuls whose weight is a 3-D (or higher) initializer
    (experts stacked in one tensor, e.g. Inkling's shared experts: the int8 MatMul kernels take 2-D weights only, and
    ``MatMulIntegerToFloat`` refuses their per-channel parameters at run time), and Gathers from anything but a 2-D
    initializer (an embedding table): a per-expert scale indexed by the routed experts (Gemma 4) has no axis to
    quantize along, and the quantizer fails on it; nor does a table of integers (DeepSeek-V4's token-to-expert
    table). A Gather of activations (one expert's column of the routing weights) is no weight: not listed. ``path``:
    a graph's path or the graph (``onnx.ModelProto``)."""
    model = path if isinstance(path, onnx.ModelProto) else onnx.load(str(path), load_external_data=False)
    ranks = {t.name: len(t.dims) for t in model.graph.initializer}
    floats = {t.name for t in model.graph.initializer
              if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)}
    return [n.name for n in model.graph.node
            if (n.op_type == "MatMul" and any(ranks.get(i, 0) > 2 for i in n.input))
            or (n.op_type == "Gather" and n.input[0] in ranks and (ranks[n.input[0]] != 2 or n.input[0] not in floats))]


def quantize(src: Path, dst: Path, target: Target, calib: Optional[Encoded] = None, external: bool = False) -> dict:
    """Apply the target's precision to ``src``; returns what was done. ``external`` (int8-dynamic): the quantized
    weights written into external data one at a time (``<dst>.data``) rather than serialised with the graph in
    memory (a large graph: :mod:`edgeprune.export.large`)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    q = target.quantization
    info: dict = {"precision": q.precision}
    qmoe = dst.with_name(dst.stem + ".qmoe.onnx")
    try:
        if target.export.moe_operator == "qmoe" and q.precision.startswith("int8"):
            src = _experts_in_qmoe(src, qmoe, q.moe_bits, info)
        if q.precision == "fp32":
            copy_graph(src, dst)
        elif q.precision == "fp16":
            from onnxruntime.transformers.onnx_model import OnnxModel

            model = OnnxModel(onnx.load(str(src)))
            model.convert_float_to_float16(keep_io_types=True)
            model.save_model_to_file(str(dst))
        elif q.precision == "int8-dynamic":
            embed4 = q.quantize_embeddings and q.embedding_bits == 4
            ops = ["MatMul", "Attention"] + (["Gather", "EmbedLayerNormalization"] if q.quantize_embeddings and not embed4
                                             else [])
            block4 = dst.with_name(dst.stem + ".gather4.onnx")
            try:
                if embed4:  # the word embedding first, block-wise 4-bit
                    gather_4bit(src, block4)
                    info["embedding"] = "GatherBlockQuantized, 4-bit symmetric, block 32 (ONNX Runtime's quantizer)"
                if external:  # the quantizer refuses to write over a data file
                    dst.with_name(dst.name + ".data").unlink(missing_ok=True)
                keep_fp32 = fp32_nodes(src)
                if keep_fp32:
                    info["fp32_nodes"] = len(keep_fp32)
                quantize_dynamic(str(block4 if embed4 else src), str(dst), op_types_to_quantize=ops,
                                 per_channel=q.per_channel, reduce_range=q.reduce_range, weight_type=QuantType.QInt8,
                                 nodes_to_exclude=keep_fp32, use_external_data_format=external,
                                 extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
            finally:
                block4.unlink(missing_ok=True)
            info["op_types"] = ops
        else:  # int8-static (QDQ)
            if calib is None or len(calib) == 0:
                raise ExportError("int8-static quantization needs calibration examples")
            names = {i.name for i in onnx.load(str(src)).graph.input}
            fixed = (target.export.batch_size, target.export.sequence_length) if target.export.fixed_shapes else None
            quantize_static(str(src), str(dst), _Reader(calib, names, fixed=fixed), quant_format=QuantFormat.QDQ,
                            per_channel=q.per_channel, reduce_range=q.reduce_range,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
            info["calibration_examples"] = len(calib)
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"{q.precision} quantization failed: {type(exc).__name__}: {exc}") from None
    finally:
        qmoe.unlink(missing_ok=True)
    return info


def _experts_in_qmoe(src: Path, dst: Path, bits: int, info: dict) -> Path:
    """``src`` with its ``com.microsoft.MoE`` nodes turned into ``QMoE`` (:mod:`edgeprune.export.qmoe`) in ``dst``;
    ``src`` itself when it has none (k = 1, or a family that does not map onto the operator)."""
    from edgeprune.export.qmoe import to_qmoe

    model = onnx.load(str(src))
    done = to_qmoe(model, bits)
    if not done["nodes"]:
        return src
    onnx.save(model, str(dst))
    info["experts"] = (f"com.microsoft.QMoE, {bits}-bit block-wise (block {'/'.join(map(str, done['blocks']))}), "
                       f"{done['nodes']} layers: expert weights {done['fp32_bytes'] / 2**20:.1f} -> "
                       f"{done['quantized_bytes'] / 2**20:.1f} MB")
    return dst


def weight_only(src, dst: Optional[Path], bits: int, op_types: tuple[str, ...], block: int = 32,
                accuracy_level: Optional[int] = None, algorithm: str = "rtn", calibration=None,
                symmetric: bool = True, exclude: Optional[list[str]] = None) -> None:
    """ONNX Runtime's weight-only quantizer: ``MatMul`` -> ``MatMulNBits``, ``Gather`` of an initializer ->
    ``com.microsoft.GatherBlockQuantized`` (4-bit only), blocks of ``block`` along the input / hidden axis;
    ``algorithm`` ``rtn``: round to nearest (``symmetric``, or with a zero point per block); ``hqq``: Half-Quadratic Quantization (Badri & Shaji
    2023; asymmetric, scale and zero point fitted per block without data), MatMul only; ``gptq``: GPTQ (Frantar
    et al. 2023: each column rounded in turn and the rest of its block corrected by the inverse Hessian of the
    layer's inputs), 4-bit MatMul only, on ``calibration`` (an onnxruntime ``CalibrationDataReader`` of the graph's
    inputs); ``exclude``: node names left as they are. ``src``: a path, or a loaded ``onnx.ModelProto`` (its weights
    may stay in external data: the quantizer reads each when it quantizes it); ``dst`` None: the quantized model is
    returned instead of written."""
    root = logging.getLogger().level
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 GPTQWeightOnlyQuantConfig, HQQWeightOnlyQuantConfig,
                                                                 MatMulNBitsQuantizer)

    # that module calls logging.basicConfig(level=INFO) when imported, and every library's INFO lines (a line a
    # tensor from the dynamic quantizer) then reach the user's terminal: the root logger's level is put back
    logging.getLogger().setLevel(root)
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)  # a line a node
    axes = (("MatMul", 0), ("Gather", 1))
    if algorithm == "hqq":
        cfg = HQQWeightOnlyQuantConfig(block_size=block, bits=bits, op_types_to_quantize=op_types, quant_axes=axes)
    elif algorithm == "gptq":
        if bits != 4 or calibration is None:
            raise ExportError("GPTQ quantizes 4-bit weights from calibration data; use it for int4 with data")
        cfg = GPTQWeightOnlyQuantConfig(calibration_data_reader=calibration, block_size=block,
                                        op_types_to_quantize=op_types)
    else:
        cfg = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=symmetric, accuracy_level=accuracy_level,
                                           bits=bits, op_types_to_quantize=op_types, quant_axes=axes)
    q = MatMulNBitsQuantizer(src if isinstance(src, onnx.ModelProto) else onnx.load(str(src)), bits=bits, block_size=block, is_symmetric=symmetric,
                             accuracy_level=accuracy_level, op_types_to_quantize=op_types, quant_axes=axes,
                             algo_config=cfg, nodes_to_exclude=exclude or [])
    q.process()
    if dst is None:
        return q.model.model
    q.model.save_model_to_file(str(dst), use_external_data_format=False)


def gather_4bit(src: Path, dst: Path) -> None:
    """The word embedding as ``GatherBlockQuantized``, 4-bit, blocks of 32 along the hidden axis. Measured in
    results/weight_bits.md: with int8 dynamic linear layers, 18.6 instead of 23.1 MB at the same latency.

    The quantizer stores the blocks as ``int4`` tensors, which the ORT format (ONNX Runtime Mobile; 1.32) cannot
    hold ("Unsupported tensor data type"): they are rewritten as ``uint8`` with two 4-bit values per byte (low
    nibble first) shifted by 8, the operator's default zero point for 4 bits, which is the same numbers
    (bit-identical outputs, tested) in the same bytes, and the graph keeps its own opset."""
    weight_only(src, dst, 4, ("Gather",), exclude=fp32_nodes(src))
    model = onnx.load(str(dst))
    packed_gathers(model, onnx.load(str(src), load_external_data=False))
    onnx.save(model, str(dst))


def gather_4bit_model(model):
    """:func:`gather_4bit` of a graph in memory (its other weights may stay in external data); returns it."""
    before = onnx.ModelProto()
    before.ir_version = model.ir_version
    before.opset_import.extend(model.opset_import)
    out = weight_only(model, None, 4, ("Gather",), exclude=fp32_nodes(model))
    packed_gathers(out, before)
    return out


def packed_gathers(model, before) -> None:
    """:func:`pack_int4_gathers`, and where no int4 tensor is left, the opset and IR version of ``before`` (the
    graph before the Gather pass): the quantizer raised them to 21 / 10 for the int4 type, and at 21 an opset-17
    ReduceMean's axes attribute is not valid."""
    if pack_int4_gathers(model) and not any(i.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)
                                            for i in model.graph.initializer):
        model.ir_version = before.ir_version
        own = {o.domain: o.version for o in before.opset_import}
        for o in model.opset_import:
            if o.domain in ("", "ai.onnx") and "" in own:
                o.version = own[""]


def pack_int4_gathers(model) -> int:
    """``GatherBlockQuantized`` data from ``int4`` to packed ``uint8`` (value + 8, two per byte, no zero points:
    the default 8); returns how many were rewritten."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    done = 0
    for node in model.graph.node:
        t = inits.get(node.input[0]) if node.op_type == "GatherBlockQuantized" else None
        if t is None or t.data_type != onnx.TensorProto.INT4 or (len(node.input) > 3 and node.input[3]):
            continue
        u = (numpy_helper.to_array(t).astype(np.int16) + 8).astype(np.uint8)
        if u.shape[-1] % 2:
            continue
        pairs = u.reshape(*u.shape[:-1], u.shape[-1] // 2, 2)
        t.CopyFrom(numpy_helper.from_array((pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8), t.name))
        done += 1
    return done


def fix_shapes(path: Path, batch: int, length: int) -> None:
    """Make the batch and sequence dimensions static (NNAPI / CoreML need it)."""
    from onnxruntime.tools.onnx_model_utils import make_dim_param_fixed

    model = onnx.load(str(path), load_external_data=False)  # external weights stay where they are
    for name, value in (("batch_size", batch), ("sequence_length", length)):
        make_dim_param_fixed(model.graph, name, value)
    onnx.save(model, str(path))


def to_ort_format(src: Path, dst: Path) -> None:
    """Save ``src`` in ORT format (basic optimisations, as the ORT Mobile converter does)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(dst)
    opts.add_session_config_entry("session.save_model_format", "ORT")
    opts.log_severity_level = 3
    try:
        ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"],
                             disabled_optimizers=disabled_optimizers(src))
    except Exception as exc:
        raise ExportError(f"conversion to ORT format failed: {type(exc).__name__}: {exc}") from None
    try:  # written is not loadable: ONNX Runtime saves graphs (int4 tensors) that its ORT-format reader refuses
        ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"], disabled_optimizers=disabled_optimizers(src))
    except Exception as exc:
        raise ExportError(f"the ORT-format model does not load: {str(exc).splitlines()[0][:200]}") from None


def mobile_usability(path: Path) -> dict:
    """The ORT mobile usability checker's verdict: would NNAPI / CoreML take this graph?"""
    from onnxruntime.tools.mobile_helpers import usability_checker

    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    logger = logging.getLogger("edgeprune.usability")
    logger.handlers = [Keep()]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        ok = usability_checker.analyze_model(Path(path), skip_optimize=False, logger=logger)
    except Exception as exc:
        return {"verdict": f"checker failed: {type(exc).__name__}: {exc}", "details": lines[-20:]}
    verdicts = [l for l in lines if l.startswith("Model should perform well")]
    unsupported = [l for l in lines if "Unsupported ops" in l or "unsupported" in l.lower()][:6]
    return {"nnapi_or_coreml_may_work": bool(ok), "verdicts": verdicts, "notes": unsupported}


def size_mb(path: Path) -> float:
    """The graph's size in MB with its external data file (``<name>.data``), if it has one."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return round((path.stat().st_size + (data.stat().st_size if data.is_file() else 0)) / 1e6, 3)


def numpy_inputs(names: list[str], batch: int, length: int, vocab_size: int = 30522, seed: int = 0) -> dict:
    """Synthetic inputs for latency runs (random ids past the special tokens, full attention)."""
    rng = np.random.default_rng(seed)
    feeds = {"input_ids": rng.integers(min(1000, vocab_size // 2), vocab_size, (batch, length), dtype=np.int64),
             "attention_mask": np.ones((batch, length), dtype=np.int64),
             "token_type_ids": np.zeros((batch, length), dtype=np.int64)}
    return {k: v for k, v in feeds.items() if k in names}
