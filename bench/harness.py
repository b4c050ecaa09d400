"""Measurement pieces shared by the benchmarks: timing, peak extra memory, hardware limits.

Peak memory is measured per case in a fresh subprocess on the CPU (the high-water mark
of the resident set, ``ru_maxrss``, is per process and never goes down) and with the
CUDA caching allocator's peak counter on a GPU.
"""

from __future__ import annotations

import csv
import ctypes
import ctypes.util
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch


@dataclasses.dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float


def fastpo_backends(device: str) -> list[str]:
    """fastpo's backends that run at full speed on ``device`` (not the Triton interpreter):
    torch everywhere, Triton on GPUs, the native kernels (cuda or cpp) where built."""
    from fastpo.kernels import _native

    backends = ["torch"] + (["triton"] if device == "cuda" else [])
    if _native.available(torch.device(device)):
        backends.append("cuda" if device == "cuda" else "cpp")
    return backends


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device: str, *, warmup: int = 1, reps: int = 5,
            max_seconds: float = 10.0, clock: Callable[[], float] = time.perf_counter) -> Timing:
    """Median and 20th/80th percentiles of ``fn``'s wall time, synchronizing the device.
    ``clock=time.process_time`` times this process's CPU time instead (on the CPU: what a
    machine shared with other jobs does not inflate by the time the process waits)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    budget_end = time.perf_counter() + max_seconds
    while len(times) < reps and (len(times) < 3 or time.perf_counter() < budget_end):
        start = clock()
        fn()
        _sync(device)
        times.append((clock() - start) * 1e3)
    times.sort()
    quantiles = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else times * 4
    return Timing(statistics.median(times), quantiles[0], quantiles[3])


def interleaved_ratio(fn: Callable[[], object], baseline: Callable[[], object], device: str, *,
                      reps: int = 12, max_seconds: float = 20.0) -> float:
    """Median time of ``fn`` over median time of ``baseline``, alternating the two in this
    process: both meet the same state of the machine (other jobs, caches, the allocator's
    free lists), which separate processes timed minutes apart do not. CPU time on the CPU,
    synchronized wall time on a GPU."""
    clock = time.process_time if device == "cpu" else time.perf_counter
    times: tuple[list[float], list[float]] = ([], [])
    budget_end = time.perf_counter() + max_seconds
    while len(times[0]) < reps and (len(times[0]) < 3 or time.perf_counter() < budget_end):
        for f, out in ((baseline, times[0]), (fn, times[1])):
            _sync(device)
            start = clock()
            f()
            _sync(device)
            out.append(clock() - start)
    return statistics.median(times[1]) / statistics.median(times[0])


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_bytes() -> int:
    """Current resident set size of this process."""
    return _status_bytes("VmRSS")


def reset_peak_rss() -> None:
    """Restart the resident-set high-water mark from the current size (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    """High-water mark of this process's resident set since the last reset."""
    return _status_bytes("VmHWM")


def _glibc_returns_freed_memory() -> None:
    """Make glibc's malloc hand every freed block of 64 KiB or more back to the OS, and
    release what it holds now, so that the resident set follows live allocations.

    By default glibc raises its mmap threshold after the first large free and keeps
    later blocks of that size on its heap, resident: a second call of the same code
    then reuses them and the resident-set peak would miss its temporaries. This makes
    later allocations slower (fresh pages each time), so time before calling it.
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    m_mmap_threshold = -3  # mallopt parameter; a fixed value also stops the adjustment
    libc.mallopt(m_mmap_threshold, 64 * 1024)
    libc.malloc_trim(0)


def measure_peak_extra(setup: Callable[[], Callable[[], object]], device: str) -> int:
    """Peak bytes allocated by one call of the function ``setup()`` returns, beyond what
    existed before it. On the CPU this is only meaningful in a fresh process, and it
    changes that process's allocator (see _glibc_returns_freed_memory): time first."""
    fn = setup()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    _glibc_returns_freed_memory()
    reset_peak_rss()
    before = rss_bytes()
    fn()
    return max(0, peak_rss_bytes() - before)


def run_child(module: str, args: dict) -> dict:
    """Run ``python -m module --child JSON`` and return the JSON object it prints last."""
    proc = subprocess.run(
        [sys.executable, "-m", module, "--child", json.dumps(args)],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child {module} {args} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def copy_bandwidth(device: str, n_bytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (reads + writes), measured now."""
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    timing = time_fn(lambda: dst.copy_(src), device, warmup=2, reps=10)
    return 2 * n_bytes / (timing.median_ms / 1e3)


def environment(device: str) -> dict:
    """What produced the numbers: device, versions, date."""
    info = {
        "date": time.strftime("%Y-%m-%d"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if device == "cuda":
        info["device"] = torch.cuda.get_device_name()
    else:
        info["device"] = f"CPU ({os.cpu_count()} cores)"
    return info


def report(title: str, rows: list[dict], columns: list[str], env: dict, out_dir: str | None, name: str) -> None:
    """Print the Markdown table of a run, stamped with ``env``; with ``out_dir``, also
    write it as ``name.md`` and the rows as ``name.csv`` (plus date and device)."""
    header = f"{title}; " + ", ".join(f"{k}: {v}" for k, v in env.items())
    table = markdown_table(rows, columns)
    print(header + "\n\n" + table)
    if not out_dir:
        return
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns + ["date", "device"], extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "date": env["date"], "device": env["device"]})
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(header + "\n\n" + table + "\n")


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for col in columns:
            value = row.get(col, "")
            cells.append(f"{value:.3g}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def time_after_setup(setup: Callable[[], object], fn: Callable[[object], object], device: str, *,
                     warmup: int = 1, reps: int = 5, max_seconds: float = 10.0) -> Timing:
    """Like ``time_fn`` for ``fn(setup())``, timing only ``fn``: ``setup`` runs untimed
    before every call (a forward pass before each timed backward pass, say)."""
    for _ in range(warmup):
        fn(setup())
    times: list[float] = []
    budget_end = time.perf_counter() + max_seconds
    while len(times) < reps and (len(times) < 3 or time.perf_counter() < budget_end):
        state = setup()
        _sync(device)
        start = time.perf_counter()
        fn(state)
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
        del state
    times.sort()
    quantiles = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else times * 4
    return Timing(statistics.median(times), quantiles[0], quantiles[3])


def matmul_throughput(device: str, n: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    """Dense (n x n) @ (n x n) matmul throughput in FLOP/s, measured now."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    timing = time_fn(lambda: a @ b, device, warmup=3, reps=20)
    return 2 * n**3 / (timing.median_ms / 1e3)
