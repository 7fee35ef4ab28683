"""Budgets: compare an artifact's report with the budgets of its target (or given ones).

``edgeprune check DIR`` exits 0 when every budget holds and 1 with one line per violated budget; ``build``
runs the same check at the end. A budget left unset (``None``) is not checked.
"""
from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Optional

from edgeprune.errors import ConfigError, ModelError
from edgeprune.runtime.layout import model_file
from edgeprune.targets import Budgets, _typed, read_toml, validate_budgets
from edgeprune.runtime.manifest import check_against, graph_io, read_json, read_manifest, vocab_size


def measured(report: dict) -> dict:
    """The numbers budgets are checked against, pulled out of a report."""
    speed = report.get("speed", {})
    return {"size_mb": report.get("size", {}).get("artifact_mb"),
            "p95_latency_ms": speed.get("artifact_onnxruntime", {}).get("p95_ms"),
            "accuracy_drop": report.get("quality", {}).get("accuracy_drop_points"),
            "agreement": report.get("quality", {}).get("agreement")}


def over(checks, budgets) -> list[str]:
    """One line per check ``(budget key, measured value, '>' or '<', line(value, limit))`` whose budget is set,
    whose value was measured and that fails (a value above a ``max_`` budget, below a ``min_`` one)."""
    out = []
    for key, value, op, line in checks:
        limit = getattr(budgets, key)
        if limit is None or value is None:
            continue
        if (value > limit) if op == ">" else (value < limit):
            out.append(line(value, limit))
    return out


def violations(report: dict, budgets: Budgets) -> list[str]:
    """One line per violated budget of a classifier artifact (empty when all hold)."""
    m = measured(report)
    speed = report.get("speed", {})
    out = over((
        ("max_size_mb", m["size_mb"], ">", lambda v, b: f"size {v:.2f} MB exceeds the budget of {b} MB"),
        ("max_p95_latency_ms", m["p95_latency_ms"], ">",
         lambda v, b: f"p95 latency {v:.2f} ms (batch {speed.get('batch')}, {speed.get('sequence_length')} tokens, "
                      f"{speed.get('threads')} thread(s)) exceeds the budget of {b} ms"),
        ("max_accuracy_drop", m["accuracy_drop"], ">",
         lambda v, b: f"accuracy drop {v:.2f} points vs the original exceeds the budget of {b} points"),
        ("min_agreement", m["agreement"], "<",
         lambda v, b: f"agreement with the original {v:.4f} is below the budget of {b}")), budgets)
    missing = [k for k, v in m.items() if v is None]
    if missing:
        out.append(f"the report has no measurement for {', '.join(missing)}")
    return out


def decoder_violations(report: dict, spec) -> list[str]:
    """One line per violated ``[generate]`` budget (``spec``, a :class:`~edgeprune.targets.GenerateSpec`) of a
    decoder artifact's graph."""
    m, v = report["validation"]["models"]["artifact"], report["validation"]
    rows = (("max_size_mb", report["size"]["artifact_mb"], ">", "size {:.2f} MB"),
            ("max_perplexity_ratio", m["perplexity_ratio"], ">", "perplexity {:.4g}x the original's"),
            ("max_quantization_perplexity_ratio", v.get("quantization_perplexity_ratio"), ">",
             "perplexity {:.4g}x the fp32 graph's"),
            ("min_next_token_agreement", m["next_token_agreement"], "<", "next-token agreement {:.4f}"),
            ("max_label_accuracy_drop", v.get("label_accuracy_drop_points"), ">", "label accuracy drop {:.2f} points"),
            ("min_decode_speedup", m.get("decode_speedup"), "<", "decode speed {:.2f}x the original's"),
            ("max_ttft_ms", m["ttft_ms"], ">", "time to first token {:.2f} ms"))
    return over(((key, value, op, lambda x, b, key=key, op=op, what=what:
                  f"{what.format(x)} {'exceeds' if op == '>' else 'is below'} the budget {key} = {b}")
                 for key, value, op, what in rows), spec)


def load_budget_file(path: str | Path) -> Budgets:
    """Budgets from a TOML file: a ``[budgets]`` table (a target profile works) or top-level keys."""
    path = Path(path)
    data = read_toml(path, "budget file")
    values = data.get("budgets", data if "budgets" not in data else {})
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: budgets = {values!r} should be a [budgets] table (e.g. max_size_mb = 30)")
    values = {k: v for k, v in values.items() if not isinstance(v, dict) and k not in ("name", "description", "notes")}
    return _typed("budgets", Budgets, values, str(path))


def load_artifact(directory: str | Path) -> tuple[dict, dict]:
    """The artifact's report and manifest, both checked (:mod:`edgeprune.runtime.manifest`)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if not (directory / "report.json").is_file():
        raise ModelError(f"{directory / 'report.json'}: missing; rebuild the artifact")
    path = model_file(directory, manifest)
    outputs, inputs = graph_io(path)
    if outputs is not None and outputs != len(manifest["labels"]):
        raise ModelError(f"{directory / 'edgeprune.json'}: {len(manifest['labels'])} labels but {path.name} has "
                         f"{outputs} outputs; rebuild the artifact")
    check_against(manifest, directory, inputs, vocab_size(directory))
    report = read_json(directory / "report.json", "report")
    if not isinstance(report.get("quality"), dict) or not isinstance(report.get("size"), dict):
        raise ModelError(f"{directory / 'report.json'}: no quality / size measurements; rebuild the artifact")
    return report, manifest


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


def is_decoder_artifact(directory) -> bool:
    path = Path(directory) / "edgeprune.json"
    try:
        return json.loads(path.read_text()).get("kind") == "causal-lm"
    except (OSError, ValueError, AttributeError):
        return False


def check_decoder(directory, budget_file=None, max_size_mb=None) -> list[str]:
    """``edgeprune check`` of a decoder artifact: its report against the ``[generate]`` budgets it was built with,
    those of ``budget_file``'s ``[generate]`` table instead, and ``max_size_mb``."""
    from dataclasses import replace

    from edgeprune.targets import GenerateSpec

    directory = Path(directory)
    try:
        report = json.loads((directory / "report.json").read_text())
        report["validation"]["models"]["artifact"], report["size"]["artifact_mb"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ModelError(f"{directory / 'report.json'}: missing or without the decoder measurements; rebuild the "
                         "artifact") from None
    if budget_file:
        table = read_toml(Path(budget_file), "budget file").get("generate", {})
        spec = _typed("generate", GenerateSpec, {k: v for k, v in table.items() if GenerateSpec.is_budget(k)},
                      str(budget_file))
    else:
        spec = GenerateSpec(**{k: v for k, v in (report.get("budgets") or {}).items()
                               if k in GenerateSpec.__dataclass_fields__})
    if max_size_mb is not None:
        spec = replace(spec, max_size_mb=max_size_mb)
    return decoder_violations(report, spec)


def check(directory, budget_file: Optional[str], overrides: dict) -> list[str]:
    """``edgeprune check``: the violated budgets of a classifier or a decoder artifact (its own kind's); a missing
    folder or one that is not an artifact gets the runtime's one message (:func:`read_manifest`)."""
    if is_decoder_artifact(directory):  # a `build --generate` artifact: its [generate] budgets
        return check_decoder(directory, budget_file, overrides.get("max_size_mb"))
    report, manifest = load_artifact(directory)
    return violations(report, resolve_budgets(manifest, budget_file, overrides))
