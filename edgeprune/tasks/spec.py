"""Which data a task runs on: the shipped splits, or the user's files with their columns (:class:`DataSpec`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from edgeprune.cache import file_sha256
from edgeprune.tasks.loading import Columns, load_split
from edgeprune.tasks.registry import Task


@dataclass
class DataSpec:
    """Which data a task runs on: shipped, or the user's files with their columns."""

    train_file: Optional[str] = None
    eval_file: Optional[str] = None
    columns: Optional[Columns] = None
    selection: bool = False  # the search's splits: "validation" = a seeded 10% of train, "train" = the rest

    def key(self) -> dict:
        key = {"train": file_sha256(self.train_file) if self.train_file else None,
               "eval": file_sha256(self.eval_file) if self.eval_file else None,
               "columns": self.columns.__dict__ if self.columns else None}
        return dict(key, selection=True) if self.selection else key

    @property
    def validation_name(self) -> str:
        """What ``load(task, "validation")`` returns, as reports name it."""
        return "selection split (a seeded 10% of the training split)" if self.selection else "validation split"

    def load(self, task: Task, split: str, limit: Optional[int] = None):
        if self.selection:
            from edgeprune.tasks.loading import load_selection_split

            return load_selection_split(task, split, self.train_file, self.columns, limit=limit)
        return load_split(task, split, self.train_file, self.eval_file, self.columns, limit=limit)


def resolve_data(task_name: str, train_file=None, eval_file=None, text_column=None, text_pair_column=None,
                 label_column=None, generate: bool = False) -> tuple[Task, DataSpec]:
    """The task and its data from the command line's options, every file read once so that bad data fail with
    one line before any model work; generation files (prompt / completion or chat lines) only with ``generate``."""
    from edgeprune.errors import DataError
    from edgeprune.tasks.generation import is_generation_file, read_generation_file
    from edgeprune.tasks.registry import get_task

    task = get_task(task_name)
    columns = None
    if text_column or text_pair_column or label_column:
        columns = Columns.for_task(task, text_column, text_pair_column, label_column)
    data = DataSpec(train_file, eval_file, columns)
    for split, f in (("train", train_file), ("validation", eval_file)):
        if is_generation_file(f):
            if not generate:
                raise DataError(f"{f}: prompt / completion (or chat messages) lines are generation data; add "
                                "--generate")
            read_generation_file(f)
        else:
            data.load(task, split)
    return task, data
