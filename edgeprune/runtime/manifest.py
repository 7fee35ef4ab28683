"""Reading an artifact's JSON files (``edgeprune.json``, ``report.json``) with every field checked, so that
``check``, ``predict`` and :class:`~edgeprune.runtime.classifier.EdgeModel` fail on a damaged artifact with one line naming
the file and the field (exit 4), never with a traceback. Free of PyTorch."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from edgeprune.errors import ModelError

MANIFEST = "edgeprune.json"


def read_json(path: Path, what: str) -> dict:
    """A JSON object from ``path``, or a one-line :class:`ModelError`."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path}: missing {what}; rebuild the artifact") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: the {what} is not valid JSON ({exc}); rebuild the artifact") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: the {what} is a JSON {type(data).__name__}, not an object; rebuild the artifact")
    return data


def _bad(path: Path, field: str, why: str) -> ModelError:
    return ModelError(f"{path}: field {field!r} {why}; rebuild the artifact")


MAX_THREADS = 1024
MAX_LENGTH = 1 << 20  # tokens: a manifest cannot make a reader allocate more than a long document's worth
MAX_BATCH = 4096
MAX_CONTEXT = 1 << 24
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def session_threads(requested: int) -> int:
    """A thread count for ONNX Runtime: what the artifact (or the caller) asks, at most the machine's cores."""
    return max(1, min(int(requested), os.cpu_count() or 1))


def check_against(manifest: dict, path: Path, graph_inputs: list[str], vocab_size: int) -> None:
    """The manifest against the graph and the tokenizer it ships with: the inputs it names are the graph's, and
    the padding id is a token of the vocabulary (one line, exit 4, otherwise)."""
    names = manifest.get("input_names")
    if names is not None and sorted(names) != sorted(graph_inputs):
        raise _bad(path / MANIFEST, "input_names", f"is {names} but the graph takes {graph_inputs}")
    pad = manifest.get("pad_id", 0)
    if pad >= vocab_size:
        raise _bad(path / MANIFEST, "pad_id", f"is {pad}, outside the tokenizer's {vocab_size} tokens")


def _integer(m: dict, path: Path, key: str, low: int, high: Optional[int], default: Optional[int] = None) -> None:
    """``m[key]`` (``default`` where absent) is an integer in ``[low, high]`` (no upper bound for ``high`` None)."""
    v = m.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or v < low or (high is not None and v > high):
        raise _bad(path, key, f"must be an integer from {low}" + (f" to {high}" if high is not None else " up"))


def _check_top_k(m: dict, path: Path) -> None:
    top_k = m.get("top_k")
    if top_k is not None and not (isinstance(top_k, dict) and all(
            isinstance(top_k.get(f), int) and not isinstance(top_k.get(f), bool) for f in ("default", "max"))
            and 1 <= top_k["default"] <= top_k["max"]):
        raise _bad(path, "top_k", "must be null or {\"input\": \"top_k\", \"default\": k, \"max\": Z} with 1 <= k <= Z")


def top_k_feed(manifest: dict, top_k: Optional[int]):
    """The ``top_k`` input an app feeds (int64 [1]) for ``top_k`` experts per token, or None for the model's own;
    ``ValueError`` naming the range where the artifact's routers cannot read it or ``top_k`` is outside 1..Z."""
    import numpy as np

    spec = manifest.get("top_k")
    if top_k is None:
        return None
    if not spec:
        raise ValueError(f"top_k={top_k}: this artifact's routing has a fixed top-k (one expert per layer, "
                         "ONNX Runtime's MoE operator, or a family whose graph fixes it); build a k > 1 artifact "
                         "with dense dispatch")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= spec["max"]:
        raise ValueError(f"top_k={top_k!r}: this artifact keeps {spec['max']} experts per layer; give 1.."
                         f"{spec['max']} (its own is {spec['default']})")
    return np.array([top_k], dtype=np.int64)


def read_decoder_manifest(d: Path) -> dict:
    """``edgeprune.json`` of a decoder artifact (``{}`` for a plain KV-cache export without one), checked: the
    files it names stay inside the folder, token ids are integers, the context and threads are in range."""
    from edgeprune.runtime.layout import file_inside

    if not (d / MANIFEST).is_file():
        return {}
    path = d / MANIFEST
    m = read_json(path, "manifest")
    if "model_file" in m:
        file_inside(d, m["model_file"], "model_file")
    variants = m.get("variants") or {}
    if not isinstance(variants, dict) or not all(isinstance(v, dict) for v in variants.values()):
        raise _bad(path, "variants", "must be an object of variants, each with its model_file")
    for name, v in variants.items():
        file_inside(d, v.get("model_file"), f"variants.{name}.model_file")
    eos = m.get("eos_token_ids", [])
    if not isinstance(eos, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in eos):
        raise _bad(path, "eos_token_ids", "must be a list of token ids (integers >= 0)")
    _integer(m, path, "context", 1, MAX_CONTEXT, default=1)
    _integer(m, path, "threads", 1, MAX_THREADS, default=1)
    _check_top_k(m, path)
    return m


