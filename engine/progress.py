"""What a run prints while it trains: one progress line per stage, and no one else's bars.

A stage (the warm start, the algorithm's training) shows its progress on stderr in one of
two forms, chosen by where stderr goes:

- an interactive terminal (a TTY with a non-zero width, ``TERM`` not ``dumb``) and tqdm
  installed: one tqdm bar, labelled by the stage, with the latest loss, reward and
  held-out evaluation;
- anything else (a log file, a pipe, CI, a zero-size terminal, no tqdm): plain lines, one
  when the stage starts, one after the first step, then one after each step that ends at
  least ``interval_s`` seconds after the previous line, and one when the stage ends. So a
  line appears at least every ``interval_s`` seconds, or every step when a step takes
  longer, and a fast stage does not flood the log.

A stage ends honestly: ``finish(text)`` when it stopped early because its job is done
(the warm start reaching its accuracy target: the bar completes at that step and says
so), ``close()`` otherwise (at the last step: done; before it: stopped at step N).

Hugging Face's own bars (transformers' "Loading weights" and "Writing model shards",
huggingface_hub's downloads) would overwrite these lines: ``hugging_face_bars_off()``
turns them off for the span of a run.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from pathlib import Path
from typing import IO, Iterator

__all__ = ["PLAIN_INTERVAL_S", "Progress", "folder_label", "hugging_face_bars_off", "interactive"]

PLAIN_INTERVAL_S = 10.0  # the longest wait between two plain lines while steps end
# The record's fields shown beside the step: what a user watches, when the algorithm logs it.
SHOWN = ("loss", "reward")


def interactive(stream: IO) -> bool:
    """True when ``stream`` is a terminal a bar can redraw in: a TTY of non-zero width,
    ``TERM`` not ``dumb``."""
    try:
        if not stream.isatty():
            return False
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):  # no fileno (a StringIO), a closed stream, no terminal
        return False
    return columns > 0 and os.environ.get("TERM") != "dumb"


def folder_label(folder) -> str:
    """A run folder as a stage's label: the path, with the home folder as ``~`` (the
    warm start's cache entry is ``~/.cache/fastpo/warm_start/<key>``)."""
    path, home = Path(folder), Path.home()
    return f"~/{path.relative_to(home)}" if path.is_absolute() and path.is_relative_to(home) else str(path)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


class Progress:
    """The progress of one stage of ``total`` steps that starts after step ``initial``.

    Args:
        label: names the stage (its run folder, say ``runs/grpo``).
        total: the stage's most steps.
        initial: steps already done (a resumed run's checkpoint).
        shown: False on every process but rank 0: nothing is printed.
        stream: where to print (default ``sys.stderr``, looked up at construction).
        interval_s: the plain lines' interval (see the module's doc).
    """

    def __init__(self, label: str, total: int, initial: int = 0, *, shown: bool = True, stream: IO | None = None,
                 interval_s: float = PLAIN_INTERVAL_S):
        self.label = label
        self.total = total
        self.initial = self.step = initial
        self.stream = sys.stderr if stream is None else stream
        self.interval_s = interval_s
        self.values: dict[str, float] = {}
        self.closed = not shown or initial >= total  # nothing to train: the loop says so
        self.bar = None
        self.started = self.last_line = time.monotonic()
        if self.closed:
            return
        if interactive(self.stream):
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total, initial=initial, desc=label, unit="step", file=self.stream,
                                dynamic_ncols=True)
                return
        start = f"from step {initial}" if initial else "starting"
        self._line(f"{start}, {total} steps at most")

    def _line(self, text: str) -> None:
        print(f"fastpo: {self.label}: {text}", file=self.stream, flush=True)
        self.last_line = time.monotonic()

    def _values_text(self) -> str:
        return " ".join(f"{name}={value:.4g}" for name, value in self.values.items())

    def update(self, step: int, record: dict) -> None:
        """Step ``step`` ended with the logged ``record`` (its loss, metrics, evaluation)."""
        if self.closed:
            return
        for name, value in record.items():
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if numeric and (name in SHOWN or name.startswith("eval/")):
                self.values[name] = value
        done_before, self.step = self.step, step
        if self.bar is not None:
            self.bar.update(step - done_before)
            self.bar.set_postfix_str(self._values_text(), refresh=False)
            return
        now = time.monotonic()
        if step == self.initial + 1 or now - self.last_line >= self.interval_s or step >= self.total:
            elapsed = now - self.started
            per_step = elapsed / (step - self.initial)
            left = f", ~{_duration(per_step * (self.total - step))} left at most" if step < self.total else ""
            shown = " ".join(filter(None, [f"step {step}/{self.total}", self._values_text()]))
            self._line(f"{shown} ({_duration(elapsed)}, {per_step:.2g} s/step{left})")

    def finish(self, text: str) -> None:
        """End the stage at the current step because its job is done, saying ``text``
        (``"target reached at step 400"``): the bar completes there."""
        if self.closed:
            return
        self.closed = True
        said = " ".join(filter(None, [f"{text} (of at most {self.total} steps)", self._values_text()]))
        if self.bar is not None:
            self.bar.total = self.bar.n
            self.bar.set_postfix_str(said, refresh=False)
            self.bar.close()
        else:
            self._line(f"{said}, {_duration(time.monotonic() - self.started)}")

    def close(self) -> None:
        """End the stage: done when it reached ``total``, else stopped at the current step
        (an interruption or an error: the bar stays where it stopped). A second call,
        or one after ``finish``, does nothing."""
        if self.closed:
            return
        self.closed = True
        elapsed = _duration(time.monotonic() - self.started)
        if self.bar is not None:
            if self.step < self.total:
                self.bar.set_postfix_str(f"stopped at step {self.step}", refresh=False)
            self.bar.close()
        elif self.step >= self.total:
            self._line(f"done, {self.total} steps, {elapsed}")
        else:
            self._line(f"stopped at step {self.step} of {self.total}, {elapsed}")


@contextlib.contextmanager
def hugging_face_bars_off() -> Iterator[None]:
    """Hugging Face's progress bars (transformers' and huggingface_hub's) off inside the
    block, back to their previous state after it."""
    from transformers.utils import logging as hf_logging

    were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if were_on:
            hf_logging.enable_progress_bar()
