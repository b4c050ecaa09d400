"""Per-sequence log-probabilities: sums (or means) of per-token log-probs.

Two layouts of the same data:

* padded: ``token_logprobs`` (B, T) with a (B, T) ``mask``; row ``b`` sums the
  positions where ``mask[b]`` is nonzero;
* packed: a 1-D stream of N tokens holding S sequences back to back, with the
  boundaries ``cu_seqlens`` (S + 1,) as in flash-attn's varlen API: sequence ``s``
  is ``token_logprobs[cu_seqlens[s]:cu_seqlens[s + 1]]``.

With ``average=True`` each sum is divided by the number of valid tokens; an empty
sequence gives 0 (not NaN) and its tokens, if any, get zero gradient.

The Triton kernel is a segment reduction: one program per sequence walks over its
tokens in blocks and accumulates in fp32 (fp64 for fp64 input); the backward
kernel writes every token's gradient, which is the sequence's gradient (divided by
the count when averaging) on valid tokens and 0 elsewhere.
"""

from __future__ import annotations

import torch

from ._backend import dispatch
from ._launch import HAS_TRITON, acc_dtype, on_tensor_device, tl_acc_dtype
from ._validate import FLOAT_DTYPES, INDEX_DTYPES, bool_mask, check_same_device, check_tensor

if HAS_TRITON:
    import triton
    import triton.language as tl


# --------------------------------------------------------------------------- Triton

if HAS_TRITON:

    @triton.jit
    def _sequence_logprobs_fwd_kernel(
        x_ptr,
        mask_ptr,
        cu_ptr,
        out_ptr,
        count_ptr,
        n_cols,
        stride_xb,
        stride_xt,
        stride_mb,
        stride_mt,
        PACKED: tl.constexpr,
        AVERAGE: tl.constexpr,
        ACC_DTYPE: tl.constexpr,
        BLOCK_T: tl.constexpr,
    ):
        seq = tl.program_id(0).to(tl.int64)
        if PACKED:
            start = tl.load(cu_ptr + seq).to(tl.int64)
            end = tl.load(cu_ptr + seq + 1).to(tl.int64)
            x_row = x_ptr
        else:
            start = seq * 0
            end = start + n_cols
            x_row = x_ptr + seq * stride_xb
            mask_row = mask_ptr + seq * stride_mb
        total = tl.zeros([BLOCK_T], ACC_DTYPE)
        count = tl.zeros([BLOCK_T], ACC_DTYPE)
        cols = tl.arange(0, BLOCK_T)
        for block_start in range(start, end, BLOCK_T):
            offs = block_start + cols
            valid = offs < end
            if not PACKED:
                valid = valid & (tl.load(mask_row + offs * stride_mt, mask=valid, other=0) != 0)
            # Masked positions are never read (padding may hold NaN or -inf).
            total += tl.load(x_row + offs * stride_xt, mask=valid, other=0.0).to(ACC_DTYPE)
            count += valid.to(ACC_DTYPE)
        seq_total = tl.sum(total, axis=0)
        seq_count = tl.sum(count, axis=0)
        if AVERAGE:
            seq_total = seq_total / tl.maximum(seq_count, 1.0)
        tl.store(out_ptr + seq, seq_total)
        tl.store(count_ptr + seq, seq_count)

    @triton.jit
    def _sequence_logprobs_bwd_kernel(
        grad_out_ptr,
        count_ptr,
        mask_ptr,
        cu_ptr,
        grad_x_ptr,
        n_cols,
        stride_mb,
        stride_mt,
        PACKED: tl.constexpr,
        AVERAGE: tl.constexpr,
        ACC_DTYPE: tl.constexpr,
        BLOCK_T: tl.constexpr,
    ):
        seq = tl.program_id(0).to(tl.int64)
        if PACKED:
            start = tl.load(cu_ptr + seq).to(tl.int64)
            end = tl.load(cu_ptr + seq + 1).to(tl.int64)
            out_row = grad_x_ptr
        else:
            start = seq * 0
            end = start + n_cols
            out_row = grad_x_ptr + seq * n_cols
            mask_row = mask_ptr + seq * stride_mb
        g = tl.load(grad_out_ptr + seq).to(ACC_DTYPE)
        if AVERAGE:
            g = g / tl.maximum(tl.load(count_ptr + seq), 1.0)
        cols = tl.arange(0, BLOCK_T)
        for block_start in range(start, end, BLOCK_T):
            offs = block_start + cols
            in_seq = offs < end
            valid = in_seq
            if not PACKED:
                valid = valid & (tl.load(mask_row + offs * stride_mt, mask=in_seq, other=0) != 0)
            grad = tl.where(valid, g, 0.0)
            tl.store(out_row + offs, grad.to(grad_x_ptr.dtype.element_ty), mask=in_seq)


