"""The progress display (engine/progress.py): plain lines at a bounded interval when the
output is not a terminal, one tqdm bar per stage on a terminal, finished honestly, and
Hugging Face's own bars off while a run trains."""

import fcntl
import io
import json
import os
import pty
import struct
import termios
import time

import pytest
import torch

from fastpo.engine import train
from fastpo.engine.models import load_causal_lm
from fastpo.engine.progress import Progress, folder_label, hugging_face_bars_off, interactive


class TimedStream:
    """A non-terminal text stream that records when each line was written."""

    def __init__(self):
        self.lines: list[tuple[float, str]] = []
        self.pending = ""

    def write(self, text: str) -> int:
        *complete, self.pending = (self.pending + text).split("\n")
        self.lines += [(time.monotonic(), line) for line in complete]
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def _terminal(columns: int, rows: int = 24):
    """``(master_fd, writable slave file)`` of a pseudo-terminal of the given size."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    return master, os.fdopen(slave, "w")


def _read_all(master: int) -> str:
    os.set_blocking(master, False)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def test_plain_lines_come_at_a_bounded_interval_on_a_non_terminal_stream():
    stream, interval, pause, steps = TimedStream(), 0.15, 0.02, 40
    progress = Progress("runs/x", steps, stream=stream, interval_s=interval)
    for step in range(1, steps + 1):
        time.sleep(pause)
        progress.update(step, {"step": step, "loss": 1.0 / step, "lr": 0.1})
    progress.close()
    times = [t for t, _ in stream.lines]
    texts = [text for _, text in stream.lines]
    assert texts[0] == "fastpo: runs/x: starting, 40 steps at most"
    assert texts[1].startswith("fastpo: runs/x: step 1/40 loss=1 (")
    assert texts[-2].startswith("fastpo: runs/x: step 40/40 loss=0.025 (")
    assert texts[-1].startswith("fastpo: runs/x: done, 40 steps, ")
    # Between two lines at most the interval and the step that crossed it (plus scheduling slack)...
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert max(gaps) < interval + pause + 0.1, gaps
    # ...and no line per step: the first step, one per interval, the last step and the end.
    step_lines = [text for text in texts if ": step " in text]
    assert 3 <= len(step_lines) <= 2 + steps * pause / interval + 2, texts
    assert all(" s/step" in text for text in step_lines)


def test_plain_lines_say_where_a_stage_stopped_or_why_it_ended_early():
    stopped = TimedStream()
    progress = Progress("runs/a", 10, stream=stopped, interval_s=100)
    for step in (1, 2, 3):
        progress.update(step, {"step": step, "loss": 0.5})
    progress.close()
    progress.close()  # a second close says nothing more
    assert stopped.lines[-1][1].startswith("fastpo: runs/a: stopped at step 3 of 10, ")
    assert len(stopped.lines) == 3  # start, step 1, stop (step 3 came within the interval)

    reached = TimedStream()
    progress = Progress("runs/b", 1500, initial=0, stream=reached, interval_s=100)
    for step in range(1, 401):
        progress.update(step, {"step": step, "loss": 0.5, "eval/heldout_accuracy": 0.31} if step == 400 else {})
    progress.finish("target reached at step 400")
    progress.close()
    assert [text for _, text in reached.lines][-1].startswith(
        "fastpo: runs/b: target reached at step 400 (of at most 1500 steps) loss=0.5 eval/heldout_accuracy=0.31, "
    )

    resumed = TimedStream()
    progress = Progress("runs/c", 8, initial=6, stream=resumed)
    progress.update(7, {"step": 7, "reward": 0.75, "loss": float("nan")})
    assert [text for _, text in resumed.lines][0] == "fastpo: runs/c: from step 6, 8 steps at most"
    assert "step 7/8 reward=0.75 (" in resumed.lines[1][1]  # a NaN loss is not shown


def test_a_folder_under_home_is_labelled_from_tilde(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert folder_label(tmp_path / ".cache" / "fastpo" / "warm_start" / "0123") == "~/.cache/fastpo/warm_start/0123"
    assert folder_label("runs/grpo") == "runs/grpo"
    assert folder_label("/elsewhere/run") == "/elsewhere/run"


def test_nothing_is_printed_by_a_hidden_or_finished_stage(capsys):
    for progress in (Progress("runs/x", 5, shown=False), Progress("runs/x", 5, initial=5)):
        progress.update(6, {"loss": 1.0})
        progress.close()
    assert capsys.readouterr().err == ""


def test_only_a_sized_terminal_is_interactive(tmp_path, monkeypatch):
    monkeypatch.setenv("TERM", "xterm")
    master, sized = _terminal(80)
    assert interactive(sized)
    monkeypatch.setenv("TERM", "dumb")
    assert not interactive(sized)
    monkeypatch.setenv("TERM", "xterm")
    empty_master, empty = _terminal(0, 0)  # a zero-size terminal (a container started without one)
    assert not interactive(empty)
    with open(tmp_path / "log.txt", "w") as log:
        assert not interactive(log)
    assert not interactive(io.StringIO())
    for file, fd in ((sized, master), (empty, empty_master)):
        file.close()
        os.close(fd)


def test_the_bar_on_a_terminal_completes_at_the_target(monkeypatch):
    pytest.importorskip("tqdm")
    monkeypatch.setenv("TERM", "xterm")
    master, terminal = _terminal(200)
    progress = Progress("runs/grpo/warm_start", 1500, stream=terminal)
    for step in range(1, 5):
        progress.update(step, {"step": step, "loss": 0.5})
    progress.finish("target reached at step 4")
    terminal.flush()
    final = _read_all(master).replace("\n", "\r").split("\r")
    final = [part for part in final if part.strip()][-1]
    assert final.startswith("runs/grpo/warm_start: 100%") and "4/4 " in final, final
    assert "target reached at step 4 (of at most 1500 steps) loss=0.5" in final, final
    terminal.close()
    os.close(master)


def test_hugging_face_bars_are_off_inside_the_block_only(tmp_path, capsys):
    from transformers.utils import logging as hf_logging

    model, _ = load_causal_lm("builtin:tiny")
    assert hf_logging.is_progress_bar_enabled()
    with hugging_face_bars_off():
        model.save_pretrained(tmp_path / "quiet")
    assert "Writing model shards" not in capsys.readouterr().err
    assert hf_logging.is_progress_bar_enabled()
    model.save_pretrained(tmp_path / "loud")
    assert "Writing model shards" in capsys.readouterr().err  # the bar this guards against is real


def test_a_run_prints_one_plain_line_per_stage_and_no_foreign_bars(tmp_path, capsys):
    eval_file = tmp_path / "heldout.jsonl"
    eval_file.write_text('{"prompt": "12+34=", "completion": "46"}\n{"prompt": "1+2=", "completion": "3"}\n')
    threads_before = torch.get_num_threads()
    # A target every model reaches at the first check: the stage ends early, at step 2 of 6.
    summary = train("sft", {
        "steps": 6, "batch_size": 4, "warmup_steps": 1, "eval_every": 2, "log_every": 1, "threads": 1,
        "target_accuracy": 0.0, "eval_data": str(eval_file), "output_dir": str(tmp_path / "run"),
    })
    assert summary["status"] == "completed" and summary["steps"] == 2
    assert torch.get_num_threads() == threads_before  # the run's thread count ends with the run
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("fastpo: ")]
    stage = f"fastpo: {tmp_path / 'run'}: "
    assert lines[0] == "fastpo: 1 CPU thread (threads option)"
    assert f"{stage}starting, 6 steps at most" in lines
    assert any(line.startswith(f"{stage}step 1/6 loss=") for line in lines)
    assert any(line.startswith(f"{stage}target reached at step 2 (of at most 6 steps) loss=") for line in lines)
    for foreign in ("Writing model shards", "Loading weights", "it/s]"):
        assert foreign not in err
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2
