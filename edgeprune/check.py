"""Budgets: compare an artifact's report with the budgets of its target (or given ones).

``edgeprune check DIR`` exits 0 when every budget holds and 1 with one line per violated budget; ``build``
runs the same check at the end. A budget left unset (``None``) is not checked.
"""
from __future__ import annotations

from dataclasses import asdict, fields
from pathlib import Path
from typing import Optional

from edgeprune.errors import ModelError
from edgeprune.export.layout import model_file
from edgeprune.export.targets import Budgets, _typed, read_toml, validate_budgets
from edgeprune.manifest import read_json, read_manifest


def measured(report: dict) -> dict:
    """The numbers budgets are checked against, pulled out of a report."""
    speed = report.get("speed", {})
    return {"size_mb": report.get("size", {}).get("artifact_mb"),
            "p95_latency_ms": speed.get("artifact_onnxruntime", {}).get("p95_ms"),
            "accuracy_drop": report.get("quality", {}).get("accuracy_drop_points"),
            "agreement": report.get("quality", {}).get("agreement")}


def violations(report: dict, budgets: Budgets) -> list[str]:
    """One line per violated budget (empty when all hold)."""
    m = measured(report)
    speed = report.get("speed", {})
    out = []
    if budgets.max_size_mb is not None and m["size_mb"] is not None and m["size_mb"] > budgets.max_size_mb:
        out.append(f"size {m['size_mb']:.2f} MB exceeds the budget of {budgets.max_size_mb} MB")
    if budgets.max_p95_latency_ms is not None and m["p95_latency_ms"] is not None:
        if m["p95_latency_ms"] > budgets.max_p95_latency_ms:
            out.append(f"p95 latency {m['p95_latency_ms']:.2f} ms (batch {speed.get('batch')}, "
                       f"{speed.get('sequence_length')} tokens, {speed.get('threads')} thread(s)) exceeds the budget "
                       f"of {budgets.max_p95_latency_ms} ms")
    if budgets.max_accuracy_drop is not None and m["accuracy_drop"] is not None:
        if m["accuracy_drop"] > budgets.max_accuracy_drop:
            out.append(f"accuracy drop {m['accuracy_drop']:.2f} points vs the original exceeds the budget of "
                       f"{budgets.max_accuracy_drop} points")
    if budgets.min_agreement is not None and m["agreement"] is not None and m["agreement"] < budgets.min_agreement:
        out.append(f"agreement with the original {m['agreement']:.4f} is below the budget of {budgets.min_agreement}")
    missing = [k for k, v in m.items() if v is None]
    if missing:
        out.append(f"the report has no measurement for {', '.join(missing)}")
    return out


def load_budget_file(path: str | Path) -> Budgets:
    """Budgets from a TOML file: a ``[budgets]`` table (a target profile works) or top-level keys."""
    path = Path(path)
    data = read_toml(path, "budget file")
    values = data.get("budgets", data if "budgets" not in data else {})
    values = {k: v for k, v in values.items() if not isinstance(v, dict) and k not in ("name", "description", "notes")}
    return _typed("budgets", Budgets, values, str(path))


def load_artifact(directory: str | Path) -> tuple[dict, dict]:
    """The artifact's report and manifest, both checked (:mod:`edgeprune.manifest`)."""
    directory = Path(directory)
    if not (directory / "report.json").is_file() or not (directory / "edgeprune.json").is_file():
        raise ModelError(f"{directory}: no report.json / edgeprune.json; is this an edgeprune build output?")
    manifest = read_manifest(directory)
    path = model_file(directory, manifest)
    outputs = onnx_outputs(path)
    if outputs is not None and outputs != len(manifest["labels"]):
        raise ModelError(f"{directory / 'edgeprune.json'}: {len(manifest['labels'])} labels but {path.name} has "
                         f"{outputs} outputs; rebuild the artifact")
    report = read_json(directory / "report.json", "report")
    if not isinstance(report.get("quality"), dict) or not isinstance(report.get("size"), dict):
        raise ModelError(f"{directory / 'report.json'}: no quality / size measurements; rebuild the artifact")
    return report, manifest


def onnx_outputs(path: Path) -> Optional[int]:
    """The width of the ONNX model's logits (None when the graph does not state it); a missing or unreadable
    file is a one-line error."""
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
    return (dims[-1].dim_value or None) if dims else None


def resolve_budgets(manifest: dict, budget_file: Optional[str], overrides: dict) -> Budgets:
    """The artifact's target budgets, replaced by a budget file, then by single overrides."""
    budgets = Budgets(**manifest.get("budgets", {})) if manifest.get("budgets") else Budgets()
    if budget_file:
        budgets = load_budget_file(budget_file)
    values = asdict(budgets)
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(Budgets)}
    budgets = Budgets(**{k: v for k, v in values.items() if k in known})
    validate_budgets(budgets, "budgets (--max-* / --min-agreement / --budget)")
    return budgets
