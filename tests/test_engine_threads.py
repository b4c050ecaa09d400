"""The thread count of a run (engine/threads.py): the threads option, OMP_NUM_THREADS, or
the cores free at the start."""

import os

import pytest
import torch

from fastpo.engine import threads
from fastpo.engine.cli import main


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """``machine(cores, busy, quota=None)``: this process may run on ``cores`` cores
    under a cgroup CPU quota of ``quota`` cores (None: none) while other processes keep
    ``busy`` cores busy; OMP_NUM_THREADS and LOCAL_WORLD_SIZE unset."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cpu_max = tmp_path / "cpu.max"
    monkeypatch.setattr(threads, "_CGROUP_CPU_MAX", cpu_max)

    def set_up(cores, busy, quota=None):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
        monkeypatch.setattr(threads, "busy_cores", lambda: busy)
        cpu_max.write_text("max 100000\n" if quota is None else f"{int(quota * 100000)} 100000\n")

    return set_up


@pytest.mark.parametrize(
    "cores, busy, quota, available, want",
    [
        (2, 0.1, None, 2, 2),  # idle: every core
        (2, 2.3, None, 2, 1),  # both cores busy with another job: one thread, never zero
        (8, 2.6, None, 8, 5),  # 3 of 8 busy
        (16, 0.0, 4, 4, 4),  # a container's quota of 4 cores on a 16-core machine
        (16, 0.0, 2.5, 3, 3),  # a fractional quota rounds up
    ],
)
def test_the_free_cores_set_the_count(machine, cores, busy, quota, available, want):
    machine(cores, busy, quota)
    assert threads.available_cores() == available
    assert threads.choose_threads(None) == (want, f"{available} cores, {busy:.1f} busy")


def test_torchrun_processes_share_the_free_cores(machine, monkeypatch):
    machine(8, 0.0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    assert threads.choose_threads(None) == (2, "8 cores, 0.0 busy, shared by 3 processes")


def test_busy_cores_are_measured_from_proc_stat(monkeypatch, tmp_path):
    """Non-idle time over the sample, in cores: 2 cores, 100 ticks of each elapse, 60 of
    the 200 are busy (user, system, irq), the rest idle or iowait: 0.6 cores busy."""
    stat = tmp_path / "stat"
    samples = iter([
        "cpu  1000 0 500 8000 100 0 0 0 0 0\ncpu0 ...\n",
        "cpu  1040 0 515 8130 110 5 0 0 0 0\ncpu0 ...\n",
    ])
    monkeypatch.setattr(threads, "_PROC_STAT", stat)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(threads.time, "sleep", lambda seconds: stat.write_text(next(samples)))
    stat.write_text(next(samples))
    assert threads.busy_cores() == pytest.approx(2 * 60 / 200)
    monkeypatch.setattr(threads, "_PROC_STAT", tmp_path / "absent")
    assert threads.busy_cores() == 0.0


def test_the_option_and_then_the_environment_win(machine, monkeypatch):
    machine(2, 0.0)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads.choose_threads(None) == (1, "OMP_NUM_THREADS")
    assert threads.choose_threads(3) == (3, "threads option")


def test_run_threads_sets_the_count_for_the_block_only(capsys):
    before = torch.get_num_threads()
    wanted = 2 if before == 1 else 1
    with threads.run_threads(wanted) as count:
        assert count == wanted and torch.get_num_threads() == wanted
    assert torch.get_num_threads() == before
    assert capsys.readouterr().err == f"fastpo: {wanted} CPU thread{'s' if wanted > 1 else ''} (threads option)\n"


def test_a_bad_thread_count_is_a_one_line_error(capsys):
    assert main(["sft", "threads=0"]) == 2
    assert capsys.readouterr().err.strip() == "fastpo: error: option 'threads': got 0; expected a value > 0"


def test_free_cores_never_raise_the_count_above_torchs_default(machine, monkeypatch, capsys):
    """Affinity counts hyperthreads, torch's default the physical cores: a free-core
    estimate above torch's default is cut to it; the option and OMP_NUM_THREADS are not."""
    machine(8, 0.0)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        with threads.run_threads(None) as count:
            assert count == 3 and torch.get_num_threads() == 3
        assert torch.get_num_threads() == 3
        assert capsys.readouterr().err == "fastpo: 3 CPU threads (8 cores, 0.0 busy, at most torch's default of 3)\n"
        monkeypatch.setattr(threads, "busy_cores", lambda: 6.0)  # below torch's default: the estimate stands
        with threads.run_threads(None) as count:
            assert count == 2 and torch.get_num_threads() == 2
        assert capsys.readouterr().err.endswith("fastpo: 2 CPU threads (8 cores, 6.0 busy)\n")
        with threads.run_threads(5) as count:  # the option may exceed it
            assert count == 5
        monkeypatch.setenv("OMP_NUM_THREADS", "6")
        with threads.run_threads(None) as count:
            assert count == 6
    finally:
        torch.set_num_threads(before)


def test_the_count_torch_already_has_is_not_set_again(machine, monkeypatch):
    """torch.set_num_threads with an unchanged count slows generation: it is called only
    for a change, and then restored."""
    machine(2, 0.0)
    before = torch.get_num_threads()
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    with threads.run_threads(before, shown=False):
        pass
    assert calls == []
    with threads.run_threads(before + 1, shown=False):
        assert calls == [before + 1]
    assert calls == [before + 1, before]
