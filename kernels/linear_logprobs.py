"""Per-token log-probs and entropy straight from hidden states and the LM head.

    logits = hidden @ weight.T + bias,   then exactly ``token_logprobs(logits, targets, ...)``,

without ever holding the (N, V) logits. The tokens are processed in chunks of ``C``
rows: each chunk's logits are computed by one matmul into a reusable (C, V) buffer
and reduced at once, by the foundation's row kernels (fastpo.kernels.logprobs: the
Triton kernels on the GPU, the chunked PyTorch ones elsewhere), to the log-prob, the
entropy and the per-row softmax statistics. Only O(N) statistics are kept.

Matmuls. Log-probs feed arbitrary downstream losses, so the upstream gradients
(d loss / d lp, d loss / d H per row) are unknown during the forward. The backward
therefore recomputes each chunk's logits (one matmul), turns them into
d loss / d logits with the foundation's backward kernel, then does the two gradient
matmuls: 4 matmuls in all (x W^T forward, x W^T again, dlogits W,
dlogits^T x). A loss-aware 3-matmul variant (gradients computed during the forward,
as Liger-Kernel's fused linear cross entropy does) needs d loss / d lp of a chunk to
be known from that chunk alone; the policy losses built on this op do not have that
property in general (sequence-level ratios, sequence-mean aggregation, entropy
quantile masks need the whole batch first), so the composed losses below use the
same 4-matmul path.

GPU path: chunked cuBLAS matmuls (torch.mm) feeding the foundation's Triton row
kernels, rather than a GEMM with an online-logsumexp epilogue. cuBLAS keeps the
matmuls at full speed for any shape, and the row kernels add one read and one write
of the chunk per pass. Measured on an H200 (bench/RESULTS.md, 2026-12-04, bf16): 1.66-1.81x
the three unavoidable matmuls' time, against the 1.33x floor of four matmuls.

Precision. The chunk's logits are computed in the inputs' dtype (as
``hidden @ weight.T + bias`` would be, bias added inside the matmul). The gradient of
``hidden`` is one matmul per chunk over the whole vocabulary, accumulated in fp32 by
the GEMM and rounded once. The gradients of ``weight`` and ``bias`` sum over every
chunk: they accumulate in an fp32 buffer (fp64 for fp64 inputs) and are cast to the
parameter's dtype once, at the end (bf16 accumulation across chunks is what made
Liger's loss diverge before its fp32 option).

Memory beyond the inputs, outputs and gradients: one (C, V) logits buffer in the
inputs' dtype, reused by every chunk, and in the backward the chunk's (C, V) gradient
from the foundation's backward; the foundation's own bounded temporaries; O(N) statistics; and for low
precision weights the fp32 (V, H) accumulator plus a temporary of at most half a
chunk for each chunk's low-precision weight-gradient product. None of it grows with N.
"""

from __future__ import annotations

import torch

from ._launch import acc_dtype
from ._validate import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    bool_mask,
    check_same_device,
    check_targets,
    check_tensor,
    positive_scalar,
    row_temperature,
)
from ._backend import resolve_backend
from .logprobs import (
    _IMPLEMENTATIONS,
    _empty_statistics,
    _row_layout,
    _world_size,
    check_sampling,
    check_statistics,
    check_vocab_parallel,
    combine_shards,
    resolve_row_backend,
    shape_outputs,
    shard_targets,
    target_logits,
)
from .policy import policy_loss
from .sequence import sequence_logprobs

# Rows per chunk are chosen so that the chunk's (rows, V) logits hold about this many
# elements. On the CPU a 64 MiB fp32 chunk keeps the matmuls efficient (the weight is
# streamed once per chunk) while the workspace stays far below the logits of a real
# batch. On the GPU the weight-gradient accumulator (V x H) is read and written once
# per chunk, so chunks must be long for that traffic to be small next to the matmuls:
# 2^28 elements is ~1700 rows at V = 151936 (512 MiB in bf16); measured on an H200, not tuned.
CPU_WORKSPACE_ELEMENTS = 1 << 24
CUDA_WORKSPACE_ELEMENTS = 1 << 28


