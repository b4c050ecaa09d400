"""What every kernel launch needs, shared by the op modules and the native wrappers:
whether Triton imports, the accumulation dtype, whether host reads are free, and the
tensors' CUDA device made current.

It imports nothing else of fastpo.kernels, so that ``_backend`` (which loads ``_native``)
and ``_native`` can both use it without importing each other.
"""

from __future__ import annotations

import functools

import torch

try:
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # Triton ships wheels for Linux only.
    tl = None
    HAS_TRITON = False


def acc_dtype(*inputs: torch.Tensor | torch.dtype | None) -> torch.dtype:
    """The dtype the kernels accumulate in and return: float64 when any input (a tensor
    or a dtype; None is skipped) is float64, float32 otherwise (bf16 and fp16 included)."""
    for x in inputs:
        if x is not None and (x if isinstance(x, torch.dtype) else x.dtype) == torch.float64:
            return torch.float64
    return torch.float32


def tl_acc_dtype(*inputs: torch.Tensor | torch.dtype | None):
    """:func:`acc_dtype` as a Triton dtype, for the kernels' ``ACC_DTYPE`` constant."""
    return tl.float64 if acc_dtype(*inputs) == torch.float64 else tl.float32


def host_reads_free(t: torch.Tensor) -> bool:
    """Whether reading a value of ``t`` on the host (a count, a flag to branch on) costs
    nothing: on the CPU. On a GPU it is a synchronization, which the kernels avoid."""
    return t.device.type == "cpu"


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
