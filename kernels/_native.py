"""fastpo's native extension (csrc/): loading, JIT building, and thin tensor wrappers.

The extension is found, in order:

1. ``fastpo.kernels._C``, compiled by setup.py at install time when torch and a C++
   compiler were importable / present in the build environment;
2. otherwise it is JIT-built on first use with ``torch.utils.cpp_extension.load`` (ninja,
   pybind11; about half a minute, printed as one line, cached under
   ``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``);
3. if that fails too (no compiler, say), one warning is issued and :func:`module` returns
   None: the ``"cpp"`` / ``"cuda"`` backends are then unavailable and the automatic choice
   stays on the pure-PyTorch backend. Nothing crashes.

``FASTPO_NATIVE=0`` skips the extension altogether (no build, no warning);
``FASTPO_NATIVE_FORCE_JIT=1`` ignores an install-time build (to test the JIT path).

The C++ side takes raw pointers (see csrc/native.h), so the wrappers here allocate every
output and hand over pointers, sizes and strides. They assume the arguments were validated
by the public functions.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from pathlib import Path

import torch

from ._launch import acc_dtype, on_tensor_device

_CSRC = Path(__file__).resolve().parent.parent / "csrc"
JIT_NAME = "fastpo_native"
CPU_SOURCES = ("bindings.cpp", "cpu/kernels.cpp")
CUDA_SOURCES = ("cuda/kernels.cu",)
# OpenMP for the CPU kernels; libgomp has the soname torch's own copy has, so the
# process keeps one OpenMP runtime.
CXX_FLAGS = ["-O3", "-std=c++17", "-fopenmp"]
LD_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3", "-std=c++17"]

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}

_lock = threading.Lock()
_state: dict[str, object] = {}


def _want_cuda() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.cuda.is_available() and torch.version.cuda is not None and CUDA_HOME is not None


def _jit_build(with_cuda: bool):
    from torch.utils.cpp_extension import load

    if not (_CSRC / CPU_SOURCES[0]).exists():
        raise FileNotFoundError(f"no csrc/ sources at {_CSRC} (an install without them and without a build)")
    name = JIT_NAME + ("_cuda" if with_cuda else "")
    sources = [str(_CSRC / s) for s in CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())]
    defines = ["-DFASTPO_WITH_CUDA"] if with_cuda else []
    if not _jit_cached(name):
        print(
            f"fastpo: building the native extension from {_CSRC} (first use only, ~10 s; "
            "cached by torch.utils.cpp_extension)",
            file=sys.stderr,
            flush=True,
        )
    return load(
        name=name,
        sources=sources,
        extra_cflags=CXX_FLAGS + defines,
        extra_cuda_cflags=NVCC_FLAGS + defines,
        extra_ldflags=LD_FLAGS,
        verbose=False,
    )


def _jit_cached(name: str) -> bool:
    """Whether a previous JIT build of ``name`` exists (then load() only checks it)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return (Path(_get_build_directory(name, verbose=False)) / f"{name}.so").exists()
    except Exception:  # a private helper of torch: if it moved, just print the message
        return False


def _load():
    if os.environ.get("FASTPO_NATIVE", "1") == "0":
        return None, "disabled by FASTPO_NATIVE=0"
    with_cuda = _want_cuda()
    installed = None
    if os.environ.get("FASTPO_NATIVE_FORCE_JIT", "0") != "1":
        try:
            from . import _C as installed  # built by setup.py
        except ImportError:
            pass
    if installed is not None and (installed.has_cuda or not with_cuda):
        return installed, None
    try:
        return _jit_build(with_cuda), None
    except Exception as exc:  # a missing compiler, ninja, or headers: fall back, never crash
        if installed is not None:  # a CPU-only install-time build still serves "cpp"
            return installed, None
        message = str(exc).strip()
        return None, f"{type(exc).__name__}: {message.splitlines()[-1] if message else ''}"


def module():
    """The loaded extension, or None when it cannot be built here (warns once)."""
    if "module" not in _state:
        with _lock:
            if "module" not in _state:
                mod, reason = _load()
                _state["module"], _state["reason"] = mod, reason
                if mod is None and reason != "disabled by FASTPO_NATIVE=0":
                    warnings.warn(
                        f"fastpo: native extension unavailable ({reason}); using the pure-PyTorch backend",
                        RuntimeWarning,
                        stacklevel=3,
                    )
    return _state["module"]


def unavailable_reason() -> str | None:
    """Why :func:`module` is None (after a call to it), else None."""
    module()
    return _state.get("reason")  # type: ignore[return-value]


def available(device: torch.device) -> bool:
    """Whether the native kernels can run on tensors of ``device``."""
    if device.type not in ("cpu", "cuda"):
        return False
    mod = module()
    return mod is not None and (device.type == "cpu" or bool(mod.has_cuda))


def _device_arg(device: torch.device) -> int:
    """The last argument of every native entry: CPU thread count, or the CUDA stream."""
    if device.type == "cuda":
        return torch.cuda.current_stream(device).cuda_stream
    return torch.get_num_threads()


def _entry(name: str, device: torch.device):
    return getattr(module(), f"{name}_{device.type}")


def _common_args(layout, targets: torch.Tensor, temp: torch.Tensor, softcap, ignore_index: int):
    logits, n_inner, stride_outer, stride_inner = layout
    return (
        logits.data_ptr(),
        _DTYPE_CODES[logits.dtype],
        targets.numel(),
        logits.shape[-1],
        n_inner,
        stride_outer,
        stride_inner,
        targets.data_ptr(),
        temp.data_ptr(),
        temp.stride(0),
        softcap is not None,
        float(softcap or 1.0),
        int(ignore_index),
    )


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


