"""Target profiles are data: ``targets/<name>.toml`` (one per target, reasoning in ``notes``).

Schema (every key checked; an unknown key or a bad value is a one-line error naming it)::

    name, description, notes
    [export]        opset, fixed_shapes, batch_size, sequence_length, moe_operator = "dense" | "ort" | "qmoe"
                    (k > 1: experts by dense dispatch, in com.microsoft.MoE with fp32 weights, or in QMoE),
                    variants = ["fp16"] (extra ONNX files beside the artifact: fp16 for WebGPU)
    [quantization]  precision = "int8-dynamic" | "int8-static" | "fp16" | "fp32", per_channel, reduce_range,
                    quantize_embeddings, embedding_bits = 8 | 4, calibration_examples, moe_bits = 8 | 4 (the
                    expert weights in QMoE where moe_operator = "qmoe")
    [optimization]  fuse (ORT transformer fusions: Attention, SkipLayerNorm, BiasGelu, EmbedLayerNorm),
                    skip_layer_norm (false: keep residual Add + LayerNormalization unfused, also at session
                    load), gelu_approximation (BiasGelu -> FastGelu, the tanh form)
    [runtime]       provider, ort_format, threads, mobile_usability
    [prune]         vocab_reserve, drop_layers, heads_keep, ffn_keep, recovery_steps: the target's preset,
                    used by ``build`` where the command line does not give the option
    [budgets]       max_size_mb, max_p95_latency_ms, latency_batch, latency_seq_len, max_accuracy_drop,
                    min_agreement
    [generate]      decoder artifacts (``build --generate``): weights = "int4" | "int8" | "fp32" (the artifact's
                    graph: weight-only MatMulNBits), variants (more of those beside it), exporter = "auto" |
                    "genai" | "torch.onnx" (the fp32 graph: onnxruntime-genai's model builder, fused, where it
                    writes the architecture; torch.onnx otherwise; "optimum" is read as "torch.onnx"),
                    moe_operator = "auto" | "dense" | "qmoe" (k > 1 experts: dense dispatch, every kept expert
                    a MatMulNBits pair; or com.microsoft.MoE in the fp32 graph and QMoE with the variant's bits,
                    written by the model builder for its MoE families and by edgeprune's own export for those
                    that map onto the operator; "auto": the builder's operator where it writes the family,
                    dense dispatch elsewhere), block_size,
                    accuracy_level, algorithm = "rtn" | "hqq" | "gptq" (int4; an int8 graph takes rtn;
                    calibration_examples: GPTQ's training sequences), symmetric (false: a zero point per block),
                    embedding_weights = "int4" | "fp32" (the word embedding as
                    4-bit GatherBlockQuantized, or left as it is), new_tokens (decode speed), parity_atol; budgets
                    max_size_mb, max_perplexity_ratio (vs the original), max_quantization_perplexity_ratio (vs the
                    fp32 graph), min_next_token_agreement, max_label_accuracy_drop (points), min_decode_speedup
                    (vs the original in PyTorch), max_ttft_ms
"""
from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

from edgeprune.errors import ConfigError

PRECISIONS = ("int8-dynamic", "int8-static", "fp16", "fp32")
MOE_OPERATORS = ("dense", "ort", "qmoe")
VARIANTS = ("fp16",)
OPSETS = (14, 20)


@dataclass
class ExportSpec:
    opset: int = 17
    fixed_shapes: bool = False
    batch_size: int = 1
    sequence_length: int = 64
    moe_operator: str = "dense"  # k > 1: "ort" / "qmoe" (com.microsoft.MoE / QMoE where the family maps onto it)
    variants: list = field(default_factory=list)  # extra precisions exported beside the artifact ("fp16")


@dataclass
class QuantSpec:
    precision: str = "int8-dynamic"
    per_channel: bool = True
    reduce_range: bool = False
    quantize_embeddings: bool = True
    embedding_bits: int = 8  # 8: with the int8 dynamic quantizer; 4: GatherBlockQuantized (int8-dynamic only)
    calibration_examples: int = 256
    moe_bits: int = 8  # expert weights inside QMoE (export.moe_operator = "qmoe"): 8 or 4


@dataclass
class OptimSpec:
    fuse: bool = True
    skip_layer_norm: bool = True
    gelu_approximation: bool = False

    @property
    def ort_disabled_optimizers(self) -> list[str]:
        """ONNX Runtime optimizers every session of the artifact must disable (ORT would otherwise fuse
        Add + LayerNormalization into SkipLayerNormalization again when it loads the model)."""
        return [] if self.skip_layer_norm else ["SkipLayerNormFusion"]