# Widest token block on CPU tensors (the interpreter): wide enough for few loop
# iterations, narrow enough that the tests cover sequences spanning several blocks.
INTERPRETER_BLOCK_T = 256


def _block_t(longest: int, device: torch.device) -> int:
    if device.type != "cuda":
        return max(16, min(triton.next_power_of_2(max(longest, 1)), INTERPRETER_BLOCK_T))
    return 1024


class _SequenceLogprobsTriton(torch.autograd.Function):
    @staticmethod
    @on_tensor_device
    def forward(ctx, x, mask, cu_seqlens, n_seqs, average):
        packed = cu_seqlens is not None
        acc = acc_dtype(x)
        out = torch.empty(n_seqs, dtype=acc, device=x.device)
        count = torch.empty(n_seqs, dtype=acc, device=x.device)
        # For packed input the widest block is bounded by the stream length; a
        # tighter bound would need a host sync on cu_seqlens.
        n_cols = x.shape[-1]
        block = _block_t(n_cols, x.device)
        if n_seqs:
            stride_xb = x.stride(0) if not packed else 0
            stride_xt = x.stride(-1)
            stride_mb, stride_mt = mask.stride() if not packed else (0, 0)
            _sequence_logprobs_fwd_kernel[(n_seqs,)](
                x, mask if not packed else x, cu_seqlens if packed else x, out, count,
                n_cols, stride_xb, stride_xt, stride_mb, stride_mt,
                PACKED=packed, AVERAGE=average, ACC_DTYPE=tl_acc_dtype(acc), BLOCK_T=block,
            )
        ctx.save_for_backward(mask, cu_seqlens, count)
        ctx.meta = (x.shape, x.dtype, packed, average, block)
        return out

    @staticmethod
    @on_tensor_device
    def backward(ctx, grad_out):
        mask, cu_seqlens, count = ctx.saved_tensors
        shape, dtype, packed, average, block = ctx.meta
        grad_x = torch.empty(shape, dtype=dtype, device=grad_out.device)
        n_seqs = count.numel()
        # Every token lies in some sequence (cu_seqlens ends at N; padded rows span T),
        # so the kernel writes every element of grad_x.
        if n_seqs:
            stride_mb, stride_mt = mask.stride() if not packed else (0, 0)
            _sequence_logprobs_bwd_kernel[(n_seqs,)](
                grad_out.contiguous(), count, mask if not packed else count,
                cu_seqlens if packed else count, grad_x,
                shape[-1], stride_mb, stride_mt,
                PACKED=packed, AVERAGE=average, ACC_DTYPE=tl_acc_dtype(count), BLOCK_T=block,
            )
        return grad_x, None, None, None, None


# --------------------------------------------------------------------- pure PyTorch


def _torch_padded(x: torch.Tensor, valid: torch.Tensor, average: bool) -> torch.Tensor:
    acc = acc_dtype(x)
    x = x.to(acc)
    total = torch.where(valid, x, torch.zeros((), dtype=acc, device=x.device)).sum(dim=-1)
    if average:
        total = total / valid.sum(dim=-1).clamp(min=1).to(acc)
    return total


def _torch_packed(x: torch.Tensor, cu_seqlens: torch.Tensor, average: bool) -> torch.Tensor:
    acc = acc_dtype(x)
    n_seqs = cu_seqlens.numel() - 1
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    # output_size avoids a host sync to learn the total length.
    segment = torch.repeat_interleave(
        torch.arange(n_seqs, device=x.device), lengths, output_size=x.numel()
    )
    total = torch.zeros(n_seqs, dtype=acc, device=x.device).index_add(0, segment, x.to(acc))
    if average:
        total = total / lengths.clamp(min=1).to(acc)
    return total


# ------------------------------------------------------------------------ checks


