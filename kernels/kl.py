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

The KL's curvature: at ``z_ref = z`` the Hessian of KL(p_ref || softmax(z)) in z is the
Fisher matrix of the categorical distribution, ``diag(p) - p p^T``, so in logits coordinates

    F u = p * (u - <p, u>) / T^2        (per row; ``fisher_vector_product``)

for a tangent ``u`` of the logits. It is computed without holding p: one online pass per
row keeps the running max, sum of exponentials and ``sum_v exp(z_v - m) u_v`` (so that
``<p, u>`` is their ratio), and a second pass writes the product. A model's Fisher-vector
product is then ``J^T F (J v)``, J the Jacobian of its logits; ``linear_fisher_vector_product``
applies the LM-head part of J and J^T chunk by chunk, from the hidden states.
"""

from __future__ import annotations

import torch

from . import _native
from ._backend import resolve_backend
from ._launch import HAS_TRITON, acc_dtype, on_tensor_device, tl_acc_dtype
from ._validate import (
    FLOAT_DTYPES,
    bool_mask,
    check_same_device,
    check_tensor,
    check_unit_vocab_stride,
    positive_scalar,
    row_temperature,
)
from .linear_logprobs import _add_weight_grad, _check_chunk_size, _chunk_logits, _chunk_rows
from .logprobs import _row_layout, _rows_view, _torch_chunk_rows, _triton_config

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

    @triton.jit
    def _fisher_vector_product_kernel(
        logits_ptr,
        u_ptr,
        temp_ptr,
        temp_stride,
        mask_ptr,
        out_ptr,
        n_inner,
        stride_outer,
        stride_inner,
        u_n_inner,
        u_stride_outer,
        u_stride_inner,
        vocab,
        HAS_MASK: tl.constexpr,
        ACC_DTYPE: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        FMAX: tl.constexpr = 3.4028234663852886e38
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + (row // n_inner) * stride_outer + (row % n_inner) * stride_inner
        u_row_ptr = u_ptr + (row // u_n_inner) * u_stride_outer + (row % u_n_inner) * u_stride_inner
        out_row_ptr = out_ptr + row * vocab
        inv_temp = 1.0 / tl.load(temp_ptr + row * temp_stride).to(ACC_DTYPE)
        if HAS_MASK:
            valid = tl.load(mask_ptr + row) != 0
        else:
            valid = tl.full([], 1, tl.int1)
        # Masked-out rows read nothing and write zeros.
        v_end = tl.where(valid, vocab, 0)

        m = tl.full([], -FMAX, ACC_DTYPE)  # running max of z
        s = tl.zeros([], ACC_DTYPE)  # sum exp(z - m)
        w = tl.zeros([], ACC_DTYPE)  # sum exp(z - m) * u
        cols = tl.arange(0, BLOCK_V)
        for start in range(0, v_end, BLOCK_V):
            offs = start + cols
            in_row = offs < vocab
            x = tl.load(row_ptr + offs, mask=in_row, other=0.0).to(ACC_DTYPE)
            u = tl.load(u_row_ptr + offs, mask=in_row, other=0.0).to(ACC_DTYPE)
            z = tl.where(in_row, _finite_floor(x * inv_temp), -FMAX)
            m_new = tl.maximum(m, tl.max(z, axis=0))
            alpha = tl.exp(m - m_new)
            e = tl.where(in_row, tl.exp(z - m_new), 0.0)
            # p == 0 contributes nothing, even where u is not finite.
            w = alpha * w + tl.sum(e * tl.where(e > 0, u, 0.0), axis=0)
            s = alpha * s + tl.sum(e, axis=0)
            m = m_new

        s = tl.where(valid, s, 1.0)
        mean_u = w / s  # <p, u>
        scale = inv_temp * inv_temp / s
        for start in range(0, vocab, BLOCK_V):
            offs = start + cols
            in_row = offs < vocab
            load_mask = offs < v_end
            # Lanes not read (a masked-out row) get probability 0 and write 0.
            x = tl.load(row_ptr + offs, mask=load_mask, other=0.0).to(ACC_DTYPE)
            u = tl.load(u_row_ptr + offs, mask=load_mask, other=0.0).to(ACC_DTYPE)
            e = tl.where(load_mask, tl.exp(_finite_floor(x * inv_temp) - m), 0.0)
            out = (e * scale) * (tl.where(e > 0, u, mean_u) - mean_u)
            tl.store(out_row_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=in_row)


def _layout_args(layout):
    return layout[1], layout[2], layout[3]


@on_tensor_device
def _triton_forward(layout, ref_layout, temp, mask_rows, n_rows):
    logits = layout[0]
    vocab = logits.shape[-1]
    out_dtype = acc_dtype(logits)
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
            ACC_DTYPE=tl_acc_dtype(logits),
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
            ACC_DTYPE=tl_acc_dtype(logits),
            BLOCK_V=block,
            num_warps=num_warps,
        )
    return grad


@on_tensor_device
def _triton_fisher(layout, u_layout, temp, mask_rows, n_rows):
    logits = layout[0]
    vocab = logits.shape[-1]
    out = torch.empty((n_rows, vocab), dtype=temp.dtype, device=logits.device)
    if n_rows and vocab:
        block, num_warps = _triton_config(vocab, logits.device)
        _fisher_vector_product_kernel[(n_rows,)](
            logits, u_layout[0], temp, temp.stride(0),
            mask_rows if mask_rows is not None else out,
            out,
            *_layout_args(layout), *_layout_args(u_layout), vocab,
            HAS_MASK=mask_rows is not None,
            ACC_DTYPE=tl_acc_dtype(logits),
            BLOCK_V=block,
            num_warps=num_warps,
        )
    return out


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
    chunk = _torch_chunk_rows(layout[0].shape[-1], view.device)
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
    acc = acc_dtype(logits)
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


def _torch_fisher(layout, u_layout, temp, mask_rows, n_rows):
    logits = layout[0]
    acc = temp.dtype
    out = torch.empty((n_rows, logits.shape[-1]), dtype=acc, device=logits.device)
    for start, stop, x, u in _torch_chunks(layout, u_layout, n_rows):
        t = temp[start:stop, None]
        z = x.to(acc, copy=True).div_(t).clamp_(min=torch.finfo(acc).min)
        p = z.sub_(z.amax(dim=-1, keepdim=True)).exp_()
        p.div_(p.sum(dim=-1, keepdim=True))
        u = u.to(acc)
        # p == 0 contributes nothing, even where u is not finite.
        mean_u = torch.where(p > 0, p * u, 0.0).sum(dim=-1, keepdim=True)
        product = torch.sub(u, mean_u, out=out[start:stop]).mul_(p).div_(t * t)
        product.masked_fill_(p == 0, 0.0)
    if mask_rows is not None:
        # Masked-out rows may hold non-finite logits: whatever came out of them is dropped.
        out.masked_fill_(~mask_rows.bool()[:, None], 0.0)
    return out


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
    check_unit_vocab_stride(logits=logits, ref_logits=ref_logits)
    out_shape = logits.shape[:-1]
    mask_rows = _mask_rows(mask, out_shape, logits.device)
    backend = resolve_backend(backend, logits.device, "logits_kl")
    temp = row_temperature(temperature, out_shape, logits.device)
    kl = _LogitsKL.apply(logits, ref_logits.detach(), temp, mask_rows, backend)
    return kl.view(out_shape)


# ----------------------------------------------------------------- Fisher-vector product

# backend -> the row implementation; "cpp" and "cuda" are the native kernels of csrc/.
_FISHER_IMPLEMENTATIONS = {
    "triton": _triton_fisher,
    "torch": _torch_fisher,
    "cpp": _native.fisher_vector_product,
    "cuda": _native.fisher_vector_product,
}


def _fisher_rows(logits: torch.Tensor, u: torch.Tensor, temp: torch.Tensor, mask_rows, backend: str) -> torch.Tensor:
    """The (n_rows, V) product of every row of ``logits`` / ``u`` (validated, same shape)."""
    return _FISHER_IMPLEMENTATIONS[backend](_row_layout(logits), _row_layout(u), temp, mask_rows, temp.numel())


def _mask_rows(mask, shape: torch.Size, device: torch.device):
    """The mask as contiguous uint8 rows (what every backend reads), or None."""
    if mask is None:
        return None
    return bool_mask("mask", mask, shape, device).reshape(-1).contiguous().view(torch.uint8)


def fisher_vector_product(
    logits: torch.Tensor,
    u: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 1.0,
    mask: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """The Fisher matrix of ``softmax(logits / T)``, in logits coordinates, times ``u``,
    at every position:

        F u = p * (u - <p, u>) / T^2,     p = softmax(logits / T).

    ``F`` is the Hessian in ``logits`` of ``KL(softmax(old / T) || softmax(logits / T))``
    at ``logits = old``: with ``u = J v`` (J the Jacobian of a model's logits in its
    parameters), ``J^T F u`` is the KL-Hessian-vector product that TRPO's conjugate
    gradient needs, at the cost of one Jacobian-vector and one vector-Jacobian product.
    One online pass per row (max, sum of exponentials and ``sum exp(z - max) u``, so that
    ``<p, u>`` comes out without holding p) and one pass that writes the product.

    Args:
        logits: (..., V) float32, bfloat16 or float16 (float64 for checks), unit stride
            in the last dimension; other strides are used in place.
        u: (..., V) tangent in logits space, the shape and dtype of ``logits``, unit
            stride in the last dimension.
        temperature: a float > 0 or a tensor broadcastable to ``logits.shape[:-1]``.
        mask: optional tensor of shape ``logits.shape[:-1]`` (bool, or 0/1 integers or
            floats; nonzero = valid). Masked-out positions give 0 and are not read by the
            Triton and native kernels.
        backend: ``"triton"``, ``"torch"``, ``"cpp"`` (C++ kernels, CPU tensors), ``"cuda"``
            (CUDA C++ kernels) or None (automatic; see fastpo.kernels).

    Returns:
        float32 ``F u`` of ``logits.shape`` (float64 for float64 logits). Not
        differentiable: no gradient flows through it. A -inf logit (probability 0) gives
        0 there, whatever ``u`` holds.
    """
    check_tensor("logits", logits, FLOAT_DTYPES)
    check_tensor("u", u, FLOAT_DTYPES)
    check_same_device(logits=logits, u=u)
    if logits.dim() == 0:
        raise ValueError("logits must have a vocabulary dimension, got a 0-dim tensor")
    if u.shape != logits.shape:
        raise ValueError(f"u.shape {tuple(u.shape)} does not match logits.shape {tuple(logits.shape)}")
    if u.dtype != logits.dtype:
        raise ValueError(f"dtype mismatch: logits is {logits.dtype} but u is {u.dtype}")
    check_unit_vocab_stride(logits=logits, u=u)
    out_shape = logits.shape[:-1]
    mask_rows = _mask_rows(mask, out_shape, logits.device)
    backend = resolve_backend(backend, logits.device, "fisher_vector_product")
    acc = acc_dtype(logits)
    # float64 products keep a float temperature such as 0.7 exact (float32 would move it ~1e-8).
    temp = row_temperature(temperature, out_shape, logits.device, acc)
    with torch.no_grad():
        out = _fisher_rows(logits.detach(), u.detach(), temp, mask_rows, backend)
    return out.view(logits.shape)


def _check_linear_fisher_inputs(hidden, weight, bias, d_hidden, d_weight, d_bias, chunk_size) -> None:
    for name, tensor in (("hidden", hidden), ("weight", weight), ("d_hidden", d_hidden)):
        check_tensor(name, tensor, FLOAT_DTYPES)
    if hidden.dim() == 0:
        raise ValueError("hidden must have a hidden-size dimension, got a 0-dim tensor")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight.shape {tuple(weight.shape)} is not (V, H) for hidden.shape {tuple(hidden.shape)} "
            f"(H = {hidden.shape[-1]})"
        )
    if bias is None and d_bias is not None:
        raise ValueError("d_bias was given without bias")
    expected_shapes = (
        ("weight", weight, weight.shape), ("bias", bias, (weight.shape[0],)), ("d_hidden", d_hidden, hidden.shape),
        ("d_weight", d_weight, weight.shape), ("d_bias", d_bias, (weight.shape[0],)),
    )
    for name, tensor, shape in expected_shapes:
        if tensor is None:
            continue
        check_tensor(name, tensor, FLOAT_DTYPES)
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{name}.shape {tuple(tensor.shape)} does not match the expected {tuple(shape)}")
        if tensor.dtype != hidden.dtype:
            raise ValueError(f"dtype mismatch: hidden is {hidden.dtype} but {name} is {tensor.dtype}")
    check_same_device(hidden=hidden, weight=weight, bias=bias, d_hidden=d_hidden, d_weight=d_weight, d_bias=d_bias)
    _check_chunk_size(chunk_size)


def linear_fisher_vector_product(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    d_hidden: torch.Tensor,
    d_weight: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    d_bias: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    softcap: float | None = None,
    mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    backend: str | None = None,
):
    """``fisher_vector_product`` through the LM head, from hidden states, without the
    (N, V) logits: ``J^T F (J t)`` for the head ``logits = hidden @ weight.T + bias``
    (then ``softcap * tanh(logits / softcap)`` when given), J its Jacobian in
    ``(hidden, weight, bias)`` and t the tangent ``(d_hidden, d_weight, d_bias)``.

    Chunk by chunk of ``C`` rows: the logits and their tangent
    ``u = d_hidden @ weight.T + hidden @ d_weight.T + d_bias`` into two reusable (C, V)
    buffers, ``out = F u`` by the row kernels of ``fisher_vector_product``, then the
    transposed Jacobian: ``out @ weight`` for the hidden states, ``out^T @ hidden`` and
    ``out.sum(0)`` summed over the chunks for the weight and the bias. In a model,
    ``d_hidden`` is the Jacobian-vector product of the layers below the head and the
    returned hidden-state part goes back through them by one vector-Jacobian product.

    Args:
        hidden: (..., H) float32, bfloat16 or float16 (float64 for checks).
        weight: (V, H) LM-head weight; ``bias`` optional (V,); all of ``hidden``'s dtype.
        d_hidden: tangent of ``hidden``, its shape and dtype.
        d_weight, d_bias: tangents of ``weight`` and ``bias``, or None where that
            parameter is held fixed (its tangent is 0 and no part is returned for it).
        temperature: a float > 0 or a tensor broadcastable to ``hidden.shape[:-1]``.
        softcap: if given, the logits are soft-capped before the temperature (Gemma-2).
        mask: optional tensor of shape ``hidden.shape[:-1]`` (nonzero = valid): masked
            positions contribute nothing and get 0.
        chunk_size: rows per chunk (the workspace is a few (chunk_size, V) buffers);
            None picks about 2^24 logits per chunk on the CPU and 2^28 on CUDA.
        backend: the row kernels, as in ``fisher_vector_product``; the matmuls are
            always ``torch.mm``.

    Returns:
        ``(grad_hidden, grad_weight, grad_bias)``: the parts of ``J^T F J t`` for
        ``hidden`` (its shape and dtype), ``weight`` and ``bias`` (their dtypes, summed
        over the rows in float32, float64 for float64 inputs; None where the tangent
        was None). Not differentiable.
    """
    _check_linear_fisher_inputs(hidden, weight, bias, d_hidden, d_weight, d_bias, chunk_size)
    if softcap is not None:
        softcap = positive_scalar("softcap", softcap)
    out_shape = hidden.shape[:-1]
    mask_rows = _mask_rows(mask, out_shape, hidden.device)
    backend = resolve_backend(backend, hidden.device, "linear_fisher_vector_product")
    acc = acc_dtype(hidden)
    temp = row_temperature(temperature, out_shape, hidden.device, acc)
    flat_hidden = hidden.detach().reshape(-1, hidden.shape[-1])
    flat_d_hidden = d_hidden.detach().reshape(-1, hidden.shape[-1])
    weight = weight.detach()
    bias = None if bias is None else bias.detach()
    n_rows, vocab = flat_hidden.shape[0], weight.shape[0]
    chunk = _chunk_rows(chunk_size, n_rows, vocab, hidden.device)
    with torch.no_grad():
        grad_hidden = torch.empty_like(flat_hidden)
        grad_weight = None if d_weight is None else torch.zeros(weight.shape, dtype=acc, device=weight.device)
        grad_bias = None if d_bias is None else torch.zeros(vocab, dtype=acc, device=weight.device)
        logits_buffer, tangent_buffer = torch.empty(
            (2, min(chunk, n_rows), vocab), dtype=hidden.dtype, device=hidden.device
        ).unbind(0)
        for start in range(0, n_rows, chunk):
            rows = slice(start, min(start + chunk, n_rows))
            h = flat_hidden[rows]
            logits = _chunk_logits(logits_buffer, h, weight, bias)
            u = torch.mm(flat_d_hidden[rows], weight.t(), out=tangent_buffer[: h.shape[0]])
            if d_weight is not None:
                u.addmm_(h, d_weight.detach().t())
            if d_bias is not None:
                u.add_(d_bias.detach())
            if softcap is not None:
                # d (c tanh(x / c)) / dx = 1 - tanh(x / c)^2, applied to u and to F u.
                logits = logits.div_(softcap).tanh_()
                slope = 1.0 - logits.square()
                logits.mul_(softcap)
                u.mul_(slope)
            out = _fisher_rows(
                logits, u, temp[rows], None if mask_rows is None else mask_rows[rows], backend
            )
            if softcap is not None:
                out.mul_(slope)
            out = out.to(hidden.dtype)
            torch.mm(out, weight, out=grad_hidden[rows])
            if grad_weight is not None:
                _add_weight_grad(grad_weight, out, h)
            if grad_bias is not None:
                grad_bias.add_(out.sum(dim=0, dtype=acc))
    return (
        grad_hidden.view(hidden.shape),
        None if grad_weight is None else grad_weight.to(weight.dtype),
        None if grad_bias is None else grad_bias.to(bias.dtype),
    )