@dataclass
class RuntimeSpec:
    provider: str = "CPUExecutionProvider"
    ort_format: bool = False
    threads: int = 1
    mobile_usability: bool = False


@dataclass
class PruneSpec:
    """Knobs of the prune stage that a target presets (the command line's options win; None: the option's
    own default)."""

    vocab_reserve: Optional[int] = None
    drop_layers: Optional[int] = None
    heads_keep: Optional[float] = None
    ffn_keep: Optional[float] = None
    recovery_steps: Optional[int] = None

    def presets(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class Budgets:
    max_size_mb: Optional[float] = None
    max_p95_latency_ms: Optional[float] = None
    latency_batch: int = 1
    latency_seq_len: int = 64
    max_accuracy_drop: Optional[float] = None
    min_agreement: Optional[float] = None


WEIGHTS = ("int4", "int8", "fp32")
ALGORITHMS = ("rtn", "hqq", "gptq")
GENERATE_MOE_OPERATORS = ("auto", "dense", "qmoe")


@dataclass
class GenerateSpec:
    """How a decoder artifact's weights are stored and what it must reach (see the module docstring)."""

    weights: str = "int4"
    variants: list = field(default_factory=list)
    exporter: str = "auto"  # the fp32 graph: "genai" (onnxruntime-genai's model builder), "torch.onnx", "auto" (genai where it can)
    moe_operator: str = "auto"  # k > 1 experts: "dense" dispatch, "qmoe" (com.microsoft.MoE / QMoE), "auto" (the exporter's)
    block_size: int = 32
    accuracy_level: int = 0  # MatMulNBits: 0 the kernel's default, 1 fp32, 2 fp16, 3 bf16, 4 int8 compute
    algorithm: str = "rtn"
    symmetric: bool = True  # rtn / gptq: no zero point (false: a zero point per block)
    embedding_weights: str = "int4"
    new_tokens: int = 32
    calibration_examples: int = 32  # gptq: training-split sequences the fp32 graph runs over
    parity_atol: float = 1e-3
    max_size_mb: Optional[float] = None
    max_perplexity_ratio: Optional[float] = None
    max_quantization_perplexity_ratio: Optional[float] = None
    min_next_token_agreement: Optional[float] = None
    max_label_accuracy_drop: Optional[float] = None
    min_decode_speedup: Optional[float] = None
    max_ttft_ms: Optional[float] = None

    def precisions(self) -> list[str]:
        return [self.weights] + [v for v in self.variants if v != self.weights]

    @staticmethod
    def is_budget(key: str) -> bool:
        return key.startswith(("max_", "min_"))

    def settings(self, budgets: bool = False) -> dict:
        """The budgets (``budgets``) or everything else: how the weights are made."""
        return {k: v for k, v in asdict(self).items() if self.is_budget(k) == budgets}


@dataclass
class Target:
    name: str
    description: str = ""
    notes: str = ""
    export: ExportSpec = field(default_factory=ExportSpec)
    quantization: QuantSpec = field(default_factory=QuantSpec)
    optimization: OptimSpec = field(default_factory=OptimSpec)
    runtime: RuntimeSpec = field(default_factory=RuntimeSpec)
    prune: PruneSpec = field(default_factory=PruneSpec)
    budgets: Budgets = field(default_factory=Budgets)
    generate: GenerateSpec = field(default_factory=GenerateSpec)
    source: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


SECTIONS = {"export": ExportSpec, "quantization": QuantSpec, "optimization": OptimSpec, "runtime": RuntimeSpec,
            "prune": PruneSpec, "budgets": Budgets, "generate": GenerateSpec}


def targets_dir() -> Path:
    """``$EDGEPRUNE_TARGETS`` or the repository's ``targets/``."""
    import os

    return Path(os.environ.get("EDGEPRUNE_TARGETS", Path(__file__).resolve().parents[1] / "targets"))


def available() -> dict[str, Path]:
    return {p.stem: p for p in sorted(targets_dir().glob("*.toml"), key=lambda p: p.stem)}


def _typed(section: str, cls, values: dict, where: str):
    """``cls(**values)`` with every field's type checked (one line naming the file and the field), then the
    section's own checks (:data:`_SECTION_CHECKS`)."""
    known = {f.name: f for f in fields(cls)}
    out = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{where}: unknown field [{section}].{key} (known: {', '.join(known)})")
        default = getattr(cls(), key)
        expected = type(default) if default is not None else (int, float)
        ok = isinstance(value, expected) and not (isinstance(value, bool) and expected in (int, float, (int, float)))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise ConfigError(f"{where}: [{section}].{key} = {value!r} should be "
                              f"{getattr(expected, '__name__', 'a number')}")
        out[key] = value
    obj = cls(**out)
    check = _SECTION_CHECKS.get(section)
    if check is not None:
        check(obj, where, values)
    return obj


PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "MIGraphXExecutionProvider",
             "OpenVINOExecutionProvider", "DnnlExecutionProvider", "VitisAIExecutionProvider", "QNNExecutionProvider",
             "NnapiExecutionProvider", "VSINPUExecutionProvider", "JsExecutionProvider", "CoreMLExecutionProvider",
             "DmlExecutionProvider", "RknpuExecutionProvider", "WebNNExecutionProvider", "WebGpuExecutionProvider",
             "XnnpackExecutionProvider", "CANNExecutionProvider", "AzureExecutionProvider", "CPUExecutionProvider")
