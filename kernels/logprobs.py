"""Per-token log-probabilities and entropy from logits, without materializing softmax.

    lp = z[target] - logsumexp(z),   H = logsumexp(z) - sum_v softmax(z)_v * z_v,
    z = logits / T,  or with a softcap c:  z = c * tanh(logits / c) / T.

The forward is one online pass per row (running max, running sum of exp(z - max),
running sum of exp(z - max) * (z - max)) and keeps only per-row fp32 statistics; the
backward recomputes softmax from them in one pass and writes only the gradient:

    d lp / dz = onehot(target) - p,     d H / dz = -p * (log p + H).

Logits of -inf (a masked-out vocabulary) are treated as the most negative finite
float, so they get probability 0 and no NaN appears; a row whose logits are all
-inf is therefore uniform.
"""

from __future__ import annotations

import math

import torch

from . import _native
from ._backend import HAS_TRITON, on_tensor_device, resolve_backend
from ._validate import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_same_device,
    check_targets,
    check_tensor,
    positive_scalar,
    row_temperature,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

# Rows of a torch-backend chunk are chosen so that one fp32 (rows, V) temporary stays
# near this many elements (4 MiB): large enough for the vectorized ops to run at full
# speed, small enough that the extra memory is a few such temporaries, whatever N is.
TORCH_CHUNK_ELEMENTS = 1 << 20


