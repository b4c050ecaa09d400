"""The built-in tasks by name, and what the algorithms may ask of a task.

``data=builtin:NAME`` (training and held-out rows) and ``rewards=builtin:NAME`` (the
verifiable reward) resolve through ``BUILTIN_TASKS``; each task is a frozen dataclass
that checks its own settings and follows the ``Task`` protocol below, so an algorithm
written against it runs on any built-in task.

A task may change the defaults of the options that depend on it (``CONFIG_DEFAULTS``):
countdown's chains of thought need a completion budget of 128 tokens where an addition
answer needs 8. They apply between an option's own default and the values a user gives
(``config.from_dict``: YAML files, ``key=value`` overrides, dicts), and ``--help`` lists
them.
"""

from __future__ import annotations

from typing import Protocol

from .countdown import CountdownTask
from .task import AdditionTask

__all__ = ["BUILTIN_TASKS", "CONFIG_DEFAULTS", "DEFAULT_TASK", "STATE_TASKS", "Task", "builtin_task",
           "config_defaults", "task_of_prompt"]


class Task(Protocol):
    """A task with generated rows and a checkable answer.

    ``characters``: what its rows write beyond the built-in tokenizer's ``CHARACTERS``
    (``build_char_tokenizer(task.characters)`` covers them).

    Its ``"prompt"`` rows carry a correct answer as ``"completion"``: they are the rows of
    the exact-match evaluation too, so every algorithm is evaluated on the same problems.
    """

    characters: str

    def rows(self, schema: str, n: int, split: str = "train") -> list[dict]:
        """``n`` rows of a ``data.py`` schema from ``split`` (``"train"`` or ``"heldout"``);
        a ValueError naming the schemas it has for one it lacks."""

    def sft_examples(self, n: int, split: str = "train") -> list[dict]:
        """``n`` ``{"prompt", "completion"}`` demonstrations."""

    def verify(self, prompt: str, completion: str) -> float:
        """1.0 when ``completion`` answers ``prompt`` correctly, else 0.0; a ValueError for a
        prompt that is not one of the task's."""

    def reward(self, prompts: list[str], completions: list[str], **row_fields) -> list[float]:
        """The verifiable reward of a batch (the rows' other fields as keyword lists)."""


BUILTIN_TASKS: dict[str, type] = {"builtin:addition": AdditionTask, "builtin:countdown": CountdownTask}
DEFAULT_TASK = "builtin:addition"  # the task of a run whose data is a file
# The tasks with reasoning states labelled by a solver (rows("states", ...): unary rows,
# the state as prompt, label true when it can still reach the answer): a value model's data.
STATE_TASKS = ("builtin:countdown",)

# Option defaults a task sets, for every algorithm ("*") and per algorithm; an option a
# config class lacks is skipped. Countdown: a solver's chain of the Game of 24 takes at
# most 112 tokens with its eos (numbers 1 to 13), a prompt at most 19 with bos; the
# reward is the task's own. A GRPO step on it samples 128 chains of about 100 tokens
# (1.5 s a step on an idle 2-core machine, 14 s on a loaded one): 100 steps, not 500.
CONFIG_DEFAULTS: dict[str, dict[str, dict]] = {
    "builtin:addition": {},
    "builtin:countdown": {
        "*": {"max_new_tokens": 128, "max_length": 160, "rewards": ["builtin:countdown"]},
        # grpo's own 2e-4 took seed 0's SFT model from 30.5% to 17.5% held-out in 100 steps.
        # From the cached warm starts of seeds 0, 1, 2, 1e-4 gained +11 / +10 / +8.5 points where
        # 5e-5 gained +8 / +5.5 / +6.5 (docs/reasoning.md). rollout=tree: a chain's first
        # line decides 53-56% of its outcome's variance, its answer line 20-24%, so a tree
        # of 4 whole chains and one resampled answer each ends 2.0 points below flat with 64%
        # of its tokens and 0.9 above at flat's tokens (three draws of three seeds), where 2
        # chains branched at any line start fell 2.6 points short with 70% (one draw). Twelve
        # leaves (6 chains) at flat's tokens ended 0.3 below; its own lr 1.5e-4 did not help.
        "grpo": {
            "steps": 100, "eval_every": 25, "learning_rate": 1e-4,
            "tree_split": "last_line", "tree_initial": 4, "tree_points": 4, "tree_branches": 1,
        },
        # a chain-of-thought row has 3-4x the tokens of a direct answer's or a value
        # judgement's: padded batches were 40% padding (packed, SFT ran 1.3x faster)
        "sft": {"packing": True},
    },
}


def builtin_task(name: str, **settings) -> Task:
    """The built-in task ``name`` made with ``settings`` (``seed=`` and the task's own
    knobs); a ValueError naming the built-in tasks for another name."""
    if name not in BUILTIN_TASKS:
        raise ValueError(f"task {name!r} is not a built-in task; choose one of {', '.join(BUILTIN_TASKS)}")
    return BUILTIN_TASKS[name](**settings)


def config_defaults(data: str, algorithm: str | None) -> dict:
    """The option defaults that ``data`` (a built-in task's name; anything else has none)
    sets for ``algorithm``'s config: the task's common ones, then the algorithm's own."""
    table = CONFIG_DEFAULTS.get(data, {})
    return {**table.get("*", {}), **table.get(algorithm, {})}


def task_of_prompt(prompt: str, tasks: dict[str, Task] | None = None) -> Task | None:
    """The task among ``tasks`` (by name; by default the built-in tasks with default
    settings) whose verifier takes ``prompt``, or None: how an exact-match evaluation
    picks its checker for rows of any source."""
    for task in tasks.values() if tasks is not None else [cls() for cls in BUILTIN_TASKS.values()]:
        try:
            task.verify(prompt, "")
        except ValueError:
            continue
        return task
    return None
