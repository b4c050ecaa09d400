"""How many CPU threads a run uses.

torch starts one thread per core it may run on. On a machine whose cores are busy with
another job that oversubscribes them: each of torch's parallel regions waits for its
slowest thread, and a thread that shares its core waits for the other job, so a run
that takes 2 minutes on an idle 2-core machine took 21 on one whose cores ran another
job. A run therefore takes, unless told otherwise, the cores that are free when it
starts: the cores it may run on (its CPU affinity, and a cgroup CPU quota when there is
one) less the busy ones, shared by the processes ``torchrun`` started on this machine, at
least one. Busy cores are measured over a quarter of a second from ``/proc/stat`` (the
machine's CPU time outside idle, rounded to cores), not read from the load average: that
is a one-minute mean, so right after a heavy step (the setup's pip install before
``make train``, the previous process of a benchmark) it still counts cores that are
idle again, and an idle machine would get one thread.

The free cores never raise the count above torch's own default (read at the start of the
run): the affinity counts logical CPUs, torch's default is the physical cores.

``threads=N`` sets the count; so does ``OMP_NUM_THREADS`` in the environment (read by
torch at start-up; this module then leaves it alone). The count covers torch's
intra-op threads and fastpo's native kernels, which take ``torch.get_num_threads()``.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from pathlib import Path
from typing import Iterator

import torch

__all__ = ["available_cores", "choose_threads", "run_threads"]

_CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU
    quota (a container's ``--cpus``) when one is set."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (macOS, Windows)
        cores = os.cpu_count() or 1
    try:
        quota, period = _CGROUP_CPU_MAX.read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):  # no cgroup v2 CPU controller here
        pass
    return cores


_PROC_STAT = Path("/proc/stat")
_SAMPLE_SECONDS = 0.25


def _cpu_times() -> tuple[int, int] | None:
    """``(busy, total)`` CPU time of the whole machine so far, in clock ticks, from the
    first line of ``/proc/stat``; None where there is none (macOS, Windows)."""
    try:
        fields = [int(x) for x in _PROC_STAT.read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle and iowait
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is in user)
    return total - idle, total


def busy_cores(seconds: float = _SAMPLE_SECONDS) -> float:
    """Cores kept busy by the machine's other processes: its non-idle CPU time over the
    next ``seconds`` (this process sleeps meanwhile), as a number of cores; 0 where it
    cannot be measured."""
    before = _cpu_times()
    if before is None:
        return 0.0
    time.sleep(seconds)
    after = _cpu_times()
    elapsed = after[1] - before[1]
    if elapsed <= 0:
        return 0.0
    return (os.cpu_count() or 1) * (after[0] - before[0]) / elapsed


def choose_threads(requested: int | None) -> tuple[int, str]:
    """``(threads, why)``: ``requested`` when given, else ``OMP_NUM_THREADS`` when set,
    else the free cores (see the module's doc); ``why`` says which, for the run's log."""
    if requested is not None:
        return requested, "threads option"
    from_environment = os.environ.get("OMP_NUM_THREADS", "").strip()
    if from_environment.isdigit() and int(from_environment) > 0:
        return int(from_environment), "OMP_NUM_THREADS"
    cores, busy = available_cores(), busy_cores()
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    free = max(1, cores - round(busy))
    share = max(1, free // processes)
    per_process = f", shared by {processes} processes" if processes > 1 else ""
    return share, f"{cores} cores, {busy:.1f} busy{per_process}"


@contextlib.contextmanager
def run_threads(requested: int | None, *, shown: bool = True) -> Iterator[int]:
    """Inside the block torch uses ``choose_threads(requested)`` threads (said in one
    line on stderr unless ``shown`` is False); after it, the count it had before."""
    threads, why = choose_threads(requested)
    before = torch.get_num_threads()
    if why not in ("threads option", "OMP_NUM_THREADS") and threads > before:
        # The affinity counts logical CPUs; torch's default (MKL's) is the physical
        # cores, which hyperthreads do not add to: never more threads than that.
        threads, why = before, f"{why}, at most torch's default of {before}"
    # Only a change: torch.set_num_threads with the count torch already has slowed the
    # rollouts' generate by ~15% on torch 2.13's CPU build (100 GRPO steps: 24.5 s
    # against 21.7 s without the call, measured on the 2-core machine).
    if threads != before:
        torch.set_num_threads(threads)
    if shown:
        print(f"fastpo: {threads} CPU thread{'s' if threads > 1 else ''} ({why})", file=sys.stderr, flush=True)
    try:
        yield threads
    finally:
        if threads != before:
            torch.set_num_threads(before)
