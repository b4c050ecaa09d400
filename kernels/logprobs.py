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

Extra statistics (``statistics=``, TRL's optional fused-head outputs and one more) come
from the same pass, without gradient: ``log_sum_sq_probs`` = log sum_v p_v^2 (a running
sum of exp(2 (z - max)), rescaled like the sum of exp), ``mean_logit`` = mean_v z,
``is_top1`` = whether the target is the first argmax of z (a running max over the
tokens before the target), and ``top1_logprob`` = log p of the argmax, which is
-log sum_v exp(z - max) and costs nothing.

Sampling-aware log-probs (``top_k=``, ``top_p=``): the distribution is truncated to the
sampler's kept set, one threshold per row, found before the reduction by fixed-shape
tensor ops (no host synchronization, no sort): top-k by a streaming selection (the
maxima of blocks of 64 tokens, then the k blocks of largest maxima: ``_select``), top-p
by a second pass rather than a bisection on the threshold (one halving per pass, about
30 for a float32 threshold): a mass histogram over z - max, then the exact values of
the few tokens of the bin that holds the cut (``_top_p_cut``; on the CPU in C++ when the
native extension is built). Without entropy, the kept mass comes from that selection on
the CPU, with no masked pass over the row. The torch backend
decides "kept" on z - max, the values it reduces; the Triton kernels on the raw logits,
against the smallest kept logit, so that the set does not depend on how they temper.
"""

from __future__ import annotations

import math

import torch

from . import _native
from ._backend import resolve_backend
from ._launch import HAS_TRITON, acc_dtype, host_reads_free, on_tensor_device, tl_acc_dtype
from ._select import largest_values
from ._validate import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_same_device,
    check_targets,
    check_tensor,
    check_unit_vocab_stride,
    positive_scalar,
    row_temperature,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

# The statistics ``statistics=`` can ask for, in the order the kernels return them.
STATISTICS = ("log_sum_sq_probs", "mean_logit", "is_top1", "top1_logprob")

# Rows of a torch-backend chunk are chosen so that one fp32 (rows, V) temporary stays
# near this many elements: on the CPU 2^20 (4 MiB), large enough for the vectorized ops to
# run at full speed, small enough that the extra memory is a few such temporaries,
# whatever N is. On a GPU every op of the chunk loop is a kernel launch of a few
# microseconds, and 4 MiB chunks made the loop launch-bound (an H200, 2026-12-04: 90x
# eager's time at 4096 x 32,000); 2^24 elements (64 MiB) per temporary cut the time 8-10x
# there, the extra memory still bounded (bench/RESULTS.md).
TORCH_CHUNK_ELEMENTS = 1 << 20
GPU_TORCH_CHUNK_ELEMENTS = 1 << 24

# Values read past the k-th for top-k, so that its ties are among them: low-precision
# logits have many (bf16: about 8 tokens per rounding step near the 50th largest of 32,000
# flat random logits).
TOP_K_TIES = 32
# Bins per round of the top-p histogram (``_top_p_cut``): TOP_P_BINS, or one per
# TOP_P_TOKENS_PER_BIN tokens of the row when that is more, so that the bin holding the cut
# has a few tokens at any V (about 16 near the cut of flat random rows, logits of std 2,
# p = 0.9); each (rows, bins) histogram a small fraction of a chunk. Two rounds resolve
# the cut to -lower / bins**2 of z - max (about 1e-6).
TOP_P_BINS = 4096
TOP_P_TOKENS_PER_BIN = 8
# Tokens read exactly from the top of the cut's bin down (CPU); more than this many in that
# bin above the cut sends the chunk to the second round.
TOP_P_CANDIDATES = 32
# Values of the last sub-bin sorted exactly, so that the cut is exact whenever the mass is
# reached within them (a sub-bin spans about 1e-6 of z - max: a few tokens at most).
TOP_P_LAST = 8


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
        log_sum_sq_ptr,
        mean_logit_ptr,
        is_top1_ptr,
        top1_logprob_ptr,
        threshold_ptr,
        n_inner,
        stride_outer,
        stride_inner,
        vocab,
        ignore_index,
        softcap,
        HAS_SOFTCAP: tl.constexpr,
        COMPUTE_ENTROPY: tl.constexpr,
        HAS_THRESHOLD: tl.constexpr,
        HAS_LOG_SUM_SQ: tl.constexpr,
        HAS_MEAN_LOGIT: tl.constexpr,
        HAS_IS_TOP1: tl.constexpr,
        HAS_TOP1_LOGPROB: tl.constexpr,
        ACC_DTYPE: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        row, row_ptr, target, inv_temp, ignored = _this_row(
            logits_ptr, targets_ptr, temp_ptr, temp_stride, n_inner, stride_outer, stride_inner,
            ignore_index, ACC_DTYPE,
        )
        # Ignored rows skip the vocabulary loop altogether (padding is common).
        v_end = tl.where(ignored, 0, vocab)
        # the sampler's kept set (top-k/top-p) is logit >= tau; the others get probability 0
        tau = tl.full([], float("-inf"), ACC_DTYPE)
        if HAS_THRESHOLD:
            tau = tl.load(threshold_ptr + row).to(ACC_DTYPE)

        m = tl.full([], -3.4028234663852886e38, ACC_DTYPE)  # running max
        s = tl.zeros([], ACC_DTYPE)  # sum exp(z - m)
        u = tl.zeros([], ACC_DTYPE)  # sum exp(z - m) * (z - m)
        sq = tl.zeros([], ACC_DTYPE)  # sum exp(2 (z - m))
        z_sum = tl.zeros([], ACC_DTYPE)  # sum z, -inf logits included as -inf
        # max of z over the tokens before the target: the target is the first argmax
        # when its z reaches the row's max and exceeds this
        m_before = tl.full([], float("-inf"), ACC_DTYPE)
        cols = tl.arange(0, BLOCK_V)
        for start in range(0, v_end, BLOCK_V):
            offs = start + cols
            in_row = offs < vocab
            x = tl.load(row_ptr + offs, mask=in_row, other=0.0).to(ACC_DTYPE)
            z_raw, _ = _transform(x, inv_temp, softcap, HAS_SOFTCAP)
            if HAS_MEAN_LOGIT:
                z_sum += tl.sum(tl.where(in_row, z_raw, 0.0), axis=0)
            z = tl.where(z_raw == float("-inf"), -3.4028234663852886e38, z_raw)
            if HAS_THRESHOLD:
                z = tl.where(x >= tau, z, -3.4028234663852886e38)
            z = tl.where(in_row, z, -3.4028234663852886e38)
            if HAS_IS_TOP1:
                m_before = tl.maximum(m_before, tl.max(tl.where(offs < target, z, float("-inf")), axis=0))
            m_new = tl.maximum(m, tl.max(z, axis=0))
            alpha = tl.exp(m - m_new)
            p = tl.where(in_row, tl.exp(z - m_new), 0.0)
            if COMPUTE_ENTROPY:
                # alpha * (m - m_new) first: after a run of -inf logits m is -FLT_MAX and
                # (m - m_new) * s would overflow to -inf, times alpha = 0 giving NaN.
                u = alpha * u + (alpha * (m - m_new)) * s + tl.sum(p * (z - m_new), axis=0)
            if HAS_LOG_SUM_SQ:
                sq = (alpha * alpha) * sq + tl.sum(p * p, axis=0)
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
        if HAS_THRESHOLD:
            # a target the sampler could not draw has log-probability -inf
            logprob = tl.where(valid & (x_t < tau), float("-inf"), logprob)
        logprob = tl.where(ignored, 0.0, logprob)
        tl.store(logprobs_ptr + row, logprob)
        # Ignored rows store zeros, so that their backward (which reads zeros in place of
        # the logits) sees p = 1 and g = 0: every term finite, the gradient exactly 0.
        tl.store(row_max_ptr + row, tl.where(ignored, 0.0, m))
        tl.store(log_sum_ptr + row, log_s)
        if COMPUTE_ENTROPY:
            entropy = tl.where(ignored, 0.0, log_s - u / tl.where(ignored, 1.0, s))
            tl.store(entropy_ptr + row, entropy)
        if HAS_LOG_SUM_SQ:
            tl.store(log_sum_sq_ptr + row, tl.where(ignored, 0.0, tl.log(tl.where(ignored, 1.0, sq)) - 2.0 * log_s))
        if HAS_MEAN_LOGIT:
            tl.store(mean_logit_ptr + row, tl.where(ignored, 0.0, z_sum / vocab))
        if HAS_IS_TOP1:
            z_top = tl.where(z_t == float("-inf"), -3.4028234663852886e38, z_t)
            top1 = valid & (z_top >= m) & (z_top > m_before)
            tl.store(is_top1_ptr + row, top1.to(tl.int8))
        if HAS_TOP1_LOGPROB:
            tl.store(top1_logprob_ptr + row, tl.where(ignored, 0.0, -log_s))

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
        threshold_ptr,
        n_inner,
        stride_outer,
        stride_inner,
        vocab,
        ignore_index,
        softcap,
        HAS_SOFTCAP: tl.constexpr,
        HAS_THRESHOLD: tl.constexpr,
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
        tau = tl.full([], float("-inf"), ACC_DTYPE)
        if HAS_THRESHOLD:
            tau = tl.load(threshold_ptr + row).to(ACC_DTYPE)
            # a target outside the kept set has the constant log-probability -inf
            valid = (target >= 0) & (target < vocab) & (~ignored)
            x_t = tl.load(row_ptr + tl.where(valid, target, 0), mask=valid, other=0.0).to(ACC_DTYPE)
            g_lp = tl.where(x_t >= tau, g_lp, 0.0)

        cols = tl.arange(0, BLOCK_V)
        for start in range(0, vocab, BLOCK_V):
            offs = start + cols
            in_row = offs < vocab
            # Ignored rows only write zeros: their logits are not read (zeros instead);
            # lanes past the row's end read -inf, so that p = 0 there.
            x = tl.load(row_ptr + offs, mask=offs < v_read, other=0.0).to(ACC_DTYPE)
            x = tl.where(in_row, x, float("-inf"))
            z, dz = _clamped_z(x, inv_temp, softcap, HAS_SOFTCAP)
            if HAS_THRESHOLD:
                z = tl.where(x >= tau, z, -3.4028234663852886e38)
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


def _empty_statistics(statistics, n_rows: int, acc: torch.dtype, device: torch.device) -> dict:
    """Output buffers of the requested statistics: ``is_top1`` bool, the others ``acc``."""
    return {
        name: torch.empty(n_rows, dtype=torch.bool if name == "is_top1" else acc, device=device)
        for name in statistics
    }


@on_tensor_device
def _triton_forward(layout, targets, temp, softcap, ignore_index, compute_entropy, statistics=(), sampling=None):
    logits, n_inner, stride_outer, stride_inner = layout
    vocab = logits.shape[-1]
    n_rows = targets.numel()
    acc = acc_dtype(logits)
    threshold = None if sampling is None else _sampling_thresholds(layout, n_rows, temp, softcap, sampling)
    logprobs, row_max, log_sum = torch.empty((3, n_rows), dtype=acc, device=logits.device)
    entropy = torch.empty(n_rows, dtype=acc, device=logits.device) if compute_entropy else None
    extra = _empty_statistics(statistics, n_rows, acc, logits.device)
    if n_rows:
        block, num_warps = _triton_config(vocab, logits.device)
        # the kernel stores is_top1 as 0/1 bytes, which a bool tensor holds as they are
        outs = {name: t.view(torch.int8) if t.dtype == torch.bool else t for name, t in extra.items()}
        _token_logprobs_fwd_kernel[(n_rows,)](
            logits, targets, temp, temp.stride(0), logprobs,
            entropy if compute_entropy else logprobs, row_max, log_sum,
            *(outs.get(name, logprobs) for name in STATISTICS),
            logprobs if threshold is None else threshold,
            n_inner, stride_outer, stride_inner, vocab, ignore_index,
            softcap or 1.0,
            HAS_SOFTCAP=softcap is not None,
            COMPUTE_ENTROPY=compute_entropy,
            HAS_THRESHOLD=threshold is not None,
            HAS_LOG_SUM_SQ="log_sum_sq_probs" in extra,
            HAS_MEAN_LOGIT="mean_logit" in extra,
            HAS_IS_TOP1="is_top1" in extra,
            HAS_TOP1_LOGPROB="top1_logprob" in extra,
            ACC_DTYPE=tl_acc_dtype(logits),
            BLOCK_V=block,
            num_warps=num_warps,
        )
    return logprobs, entropy, _row_stats(row_max, log_sum, threshold), extra


def _row_stats(row_max, log_sum, threshold):
    """The per-row statistics the backward reads: (row_max, log_sum), and the
    sampler's threshold when top-k/top-p truncate the distribution (the kept set is
    logit >= threshold on the Triton backend, z - max >= threshold on the torch one)."""
    return (row_max, log_sum) if threshold is None else (row_max, log_sum, threshold)


@on_tensor_device
def _triton_backward(layout, targets, temp, softcap, ignore_index, stats, entropy, g_lp, g_h):
    logits, n_inner, stride_outer, stride_inner = layout
    row_max, log_sum, *threshold = stats
    threshold = threshold[0] if threshold else None
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
            grad, row_max if threshold is None else threshold,
            n_inner, stride_outer, stride_inner, vocab, ignore_index,
            softcap or 1.0,
            HAS_SOFTCAP=softcap is not None,
            HAS_THRESHOLD=threshold is not None,
            HAS_GRAD_LOGPROBS=g_lp is not None,
            HAS_GRAD_ENTROPY=g_h is not None,
            ACC_DTYPE=tl_acc_dtype(logits),
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
    chunk = _torch_chunk_rows(vocab, view.device)
    for outer in range(view.shape[0]):
        for start in range(0, n_inner, chunk):
            stop = min(start + chunk, n_inner)
            yield outer * n_inner + start, outer * n_inner + stop, view[outer, start:stop]


def _torch_chunk_rows(vocab: int, device: torch.device) -> int:
    elements = TORCH_CHUNK_ELEMENTS if device.type == "cpu" else GPU_TORCH_CHUNK_ELEMENTS
    return max(1, elements // max(1, vocab))


def _workspace(count: int, n_rows: int, vocab: int, dtype: torch.dtype, device: torch.device):
    """``count`` reusable (rows, V) buffers for the chunk loop. Reusing them, rather than
    allocating per chunk, keeps the extra memory at exactly these buffers (the allocator
    would otherwise hold on to a few generations of freed chunks)."""
    rows = min(n_rows, _torch_chunk_rows(vocab, device))
    return torch.empty((count, rows, vocab), dtype=dtype, device=device).unbind(0)


def _torch_clamped_z(x: torch.Tensor, temp: torch.Tensor, softcap: float | None, z_buf, tanh_buf=None,
                     z_sum_out=None):
    """z for one chunk written into ``z_buf``, -inf raised to the most negative finite
    float so that exp() gives 0, never NaN; and tanh(x / c) when softcapped. With
    ``z_sum_out``, the row sums of z before that clamp are written there."""
    z = z_buf[: x.shape[0]]
    z.copy_(x)
    tanh_out = None if tanh_buf is None else tanh_buf[: x.shape[0]]
    z, tanh = _torch_transform(z, temp, softcap, tanh_out)
    if z_sum_out is not None:
        torch.sum(z, dim=-1, out=z_sum_out)
    return z.clamp_(min=torch.finfo(z.dtype).min), tanh


def _keep_step(shifted: torch.Tensor, cut: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """1.0 where ``shifted >= cut`` (cut (rows, 1)), 0.0 below it, written to ``out``.

    By the sign of ``shifted - cut``, which is 0 exactly when the two are equal: float
    arithmetic, about a fifth of the time of a comparison and a masked fill on the CPU,
    whose boolean results take a slow path there."""
    return torch.sub(shifted, cut, out=out).sign_().add_(1.0).clamp_(max=1.0)


def _cut_workspace(n_rows: int, vocab: int, dtype: torch.dtype, device: torch.device, sampling) -> tuple:
    """The (rows, V) buffers ``_chunk_cut`` works in, reused by every chunk (fresh
    allocations of this size cost more than the arithmetic on the CPU): one of ``dtype``,
    and for top-p without top-k one more and an int64 one for the histograms' indices."""
    top_k, top_p = sampling
    histograms = top_p is not None and (top_k is None or top_k >= vocab)
    buffers = _workspace(1 + histograms, n_rows, vocab, dtype, device)
    if histograms:
        buffers += _workspace(1, n_rows, vocab, torch.int64, device)
    return buffers


