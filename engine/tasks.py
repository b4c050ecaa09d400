"""The built-in tasks by name, and what the algorithms may ask of a task.

``data=builtin:NAME`` (training and held-out rows) and ``rewards=builtin:NAME`` (the
verifiable reward) resolve through ``BUILTIN_TASKS``; each task is a frozen dataclass
that checks its own settings and follows the ``Task`` protocol below, so an algorithm
written against it runs on any built-in task.
"""

from __future__ import annotations

from typing import Protocol

from .countdown import CountdownTask
from .task import AdditionTask

__all__ = ["BUILTIN_TASKS", "Task", "builtin_task"]


class Task(Protocol):
    """A task with generated rows and a checkable answer.

    ``characters``: what its rows write beyond the built-in tokenizer's ``CHARACTERS``
    (``build_char_tokenizer(task.characters)`` covers them).
    """

    characters: str

    def rows(self, schema: str, n: int, split: str = "train") -> list[dict]:
        """``n`` rows of a ``data.py`` schema from ``split`` (``"train"`` or ``"heldout"``);
        a ValueError naming the schemas it has for one it lacks."""

    def sft_examples(self, n: int, split: str = "train") -> list[dict]:
        """``n`` ``{"prompt", "completion"}`` demonstrations."""

    def verify(self, prompt: str, completion: str) -> float:
        """1.0 when ``completion`` answers ``prompt`` correctly, else 0.0."""

    def reward(self, prompts: list[str], completions: list[str], **row_fields) -> list[float]:
        """The verifiable reward of a batch (the rows' other fields as keyword lists)."""


BUILTIN_TASKS: dict[str, type] = {"builtin:addition": AdditionTask, "builtin:countdown": CountdownTask}


def builtin_task(name: str, **settings) -> Task:
    """The built-in task ``name`` made with ``settings`` (``seed=`` and the task's own
    knobs); a ValueError naming the built-in tasks for another name."""
    if name not in BUILTIN_TASKS:
        raise ValueError(f"task {name!r} is not a built-in task; choose one of {', '.join(BUILTIN_TASKS)}")
    return BUILTIN_TASKS[name](**settings)