def _check_cu_seqlens(cu_seqlens, n_tokens: int) -> None:
    check_tensor("cu_seqlens", cu_seqlens, INDEX_DTYPES)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(
            f"cu_seqlens must be 1-D of shape (S + 1,), got shape {tuple(cu_seqlens.shape)}"
        )
    # One host sync for all three checks: they guard the kernel's memory accesses.
    first, last, decreasing = torch.stack(
        [
            cu_seqlens[0].long(),
            cu_seqlens[-1].long(),
            (cu_seqlens[1:] < cu_seqlens[:-1]).any().long(),
        ]
    ).tolist()
    if first != 0:
        raise ValueError(f"cu_seqlens must start at 0, got cu_seqlens[0] = {first}")
    if decreasing:
        at = int((cu_seqlens[1:] < cu_seqlens[:-1]).nonzero()[0])
        raise ValueError(
            f"cu_seqlens must be non-decreasing, got cu_seqlens[{at}] = {int(cu_seqlens[at])} > "
            f"cu_seqlens[{at + 1}] = {int(cu_seqlens[at + 1])}"
        )
    if last != n_tokens:
        raise ValueError(
            f"cu_seqlens[-1] = {last} must equal the number of packed tokens "
            f"token_logprobs.numel() = {n_tokens}"
        )


# ------------------------------------------------------------------------- public


def sequence_logprobs(
    token_logprobs: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    average: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Sum (or mean) of per-token log-probs over each sequence.

    Give exactly one of ``mask`` (padded layout) or ``cu_seqlens`` (packed layout).

    Args:
        token_logprobs: per-token log-probs, float32, bfloat16, float16 or float64.
            Padded: (B, T). Packed: (N,), the sequences back to back.
        mask: (B, T) bool, integer or float tensor; nonzero marks a valid token.
            Masked positions may hold anything, NaN included: they are never read
            into the sum and get zero gradient.
        cu_seqlens: (S + 1,) int32 or int64 sequence boundaries, flash-attn's varlen
            convention: starts at 0, non-decreasing, ends at N. Equal neighbours are
            empty sequences.
        average: divide each sum by its number of valid tokens (TRL's IPO
            convention); an empty sequence gives 0. Default: the sum (DPO).
        backend: ``"triton"``, ``"torch"`` or None (automatic; see fastpo.kernels).

    Returns:
        (B,) or (S,) float32 (float64 for float64 input), differentiable with respect
        to ``token_logprobs``.
    """
    check_tensor("token_logprobs", token_logprobs, FLOAT_DTYPES)
    if (mask is None) == (cu_seqlens is None):
        raise ValueError(
            "sequence_logprobs needs exactly one of mask (padded (B, T) input) or "
            "cu_seqlens (packed (N,) input)"
        )
    if not isinstance(average, bool):
        raise TypeError(f"average must be a bool, got {average!r}")
    if mask is not None:
        if token_logprobs.dim() != 2:
            raise ValueError(
                f"token_logprobs must be (B, T) with a mask, got shape {tuple(token_logprobs.shape)}"
            )
        valid = bool_mask("mask", mask, token_logprobs.shape, token_logprobs.device)
    else:
        check_same_device(token_logprobs=token_logprobs, cu_seqlens=cu_seqlens)
        if token_logprobs.dim() != 1:
            raise ValueError(
                "token_logprobs must be a 1-D packed stream with cu_seqlens, got shape "
                f"{tuple(token_logprobs.shape)}"
            )
        _check_cu_seqlens(cu_seqlens, token_logprobs.numel())
    if mask is not None:
        run = dispatch(
            "sequence_logprobs", token_logprobs.device, backend,
            torch=lambda: _torch_padded(token_logprobs, valid, average),
            # Triton reads the bool mask as bytes.
            triton=lambda: _SequenceLogprobsTriton.apply(
                token_logprobs, valid.view(torch.uint8), None, token_logprobs.shape[0], average
            ),
        )
    else:
        run = dispatch(
            "sequence_logprobs", token_logprobs.device, backend,
            torch=lambda: _torch_packed(token_logprobs, cu_seqlens, average),
            triton=lambda: _SequenceLogprobsTriton.apply(
                token_logprobs, None, cu_seqlens.contiguous(), cu_seqlens.numel() - 1, average
            ),
        )
    return run()
