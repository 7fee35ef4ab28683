"""A checkpoint's labels matched to the task's by name, not by count.

A classifier's ``config.json`` names its outputs (``id2label``). They are mapped onto the task's labels by name
(case and surrounding spaces ignored); transformers' placeholders (``LABEL_0``, ``LABEL_1``, ...) and bare
indices say nothing about meaning and are taken in order. A checkpoint whose names are the task's in another
order is loaded with its head's rows permuted into the task's order, so every stage and the artifact's outputs
follow the task. Names that are not the task's are refused (exit 4) unless the user maps them
(``--label-map checkpoint_name=task_label,...``).
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

from edgeprune.errors import ConfigError, ModelError

_PLACEHOLDER = re.compile(r"^(label_)?\d+$")


def parse_label_map(text: Optional[str]) -> Optional[tuple[tuple[str, str], ...]]:
    """``--label-map pos=positive,neg=negative`` as pairs (checkpoint name, task label)."""
    if not text:
        return None
    pairs = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, label = part.partition("=")
        if not sep or not name.strip() or not label.strip():
            raise ConfigError(f"--label-map {text!r}: give checkpoint_name=task_label pairs, e.g. pos=positive,neg=negative")
        pairs.append((name.strip(), label.strip()))
    return tuple(pairs)


def label_order(id2label: dict, task, label_map=None, where: str = "config.json") -> Optional[list[int]]:
    """For each task label (in the task's order) the checkpoint output that holds it; None where that is the
    identity. A one-line :class:`ModelError` when the names cannot be matched."""
    n = len(task.labels)
    names = {int(i): str(v).strip() for i, v in id2label.items()}
    if sorted(names) != list(range(n)):
        return None  # the count is checked elsewhere (check_model_labels)
    mapping = {a.lower(): b.lower() for a, b in (label_map or ())}
    task_names = [t.lower() for t in task.labels]
    for a, b in (label_map or ()):
        if b.lower() not in task_names:
            raise ConfigError(f"--label-map {a}={b}: {b!r} is not a label of task {task.name} ({', '.join(task.labels)})")
    given = [mapping.get(names[i].lower(), names[i].lower()) for i in range(n)]
    if all(_PLACEHOLDER.match(g) for g in given):
        return None  # LABEL_0, LABEL_1, ...: positional
    if sorted(given) != sorted(task_names):
        raise ModelError(f"{where}: the checkpoint's labels {[names[i] for i in range(n)]} are not task {task.name}'s "
                         f"({', '.join(task.labels)}); map them with --label-map NAME=LABEL,... or re-save the "
                         "checkpoint with the task's id2label")
    order = [given.index(t) for t in task_names]
    return None if order == list(range(n)) else order


def reorder_head(model, order: Sequence[int], task) -> None:
    """Permute the rows of ``model``'s classification head (its last Linear with one row per label) into the
    task's label order, and name them as the task does."""
    import torch

    n = len(order)
    heads = [(name, m) for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and m.out_features == n and name.split(".")[-1] in
             ("classifier", "score", "out_proj", "classification_head")]
    if not heads:
        raise ModelError(f"{type(model).__name__}: no classification head to put into task {task.name}'s label "
                         "order; re-save the checkpoint with the task's id2label")
    head = heads[-1][1]
    idx = torch.tensor(list(order))
    with torch.no_grad():
        head.weight.copy_(head.weight[idx])
        if head.bias is not None:
            head.bias.copy_(head.bias[idx])
    model.config.id2label = dict(enumerate(task.labels))
    model.config.label2id = {label: i for i, label in enumerate(task.labels)}
