"""What a run checks before it loads a model: that every file, folder and callable its
options name is there and holds what the run needs.

The config checked its values and their combinations when it was built; this module
checks what only the file system can tell, in milliseconds: the model is a built-in
name or a checkpoint folder, each data file exists and its first rows
(``data.CHECKED_ROWS``) follow a schema the algorithm trains on, each reward source
imports, each folder option (a critic, a judge) exists. So a typo fails at once, with
one line naming the option, the value and the file's line and field, and not after a
model load and a warm start. The full data files are read later, by the algorithms,
with the same checks on every row.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .config import BUILTIN_DATA, ConfigError
from .tasks import BUILTIN_TASKS, Task
from .data import ALGORITHM_SCHEMAS, check_file
from .models import BUILTIN_MODELS
from .rollout import check_reward_source

__all__ = ["EVAL_SCHEMAS", "check_inputs", "reference_lengths", "short_budget_warnings"]

# The schemas an algorithm's eval_data may hold (its training schemas unless listed).
EVAL_SCHEMAS = {"kto": ("pairwise",)}
# Demonstrations whose lengths a run on a built-in task checks its budgets against.
LENGTH_SAMPLE = 64


def reference_lengths(task: Task) -> tuple[int, int]:
    """The most tokens of the built-in model's tokenizer that the first ``LENGTH_SAMPLE``
    training demonstrations of ``task`` take: a completion with its eos, and a whole row
    with bos and eos. A sample, so a lower bound on what a budget needs."""
    from .tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer(task.characters)
    completion = row = 0
    for example in task.sft_examples(LENGTH_SAMPLE, "train"):
        prompt = len(tokenizer.encode(example["prompt"], add_special_tokens=False))
        answer = len(tokenizer.encode(example["completion"], add_special_tokens=False)) + 1
        completion, row = max(completion, answer), max(row, prompt + answer + 1)
    return completion, row


def short_budget_warnings(task: Task, budgets: dict[str, tuple[int, bool]]) -> list[str]:
    """One line per budget too short for ``task``'s demonstrations (``reference_lengths``):
    ``budgets`` maps an option's name to its value and whether it bounds a completion
    (else a whole row). Short budgets are allowed (a quick test run), but they cut the
    chains, which then earn nothing: a harder countdown's need more tokens."""
    completion, row = reference_lengths(task)
    lines = []
    for option, (value, of_completion) in budgets.items():
        needed = completion if of_completion else row
        if value < needed:
            what = "solutions" if of_completion else "demonstrations (prompt and solution)"
            lines.append(f"fastpo: warning: {option}={value}, but the {what} of this task take up to {needed} "
                         f"tokens, so longer ones are cut; {option}>={needed} fits them")
    return lines


def _warn_short_budgets(config) -> None:
    from .algorithms._common import builtin_task

    task = builtin_task(config)
    budgets = {"max_length": (config.max_length, False)}
    if hasattr(config, "max_new_tokens"):
        budgets["max_new_tokens"] = (config.max_new_tokens, True)
    for line in short_budget_warnings(task, budgets):
        print(line, file=sys.stderr)


def _check_model(name: str) -> None:
    if name in BUILTIN_MODELS:
        return
    expected = f"{' or '.join(BUILTIN_MODELS)} or a local Hugging Face checkpoint folder"
    if name.startswith("builtin:"):
        raise ConfigError(f"option 'model': got {name!r}; expected {expected}")
    _check_folder("model", name, expected)


def _check_folder(option: str, name: str, expected: str) -> None:
    path = Path(name)
    if not path.is_dir():
        reason = "a file, not a folder" if path.exists() else "no such folder"
        raise ConfigError(f"option {option!r}: got {name!r} ({reason}); expected {expected}")
    if not (path / "config.json").is_file():
        raise ConfigError(f"option {option!r}: got {name!r}, a folder without config.json; expected {expected}")


def _training_schemas(algorithm: str, config) -> tuple[str, ...]:
    if getattr(config, "target", None) == "states":  # reward's value model
        return ("unary",)
    return ALGORITHM_SCHEMAS[algorithm]


def _eval_schemas(algorithm: str, config) -> tuple[str, ...]:
    if algorithm == "rlaif":  # the training stage's held-out data
        return ALGORITHM_SCHEMAS["dpo"] if config.then == "dpo" else ALGORITHM_SCHEMAS["ppo"]
    return EVAL_SCHEMAS.get(algorithm, _training_schemas(algorithm, config))


def check_inputs(algorithm: str, config) -> None:
    """ConfigError or ``data.DataError`` (both one line) for an option of ``config`` that
    names a missing or unusable model, data file, reward source, critic or judge; a
    warning on stderr for a budget that cuts the built-in task's solutions
    (``short_budget_warnings``, with the built-in model)."""
    _check_model(config.model)
    if config.data.startswith("builtin:"):
        if config.data not in BUILTIN_TASKS:
            raise ConfigError(
                f"option 'data': got {config.data!r}; expected a built-in task ({', '.join(BUILTIN_TASKS)}) or a "
                ".jsonl/.parquet file"
            )
        if config.model in BUILTIN_MODELS:
            _warn_short_budgets(config)
    else:
        check_file(config.data, _training_schemas(algorithm, config), "data")
    if config.eval_data is not None:
        check_file(config.eval_data, _eval_schemas(algorithm, config), "eval_data")
    for spec in getattr(config, "rewards", ()):
        try:
            check_reward_source(spec)
        except ValueError as error:
            raise ConfigError(f"option 'rewards': {error}") from None
    if getattr(config, "critic", None) is not None:
        _check_folder("critic", config.critic, "a checkpoint folder (fastpo reward's)")
    ptx_data = getattr(config, "ptx_data", None)
    if ptx_data is not None and ptx_data != BUILTIN_DATA:
        check_file(ptx_data, ("text",), "ptx_data")
    if getattr(config, "judge", None) is not None:
        _check_folder("judge", config.judge, "a causal LM checkpoint folder")
