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
"""

from __future__ import annotations

import math

import torch

from . import _native
from ._backend import resolve_backend
from ._launch import HAS_TRITON, acc_dtype, on_tensor_device, tl_acc_dtype
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
# near this many elements (4 MiB): large enough for the vectorized ops to run at full
# speed, small enough that the extra memory is a few such temporaries, whatever N is.
TORCH_CHUNK_ELEMENTS = 1 << 20

# Top-k/top-p cuts are bounded from below by the maxima of blocks of this many tokens;
# top-p looks for its bound among this many largest block maxima of a row.
CUT_BLOCK = 64
TOP_P_BLOCKS = 256
# Rows whose block maxima do not reach the top-p mass (flat distributions) find the
# cut's bucket among this many buckets of z - max in [-TOP_P_SPAN, 0] (exp(-TOP_P_SPAN)
# is far below any mass that can decide the cut), and sort only that bucket.
TOP_P_BUCKETS = 1024
TOP_P_SPAN = 128.0


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
    sampler's threshold when top-k/top-p truncate the distribution."""
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


def _chunk_threshold(x: torch.Tensor, shifted: torch.Tensor, e: torch.Tensor, top_k: int | None,
                     top_p: float | None) -> torch.Tensor:
    """Per row of one chunk, the threshold tau such that the sampler's top-k then top-p
    kept set is exactly {v : x_v >= tau}; -inf where nothing is cut. ``x`` holds the
    raw logits (rows, V), ``shifted`` z - max(z) (z tempered, in the accumulation dtype)
    and ``e`` exp(shifted).

    Top-k keeps every token whose z is at least the k-th largest (ties at the boundary
    all kept). Top-p, on the top-k distribution renormalized, keeps a token when the
    mass strictly above its z is below p: the cut is at the first token, in descending
    order of z, at which the cumulative mass reaches p * S.

    Selection without sorting the row: the maxima of blocks of CUT_BLOCK tokens give a
    lower bound on the cut (the k-th largest block maximum for top-k; for top-p the
    first block maximum, in descending order, at which the block maxima alone reach
    p * S). Only the tokens at or above the bound are gathered and sorted; that is a
    few tokens per row. Top-p rows whose block maxima do not reach p * S (flat
    distributions) find the cut's bucket in a mass histogram instead (``_bucket_top_p``).

    tau is a raw logit, not a z: every backend then decides "kept" by the same exact
    comparison of logits, whatever arithmetic it tempers them with (z is nondecreasing
    in x, so this is the same set).
    """
    rows, vocab = shifted.shape
    threshold = torch.full((rows,), float("-inf"), dtype=shifted.dtype, device=shifted.device)
    k = None if top_k is None or top_k >= vocab else top_k
    if vocab == 0 or (k is None and top_p is None):
        return threshold
    block_max = _block_maxima(shifted)
    no_bound = torch.full((rows, 1), float("-inf"), dtype=shifted.dtype, device=shifted.device)
    if k is None:
        # top-p alone: the mass of the whole row, and the bound from the block maxima
        goal = e.sum(dim=-1, keepdim=True).mul_(top_p)
        top_blocks = torch.topk(block_max, min(block_max.shape[1], TOP_P_BLOCKS), dim=-1).values
        first, found = _first_reaching(top_blocks, goal)
        bound = torch.where(found, top_blocks.gather(-1, first), no_bound)
        selected = shifted >= bound
        mass_above = torch.zeros_like(bound)
        if not bool(found.all()):  # a host sync; only flat rows need the buckets
            flat = (~found[:, 0]).nonzero().squeeze(1)
            selected[flat], mass_above[flat] = _bucket_top_p(shifted[flat], e[flat], goal[flat])
        values, columns = _sorted_candidates(shifted, selected)
        first, found = _first_reaching(values, goal - mass_above)
    else:
        bound = (torch.topk(block_max, k, dim=-1).values[:, -1:] if k <= block_max.shape[1] else no_bound)
        values, columns = _sorted_candidates(shifted, shifted >= bound)  # at least k per row
        if top_p is None:
            return _lowest_logit_of_value(x, values, columns, torch.full_like(values[:, :1], k - 1, dtype=torch.long))
        # top-p on the top-k set: its tokens, ties included, are all among the candidates
        values = values.masked_fill(values < values[:, k - 1 : k], float("-inf"))
        goal = values.exp().sum(dim=-1, keepdim=True).mul_(top_p)
        first, found = _first_reaching(values, goal)
    # rounding can leave p * S a hair above the whole sorted sum when p is near 1: then
    # every token of the (top-k) set is kept
    last = (values > float("-inf")).sum(dim=-1, keepdim=True).sub_(1)
    return _lowest_logit_of_value(x, values, columns, torch.where(found, first, last))