def _check_chunk_size(chunk_size) -> None:
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            raise TypeError(f"chunk_size must be an int or None, got {chunk_size!r}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _chunk_rows(chunk_size: int | None, n_rows: int, vocab: int, device: torch.device) -> int:
    if chunk_size is None:
        budget = CUDA_WORKSPACE_ELEMENTS if device.type == "cuda" else CPU_WORKSPACE_ELEMENTS
        chunk_size = budget // max(1, vocab)
    return max(1, min(chunk_size, n_rows))


def _chunk_logits(buffer: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias):
    """hidden @ weight.T (+ bias) for one chunk, written into the front rows of buffer."""
    out = buffer[: hidden.shape[0]]
    if bias is None:
        return torch.mm(hidden, weight.t(), out=out)
    return torch.addmm(bias, hidden, weight.t(), out=out)


def _add_weight_grad(acc: torch.Tensor, grad_logits: torch.Tensor, hidden: torch.Tensor) -> None:
    """acc (V, H) += grad_logits.T @ hidden, the sum across chunks kept in acc's dtype.

    A low-precision product is rounded once per chunk (the GEMM accumulates in fp32)
    and added to the fp32 accumulator; it is formed a slice of the vocabulary at a time
    so that its temporary stays below the chunk's size.
    """
    if grad_logits.dtype == acc.dtype:
        acc.addmm_(grad_logits.t(), hidden)
        return
    vocab, width = acc.shape
    # slices start at multiples of 128 columns: a slice of grad_logits at an unaligned
    # offset sends cuBLAS to slow kernels (an H200: 2.7x the three matmuls' time at
    # V = 151,936, whose slices were 32,755 wide, against 1.8x at V = 128,256)
    step = max(128, grad_logits.numel() // (2 * max(1, width)) // 128 * 128)
    for start in range(0, vocab, step):
        stop = min(start + step, vocab)
        acc[start:stop].add_(torch.mm(grad_logits[:, start:stop].t(), hidden))


class _LinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temp, options):
        softcap, ignore_index, compute_entropy, chunk, backend, statistics, sampling, group = options
        n_rows, vocab = hidden.shape[0], weight.shape[0]
        row_forward = _IMPLEMENTATIONS[backend][0]
        acc = acc_dtype(hidden)
        logprobs = torch.empty(n_rows, dtype=acc, device=hidden.device)
        # a vocabulary shard's entropy is always needed, to combine the shards'
        local_entropy = compute_entropy or group is not None
        entropy = torch.empty(n_rows, dtype=acc, device=hidden.device) if local_entropy else None
        stats = None  # the foundation's per-row softmax statistics, a tuple of (N,) tensors
        # the requested statistics, in the order of ``statistics``
        extra = tuple(_empty_statistics(statistics, n_rows, acc, hidden.device).values())
        row_targets = targets
        if group is not None:
            # this shard's targets; the rows of another shard's token read token 0, unused
            ignored = targets == ignore_index
            present = (targets >= 0) & (targets < vocab) & ~ignored
            row_targets = targets.masked_fill(~present & ~ignored, 0)
            z_target = torch.empty(n_rows, dtype=acc, device=hidden.device)
            stats = tuple(torch.empty(n_rows, dtype=acc, device=hidden.device) for _ in range(2))
        buffer = torch.empty((min(chunk, n_rows), vocab), dtype=hidden.dtype, device=hidden.device)
        for start in range(0, n_rows, chunk):
            rows = slice(start, min(start + chunk, n_rows))
            logits = _chunk_logits(buffer, hidden[rows], weight, bias)
            lp, ent, chunk_stats, chunk_extra = row_forward(
                _row_layout(logits), row_targets[rows], temp[rows], softcap, ignore_index, local_entropy, statistics,
                sampling,
            )
            if group is not None:
                z_target[rows] = target_logits(logits, targets[rows], temp[rows], softcap, present[rows])
            chunk_extra = tuple(chunk_extra[name] for name in statistics)
            if stats is None:
                stats = tuple(torch.empty(n_rows, dtype=s.dtype, device=s.device) for s in chunk_stats)
            for full, part in zip((*stats, *extra), (*chunk_stats, *chunk_extra)):
                full[rows] = part
            logprobs[rows] = lp
            if local_entropy:
                entropy[rows] = ent
        if group is not None:
            logprobs, entropy, *stats = combine_shards(*stats, entropy, z_target, group)
            logprobs.masked_fill_(ignored, 0.0)
            entropy = entropy.masked_fill_(ignored, 0.0) if compute_entropy else None
        ctx.set_materialize_grads(False)
        ctx.options = options
        ctx.save_for_backward(hidden, weight, bias, targets, temp, entropy, *(stats or ()))
        ctx.mark_non_differentiable(*extra)
        return logprobs, entropy, *extra

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logprobs, grad_entropy, *_):
        hidden, weight, bias, targets, temp, entropy, *stats = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        if grad_logprobs is None and grad_entropy is None:
            return (None,) * 6
        # with no rows the loop below does nothing: zero gradients, which keep a caller's
        # all-padding micro-batch connected to the parameters
        softcap, ignore_index, _, chunk, backend, _, _, group = ctx.options
        row_backward = _IMPLEMENTATIONS[backend][1]
        n_rows, vocab = hidden.shape[0], weight.shape[0]
        acc = acc_dtype(hidden)

        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # sums across chunks in fp32 (fp64 for fp64 inputs), cast once at the end
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(vocab, dtype=acc, device=weight.device) if need_bias else None
        if grad_logprobs is not None:
            grad_logprobs = grad_logprobs.contiguous()
        if grad_entropy is not None:
            grad_entropy = grad_entropy.contiguous()

        buffer = torch.empty((min(chunk, n_rows), vocab), dtype=hidden.dtype, device=hidden.device)
        for start in range(0, n_rows, chunk):
            rows = slice(start, min(start + chunk, n_rows))
            logits = _chunk_logits(buffer, hidden[rows], weight, bias)
            grad_logits = row_backward(
                _row_layout(logits), targets[rows], temp[rows], softcap, ignore_index,
                tuple(s[rows] for s in stats),
                None if entropy is None or grad_entropy is None else entropy[rows],
                None if grad_logprobs is None else grad_logprobs[rows],
                None if grad_entropy is None else grad_entropy[rows],
            )
            if need_hidden:
                torch.mm(grad_logits, weight, out=grad_hidden[rows])
            if need_weight:
                _add_weight_grad(grad_weight, grad_logits, hidden[rows])
            if need_bias:
                grad_bias.add_(grad_logits.sum(dim=0, dtype=grad_bias.dtype))
            del grad_logits  # freed before the next chunk allocates its own
        if group is not None and need_hidden:
            # hidden is replicated over the vocabulary shards: its gradient is the sum of theirs
            torch.distributed.all_reduce(grad_hidden, group=group)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None


