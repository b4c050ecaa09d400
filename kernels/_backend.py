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

import functools
import os

import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # Triton ships wheels for Linux only.
    HAS_TRITON = False

BACKENDS = ("triton", "torch", "cpp", "cuda")
NATIVE_BACKENDS = {"cpp": "cpu", "cuda": "cuda"}  # backend -> the device type it runs on
# Ops implemented in the native extension (csrc/).
# linear_token_logprobs runs its per-chunk row reductions on token_logprobs' kernels.
NATIVE_OPS = frozenset({"token_logprobs", "linear_token_logprobs", "gae"})
# Ops whose automatic CPU backend is "cpp": measured faster than "torch" by
# bench/token_logprobs.py and bench/losses.py (numbers in bench/RESULTS.md).
CPP_DEFAULT_OPS = frozenset({"token_logprobs", "linear_token_logprobs", "gae"})


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
        return "cuda" if op in NATIVE_OPS and _native_available(device) else "torch"
    if device.type == "cpu" and op in CPP_DEFAULT_OPS and _native_available(device):
        return "cpp"
    return "torch"


def _native_available(device: torch.device) -> bool:
    from . import _native  # imported late: loading may JIT-build the extension

    return _native.available(device)


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
    if not _native_available(device):
        from . import _native

        raise RuntimeError(
            f"{op}: backend={backend!r} requested but fastpo's native extension is unavailable: "
            f"{_native.unavailable_reason() or 'built without CUDA'}"
        )


def on_tensor_device(fn):
    """Run ``fn`` with the current CUDA device set to that of its first CUDA tensor
    argument (a tensor, or a tuple starting with one). Triton kernels and the native
    CUDA kernels launch on the current device, so without this, tensors on cuda:1
    while cuda:0 is current would be read from the wrong device."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        for arg in (*args, *kwargs.values()):
            tensor = arg[0] if isinstance(arg, tuple) and arg else arg
            if isinstance(tensor, torch.Tensor) and tensor.is_cuda:
                with torch.cuda.device(tensor.device):
                    return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper
