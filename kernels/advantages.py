"""Advantage estimators: GRPO group z-scores, RLOO, REINFORCE++ baseline, GAE, whitening.

The formulas are those of docs/conventions.md ("Advantages"); docs/advantages.md maps every
option to the peer (TRL, verl, OpenRLHF) it matches.

Rewards of a group-based estimator are a flat (n_groups * G,) tensor laid out group by
group: the G completions of prompt 0, then the G of prompt 1, ... The Triton kernels
run one program per group (group_advantages, rloo_advantages) and one per sequence for
GAE, which scans its row backward with scalar loads. Whitening and the batch-wide
reductions are single PyTorch reductions on both backends.

These ops usually run under ``torch.no_grad()``. When autograd must record (grad mode
on and an input that requires grad), the differentiable PyTorch composition runs
whatever the backend, so the graph is never cut silently.

Every estimator is registered once in ``ADVANTAGE_ESTIMATORS`` with its public function,
its torch reference and the mode id the group kernel switches on (None: a kernel of its
own, GAE).
"""

from __future__ import annotations

import functools
import math

import torch

from . import _native
from ._backend import dispatch
from ._launch import HAS_TRITON, acc_dtype, on_tensor_device, tl_acc_dtype
from ._validate import FLOAT_DTYPES, bool_mask, check_same_device, check_tensor, nonnegative_scalar
from .registry import Registry

if HAS_TRITON:
    import triton
    import triton.language as tl

SCALES = ("group", "batch", "none")

# How the Triton group kernel divides (R - group mean).
_DIVIDE_BY_GROUP_STD, _DIVIDE_BY_BATCH_STD, _NO_DIVISION, _LEAVE_ONE_OUT = 0, 1, 2, 3
_SCALE_MODES = {"group": _DIVIDE_BY_GROUP_STD, "batch": _DIVIDE_BY_BATCH_STD, "none": _NO_DIVISION}


# ------------------------------------------------------------------------ checks


def _check_group_size(group_size) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__} {group_size!r}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    return group_size


def _check_rewards(rewards, group_size: int) -> None:
    check_tensor("rewards", rewards, FLOAT_DTYPES)
    if rewards.dim() != 1:
        raise ValueError(
            f"rewards must be 1-D (n_groups * group_size,), laid out group by group; got shape "
            f"{tuple(rewards.shape)}"
        )
    if rewards.numel() % group_size:
        raise ValueError(
            f"group_size={group_size} does not divide the number of rewards ({rewards.numel()}): "
            f"rewards must hold whole groups"
        )


def _unit_interval(name: str, value) -> float:
    value = nonnegative_scalar(name, value)
    if value > 1:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return value