def _chunk_cut(shifted: torch.Tensor, e: torch.Tensor, top_k: int | None, top_p: float | None,
               workspace: tuple) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per row of one chunk, the cut c (rows, 1) such that the sampler's top-k then top-p
    kept set is {v : shifted_v >= c}; -inf where nothing is cut. ``shifted`` is z - max(z)
    (z tempered, in the accumulation dtype) and ``e`` exp(shifted); ``e`` may be left 0
    outside the top-k set. ``workspace``: ``_cut_workspace``'s.

    Also the kept mass sum_{kept} e (rows, 1) when the selection saw every kept token,
    which spares the caller a masked pass over the chunk; else None. On the CPU only:
    deciding it per chunk reads a flag, a host synchronization on a GPU.

    Top-k keeps every token whose z is at least the k-th largest (ties at the boundary all
    kept): c is the k-th largest value, from ``_select.largest_values`` (one reduction over
    the row, no sort). Top-p, on the top-k distribution renormalized, keeps a token when
    the mass strictly above its z is below p: c is the value of the first token, in
    descending order, at which the cumulative mass reaches p * S. With top-k first, that
    is among the largest values, already sorted: the k largest and TOP_K_TIES more, so that
    the ties of the k-th are usually among them too (when not, the top-k mass S is summed
    over the row). Top-p alone is ``_top_p_cut``. Fixed shapes throughout, but for the
    CPU's choices above.
    """
    rows, vocab = shifted.shape
    step_buf, *histogram_buffers = (buffer[:rows] for buffer in workspace)
    k = None if top_k is None or top_k >= vocab else top_k
    if vocab == 0 or (k is None and top_p is None):
        no_cut = torch.full((rows, 1), float("-inf"), dtype=shifted.dtype, device=shifted.device)
        return no_cut, e.sum(dim=-1, keepdim=True)
    if k is None:
        return _top_p_cut(shifted, e, top_p, step_buf, *histogram_buffers)
    values = largest_values(shifted, min(vocab, k + TOP_K_TIES))
    cut = values[:, k - 1 : k]
    in_top_k = torch.where(values >= cut, values.exp(), 0.0)
    # whether the values hold every token of the top-k set (ties of the k-th included)
    kept_values_only = host_reads_free(shifted) and (
        values.shape[1] == vocab or bool((values[:, -1:] < cut).all())
    )
    if kept_values_only:
        top_k_mass = in_top_k.sum(dim=-1, keepdim=True)
    else:
        top_k_mass = e.mul_(_keep_step(shifted, cut, step_buf)).sum(dim=-1, keepdim=True)
    if top_p is not None:
        # the first of the largest values at which the cumulative mass reaches p * S; when
        # none does (ties of the k-th beyond them), the cut stays at the k-th
        reached = in_top_k.cumsum(dim=-1) >= top_k_mass * top_p
        first = reached.to(torch.uint8).argmax(dim=-1, keepdim=True)  # argmax: the first maximum
        cut = torch.where(reached.any(dim=-1, keepdim=True), values.gather(-1, first), cut)
    if not kept_values_only:
        return cut, None
    return cut, torch.where(values >= cut, in_top_k, 0.0).sum(dim=-1, keepdim=True)


def _top_p_cut(shifted: torch.Tensor, e: torch.Tensor, top_p: float, step_buf: torch.Tensor,
               position_buf: torch.Tensor, index_buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The top-p cut of ``_chunk_cut`` without top-k, and on the CPU its kept mass: a
    mass histogram, then the exact values of the tokens around the cut.

    The cut lies above ``lower = log((1 - p) / V) - 1``: the tokens from the cut down
    hold more than (1 - p) S >= 1 - p of the mass (the max has e = 1), and there are at
    most V of them. Round 1 sums the mass in ``bins`` bins of equal width by depth below
    the max, over [lower, 0] or the row's narrower range (all deeper tokens in the last);
    the cut lies in the first bin from the top where the cumulative mass reaches p * S.
    The bin of a token is nonincreasing in its value, so the tokens of that bin and below,
    in descending order, are the TOP_P_CANDIDATES largest of the row once the bins above
    are lowered out of it; the cut is exact when the mass is reached among them (the bin
    holds about 16 tokens near the cut of flat random rows: its width is at most
    -lower / bins, 0.003 at V = 32,000, p = 0.9), and then the kept mass is the bins above
    plus the candidates kept.

    Otherwise (a bin of many near-equal tokens), and always on a GPU, where branching on
    that would synchronize: round 2 sums that bin's tokens in ``bins`` sub-bins, and the
    cut is the smallest value of the sub-bin where the mass is reached, refined by an exact
    sort of its TOP_P_LAST largest values: the exact kept set, plus the tokens of that
    sub-bin below the exact cut, whose z - max is within -lower / bins**2 of it (1e-6
    at V = 32,000, p = 0.9: a few float32 ulps; near ties, kept whole like exact ones).
    When p * S exceeds the whole sum by rounding (p near 1), or the cut falls in the last
    bin (only by rounding, as above), nothing is cut.

    Float arithmetic and a scatter-add per round; a sort (70 ms per 2^20 elements on one
    CPU thread) or a top-k (2 to 8 ms) would cost more than the rest of the op. On the
    CPU with the native extension, csrc/'s ``top_p_cut_cpu`` does round 1 and sorts the
    cut's bin whatever its size, in two passes over each row (under half the time).
    """
    if shifted.is_cpu and _native.top_p_cut_available():
        return _native.top_p_cut(shifted, e, top_p)
    total = e.sum(dim=-1, keepdim=True)
    goal = total * top_p
    lower = math.log((1.0 - top_p) / shifted.shape[1]) - 1.0
    bins = max(TOP_P_BINS, shifted.shape[1] // TOP_P_TOKENS_PER_BIN)
    # per row, the bins span [lower, 0], or a little more than the row's range when that is
    # narrower (near-uniform rows), so that the last bin still holds no token above lower;
    # at least 1e-6, so that the bins stay finite
    span = shifted.amin(dim=-1, keepdim=True).mul_(-1.001).clamp_(min=1e-6, max=-lower)
    width = span / bins
    big = torch.finfo(shifted.dtype).max
    # round 1: each token's bin (a float, nonincreasing in shifted), then the mass per bin
    depth = torch.mul(shifted, -bins / span, out=position_buf).clamp_(0, bins - 1).floor_()
    first, mass_above, reached = _first_bin_reaching(depth, e, goal, bins, index_buf)
    keep_all = ~reached | (first == bins - 1)
    need = goal - mass_above
    if host_reads_free(shifted):
        # the tokens of the bins above the cut's lowered below every value (first - depth
        # >= 1 there), so that the largest left are the cut's bin's, from its top down
        above = torch.sub(first, depth, out=step_buf).clamp_(0.0, 1.0)
        candidates = largest_values(torch.add(shifted, above, alpha=-big, out=step_buf),
                                    min(TOP_P_CANDIDATES, shifted.shape[1]))
        mass = candidates.exp()
        reached_here = mass.cumsum(dim=-1) >= need
        index = reached_here.to(torch.uint8).argmax(dim=-1, keepdim=True)  # argmax: the first maximum
        cut = candidates.gather(-1, index)
        # exact when the mass is reached among them and every token outside them lies below
        exact = reached_here[:, -1:]
        if candidates.shape[1] < shifted.shape[1]:
            exact = exact & (candidates[:, -1:] < cut)
        if bool((exact | keep_all).all()):
            kept_mass = mass_above + torch.where(candidates >= cut, mass, 0.0).sum(dim=-1, keepdim=True)
            return cut.masked_fill_(keep_all, float("-inf")), torch.where(keep_all, total, kept_mass)
    # round 2: the bin's tokens into sub-bins; the others into bins past them, never
    # counted (bins + their round-1 bin: spread out, since consecutive adds to one address
    # wait for each other). (depth - first)**2 clamped to 1: 0 in the bin, 1 outside it.
    outside = torch.sub(depth, first, out=step_buf)
    outside = outside.mul_(outside).clamp_(max=1.0).mul_(depth.add_(bins))
    sub_bin = torch.add(shifted, first * width, out=position_buf).mul_(-bins / width).clamp_(0, bins - 1).floor_()
    sub_bin = torch.maximum(sub_bin, outside, out=sub_bin)
    second, sub_above, _ = _first_bin_reaching(sub_bin, e, need, bins, index_buf, 2 * bins)
    need -= sub_above
    # that sub-bin's TOP_P_LAST largest values, exactly and sorted, the others lowered
    # below every value; the cut is the first at which the mass reaches the rest of p * S
    outside = torch.sub(sub_bin, second, out=step_buf)
    outside = outside.mul_(outside).clamp_(max=1.0)
    lowered = torch.add(shifted, outside, alpha=-big, out=position_buf)
    values = largest_values(lowered, min(TOP_P_LAST, shifted.shape[1]))
    reached_here = values.exp().cumsum_(dim=-1) >= need
    index = reached_here.to(torch.uint8).argmax(dim=-1, keepdim=True)  # argmax: the first maximum
    # past them (more tokens in the sub-bin, or rounding): its smallest value, keeping it whole
    lowest = torch.add(shifted, outside, alpha=big, out=step_buf).amin(dim=-1, keepdim=True)
    cut = torch.where(reached_here[:, -1:], values.gather(-1, index), lowest)
    return cut.masked_fill_(keep_all, float("-inf")), None


def _first_bin_reaching(depth: torch.Tensor, e: torch.Tensor, goal: torch.Tensor, bins: int,
                        index_buf: torch.Tensor, width: int | None = None):
    """Sum ``e`` into bins per row by ``depth`` (float bin indices in [0, width), bin 0 the
    top; those from ``bins`` on not counted); return the bin (rows, 1) holding the first
    token, from the top down, at which the cumulative mass reaches ``goal``, the mass
    strictly above that bin, and whether the whole mass reaches ``goal``. Where it does
    not (rounding), the last bin with mass."""
    mass = torch.zeros((depth.shape[0], width or bins), dtype=e.dtype, device=e.device)
    mass.scatter_add_(1, index_buf.copy_(depth), e)
    mass = mass[:, :bins]
    from_top = mass.cumsum(dim=-1)
    reached = from_top[:, -1:] >= goal
    # the first bin whose cumulative mass reaches the goal (or the total): the cumulative
    # sums are sorted, so a binary search per row
    index = torch.searchsorted(from_top, torch.minimum(goal, from_top[:, -1:]))
    above = from_top.gather(-1, index) - mass.gather(-1, index)
    return index.to(e.dtype), above, reached


def _sampling_thresholds(layout, n_rows, temp, softcap, sampling) -> torch.Tensor:
    """Per row, the raw logit tau such that the kept set of ``_chunk_cut`` is
    {v : logit_v >= tau}, chunk by chunk (the Triton forward's first pass; the Triton
    kernels compare raw logits, so that the set does not depend on how they temper them).
    tau is the smallest logit of the kept set: z, and z - max, are nondecreasing in it."""
    logits = layout[0]
    vocab, acc = logits.shape[-1], acc_dtype(logits)
    threshold = torch.empty(n_rows, dtype=acc, device=logits.device)
    z_buf, e_buf = _workspace(2, n_rows, vocab, acc, logits.device)
    workspace = _cut_workspace(n_rows, vocab, acc, logits.device, sampling)
    for start, stop, x in _torch_chunks(layout, n_rows):
        z, _ = _torch_clamped_z(x, temp[start:stop, None], softcap, z_buf)
        shifted = z.sub_(z.amax(dim=-1, keepdim=True))
        e = torch.exp(shifted, out=e_buf[: stop - start])
        cut, _ = _chunk_cut(shifted, e, *sampling, workspace)
        dropped = shifted < cut
        threshold[start:stop] = x.masked_fill(dropped, float("inf")).amin(dim=-1).to(acc)
    return threshold


def _torch_forward(layout, targets, temp, softcap, ignore_index, compute_entropy, statistics=(), sampling=None):
    logits = layout[0]
    n_rows, vocab = targets.numel(), logits.shape[-1]
    acc = acc_dtype(logits)
    logprobs, row_max, log_sum = torch.empty((3, n_rows), dtype=acc, device=logits.device)
    threshold = None if sampling is None else torch.empty(n_rows, dtype=acc, device=logits.device)
    entropy = torch.empty(n_rows, dtype=acc, device=logits.device) if compute_entropy else None
    extra = _empty_statistics(statistics, n_rows, acc, logits.device)
    ignored = targets == ignore_index
    safe_targets = targets.masked_fill(ignored, 0).long()[:, None]
    z_buf, e_buf = _workspace(2, n_rows, vocab, acc, logits.device)
    workspace = None if sampling is None else _cut_workspace(n_rows, vocab, acc, logits.device, sampling)
    for start, stop, x in _torch_chunks(layout, n_rows):
        rows = slice(start, stop)
        # the target's logit, unclamped: a -inf target has log-probability -inf
        z_t, _ = _torch_transform(x.gather(-1, safe_targets[rows]).to(acc), temp[rows, None], softcap)
        z_sum = extra["mean_logit"][rows] if "mean_logit" in extra else None
        z, _ = _torch_clamped_z(x, temp[rows, None], softcap, z_buf, z_sum_out=z_sum)
        if "is_top1" in extra:
            # argmax returns the first of tied maxima, the tie rule of the other backends
            torch.eq(z.argmax(dim=-1, keepdim=True), safe_targets[rows], out=extra["is_top1"][rows, None])
        z_max = z.amax(dim=-1, keepdim=True)
        shifted = z.sub_(z_max)
        e = torch.exp(shifted, out=e_buf[: stop - start])
        if sampling is not None:
            step = workspace[0][: stop - start]
            cut, kept_mass = _chunk_cut(shifted, e, *sampling, workspace)
            threshold[rows] = cut.squeeze(-1)
            if kept_mass is None or compute_entropy:
                # the tokens the sampler cut get exp() = 0 after the exp, not a huge negative
                # z before it: exp of such values takes a slow path on the CPU
                kept_mass = e.mul_(_keep_step(shifted, cut, step)).sum(dim=-1, keepdim=True)
            s = kept_mass.squeeze(-1)
        else:
            s = e.sum(dim=-1)
        torch.log(s, out=log_sum[rows])
        row_max[rows] = z_max.squeeze(-1)
        # (z_t - max) first: both are large for large logits, their difference is exact
        logprobs[rows] = (z_t - z_max).squeeze_(-1) - log_sum[rows]
        if sampling is not None:
            # a target the sampler could not draw has log-probability -inf
            logprobs[rows].masked_fill_((z_t - z_max).squeeze_(-1) < cut.squeeze(-1), float("-inf"))
        if "log_sum_sq_probs" in extra:
            # a batched dot product: sum exp(z - max)^2 with no (rows, V) temporary
            sq = torch.matmul(e[:, None, :], e[:, :, None]).view(-1)
            extra["log_sum_sq_probs"][rows] = sq.log_() - 2.0 * log_sum[rows]
        if compute_entropy:
            entropy[rows] = log_sum[rows] - e.mul_(shifted).sum(dim=-1) / s
    logprobs.masked_fill_(ignored, 0.0)
    if compute_entropy:
        entropy.masked_fill_(ignored, 0.0)
    if "mean_logit" in extra:
        extra["mean_logit"].div_(vocab)
    if "top1_logprob" in extra:
        torch.neg(log_sum, out=extra["top1_logprob"])
    for value in extra.values():
        value.masked_fill_(ignored, 0)
    return logprobs, entropy, _row_stats(row_max, log_sum, threshold), extra


def _torch_backward(layout, targets, temp, softcap, ignore_index, stats, entropy, g_lp, g_h):
    logits = layout[0]
    row_max, log_sum, *threshold = stats
    threshold = threshold[0] if threshold else None
    n_rows, vocab = targets.numel(), logits.shape[-1]
    acc = row_max.dtype
    grad = torch.empty((n_rows, vocab), dtype=logits.dtype, device=logits.device)
    ignored = targets == ignore_index
    g_lp = torch.zeros_like(row_max) if g_lp is None else g_lp.to(acc).masked_fill(ignored, 0.0)
    g_h = None if g_h is None else g_h.to(acc).masked_fill(ignored, 0.0)
    # a target outside [0, V) is another vocabulary shard's token (process_group=): its
    # row gets the -p terms and no one-hot term here
    elsewhere = ignored | (targets < 0) | (targets >= vocab)
    safe_targets = targets.masked_fill(elsewhere, 0).long()[:, None]
    g_onehot = g_lp.masked_fill(elsewhere, 0.0)[:, None]
    # When the gradient has the accumulation dtype, each chunk is computed in place in
    # its slice of the output and one workspace buffer suffices.
    in_place = logits.dtype == acc
    sampled = threshold is not None
    buffers = list(_workspace(1 + (softcap is not None) + (not in_place) + sampled, n_rows, vocab, acc, logits.device))
    p_buf = buffers.pop()
    tanh_buf = buffers.pop() if softcap is not None else None
    step_buf = buffers.pop() if sampled else None
    for start, stop, x in _torch_chunks(layout, n_rows):
        rows = slice(start, stop)
        z_buf = grad[rows] if in_place else buffers[0]
        z, tanh = _torch_clamped_z(x, temp[rows, None], softcap, z_buf, tanh_buf)
        g1, g_target = g_lp[rows, None], g_onehot[rows]
        # z - max, the forward's values bit for bit: the kept set is decided on them
        shifted = z.sub_(row_max[rows, None])
        if sampled:
            cut = threshold[rows, None]
            # a target outside the kept set has the constant log-probability -inf
            dropped = shifted.gather(-1, safe_targets[rows]) < cut
            g1, g_target = g1.masked_fill(dropped, 0.0), g_target.masked_fill(dropped, 0.0)
            step = _keep_step(shifted, cut, step_buf[: stop - start])
        log_p = shifted.sub_(log_sum[rows, None])
        p = torch.exp(log_p, out=p_buf[: stop - start])
        if sampled:
            p.mul_(step)  # after the exp, as in the forward
        if g_h is None:
            grad_z = torch.mul(p, g1, out=log_p).neg_()
        else:
            # -(p * g_lp + (p * (log p + H)) * g_h), built in log_p's buffer; p * (log p + H)
            # first, since log p is about -FLT_MAX where p = 0 and must not overflow.
            grad_z = log_p.add_(entropy[rows, None]).mul_(p).mul_(g_h[rows, None])
            grad_z = grad_z.add_(p.mul_(g1)).neg_()
        grad_z.scatter_add_(-1, safe_targets[rows], g_target)
        if tanh is not None:
            grad_z.mul_(tanh.square_().neg_().add_(1.0))
        grad_z.div_(temp[rows, None])
        if not in_place:
            grad[rows] = grad_z
    return grad


# ----------------------------------------------------------------------- autograd

def _native_forward(layout, targets, temp, softcap, ignore_index, compute_entropy, statistics=(), sampling=None):
    """The native kernels of csrc/ compute no extra statistics and no top-k/top-p;
    ``resolve_row_backend`` never picks them when either is asked for."""
    if statistics or sampling is not None:
        raise AssertionError("the native backends do not compute statistics or top-k/top-p log-probs")
    return (*_native.token_logprobs_forward(layout, targets, temp, softcap, ignore_index, compute_entropy), {})


# backend -> (forward, backward); "cpp" and "cuda" are the native kernels of csrc/.
# forward(layout, targets, temp, softcap, ignore_index, compute_entropy, statistics, sampling)
# returns (logprobs, entropy or None, stats, {statistic name: (N,) tensor}), stats being
# (row_max, log_sum) plus, with sampling = (top_k, top_p), the per-row threshold of the
# kept set (Triton: a raw logit; torch: a value of z - max); the backward of the same
# backend takes stats as they are.
_IMPLEMENTATIONS = {
    "triton": (_triton_forward, _triton_backward),
    "torch": (_torch_forward, _torch_backward),
    "cpp": (_native_forward, _native.token_logprobs_backward),
    "cuda": (_native_forward, _native.token_logprobs_backward),
}


def check_statistics(statistics) -> tuple[str, ...]:
    """``statistics`` as a tuple of known names, in STATISTICS order, without repeats."""
    if isinstance(statistics, str) or not isinstance(statistics, (tuple, list, set, frozenset)):
        raise TypeError(f"statistics must be a tuple of names from {STATISTICS}, got {statistics!r}")
    for name in statistics:
        if name not in STATISTICS:
            raise ValueError(f"statistics: unknown statistic {name!r}; expected names from {STATISTICS}")
    return tuple(name for name in STATISTICS if name in statistics)


def check_sampling(top_k, top_p, statistics) -> tuple | None:
    """``(top_k, top_p)`` with the no-op values (top_p = 1) as None, or None when the
    distribution is not truncated."""
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an int >= 1 or None (no top-k), got {top_k!r}")
    if top_p is not None:
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be a float in (0, 1] or None (no top-p), got {top_p!r}")
        top_p = None if top_p == 1.0 else float(top_p)
    if top_k is None and top_p is None:
        return None
    if statistics:
        raise ValueError(f"statistics={statistics!r} cannot be combined with top_k/top_p")
    return top_k, top_p


def _world_size(group) -> int:
    import torch.distributed as dist

    return dist.get_world_size(group)


def check_vocab_parallel(process_group, statistics, sampling) -> None:
    """``process_group=`` is a torch.distributed group, without statistics or top-k/top-p."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"process_group={process_group!r} given but torch.distributed is not initialized")
    if statistics or sampling is not None:
        raise ValueError("process_group= cannot be combined with statistics or top_k/top_p")


def resolve_row_backend(backend: str | None, device: torch.device, op: str, statistics: tuple,
                        sampling: tuple | None = None) -> str:
    """The backend of the row kernels. The native kernels compute no statistics and no
    top-k/top-p: with either, an automatic or ``FASTPO_BACKEND`` choice skips them (Triton
    on CUDA, the torch backend on the CPU) and an explicit ``backend="cpp"``/``"cuda"`` raises."""
    if sampling is not None:
        op = f"{op} with top_k/top_p"
    elif statistics:
        op = f"{op} with statistics"
    return resolve_backend(backend, device, op)


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temp, softcap, ignore_index, compute_entropy, backend, statistics, sampling):
        layout = _row_layout(logits)
        forward = _IMPLEMENTATIONS[backend][0]
        logprobs, entropy, stats, extra = forward(
            layout, targets, temp, softcap, ignore_index, compute_entropy, statistics, sampling
        )
        ctx.set_materialize_grads(False)
        ctx.layout_meta = layout[1:]
        ctx.logits_shape = logits.shape
        ctx.options = (softcap, ignore_index, backend)
        ctx.save_for_backward(layout[0], targets, temp, entropy, *stats)
        extra = tuple(extra[name] for name in statistics)
        ctx.mark_non_differentiable(*extra)
        return logprobs, entropy, *extra

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy, *_):
        if grad_logprobs is None and grad_entropy is None:
            return (None,) * 9
        logits, targets, temp, entropy, *stats = ctx.saved_tensors
        softcap, ignore_index, backend = ctx.options
        layout = (logits, *ctx.layout_meta)
        backward = _IMPLEMENTATIONS[backend][1]
        if grad_logprobs is not None:
            grad_logprobs = grad_logprobs.contiguous()
        if grad_entropy is not None:
            grad_entropy = grad_entropy.contiguous()
        grad = backward(
            layout, targets, temp, softcap, ignore_index, tuple(stats), entropy,
            grad_logprobs, grad_entropy,
        )
        return grad.view(ctx.logits_shape), None, None, None, None, None, None, None, None


def target_logits(logits: torch.Tensor, targets: torch.Tensor, temp: torch.Tensor, softcap, present: torch.Tensor):
    """z of each row's target (N,) in the accumulation dtype, -inf where not ``present``
    (``targets`` flat, ``logits`` (..., V) of any strides: one gather, no copy)."""
    index = targets.masked_fill(~present, 0).long().view(*logits.shape[:-1], 1)
    z_t, _ = _torch_transform(logits.gather(-1, index).reshape(-1, 1).to(acc_dtype(logits)), temp[:, None], softcap)
    return z_t.squeeze(-1).masked_fill_(~present, float("-inf"))


def combine_shards(row_max, log_sum, entropy, z_target, group):
    """The full vocabulary's (logprobs, entropy, row_max, log_sum) per row from each
    vocabulary shard's: its row max m_r, log sum_v exp(z - m_r), entropy H_r and the
    target's z (-inf on the shards that do not hold it). One collective: an all-gather
    of these four numbers per row; then, with M = max_r m_r and w_r = exp(m_r - M + log s_r),
    log S = log sum_r w_r, lp = z_t - M - log S and
    H = log S - sum_r w_r (log s_r - H_r + m_r - M) / S
    (log s_r - H_r is the shard's mean of z - m_r under its own softmax)."""
    import torch.distributed as dist

    local = torch.stack((row_max, log_sum, log_sum - entropy, z_target))
    shards = [torch.empty_like(local) for _ in range(_world_size(group))]
    dist.all_gather(shards, local, group=group)
    m, log_s, mean_shift, z_t = torch.stack(shards).unbind(1)
    top = m.amax(dim=0)
    w = torch.exp(m - top + log_s)
    total = w.sum(dim=0)
    log_total = torch.log(total)
    logprobs = (z_t.amax(dim=0) - top) - log_total
    entropy = log_total - (w * (mean_shift + (m - top))).sum(dim=0) / total
    return logprobs, entropy, top, log_total


def shard_targets(targets: torch.Tensor, vocab: int, group, ignore_index: int):
    """(local targets, vocab_start): ids of this rank's shard [start, start + vocab),
    ``vocab`` (one past the shard) for another shard's token, ``ignore_index`` kept."""
    import torch.distributed as dist

    start = dist.get_rank(group) * vocab
    local = targets - start
    ignored = targets == ignore_index
    elsewhere = (local < 0) | (local >= vocab)
    return torch.where(ignored, targets, local.masked_fill(elsewhere, vocab)), start


class _VocabParallelLogprobs(torch.autograd.Function):
    """token_logprobs of a vocabulary shard: the row kernels on this rank's logits, the
    statistics combined across the group in one all-gather, the backward local (the
    gradient of a shard's logits needs only the combined row statistics)."""

    @staticmethod
    def forward(ctx, logits, targets, temp, softcap, ignore_index, compute_entropy, backend, group):
        layout = _row_layout(logits)
        vocab = logits.shape[-1]
        forward = _IMPLEMENTATIONS[backend][0]
        ignored = targets == ignore_index
        present = (targets >= 0) & (targets < vocab) & ~ignored
        # the row kernels read a target in range; another shard's rows read token 0, unused
        _, entropy, (row_max, log_sum), _ = forward(
            layout, targets.masked_fill(~present & ~ignored, 0), temp, softcap, ignore_index, True
        )
        z_t = target_logits(logits, targets, temp, softcap, present)
        logprobs, entropy, row_max, log_sum = combine_shards(row_max, log_sum, entropy, z_t, group)
        logprobs.masked_fill_(ignored, 0.0)
        entropy.masked_fill_(ignored, 0.0)
        ctx.set_materialize_grads(False)
        ctx.layout_meta = layout[1:]
        ctx.logits_shape = logits.shape
        ctx.options = (softcap, ignore_index, backend)
        ctx.save_for_backward(layout[0], targets, temp, entropy, row_max, log_sum)
        return logprobs, entropy if compute_entropy else None

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        # the saved tensors (statistics = (row_max, log_sum)) and ctx fields are _TokenLogprobs's
        return _TokenLogprobs.backward(ctx, grad_logprobs, grad_entropy)[:8]


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 1.0,
    ignore_index: int = -100,
    softcap: float | None = None,
    return_entropy: bool = False,
    statistics: tuple[str, ...] = (),
    top_k: int | None = None,
    top_p: float | None = None,
    process_group=None,
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
        statistics: extra per-row statistics computed in the same pass, any of
            ``"log_sum_sq_probs"`` (log sum_v p_v^2), ``"mean_logit"`` (mean over the
            vocabulary of z, the logit after softcap and temperature; -inf if a logit
            is -inf), ``"is_top1"`` (bool: the target is the argmax of z, the first one
            on ties, as ``torch.argmax``) and ``"top1_logprob"`` (log p of the argmax).
            Rows of ``ignore_index`` get 0 (False). None of them has a gradient. The
            native backends ("cpp", "cuda") do not compute them: with statistics the
            automatic choice runs Triton on CUDA and the torch backend on the CPU, and
            an explicit native backend raises ValueError.
        top_k, top_p: the sampler's truncation (Hugging Face's and vLLM's order and
            conventions: temperature, then top-k keeping every token >= the k-th largest,
            then top-p on the renormalized top-k distribution keeping a token when the
            mass strictly above it is < top_p). Log-probs and entropy are then those of
            the truncated distribution renormalized over the kept set; a target outside
            it gets -inf (and no gradient). ``top_k`` an int >= 1 (>= V keeps all),
            ``top_p`` in (0, 1] (1 keeps all); None disables either. Not with
            ``statistics``; not on the native backends (as ``statistics``).
        process_group: a ``torch.distributed`` group over which the vocabulary is
            sharded (a tensor-parallel LM head): ``logits`` (..., V / world) are rank r's
            columns [r * V / world, (r + 1) * V / world) (equal shards, in rank order),
            ``targets`` the global ids. The row statistics are combined in one
            all-gather; every rank returns the full vocabulary's log-probs and entropy,
            and the gradient of its own shard (no communication in the backward). Not
            with ``statistics``, ``top_k``/``top_p`` or the native backends.
        backend: ``"triton"``, ``"torch"``, ``"cpp"`` (C++ kernels, CPU tensors), ``"cuda"``
            (CUDA C++ kernels) or None (automatic; see fastpo.kernels).

    Returns:
        float32 log-probs of ``targets.shape`` (float64 for float64 logits), and with
        ``return_entropy=True`` the pair ``(logprobs, entropy)``. Both are
        differentiable with respect to ``logits``; the gradient has the logits' dtype.
        With ``statistics``, always the triple ``(logprobs, entropy or None, stats)``,
        ``stats`` a dict from each requested name to a tensor of ``targets.shape``
        (bool for ``is_top1``, the log-probs' dtype otherwise).

    A Python-float temperature keeps the logits' precision (float64 for float64 logits)
    on the torch and Triton backends; the native backends round it to float32.
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
    check_unit_vocab_stride(logits=logits)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if softcap is not None:
        softcap = positive_scalar("softcap", softcap)
    statistics = check_statistics(statistics)
    sampling = check_sampling(top_k, top_p, statistics)
    temp = row_temperature(temperature, targets.shape, logits.device, dtype=acc_dtype(logits))
    if process_group is not None:
        check_vocab_parallel(process_group, statistics, sampling)
        backend = resolve_backend(backend, logits.device, "token_logprobs with process_group")
        check_targets(targets, vocab * _world_size(process_group), ignore_index)
        local, _ = shard_targets(targets.reshape(-1).contiguous(), vocab, process_group, ignore_index)
        logprobs, entropy = _VocabParallelLogprobs.apply(
            logits, local, temp, softcap, ignore_index, bool(return_entropy), backend, process_group
        )
        return shape_outputs(targets.shape, logprobs, entropy, (), ())
    backend = resolve_row_backend(backend, logits.device, "token_logprobs", statistics, sampling)
    check_targets(targets, vocab, ignore_index)

    flat_targets = targets.reshape(-1).contiguous()
    logprobs, entropy, *extra = _TokenLogprobs.apply(
        logits, flat_targets, temp, softcap, ignore_index, bool(return_entropy), backend, statistics, sampling
    )
    return shape_outputs(targets.shape, logprobs, entropy if return_entropy else None, statistics, extra)


def shape_outputs(shape, logprobs, entropy, statistics, extra):
    """The public return value: ``logprobs``, ``(logprobs, entropy)``, or with statistics
    ``(logprobs, entropy or None, {name: tensor})``, each viewed as ``shape``."""
    logprobs = logprobs.view(shape)
    entropy = None if entropy is None else entropy.view(shape)
    if statistics:
        return logprobs, entropy, {name: value.view(shape) for name, value in zip(statistics, extra)}
    return logprobs if entropy is None else (logprobs, entropy)