def _check_inputs(hidden, weight, targets, bias, chunk_size):
    check_tensor("hidden", hidden, FLOAT_DTYPES)
    check_tensor("weight", weight, FLOAT_DTYPES)
    check_tensor("targets", targets, INDEX_DTYPES)
    if bias is not None:
        check_tensor("bias", bias, FLOAT_DTYPES)
    check_same_device(hidden=hidden, weight=weight, targets=targets, bias=bias)
    if hidden.dim() == 0:
        raise ValueError("hidden must have a hidden-size dimension, got a 0-dim tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must be (V, H), got shape {tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden size mismatch: hidden.shape {tuple(hidden.shape)} has H = {hidden.shape[-1]} "
            f"but weight.shape {tuple(weight.shape)} has H = {weight.shape[1]}"
        )
    if tuple(hidden.shape[:-1]) != tuple(targets.shape):
        raise ValueError(
            f"hidden.shape {tuple(hidden.shape)} does not match targets.shape "
            f"{tuple(targets.shape)}: expected hidden of shape (*targets.shape, H)"
        )
    if weight.dtype != hidden.dtype:
        raise ValueError(f"dtype mismatch: hidden is {hidden.dtype} but weight is {weight.dtype}")
    if bias is not None:
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(
                f"bias.shape {tuple(bias.shape)} does not match the vocabulary of "
                f"weight.shape {tuple(weight.shape)}: expected ({weight.shape[0]},)"
            )
        if bias.dtype != hidden.dtype:
            raise ValueError(f"dtype mismatch: hidden is {hidden.dtype} but bias is {bias.dtype}")
    _check_chunk_size(chunk_size)


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    statistics: tuple[str, ...] = (),
    top_k: int | None = None,
    top_p: float | None = None,
    process_group=None,
    chunk_size: int | None = None,
    backend: str | None = None,
):
    """Log-probability of each target token (and optionally the entropy) from hidden
    states and the LM head, without materializing the (N, V) logits.

    Same outputs and gradients as ``token_logprobs(hidden @ weight.T + bias, targets,
    ...)``.

    Args:
        hidden: (..., H) float32, bfloat16 or float16 (float64 for gradient checks).
        weight: (V, H) LM-head weight, same dtype as ``hidden``.
        targets: (...) int32 or int64 token ids in [0, V), or ``ignore_index``;
            ``targets.shape == hidden.shape[:-1]``.
        bias: optional (V,) LM-head bias, same dtype as ``hidden``.
        temperature: a float > 0, or a tensor broadcastable to ``targets.shape`` (for
            example (B, 1): one temperature per sequence).
        softcap: if given, logits become ``softcap * tanh(logits / softcap)`` before
            the temperature (Gemma-2 style).
        ignore_index: targets equal to it give 0 for both outputs and zero gradient.
        return_entropy: also return the entropy of each position's distribution.
        statistics: extra per-position statistics from the same pass, as in
            ``token_logprobs`` (``"log_sum_sq_probs"``, ``"mean_logit"``, ``"is_top1"``,
            ``"top1_logprob"``; no gradient; not on the native backends).
        top_k, top_p: log-probs and entropy under the sampler's truncated
            distribution, as in ``token_logprobs`` (a target outside the kept set gets
            -inf; not with ``statistics``; not on the native backends).
        process_group: a ``torch.distributed`` group over which the LM head is sharded
            by vocabulary (tensor parallelism): ``weight`` (V / world, H) and ``bias``
            are rank r's rows [r * V / world, (r + 1) * V / world) (equal shards, rank
            order), ``hidden`` the same on every rank, ``targets`` global ids. The row
            statistics are combined in one all-gather; every rank returns the full
            vocabulary's outputs. Backward: the gradients of ``weight``/``bias`` are this
            shard's; the gradient of ``hidden`` is summed over the group (one
            all-reduce), so every rank gets the whole of it. As in ``token_logprobs``.
        chunk_size: tokens per chunk (the workspace is one (chunk_size, V) buffer);
            None picks about 2^23 logits per chunk on the CPU and 2^28 on CUDA.
        backend: the row kernels: ``"triton"``, ``"torch"``, ``"cpp"``, ``"cuda"`` or None
            (automatic; see fastpo.kernels). The matmuls are always ``torch.mm``.
            It picks the row kernels; the matmuls are torch's (cuBLAS on CUDA).

    Returns:
        float32 log-probs of ``targets.shape`` (float64 for float64 inputs), and with
        ``return_entropy=True`` the pair ``(logprobs, entropy)``. Both are
        differentiable with respect to ``hidden``, ``weight`` and ``bias``; the
        gradients have their inputs' dtypes. With ``statistics``, always the triple
        ``(logprobs, entropy or None, stats)`` as ``token_logprobs`` returns it.
    """
    _check_inputs(hidden, weight, targets, bias, chunk_size)
    _check_ignore_index(ignore_index)
    if softcap is not None:
        softcap = positive_scalar("softcap", softcap)
    statistics = check_statistics(statistics)
    sampling = check_sampling(top_k, top_p, statistics)
    temp = row_temperature(temperature, targets.shape, hidden.device, dtype=acc_dtype(hidden))
    vocab = weight.shape[0]
    flat_targets = targets.reshape(-1).contiguous()
    if process_group is None:
        backend = resolve_row_backend(backend, hidden.device, "linear_token_logprobs", statistics, sampling)
        check_targets(targets, vocab, ignore_index)
    else:
        check_vocab_parallel(process_group, statistics, sampling)
        backend = resolve_backend(backend, hidden.device, "linear_token_logprobs with process_group")
        check_targets(targets, vocab * _world_size(process_group), ignore_index)
        flat_targets, _ = shard_targets(flat_targets, vocab, process_group, ignore_index)

    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    chunk = _chunk_rows(chunk_size, flat_targets.numel(), vocab, hidden.device)
    options = (softcap, ignore_index, bool(return_entropy), chunk, backend, statistics, sampling, process_group)
    logprobs, entropy, *extra = _LinearTokenLogprobs.apply(flat_hidden, weight, bias, flat_targets, temp, options)
    return shape_outputs(targets.shape, logprobs, entropy, statistics, extra)