def _recording(*tensors: torch.Tensor) -> bool:
    """Whether autograd records these inputs (then the torch composition runs)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# --------------------------------------------------------------------------- Triton

if HAS_TRITON:

    @triton.jit
    def _group_advantages_kernel(
        rewards_ptr,
        out_ptr,
        batch_std_ptr,
        group_size,
        eps,
        MODE: tl.constexpr,
        UNBIASED: tl.constexpr,
        ACC_DTYPE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        FMAX: tl.constexpr = 3.4028234663852886e38
        group = tl.program_id(0).to(tl.int64)
        base = rewards_ptr + group * group_size
        out = out_ptr + group * group_size
        cols = tl.arange(0, BLOCK)

        total = tl.zeros([], ACC_DTYPE)
        lowest = tl.full([], FMAX, ACC_DTYPE)
        highest = tl.full([], -FMAX, ACC_DTYPE)
        for start in range(0, group_size, BLOCK):
            offs = start + cols
            inside = offs < group_size
            r = tl.load(base + offs, mask=inside, other=0.0).to(ACC_DTYPE)
            total += tl.sum(r, axis=0)
            lowest = tl.minimum(lowest, tl.min(tl.where(inside, r, FMAX), axis=0))
            highest = tl.maximum(highest, tl.max(tl.where(inside, r, -FMAX), axis=0))
        mean = total / group_size
        # All-equal rewards (this includes a group of one) give exactly 0, even where the
        # rounded mean differs from the rewards in the last bit.
        constant = lowest == highest

        if MODE == 0:  # group std, a second pass over the centered rewards
            squares = tl.zeros([], ACC_DTYPE)
            for start in range(0, group_size, BLOCK):
                offs = start + cols
                inside = offs < group_size
                r = tl.load(base + offs, mask=inside, other=0.0).to(ACC_DTYPE)
                centered = tl.where(inside, r - mean, 0.0)
                squares += tl.sum(centered * centered, axis=0)
            if UNBIASED:
                dof = tl.maximum(group_size - 1, 1)
            else:
                dof = group_size
            divisor = tl.sqrt(squares / dof) + eps
        elif MODE == 1:  # batch std, computed beforehand
            divisor = tl.load(batch_std_ptr).to(ACC_DTYPE) + eps
        elif MODE == 2:
            divisor = tl.full([], 1.0, ACC_DTYPE)
        elif MODE == 3:  # leave-one-out: G / (G - 1) * (R - mean)
            divisor = (group_size - 1) / tl.full([], group_size, ACC_DTYPE)
        else:
            tl.static_assert(False, "MODE is not a mode id of the group advantage kernel")
        zero = constant | (divisor == 0)

        for start in range(0, group_size, BLOCK):
            offs = start + cols
            inside = offs < group_size
            r = tl.load(base + offs, mask=inside, other=0.0).to(ACC_DTYPE)
            advantage = tl.where(zero, 0.0, (r - mean) / tl.where(zero, 1.0, divisor))
            tl.store(out + offs, advantage.to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _gae_kernel(
        rewards_ptr,
        values_ptr,
        mask_ptr,
        advantages_ptr,
        returns_ptr,
        n_steps,
        rewards_stride_row,
        rewards_stride_step,
        values_stride_row,
        values_stride_step,
        gamma,
        gamma_lam,
        ACC_DTYPE: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        rewards_row = rewards_ptr + row * rewards_stride_row
        values_row = values_ptr + row * values_stride_row
        mask_row = mask_ptr + row * n_steps
        out_offset = row * n_steps
        # Advantage and value of the next valid position; 0 after the last one.
        next_advantage = tl.zeros([], ACC_DTYPE)
        next_value = tl.zeros([], ACC_DTYPE)
        for i in range(0, n_steps):
            t = n_steps - 1 - i
            valid = tl.load(mask_row + t) != 0
            # Masked positions are not read: their rewards and values may be garbage.
            reward = tl.load(rewards_row + t * rewards_stride_step, mask=valid, other=0.0).to(ACC_DTYPE)
            value = tl.load(values_row + t * values_stride_step, mask=valid, other=0.0).to(ACC_DTYPE)
            advantage = reward + gamma * next_value - value + gamma_lam * next_advantage
            tl.store(advantages_ptr + out_offset + t, tl.where(valid, advantage, 0.0))
            tl.store(returns_ptr + out_offset + t, tl.where(valid, advantage + value, 0.0))
            next_advantage = tl.where(valid, advantage, next_advantage)
            next_value = tl.where(valid, value, next_value)


@on_tensor_device
def _triton_group(rewards, group_size, mode, unbiased, eps, batch_std):
    acc = acc_dtype(rewards)
    out = torch.empty(rewards.shape, dtype=acc, device=rewards.device)
    n_groups = rewards.numel() // group_size
    if n_groups:
        block = max(16, min(triton.next_power_of_2(group_size), 1024))
        _group_advantages_kernel[(n_groups,)](
            rewards.contiguous(), out, batch_std if batch_std is not None else out,
            group_size, eps,
            MODE=mode, UNBIASED=bool(unbiased),
            ACC_DTYPE=tl_acc_dtype(acc),
            BLOCK=block,
        )
    return out


@on_tensor_device
def _triton_gae(rewards, values, valid, gamma, lam):
    acc = acc_dtype(rewards, values)
    n_rows, n_steps = rewards.shape
    advantages = torch.empty((n_rows, n_steps), dtype=acc, device=rewards.device)
    returns = torch.empty_like(advantages)
    if advantages.numel():
        _gae_kernel[(n_rows,)](
            rewards, values, valid.contiguous().view(torch.uint8), advantages, returns,
            n_steps, rewards.stride(0), rewards.stride(1), values.stride(0), values.stride(1),
            gamma, gamma * lam,
            ACC_DTYPE=tl_acc_dtype(acc),
            num_warps=1,
        )
    return advantages, returns


# --------------------------------------------------------------------- pure PyTorch


def _centered_sum_of_squares(centered: torch.Tensor, dim=None):
    squares = centered * centered
    return squares.sum() if dim is None else squares.sum(dim)


def _safe_sqrt(x: torch.Tensor, use: torch.Tensor) -> torch.Tensor:
    """sqrt(x) where ``use``, 1 elsewhere: keeps sqrt'(0) = inf out of the backward."""
    return torch.where(use, x, 1.0).sqrt()


def _torch_group(rewards, group_size, mode, unbiased, eps, batch_std):
    acc = acc_dtype(rewards)
    groups = rewards.to(acc).view(-1, group_size)
    mean = groups.mean(dim=1, keepdim=True)
    centered = groups - mean
    constant = groups.amin(dim=1, keepdim=True) == groups.amax(dim=1, keepdim=True)
    if mode == _DIVIDE_BY_GROUP_STD:
        dof = max(group_size - 1, 1) if unbiased else group_size
        variance = _centered_sum_of_squares(centered, 1).unsqueeze(1) / dof
        divisor = _safe_sqrt(variance, ~constant) + eps
    elif mode == _DIVIDE_BY_BATCH_STD:
        divisor = batch_std + eps
    elif mode == _NO_DIVISION:
        divisor = torch.ones((), dtype=acc, device=rewards.device)
    else:
        divisor = torch.tensor((group_size - 1) / group_size, dtype=acc, device=rewards.device)
    zero = constant | (divisor == 0)
    advantages = torch.where(zero, 0.0, centered / torch.where(divisor == 0, 1.0, divisor))
    return advantages.reshape(-1)


def _batch_std(rewards: torch.Tensor, unbiased: bool) -> torch.Tensor:
    """Std of all rewards, 0 for fewer than two with Bessel's correction (no NaN)."""
    values = rewards.to(acc_dtype(rewards))
    n = values.numel()
    centered = values - values.mean() if n else values
    dof = max(n - 1, 1) if unbiased else max(n, 1)
    variance = _centered_sum_of_squares(centered) / dof
    positive = variance > 0
    return torch.where(positive, _safe_sqrt(variance, positive), 0.0)