def _lowest_logit_of_value(x, values, columns, position):
    """The smallest raw logit among the candidates whose z equals the cut's (the value at
    ``position``): distinct logits can round to one z, and the sampler keeps them all;
    every token of that value is a candidate, so the kept set is exactly x >= this."""
    cut_value = values.gather(-1, position)
    candidate_x = x.gather(-1, columns).to(values.dtype)
    return candidate_x.masked_fill_(values != cut_value, float("inf")).amin(dim=-1)


def _block_maxima(shifted: torch.Tensor) -> torch.Tensor:
    """(rows, ceil(V / CUT_BLOCK)) maxima of consecutive blocks of each row."""
    rows, vocab = shifted.shape
    whole = vocab // CUT_BLOCK * CUT_BLOCK
    parts = [shifted[:, :whole].view(rows, -1, CUT_BLOCK).amax(dim=-1)] if whole else []
    if whole < vocab:
        parts.append(shifted[:, whole:].amax(dim=-1, keepdim=True))
    return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]


def _bucket_top_p(shifted, e, goal):
    """For flat rows, the tokens to sort for the top-p cut and the mass above them: one
    pass sorts the tokens into TOP_P_BUCKETS buckets of equal width in z - max (from
    -TOP_P_SPAN, or the row's minimum, to 0; a monotone map, so ties share a bucket)
    and sums each bucket's mass; the cut lies in the first bucket, from the top, where
    the cumulative mass reaches ``goal``. Returns (selected (rows, V) bool, mass above)."""
    lower = shifted.amin(dim=-1, keepdim=True).clamp_(min=-TOP_P_SPAN)
    scale = TOP_P_BUCKETS / (-lower).clamp_(min=torch.finfo(shifted.dtype).tiny)
    bucket = (shifted - lower).mul_(scale).floor_().clamp_(0, TOP_P_BUCKETS - 1).long()
    mass = torch.zeros((shifted.shape[0], TOP_P_BUCKETS), dtype=e.dtype, device=e.device)
    mass.scatter_add_(1, bucket, e)
    from_top = mass.flip(-1).cumsum(-1)
    reached = from_top >= goal
    first = reached.to(torch.uint8).argmax(dim=-1, keepdim=True)
    # rounding can leave ``goal`` a hair above the whole sum: then the lowest bucket is
    # the one to sort, its cumulative mass falls short too and every token is kept
    first = torch.where(reached[:, -1:], first, TOP_P_BUCKETS - 1)
    mass_above = from_top.gather(-1, first) - mass.flip(-1).gather(-1, first)
    return bucket == (TOP_P_BUCKETS - 1 - first), mass_above


def _sorted_candidates(shifted: torch.Tensor, selected: torch.Tensor):
    """Per row, the values of ``shifted`` where ``selected``, sorted descending and
    packed to the left of a (rows, most candidates) matrix padded with -inf, and their
    columns (0 in the padding). One host sync, for the width."""
    rows = shifted.shape[0]
    counts = selected.sum(dim=-1)
    row_of, column = selected.nonzero(as_tuple=True)
    slot = torch.arange(column.numel(), device=shifted.device) - (counts.cumsum(0) - counts)[row_of]
    width = int(counts.max())
    values = shifted.new_full((rows, width), float("-inf"))
    values[row_of, slot] = shifted[row_of, column]
    columns = torch.zeros((rows, width), dtype=torch.long, device=shifted.device)
    columns[row_of, slot] = column
    values, order = values.sort(dim=-1, descending=True)
    return values, columns.gather(-1, order)


def _first_reaching(values, goal):
    """For rows of descending ``values`` (z - max, -inf padded): the position (rows, 1)
    of the first value at which the cumulative exp(value) reaches ``goal`` (rows, 1), and
    whether any does (rows, 1)."""
    reached = values.exp().cumsum_(dim=-1) >= goal
    return reached.to(torch.uint8).argmax(dim=-1, keepdim=True), reached[:, -1:]  # argmax: the first maximum


