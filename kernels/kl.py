"""Exact per-token KL(pi || pi_ref) over the whole vocabulary, from two logits tensors.

    KL = sum_v p_v (log p_v - log q_v),   p = softmax(z),  q = softmax(z_ref),
    z = logits / T,  z_ref = ref_logits / T   (the same temperature for both).

This is the "full" KL estimator of docs/conventions.md (verl names it and raises). Neither
softmax is materialized: the forward is one online pass per row over both logits rows,
keeping a running max and sum of exponentials for each and, for the policy,

    w = sum_v exp(z_v - m) * ((z_v - m) - (z_ref_v - m_ref)),

so that KL = w / s - log s + log s_ref with every term of order one (no cancellation
between two large log-sum-exps). Only per-row fp32 statistics are saved; the backward
recomputes p and q in one pass and writes

    d KL / d z_v = p_v * ((log p_v - log q_v) - KL).

``ref_logits`` is a constant: it gets no gradient (the reference model is frozen).
Logits of -inf are treated as the most negative finite float, like token_logprobs.
"""

from __future__ import annotations

import torch

from ._backend import HAS_TRITON, on_tensor_device, resolve_backend
from ._validate import FLOAT_DTYPES, bool_mask, check_same_device, check_tensor, row_temperature
from .logprobs import TORCH_CHUNK_ELEMENTS, _acc_dtype, _row_layout, _rows_view, _triton_config

if HAS_TRITON:
    import triton
    import triton.language as tl

# --------------------------------------------------------------------------- Triton