def _torch_gae(rewards, values, valid, gamma, lam):
    acc = acc_dtype(rewards, values)
    n_rows, n_steps = rewards.shape
    if n_steps == 0:
        empty = torch.zeros((n_rows, 0), dtype=acc, device=rewards.device)
        return empty, empty.clone()
    # Masked positions may hold garbage rewards or values: where() drops them.
    rewards = torch.where(valid, rewards.to(acc), 0.0)
    values = torch.where(valid, values.to(acc), 0.0)
    # V[t_{i+1}] for every position at once: the first valid position after t, by a
    # reversed running minimum of the valid positions (n_steps: none, value 0).
    steps = torch.arange(n_steps, device=rewards.device)
    valid_steps = torch.where(valid, steps, n_steps)
    first_valid_from = torch.cummin(valid_steps.flip(1), dim=1).values.flip(1)
    first_valid_after = torch.cat([first_valid_from[:, 1:], valid_steps.new_full((n_rows, 1), n_steps)], dim=1)
    next_values = torch.cat([values, values.new_zeros(n_rows, 1)], dim=1).gather(1, first_valid_after)
    deltas = torch.where(valid, rewards + gamma * next_values - values, 0.0)
    # A_t = b_t + m_t * A_{t+1}: (delta_t, gamma * lam) at a valid position, (0, 1) at a
    # masked one, which carries A across it; one fused multiply-add per step, so that
    # a GPU launches T kernels, not a dozen per step.
    decay = torch.full_like(rewards, gamma * lam).masked_fill_(~valid, 1.0)
    carried = [torch.zeros(n_rows, dtype=acc, device=rewards.device)]
    for t in reversed(range(n_steps)):
        carried.append(torch.addcmul(deltas[:, t], decay[:, t], carried[-1]))
    advantages = torch.where(valid, torch.stack(carried[:0:-1], dim=1), 0.0)
    returns = torch.where(valid, advantages + values, 0.0)
    return advantages, returns


# ------------------------------------------------------------------------ public


def _group_op(op, rewards, group_size, mode, unbiased, eps, batch_std, backend):
    run = dispatch(op, rewards.device, backend, torch=_torch_group,
                   triton=None if _recording(rewards) else _triton_group)
    return run(rewards, group_size, mode, unbiased, eps, batch_std)


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    *,
    scale: str = "group",
    unbiased: bool = True,
    eps: float = 1e-6,
    backend: str | None = None,
) -> torch.Tensor:
    """GRPO advantages: each reward minus its group's mean, divided by a std.

    ``A_i = (R_i - mean_g) / (std + eps)``, the mean over the group of ``R_i``.

    Args:
        rewards: (n_groups * group_size,) float rewards laid out group by group.
        group_size: G, the number of completions per prompt; it must divide
            ``rewards.numel()``.
        scale: ``"group"`` (std of the group: TRL ``scale_rewards="group"``, verl
            ``norm_adv_by_std_in_grpo=True``, OpenRLHF ``group_norm``), ``"batch"`` (the
            group mean, but the std of all rewards of the batch: TRL
            ``scale_rewards="batch"``), ``"none"`` (no division: Dr.GRPO, TRL
            ``scale_rewards="none"``, verl ``norm_adv_by_std_in_grpo=False``).
        unbiased: Bessel's correction for the std (``/(n-1)``; all three peers), or
            ``/n`` when False.
        eps: added to the std, >= 0 (TRL 1e-4, verl 1e-6, OpenRLHF 1e-9).
        backend: ``"triton"``, ``"torch"`` or None (automatic; see fastpo.kernels).

    Returns:
        float32 advantages of ``rewards.shape`` (float64 for float64 rewards). A group
        of size 1, or whose rewards are all equal, gets exactly 0 in every scale mode
        (no NaN, even with ``eps=0``). Example: G = 2, rewards {0, 1}: mean 0.5,
        unbiased std sqrt(0.5) = 0.7071, advantages -+0.5 / (0.7071 + eps) = -+0.7071;
        biased std 0.5 gives -+1.
    """
    group_size = _check_group_size(group_size)
    _check_rewards(rewards, group_size)
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r} is not one of {SCALES}")
    eps = nonnegative_scalar("eps", eps)
    batch_std = _batch_std(rewards, unbiased) if scale == "batch" else None
    return _group_op("group_advantages", rewards, group_size, _SCALE_MODES[scale], unbiased, eps, batch_std, backend)


def rloo_advantages(rewards: torch.Tensor, group_size: int, *, backend: str | None = None) -> torch.Tensor:
    """RLOO advantages: each reward minus the mean of the other rewards of its group.

    ``A_i = R_i - mean_{j != i} R_j = G / (G - 1) * (R_i - mean_g)`` (TRL RLOOTrainer,
    verl ``adv_estimator=rloo``, OpenRLHF ``rloo``).

    Args:
        rewards: (n_groups * group_size,) float rewards laid out group by group.
        group_size: G >= 2 (with G = 1 there is no other sample to form a baseline:
            ValueError, as TRL requires at least two generations).
        backend: ``"triton"``, ``"torch"`` or None (automatic; see fastpo.kernels).

    Returns:
        float32 advantages of ``rewards.shape`` (float64 for float64 rewards); a group
        whose rewards are all equal gets exactly 0.
    """
    group_size = _check_group_size(group_size)
    if group_size < 2:
        raise ValueError(f"rloo_advantages needs group_size >= 2 (a leave-one-out baseline), got {group_size}")
    _check_rewards(rewards, group_size)
    return _group_op("rloo_advantages", rewards, group_size, _LEAVE_ONE_OUT, True, 0.0, None, backend)


def whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    *,
    shift_mean: bool = True,
    unbiased: bool = True,
    eps: float = 1e-8,
    backend: str | None = None,
) -> torch.Tensor:
    """``(x - mean) * rsqrt(var + eps)`` with mean and variance over the masked entries.

    Args:
        x: float tensor of any shape.
        mask: same shape (bool, or 0/1 integers or floats; nonzero = valid).
        shift_mean: when False the mean is added back (only the scale changes), as in
            TRL's and verl's ``masked_whiten(shift_mean=False)``.
        unbiased: variance with Bessel's correction ``/(N-1)`` (TRL, verl), or ``/N``
            (OpenRLHF) when False. With N <= 1 valid entries the variance is taken as 0.
        eps: added to the variance, >= 0 (TRL and verl use 1e-8).
        backend: accepted for uniformity and validated; both backends run the same two
            PyTorch reductions (a global masked mean and variance).

    Returns:
        float32 tensor of ``x.shape`` (float64 for float64 ``x``); masked-out positions
        are 0 (TRL and verl leave them transformed; callers multiply by the mask). No
        valid entry gives all zeros; ``var + eps == 0`` gives the centered values' zeros
        rather than NaN.
    """
    check_tensor("x", x, FLOAT_DTYPES)
    valid = bool_mask("mask", mask, x.shape, x.device)
    eps = nonnegative_scalar("eps", eps)
    return dispatch("whiten", x.device, backend, torch=_whiten)(x, valid, shift_mean, unbiased, eps)


def _whiten(x, valid, shift_mean, unbiased, eps):
    acc = acc_dtype(x)
    x = x.to(acc)
    count = valid.sum().to(acc)
    mean = torch.where(valid, x, 0.0).sum() / count.clamp(min=1)
    centered = torch.where(valid, x - mean, 0.0)
    dof = (count - 1 if unbiased else count).clamp(min=1)
    variance = _centered_sum_of_squares(centered) / dof
    denominator = variance + eps
    positive = denominator > 0
    inv_std = torch.where(positive, torch.where(positive, denominator, 1.0).rsqrt(), 0.0)
    out = centered * inv_std
    if not shift_mean:
        out = out + mean
    return torch.where(valid, out, 0.0)


def reinforce_pp_advantages(
    rewards: torch.Tensor,
    group_size: int,
    mask: torch.Tensor,
    *,
    unbiased: bool = True,
    eps: float = 1e-8,
    backend: str | None = None,
) -> torch.Tensor:
    """REINFORCE++ with a group baseline: ``R_i - mean_g``, spread over each sequence's
    valid tokens, then whitened over all valid tokens of the batch.

    verl ``adv_estimator=reinforce_plus_plus_baseline`` and OpenRLHF
    ``reinforce_baseline``. One difference with verl: verl uses a baseline of 0 for a
    group of one; here a group of one (or of equal rewards) gets 0 before whitening, as
    the group mean is subtracted.

    Args:
        rewards: (B,) float sequence rewards, B = n_groups * group_size, laid out group
            by group.
        group_size: G, dividing B.
        mask: (B, T) response-token mask (bool, or 0/1 integers or floats).
        unbiased, eps: the whitening options of :func:`whiten` (defaults as verl).
        backend: ``"triton"``, ``"torch"`` or None (automatic; see fastpo.kernels). The
            group step uses the Triton group kernel; whitening is PyTorch on both.

    Returns:
        (B, T) float32 token advantages (float64 for float64 rewards), 0 at masked-out
        positions.
    """
    group_size = _check_group_size(group_size)
    _check_rewards(rewards, group_size)
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[0] != rewards.numel():
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must be (B, T) with B = rewards.numel() = {rewards.numel()}, got {shape}")
    valid = bool_mask("mask", mask, mask.shape, rewards.device)
    eps = nonnegative_scalar("eps", eps)
    sequence_advantages = _group_op(
        "reinforce_pp_advantages", rewards, group_size, _NO_DIVISION, True, 0.0, None, backend
    )
    return _spread_and_whiten(sequence_advantages, valid, unbiased, eps)


def _spread_and_whiten(sequence_advantages, valid, unbiased, eps):
    token_advantages = torch.where(valid, sequence_advantages[:, None], 0.0)
    return _whiten(token_advantages, valid, True, unbiased, eps)


