"""The artifact directory's file layout: edgeprune's own files plus the Hugging Face layout that transformers.js
(``@huggingface/transformers`` 3.x) loads as a local model, so ``pipeline('text-classification', DIR)`` in a
browser or in Node reads the same files as :class:`~edgeprune.runtime.classifier.EdgeModel`::

    onnx/model_quantized.onnx   the artifact (name by precision: transformers.js' dtype suffixes, below)
    onnx/model_fp16.onnx        a variant the target asks for (``[export] variants = ["fp16"]``: WebGPU)
    model.ort                   ORT format for ONNX Runtime Mobile (targets with ``ort_format``)
    config.json                 the exported model's config with id2label / label2id and
                                ``"transformers.js_config": {"dtype": ...}`` naming the file to load by default
    tokenizer.json, tokenizer_config.json, special_tokens_map.json
    edgeprune.json              the manifest (``model_file`` names the ONNX file), report, model card, demo/

transformers.js picks ``onnx/model{suffix}.onnx`` with the suffix of its dtype (``src/utils/dtypes.js``:
fp32 "", fp16 "_fp16", q8 "_quantized", q4 "_q4"); its default dtype is q8 in the browser (WASM) and fp32
in Node, and ``config.json``'s ``transformers.js_config.dtype`` overrides both, per device under
``device_config``. Free of PyTorch: :func:`model_file` is used by the runtime.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from edgeprune.errors import ModelError

ONNX_DIR = "onnx"
# our precision -> transformers.js dtype (its file-name suffix follows from it)
TJS_DTYPE = {"int8-dynamic": "q8", "int8-static": "q8", "fp16": "fp16", "fp32": "fp32"}
TJS_SUFFIX = {"fp32": "", "fp16": "_fp16", "q8": "_quantized"}
# model types with a ...ForSequenceClassification in transformers.js 3.8 (src/models.js,
# MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES); encoders only, so decoders' label-word classifiers and
# unfolded MoEs are run by EdgeModel, not by transformers.js' pipeline
TJS_CLASSIFIERS = ("bert", "neobert", "modernbert", "roformer", "electra", "convbert", "camembert", "deberta",
                   "deberta-v2", "mpnet", "albert", "distilbert", "roberta", "xlm", "xlm-roberta", "mobilebert")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def onnx_name(precision: str) -> str:
    """``onnx/model_quantized.onnx`` for int8, ``onnx/model_fp16.onnx`` for fp16, ``onnx/model.onnx`` for fp32."""
    return f"{ONNX_DIR}/model{TJS_SUFFIX[TJS_DTYPE[precision]]}.onnx"


def model_file(directory: Path, manifest: dict, prefer_ort: bool = False) -> Path:
    """The artifact's model file: ``model.ort`` when asked and present, else the manifest's ``model_file``
    (``model.onnx`` for artifacts built before the layout had an ``onnx/`` folder)."""
    if prefer_ort and (directory / "model.ort").is_file():
        return directory / "model.ort"
    return file_inside(directory, manifest.get("model_file", "model.onnx"), "model_file")


def file_inside(directory: Path, name, field: str) -> Path:
    """``directory / name`` for a file named by the manifest's ``field``, refused (exit 4) unless it is a relative
    path that stays inside the artifact, links resolved: an artifact never sends its reader elsewhere."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise ModelError(f"{directory / 'edgeprune.json'}: field {field!r} must be a relative path inside the "
                         "artifact; rebuild the artifact")
    path = directory / name
    if path.exists() and Path(directory).resolve() not in path.resolve().parents:
        raise ModelError(f"{directory / 'edgeprune.json'}: field {field!r} names {name}, which leads outside the "
                         "artifact; rebuild the artifact")
    return path


def transformers_js_config(precision: str, variants: list[str]) -> dict:
    """``config.json``'s ``transformers.js_config``: the artifact's dtype by default, fp16 on WebGPU when the
    fp16 variant is there."""
    cfg: dict = {"dtype": TJS_DTYPE[precision]}
    if "fp16" in variants and precision != "fp16":
        cfg["device_config"] = {"webgpu": {"dtype": "fp16"}}
    return cfg


def write_config(config_src: Path, dest: Path, labels: list[str], precision: str, variants: list[str]) -> bool:
    """``config.json`` of the exported model with the task's labels and ``transformers.js_config``; returns
    whether transformers.js has a sequence classifier for its model type."""
    config = json.loads((config_src / "config.json").read_text(encoding="utf-8"))
    config["id2label"] = {str(i): label for i, label in enumerate(labels)}
    config["label2id"] = {label: i for i, label in enumerate(labels)}
    config["transformers.js_config"] = transformers_js_config(precision, variants)
    (dest / "config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    return config.get("model_type") in TJS_CLASSIFIERS


def copy_tokenizer(src: Path, dest: Path, max_length: int) -> None:
    """The tokenizer files transformers.js and ``AutoTokenizer`` read (``tokenizer.json`` is the pruned
    vocabulary's when the build pruned it); ``model_max_length`` becomes the task's ``max_length``, where
    transformers.js' pipeline truncates, so it cuts long texts where :class:`EdgeModel` does."""
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dest / name)
    path = dest / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    config["model_max_length"] = max_length
    path.write_text(json.dumps(config, indent=1), encoding="utf-8")


def place(export_dir: Path, dest: Path, precision: str, variants: list[str]) -> list[str]:
    """Copy the export stage's files into the artifact's layout; returns the files written (relative)."""
    (dest / ONNX_DIR).mkdir(exist_ok=True)
    files = [onnx_name(precision)]
    shutil.copy2(export_dir / "model.onnx", dest / files[0])
    for v in variants:
        name = onnx_name(v)
        shutil.copy2(export_dir / f"model_{v}.onnx", dest / name)
        files.append(name)
    if (export_dir / "model.ort").is_file():
        shutil.copy2(export_dir / "model.ort", dest / "model.ort")
        files.append("model.ort")
    return files