def _row_layout(logits: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """Describe the rows of ``logits`` (..., V) as ``outer x inner`` with two strides.

    Returns ``(logits, n_inner, stride_outer, stride_inner)`` such that row ``r`` starts
    at element ``(r // n_inner) * stride_outer + (r % n_inner) * stride_inner``. Any
    layout whose leading dimensions collapse into at most two groups (contiguous
    tensors, and slices such as ``logits[:, :-1]``) is used in place; anything else is
    copied once.
    """
    sizes = list(logits.shape[:-1])
    strides = list(logits.stride()[:-1])
    groups: list[list[int]] = []  # [size, stride], innermost last
    for size, stride in zip(sizes, strides):
        if size == 1:
            continue
        if groups and groups[-1][1] == stride * size:
            groups[-1] = [groups[-1][0] * size, stride]
        else:
            groups.append([size, stride])
    if len(groups) > 2:
        logits = logits.contiguous()
        return logits, max(1, math.prod(sizes)), 0, logits.shape[-1]
    if len(groups) == 0:
        return logits, 1, 0, 0
    if len(groups) == 1:
        return logits, groups[0][0], 0, groups[0][1]
    (_, stride_outer), (n_inner, stride_inner) = groups
    return logits, n_inner, stride_outer, stride_inner


def _rows_view(layout, n_rows: int) -> torch.Tensor:
    """The rows as an (n_outer, n_inner, V) strided view of the same storage, no copy."""
    logits, n_inner, stride_outer, stride_inner = layout
    n_outer = n_rows // n_inner if n_inner else 0
    return logits.as_strided(
        (n_outer, n_inner, logits.shape[-1]), (stride_outer, stride_inner, 1), logits.storage_offset()
    )


# --------------------------------------------------------------------------- Triton

if HAS_TRITON:

    @triton.jit
    def _transform(x, inv_temp, softcap, HAS_SOFTCAP: tl.constexpr):
        """logits -> z, plus dz/dx."""
        if HAS_SOFTCAP:
            t = 2.0 * tl.sigmoid(2.0 * x / softcap) - 1.0  # tanh(x / softcap)
            z = softcap * t * inv_temp
            dz = (1.0 - t * t) * inv_temp
        else:
            z = x * inv_temp
            dz = inv_temp
        return z, dz

    @triton.jit
    def _clamped_z(x, inv_temp, softcap, HAS_SOFTCAP: tl.constexpr):
        """z with -inf raised to the most negative finite float, so exp() gives 0, never NaN
        (a NaN logit stays NaN and makes its row NaN, as in the other backends)."""
        z, dz = _transform(x, inv_temp, softcap, HAS_SOFTCAP)
        return tl.where(z == float("-inf"), -3.4028234663852886e38, z), dz

    @triton.jit
    def _this_row(logits_ptr, targets_ptr, temp_ptr, temp_stride, n_inner, stride_outer, stride_inner,
                  ignore_index, ACC_DTYPE: tl.constexpr):
        """This program's row: (row index, pointer to its logits, target, 1 / T, ignored?)."""
        row = tl.program_id(0).to(tl.int64)
        base = (row // n_inner) * stride_outer + (row % n_inner) * stride_inner
        target = tl.load(targets_ptr + row).to(tl.int64)
        inv_temp = 1.0 / tl.load(temp_ptr + row * temp_stride).to(ACC_DTYPE)
        return row, logits_ptr + base, target, inv_temp, target == ignore_index

    @triton.jit
    def _token_logprobs_fwd_kernel(
        logits_ptr,
        targets_ptr,
        temp_ptr,
        temp_stride,
        logprobs_ptr,
        entropy_ptr,
        row_max_ptr,
        log_sum_ptr,
        n_inner,
        stride_outer,
        stride_inner,
        vocab,
        ignore_index,
        softcap,
        HAS_SOFTCAP: tl.constexpr,
        COMPUTE_ENTROPY: tl.constexpr,
        ACC_DTYPE: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        row, row_ptr, target, inv_temp, ignored = _this_row(
            logits_ptr, targets_ptr, temp_ptr, temp_stride, n_inner, stride_outer, stride_inner,
            ignore_index, ACC_DTYPE,
        )
        # Ignored rows skip the vocabulary loop altogether (padding is common).
        v_end = tl.where(ignored, 0, vocab)

        m = tl.full([], -3.4028234663852886e38, ACC_DTYPE)  # running max
        s = tl.zeros([], ACC_DTYPE)  # sum exp(z - m)
        u = tl.zeros([], ACC_DTYPE)  # sum exp(z - m) * (z - m)
        cols = tl.arange(0, BLOCK_V)
        for start in range(0, v_end, BLOCK_V):
            offs = start + cols
            in_row = offs < vocab
            x = tl.load(row_ptr + offs, mask=in_row, other=0.0).to(ACC_DTYPE)
            z, _ = _clamped_z(x, inv_temp, softcap, HAS_SOFTCAP)
            z = tl.where(in_row, z, -3.4028234663852886e38)
            m_new = tl.maximum(m, tl.max(z, axis=0))
            alpha = tl.exp(m - m_new)
            p = tl.where(in_row, tl.exp(z - m_new), 0.0)
            if COMPUTE_ENTROPY:
                # alpha * (m - m_new) first: after a run of -inf logits m is -FLT_MAX and
                # (m - m_new) * s would overflow to -inf, times alpha = 0 giving NaN.
                u = alpha * u + (alpha * (m - m_new)) * s + tl.sum(p * (z - m_new), axis=0)
            s = alpha * s + tl.sum(p, axis=0)
            m = m_new

        # The target's logit, read once; the guard keeps a bad target from reading
        # outside the row even when the host-side check was bypassed.
        valid = (target >= 0) & (target < vocab) & (~ignored)
        x_t = tl.load(row_ptr + tl.where(valid, target, 0), mask=valid, other=0.0).to(ACC_DTYPE)
        z_t, _ = _transform(x_t, inv_temp, softcap, HAS_SOFTCAP)
        log_s = tl.log(tl.where(ignored, 1.0, s))
        # (z_t - m) first: both are large for large logits, their difference is exact.
        # An unclamped -inf target logit gives -inf, its true log-probability.
        logprob = tl.where(valid, (z_t - m) - log_s, float("nan"))
        logprob = tl.where(ignored, 0.0, logprob)
        tl.store(logprobs_ptr + row, logprob)
        # Ignored rows store zeros, so that their backward (which reads zeros in place of
        # the logits) sees p = 1 and g = 0: every term finite, the gradient exactly 0.
        tl.store(row_max_ptr + row, tl.where(ignored, 0.0, m))
        tl.store(log_sum_ptr + row, log_s)
        if COMPUTE_ENTROPY:
            entropy = tl.where(ignored, 0.0, log_s - u / tl.where(ignored, 1.0, s))
            tl.store(entropy_ptr + row, entropy)

    @triton.jit
    def _token_logprobs_bwd_kernel(
        logits_ptr,
        targets_ptr,
        temp_ptr,
        temp_stride,
        row_max_ptr,
        log_sum_ptr,
        entropy_ptr,
        grad_logprobs_ptr,
        grad_entropy_ptr,
        grad_logits_ptr,
        n_inner,
        stride_outer,
        stride_inner,
        vocab,
        ignore_index,
        softcap,
        HAS_SOFTCAP: tl.constexpr,
        HAS_GRAD_LOGPROBS: tl.constexpr,
        HAS_GRAD_ENTROPY: tl.constexpr,
        ACC_DTYPE: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        row, row_ptr, target, inv_temp, ignored = _this_row(
            logits_ptr, targets_ptr, temp_ptr, temp_stride, n_inner, stride_outer, stride_inner,
            ignore_index, ACC_DTYPE,
        )
        out_ptr = grad_logits_ptr + row * vocab
        row_max = tl.load(row_max_ptr + row)
        log_sum = tl.load(log_sum_ptr + row)
        g_lp = tl.zeros([], ACC_DTYPE)
        g_h = tl.zeros([], ACC_DTYPE)
        if HAS_GRAD_LOGPROBS:
            g_lp = tl.load(grad_logprobs_ptr + row).to(ACC_DTYPE)
        if HAS_GRAD_ENTROPY:
            g_h = tl.load(grad_entropy_ptr + row).to(ACC_DTYPE)
            entropy = tl.load(entropy_ptr + row)
        g_lp = tl.where(ignored, 0.0, g_lp)
        g_h = tl.where(ignored, 0.0, g_h)
        v_read = tl.where(ignored, 0, vocab)

        cols = tl.arange(0, BLOCK_V)
        for start in range(0, vocab, BLOCK_V):
            offs = start + cols
            in_row = offs < vocab
            # Ignored rows only write zeros: their logits are not read (zeros instead);
            # lanes past the row's end read -inf, so that p = 0 there.
            x = tl.load(row_ptr + offs, mask=offs < v_read, other=0.0).to(ACC_DTYPE)
            x = tl.where(in_row, x, float("-inf"))
            z, dz = _clamped_z(x, inv_temp, softcap, HAS_SOFTCAP)
            log_p = (z - row_max) - log_sum
            p = tl.exp(log_p)
            if HAS_GRAD_ENTROPY:
                # p * (log p + H) first: where p = 0, log p is about -FLT_MAX and
                # scaling it by g_h before the product could overflow to NaN.
                grad_z = -(p * g_lp + (p * (log_p + entropy)) * g_h)
            else:
                grad_z = -p * g_lp
            grad_z = tl.where(offs == target, grad_z + g_lp, grad_z)
            grad_z = tl.where(ignored, 0.0, grad_z)
            tl.store(out_ptr + offs, (grad_z * dz).to(grad_logits_ptr.dtype.element_ty), mask=in_row)


def _triton_config(vocab: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_V, num_warps): wide blocks for large vocabularies; the interpreter
    (CPU tensors) prefers few, large blocks."""
    if device.type != "cuda":
        return max(16, min(triton.next_power_of_2(max(vocab, 1)), 16384)), 1
    block = max(128, min(triton.next_power_of_2(max(vocab, 1)), 4096))
    return block, 8 if block >= 2048 else 4


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@on_tensor_device
def _triton_forward(layout, targets, temp, softcap, ignore_index, compute_entropy):
    logits, n_inner, stride_outer, stride_inner = layout
    vocab = logits.shape[-1]
    n_rows = targets.numel()
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logprobs, row_max, log_sum = torch.empty((3, n_rows), dtype=acc, device=logits.device)
    entropy = torch.empty(n_rows, dtype=acc, device=logits.device) if compute_entropy else None
    if n_rows:
        block, num_warps = _triton_config(vocab, logits.device)
        _token_logprobs_fwd_kernel[(n_rows,)](
            logits, targets, temp, temp.stride(0), logprobs,
            entropy if compute_entropy else logprobs, row_max, log_sum,
            n_inner, stride_outer, stride_inner, vocab, ignore_index,
            softcap or 1.0,
            HAS_SOFTCAP=softcap is not None,
            COMPUTE_ENTROPY=compute_entropy,
            ACC_DTYPE=_acc_dtype(logits.dtype),
            BLOCK_V=block,
            num_warps=num_warps,
        )
    return logprobs, entropy, (row_max, log_sum)


@on_tensor_device
def _triton_backward(layout, targets, temp, softcap, ignore_index, stats, entropy, g_lp, g_h):
    logits, n_inner, stride_outer, stride_inner = layout
    row_max, log_sum = stats
    vocab = logits.shape[-1]
    n_rows = targets.numel()
    grad = torch.empty((n_rows, vocab), dtype=logits.dtype, device=logits.device)
    if n_rows and vocab:
        block, num_warps = _triton_config(vocab, logits.device)
        _token_logprobs_bwd_kernel[(n_rows,)](
            logits, targets, temp, temp.stride(0), row_max, log_sum,
            entropy if entropy is not None else row_max,
            g_lp if g_lp is not None else row_max,
            g_h if g_h is not None else row_max,
            grad, n_inner, stride_outer, stride_inner, vocab, ignore_index,
            softcap or 1.0,
            HAS_SOFTCAP=softcap is not None,
            HAS_GRAD_LOGPROBS=g_lp is not None,
            HAS_GRAD_ENTROPY=g_h is not None,
            ACC_DTYPE=_acc_dtype(logits.dtype),
            BLOCK_V=block,
            num_warps=num_warps,
        )
    return grad


# --------------------------------------------------------------------- pure PyTorch


def _torch_transform(z: torch.Tensor, temp: torch.Tensor, softcap: float | None, tanh_out=None):
    """z = (softcap * tanh(z / softcap)) / T in place on a float buffer; returns (z, tanh).

    With a softcap, tanh(z / softcap) is kept (in ``tanh_out`` when given) for dz/dx.
    """
    tanh = None
    if softcap is not None:
        tanh = torch.tanh(z.div_(softcap), out=tanh_out if tanh_out is not None else z)
        z = torch.mul(tanh, softcap, out=z)
    return z.div_(temp), tanh


def _torch_chunks(layout, n_rows: int):
    """Yield (row_start, row_stop, logits_chunk) over the rows, a bounded number at a time."""
    n_inner = layout[1]
    vocab = layout[0].shape[-1]
    view = _rows_view(layout, n_rows)
    chunk = _torch_chunk_rows(vocab)
    for outer in range(view.shape[0]):
        for start in range(0, n_inner, chunk):
            stop = min(start + chunk, n_inner)
            yield outer * n_inner + start, outer * n_inner + stop, view[outer, start:stop]


def _torch_chunk_rows(vocab: int) -> int:
    return max(1, TORCH_CHUNK_ELEMENTS // max(1, vocab))


def _workspace(count: int, n_rows: int, vocab: int, dtype: torch.dtype, device: torch.device):
    """``count`` reusable (rows, V) buffers for the chunk loop. Reusing them, rather than
    allocating per chunk, keeps the extra memory at exactly these buffers (the allocator
    would otherwise hold on to a few generations of freed chunks)."""
    rows = min(n_rows, _torch_chunk_rows(vocab))
    return torch.empty((count, rows, vocab), dtype=dtype, device=device).unbind(0)


def _torch_clamped_z(x: torch.Tensor, temp: torch.Tensor, softcap: float | None, z_buf, tanh_buf=None):
    """z for one chunk written into ``z_buf``, -inf raised to the most negative finite
    float so that exp() gives 0, never NaN; and tanh(x / c) when softcapped."""
    z = z_buf[: x.shape[0]]
    z.copy_(x)
    tanh_out = None if tanh_buf is None else tanh_buf[: x.shape[0]]
    z, tanh = _torch_transform(z, temp, softcap, tanh_out)
    return z.clamp_(min=torch.finfo(z.dtype).min), tanh


def _torch_forward(layout, targets, temp, softcap, ignore_index, compute_entropy):
    logits = layout[0]
    n_rows, vocab = targets.numel(), logits.shape[-1]
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logprobs, row_max, log_sum = torch.empty((3, n_rows), dtype=acc, device=logits.device)
    entropy = torch.empty(n_rows, dtype=acc, device=logits.device) if compute_entropy else None
    ignored = targets == ignore_index
    safe_targets = targets.masked_fill(ignored, 0).long()[:, None]
    z_buf, e_buf = _workspace(2, n_rows, vocab, acc, logits.device)
    for start, stop, x in _torch_chunks(layout, n_rows):
        rows = slice(start, stop)
        # the target's logit, unclamped: a -inf target has log-probability -inf
        z_t, _ = _torch_transform(x.gather(-1, safe_targets[rows]).to(acc), temp[rows, None], softcap)
        z, _ = _torch_clamped_z(x, temp[rows, None], softcap, z_buf)
        z_max = z.amax(dim=-1, keepdim=True)
        shifted = z.sub_(z_max)
        e = torch.exp(shifted, out=e_buf[: stop - start])
        s = e.sum(dim=-1)
        torch.log(s, out=log_sum[rows])
        row_max[rows] = z_max.squeeze(-1)
        # (z_t - max) first: both are large for large logits, their difference is exact
        logprobs[rows] = (z_t - z_max).squeeze_(-1) - log_sum[rows]
        if compute_entropy:
            entropy[rows] = log_sum[rows] - e.mul_(shifted).sum(dim=-1) / s
    logprobs.masked_fill_(ignored, 0.0)
    if compute_entropy:
        entropy.masked_fill_(ignored, 0.0)
    return logprobs, entropy, (row_max, log_sum)


def _torch_backward(layout, targets, temp, softcap, ignore_index, stats, entropy, g_lp, g_h):
    logits = layout[0]
    row_max, log_sum = stats
    n_rows, vocab = targets.numel(), logits.shape[-1]
    acc = row_max.dtype
    grad = torch.empty((n_rows, vocab), dtype=logits.dtype, device=logits.device)
    ignored = targets == ignore_index
    g_lp = torch.zeros_like(row_max) if g_lp is None else g_lp.to(acc).masked_fill(ignored, 0.0)
    g_h = None if g_h is None else g_h.to(acc).masked_fill(ignored, 0.0)
    safe_targets = targets.masked_fill(ignored, 0).long()[:, None]
    # When the gradient has the accumulation dtype, each chunk is computed in place in
    # its slice of the output and one workspace buffer suffices.
    in_place = logits.dtype == acc
    buffers = _workspace(1 + (softcap is not None) + (not in_place), n_rows, vocab, acc, logits.device)
    p_buf = buffers[0]
    tanh_buf = buffers[1] if softcap is not None else None
    for start, stop, x in _torch_chunks(layout, n_rows):
        rows = slice(start, stop)
        z_buf = grad[rows] if in_place else buffers[-1]
        z, tanh = _torch_clamped_z(x, temp[rows, None], softcap, z_buf, tanh_buf)
        log_p = z.sub_(row_max[rows, None]).sub_(log_sum[rows, None])
        p = torch.exp(log_p, out=p_buf[: stop - start])
        g1 = g_lp[rows, None]
        if g_h is None:
            grad_z = torch.mul(p, g1, out=log_p).neg_()
        else:
            # -(p * g_lp + (p * (log p + H)) * g_h), built in log_p's buffer; p * (log p + H)
            # first, since log p is about -FLT_MAX where p = 0 and must not overflow.
            grad_z = log_p.add_(entropy[rows, None]).mul_(p).mul_(g_h[rows, None])
            grad_z = grad_z.add_(p.mul_(g1)).neg_()
        grad_z.scatter_add_(-1, safe_targets[rows], g1)
        if tanh is not None:
            grad_z.mul_(tanh.square_().neg_().add_(1.0))
        grad_z.div_(temp[rows, None])
        if not in_place:
            grad[rows] = grad_z
    return grad


# ----------------------------------------------------------------------- autograd

# backend -> (forward, backward); "cpp" and "cuda" are the native kernels of csrc/.
_IMPLEMENTATIONS = {
    "triton": (_triton_forward, _triton_backward),
    "torch": (_torch_forward, _torch_backward),
    "cpp": (_native.token_logprobs_forward, _native.token_logprobs_backward),
    "cuda": (_native.token_logprobs_forward, _native.token_logprobs_backward),
}


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temp, softcap, ignore_index, compute_entropy, backend):
        layout = _row_layout(logits)
        forward = _IMPLEMENTATIONS[backend][0]
        logprobs, entropy, (row_max, log_sum) = forward(
            layout, targets, temp, softcap, ignore_index, compute_entropy
        )
        ctx.set_materialize_grads(False)
        ctx.layout_meta = layout[1:]
        ctx.logits_shape = logits.shape
        ctx.options = (softcap, ignore_index, backend)
        ctx.save_for_backward(layout[0], targets, temp, row_max, log_sum, entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        if grad_logprobs is None and grad_entropy is None:
            return (None,) * 7
        logits, targets, temp, row_max, log_sum, entropy = ctx.saved_tensors
        softcap, ignore_index, backend = ctx.options
        layout = (logits, *ctx.layout_meta)
        backward = _IMPLEMENTATIONS[backend][1]
        if grad_logprobs is not None:
            grad_logprobs = grad_logprobs.contiguous()
        if grad_entropy is not None:
            grad_entropy = grad_entropy.contiguous()
        grad = backward(
            layout, targets, temp, softcap, ignore_index, (row_max, log_sum), entropy,
            grad_logprobs, grad_entropy,
        )
        return grad.view(ctx.logits_shape), None, None, None, None, None, None


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 1.0,
    ignore_index: int = -100,
    softcap: float | None = None,
    return_entropy: bool = False,
    backend: str | None = None,
):
    """Log-probability of each target token, and optionally the entropy, from logits.

    Args:
        logits: (..., V) float32, bfloat16 or float16 (float64 is accepted for
            gradient checks), unit stride in the last dimension. Other strides are used
            as they are; ``logits[:, :-1]`` is not copied.
        targets: (...) int32 or int64 token ids in [0, V), or ``ignore_index``.
        temperature: a float > 0, or a tensor broadcastable to ``targets.shape``
            (for example (B, 1) for one temperature per sequence).
        ignore_index: targets equal to it give 0 for both outputs and zero gradient.
        softcap: if given, logits become ``softcap * tanh(logits / softcap)`` before
            the temperature (Gemma-2 style).
        return_entropy: also return the entropy of each row's distribution.
        backend: ``"triton"``, ``"torch"``, ``"cpp"`` (C++ kernels, CPU tensors), ``"cuda"``
            (CUDA C++ kernels) or None (automatic; see fastpo.kernels).

    Returns:
        float32 log-probs of ``targets.shape`` (float64 for float64 logits), and with
        ``return_entropy=True`` the pair ``(logprobs, entropy)``. Both are
        differentiable with respect to ``logits``; the gradient has the logits' dtype.
    """
    check_tensor("logits", logits, FLOAT_DTYPES)
    check_tensor("targets", targets, INDEX_DTYPES)
    check_same_device(logits=logits, targets=targets)
    if logits.dim() == 0:
        raise ValueError("logits must have a vocabulary dimension, got a 0-dim tensor")
    if tuple(logits.shape[:-1]) != tuple(targets.shape):
        raise ValueError(
            f"logits.shape {tuple(logits.shape)} does not match targets.shape "
            f"{tuple(targets.shape)}: expected logits of shape (*targets.shape, V)"
        )
    vocab = logits.shape[-1]
    if vocab > 1 and logits.stride(-1) != 1:
        raise ValueError(
            f"logits must have unit stride in the vocabulary dimension, got strides "
            f"{logits.stride()}; call .contiguous() first"
        )
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if softcap is not None:
        softcap = positive_scalar("softcap", softcap)
    backend = resolve_backend(backend, logits.device, "token_logprobs")
    temp = row_temperature(temperature, targets.shape, logits.device)
    check_targets(targets, vocab, ignore_index)

    flat_targets = targets.reshape(-1).contiguous()
    logprobs, entropy = _TokenLogprobs.apply(
        logits, flat_targets, temp, softcap, ignore_index, bool(return_entropy), backend
    )
    logprobs = logprobs.view(targets.shape)
    if return_entropy:
        return logprobs, entropy.view(targets.shape)
    return logprobs