def _torch_reinforce_pp(rewards, group_size, valid, unbiased, eps):
    """REINFORCE++ baseline, all in torch: the group mean subtracted, then whitened."""
    sequence_advantages = _torch_group(rewards, group_size, _NO_DIVISION, True, 0.0, None)
    return _spread_and_whiten(sequence_advantages, valid, unbiased, eps)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 1.0,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation, scanning each sequence backward.

    Over the valid positions ``t_1 < ... < t_k`` of a row (masked positions skipped):

        delta_i = r[t_i] + gamma * V[t_{i+1}] - V[t_i],   A[t_i] = delta_i + gamma * lam * A[t_{i+1}],

    with ``V[t_{k+1}] = A[t_{k+1}] = 0`` (nothing after the last valid token), and
    ``returns = A + V``. A masked position carries no reward and no value: the recursion
    jumps over it to the next valid position, exactly as if it were removed from the
    row (verl's ``compute_gae_advantage_return``; TRL and OpenRLHF instead zero the
    values and rewards of trailing padding, which agrees for right-padded masks).

    Args:
        rewards: (B, T) float per-token rewards.
        values: (B, T) float value estimates.
        mask: (B, T) bool, or 0/1 integers or floats; nonzero = valid. Holes are allowed.
        gamma: discount in [0, 1].
        lam: GAE lambda in [0, 1].
        backend: ``"triton"`` (one program per row, a loop over T), ``"torch"`` (a loop
            over T vectorized across rows), ``"cpp"`` / ``"cuda"`` (native kernels, one
            thread per row) or None (automatic; see fastpo.kernels).

    Returns:
        ``(advantages, returns)``, both (B, T) float32 (float64 when an input is
        float64), 0 at masked positions; the rewards and values there are never used,
        so they may hold anything (even NaN).
    """
    check_tensor("rewards", rewards, FLOAT_DTYPES)
    check_tensor("values", values, FLOAT_DTYPES)
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (B, T), got shape {tuple(rewards.shape)}")
    if values.shape != rewards.shape:
        raise ValueError(f"values.shape {tuple(values.shape)} does not match rewards.shape {tuple(rewards.shape)}")
    check_same_device(rewards=rewards, values=values)
    valid = bool_mask("mask", mask, rewards.shape, rewards.device)
    gamma = _unit_interval("gamma", gamma)
    lam = _unit_interval("lam", lam)
    recording = _recording(rewards, values)
    run = dispatch("gae", rewards.device, backend, torch=_torch_gae,
                   triton=None if recording else _triton_gae, native=None if recording else _native.gae)
    return run(rewards, values, valid, gamma, lam)


# ------------------------------------------------- estimators of verl's registry
# Torch only (no Triton kernel of their own): each is a handful of reductions over
# (n_groups, G) or (n_groups, G, T) views, run once per rollout, with no host sync.
# GDPO's per-component group z-scores use group_advantages, and so its kernel.


def _check_token_tensor(name: str, value, shape: tuple) -> None:
    check_tensor(name, value, FLOAT_DTYPES)
    if tuple(value.shape) != shape:
        raise ValueError(f"{name}.shape {tuple(value.shape)} does not match mask.shape {shape}")


def _sequence_mask(mask, batch: int, device) -> torch.Tensor:
    """A (B, T) response mask whose B is the number of rewards, as bool."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[0] != batch:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must be (B, T) with B = rewards.shape[0] = {batch}, got {shape}")
    return bool_mask("mask", mask, mask.shape, device)


def grpo_passk_advantages(
    rewards: torch.Tensor,
    group_size: int,
    *,
    scale: str = "group",
    eps: float = 1e-6,
    backend: str | None = None,
) -> torch.Tensor:
    """Pass@k advantages (verl ``grpo_passk``): in each group only the best completion
    gets an advantage, ``max_g - second_max_g``, divided by ``std_g + eps`` (unbiased
    std) with ``scale="group"`` (verl ``norm_adv_by_std_in_grpo=True``) or not with
    ``"none"``; every other completion gets 0.

    Args:
        rewards: (n_groups * group_size,) float rewards laid out group by group.
        group_size: G >= 2.
        scale: ``"group"`` or ``"none"``.
        eps: added to the std, >= 0 (verl 1e-6).
        backend: accepted and validated; torch on every backend.

    Returns:
        float32 advantages of ``rewards.shape`` (float64 for float64 rewards). On a tie
        for the best reward the advantage is 0 whichever completion holds it.
    """
    group_size = _check_group_size(group_size)
    if group_size < 2:
        raise ValueError(f"grpo_passk_advantages needs group_size >= 2 (a second-best reward), got {group_size}")
    _check_rewards(rewards, group_size)
    if scale not in ("group", "none"):
        raise ValueError(f"scale={scale!r} is not one of ('group', 'none')")
    eps = nonnegative_scalar("eps", eps)
    return dispatch("grpo_passk_advantages", rewards.device, backend, torch=_torch_passk)(
        rewards, group_size, scale, eps
    )


def _torch_passk(rewards, group_size, scale, eps):
    groups = rewards.detach().to(acc_dtype(rewards)).view(-1, group_size)
    top = groups.topk(2, dim=1)
    gap = top.values[:, 0] - top.values[:, 1]
    if scale == "group":
        # a tie for the best gives 0, even with eps = 0 and a constant group (std 0)
        divisor = groups.std(dim=1) + eps
        gap = torch.where(gap == 0, 0.0, gap / torch.where(divisor == 0, 1.0, divisor))
    out = torch.zeros_like(groups).scatter(1, top.indices[:, :1], gap[:, None])
    return out.reshape(-1)


