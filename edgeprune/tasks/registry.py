"""The task registry: one :class:`Task` per supported task.

The project ships its own copy of the sst2, agnews, rte and mnli data (``edgeprune/tasks/data/<task>/*.tsv.gz``,
copied from the team's shared data) so that a clone works without any download. mnli's is a subset: 29,169
training pairs and half of dev_matched as validation (``data/mnli/README.md``; the other half is held out, not
shipped). ``completion`` ships no data: it works when the user passes ``--train-file``/``--eval-file``.

agnews ships no validation split, so a fixed, seeded 10% of its training file is held out as validation
(:data:`AGNEWS_VALIDATION_SEED`); the same rows are always excluded from training.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from edgeprune.errors import ConfigError

AGNEWS_VALIDATION_SEED = 20240601
AGNEWS_VALIDATION_FRACTION = 0.1


@dataclass(frozen=True)
class Task:
    """A classification task.

    ``text_columns`` names one column (single sentence) or two (sentence pair), ``labels`` is the ordered
    label list (index = class id). ``header`` tells whether the shipped files have a header row; files
    without one use ``columns`` positionally. ``max_length`` is the token budget used for training and export:
    short where the task allows, which is the main CPU speed lever. ``train_steps`` is the default
    fine-tuning budget (batch 32) of the original and the dense baseline on 2 CPU cores.
    """

    name: str
    text_columns: tuple[str, ...]
    label_column: str
    labels: tuple[str, ...]
    max_length: int
    train_steps: int = 800
    shipped_splits: tuple[str, ...] = ()
    header: bool = True
    columns: tuple[str, ...] = ()
    label_aliases: dict[str, str] = field(default_factory=dict)
    carve_validation: bool = False
    description: str = ""

    @property
    def is_pair(self) -> bool:
        return len(self.text_columns) == 2

    @property
    def num_labels(self) -> int:
        return len(self.labels)


TASKS: dict[str, Task] = {
    "sst2": Task(
        name="sst2",
        text_columns=("sentence",),
        label_column="label",
        labels=("negative", "positive"),
        label_aliases={"0": "negative", "1": "positive"},
        max_length=64,
        shipped_splits=("train", "validation"),
        description="GLUE SST-2 binary sentiment (single sentence)",
    ),
    "agnews": Task(
        name="agnews",
        text_columns=("text",),
        label_column="label",
        labels=("World", "Sports", "Business", "Sci/Tech"),
        label_aliases={"0": "World", "1": "Sports", "2": "Business", "3": "Sci/Tech"},
        max_length=96,
        train_steps=600,
        shipped_splits=("train",),
        header=False,
        columns=("text", "label"),
        carve_validation=True,
        description="AG News topic classification, 4 classes (validation carved from train, seeded)",
    ),
    "rte": Task(
        name="rte",
        text_columns=("sentence1", "sentence2"),
        label_column="label",
        labels=("entailment", "not_entailment"),
        label_aliases={"0": "entailment", "1": "not_entailment"},
        max_length=128,
        train_steps=400,
        shipped_splits=("train", "validation"),
        description="GLUE RTE textual entailment (sentence pair)",
    ),
    "mnli": Task(
        name="mnli",
        text_columns=("premise", "hypothesis"),
        label_column="label",
        labels=("entailment", "neutral", "contradiction"),
        label_aliases={"0": "entailment", "1": "neutral", "2": "contradiction"},
        max_length=128,
        train_steps=1200,
        shipped_splits=("train", "validation"),
        description="MultiNLI (premise/hypothesis, 3 labels): 29,169 training pairs, half of dev_matched as validation",
    ),
    "completion": Task(
        name="completion",
        text_columns=("prompt",),
        label_column="completion",
        labels=(),
        max_length=256,
        description="your own prompts and completions, for --generate: --train-file/--eval-file JSONL with "
                    "prompt/completion or chat messages per line",
    ),
}


def get_task(name: str) -> Task:
    """Return the task called ``name`` or raise a one-line :class:`ConfigError` listing the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None