@on_tensor_device
def token_logprobs_forward(layout, targets, temp, softcap, ignore_index, compute_entropy):
    """Native forward with the contract of logprobs.py's ``_torch_forward``: returns
    ``(logprobs, entropy or None, (row_max, log_sum))``, each (n_rows,)."""
    logits = layout[0]
    n_rows = targets.numel()
    acc = acc_dtype(logits)
    logprobs, row_max, log_sum = torch.empty((3, n_rows), dtype=acc, device=logits.device)
    entropy = torch.empty(n_rows, dtype=acc, device=logits.device) if compute_entropy else None
    if n_rows:
        targets = targets.to(torch.int64).contiguous()
        temp = temp.to(torch.float32)
        _entry("token_logprobs_forward", logits.device)(
            *_common_args(layout, targets, temp, softcap, ignore_index),
            logprobs.data_ptr(),
            _ptr(entropy),
            row_max.data_ptr(),
            log_sum.data_ptr(),
            _device_arg(logits.device),
        )
    return logprobs, entropy, (row_max, log_sum)


@on_tensor_device
def token_logprobs_backward(layout, targets, temp, softcap, ignore_index, stats, entropy, g_lp, g_h):
    """Native backward with the contract of logprobs.py's ``_torch_backward``:
    returns the (n_rows, V) gradient in the logits' dtype."""
    logits = layout[0]
    row_max, log_sum = stats
    n_rows, vocab = targets.numel(), logits.shape[-1]
    grad = torch.empty((n_rows, vocab), dtype=logits.dtype, device=logits.device)
    if n_rows and vocab:
        acc = row_max.dtype
        targets = targets.to(torch.int64).contiguous()
        temp = temp.to(torch.float32)
        g_lp = None if g_lp is None else g_lp.to(acc).contiguous()
        g_h = None if g_h is None else g_h.to(acc).contiguous()
        _entry("token_logprobs_backward", logits.device)(
            *_common_args(layout, targets, temp, softcap, ignore_index),
            row_max.data_ptr(),
            log_sum.data_ptr(),
            _ptr(entropy if g_h is not None else None),
            _ptr(g_lp),
            _ptr(g_h),
            grad.data_ptr(),
            _device_arg(logits.device),
        )
    return grad


@on_tensor_device
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Native GAE over the last dimension of (..., T) tensors: ``(advantages, returns)``
    in float32 (float64 when an input is float64). Masked positions get 0 for both and
    are skipped by the recursion (see csrc/cpu/kernels.cpp, gae_row)."""
    acc = acc_dtype(rewards, values)
    values_c = values.to(acc).contiguous()
    rewards_c = rewards.to(acc).contiguous()
    mask_c = mask.to(torch.bool).contiguous()
    advantages = torch.empty_like(values_c)
    returns = torch.empty_like(values_c)
    length = values_c.shape[-1] if values_c.dim() else 1
    n_seq = values_c.numel() // length if length else 0
    if n_seq:
        _entry("gae", values_c.device)(
            rewards_c.data_ptr(),
            values_c.data_ptr(),
            mask_c.data_ptr(),
            advantages.data_ptr(),
            returns.data_ptr(),
            _DTYPE_CODES[acc],
            n_seq,
            length,
            float(gamma),
            float(lam),
            _device_arg(values_c.device),
        )
    return advantages, returns


@on_tensor_device
def fisher_vector_product(layout, u_layout, temp, mask_rows, n_rows):
    """Native Fisher-vector product with the contract of kl.py's ``_torch_fisher``: the
    (n_rows, V) product in ``temp``'s dtype (float64 for float64 logits, else float32)."""
    logits, n_inner, stride_outer, stride_inner = layout
    u, u_n_inner, u_stride_outer, u_stride_inner = u_layout
    vocab = logits.shape[-1]
    out = torch.empty((n_rows, vocab), dtype=temp.dtype, device=logits.device)
    if n_rows and vocab:
        _entry("fisher_vector_product", logits.device)(
            logits.data_ptr(), u.data_ptr(), _DTYPE_CODES[logits.dtype], n_rows, vocab,
            n_inner, stride_outer, stride_inner, u_n_inner, u_stride_outer, u_stride_inner,
            temp.data_ptr(), temp.stride(0), _ptr(mask_rows), out.data_ptr(),
            _device_arg(logits.device),
        )
    return out


def top_p_cut_available() -> bool:
    """Whether the native top-p cut runs here (an extension built before it lacks it)."""
    return available(torch.device("cpu")) and hasattr(module(), "top_p_cut_cpu")


def top_p_cut(shifted: torch.Tensor, e: torch.Tensor, top_p: float):
    """Native ``_top_p_cut`` of logprobs.py for contiguous CPU (rows, V) ``shifted`` and
    ``e``, float32 or float64: ``(cut, kept_mass)``, each (rows, 1) of their dtype."""
    rows, vocab = shifted.shape
    cut, kept_mass = torch.empty((2, rows, 1), dtype=shifted.dtype).unbind(0)
    module().top_p_cut_cpu(shifted.data_ptr(), e.data_ptr(), _DTYPE_CODES[shifted.dtype], rows, vocab,
                           float(top_p), cut.data_ptr(), kept_mass.data_ptr(), torch.get_num_threads())
    return cut, kept_mass