def opo_advantages(
    rewards: torch.Tensor, group_size: int, mask: torch.Tensor, *, backend: str | None = None
) -> torch.Tensor:
    """OPO advantages (verl ``opo``): each reward minus its group's length-weighted mean
    reward ``sum_j n_j R_j / sum_j n_j`` (``n_j`` the response's valid-token count); a
    group of one has baseline 0.

    Args:
        rewards: (B,) float rewards, B = n_groups * group_size, laid out group by group.
        group_size: G, dividing B.
        mask: (B, T) response mask (bool, or 0/1 integers or floats).
        backend: accepted and validated; torch on every backend.

    Returns:
        (B,) float32 sequence advantages (float64 for float64 rewards); spread them over
        the tokens as ``A[:, None] * mask`` (verl's layout). A group whose responses are
        all empty has baseline 0 (verl divides 0 by 0).
    """
    group_size = _check_group_size(group_size)
    _check_rewards(rewards, group_size)
    valid = _sequence_mask(mask, rewards.numel(), rewards.device)
    return dispatch("opo_advantages", rewards.device, backend, torch=_torch_opo)(rewards, group_size, valid)


def _torch_opo(rewards, group_size, valid):
    acc = acc_dtype(rewards)
    groups = rewards.detach().to(acc).view(-1, group_size)
    lengths = valid.sum(-1).to(acc).view(-1, group_size)
    baseline = (lengths * groups).sum(1, keepdim=True) / lengths.sum(1, keepdim=True).clamp(min=1.0)
    if group_size == 1:
        baseline = torch.zeros_like(baseline)
    return (groups - baseline).reshape(-1)


