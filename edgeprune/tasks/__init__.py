"""Tasks: which labels, which text columns, which data (see :mod:`edgeprune.tasks.registry`)."""
from edgeprune.tasks.registry import TASKS, Task, get_task
from edgeprune.tasks.loading import Example, load_split, read_table

__all__ = ["TASKS", "Task", "get_task", "Example", "load_split", "read_table"]
