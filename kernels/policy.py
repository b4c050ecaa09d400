"""Clipped-surrogate policy losses (PPO/GRPO family), KL estimators and the PPO value loss.

Every formula is written in docs/conventions.md; docs/rl-losses.md maps each option
to the peer (TRL, verl, OpenRLHF) it matches. Notation: ``lp`` current log-probs,
``lp_old`` log-probs of the policy that sampled the rollouts, ``m`` the 0/1 token mask,
``A`` the advantage, ``r = exp(lp - lp_old)``.

Fused path (Triton). One program per sequence walks over its tokens in blocks and, in
the forward, computes both the per-token loss ``L_t`` and ``m_t * dL_t/dlp_t``; it
writes per-row partial sums (the loss and every metric) and the per-token gradient.
The aggregation is then a weighted sum of row sums, ``loss = sum_i c_i * rowsum_i``
with one weight ``c_i`` per row (see ``_row_scale``), so the autograd backward only
multiplies the saved gradient by ``grad_output * c_i``. When the ratio or the rollout
correction is per sequence (GSPO, sequence-level TIS) a first pass over the row
computes the row's mean log-ratio; a GSPO ratio couples every token of a row, so a
last pass adds ``m_t * s_i / n_i * sum_t' dL_t'/ds_i`` to the row's gradient.

The torch backend composes the same formulas with eager PyTorch ops and autograd.

Float hyperparameters (clip bounds, coefficients, caps) reach the Triton kernels as
fp32 scalars, as Triton passes Python floats; with float64 inputs the arithmetic is
float64 but a bound such as 0.8 is the fp32 number nearest to it.
"""

from __future__ import annotations

import math

import torch

from ._backend import HAS_TRITON, on_tensor_device, resolve_backend
from ._validate import FLOAT_DTYPES, INDEX_DTYPES, check_same_device, check_tensor, positive_scalar

if HAS_TRITON:
    import triton
    import triton.language as tl

KL_KINDS = ("k1", "k2", "k3", "abs", "low_var_kl")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "gspo")
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
IMPORTANCE_LEVELS = ("token", "sequence")
ROLLOUT_IS_LEVELS = ("token", "sequence")

# The aggregation each preset uses in TRL's GRPOTrainer (gspo is TRL's loss_type="grpo"
# with importance_sampling_level="sequence"; cispo shares dapo's global token mean).
PRESET_AGG = {
    "grpo": "seq-mean-token-mean",
    "sapo": "seq-mean-token-mean",
    "gspo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dapo": "token-mean",
    "cispo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
}

_KL_KIND_ID = {kind: i + 1 for i, kind in enumerate(KL_KINDS)}  # 0 = no KL
_PPO, _CISPO, _SAPO = 0, 1, 2
_LOSS_KIND_ID = {"cispo": _CISPO, "sapo": _SAPO}  # every other loss type is the PPO clip
_TIS_ID = {None: 0, "token": 1, "sequence": 2}

# Columns of the (B, N_STATS) per-row partial sums written by the forward.
(
    _LOSS,
    _COUNT,
    _CLIP_LOW,
    _CLIP_HIGH,
    _RATIO_SUM,
    _RATIO_MAX,
    _APPROX_KL,
    _REF_KL,
    _ENTROPY,
    _DUAL_CLIP,
) = range(10)
N_STATS = 10
_VALUE_STATS = 3  # loss, count, clipped count

# --------------------------------------------------------------------------- Triton