# ------------------------------------------------------------------ composed losses


def _check_ignore_index(ignore_index) -> None:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")


def _targets_outside_mask_ignored(targets: torch.Tensor, mask, ignore_index: int) -> torch.Tensor:
    """Targets with the positions outside ``mask`` set to ignore_index: the loss never
    reads them, so the row kernels skip them and padding there may hold any value."""
    check_tensor("targets", targets, INDEX_DTYPES)
    _check_ignore_index(ignore_index)
    valid = bool_mask("mask", mask, targets.shape, targets.device)
    return targets.masked_fill(~valid, ignore_index)


def linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    backend: str | None = None,
    **policy_loss_options,
):
    """``policy_loss`` of the log-probs (and entropy) computed straight from hidden
    states and the LM head, without materializing the logits.

    Equal to ``policy_loss(token_logprobs(hidden @ weight.T + bias, targets, ...),
    old_logprobs, advantages, mask, entropy=..., **policy_loss_options)``, and
    differentiable with respect to ``hidden``, ``weight`` and ``bias``.

    Args:
        hidden: (B, T, H) last hidden states; ``weight`` (V, H), ``bias`` (V,) the LM head.
        targets: (B, T) sampled token ids. Positions where ``mask`` is 0 are not read
            (they may hold padding or ``ignore_index``).
        old_logprobs, advantages, mask: as in ``fastpo.kernels.policy_loss``.
        temperature, softcap, ignore_index, chunk_size: as in ``linear_token_logprobs``.
        backend: used for both the log-probs and the loss.
        **policy_loss_options: every keyword option of ``policy_loss`` (``loss_type``,
            clipping, ``ref_logprobs``/``kl_coef``, ``entropy_coef``,
            ``entropy_quantile``, rollout correction, ``agg``, ...) except ``entropy``,
            which is computed here, from the same chunks, when ``entropy_coef`` is
            nonzero or ``entropy_quantile`` is set.

    Returns:
        ``(loss, metrics)`` exactly as ``policy_loss``.
    """
    if "entropy" in policy_loss_options:
        raise TypeError("linear_policy_loss computes the entropy itself; do not pass entropy=")
    need_entropy = (
        policy_loss_options.get("entropy_coef", 0.0) != 0.0
        or policy_loss_options.get("entropy_quantile") is not None
    )
    targets = _targets_outside_mask_ignored(targets, mask, ignore_index)
    out = linear_token_logprobs(
        hidden, weight, targets, bias=bias, temperature=temperature, softcap=softcap,
        ignore_index=ignore_index, return_entropy=need_entropy, chunk_size=chunk_size, backend=backend,
    )
    logprobs, entropy = out if need_entropy else (out, None)
    return policy_loss(
        logprobs, old_logprobs, advantages, mask, entropy=entropy, backend=backend, **policy_loss_options
    )


