"""Registry of verifiable tasks."""
from __future__ import annotations

from .addition import AdditionTask
from .base import CharTokenizer, Problem, Task, pad_rows
from .running_sum import RunningSumTask

TASKS = {"addition": AdditionTask, "running_sum": RunningSumTask}


def make_task(name: str, **options) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: choose one of {sorted(TASKS)}")
    return TASKS[name](**options)


__all__ = ["TASKS", "AdditionTask", "CharTokenizer", "Problem", "RunningSumTask", "Task", "make_task", "pad_rows"]