"""``onnxruntime.get_all_providers()`` of ONNX Runtime 1.32, so that reading a profile does not import it
(tests/test_layout.py checks the two agree)."""


def _check_quantization(obj, where: str, values: dict) -> None:
    if obj.precision not in PRECISIONS:
        raise ConfigError(f"{where}: [quantization].precision {obj.precision!r} is not one of {', '.join(PRECISIONS)}")
    if obj.embedding_bits not in (4, 8):
        raise ConfigError(f"{where}: [quantization].embedding_bits {obj.embedding_bits} is not 4 or 8")
    if obj.embedding_bits == 4 and obj.precision != "int8-dynamic":
        raise ConfigError(f"{where}: [quantization].embedding_bits = 4 goes with precision int8-dynamic "
                          f"(not {obj.precision})")
    if obj.moe_bits not in (4, 8):
        raise ConfigError(f"{where}: [quantization].moe_bits {obj.moe_bits} is not 4 or 8")
    if "calibration_examples" in values:
        if obj.precision != "int8-static":
            raise ConfigError(f"{where}: [quantization].calibration_examples is used only by int8-static "
                              f"(precision is {obj.precision}); remove it")
        if obj.calibration_examples < 1:
            raise ConfigError(f"{where}: [quantization].calibration_examples must be >= 1")


def _check_export(obj, where: str, values: dict) -> None:
    if obj.moe_operator not in MOE_OPERATORS:
        raise ConfigError(f"{where}: [export].moe_operator {obj.moe_operator!r} is not one of "
                          f"{', '.join(MOE_OPERATORS)}")
    if not OPSETS[0] <= obj.opset <= OPSETS[1]:
        raise ConfigError(f"{where}: [export].opset {obj.opset} is outside {OPSETS[0]}-{OPSETS[1]} (transformers' "
                          f"attention needs {OPSETS[0]}; torch.onnx's exporter stops at {OPSETS[1]})")
    for v in obj.variants:
        if v not in VARIANTS:
            raise ConfigError(f"{where}: [export].variants: {v!r} is not one of {', '.join(VARIANTS)}")
    for key in ("batch_size", "sequence_length"):
        if getattr(obj, key) < 1:
            raise ConfigError(f"{where}: [export].{key} must be >= 1, got {getattr(obj, key)}")


def _check_runtime(obj, where: str, values: dict) -> None:
    if obj.threads < 1:
        raise ConfigError(f"{where}: [runtime].threads must be >= 1")
    if obj.provider not in PROVIDERS:
        raise ConfigError(f"{where}: [runtime].provider {obj.provider!r} is not an ONNX Runtime execution provider "
                          "(e.g. CPUExecutionProvider, XnnpackExecutionProvider, CoreMLExecutionProvider)")


def _check_prune(obj, where: str, values: dict) -> None:
    for key in ("vocab_reserve", "drop_layers", "recovery_steps"):
        v = getattr(obj, key)
        if v is not None and (not isinstance(v, int) or v < 0):
            raise ConfigError(f"{where}: [prune].{key} = {v!r} should be an integer >= 0")
    for key in ("heads_keep", "ffn_keep"):
        v = getattr(obj, key)
        if v is not None and not 0 < v <= 1:
            raise ConfigError(f"{where}: [prune].{key} = {v!r} should be in (0, 1]")