def linear_preference_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    average: bool = False,
    bias: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Per-sequence log-probs (sum, or mean) from hidden states and the LM head, for
    the preference losses (DPO, IPO, KTO, Plackett-Luce), without the logits.

    Equal to ``sequence_logprobs(token_logprobs(hidden @ weight.T + bias, targets,
    ...), mask, cu_seqlens=cu_seqlens, average=average)``. Run it under
    ``torch.no_grad()`` for the reference model.

    Args:
        hidden: padded (B, T, H) with ``mask`` (B, T), or packed (N, H) with
            ``cu_seqlens`` (S + 1,); ``weight`` (V, H) and ``bias`` (V,) the LM head.
        targets: (B, T) or (N,) token ids. In the padded layout positions where
            ``mask`` is 0 are not read. In the packed layout every token of a segment
            counts (a target equal to ``ignore_index`` adds 0 to the sum but still
            counts for ``average``).
        mask, cu_seqlens, average: as in ``fastpo.kernels.sequence_logprobs`` (give
            exactly one of ``mask`` and ``cu_seqlens``; ``average=True`` is TRL's IPO
            convention, the default sum is DPO's).
        temperature, softcap, ignore_index, chunk_size: as in ``linear_token_logprobs``.
        backend: used for both the log-probs and the per-sequence reduction.

    Returns:
        (B,) or (S,) float32 (float64 for float64 inputs), differentiable with respect
        to ``hidden``, ``weight`` and ``bias``.
    """
    if mask is not None and cu_seqlens is None:
        targets = _targets_outside_mask_ignored(targets, mask, ignore_index)
    logprobs = linear_token_logprobs(
        hidden, weight, targets, bias=bias, temperature=temperature, softcap=softcap,
        ignore_index=ignore_index, chunk_size=chunk_size, backend=backend,
    )
    return sequence_logprobs(logprobs, mask, cu_seqlens=cu_seqlens, average=average, backend=backend)
