"""Backend selection shared by every op in fastpo.kernels.

Each public op takes ``backend=None``. The choice, in order of precedence:

1. the ``backend=`` argument of the call;
2. the ``FASTPO_BACKEND`` environment variable;
3. automatic: ``"triton"`` for CUDA tensors when Triton imports; on CPU tensors ``"cpp"``
   for the ops in ``CPP_DEFAULT_OPS`` when the native extension loads, ``"torch"`` otherwise.

Triton kernels also run on CPU tensors when ``TRITON_INTERPRET=1`` was set before
Triton was imported (that is how the test suite exercises them without a GPU).

``"cpp"`` and ``"cuda"`` are the native kernels of csrc/ (kernels/_native.py), for the ops
in ``NATIVE_OPS`` only: ``"cpp"`` on CPU tensors, ``"cuda"`` on CUDA tensors. Set through
``FASTPO_BACKEND`` they apply to those ops, and the other ops choose automatically.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

from . import _native  # importing it builds nothing: the extension loads on first use
from ._launch import HAS_TRITON

BACKENDS = ("triton", "torch", "cpp", "cuda")
NATIVE_BACKENDS = {"cpp": "cpu", "cuda": "cuda"}  # backend -> the device type it runs on
# Ops implemented in the native extension (csrc/).
# linear_token_logprobs runs its per-chunk row reductions on token_logprobs' kernels.
NATIVE_OPS = frozenset({
    "token_logprobs", "linear_token_logprobs", "gae", "fisher_vector_product", "linear_fisher_vector_product",
})
# Ops whose automatic CPU backend is "cpp": measured faster than "torch" by
# bench/token_logprobs.py and bench/losses.py (numbers in bench/RESULTS.md); the Fisher-vector
# product measured 2.5-4.7x faster on one thread, V = 79 to 151936.
CPP_DEFAULT_OPS = frozenset({
    "token_logprobs", "linear_token_logprobs", "gae", "fisher_vector_product", "linear_fisher_vector_product",
})


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str | None, device: torch.device, op: str) -> str:
    """Return the backend that runs ``op`` for tensors on ``device``."""
    if backend is None:
        backend = os.environ.get("FASTPO_BACKEND") or None
        if backend in NATIVE_BACKENDS and op not in NATIVE_OPS:
            backend = None  # the environment's native choice covers the ops that have one
    if backend is None:
        return _automatic(device, op)
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend={backend!r} is not one of {BACKENDS}")
    if backend in NATIVE_BACKENDS:
        _check_native(backend, device, op)
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError(f"{op}: backend='triton' requested but triton is not installed")
        if device.type != "cuda" and not triton_interpreter_enabled():
            raise ValueError(
                f"{op}: backend='triton' needs CUDA tensors (got device {device}); "
                "set TRITON_INTERPRET=1 before importing triton to run the kernels on the CPU"
            )
    return backend


def _automatic(device: torch.device, op: str) -> str:
    if device.type == "cuda":
        if HAS_TRITON:
            return "triton"
        return "cuda" if op in NATIVE_OPS and _native.available(device) else "torch"
    if device.type == "cpu" and op in CPP_DEFAULT_OPS and _native.available(device):
        return "cpp"
    return "torch"


def _check_native(backend: str, device: torch.device, op: str) -> None:
    if op not in NATIVE_OPS:
        raise ValueError(
            f"{op}: backend={backend!r} is not implemented for this op; the native backends "
            f"cover {sorted(NATIVE_OPS)}"
        )
    if device.type != NATIVE_BACKENDS[backend]:
        raise ValueError(
            f"{op}: backend={backend!r} needs {NATIVE_BACKENDS[backend].upper()} tensors (got device {device})"
        )
    if not _native.available(device):
        raise RuntimeError(
            f"{op}: backend={backend!r} requested but fastpo's native extension is unavailable: "
            f"{_native.unavailable_reason() or 'built without CUDA'}"
        )


def dispatch(
    op: str,
    device: torch.device,
    backend: str | None,
    *,
    torch: Callable,
    triton: Callable | None = None,
    native: Callable | None = None,
) -> Callable:
    """The implementation of ``op`` that runs for tensors on ``device``: the backend is
    chosen by :func:`resolve_backend` (which also validates it), then ``triton`` serves
    ``"triton"``, ``native`` serves ``"cpp"`` and ``"cuda"`` and ``torch`` serves
    ``"torch"``. An implementation given as None falls back to ``torch``: ops without a
    kernel (``whiten``), and kernels without a backward while autograd records."""
    chosen = {"torch": torch, "triton": triton, "cpp": native, "cuda": native}[resolve_backend(backend, device, op)]
    return torch if chosen is None else chosen