if HAS_TRITON:

    @triton.jit
    def _finite_floor(z):
        """-inf raised to the most negative finite float (probability 0, no NaN from
        inf - inf); a NaN stays NaN, as in the torch backend."""
        return tl.where(z == float("-inf"), -3.4028234663852886e38, z)

    @triton.jit
    def _logits_kl_fwd_kernel(
        logits_ptr,
        ref_ptr,
        temp_ptr,
        temp_stride,
        mask_ptr,
        kl_ptr,
        stats_ptr,
        n_rows,
        n_inner,
        stride_outer,
        stride_inner,
        ref_n_inner,
        ref_stride_outer,
        ref_stride_inner,
        vocab,
        HAS_MASK: tl.constexpr,
        ACC_DTYPE: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        FMAX: tl.constexpr = 3.4028234663852886e38
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + (row // n_inner) * stride_outer + (row % n_inner) * stride_inner
        ref_row_ptr = ref_ptr + (row // ref_n_inner) * ref_stride_outer + (row % ref_n_inner) * ref_stride_inner
        inv_temp = 1.0 / tl.load(temp_ptr + row * temp_stride).to(ACC_DTYPE)
        if HAS_MASK:
            valid = tl.load(mask_ptr + row) != 0
        else:
            valid = tl.full([], 1, tl.int1)
        # Masked-out rows skip the vocabulary loop altogether.
        v_end = tl.where(valid, vocab, 0)

        m = tl.full([], -FMAX, ACC_DTYPE)  # running max of z
        s = tl.zeros([], ACC_DTYPE)  # sum exp(z - m)
        w = tl.zeros([], ACC_DTYPE)  # sum exp(z - m) * ((z - m) - (z_ref - m_ref))
        m_ref = tl.full([], -FMAX, ACC_DTYPE)
        s_ref = tl.zeros([], ACC_DTYPE)
        cols = tl.arange(0, BLOCK_V)
        for start in range(0, v_end, BLOCK_V):
            offs = start + cols
            in_row = offs < vocab
            x = tl.load(row_ptr + offs, mask=in_row, other=0.0).to(ACC_DTYPE)
            x_ref = tl.load(ref_row_ptr + offs, mask=in_row, other=0.0).to(ACC_DTYPE)
            z = tl.where(in_row, _finite_floor(x * inv_temp), -FMAX)
            z_ref = tl.where(in_row, _finite_floor(x_ref * inv_temp), -FMAX)
            m_new = tl.maximum(m, tl.max(z, axis=0))
            m_ref_new = tl.maximum(m_ref, tl.max(z_ref, axis=0))
            alpha = tl.exp(m - m_new)
            # Moving both maxes shifts every earlier (z - m) - (z_ref - m_ref) by the same
            # amount. When alpha underflows the earlier terms weigh nothing; skipping
            # them avoids 0 * inf when the shift is huge (a block of -inf logits first).
            shift = (m - m_new) - (m_ref - m_ref_new)
            w_old = tl.where(alpha > 0, alpha * (w + s * shift), 0.0)
            e = tl.where(in_row, tl.exp(z - m_new), 0.0)
            log_ratio = (z - m_new) - (z_ref - m_ref_new)
            w = w_old + tl.sum(tl.where(e > 0, e * log_ratio, 0.0), axis=0)
            s = alpha * s + tl.sum(e, axis=0)
            s_ref = tl.exp(m_ref - m_ref_new) * s_ref + tl.sum(
                tl.where(in_row, tl.exp(z_ref - m_ref_new), 0.0), axis=0
            )
            m = m_new
            m_ref = m_ref_new

        s = tl.where(valid, s, 1.0)
        s_ref = tl.where(valid, s_ref, 1.0)
        log_s = tl.log(s)
        log_s_ref = tl.log(s_ref)
        # KL >= 0; rounding can leave a tiny negative value when p == q.
        kl = tl.maximum(w / s - log_s + log_s_ref, 0.0, propagate_nan=tl.PropagateNan.ALL)
        tl.store(kl_ptr + row, tl.where(valid, kl, 0.0))
        # The max and the log-sum separately: m + log s would round to m for a row of
        # -inf logits (m = -FMAX) and lose the log(V) of its uniform distribution.
        tl.store(stats_ptr + row, tl.where(valid, m, 0.0))
        tl.store(stats_ptr + n_rows + row, log_s)
        tl.store(stats_ptr + 2 * n_rows + row, tl.where(valid, m_ref, 0.0))
        tl.store(stats_ptr + 3 * n_rows + row, log_s_ref)

    @triton.jit
    def _logits_kl_bwd_kernel(
        logits_ptr,
        ref_ptr,
        temp_ptr,
        temp_stride,
        mask_ptr,
        kl_ptr,
        stats_ptr,
        grad_kl_ptr,
        grad_logits_ptr,
        n_rows,
        n_inner,
        stride_outer,
        stride_inner,
        ref_n_inner,
        ref_stride_outer,
        ref_stride_inner,
        vocab,
        HAS_MASK: tl.constexpr,
        ACC_DTYPE: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + (row // n_inner) * stride_outer + (row % n_inner) * stride_inner
        ref_row_ptr = ref_ptr + (row // ref_n_inner) * ref_stride_outer + (row % ref_n_inner) * ref_stride_inner
        out_ptr = grad_logits_ptr + row * vocab
        inv_temp = 1.0 / tl.load(temp_ptr + row * temp_stride).to(ACC_DTYPE)
        if HAS_MASK:
            valid = tl.load(mask_ptr + row) != 0
        else:
            valid = tl.full([], 1, tl.int1)
        m = tl.load(stats_ptr + row).to(ACC_DTYPE)
        log_s = tl.load(stats_ptr + n_rows + row).to(ACC_DTYPE)
        m_ref = tl.load(stats_ptr + 2 * n_rows + row).to(ACC_DTYPE)
        log_s_ref = tl.load(stats_ptr + 3 * n_rows + row).to(ACC_DTYPE)
        kl = tl.load(kl_ptr + row).to(ACC_DTYPE)
        g = tl.load(grad_kl_ptr + row).to(ACC_DTYPE)

        # Masked-out rows read nothing and write zeros.
        v_read = tl.where(valid, vocab, 0)
        cols = tl.arange(0, BLOCK_V)
        for start in range(0, vocab, BLOCK_V):
            offs = start + cols
            in_row = offs < vocab
            load_mask = offs < v_read
            # Lanes not read become -FMAX - m: probability 0, no overflow in exp().
            x = tl.load(row_ptr + offs, mask=load_mask, other=float("-inf")).to(ACC_DTYPE)
            x_ref = tl.load(ref_row_ptr + offs, mask=load_mask, other=float("-inf")).to(ACC_DTYPE)
            log_p = (_finite_floor(x * inv_temp) - m) - log_s
            log_q = (_finite_floor(x_ref * inv_temp) - m_ref) - log_s_ref
            p = tl.exp(log_p)
            # p == 0 contributes nothing, even where log p - log q overflows.
            grad_z = tl.where(p > 0, p * ((log_p - log_q) - kl), 0.0)
            grad_z = tl.where(load_mask, grad_z * g * inv_temp, 0.0)
            tl.store(out_ptr + offs, grad_z.to(grad_logits_ptr.dtype.element_ty), mask=in_row)


def _layout_args(layout):
    return layout[1], layout[2], layout[3]


@on_tensor_device
def _triton_forward(layout, ref_layout, temp, mask_rows, n_rows):
    logits = layout[0]
    vocab = logits.shape[-1]
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    kl = torch.empty(n_rows, dtype=out_dtype, device=logits.device)
    stats = torch.empty((4, n_rows), dtype=out_dtype, device=logits.device)
    if n_rows:
        block, num_warps = _triton_config(vocab, logits.device)
        _logits_kl_fwd_kernel[(n_rows,)](
            logits, ref_layout[0], temp, temp.stride(0),
            mask_rows if mask_rows is not None else kl,
            kl, stats, n_rows,
            *_layout_args(layout), *_layout_args(ref_layout), vocab,
            HAS_MASK=mask_rows is not None,
            ACC_DTYPE=_acc_dtype(logits.dtype),
            BLOCK_V=block,
            num_warps=num_warps,
        )
    return kl, stats


@on_tensor_device
def _triton_backward(layout, ref_layout, temp, mask_rows, kl, stats, grad_kl):
    logits = layout[0]
    n_rows, vocab = kl.numel(), logits.shape[-1]
    grad = torch.empty((n_rows, vocab), dtype=logits.dtype, device=logits.device)
    if n_rows and vocab:
        block, num_warps = _triton_config(vocab, logits.device)
        _logits_kl_bwd_kernel[(n_rows,)](
            logits, ref_layout[0], temp, temp.stride(0),
            mask_rows if mask_rows is not None else kl,
            kl, stats, grad_kl, grad, n_rows,
            *_layout_args(layout), *_layout_args(ref_layout), vocab,
            HAS_MASK=mask_rows is not None,
            ACC_DTYPE=_acc_dtype(logits.dtype),
            BLOCK_V=block,
            num_warps=num_warps,
        )
    return grad


# --------------------------------------------------------------------- pure PyTorch


def _row_range(view: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of an (n_outer, n_inner, V) row view, as (stop - start, V).

    A range inside one outer block is a view; a range across blocks is concatenated
    (a copy of the chunk only, which the caller converts to fp32 anyway)."""
    n_inner = view.shape[1]
    pieces = []
    row = start
    while row < stop:
        outer, inner = divmod(row, n_inner)
        take = min(stop - row, n_inner - inner)
        pieces.append(view[outer, inner : inner + take])
        row += take
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _torch_chunks(layout, ref_layout, n_rows: int):
    """Yield (start, stop, logits_chunk, ref_chunk) over the rows, a bounded number at a time."""
    view = _rows_view(layout, n_rows)
    ref_view = _rows_view(ref_layout, n_rows)
    chunk = max(1, TORCH_CHUNK_ELEMENTS // max(1, layout[0].shape[-1]))
    for start in range(0, n_rows, chunk):
        stop = min(start + chunk, n_rows)
        yield start, stop, _row_range(view, start, stop), _row_range(ref_view, start, stop)


def _torch_log_softmax(x: torch.Tensor, temp: torch.Tensor, acc: torch.dtype, row_max=None, log_sum=None):
    """(log-softmax of the clamped z, row max, log-sum of exp(z - max)) for one chunk.

    The max and the log-sum are kept apart (and reused from the forward when given):
    their sum rounds to the max for a row of -inf logits and would lose log(V)."""
    z = x.to(acc, copy=True).div_(temp).clamp_(min=torch.finfo(acc).min)
    if row_max is None:
        row_max = z.amax(dim=-1)
        shifted = z.sub_(row_max[:, None])
        log_sum = torch.logsumexp(shifted, dim=-1)
    else:
        shifted = z.sub_(row_max[:, None])
    return shifted.sub_(log_sum[:, None]), row_max, log_sum


def _torch_forward(layout, ref_layout, temp, mask_rows, n_rows):
    logits = layout[0]
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    kl = torch.zeros(n_rows, dtype=acc, device=logits.device)
    stats = torch.zeros((4, n_rows), dtype=acc, device=logits.device)
    for start, stop, x, x_ref in _torch_chunks(layout, ref_layout, n_rows):
        t = temp[start:stop, None]
        log_p, stats[0, start:stop], stats[1, start:stop] = _torch_log_softmax(x, t, acc)
        log_q, stats[2, start:stop], stats[3, start:stop] = _torch_log_softmax(x_ref, t, acc)
        p = log_p.exp()
        terms = log_p.sub_(log_q).mul_(p)
        # p == 0 contributes nothing, even where log p - log q overflows.
        terms.masked_fill_(p == 0, 0.0)
        kl[start:stop] = terms.sum(dim=-1).clamp_(min=0.0)
    if mask_rows is not None:
        valid = mask_rows.bool()
        kl = torch.where(valid, kl, 0.0)
        stats = torch.where(valid, stats, 0.0)
    return kl, stats


def _torch_backward(layout, ref_layout, temp, mask_rows, kl, stats, grad_kl):
    logits = layout[0]
    n_rows, vocab = kl.numel(), logits.shape[-1]
    acc = kl.dtype
    grad = torch.empty((n_rows, vocab), dtype=logits.dtype, device=logits.device)
    g = grad_kl.to(acc)
    if mask_rows is not None:
        g = torch.where(mask_rows.bool(), g, 0.0)
    for start, stop, x, x_ref in _torch_chunks(layout, ref_layout, n_rows):
        t = temp[start:stop, None]
        rows = stats[:, start:stop]
        log_p, _, _ = _torch_log_softmax(x, t, acc, rows[0], rows[1])
        log_q, _, _ = _torch_log_softmax(x_ref, t, acc, rows[2], rows[3])
        p = log_p.exp()
        grad_z = log_p.sub_(log_q).sub_(kl[start:stop, None]).mul_(p)
        grad_z.masked_fill_(p == 0, 0.0)
        grad_z.mul_(g[start:stop, None] / t)
        # Rows with zero upstream gradient (masked out) may hold non-finite logits.
        grad_z.masked_fill_(g[start:stop, None] == 0, 0.0)
        grad[start:stop] = grad_z
    return grad


# ----------------------------------------------------------------------- autograd


class _LogitsKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ref_logits, temp, mask_rows, backend):
        layout = _row_layout(logits)
        ref_layout = _row_layout(ref_logits)
        n_rows = temp.numel()
        forward = _triton_forward if backend == "triton" else _torch_forward
        kl, stats = forward(layout, ref_layout, temp, mask_rows, n_rows)
        ctx.set_materialize_grads(False)
        ctx.layout_meta = (layout[1:], ref_layout[1:])
        ctx.logits_shape = logits.shape
        ctx.backend = backend
        ctx.save_for_backward(layout[0], ref_layout[0], temp, mask_rows, kl, stats)
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        if grad_kl is None or not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        logits, ref_logits, temp, mask_rows, kl, stats = ctx.saved_tensors
        meta, ref_meta = ctx.layout_meta
        backward = _triton_backward if ctx.backend == "triton" else _torch_backward
        grad = backward(
            (logits, *meta), (ref_logits, *ref_meta), temp, mask_rows, kl, stats, grad_kl.contiguous()
        )
        return grad.view(ctx.logits_shape), None, None, None, None


def logits_kl(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 1.0,
    mask: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Exact KL(pi || pi_ref) at every position, summed over the whole vocabulary.

    ``KL = sum_v p_v (log p_v - log q_v)`` with ``p = softmax(logits / T)`` and
    ``q = softmax(ref_logits / T)``: the "full" estimator of docs/conventions.md, which TRL,
    verl and OpenRLHF do not offer (verl's ``kl_penalty="full"`` raises). Computed in one
    online pass per row over both logits tensors without materializing either softmax.

    Args:
        logits: (..., V) policy logits, float32, bfloat16 or float16 (float64 for
            gradient checks), unit stride in the last dimension; other strides are used
            in place (``logits[:, :-1]`` is not copied).
        ref_logits: (..., V) reference-model logits of the same shape and any float
            dtype. Treated as a constant: it receives no gradient (the reference model
            is frozen; detach it or not, the result is the same).
        temperature: a float > 0 or a tensor broadcastable to ``logits.shape[:-1]``
            (for example (B, 1), one per sequence); applied to both logits tensors.
        mask: optional tensor of shape ``logits.shape[:-1]`` (bool, or 0/1 integers or
            floats; nonzero = valid). Masked-out positions return 0 and get zero
            gradient; their logits are not read by the Triton kernels.
        backend: ``"triton"``, ``"torch"`` or None (automatic; see fastpo.kernels).

    Returns:
        float32 KL of shape ``logits.shape[:-1]`` (float64 for float64 logits),
        differentiable with respect to ``logits``: ``d KL / d z_v = p_v ((log p_v -
        log q_v) - KL)``, divided by T for the logits. Rounding can make an exact KL of
        0 come out a hair below zero; such values are returned as 0.

    Logits of -inf are treated as the most negative finite float (probability 0, no
    NaN). A token with -inf under ``ref_logits`` but positive probability under
    ``logits`` makes the KL infinite: the result is then +inf or a huge number and its
    gradient is not meaningful.
    """
    check_tensor("logits", logits, FLOAT_DTYPES)
    check_tensor("ref_logits", ref_logits, FLOAT_DTYPES)
    check_same_device(logits=logits, ref_logits=ref_logits)
    if logits.dim() == 0:
        raise ValueError("logits must have a vocabulary dimension, got a 0-dim tensor")
    if logits.shape != ref_logits.shape:
        raise ValueError(
            f"logits.shape {tuple(logits.shape)} does not match ref_logits.shape {tuple(ref_logits.shape)}"
        )
    for name, tensor in (("logits", logits), ("ref_logits", ref_logits)):
        if tensor.shape[-1] > 1 and tensor.stride(-1) != 1:
            raise ValueError(
                f"{name} must have unit stride in the vocabulary dimension, got strides "
                f"{tensor.stride()}; call .contiguous() first"
            )
    out_shape = logits.shape[:-1]
    mask_rows = None if mask is None else bool_mask("mask", mask, out_shape, logits.device).reshape(-1)
    backend = resolve_backend(backend, logits.device, "logits_kl")
    temp = row_temperature(temperature, out_shape, logits.device)
    if mask_rows is not None:
        mask_rows = mask_rows.contiguous().view(torch.uint8)
    kl = _LogitsKL.apply(logits, ref_logits.detach(), temp, mask_rows, backend)
    return kl.view(out_shape)