def _sampling_thresholds(layout, n_rows, temp, softcap, sampling) -> torch.Tensor:
    """The per-row thresholds of ``_chunk_threshold`` over all rows, chunk by chunk (the
    Triton forward's first pass; the torch forward computes them inline)."""
    logits = layout[0]
    vocab, acc = logits.shape[-1], acc_dtype(logits)
    threshold = torch.empty(n_rows, dtype=acc, device=logits.device)
    z_buf, e_buf = _workspace(2, n_rows, vocab, acc, logits.device)
    for start, stop, x in _torch_chunks(layout, n_rows):
        z, _ = _torch_clamped_z(x, temp[start:stop, None], softcap, z_buf)
        shifted = z.sub_(z.amax(dim=-1, keepdim=True))
        e = torch.exp(shifted, out=e_buf[: stop - start]) if sampling[1] is not None else None
        threshold[start:stop] = _chunk_threshold(x, shifted, e, *sampling)
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
    cut_buf = None if sampling is None else _workspace(1, n_rows, vocab, torch.bool, logits.device)[0]
    for start, stop, x in _torch_chunks(layout, n_rows):
        rows = slice(start, stop)
        # the target's logit, unclamped: a -inf target has log-probability -inf
        x_t = x.gather(-1, safe_targets[rows])
        # the transform works in place: a copy keeps the raw x_t for the sampler's test below
        z_t, _ = _torch_transform(x_t.to(acc, copy=sampling is not None), temp[rows, None], softcap)
        z_sum = extra["mean_logit"][rows] if "mean_logit" in extra else None
        z, _ = _torch_clamped_z(x, temp[rows, None], softcap, z_buf, z_sum_out=z_sum)
        if "is_top1" in extra:
            # argmax returns the first of tied maxima, the tie rule of the other backends
            torch.eq(z.argmax(dim=-1, keepdim=True), safe_targets[rows], out=extra["is_top1"][rows, None])
        z_max = z.amax(dim=-1, keepdim=True)
        shifted = z.sub_(z_max)
        e = torch.exp(shifted, out=e_buf[: stop - start])
        if sampling is not None:
            tau = _chunk_threshold(x, shifted, e, *sampling)
            threshold[rows] = tau
            # the tokens the sampler cut get exp() = 0 after the exp, not a huge negative
            # z before it: exp of such values takes a slow path on the CPU
            e.masked_fill_(torch.lt(x, tau[:, None], out=cut_buf[: stop - start]), 0.0)
        s = e.sum(dim=-1)
        torch.log(s, out=log_sum[rows])
        row_max[rows] = z_max.squeeze(-1)
        # (z_t - max) first: both are large for large logits, their difference is exact
        logprobs[rows] = (z_t - z_max).squeeze_(-1) - log_sum[rows]
        if sampling is not None:
            # a target the sampler could not draw has log-probability -inf
            logprobs[rows].masked_fill_(x_t.squeeze(-1) < tau, float("-inf"))
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
    buffers = _workspace(1 + (softcap is not None) + (not in_place), n_rows, vocab, acc, logits.device)
    p_buf = buffers[0]
    tanh_buf = buffers[1] if softcap is not None else None
    for start, stop, x in _torch_chunks(layout, n_rows):
        rows = slice(start, stop)
        z_buf = grad[rows] if in_place else buffers[-1]
        z, tanh = _torch_clamped_z(x, temp[rows, None], softcap, z_buf, tanh_buf)
        g1, g_target = g_lp[rows, None], g_onehot[rows]
        if threshold is not None:
            tau = threshold[rows, None]
            # a target outside the kept set has the constant log-probability -inf
            dropped = x.gather(-1, safe_targets[rows]) < tau
            g1, g_target = g1.masked_fill(dropped, 0.0), g_target.masked_fill(dropped, 0.0)
        log_p = z.sub_(row_max[rows, None]).sub_(log_sum[rows, None])
        p = torch.exp(log_p, out=p_buf[: stop - start])
        if threshold is not None:
            p.masked_fill_(x < tau, 0.0)  # after the exp, as in the forward
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
# (row_max, log_sum) plus, with sampling = (top_k, top_p), the per-row threshold; the
# backward takes stats as they are.
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