def require_artifact(directory: str | Path) -> Path:
    """``directory`` as an artifact folder, or the one message every command gives for a missing folder and for a
    folder that is not an artifact (exit 4)."""
    d = Path(directory)
    if not d.is_dir():
        raise ModelError(f"{directory}: no such artifact folder; give the --out folder of an edgeprune build")
    if not (d / MANIFEST).is_file():
        raise ModelError(f"{directory}: not an edgeprune artifact (no {MANIFEST}); give the --out folder of an "
                         "edgeprune build")
    return d


def read_manifest(directory: str | Path) -> dict:
    """``edgeprune.json`` of an artifact, checked: labels (distinct strings), max_length (> 0), pad_id,
    fixed_shape, label_words (template + one verbaliser per label), budgets."""
    path = require_artifact(directory) / MANIFEST
    m = read_json(path, "manifest")
    labels = m.get("labels")
    if not isinstance(labels, list) or not labels or not all(isinstance(l, str) for l in labels):
        raise _bad(path, "labels", "must be a non-empty list of label names")
    if len(set(labels)) != len(labels):
        raise _bad(path, "labels", "has duplicates")
    _integer(m, path, "max_length", 1, MAX_LENGTH)
    _integer(m, path, "pad_id", 0, None, default=0)
    fixed = m.get("fixed_shape")
    if fixed is not None and not (isinstance(fixed, list) and len(fixed) == 2
                                  and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in fixed)
                                  and fixed[0] <= MAX_BATCH and fixed[1] <= MAX_LENGTH):
        raise _bad(path, "fixed_shape", f"must be null or [batch <= {MAX_BATCH}, length <= {MAX_LENGTH}] of positive "
                                        "integers")
    disabled = m.get("ort_disabled_optimizers", [])
    if not isinstance(disabled, list) or not all(isinstance(x, str) for x in disabled):
        raise _bad(path, "ort_disabled_optimizers", "must be a list of ONNX Runtime optimizer names")
    words = m.get("label_words")
    if words is not None:
        if not isinstance(words, dict) or not isinstance(words.get("template"), str) or "{text}" not in words["template"]:
            raise _bad(path, "label_words", "needs a template with {text}")
        if not isinstance(words.get("verbalisers"), list) or len(words["verbalisers"]) != len(labels):
            raise _bad(path, "label_words", "needs one verbaliser per label")
    _integer(m, path, "threads", 1, MAX_THREADS, default=1)
    names = m.get("input_names")
    if names is not None and (not isinstance(names, list) or not names or not set(names) <= set(INPUTS)):
        raise _bad(path, "input_names", f"must be a non-empty list among {', '.join(INPUTS)}")
    _check_top_k(m, path)
    budgets = m.get("budgets")
    if budgets is not None:
        from edgeprune.targets import Budgets

        known = set(Budgets.__dataclass_fields__)
        if not isinstance(budgets, dict) or set(budgets) - known:
            raise _bad(path, "budgets", f"must be an object with keys among {', '.join(sorted(known))}")
    return m


def vocab_size(directory: Path) -> int:
    """The artifact tokenizer's vocabulary size (``check`` reads only the vocabulary of tokenizer.json)."""
    try:
        vocab = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
        return len(vocab)
    except (OSError, ValueError, KeyError, TypeError):
        raise ModelError(f"{directory / 'tokenizer.json'}: missing or not a tokenizer; rebuild the artifact") from None


def graph_io(path: Path) -> tuple[Optional[int], list[str]]:
    """The width of the ONNX model's logits (None when the graph does not state it) and the graph's input names;
    a missing or unreadable file is a one-line error."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except FileNotFoundError:
        raise ModelError(f"{path}: missing; rebuild the artifact") from None
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ModelError(f"{path}: not a readable ONNX model ({type(exc).__name__}); rebuild the artifact") from None
    if not model.graph.output:
        raise ModelError(f"{path}: not a readable ONNX model (no graph outputs); rebuild the artifact")
    dims = model.graph.output[0].type.tensor_type.shape.dim
    inits = {i.name for i in model.graph.initializer}
    return (dims[-1].dim_value or None) if dims else None, [i.name for i in model.graph.input if i.name not in inits]
