"""Preference (DPO family, KTO, Plackett-Luce) and reward-model losses.

All inputs are per-sequence quantities: summed (or averaged, see
``sequence_logprobs``) log-probs of each response, or reward-model scores. Every
loss returns one value per example, shape (B,); the caller reduces (usually
``.mean()``). Formulas are those of docs/conventions.md; with ``x = lp - lp_ref`` per
response and ``h = x_chosen - x_rejected``:

    sigmoid   -(1-eps) log sig(beta h) - eps log sig(-beta h)      (eps = 0: DPO)
    hinge     max(0, 1 - beta h)
    ipo       (h - 1 / (2 beta))^2
    robust    (-(1-eps) log sig(beta h) + eps log sig(-beta h)) / (1 - 2 eps)
    PL        -sum_{k<K} (beta x_k - logsumexp_{j>=k} beta x_j)
    KTO       lambda_D sig(-beta (x - z0))  or  lambda_U sig(beta (x - z0))
    BT        -log sig(s_c - s_r - margin) + c (s_c + s_r)^2
    ranking   -1/C(K,2) sum_{i<j} log sig(s_i - s_j)

``log sig(u)`` is computed as ``min(u, 0) - log1p(exp(-|u|))``, which is finite with a
finite gradient for any finite ``u`` (|beta h| of 1e4 and beyond).

The Triton backend evaluates every loss in one kernel, selected by a compile-time
constant: one program per block of rows computes the per-example loss and its
gradient with respect to each input score; the backward only scales that saved
gradient by the incoming one. The torch backend composes the same formulas with
autograd. ``dpo_loss``'s loss types are registered in ``PREFERENCE_LOSSES`` with their
torch reference and their kernel id.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._backend import dispatch
from ._launch import HAS_TRITON, acc_dtype, on_tensor_device, tl_acc_dtype
from ._validate import FLOAT_DTYPES, check_same_device, check_tensor, nonnegative_scalar, positive_scalar
from .registry import Registry

if HAS_TRITON:
    import triton
    import triton.language as tl

# Compile-time loss selectors of the fused kernel (the first four: PREFERENCE_LOSSES).
_SIGMOID, _HINGE, _IPO, _ROBUST, _PLACKETT_LUCE, _BRADLEY_TERRY, _RANKING, _KTO = range(8)

# Largest tile (rows x responses) of one program on CPU tensors (the interpreter):
# small enough that the tests cover batches split over several programs.
INTERPRETER_TILE = 256


# --------------------------------------------------------------------------- Triton

if HAS_TRITON:

    @triton.jit
    def _log_sigmoid(u):
        # min(u, 0) - log1p(exp(-|u|)); log1p from its series where exp(-|u|) is so
        # small that 1 + e would round away most of its digits.
        e = tl.exp(-tl.abs(u))
        log1p_e = tl.where(e < 1e-4, e * (1.0 - e * (0.5 - e / 3.0)), tl.log(1.0 + e))
        return tl.minimum(u, 0.0) - log1p_e

    @triton.jit
    def _sigmoid(u):
        e = tl.exp(-tl.abs(u))  # never overflows
        s = 1.0 / (1.0 + e)
        return tl.where(u >= 0, s, e * s)

    @triton.jit
    def _column(tile, cols, k):
        """Column k of a (BLOCK_B, BLOCK_K) tile as a (BLOCK_B,) vector."""
        return tl.sum(tl.where(cols[None, :] == k, tile, 0.0), axis=1)

    @triton.jit
    def _preference_fwd_kernel(
        policy_ptr,
        ref_ptr,
        aux_ptr,
        aux_stride,
        z0_ptr,
        loss_ptr,
        grad_ptr,
        reward_ptr,
        n_rows,
        n_cols,
        beta,
        param_a,
        param_b,
        LOSS: tl.constexpr,
        HAS_REF: tl.constexpr,
        STORE_REWARDS: tl.constexpr,
        ACC_DTYPE: tl.constexpr,
        BLOCK_B: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """Per-example loss and d loss / d x for x = policy - ref, (B, K) row-major.

        param_a: label smoothing (sigmoid, robust), center coefficient (BT),
        1 / C(K, 2) (ranking), desirable weight (KTO). param_b: undesirable weight
        (KTO). aux: margin (BT) or the desirable flags (KTO), per row.
        """
        rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
        cols = tl.arange(0, BLOCK_K)
        row_ok = rows < n_rows
        tile_ok = row_ok[:, None] & (cols[None, :] < n_cols)
        offs = rows[:, None] * n_cols + cols[None, :]
        x = tl.load(policy_ptr + offs, mask=tile_ok, other=0.0).to(ACC_DTYPE)
        if HAS_REF:
            x = x - tl.load(ref_ptr + offs, mask=tile_ok, other=0.0).to(ACC_DTYPE)
        if STORE_REWARDS:
            tl.store(reward_ptr + offs, beta * x, mask=tile_ok)

        if LOSS == 4:  # Plackett-Luce: suffix log-sum-exps, O(K^2) per row
            u = tl.where(tile_ok, beta * x, -3.4028234663852886e38)
            loss = tl.zeros([BLOCK_B], ACC_DTYPE)
            grad = tl.zeros([BLOCK_B, BLOCK_K], ACC_DTYPE)
            for k in range(0, n_cols - 1):
                u_k = tl.where(cols[None, :] >= k, u, -3.4028234663852886e38)
                top = tl.max(u_k, axis=1)
                p = tl.exp(u_k - top[:, None])
                total = tl.sum(p, axis=1)
                loss += top + tl.log(total) - _column(u, cols, k)
                grad += p / total[:, None] - tl.where(cols[None, :] == k, 1.0, 0.0)
            grad = beta * grad
        elif LOSS == 6:  # K-wise ranking over all pairs i < j
            loss = tl.zeros([BLOCK_B], ACC_DTYPE)
            grad = tl.zeros([BLOCK_B, BLOCK_K], ACC_DTYPE)
            for i in range(0, n_cols - 1):
                d = _column(x, cols, i)[:, None] - x
                later = tile_ok & (cols[None, :] > i)
                loss -= tl.sum(tl.where(later, _log_sigmoid(d), 0.0), axis=1)
                # d/ds_j [-log sig(s_i - s_j)] = sig(-(s_i - s_j)); s_i gets the opposite.
                g = tl.where(later, _sigmoid(-d), 0.0)
                grad += g - tl.where(cols[None, :] == i, tl.sum(g, axis=1)[:, None], 0.0)
            loss = param_a * loss
            grad = param_a * grad
        elif LOSS == 7:  # KTO, one column; z0 is a detached batch statistic
            z0 = tl.load(z0_ptr).to(ACC_DTYPE)
            desirable = tl.load(aux_ptr + rows * aux_stride, mask=row_ok, other=0) != 0
            u = beta * (_column(x, cols, 0) - z0)
            sig_pos = _sigmoid(u)
            sig_neg = _sigmoid(-u)
            loss = tl.where(desirable, param_a * sig_neg, param_b * sig_pos)
            d_rw = beta * sig_pos * sig_neg * tl.where(desirable, -param_a, param_b)
            grad = tl.where(cols[None, :] == 0, d_rw[:, None], 0.0)
        else:  # pairwise: two columns, the loss depends on h = x0 - x1
            x0 = _column(x, cols, 0)
            x1 = _column(x, cols, 1)
            h = x0 - x1
            if LOSS == 0:  # sigmoid, cDPO with label smoothing param_a
                u = beta * h
                loss = -(1.0 - param_a) * _log_sigmoid(u) - param_a * _log_sigmoid(-u)
                d_h = beta * (-(1.0 - param_a) * _sigmoid(-u) + param_a * _sigmoid(u))
            elif LOSS == 1:  # hinge; at the kink the gradient is 0, as torch.relu's
                u = beta * h
                loss = tl.maximum(1.0 - u, 0.0)
                d_h = tl.where(u < 1.0, -beta, 0.0)
            elif LOSS == 2:  # IPO
                gap = h - 0.5 / beta
                loss = gap * gap
                d_h = 2.0 * gap
            elif LOSS == 3:  # robust DPO
                u = beta * h
                scale = 1.0 / (1.0 - 2.0 * param_a)
                loss = scale * (-(1.0 - param_a) * _log_sigmoid(u) + param_a * _log_sigmoid(-u))
                d_h = scale * beta * (-(1.0 - param_a) * _sigmoid(-u) - param_a * _sigmoid(u))
            elif LOSS == 5:  # Bradley-Terry with margin and centering coefficient param_a
                h = h - tl.load(aux_ptr + rows * aux_stride, mask=row_ok, other=0.0).to(ACC_DTYPE)
                center = x0 + x1
                loss = -_log_sigmoid(h) + param_a * center * center
                d_h = -_sigmoid(-h)
            else:
                tl.static_assert(False, "LOSS is not a loss id of the preference kernel")
            grad = tl.where(cols[None, :] == 0, d_h[:, None], -d_h[:, None])
            if LOSS == 5:
                grad += 2.0 * param_a * center[:, None]
        tl.store(loss_ptr + rows, loss, mask=row_ok)
        tl.store(grad_ptr + offs, grad, mask=tile_ok)


@on_tensor_device
def _triton_launch(loss_id, policy, ref, aux, z0, beta, param_a, param_b, store_rewards):
    """Run the fused kernel: returns (losses (B,), grad (B, K), rewards (B, K) or None)."""
    n_rows, n_cols = policy.shape
    acc = policy.dtype
    losses = torch.empty(n_rows, dtype=acc, device=policy.device)
    grad = torch.empty((n_rows, n_cols), dtype=acc, device=policy.device)
    rewards = torch.empty((n_rows, n_cols), dtype=acc, device=policy.device) if store_rewards else None
    if n_rows:
        block_k = triton.next_power_of_2(n_cols)
        cap = 4096 if policy.device.type == "cuda" else INTERPRETER_TILE
        block_b = max(1, min(128, triton.next_power_of_2(n_rows), cap // block_k))
        _preference_fwd_kernel[(triton.cdiv(n_rows, block_b),)](
            policy,
            ref if ref is not None else policy,
            aux if aux is not None else policy,
            aux.stride(0) if aux is not None else 0,
            z0 if z0 is not None else policy,
            losses,
            grad,
            rewards if store_rewards else losses,
            n_rows,
            n_cols,
            beta,
            param_a,
            param_b,
            LOSS=loss_id,
            HAS_REF=ref is not None,
            STORE_REWARDS=store_rewards,
            ACC_DTYPE=tl_acc_dtype(acc),
            BLOCK_B=block_b,
            BLOCK_K=block_k,
        )
    return losses, grad, rewards


class _FusedPreference(torch.autograd.Function):
    """Losses from the fused kernel; the gradient is computed in the forward and scaled
    by the incoming gradient in the backward. Inputs are (B, K) in the accumulation
    dtype; ``margin`` (Bradley-Terry) is a (B,) tensor or None."""

    @staticmethod
    def forward(ctx, policy, ref, margin, aux, z0, loss_id, beta, param_a, param_b, store_rewards):
        losses, grad, rewards = _triton_launch(
            loss_id, policy, ref, margin if margin is not None else aux, z0,
            beta, param_a, param_b, store_rewards,
        )
        ctx.save_for_backward(grad)
        if rewards is not None:
            ctx.mark_non_differentiable(rewards)
        return losses, rewards

    @staticmethod
    def backward(ctx, grad_losses, _grad_rewards):
        (grad,) = ctx.saved_tensors
        need_policy, need_ref, need_margin = ctx.needs_input_grad[:3]
        grad_policy = grad_losses[:, None] * grad
        grad_ref = -grad_policy if need_ref else None
        grad_margin = None
        if need_margin:
            # Bradley-Terry: d/d margin = sig(-h) = (d/d s_r - d/d s_c) / 2, centering cancels.
            grad_margin = 0.5 * (grad_policy[:, 1] - grad_policy[:, 0])
        return (grad_policy if need_policy else None, grad_ref, grad_margin) + (None,) * 7


# --------------------------------------------------------------------- pure PyTorch


PREFERENCE_LOSSES = Registry("PREFERENCE_LOSSES", "loss_type")
# Each reference maps the margin h = x_chosen - x_rejected to the per-pair loss, with the
# label smoothing eps; param ``label_smoothing``: the allowed range of eps as
# (upper bound, whether it is excluded), or None where eps must be 0.


@PREFERENCE_LOSSES.register(
    "sigmoid", kernel_id=_SIGMOID, doc="`-(1-eps) log sigmoid(beta*h) - eps log sigmoid(-beta*h)` (DPO; cDPO)",
    peers="TRL `sigmoid`; OpenRLHF; verl", label_smoothing=(1.0, False),
)
def _dpo_sigmoid(h, beta, eps):
    u = beta * h
    return -(1.0 - eps) * F.logsigmoid(u) - eps * F.logsigmoid(-u)


@PREFERENCE_LOSSES.register(
    "hinge", kernel_id=_HINGE, doc="`max(0, 1 - beta*h)` (SLiC)", peers="TRL `hinge`; OpenRLHF", label_smoothing=None,
)
def _dpo_hinge(h, beta, eps):
    return torch.relu(1.0 - beta * h)


@PREFERENCE_LOSSES.register(
    "ipo", kernel_id=_IPO, doc="`(h - 1/(2*beta))**2` (IPO)", peers="TRL `ipo`; OpenRLHF `ipo`", label_smoothing=None,
)
def _dpo_ipo(h, beta, eps):
    return (h - 0.5 / beta) ** 2


@PREFERENCE_LOSSES.register(
    "robust", kernel_id=_ROBUST,
    doc="`(-(1-eps) log sigmoid(beta*h) + eps log sigmoid(-beta*h)) / (1 - 2*eps)` (rDPO)",
    peers="TRL `robust`", label_smoothing=(0.5, True),
)
def _dpo_robust(h, beta, eps):
    u = beta * h
    return (-(1.0 - eps) * F.logsigmoid(u) + eps * F.logsigmoid(-u)) / (1.0 - 2.0 * eps)


def _torch_bradley_terry(x, center_coef, margin):
    x0, x1 = x[:, 0], x[:, 1]
    h = x0 - x1 if margin is None else x0 - x1 - margin
    return -F.logsigmoid(h) + center_coef * (x0 + x1) ** 2


def _torch_losses(loss_id, policy, ref, margin, desirable, z0, beta, param_a, param_b):
    x = policy - ref if ref is not None else policy
    if loss_id == _PLACKETT_LUCE:
        u = beta * x
        # One logsumexp per position rather than logcumsumexp, whose fp32 backward
        # loses small gradients next to |u| ~ 1e4.
        return sum(torch.logsumexp(u[:, k:], dim=-1) - u[:, k] for k in range(u.shape[1] - 1))
    if loss_id == _RANKING:
        n_cols = x.shape[1]
        i, j = torch.triu_indices(n_cols, n_cols, offset=1, device=x.device)
        return -F.logsigmoid(x[:, i] - x[:, j]).sum(dim=-1) * param_a
    if loss_id == _KTO:
        u = beta * (x[:, 0] - z0)
        return torch.where(desirable, param_a * torch.sigmoid(-u), param_b * torch.sigmoid(u))
    if loss_id == _BRADLEY_TERRY:
        return _torch_bradley_terry(x, param_a, margin)
    dpo = next(variant for variant in PREFERENCE_LOSSES if variant.kernel_id == loss_id)
    return dpo.reference(x[:, 0] - x[:, 1], beta, param_a)


# ------------------------------------------------------------------------ shared


def _check_scores(shape_name: str, ndim: int, **named) -> torch.Size:
    """All named tensors (None skipped) are float, on one device, of one shape with
    ``ndim`` dimensions. Returns that shape."""
    present = {name: t for name, t in named.items() if t is not None}
    for name, t in present.items():
        check_tensor(name, t, FLOAT_DTYPES)
    check_same_device(**present)
    first_name, first = next(iter(present.items()))
    if first.dim() != ndim:
        raise ValueError(f"{first_name} must be {shape_name}, got shape {tuple(first.shape)}")
    for name, t in present.items():
        if t.shape != first.shape:
            raise ValueError(
                f"{name}.shape {tuple(t.shape)} does not match {first_name}.shape {tuple(first.shape)}"
            )
    return first.shape


def _check_beta(beta) -> float:
    return positive_scalar("beta", beta)


def _check_fraction(name: str, value, upper: float, upper_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    inside = 0.0 <= value < upper if upper_open else 0.0 <= value <= upper
    if not inside:
        bracket = ")" if upper_open else "]"
        raise ValueError(f"{name} must be in [0, {upper}{bracket}, got {value!r}")
    return float(value)


def _run(op, loss_id, policy, ref, *, beta=1.0, param_a=0.0, param_b=0.0,
         margin=None, desirable=None, z0=None, store_rewards=False, backend=None):
    """Dispatch a (B, K) policy / ref pair (already in the accumulation dtype) to a
    backend. Returns (losses, rewards (B, K) detached or None)."""

    def run_torch():
        losses = _torch_losses(loss_id, policy, ref, margin, desirable, z0, beta, param_a, param_b)
        rewards = None
        if store_rewards:
            rewards = (beta * (policy - ref if ref is not None else policy)).detach()
        return losses, rewards

    def run_triton():
        aux = desirable.view(torch.uint8) if desirable is not None else None
        fused_margin = margin
        if loss_id == _BRADLEY_TERRY and margin is None:  # the kernel always reads a margin
            fused_margin = torch.zeros((1,), dtype=policy.dtype, device=policy.device).expand(policy.shape[0])
        return _FusedPreference.apply(
            policy.contiguous(), ref.contiguous() if ref is not None else None,
            fused_margin, aux, z0, loss_id, beta, param_a, param_b, store_rewards,
        )

    return dispatch(op, policy.device, backend, torch=run_torch, triton=run_triton)()


# ------------------------------------------------------------------------- public


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None = None,
    ref_rejected: torch.Tensor | None = None,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    backend: str | None = None,
):
    """Direct Preference Optimization losses, one value per preference pair.

    With ``h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)``:

    * ``"sigmoid"``: ``-log sigmoid(beta*h)`` (DPO, all peers). With
      ``label_smoothing = eps > 0`` it is conservative DPO (cDPO, as OpenRLHF and
      torchtune): ``-(1-eps) log sigmoid(beta*h) - eps log sigmoid(-beta*h)``.
    * ``"hinge"``: ``max(0, 1 - beta*h)`` (SLiC; TRL, OpenRLHF).
    * ``"ipo"``: ``(h - 1/(2*beta))**2``; see ``ipo_loss`` for the log-prob averaging.
    * ``"robust"``: ``(-(1-eps) log sigmoid(beta*h) + eps log sigmoid(-beta*h)) /
      (1 - 2*eps)`` (rDPO; TRL), ``eps = label_smoothing < 0.5``.

    Args:
        policy_chosen, policy_rejected: (B,) log-probs of each response under the
            policy, summed over its tokens (``sequence_logprobs``).
        ref_chosen, ref_rejected: (B,) the same under the frozen reference, or both
            None for reference-free DPO (references of 0).
        beta: inverse temperature, > 0.
        loss_type: ``"sigmoid"``, ``"hinge"``, ``"ipo"`` or ``"robust"``.
        label_smoothing: the assumed label-noise rate eps; in [0, 1] for sigmoid,
            [0, 0.5) for robust, and must be 0 for hinge and ipo.
        backend: ``"triton"``, ``"torch"`` or None (automatic; see fastpo.kernels).

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each (B,) float32 (float64 if
        any input is float64). ``losses`` is differentiable with respect to every
        input; the implicit rewards ``beta*(policy - ref)`` are detached.
    """
    variant = PREFERENCE_LOSSES.get(loss_type)
    beta = _check_beta(beta)
    smoothing_range = variant.params["label_smoothing"]
    if smoothing_range is not None:
        label_smoothing = _check_fraction("label_smoothing", label_smoothing, *smoothing_range)
    elif label_smoothing != 0:
        smoothed = [v.name for v in PREFERENCE_LOSSES if v.params["label_smoothing"] is not None]
        raise ValueError(
            f"label_smoothing={label_smoothing!r} has no meaning for loss_type={loss_type!r}; "
            f"it applies to {' and '.join(repr(name) for name in smoothed)}"
        )
    if (ref_chosen is None) != (ref_rejected is None):
        raise ValueError(
            "ref_chosen and ref_rejected must both be given, or both be None for a "
            "reference-free loss"
        )
    _check_scores(
        "(B,)", 1, policy_chosen=policy_chosen, policy_rejected=policy_rejected,
        ref_chosen=ref_chosen, ref_rejected=ref_rejected,
    )
    acc = acc_dtype(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    policy = torch.stack([policy_chosen.to(acc), policy_rejected.to(acc)], dim=1)
    ref = None
    if ref_chosen is not None:
        ref = torch.stack([ref_chosen.to(acc), ref_rejected.to(acc)], dim=1)
    losses, rewards = _run(
        "dpo_loss", variant.kernel_id, policy, ref, beta=beta, param_a=label_smoothing,
        store_rewards=True, backend=backend,
    )
    return losses, rewards[:, 0], rewards[:, 1]


def ipo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None = None,
    ref_rejected: torch.Tensor | None = None,
    *,
    beta: float = 0.1,
    backend: str | None = None,
):
    """Identity Preference Optimization: ``(h - 1/(2*beta))**2`` per pair.

    ``h`` is built as in ``dpo_loss``. IPO's target margin ``1/(2*beta)`` is set
    against per-response log-probs, and peers disagree on their scale:

    * TRL (and fastpo's engine by default) averages each response's log-probs over
      its tokens: pass ``sequence_logprobs(..., average=True)``;
    * OpenRLHF sums them: pass ``sequence_logprobs(..., average=False)``.

    Args:
        policy_chosen, policy_rejected, ref_chosen, ref_rejected: (B,) per-response
            log-probs, averaged or summed as above; both refs None means zeros.
        beta: > 0.
        backend: ``"triton"``, ``"torch"`` or None (automatic).

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)`` as in ``dpo_loss``.
    """
    return dpo_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected,
        beta=beta, loss_type="ipo", backend=backend,
    )


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    policy_kl_logps: torch.Tensor,
    ref_kl_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    backend: str | None = None,
):
    """Kahneman-Tversky Optimization (TRL's formulation), one value per example.

    ``rw = policy_logps - ref_logps`` and ``z0 = max(0, mean(policy_kl_logps -
    ref_kl_logps))``, detached. A desirable example costs
    ``desirable_weight * (1 - sigmoid(beta*(rw - z0)))``, an undesirable one
    ``undesirable_weight * (1 - sigmoid(beta*(z0 - rw)))``.

    Args:
        policy_logps, ref_logps: (B,) summed log-probs of each completion.
        desirable: (B,) bool, True for a desirable completion.
        policy_kl_logps, ref_kl_logps: (M,) summed log-probs of mismatched
            prompt/completion pairs (``kto_mismatched_pairs``), M >= 1. They only
            set ``z0`` and receive no gradient.
        beta: > 0.
        desirable_weight, undesirable_weight: lambda_D, lambda_U >= 0.
        backend: ``"triton"``, ``"torch"`` or None (automatic).

    Returns:
        ``(losses, rewards, z0)``: losses (B,) differentiable with respect to
        ``policy_logps`` and ``ref_logps``; rewards ``beta*rw`` (B,) and the scalar
        ``z0``, both detached. float32 (float64 if any input is float64).
    """
    beta = _check_beta(beta)
    desirable_weight = nonnegative_scalar("desirable_weight", desirable_weight)
    undesirable_weight = nonnegative_scalar("undesirable_weight", undesirable_weight)
    shape = _check_scores("(B,)", 1, policy_logps=policy_logps, ref_logps=ref_logps)
    _check_scores("(M,)", 1, policy_kl_logps=policy_kl_logps, ref_kl_logps=ref_kl_logps)
    if policy_kl_logps.numel() == 0:
        raise ValueError("policy_kl_logps is empty: z0 needs at least one mismatched pair")
    check_tensor("desirable", desirable, (torch.bool,))
    if desirable.shape != shape:
        raise ValueError(
            f"desirable.shape {tuple(desirable.shape)} does not match policy_logps.shape {tuple(shape)}"
        )
    check_same_device(policy_logps=policy_logps, desirable=desirable, policy_kl_logps=policy_kl_logps)
    acc = acc_dtype(policy_logps, ref_logps, policy_kl_logps, ref_kl_logps)
    with torch.no_grad():
        z0 = (policy_kl_logps.to(acc) - ref_kl_logps.to(acc)).mean().clamp(min=0)
    losses, rewards = _run(
        "kto_loss", _KTO, policy_logps.to(acc)[:, None], ref_logps.to(acc)[:, None],
        beta=beta, param_a=desirable_weight, param_b=undesirable_weight,
        desirable=desirable, z0=z0, store_rewards=True, backend=backend,
    )
    return losses, rewards[:, 0], z0


def kto_mismatched_pairs(batch: dict) -> dict:
    """The mismatched prompt/completion pairs that KTO's ``z0`` is estimated on.

    Each example's prompt is paired with the completion of the previous example in
    the batch (a rotation by one, as TRL does): ``out["completion"][i] =
    batch["completion"][i - 1]``.

    Args:
        batch: a dict with at least the keys ``"prompt"`` and ``"completion"``; every
            value is a list, tuple or tensor of one length B >= 2 along its first
            dimension. Every key that starts with ``"completion"`` (for example
            ``"completion_mask"``) is rotated with the completions; all other keys
            (the prompts and their masks, labels...) are kept as they are.

    Returns:
        A new dict with the same keys and value types. Run the policy and the
        reference on it to get ``policy_kl_logps`` and ``ref_kl_logps``.
    """
    if not isinstance(batch, dict):
        raise TypeError(f"batch must be a dict, got {type(batch).__name__}")
    for key in ("prompt", "completion"):
        if key not in batch:
            raise ValueError(f"batch needs a {key!r} key, got keys {sorted(batch)}")
    lengths = {}
    for key, value in batch.items():
        if not isinstance(value, (list, tuple, torch.Tensor)):
            raise TypeError(f"batch[{key!r}] must be a list, tuple or tensor, got {type(value).__name__}")
        if isinstance(value, torch.Tensor) and value.dim() == 0:
            raise ValueError(f"batch[{key!r}] is a 0-dim tensor; it needs a batch dimension")
        lengths[key] = len(value)
    if len(set(lengths.values())) != 1:
        raise ValueError(f"batch values must all have one length, got {lengths}")
    size = lengths["completion"]
    if size < 2:
        raise ValueError(
            f"batch has {size} example(s): mismatched pairs need at least 2, since each "
            "prompt is paired with another example's completion"
        )
    pairs = {}
    for key, value in batch.items():
        if not key.startswith("completion"):
            pairs[key] = value
        elif isinstance(value, torch.Tensor):
            pairs[key] = torch.roll(value, shifts=1, dims=0)
        else:
            pairs[key] = type(value)([value[-1], *value[:-1]])
    return pairs


def plackett_luce_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor | None = None,
    *,
    beta: float = 0.1,
    backend: str | None = None,
) -> torch.Tensor:
    """DPO over K >= 2 ranked responses (Plackett-Luce), one value per prompt.

    ``-sum_{k=1..K-1} log( exp(beta*h_k) / sum_{j>=k} exp(beta*h_j) )`` with
    ``h_k = policy_logps[:, k] - ref_logps[:, k]``. For K = 2 this is
    ``dpo_loss(loss_type="sigmoid")``. No peer offers it (TRL, OpenRLHF, verl).

    Args:
        policy_logps: (B, K) summed log-probs, responses ordered best first.
        ref_logps: (B, K) under the reference, or None (zeros).
        beta: > 0.
        backend: ``"triton"``, ``"torch"`` or None (automatic).

    Returns:
        (B,) float32 (float64 for float64 input), differentiable.
    """
    beta = _check_beta(beta)
    shape = _check_scores("(B, K)", 2, policy_logps=policy_logps, ref_logps=ref_logps)
    if shape[1] < 2:
        raise ValueError(f"policy_logps needs K >= 2 ranked responses, got shape {tuple(shape)}")
    acc = acc_dtype(policy_logps, ref_logps)
    losses, _ = _run(
        "plackett_luce_loss", _PLACKETT_LUCE, policy_logps.to(acc),
        ref_logps.to(acc) if ref_logps is not None else None, beta=beta, backend=backend,
    )
    return losses


def bradley_terry_loss(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    *,
    margin: float | torch.Tensor | None = None,
    center_coef: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Reward-model pairwise loss: ``-log sigmoid(r_c - r_r - margin) + c*(r_c + r_r)**2``.

    The centering term is written per example, so that the mean of the returned
    losses equals TRL's ``... + center_rewards_coefficient * mean((r_c + r_r)**2)``.

    Args:
        chosen_scores, rejected_scores: (B,) reward-model scores.
        margin: None (0), a float, or a (B,) tensor (as TRL's ``margin`` column);
            a tensor that requires grad receives one.
        center_coef: c >= 0 (TRL's ``center_rewards_coefficient``).
        backend: ``"triton"``, ``"torch"`` or None (automatic).

    Returns:
        (B,) float32 (float64 for float64 input), differentiable.
    """
    shape = _check_scores("(B,)", 1, chosen_scores=chosen_scores, rejected_scores=rejected_scores)
    center_coef = nonnegative_scalar("center_coef", center_coef)
    acc = acc_dtype(chosen_scores, rejected_scores, margin if isinstance(margin, torch.Tensor) else None)
    if isinstance(margin, torch.Tensor):
        _check_scores("(B,)", 1, chosen_scores=chosen_scores, margin=margin)
        margin = margin.to(acc)
    elif margin is not None:
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
            raise ValueError(f"margin must be None, a finite float or a (B,) tensor, got {margin!r}")
        margin = torch.full((1,), float(margin), dtype=acc, device=chosen_scores.device).expand(shape)
    scores = torch.stack([chosen_scores.to(acc), rejected_scores.to(acc)], dim=1)
    losses, _ = _run(
        "bradley_terry_loss", _BRADLEY_TERRY, scores, None, param_a=center_coef,
        margin=margin, backend=backend,
    )
    return losses


def ranking_loss(scores: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """K-wise reward-model ranking loss (InstructGPT), one value per prompt.

    ``-1/C(K,2) * sum_{i<j} log sigmoid(scores[:, i] - scores[:, j])`` for responses
    ranked best first. For K = 2 this is ``bradley_terry_loss`` without margin or
    centering. TRL and OpenRLHF train on pairs only.

    Args:
        scores: (B, K) reward-model scores, K >= 2, best first.
        backend: ``"triton"``, ``"torch"`` or None (automatic).

    Returns:
        (B,) float32 (float64 for float64 input), differentiable.
    """
    shape = _check_scores("(B, K)", 2, scores=scores)
    if shape[1] < 2:
        raise ValueError(f"scores needs K >= 2 ranked responses, got shape {tuple(shape)}")
    acc = acc_dtype(scores)
    losses, _ = _run(
        "ranking_loss", _RANKING, scores.to(acc), None, param_a=1.0 / math.comb(shape[1], 2),
        backend=backend,
    )
    return losses