if HAS_TRITON:

    @triton.jit
    def _kl_terms(d, KL_KIND: tl.constexpr):
        """KL estimate of ``d = lp - lp_ref`` and its derivative with respect to d."""
        zero = d * 0.0
        if KL_KIND == 1:  # k1
            kl = d
            dkl = zero + 1.0
        elif KL_KIND == 2:  # k2
            kl = 0.5 * d * d
            dkl = d
        elif KL_KIND == 3:  # k3
            e = tl.exp(-d)
            kl = e + d - 1.0
            dkl = 1.0 - e
        elif KL_KIND == 4:  # abs
            kl = tl.abs(d)
            dkl = tl.where(d > 0, zero + 1.0, tl.where(d < 0, zero - 1.0, zero))
        else:  # low_var_kl: k3 of d clamped to [-20, 20], result clamped to [-10, 10]
            dc = tl.minimum(tl.maximum(d, -20.0, propagate_nan=tl.PropagateNan.ALL), 20.0, propagate_nan=tl.PropagateNan.ALL)
            e = tl.exp(-dc)
            k3 = e + dc - 1.0
            kl = tl.minimum(tl.maximum(k3, -10.0, propagate_nan=tl.PropagateNan.ALL), 10.0, propagate_nan=tl.PropagateNan.ALL)
            dkl = tl.where((d >= -20.0) & (d <= 20.0) & (k3 <= 10.0), 1.0 - e, zero)
        return kl, dkl

    @triton.jit
    def _kl_penalty_kernel(
        lp_ptr,
        ref_ptr,
        kl_ptr,
        dkl_ptr,
        n,
        KL_KIND: tl.constexpr,
        NEED_GRAD: tl.constexpr,
        ACC_DTYPE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = offs < n
        lp = tl.load(lp_ptr + offs, mask=valid, other=0.0).to(ACC_DTYPE)
        ref = tl.load(ref_ptr + offs, mask=valid, other=0.0).to(ACC_DTYPE)
        kl, dkl = _kl_terms(lp - ref, KL_KIND)
        tl.store(kl_ptr + offs, kl, mask=valid)
        if NEED_GRAD:
            tl.store(dkl_ptr + offs, dkl, mask=valid)

    @triton.jit
    def _load_row(ptr, offs, in_row, valid, ACC_DTYPE: tl.constexpr):
        """A block of a (B, T) row in the accumulation dtype, 0 at masked positions
        (padding may hold anything, even inf or NaN)."""
        x = tl.load(ptr + offs, mask=in_row, other=0.0).to(ACC_DTYPE)
        return tl.where(valid, x, 0.0)

    @triton.jit
    def _policy_loss_fwd_kernel(
        lp_ptr,
        old_ptr,
        adv_ptr,
        mask_ptr,
        ref_ptr,
        ent_ptr,
        roll_ptr,
        ent_threshold_ptr,
        grad_ptr,
        stats_ptr,
        T,
        stride_adv_b,
        stride_adv_t,
        lo,
        hi,
        delta,
        dual_clip,
        cispo_cap,
        tau_pos,
        tau_neg,
        kl_coef,
        entropy_coef,
        log_tis_cap,
        LOSS_KIND: tl.constexpr,
        SEQ_RATIO: tl.constexpr,
        HAS_DELTA: tl.constexpr,
        HAS_DUAL: tl.constexpr,
        KL_KIND: tl.constexpr,
        KL_IN_LOSS: tl.constexpr,
        HAS_ENTROPY: tl.constexpr,
        ENTROPY_MASK: tl.constexpr,
        TIS_KIND: tl.constexpr,
        NEED_GRAD: tl.constexpr,
        ACC_DTYPE: tl.constexpr,
        N_STAT: tl.constexpr,
        BLOCK_T: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        base = row * T
        adv_base = row * stride_adv_b
        cols = tl.arange(0, BLOCK_T)

        # Pass 1, only for per-sequence quantities: the row's mean log-ratio (GSPO) and
        # its summed rollout log-ratio (sequence-level TIS).
        seq_n = tl.zeros([], ACC_DTYPE)
        seq_log_ratio = tl.zeros([], ACC_DTYPE)
        seq_log_tis = tl.zeros([], ACC_DTYPE)
        if SEQ_RATIO or TIS_KIND == 2:
            for start in range(0, T, BLOCK_T):
                offs = start + cols
                in_row = offs < T
                valid = (tl.load(mask_ptr + base + offs, mask=in_row, other=0) != 0) & in_row
                old = _load_row(old_ptr + base, offs, in_row, valid, ACC_DTYPE)
                seq_n += tl.sum(valid.to(ACC_DTYPE), axis=0)
                if SEQ_RATIO:
                    lp = _load_row(lp_ptr + base, offs, in_row, valid, ACC_DTYPE)
                    seq_log_ratio += tl.sum(lp - old, axis=0)
                if TIS_KIND == 2:
                    roll = _load_row(roll_ptr + base, offs, in_row, valid, ACC_DTYPE)
                    seq_log_tis += tl.sum(old - roll, axis=0)
        seq_ratio = tl.exp(seq_log_ratio / tl.maximum(seq_n, 1.0))
        seq_tis = tl.exp(tl.minimum(seq_log_tis, log_tis_cap))
        if ENTROPY_MASK:
            ent_threshold = tl.load(ent_threshold_ptr).to(ACC_DTYPE)

        loss_sum = tl.zeros([], ACC_DTYPE)
        count = tl.zeros([], ACC_DTYPE)
        clip_low = tl.zeros([], ACC_DTYPE)
        clip_high = tl.zeros([], ACC_DTYPE)
        ratio_sum = tl.zeros([], ACC_DTYPE)
        ratio_max = tl.full([], float("-inf"), ACC_DTYPE)
        approx_kl = tl.zeros([], ACC_DTYPE)
        ref_kl = tl.zeros([], ACC_DTYPE)
        entropy_sum = tl.zeros([], ACC_DTYPE)
        dual_count = tl.zeros([], ACC_DTYPE)
        seq_grad = tl.zeros([], ACC_DTYPE)  # sum_t dL_t / ds for the GSPO ratio

        # Pass 2: per-token loss, its gradient, and the row sums.
        for start in range(0, T, BLOCK_T):
            offs = start + cols
            in_row = offs < T
            valid = (tl.load(mask_ptr + base + offs, mask=in_row, other=0) != 0) & in_row
            m = valid.to(ACC_DTYPE)
            lp = _load_row(lp_ptr + base, offs, in_row, valid, ACC_DTYPE)
            old = _load_row(old_ptr + base, offs, in_row, valid, ACC_DTYPE)
            adv = tl.load(adv_ptr + adv_base + offs * stride_adv_t, mask=in_row, other=0.0).to(ACC_DTYPE)
            adv = tl.where(valid, adv, 0.0)
            zero = m * 0.0
            if HAS_ENTROPY:
                ent = _load_row(ent_ptr + base, offs, in_row, valid, ACC_DTYPE)
            log_ratio = lp - old
            token_ratio = tl.exp(log_ratio)
            if SEQ_RATIO:
                ratio = zero + seq_ratio
            else:
                ratio = token_ratio

            # policy term, dL/dratio, and (CISPO) the direct dL/dlp
            direct = zero
            d_ratio = zero
            low_hit = offs < 0  # all False
            high_hit = offs < 0
            if LOSS_KIND == 0:  # PPO clip
                if HAS_DELTA:
                    r1 = tl.minimum(ratio, delta, propagate_nan=tl.PropagateNan.ALL)
                    d_r1 = tl.where(ratio <= delta, zero + 1.0, zero)
                else:
                    r1 = ratio
                    d_r1 = zero + 1.0
                r2 = tl.minimum(tl.maximum(ratio, lo, propagate_nan=tl.PropagateNan.ALL), hi, propagate_nan=tl.PropagateNan.ALL)
                d_r2 = tl.where((ratio >= lo) & (ratio <= hi), zero + 1.0, zero)
                t1 = r1 * adv
                t2 = r2 * adv
                policy = -tl.minimum(t1, t2, propagate_nan=tl.PropagateNan.ALL)
                # min() passes the gradient to the smaller operand, half to each on a tie
                d_ratio = tl.where(t1 < t2, -adv * d_r1, tl.where(t2 < t1, -adv * d_r2, -0.5 * adv * (d_r1 + d_r2)))
                if HAS_DUAL:
                    bound = -dual_clip * adv
                    dual_hit = valid & (adv < 0) & (bound < policy)
                    policy = tl.where(dual_hit, bound, policy)
                    d_ratio = tl.where(dual_hit, zero, d_ratio)
                    dual_count += tl.sum(dual_hit.to(ACC_DTYPE), axis=0)
                low_hit = valid & (ratio < lo) & (adv < 0)
                high_hit = valid & (ratio > hi) & (adv > 0)
            elif LOSS_KIND == 1:  # CISPO: stop-gradient truncated ratio times lp
                direct = -tl.minimum(ratio, cispo_cap, propagate_nan=tl.PropagateNan.ALL) * adv
                policy = direct * lp
                high_hit = valid & (ratio > cispo_cap) & (adv > 0)
            else:  # SAPO soft gate
                tau = tl.where(adv > 0, zero + tau_pos, zero + tau_neg)
                gate = tl.sigmoid(tau * (ratio - 1.0))
                policy = -gate * 4.0 / tau * adv
                d_ratio = -4.0 * adv * gate * (1.0 - gate)

            # weights of the policy term: entropy-quantile mask and rollout correction
            weight = m
            if ENTROPY_MASK:
                weight = tl.where(ent >= ent_threshold, weight, zero)
            if TIS_KIND == 1:
                roll = _load_row(roll_ptr + base, offs, in_row, valid, ACC_DTYPE)
                weight = weight * tl.exp(tl.minimum(old - roll, log_tis_cap, propagate_nan=tl.PropagateNan.ALL))
            elif TIS_KIND == 2:
                weight = weight * seq_tis
            token_loss = policy * weight
            d_ratio = d_ratio * weight
            grad = direct * weight
            if SEQ_RATIO:
                seq_grad += tl.sum(d_ratio, axis=0)
            else:
                grad += d_ratio * ratio

            if KL_KIND != 0:
                ref = _load_row(ref_ptr + base, offs, in_row, valid, ACC_DTYPE)
                kl, dkl = _kl_terms(lp - ref, KL_KIND)
                kl = tl.where(valid, kl, 0.0)
                ref_kl += tl.sum(kl, axis=0)
                if KL_IN_LOSS:
                    token_loss += kl_coef * kl
                    grad += kl_coef * dkl
            if HAS_ENTROPY:
                entropy_sum += tl.sum(ent, axis=0)
                token_loss -= entropy_coef * ent

            loss_sum += tl.sum(tl.where(valid, token_loss, 0.0), axis=0)
            count += tl.sum(m, axis=0)
            clip_low += tl.sum(low_hit.to(ACC_DTYPE), axis=0)
            clip_high += tl.sum(high_hit.to(ACC_DTYPE), axis=0)
            ratio_sum += tl.sum(tl.where(valid, ratio, 0.0), axis=0)
            ratio_max = tl.maximum(ratio_max, tl.max(tl.where(valid, ratio, float("-inf")), axis=0))
            approx_kl += tl.sum(tl.where(valid, token_ratio - 1.0 - log_ratio, 0.0), axis=0)
            if NEED_GRAD:
                tl.store(grad_ptr + base + offs, tl.where(valid, grad, 0.0), mask=in_row)

        # Pass 3 (GSPO): d s_i / d lp_t = m_t * s_i / n_i for every token of the row.
        if NEED_GRAD and SEQ_RATIO and LOSS_KIND != 1:
            shared = seq_grad * seq_ratio / tl.maximum(seq_n, 1.0)
            # Pass 2's stores must be visible to every thread of the program before they
            # are read back (the compiler does not promise the same element-to-thread map).
            tl.debug_barrier()
            for start in range(0, T, BLOCK_T):
                offs = start + cols
                in_row = offs < T
                valid = (tl.load(mask_ptr + base + offs, mask=in_row, other=0) != 0) & in_row
                g = tl.load(grad_ptr + base + offs, mask=in_row, other=0.0)
                tl.store(grad_ptr + base + offs, g + tl.where(valid, shared, 0.0), mask=in_row)

        out = stats_ptr + row * N_STAT
        tl.store(out + 0, loss_sum)
        tl.store(out + 1, count)
        tl.store(out + 2, clip_low)
        tl.store(out + 3, clip_high)
        tl.store(out + 4, ratio_sum)
        tl.store(out + 5, ratio_max)
        tl.store(out + 6, approx_kl)
        tl.store(out + 7, ref_kl)
        tl.store(out + 8, entropy_sum)
        tl.store(out + 9, dual_count)

    @triton.jit
    def _value_loss_fwd_kernel(
        v_ptr,
        old_ptr,
        ret_ptr,
        mask_ptr,
        grad_ptr,
        stats_ptr,
        T,
        clip_eps,
        HAS_CLIP: tl.constexpr,
        NEED_GRAD: tl.constexpr,
        ACC_DTYPE: tl.constexpr,
        BLOCK_T: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        base = row * T
        cols = tl.arange(0, BLOCK_T)
        loss_sum = tl.zeros([], ACC_DTYPE)
        count = tl.zeros([], ACC_DTYPE)
        clipped = tl.zeros([], ACC_DTYPE)
        for start in range(0, T, BLOCK_T):
            offs = start + cols
            in_row = offs < T
            valid = (tl.load(mask_ptr + base + offs, mask=in_row, other=0) != 0) & in_row
            v = _load_row(v_ptr + base, offs, in_row, valid, ACC_DTYPE)
            ret = _load_row(ret_ptr + base, offs, in_row, valid, ACC_DTYPE)
            err = v - ret
            loss = 0.5 * err * err
            grad = err
            if HAS_CLIP:
                old = _load_row(old_ptr + base, offs, in_row, valid, ACC_DTYPE)
                v_clip = tl.maximum(v, old - clip_eps, propagate_nan=tl.PropagateNan.ALL)
                v_clip = tl.minimum(v_clip, old + clip_eps, propagate_nan=tl.PropagateNan.ALL)
                inside = (v >= old - clip_eps) & (v <= old + clip_eps)
                err_clip = v_clip - ret
                loss_clip = 0.5 * err_clip * err_clip
                d_clip = tl.where(inside, err_clip, 0.0)
                # max() passes the gradient to the larger operand, half to each on a tie
                grad = tl.where(loss > loss_clip, grad, tl.where(loss_clip > loss, d_clip, 0.5 * (grad + d_clip)))
                clipped += tl.sum((valid & (loss_clip > loss)).to(ACC_DTYPE), axis=0)
                loss = tl.maximum(loss, loss_clip, propagate_nan=tl.PropagateNan.ALL)
            loss_sum += tl.sum(tl.where(valid, loss, 0.0), axis=0)
            count += tl.sum(valid.to(ACC_DTYPE), axis=0)
            if NEED_GRAD:
                tl.store(grad_ptr + base + offs, tl.where(valid, grad, 0.0), mask=in_row)
        tl.store(stats_ptr + row * 3 + 0, loss_sum)
        tl.store(stats_ptr + row * 3 + 1, count)
        tl.store(stats_ptr + row * 3 + 2, clipped)


def _block_t(T: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_T, num_warps): the interpreter (CPU tensors) prefers one block per row."""
    if device.type != "cuda":
        return max(16, triton.next_power_of_2(max(T, 1))), 1
    block = max(128, min(triton.next_power_of_2(max(T, 1)), 2048))
    return block, 8 if block >= 2048 else 4


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _mask_for_kernel(mask: torch.Tensor) -> torch.Tensor:
    """Triton reads bool tensors as bytes; the view costs nothing."""
    mask = mask.contiguous()
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


# ------------------------------------------------------------------------ KL penalty


def _kl_torch(d: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d * d
    if kind == "k3":
        return torch.exp(-d) + d - 1.0
    if kind == "abs":
        return d.abs()
    clamped = d.clamp(-20.0, 20.0)
    return (torch.exp(-clamped) + clamped - 1.0).clamp(-10.0, 10.0)


class _KLPenalty(torch.autograd.Function):
    """Triton forward writes the estimate and its derivative; the backward scales it."""

    @staticmethod
    @on_tensor_device
    def forward(ctx, logprobs, ref_logprobs, kind_id, need_grad):
        acc = _acc_dtype(torch.promote_types(logprobs.dtype, ref_logprobs.dtype))
        lp = logprobs.contiguous().view(-1)
        ref = ref_logprobs.contiguous().view(-1)
        kl = torch.empty(lp.numel(), dtype=acc, device=lp.device)
        dkl = torch.empty_like(kl) if need_grad else kl
        if lp.numel():
            block = 1024
            _kl_penalty_kernel[(triton.cdiv(lp.numel(), block),)](
                lp, ref, kl, dkl, lp.numel(),
                KL_KIND=kind_id, NEED_GRAD=need_grad, ACC_DTYPE=_tl_acc(acc), BLOCK=block,
            )
        ctx.set_materialize_grads(False)
        ctx.dtypes = (logprobs.dtype, ref_logprobs.dtype)
        if need_grad:
            ctx.save_for_backward(dkl)
        return kl.view(logprobs.shape)

    @staticmethod
    def backward(ctx, grad_kl):
        if grad_kl is None:
            return None, None, None, None
        (dkl,) = ctx.saved_tensors
        g = grad_kl.reshape(-1) * dkl
        grad_lp = g.view(grad_kl.shape).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        grad_ref = (-g).view(grad_kl.shape).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return grad_lp, grad_ref, None, None


def _check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(repr(c) for c in choices)}")


def kl_penalty(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    kind: str = "k3",
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Per-token KL estimate between the policy and the reference, ``d = lp - lp_ref``.

    Args:
        logprobs: log-probs of the sampled tokens under the policy, any shape, float.
        ref_logprobs: the same tokens under the reference model, same shape.
        kind: ``"k1"`` (``d``; TRL PPO/RLOO, verl ``kl``), ``"k2"`` (``0.5*d**2``; verl
            ``mse``), ``"k3"`` (``exp(-d) + d - 1``, unclamped; TRL GRPO), ``"abs"``
            (``|d|``; verl), ``"low_var_kl"`` (k3 with ``d`` clamped to [-20, 20] and the
            result to [-10, 10]; verl).
        backend: ``"triton"``, ``"torch"`` or None (automatic; see fastpo.kernels).

    Returns:
        float32 tensor of ``logprobs.shape`` (float64 if an input is float64),
        differentiable with respect to both inputs (``abs`` has derivative 0 at d = 0,
        the clamps of ``low_var_kl`` pass no gradient outside their range).
    """
    check_tensor("logprobs", logprobs, FLOAT_DTYPES)
    check_tensor("ref_logprobs", ref_logprobs, FLOAT_DTYPES)
    check_same_device(logprobs=logprobs, ref_logprobs=ref_logprobs)
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"ref_logprobs.shape {tuple(ref_logprobs.shape)} does not match logprobs.shape {tuple(logprobs.shape)}"
        )
    _check_choice("kind", kind, KL_KINDS)
    backend = resolve_backend(backend, logprobs.device, "kl_penalty")
    if backend == "torch":
        acc = _acc_dtype(torch.promote_types(logprobs.dtype, ref_logprobs.dtype))
        return _kl_torch(logprobs.to(acc) - ref_logprobs.to(acc), kind)
    need_grad = torch.is_grad_enabled() and (logprobs.requires_grad or ref_logprobs.requires_grad)
    return _KLPenalty.apply(logprobs, ref_logprobs, _KL_KIND_ID[kind], need_grad)


# ---------------------------------------------------------------------- aggregation


def _row_scale(agg: str, counts: torch.Tensor, num_items, max_len) -> torch.Tensor:
    """Weight ``c_i`` of each row's loss sum, so that ``loss = sum_i c_i * rowsum_i``."""
    batch = counts.shape[0]
    if agg == "token-mean":
        if num_items is None:
            total = counts.sum()
        else:
            total = torch.as_tensor(num_items, device=counts.device).detach().to(counts.dtype).reshape(())
        return (1.0 / total.clamp(min=1.0)).expand(batch)
    if agg == "seq-mean-token-mean":
        return 1.0 / (max(batch, 1) * counts.clamp(min=1.0))
    if agg == "seq-mean-token-sum":
        return torch.full_like(counts, 1.0 / max(batch, 1))
    return torch.full_like(counts, 1.0 / (max(batch, 1) * max_len))


def _metrics(stats: torch.Tensor, has_ref: bool, has_entropy: bool, has_dual: bool) -> dict:
    """Masked means over this call's valid tokens, as 0-dim tensors (no host sync)."""
    sums = stats.sum(0)
    n = sums[_COUNT].clamp(min=1.0)
    any_valid = sums[_COUNT] > 0
    ratio_max = stats[:, _RATIO_MAX].amax() if stats.shape[0] else sums[_RATIO_MAX]
    metrics = {
        "clip_frac_low": sums[_CLIP_LOW] / n,
        "clip_frac_high": sums[_CLIP_HIGH] / n,
        "ratio_mean": sums[_RATIO_SUM] / n,
        "ratio_max": torch.where(any_valid, ratio_max, torch.zeros_like(ratio_max)),
        "approx_kl": sums[_APPROX_KL] / n,
    }
    if has_dual:
        metrics["dual_clip_frac"] = sums[_DUAL_CLIP] / n
    if has_ref:
        metrics["ref_kl"] = sums[_REF_KL] / n
    if has_entropy:
        metrics["entropy_mean"] = sums[_ENTROPY] / n
    return metrics


class _ScaledRowLoss(torch.autograd.Function):
    """``loss = sum_i c_i * rowsum_i`` with the per-token gradient precomputed by the
    forward kernel: the backward only scales it by ``grad_output * c_i``."""

    @staticmethod
    def forward(ctx, logprobs, entropy, row_loss, row_scale, token_grad, mask, entropy_coef):
        ctx.set_materialize_grads(False)
        ctx.entropy_coef = entropy_coef
        ctx.dtypes = (logprobs.dtype, None if entropy is None else entropy.dtype)
        ctx.save_for_backward(row_scale, token_grad, mask)
        return (row_scale * row_loss).sum()

    @staticmethod
    def backward(ctx, grad_loss):
        if grad_loss is None:
            return (None,) * 7
        row_scale, token_grad, mask = ctx.saved_tensors
        per_row = (grad_loss * row_scale).unsqueeze(-1)
        grad_lp = grad_ent = None
        if ctx.needs_input_grad[0]:
            grad_lp = (token_grad * per_row).to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            grad_ent = ((mask != 0) * (-ctx.entropy_coef * per_row)).to(ctx.dtypes[1])
        return grad_lp, grad_ent, None, None, None, None, None


# --------------------------------------------------------------------- policy loss


def _entropy_threshold(entropy: torch.Tensor, valid: torch.Tensor, quantile: float) -> torch.Tensor:
    """``torch.quantile`` (linear interpolation) of the valid entropies, without the host
    sync that boolean indexing would need: invalid entries sort last as +inf."""
    if entropy.numel() == 0:
        return entropy.new_zeros((), dtype=_acc_dtype(entropy.dtype))
    flat = entropy.detach().to(_acc_dtype(entropy.dtype)).masked_fill(~valid, float("inf")).reshape(-1)
    ordered = flat.sort().values
    n = valid.sum().to(torch.float64)
    position = (quantile * (n - 1.0)).clamp(min=0.0)
    below = position.floor()
    low = ordered[below.long().reshape(1)]
    high = ordered[position.ceil().long().reshape(1)]
    # the weight is 0 when the position falls on an element: the threshold is then
    # exactly that element, so the >= comparison keeps it
    weight = (position - below).to(ordered.dtype)
    return torch.where(weight > 0, low + weight * (high - low), low).reshape(())


def _policy_loss_torch(lp, old, adv, valid, ref, entropy, rollout, ent_threshold, opts):
    """Eager composition of the per-token formulas; returns (row loss sums, stats)."""
    acc = _acc_dtype(lp.dtype)
    zero = torch.zeros((), dtype=acc, device=lp.device)
    m = valid.to(acc)
    # Masked positions are zeroed first so that padding holding inf or NaN cannot
    # leak into the values or (through 0 * inf) into the gradients.
    lp = torch.where(valid, lp.to(acc), zero)
    old = torch.where(valid, old.detach().to(acc), zero)
    adv = adv.detach().to(acc)
    adv = torch.where(valid, adv.unsqueeze(-1) if adv.dim() == 1 else adv, zero)
    log_ratio = lp - old
    token_ratio = log_ratio.exp()
    n = m.sum(-1, keepdim=True)
    if opts["seq_ratio"]:
        ratio = (log_ratio.sum(-1, keepdim=True) / n.clamp(min=1.0)).exp().expand(lp.shape)
    else:
        ratio = token_ratio

    no_hit = torch.zeros_like(valid)
    low_hit = high_hit = dual_hit = no_hit
    kind = opts["loss_kind"]
    if kind == _PPO:
        lo, hi = 1.0 - opts["eps_low"], 1.0 + opts["eps_high"]
        unclipped = ratio.clamp(max=opts["delta"]) if opts["delta"] is not None else ratio
        policy = -torch.minimum(unclipped * adv, ratio.clamp(lo, hi) * adv)
        if opts["dual_clip"] is not None:
            bound = -opts["dual_clip"] * adv
            dual_hit = valid & (adv < 0) & (bound < policy)
            policy = torch.where(adv < 0, torch.minimum(policy, bound), policy)
        low_hit = valid & (ratio < lo) & (adv < 0)
        high_hit = valid & (ratio > hi) & (adv > 0)
    elif kind == _CISPO:
        capped = ratio.clamp(max=opts["cispo_cap"]).detach()
        policy = -capped * adv * lp
        high_hit = valid & (ratio > opts["cispo_cap"]) & (adv > 0)
    else:
        tau = torch.where(adv > 0, opts["tau_pos"], opts["tau_neg"]).to(acc)
        policy = -torch.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau * adv

    weight = m
    if ent_threshold is not None:
        weight = weight * (entropy.detach().to(acc) >= ent_threshold)
    if opts["tis"] is not None:
        roll = torch.where(valid, rollout.detach().to(acc), zero)
        log_tis = old - roll
        if opts["tis"] == "sequence":
            log_tis = log_tis.sum(-1, keepdim=True)
        weight = weight * log_tis.clamp(max=opts["log_tis_cap"]).exp()
    token_loss = policy * weight

    ref_kl = zero.expand(lp.shape)
    if ref is not None:
        ref = torch.where(valid, ref.detach().to(acc), zero)
        ref_kl = torch.where(valid, _kl_torch(lp - ref, opts["kl_kind"]), zero)
        if opts["kl_coef"] != 0:
            token_loss = token_loss + opts["kl_coef"] * ref_kl
    ent = zero.expand(lp.shape)
    if entropy is not None:
        ent = torch.where(valid, entropy.to(acc), zero)
        token_loss = token_loss - opts["entropy_coef"] * ent

    row_loss = torch.where(valid, token_loss, zero).sum(-1)
    with torch.no_grad():
        masked_ratio = torch.where(valid, ratio, float("-inf"))
        ratio_max = masked_ratio.amax(-1) if lp.shape[-1] else masked_ratio.new_full(lp.shape[:1], -math.inf)
        columns = [
            row_loss,
            n.squeeze(-1),
            low_hit.sum(-1),
            high_hit.sum(-1),
            torch.where(valid, ratio, zero).sum(-1),
            ratio_max,
            torch.where(valid, token_ratio - 1.0 - log_ratio, zero).sum(-1),
            ref_kl.sum(-1),
            ent.sum(-1),
            dual_hit.sum(-1),
        ]
        stats = torch.stack([c.to(acc) for c in columns], dim=-1)
    return row_loss, stats


@on_tensor_device
def _policy_loss_triton(lp, old, adv, mask, ref, entropy, rollout, ent_threshold, opts, need_grad):
    B, T = lp.shape
    acc = _acc_dtype(lp.dtype)
    lp_c = lp.detach().contiguous()
    stats = torch.empty((B, N_STATS), dtype=acc, device=lp.device)
    grad = torch.empty((B, T), dtype=acc, device=lp.device) if need_grad else stats
    adv = adv.detach()
    adv_view = adv.unsqueeze(-1).expand(B, T) if adv.dim() == 1 else adv
    if B:
        block, num_warps = _block_t(T, lp.device)
        _policy_loss_fwd_kernel[(B,)](
            lp_c,
            old.detach().contiguous(),
            adv_view,
            _mask_for_kernel(mask),
            lp_c if ref is None else ref.detach().contiguous(),
            lp_c if entropy is None else entropy.detach().contiguous(),
            lp_c if rollout is None else rollout.detach().contiguous(),
            stats if ent_threshold is None else ent_threshold,
            grad,
            stats,
            T,
            adv_view.stride(0),
            adv_view.stride(1),
            1.0 - opts["eps_low"],
            1.0 + opts["eps_high"],
            opts["delta"] if opts["delta"] is not None else 0.0,
            opts["dual_clip"] if opts["dual_clip"] is not None else 0.0,
            opts["cispo_cap"],
            opts["tau_pos"],
            opts["tau_neg"],
            opts["kl_coef"],
            opts["entropy_coef"],
            opts["log_tis_cap"],
            LOSS_KIND=opts["loss_kind"],
            SEQ_RATIO=opts["seq_ratio"],
            HAS_DELTA=opts["delta"] is not None,
            HAS_DUAL=opts["dual_clip"] is not None,
            KL_KIND=0 if ref is None else _KL_KIND_ID[opts["kl_kind"]],
            KL_IN_LOSS=opts["kl_coef"] != 0,
            HAS_ENTROPY=entropy is not None,
            ENTROPY_MASK=ent_threshold is not None,
            TIS_KIND=_TIS_ID[opts["tis"]],
            NEED_GRAD=need_grad,
            ACC_DTYPE=_tl_acc(acc),
            N_STAT=N_STATS,
            BLOCK_T=block,
            num_warps=num_warps,
        )
    return stats, (grad if need_grad else None)


def _finite_scalar(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def _check_btensor(name: str, value, shape: tuple, dtypes=FLOAT_DTYPES) -> None:
    check_tensor(name, value, dtypes)
    if tuple(value.shape) != shape:
        raise ValueError(f"{name}.shape {tuple(value.shape)} does not match logprobs.shape {shape}")


MASK_DTYPES = (torch.bool, torch.uint8) + FLOAT_DTYPES + INDEX_DTYPES


def _check_count(name: str, value, *, allow_zero: bool):
    """An int (or, for num_items, a one-element tensor: a global count from all_reduce)."""
    if isinstance(value, torch.Tensor) and name == "num_items":
        if value.numel() != 1:
            raise ValueError(f"num_items must hold one element, got shape {tuple(value.shape)}")
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return value


def _check_aggregation_counts(agg: str, num_items, max_len, device: torch.device, max_len_hint: str = ""):
    """``(num_items, max_len)`` checked against the aggregation mode that uses each:
    ``num_items`` (a global token count) for token-mean only, ``max_len`` required by
    seq-mean-token-sum-norm and refused elsewhere."""
    if num_items is not None:
        if agg != "token-mean":
            raise ValueError(f"num_items applies to agg='token-mean' only, not {agg!r}")
        num_items = _check_count("num_items", num_items, allow_zero=True)
        if isinstance(num_items, torch.Tensor) and num_items.device != device:
            num_items = num_items.to(device)
    if agg == "seq-mean-token-sum-norm":
        if max_len is None:
            raise ValueError(f"agg='seq-mean-token-sum-norm'{max_len_hint} needs max_len")
        max_len = _check_count("max_len", max_len, allow_zero=False)
    elif max_len is not None:
        raise ValueError(f"max_len applies to agg='seq-mean-token-sum-norm' only, not {agg!r}")
    return num_items, max_len


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: str = "grpo",
    clip_eps_low: float = 0.2,
    clip_eps_high: float | None = None,
    delta: float | None = None,
    dual_clip: float | None = None,
    importance_level: str = "token",
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_kind: str = "k3",
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    entropy_quantile: float | None = None,
    rollout_logprobs: torch.Tensor | None = None,
    rollout_is: str = "token",
    rollout_is_cap: float | None = None,
    agg: str | None = None,
    num_items: int | torch.Tensor | None = None,
    max_len: int | None = None,
    sapo_tau_pos: float = 1.0,
    sapo_tau_neg: float = 1.05,
    backend: str | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped-surrogate policy loss of the PPO/GRPO family, fused with its KL, entropy
    and rollout-correction terms and its aggregation.

    Per token (``r = exp(lp - lp_old)``, or GSPO's one ratio per sequence
    ``s_i = exp(sum_t m*(lp - lp_old) / max(1, n_i))``):

    * PPO clip (``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``, ``gspo``):
      ``L = -min(r*A, clip(r, 1 - clip_eps_low, 1 + clip_eps_high)*A)``;
    * ``cispo``: ``L = -stopgrad(min(r, clip_eps_high)) * A * lp``;
    * ``sapo``: ``L = -sigmoid(tau*(r - 1)) * 4/tau * A``, ``tau = sapo_tau_pos`` if
      ``A > 0`` else ``sapo_tau_neg``;

    then ``L *= entropy_mask * tis_weight`` (policy term only), ``L += kl_coef * KL``,
    ``L -= entropy_coef * H``, and the aggregation ``agg`` over the valid tokens.

    Args:
        logprobs: (B, T) log-probs of the sampled tokens under the current policy. The
            loss is differentiable with respect to it.
        old_logprobs: (B, T) log-probs under the policy that sampled the rollouts.
        advantages: (B,) one per sequence, or (B, T) one per token.
        mask: (B, T); nonzero marks a valid token. Masked positions may hold anything
            (even inf or NaN) in every other input; they contribute nothing.
        loss_type: ``"grpo"``, ``"bnpo"``, ``"dr_grpo"``, ``"dapo"``, ``"cispo"``,
            ``"sapo"`` or ``"gspo"``; the clip form and the default aggregation of TRL's
            GRPOTrainer (see ``PRESET_AGG``). ``gspo`` is the PPO clip with
            ``importance_level="sequence"`` (it overrides ``importance_level``).
        clip_eps_low, clip_eps_high: clip range ``[1 - low, 1 + high]``;
            ``clip_eps_high=None`` means ``clip_eps_low``. For ``cispo``,
            ``clip_eps_high`` is the absolute cap on the ratio (TRL's ``epsilon_high``,
            ScaleRL's ``eps_max``, typically 5.0), NOT ``1 + eps``; with None it is
            ``clip_eps_low``, exactly as in TRL.
        delta: two-sided clipping (TRL): the unclipped ratio is clamped to at most
            ``delta`` before the product. PPO-clip loss types only.
        dual_clip: ``c > 1``; for ``A < 0``, ``L = min(L, -c*A)`` (verl, OpenRLHF).
            PPO-clip loss types only.
        importance_level: ``"token"`` or ``"sequence"`` (GSPO's ratio), any loss type.
        ref_logprobs: (B, T) reference log-probs; needed when ``kl_coef != 0``; when
            given, ``metrics["ref_kl"]`` is reported even with ``kl_coef=0``.
        kl_coef: ``beta``; ``beta * KL_t`` is added per token before aggregation (TRL).
        kl_kind: estimator, as in ``kl_penalty`` (default k3, TRL GRPO).
        entropy: (B, T) per-token entropy, needed by ``entropy_coef`` and
            ``entropy_quantile``; the loss is differentiable with respect to it
            through the bonus only.
        entropy_coef: entropy bonus: ``-entropy_coef * H_t`` is added per token and
            aggregated like the loss (verl), so it is ``-coef * mean(H)`` under the
            aggregation's mean.
        entropy_quantile: ``q`` in [0, 1]: only tokens whose (detached) entropy is
            ``>= torch.quantile(valid entropies, q)`` contribute to the policy term, the
            top ``1 - q`` fraction: TRL's ``top_entropy_quantile`` is ``1 - q``. The
            quantile is over this call's valid tokens (TRL gathers it across processes
            first).
        rollout_logprobs: (B, T) log-probs from the inference engine that produced the
            rollouts, for truncated importance sampling (TIS): the policy term is
            multiplied by ``min(exp(lp_old - lp_rollout), rollout_is_cap)`` (detached).
        rollout_is: ``"token"`` (per-token weight, TRL/verl token TIS) or ``"sequence"``
            (``exp(sum_t m*(lp_old - lp_rollout))``, one weight per sequence, verl).
        rollout_is_cap: ``C > 0``; None means no truncation.
        agg: override of the preset's aggregation: ``"token-mean"``,
            ``"seq-mean-token-mean"``, ``"seq-mean-token-sum"`` or
            ``"seq-mean-token-sum-norm"``.
        num_items: for ``token-mean`` only: the global number of valid tokens of the
            whole optimizer step (an int, or a one-element tensor to avoid a host sync).
            None uses this call's count. With it, summing the gradients of every
            micro-batch and rank gives the whole batch's gradient: no extra factor
            (under DDP, which averages over ranks, multiply the loss by the world size,
            or pass ``num_items / world_size`` as TRL does).
        max_len: for ``seq-mean-token-sum-norm`` (``dr_grpo``), required: the constant
            length normalizer (TRL's ``max_completion_length``).
        sapo_tau_pos, sapo_tau_neg: SAPO temperatures (TRL defaults 1.0, 1.05).
        backend: ``"triton"``, ``"torch"`` or None (automatic; see fastpo.kernels).

    Gradient accumulation over ``k`` micro-batches: ``token-mean`` with ``num_items``
    needs no factor; every per-micro-batch mode (the ``seq-mean-*`` modes, and
    ``token-mean`` without ``num_items``) must be divided by ``k`` by the caller, as
    TRL divides by ``gradient_accumulation_steps``. With equal-size micro-batches the
    gradient then equals the whole batch's (for ``token-mean`` without ``num_items``
    only when every micro-batch has the same number of valid tokens).

    Returns:
        ``(loss, metrics)``: the 0-dim loss (float32, float64 for float64 logprobs) and
        a dict of 0-dim tensors over this call's valid tokens, computed without any
        host sync: ``clip_frac_low`` (``r < 1-eps_low`` and ``A < 0``),
        ``clip_frac_high`` (``r > 1+eps_high`` and ``A > 0``; for cispo ``r > cap`` and
        ``A > 0``; both 0 for sapo), ``ratio_mean``, ``ratio_max`` (of the ratio the
        loss uses), ``approx_kl`` (``mean(r - 1 - log r)`` with the token ratio, an
        estimate of KL(old || current)), plus ``dual_clip_frac`` with ``dual_clip``,
        ``ref_kl`` with ``ref_logprobs`` and ``entropy_mean`` with ``entropy``.
        A mask with no valid token gives loss 0, zero gradients and zero metrics.
    """
    check_tensor("logprobs", logprobs, FLOAT_DTYPES)
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be (B, T), got shape {tuple(logprobs.shape)}")
    shape = tuple(logprobs.shape)
    _check_btensor("old_logprobs", old_logprobs, shape)
    _check_btensor("mask", mask, shape, MASK_DTYPES)
    check_tensor("advantages", advantages, FLOAT_DTYPES)
    if tuple(advantages.shape) not in (shape[:1], shape):
        raise ValueError(
            f"advantages.shape {tuple(advantages.shape)} must be (B,) = {shape[:1]} or (B, T) = {shape}"
        )
    for name, value in (("ref_logprobs", ref_logprobs), ("entropy", entropy), ("rollout_logprobs", rollout_logprobs)):
        if value is not None:
            _check_btensor(name, value, shape)
    check_same_device(
        logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask,
        ref_logprobs=ref_logprobs, entropy=entropy, rollout_logprobs=rollout_logprobs,
    )
    _check_choice("loss_type", loss_type, LOSS_TYPES)
    _check_choice("importance_level", importance_level, IMPORTANCE_LEVELS)
    _check_choice("kl_kind", kl_kind, KL_KINDS)
    _check_choice("rollout_is", rollout_is, ROLLOUT_IS_LEVELS)
    if agg is not None:
        _check_choice("agg", agg, AGG_MODES)
    agg = agg or PRESET_AGG[loss_type]

    eps_low = positive_scalar("clip_eps_low", clip_eps_low)
    eps_high = eps_low if clip_eps_high is None else positive_scalar("clip_eps_high", clip_eps_high)
    loss_kind = _LOSS_KIND_ID.get(loss_type, _PPO)
    if loss_kind != _PPO:
        for name, value in (("delta", delta), ("dual_clip", dual_clip)):
            if value is not None:
                raise ValueError(
                    f"{name}={value!r} applies to the PPO-clip loss types only, not loss_type={loss_type!r}"
                )
    if delta is not None:
        delta = positive_scalar("delta", delta)
    if dual_clip is not None:
        dual_clip = positive_scalar("dual_clip", dual_clip)
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip!r}")
    kl_coef = _finite_scalar("kl_coef", kl_coef)
    if kl_coef != 0 and ref_logprobs is None:
        raise ValueError(f"kl_coef={kl_coef!r} needs ref_logprobs")
    entropy_coef = _finite_scalar("entropy_coef", entropy_coef)
    if entropy_coef != 0 and entropy is None:
        raise ValueError(f"entropy_coef={entropy_coef!r} needs entropy")
    if entropy_quantile is not None:
        entropy_quantile = _finite_scalar("entropy_quantile", entropy_quantile)
        if not 0.0 <= entropy_quantile <= 1.0:
            raise ValueError(f"entropy_quantile must be in [0, 1], got {entropy_quantile!r}")
        if entropy is None:
            raise ValueError(f"entropy_quantile={entropy_quantile!r} needs entropy")
    if rollout_is_cap is not None:
        rollout_is_cap = positive_scalar("rollout_is_cap", rollout_is_cap)
        if rollout_logprobs is None:
            raise ValueError(f"rollout_is_cap={rollout_is_cap!r} needs rollout_logprobs")
    tau_pos = positive_scalar("sapo_tau_pos", sapo_tau_pos)
    tau_neg = positive_scalar("sapo_tau_neg", sapo_tau_neg)
    num_items, max_len = _check_aggregation_counts(
        agg, num_items, max_len, logprobs.device, " (loss_type='dr_grpo')"
    )
    backend = resolve_backend(backend, logprobs.device, "policy_loss")

    opts = {
        "loss_kind": loss_kind,
        "seq_ratio": loss_type == "gspo" or importance_level == "sequence",
        "eps_low": eps_low,
        "eps_high": eps_high,
        "delta": delta,
        "dual_clip": dual_clip,
        "cispo_cap": eps_high,
        "tau_pos": tau_pos,
        "tau_neg": tau_neg,
        "kl_kind": kl_kind,
        "kl_coef": kl_coef,
        "entropy_coef": entropy_coef,
        "tis": None if rollout_logprobs is None else rollout_is,
        "log_tis_cap": math.log(rollout_is_cap) if rollout_is_cap is not None else math.inf,
    }
    valid = mask != 0
    ent_threshold = None if entropy_quantile is None else _entropy_threshold(entropy, valid, entropy_quantile)

    if backend == "torch":
        row_loss, stats = _policy_loss_torch(
            logprobs, old_logprobs, advantages, valid, ref_logprobs, entropy, rollout_logprobs, ent_threshold, opts
        )
        loss = (_row_scale(agg, stats[:, _COUNT], num_items, max_len) * row_loss).sum()
    else:
        need_grad = torch.is_grad_enabled() and logprobs.requires_grad
        stats, token_grad = _policy_loss_triton(
            logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, rollout_logprobs, ent_threshold,
            opts, need_grad,
        )
        row_scale = _row_scale(agg, stats[:, _COUNT], num_items, max_len)
        loss = _ScaledRowLoss.apply(
            logprobs, entropy, stats[:, _LOSS], row_scale, token_grad, mask, entropy_coef
        )
    metrics = _metrics(stats, ref_logprobs is not None, entropy is not None, dual_clip is not None)
    return loss, metrics


# ----------------------------------------------------------------------- value loss


class _ScaledValueLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, row_loss, row_scale, token_grad):
        ctx.set_materialize_grads(False)
        ctx.dtype = values.dtype
        ctx.save_for_backward(row_scale, token_grad)
        return (row_scale * row_loss).sum()

    @staticmethod
    def backward(ctx, grad_loss):
        if grad_loss is None or not ctx.needs_input_grad[0]:
            return None, None, None, None
        row_scale, token_grad = ctx.saved_tensors
        return (token_grad * (grad_loss * row_scale).unsqueeze(-1)).to(ctx.dtype), None, None, None


@on_tensor_device
def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float | None = 0.2,
    agg: str = "token-mean",
    num_items: int | torch.Tensor | None = None,
    max_len: int | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO critic loss ``0.5 * max((V - R)**2, (clip(V, V_old - eps, V_old + eps) - R)**2)``
    per token (verl, OpenRLHF, TRL PPO), aggregated like the policy loss.

    Args:
        values: (B, T) current value predictions; the loss is differentiable w.r.t. it.
        old_values: (B, T) predictions of the critic that produced the rollouts.
        returns: (B, T) targets R.
        mask: (B, T); nonzero marks a valid token.
        clip_eps: ``eps > 0``; None disables clipping (``0.5 * (V - R)**2``).
        agg: ``"token-mean"`` (default, verl), ``"seq-mean-token-mean"``,
            ``"seq-mean-token-sum"`` or ``"seq-mean-token-sum-norm"``.
        num_items: global valid-token count for ``token-mean``, as in ``policy_loss``.
        max_len: length normalizer, required by ``seq-mean-token-sum-norm``.
        backend: ``"triton"``, ``"torch"`` or None (automatic; see fastpo.kernels).

    Returns:
        ``(loss, metrics)`` with ``metrics["clip_frac"]``: the fraction of valid tokens
        whose clipped error is the larger one (verl's ``vf_clipfrac``).
    """
    check_tensor("values", values, FLOAT_DTYPES)
    if values.dim() != 2:
        raise ValueError(f"values must be (B, T), got shape {tuple(values.shape)}")
    shape = tuple(values.shape)
    for name, value in (("old_values", old_values), ("returns", returns)):
        check_tensor(name, value, FLOAT_DTYPES)
        if tuple(value.shape) != shape:
            raise ValueError(f"{name}.shape {tuple(value.shape)} does not match values.shape {shape}")
    check_tensor("mask", mask, MASK_DTYPES)
    if tuple(mask.shape) != shape:
        raise ValueError(f"mask.shape {tuple(mask.shape)} does not match values.shape {shape}")
    check_same_device(values=values, old_values=old_values, returns=returns, mask=mask)
    _check_choice("agg", agg, AGG_MODES)
    if clip_eps is not None:
        clip_eps = positive_scalar("clip_eps", clip_eps)
    num_items, max_len = _check_aggregation_counts(agg, num_items, max_len, values.device)
    backend = resolve_backend(backend, values.device, "value_loss")

    acc = _acc_dtype(values.dtype)
    valid = mask != 0
    if backend == "torch":
        zero = torch.zeros((), dtype=acc, device=values.device)
        v = torch.where(valid, values.to(acc), zero)
        ret = torch.where(valid, returns.detach().to(acc), zero)
        loss_tok = 0.5 * (v - ret) ** 2
        clipped = torch.zeros_like(valid)
        if clip_eps is not None:
            old = torch.where(valid, old_values.detach().to(acc), zero)
            loss_clip = 0.5 * (v.clamp(old - clip_eps, old + clip_eps) - ret) ** 2
            clipped = valid & (loss_clip > loss_tok)
            loss_tok = torch.maximum(loss_tok, loss_clip)
        row_loss = torch.where(valid, loss_tok, zero).sum(-1)
        counts = valid.sum(-1).to(acc)
        clipped_rows = clipped.sum(-1).to(acc)
        loss = (_row_scale(agg, counts, num_items, max_len) * row_loss).sum()
    else:
        B, T = shape
        need_grad = torch.is_grad_enabled() and values.requires_grad
        stats = torch.empty((B, _VALUE_STATS), dtype=acc, device=values.device)
        grad = torch.empty(shape, dtype=acc, device=values.device) if need_grad else stats
        if B:
            block, num_warps = _block_t(T, values.device)
            _value_loss_fwd_kernel[(B,)](
                values.detach().contiguous(),
                old_values.detach().contiguous(),
                returns.detach().contiguous(),
                _mask_for_kernel(mask),
                grad,
                stats,
                T,
                clip_eps if clip_eps is not None else 0.0,
                HAS_CLIP=clip_eps is not None,
                NEED_GRAD=need_grad,
                ACC_DTYPE=_tl_acc(acc),
                BLOCK_T=block,
                num_warps=num_warps,
            )
        counts = stats[:, 1]
        clipped_rows = stats[:, 2]
        row_scale = _row_scale(agg, counts, num_items, max_len)
        loss = _ScaledValueLoss.apply(values, stats[:, 0], row_scale, grad if need_grad else None)
    metrics = {"clip_frac": clipped_rows.sum() / counts.sum().clamp(min=1.0)}
    return loss, metrics