def validate_generate(g: GenerateSpec, where: str) -> None:
    """[generate]: known precisions and algorithm, block size a power of two >= 16, budgets in range."""
    import math

    for v in g.precisions():
        if v not in WEIGHTS:
            raise ConfigError(f"{where}: [generate] precision {v!r} is not one of {', '.join(WEIGHTS)}")
    if g.exporter not in ("auto", "genai", "torch.onnx", "optimum"):  # optimum: the name before transformers 5
        raise ConfigError(f"{where}: [generate].exporter {g.exporter!r} is not one of auto, genai, torch.onnx")
    if g.moe_operator not in GENERATE_MOE_OPERATORS:
        raise ConfigError(f"{where}: [generate].moe_operator {g.moe_operator!r} is not one of "
                          f"{', '.join(GENERATE_MOE_OPERATORS)}")
    if g.algorithm not in ALGORITHMS:
        raise ConfigError(f"{where}: [generate].algorithm {g.algorithm!r} is not one of {', '.join(ALGORITHMS)}")
    if g.block_size < 16 or g.block_size & (g.block_size - 1):
        raise ConfigError(f"{where}: [generate].block_size {g.block_size} must be a power of two >= 16")
    if g.accuracy_level not in range(5):
        raise ConfigError(f"{where}: [generate].accuracy_level {g.accuracy_level} must be 0-4")
    if g.embedding_weights not in ("int4", "fp32"):
        raise ConfigError(f"{where}: [generate].embedding_weights {g.embedding_weights!r} must be int4 or fp32")
    if g.calibration_examples < 1:
        raise ConfigError(f"{where}: [generate].calibration_examples must be >= 1")
    if g.new_tokens < 2:
        raise ConfigError(f"{where}: [generate].new_tokens must be >= 2 (decode speed needs a second token)")
    for key in ("parity_atol", "max_size_mb", "max_perplexity_ratio", "max_quantization_perplexity_ratio",
                "min_decode_speedup", "max_ttft_ms", "max_label_accuracy_drop", "min_next_token_agreement"):
        v = getattr(g, key)
        if v is not None and (not math.isfinite(v) or v < 0 or (v == 0 and key != "max_label_accuracy_drop")):
            raise ConfigError(f"{where}: [generate].{key} = {v} must be a finite number > 0")
    if g.min_next_token_agreement is not None and g.min_next_token_agreement > 1:
        raise ConfigError(f"{where}: [generate].min_next_token_agreement = {g.min_next_token_agreement} must be at "
                          "most 1 (a share)")


def validate_budgets(b: "Budgets", where: str) -> None:
    """Budgets are finite and in range: sizes and latencies > 0, accuracy drop >= 0, agreement in [0, 1]."""
    import math

    rules = {"max_size_mb": (0, False), "max_p95_latency_ms": (0, False), "max_accuracy_drop": (0, True),
             "min_agreement": (0, True)}
    for key, (low, inclusive) in rules.items():
        v = getattr(b, key)
        if v is None:
            continue
        if not math.isfinite(v) or v < low or (v == low and not inclusive):
            raise ConfigError(f"{where}: budget {key} = {v} must be a finite number {'>=' if inclusive else '>'} {low}")
    if b.min_agreement is not None and b.min_agreement > 1:
        raise ConfigError(f"{where}: budget min_agreement = {b.min_agreement} must be at most 1 (a share)")
    for key in ("latency_batch", "latency_seq_len"):
        if getattr(b, key) < 1:
            raise ConfigError(f"{where}: budget {key} must be >= 1, got {getattr(b, key)}")


def read_toml(path: Path, what: str) -> dict:
    """Parse a TOML file or raise a one-line error naming it."""
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None


def load_target(name_or_path: str) -> Target:
    """A target by name (``targets/<name>.toml``) or by path to a custom TOML file."""
    path = Path(name_or_path)
    if not (path.suffix == ".toml" or path.exists()):
        known = available()
        if name_or_path not in known:
            raise ConfigError(f"unknown target {name_or_path!r}; known: {', '.join(known)} "
                              f"(or give a path to a .toml profile)")
        path = known[name_or_path]
    data = read_toml(path, "target profile")
    where = str(path)
    top = {k: v for k, v in data.items() if k not in SECTIONS}
    for key in top:
        if key not in ("name", "description", "notes"):
            raise ConfigError(f"{where}: unknown field {key!r} (sections: {', '.join(SECTIONS)})")
    sections = {}
    for sec, cls in SECTIONS.items():
        values = data.get(sec, {})
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: [{sec}] must be a table")
        sections[sec] = _typed(sec, cls, values, where)
    if sections["quantization"].precision in sections["export"].variants:
        raise ConfigError(f"{where}: [export].variants repeats the precision {sections['quantization'].precision!r}; "
                          "remove it")
    return Target(name=str(top.get("name", path.stem)), description=str(top.get("description", "")),
                  notes=str(top.get("notes", "")), source=str(path), **sections)


_SECTION_CHECKS = {"quantization": _check_quantization, "export": _check_export, "runtime": _check_runtime,
                   "prune": _check_prune, "budgets": lambda obj, where, values: validate_budgets(obj, where),
                   "generate": lambda obj, where, values: validate_generate(obj, where)}
