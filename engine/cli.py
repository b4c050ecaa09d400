"""The ``fastpo`` command: ``fastpo <algorithm> [--config FILE.yaml] [key=value ...]``, and
``fastpo reason [...]``, which runs inference strategies on a reasoning task
(``engine/reasoning.py``) with a trained model.

Exit status: 0 when the run completed (or had nothing left to train), 2 for a bad option
or input (an option, a combination of options, a missing or malformed data file, model
folder or reward source: one line on stderr, before any model is loaded), 1 for an
option this setup does not implement or a run that diverged, 130 for a run stopped by
Ctrl-C. Any other error is a bug or a failure inside training and keeps its traceback.
"""

from __future__ import annotations

import sys

from .config import ALGORITHMS, ConfigError, format_help, load_config
from .data import DataError
from .distributed import shutdown_distributed
from .loop import TrainingDiverged
from .runner import train

__all__ = ["main"]

USAGE = (
    "usage: fastpo <algorithm> [--config FILE.yaml] [key=value ...]\n"
    "       fastpo <algorithm> --help\n"
    f"algorithms: {', '.join(ALGORITHMS)}\n"
    "       fastpo reason [--config FILE.yaml] [key=value ...]: inference strategies on a reasoning task\n"
)
REASON = "reason"


def _parse(args: list[str]) -> tuple[str | None, list[str], bool]:
    """``(config_file, overrides, wants_help)`` from the arguments after the algorithm."""
    config_file, overrides, wants_help = None, [], False
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-h", "--help"):
            wants_help = True
        elif arg == "--config":
            if i + 1 == len(args):
                raise ConfigError("--config needs a file name")
            config_file = args[i + 1]
            i += 1
        elif arg.startswith("--config="):
            config_file = arg.partition("=")[2]
        elif arg.startswith("-"):
            raise ConfigError(f"unknown flag {arg!r}; options are given as key=value")
        else:
            overrides.append(arg)
        i += 1
    return config_file, overrides, wants_help


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    algorithm, rest = argv[0], argv[1:]
    try:
        config_file, overrides, wants_help = _parse(rest)
        if algorithm == REASON:
            return _reason(config_file, overrides, wants_help)
        if wants_help:
            print(format_help(algorithm), end="")
            return 0
        config = load_config(algorithm, config_file, overrides)
        summary = train(algorithm, config)
    except (ConfigError, DataError) as error:
        message = str(error).replace("\n", " ")  # one line, whatever the message
        print(f"fastpo: error: {message}", file=sys.stderr)
        return 2
    except (NotImplementedError, TrainingDiverged) as error:
        print(f"fastpo: {error}", file=sys.stderr)
        return 1
    shutdown_distributed()
    # 128 + SIGINT, the shell's status for a run stopped by Ctrl-C (its checkpoint is written).
    return 130 if summary["status"] == "interrupted" else 0


def _reason(config_file: str | None, overrides: list[str], wants_help: bool) -> int:
    """``fastpo reason``: its errors are the caller's to report, as a training run's."""
    from .reasoning import ReasonConfig, reason

    if wants_help:
        print(format_help(REASON, ReasonConfig), end="")
        return 0
    reason(load_config(REASON, config_file, overrides, cls=ReasonConfig))
    return 0