def _reward_to_go(token_rewards: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``G_t = sum_{t' >= t} m_t' * r_t'`` along each row."""
    masked = torch.where(valid, token_rewards, 0.0)
    return masked.flip(-1).cumsum(-1).flip(-1)


def remax_advantages(
    token_rewards: torch.Tensor,
    baseline_rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ReMax advantages (verl ``remax``): the reward-to-go ``G_t`` of each token minus
    the reward of the greedy response to the same prompt (the baseline).

    Args:
        token_rewards: (B, T) float per-token rewards (an outcome reward on the last
            valid token, as verl's ``token_level_rewards``).
        baseline_rewards: (B,) the greedy response's reward for each row's prompt.
        mask: (B, T) response mask.
        backend: accepted and validated; torch on every backend.

    Returns:
        ``(advantages, returns)``, (B, T) float32 (float64 with a float64 input):
        ``returns = G``, ``advantages = G - baseline * m``, as verl's: 0 after the last
        valid token, the reward to go at a masked hole inside a response (the loss's mask
        drops it).
    """
    check_tensor("token_rewards", token_rewards, FLOAT_DTYPES)
    if token_rewards.dim() != 2:
        raise ValueError(f"token_rewards must be (B, T), got shape {tuple(token_rewards.shape)}")
    valid = bool_mask("mask", mask, token_rewards.shape, token_rewards.device)
    check_tensor("baseline_rewards", baseline_rewards, FLOAT_DTYPES)
    if tuple(baseline_rewards.shape) != token_rewards.shape[:1]:
        raise ValueError(
            f"baseline_rewards.shape {tuple(baseline_rewards.shape)} must be (B,) = {tuple(token_rewards.shape[:1])}"
        )
    check_same_device(token_rewards=token_rewards, baseline_rewards=baseline_rewards)
    return dispatch("remax_advantages", token_rewards.device, backend, torch=_torch_remax)(
        token_rewards, baseline_rewards, valid
    )


def _torch_remax(token_rewards, baseline_rewards, valid):
    acc = acc_dtype(token_rewards, baseline_rewards)
    returns = _reward_to_go(token_rewards.detach().to(acc), valid)
    advantages = returns - torch.where(valid, baseline_rewards.detach().to(acc)[:, None], 0.0)
    return advantages, returns


def gdpo_advantages(
    rewards: torch.Tensor,
    group_size: int,
    mask: torch.Tensor,
    *,
    weights: tuple[float, ...] | None = None,
    scale: str = "group",
    eps: float = 1e-6,
    whiten_eps: float = 1e-8,
    backend: str | None = None,
) -> torch.Tensor:
    """GDPO advantages (verl ``gdpo``): each reward component is normalized within its
    group on its own (GRPO's z-score, :func:`group_advantages`), the normalized
    components are summed with ``weights``, spread over each response's valid tokens and
    whitened over the batch's valid tokens.

    Args:
        rewards: (B, K) float reward components (verl's ``gdpo_reward_keys``), B =
            n_groups * group_size laid out group by group; a (B,) tensor is one component.
        group_size: G, dividing B.
        mask: (B, T) response mask.
        weights: K floats (verl ``gdpo_reward_weights``), default all 1.
        scale: ``"group"`` (verl ``norm_adv_by_std_in_grpo=True``) or ``"none"``.
        eps: added to each group std (verl 1e-6); whiten_eps: added to the variance of
            the whitening (verl 1e-8).
        backend: the backend of the group z-scores; the whitening is torch on all.

    Returns:
        (B, T) float32 token advantages (float64 for float64 rewards), 0 at masked
        positions. As in :func:`group_advantages`, a group of one gets 0 before the
        whitening (verl keeps its raw reward).
    """
    check_tensor("rewards", rewards, FLOAT_DTYPES)
    if rewards.dim() == 1:
        rewards = rewards[:, None]
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (B, K) reward components or (B,), got shape {tuple(rewards.shape)}")
    group_size = _check_group_size(group_size)
    if rewards.shape[0] % group_size:
        raise ValueError(
            f"group_size={group_size} does not divide the number of rewards ({rewards.shape[0]}): "
            f"rewards must hold whole groups"
        )
    valid = _sequence_mask(mask, rewards.shape[0], rewards.device)
    n_components = rewards.shape[1]
    if weights is None:
        weights = (1.0,) * n_components
    weights = tuple(float(w) for w in weights)
    if len(weights) != n_components or not all(math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be {n_components} finite floats (one per reward component), got {weights!r}")
    if scale not in ("group", "none"):
        raise ValueError(f"scale={scale!r} is not one of ('group', 'none')")
    whiten_eps = nonnegative_scalar("whiten_eps", whiten_eps)
    combined = sum(
        weight * group_advantages(rewards[:, k].contiguous(), group_size, scale=scale, eps=eps, backend=backend)
        for k, weight in enumerate(weights)
    )
    return _spread_and_whiten(combined, valid, True, whiten_eps)


def optimal_token_baseline_advantages(
    token_rewards: torch.Tensor,
    mask: torch.Tensor,
    group_size: int,
    old_logprobs: torch.Tensor,
    log_sum_sq_probs: torch.Tensor,
    *,
    rollout_is_weights: torch.Tensor | None = None,
    handle_zero_tail: bool = True,
    eps: float = 1e-8,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimal token baseline (verl ``optimal_token_baseline``): a baseline per group and
    per position, ``B_t = sum_j G_jt W_jt / (sum_j W_jt + eps)`` over the group's
    responses j valid at t, with ``G`` the reward to go and ``W_t = sum_{t' <= t} m w_t'``
    the cumulative path variance of ``w_t = 1 - 2 p_t + sum_v p_v^2`` (``p_t`` the sampled
    token's probability under ``old_logprobs``; times ``rollout_is_weights**2`` when
    given); ``A = (G - B) * m``.

    Args:
        token_rewards: (B, T) float per-token rewards, B = n_groups * group_size laid
            out group by group.
        mask: (B, T) response mask.
        group_size: G, dividing B; a group of one has baseline 0.
        old_logprobs: (B, T) log-probs of the sampled tokens under the rollout policy.
        log_sum_sq_probs: (B, T) ``log sum_v p_v^2`` per token, from ``token_logprobs(...,
            statistics=("log_sum_sq_probs",))`` (computed in the log-prob pass, no (N, V)
            tensor).
        rollout_is_weights: optional (B, T) truncated IS weights.
        handle_zero_tail: zero the baseline of a group's single longest response past the
            second-longest one's length (verl's default).
        eps: added to the denominator, >= 0.
        backend: accepted and validated; torch on every backend.

    Returns:
        ``(advantages, returns)``, (B, T) float32 (float64 for a float64 input).
    """
    check_tensor("token_rewards", token_rewards, FLOAT_DTYPES)
    if token_rewards.dim() != 2:
        raise ValueError(f"token_rewards must be (B, T), got shape {tuple(token_rewards.shape)}")
    shape = tuple(token_rewards.shape)
    valid = bool_mask("mask", mask, shape, token_rewards.device)
    group_size = _check_group_size(group_size)
    if shape[0] % group_size:
        raise ValueError(
            f"group_size={group_size} does not divide the number of rows ({shape[0]}): rows must hold whole groups"
        )
    _check_token_tensor("old_logprobs", old_logprobs, shape)
    _check_token_tensor("log_sum_sq_probs", log_sum_sq_probs, shape)
    if rollout_is_weights is not None:
        _check_token_tensor("rollout_is_weights", rollout_is_weights, shape)
    check_same_device(token_rewards=token_rewards, old_logprobs=old_logprobs, log_sum_sq_probs=log_sum_sq_probs,
                      rollout_is_weights=rollout_is_weights)
    eps = nonnegative_scalar("eps", eps)
    return dispatch("optimal_token_baseline_advantages", token_rewards.device, backend, torch=_torch_otb)(
        token_rewards, valid, group_size, old_logprobs, log_sum_sq_probs, rollout_is_weights, handle_zero_tail, eps
    )


def _torch_otb(token_rewards, valid, group_size, old_logprobs, log_sum_sq_probs, rollout_is_weights,
               handle_zero_tail, eps):
    acc = acc_dtype(token_rewards, old_logprobs, log_sum_sq_probs)
    rows, steps = token_rewards.shape
    returns = _reward_to_go(token_rewards.detach().to(acc), valid)
    zero = torch.zeros((), dtype=acc, device=returns.device)
    p = torch.where(valid, old_logprobs.detach().to(acc), zero).exp()
    w = 1.0 - 2.0 * p + torch.where(valid, log_sum_sq_probs.detach().to(acc), zero).exp()
    if rollout_is_weights is not None:
        w = w * torch.where(valid, rollout_is_weights.detach().to(acc), zero) ** 2
    path = torch.where(valid, w, zero).cumsum(-1)
    # (n_groups, G, T) views: the sums over j run over a group's responses
    m = valid.to(acc).view(-1, group_size, steps)
    weighted = (path.view_as(m) * m)
    baseline = (returns.view_as(m) * weighted).sum(1, keepdim=True) / (weighted.sum(1, keepdim=True) + eps)
    baseline = baseline.expand_as(m)
    if group_size == 1:
        baseline = torch.zeros_like(baseline)
    elif handle_zero_tail:
        lengths = m.sum(-1)  # (n_groups, G)
        top = lengths.topk(2, dim=1).values
        longest, second = top[:, :1], top[:, 1:]
        single_longest = ((lengths == longest).sum(1, keepdim=True) == 1) & (longest > second)
        is_longest = (lengths == longest) & single_longest  # (n_groups, G)
        positions = torch.arange(steps, device=returns.device, dtype=acc)
        tail = is_longest[:, :, None] & (positions >= second[:, :, None])
        baseline = torch.where(tail, zero, baseline)
    advantages = torch.where(valid, returns - baseline.reshape(rows, steps), zero)
    return advantages, returns


# --------------------------------------------------------------------- registry

ADVANTAGE_ESTIMATORS = Registry("ADVANTAGE_ESTIMATORS", "advantage")
# params:
#   ``function``: the public op;
#   ``arguments``: the names of its positional arguments, in order, from what a rollout
#     provides: ``rewards`` (B,) sequence rewards laid out group by group, ``group_size``
#     (G), ``mask`` (B, T) response mask, ``token_rewards`` (B, T) the sequence reward on
#     each response's last valid token (verl's ``token_level_rewards``),
#     ``reward_components`` (B, K) the reward of each of K sources, ``baseline_rewards``
#     (B,) the reward of the greedy response to the row's prompt, ``old_logprobs`` and
#     ``log_sum_sq_probs`` (B, T) of the sampling policy, ``values`` (B, T) a critic's;
#   ``options``: keyword -> the engine option (GRPOConfig's) that sets it;
#   ``needs_values``: it takes a critic's values (``"values" in arguments``).
# Ops returning ``(advantages, returns)`` give the advantages first.
ADVANTAGE_ESTIMATORS.register(
    "group", kernel_id=_DIVIDE_BY_GROUP_STD, doc="GRPO: `(R_i - mean_g) / (std + eps)` (scale: group, batch, none)",
    peers="TRL GRPO `scale_rewards`; verl `grpo`; OpenRLHF `group_norm`", function=group_advantages,
    arguments=("rewards", "group_size"), options={"scale": "scale_rewards", "eps": "advantage_eps"},
    needs_values=False,
)(_torch_group)
ADVANTAGE_ESTIMATORS.register(
    "rloo", kernel_id=_LEAVE_ONE_OUT, doc="RLOO: `R_i - mean_{j != i} R_j`",
    peers="TRL RLOOTrainer; verl `rloo`; OpenRLHF `rloo`", function=rloo_advantages,
    arguments=("rewards", "group_size"), options={}, needs_values=False,
)(_torch_group)
ADVANTAGE_ESTIMATORS.register(
    "reinforce_pp", kernel_id=_NO_DIVISION,
    doc="REINFORCE++ baseline: `R_i - mean_g` on every token, whitened over the batch",
    peers="verl `reinforce_plus_plus_baseline`; OpenRLHF `reinforce_baseline`", function=reinforce_pp_advantages,
    arguments=("rewards", "group_size", "mask"), options={}, needs_values=False,
)(_torch_reinforce_pp)
ADVANTAGE_ESTIMATORS.register(
    "gae", kernel_id=None, doc="GAE over each sequence's valid tokens, `returns = A + V`",
    peers="verl `gae`; OpenRLHF `gae`; TRL PPO", function=gae,
    arguments=("token_rewards", "values", "mask"), options={}, needs_values=True,
)(_torch_gae)
ADVANTAGE_ESTIMATORS.register(
    "grpo_passk", kernel_id=None,
    doc="Pass@k: the best completion of a group gets `(max_g - second_g) / (std + eps)`, the others 0",
    peers="verl `grpo_passk`", function=grpo_passk_advantages,
    arguments=("rewards", "group_size"), options={"scale": "scale_rewards", "eps": "advantage_eps"},
    needs_values=False,
)(_torch_passk)
ADVANTAGE_ESTIMATORS.register(
    "opo", kernel_id=None, doc="OPO: `R_i` minus the group's length-weighted mean reward",
    peers="verl `opo`", function=opo_advantages,
    arguments=("rewards", "group_size", "mask"), options={}, needs_values=False,
)(_torch_opo)
ADVANTAGE_ESTIMATORS.register(
    "remax", kernel_id=None, doc="ReMax: the reward to go minus the greedy response's reward",
    peers="verl `remax`", function=remax_advantages,
    arguments=("token_rewards", "baseline_rewards", "mask"), options={}, needs_values=False,
)(_torch_remax)
ADVANTAGE_ESTIMATORS.register(
    "gdpo", kernel_id=None,
    doc="GDPO: each reward component z-scored in its group, weighted sum, whitened over the batch's tokens",
    peers="verl `gdpo`", function=gdpo_advantages,
    arguments=("reward_components", "group_size", "mask"),
    options={"weights": "reward_weights", "scale": "scale_rewards", "eps": "advantage_eps"}, needs_values=False,
)(functools.partial(gdpo_advantages, backend="torch"))  # its group z-scores on the torch backend too
ADVANTAGE_ESTIMATORS.register(
    "optimal_token_baseline", kernel_id=None,
    doc="Optimal token baseline: the reward to go minus a per-position baseline weighted by the path variance",
    peers="verl `optimal_token_baseline`", function=optimal_token_baseline_advantages,
    arguments=("token_rewards", "mask", "group_size", "old_logprobs", "log_sum_sq_probs"), options={},
    needs_values=False,
)(_torch_otb)
