"""Backend selection shared by every op in fastpo.kernels.

Each public op takes ``backend=None``. The choice, in order of precedence:

1. the ``backend=`` argument of the call;
2. the ``FASTPO_BACKEND`` environment variable;
3. automatic: ``"triton"`` for CUDA tensors when Triton imports, ``"torch"`` otherwise.

Triton kernels also run on CPU tensors when ``TRITON_INTERPRET=1`` was set before
Triton was imported (that is how the test suite exercises them without a GPU).
"""

from __future__ import annotations

import os

import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # Triton ships wheels for Linux only.
    HAS_TRITON = False

BACKENDS = ("triton", "torch")


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str | None, device: torch.device, op: str) -> str:
    """Return the backend that runs ``op`` for tensors on ``device``."""
    if backend is None:
        backend = os.environ.get("FASTPO_BACKEND") or None
    if backend is None:
        return "triton" if device.type == "cuda" and HAS_TRITON else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend={backend!r} is not one of {BACKENDS}")
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError(f"{op}: backend='triton' requested but triton is not installed")
        if device.type != "cuda" and not triton_interpreter_enabled():
            raise ValueError(
                f"{op}: backend='triton' needs CUDA tensors (got device {device}); "
                "set TRITON_INTERPRET=1 before importing triton to run the kernels on the CPU"
            )
    return backend
