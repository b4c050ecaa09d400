"""Clipped-surrogate policy losses (PPO/GRPO family), KL estimators and the PPO value loss.

Every formula is written in docs/conventions.md; docs/rl-losses.md maps each option
to the peer (TRL, verl, OpenRLHF) it matches. Notation: ``lp`` current log-probs,
``lp_old`` log-probs of the policy that sampled the rollouts, ``m`` the 0/1 token mask,
``A`` the advantage, ``r = exp(lp - lp_old)``.

Variants are registered once, with their torch reference and their kernel id, in
``POLICY_LOSSES`` (loss types), ``KL_ESTIMATORS`` and ``AGGREGATIONS`` (see
kernels/registry.py); every scalar option of ``policy_loss`` is a field of
``PolicyLossOptions``, whose construction validates it.

Fused path (Triton). One program per sequence walks over its tokens in blocks and, in
the forward, computes both the per-token loss ``L_t`` and ``m_t * dL_t/dlp_t``; it
writes per-row partial sums (the loss and every metric) and the per-token gradient.
The aggregation is then a weighted sum of row sums, ``loss = sum_i c_i * rowsum_i``
with one weight ``c_i`` per row (the ``AGGREGATIONS`` references), so the autograd
backward only multiplies the saved gradient by ``grad_output * c_i``. When the ratio or
the rollout correction is per sequence (GSPO, sequence-level IS) a first pass over the
row computes the row's sums; a sequence ratio couples every token of a row, so a last
pass adds ``m_t * ds_i/dlp_t * sum_t' dL_t'/ds_i`` to the row's gradient.

The torch backend composes the same formulas, the registered references, with eager
PyTorch ops and autograd.

Float hyperparameters (clip bounds, coefficients, caps) reach the Triton kernels as
fp32 scalars, as Triton passes Python floats; with float64 inputs the arithmetic is
float64 but a bound such as 0.8 is the fp32 number nearest to it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass

import torch

from ._backend import dispatch
from ._launch import HAS_TRITON, acc_dtype, host_reads_free, on_tensor_device, tl_acc_dtype
from ._select import largest_values
from ._validate import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_same_device,
    check_tensor,
    finite_scalar,
    nonnegative_scalar,
    positive_scalar,
)
from .registry import Registry

if HAS_TRITON:
    import triton
    import triton.language as tl

# ------------------------------------------------------------------ KL estimators

KL_ESTIMATORS = Registry("KL_ESTIMATORS", "kl_kind")
# Kernel ids start at 1: the policy-loss kernel reads KL_KIND=0 as "no reference given".


@KL_ESTIMATORS.register("k1", kernel_id=1, doc="`d`", peers="TRL PPO/RLOO; verl `kl`/`k1`; OpenRLHF `k1`")
def _kl_k1(d: torch.Tensor) -> torch.Tensor:
    return d


@KL_ESTIMATORS.register("k2", kernel_id=2, doc="`0.5 * d**2`", peers="verl `mse`/`k2`; OpenRLHF `k2`")
def _kl_k2(d: torch.Tensor) -> torch.Tensor:
    return 0.5 * d * d


@KL_ESTIMATORS.register(
    "k3", kernel_id=3, doc="`exp(-d) + d - 1`, not clamped",
    peers="TRL GRPO `beta`; OpenRLHF `k3` with `kl_clamp=10`",
)
def _kl_k3(d: torch.Tensor) -> torch.Tensor:
    return torch.exp(-d) + d - 1.0


@KL_ESTIMATORS.register("abs", kernel_id=4, doc="`abs(d)` (derivative 0 at `d = 0`)", peers="verl `abs`")
def _kl_abs(d: torch.Tensor) -> torch.Tensor:
    return d.abs()


@KL_ESTIMATORS.register(
    "low_var_kl", kernel_id=5,
    doc="k3 with `d` clamped to [-20, 20], the result clamped to [-10, 10]; no gradient where a clamp is active",
    peers="verl `low_var_kl` and `k3`",
)
def _kl_low_var(d: torch.Tensor) -> torch.Tensor:
    clamped = d.clamp(-20.0, 20.0)
    return (torch.exp(-clamped) + clamped - 1.0).clamp(-10.0, 10.0)


# ------------------------------------------------------------------ aggregations

AGGREGATIONS = Registry("AGGREGATIONS", "agg")
# Each reference returns the weight c_i of every row's loss sum (loss = sum_i c_i * rowsum_i)
# from the rows' valid-token counts; ``rows`` is the number of sequences the seq-mean
# modes divide by (the batch size, or the rows with a valid token: seq_mean_rows).
# They run on both backends: the aggregation is not in a kernel (kernel_id None).


@AGGREGATIONS.register(
    "token-mean", kernel_id=None, doc="`sum(L*m) / N`, `N = num_items` if given, else this call's `sum(m)`",
    peers="TRL `bnpo` (local count), `dapo`/`cispo` (global); verl default; OpenRLHF token level",
)
def _agg_token_mean(counts, rows, num_items, max_len):
    if num_items is None:
        total = counts.sum()
    else:
        total = torch.as_tensor(num_items, device=counts.device).detach().to(counts.dtype).reshape(())
    return (1.0 / total.clamp(min=1.0)).expand(counts.shape[0])


@AGGREGATIONS.register(
    "seq-mean-token-mean", kernel_id=None, doc="`mean_i( sum_t L*m / max(1, n_i) )`",
    peers="TRL `grpo`, `sapo`; verl; OpenRLHF per-sample (`seq_mean_rows='nonempty'`)",
)
def _agg_seq_mean_token_mean(counts, rows, num_items, max_len):
    return 1.0 / (rows * counts.clamp(min=1.0))


@AGGREGATIONS.register("seq-mean-token-sum", kernel_id=None, doc="`mean_i( sum_t L*m )`", peers="verl")
def _agg_seq_mean_token_sum(counts, rows, num_items, max_len):
    return (1.0 / rows) * torch.ones_like(counts)


@AGGREGATIONS.register(
    "seq-mean-token-sum-norm", kernel_id=None, doc="`sum(L*m) / (B * max_len)`, `max_len` a constant",
    peers="TRL `dr_grpo`; verl (`loss_scale_factor`)",
)
def _agg_seq_mean_token_sum_norm(counts, rows, num_items, max_len):
    return (1.0 / (rows * max_len)) * torch.ones_like(counts)


# ------------------------------------------------------------------ policy-loss types

POLICY_LOSSES = Registry("POLICY_LOSSES", "loss_type")
# Kernel ids of the policy term; the loss types sharing an id share the formula and
# differ in their default aggregation and ratio (params "agg", "sequence_ratio").
_PPO, _CISPO, _SAPO, _GPG, _GEO_MEAN, _DPPO_TV, _DPPO_KL, _DRO, _CLIP_COV, _KL_COV, _VESPO = range(11)
# Loss types that pick tokens by the covariance of A and lp over the batch.
_COVARIANCE_KINDS = (_CLIP_COV, _KL_COV)
# A registered reference maps (ratio, adv, lp, old, valid, options, selected), every tensor
# (B, T) and already 0 at masked positions (``old`` detached; ``selected`` the tokens
# Clip-Cov / KL-Cov picked, None for the other types), to (policy term, low-clip hits,
# high-clip hits, dual-clip hits), the three bool tensors feeding the metrics.


def _ppo_clip(ratio, adv, lp, old, valid, o, selected):
    lo, hi = 1.0 - o.clip_eps_low, 1.0 + o.eps_high
    unclipped = ratio.clamp(max=o.delta) if o.delta is not None else ratio
    policy = -torch.minimum(unclipped * adv, ratio.clamp(lo, hi) * adv)
    dual_hit = torch.zeros_like(valid)
    if o.dual_clip is not None:
        bound = -o.dual_clip * adv
        dual_hit = valid & (adv < 0) & (bound < policy)
        policy = torch.where(adv < 0, torch.minimum(policy, bound), policy)
    return policy, valid & (ratio < lo) & (adv < 0), valid & (ratio > hi) & (adv > 0), dual_hit


for _name, _agg, _peers in (
    ("grpo", "seq-mean-token-mean", "TRL `loss_type='grpo'`; verl `vanilla`; OpenRLHF `ppo`"),
    ("bnpo", "token-mean", "TRL `loss_type='bnpo'`"),
    ("dr_grpo", "seq-mean-token-sum-norm", "TRL `loss_type='dr_grpo'`"),
    ("dapo", "token-mean", "TRL `loss_type='dapo'`"),
):
    POLICY_LOSSES.register(
        _name, kernel_id=_PPO, doc="PPO clip `-min(r*A, clip(r, 1-eps_low, 1+eps_high)*A)`", peers=_peers,
        agg=_agg, sequence_ratio=False,
    )(_ppo_clip)


@POLICY_LOSSES.register(
    "cispo", kernel_id=_CISPO, doc="`-stopgrad(clip(r, cispo_ratio_min, clip_eps_high)) * A * lp`",
    peers="TRL `loss_type='cispo'`; verl `cispo`", agg="token-mean", sequence_ratio=False,
)
def _cispo(ratio, adv, lp, old, valid, o, selected):
    cap = o.eps_high
    policy = -ratio.clamp(min=o.cispo_ratio_min, max=cap).detach() * adv * lp
    low_hit = torch.zeros_like(valid)
    if o.cispo_ratio_min is not None:
        low_hit = valid & (ratio < o.cispo_ratio_min) & (adv < 0)
    return policy, low_hit, valid & (ratio > cap) & (adv > 0), torch.zeros_like(valid)


@POLICY_LOSSES.register(
    "sapo", kernel_id=_SAPO, doc="soft gate `-sigmoid(tau*(r-1)) * 4/tau * A`",
    peers="TRL `loss_type='sapo'`; verl `sapo`", agg="seq-mean-token-mean", sequence_ratio=False,
)
def _sapo(ratio, adv, lp, old, valid, o, selected):
    tau = torch.where(adv > 0, o.sapo_tau_pos, o.sapo_tau_neg).to(ratio.dtype)
    none = torch.zeros_like(valid)
    return -torch.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau * adv, none, none, none


POLICY_LOSSES.register(
    "gspo", kernel_id=_PPO, doc="PPO clip of the sequence ratio `s_i`",
    peers="TRL `importance_sampling_level='sequence'`; verl `gspo`; OpenRLHF `gspo`",
    agg="seq-mean-token-mean", sequence_ratio=True,
)(_ppo_clip)



@POLICY_LOSSES.register(
    "gpg", kernel_id=_GPG, doc="`-A * lp`: the policy gradient itself, no ratio and no clip",
    peers="verl `gpg`", agg="token-mean", sequence_ratio=False,
)
def _gpg(ratio, adv, lp, old, valid, o, selected):
    none = torch.zeros_like(valid)
    return -adv * lp, none, none, none


def _gmpo_log_ratio(log_ratio: torch.Tensor, adv: torch.Tensor, o) -> torch.Tensor:
    """GMPO's per-token log-ratio: clipped to [-clip_eps_low, clip_eps_high] on the side
    the advantage rewards only (``min(d, clip_eps_high)`` for A > 0, ``max(d,
    -clip_eps_low)`` for A < 0), 0 where A = 0. Its derivative, 1 where ``d`` passes
    through and 0 where the clip (or A = 0) holds it, is applied as a constant slope: a
    few detached ops instead of autograd through the clamps and selections."""
    with torch.no_grad():
        d = log_ratio.detach()
        up, down = adv > 0, adv < 0
        value = torch.where(up, d.clamp(max=o.eps_high), d.clamp(min=-o.clip_eps_low)) * (up | down)
        slope = (up & (d <= o.eps_high)) | (down & (d >= -o.clip_eps_low))
    return value + slope * (log_ratio - d)


@POLICY_LOSSES.register(
    "geo_mean", kernel_id=_GEO_MEAN,
    doc="GMPO `-A * g_i`, `g_i = exp(mean_t clip_A(lp - lp_old))`: the geometric mean of the token ratios, "
        "each clipped in log space on the side its advantage rewards",
    peers="verl `geo_mean` (`seq_mean_rows='all'`)", agg="seq-mean-token-mean", sequence_ratio=True,
)
def _geo_mean(ratio, adv, lp, old, valid, o, selected):
    log_ratio = lp.detach() - old
    outside = valid & ((log_ratio < -o.clip_eps_low) | (log_ratio > o.eps_high))
    return -adv * ratio, outside & (adv < 0), outside & (adv > 0), torch.zeros_like(valid)


def _dppo_kept_torch(lp, old, adv, o, binary_kl: bool) -> torch.Tensor:
    """DPPO's trust region on the sampled token's probabilities p = exp(lp), q = exp(lp_old):
    a token is dropped when the divergence moved past the threshold in the direction its
    advantage pushes (clip_eps_high for A > 0, clip_eps_low otherwise)."""
    p, q = lp.exp(), old.exp()
    if binary_kl:
        divergence = q * (old - lp) + (1.0 - q) * torch.log((1.0 - q + 1e-8) / (1.0 - p + 1e-8))
        up, down = (divergence <= o.eps_high) | (p <= q), (divergence <= o.clip_eps_low) | (p >= q)
    else:
        up, down = p - q <= o.eps_high, p - q >= -o.clip_eps_low
    return torch.where(adv > 0, up, down)


def _dppo(ratio, adv, lp, old, valid, o, binary_kl: bool):
    with torch.no_grad():
        kept = _dppo_kept_torch(lp, old, adv, o, binary_kl)
    policy = -adv * ratio.clamp(max=o.dppo_ratio_cap).detach() * lp * kept
    dropped = valid & ~kept
    return policy, dropped & ~(adv > 0), dropped & (adv > 0), torch.zeros_like(valid)


@POLICY_LOSSES.register(
    "dppo_tv", kernel_id=_DPPO_TV,
    doc="`-A * stopgrad(min(r, dppo_ratio_cap)) * lp`, tokens whose `p - q` left "
        "`[-clip_eps_low, clip_eps_high]` in the advantage's direction dropped",
    peers="verl `dppo_tv`", agg="token-mean", sequence_ratio=False,
)
def _dppo_tv(ratio, adv, lp, old, valid, o, selected):
    return _dppo(ratio, adv, lp, old, valid, o, binary_kl=False)


@POLICY_LOSSES.register(
    "dppo_kl", kernel_id=_DPPO_KL,
    doc="as `dppo_tv` with the binary KL `q log(q/p) + (1-q) log((1-q)/(1-p))` as the divergence",
    peers="verl `dppo_kl`", agg="token-mean", sequence_ratio=False,
)
def _dppo_kl(ratio, adv, lp, old, valid, o, selected):
    return _dppo(ratio, adv, lp, old, valid, o, binary_kl=True)


@POLICY_LOSSES.register(
    "dro", kernel_id=_DRO, doc="`-(A * lp - dro_beta/2 * (lp - lp_old)**2)`",
    peers="verl `dro`", agg="token-mean", sequence_ratio=False,
)
def _dro(ratio, adv, lp, old, valid, o, selected):
    log_ratio = lp - old
    none = torch.zeros_like(valid)
    return -(adv * lp - 0.5 * o.dro_beta * log_ratio * log_ratio), none, none, none


@POLICY_LOSSES.register(
    "clip_cov", kernel_id=_CLIP_COV,
    doc="PPO clip; `cov_ratio` of the tokens, drawn at random among the unclipped ones whose covariance "
        "`(A - mean A)(lp - mean lp)` is in `(clip_cov_lb, clip_cov_ub)`, dropped",
    peers="verl `clip_cov`", agg="token-mean", sequence_ratio=False,
)
def _clip_cov(ratio, adv, lp, old, valid, o, selected):
    policy, low_hit, high_hit, dual_hit = _ppo_clip(ratio, adv, lp, old, valid, o, None)
    return torch.where(selected, torch.zeros_like(policy), policy), low_hit, high_hit, dual_hit


@POLICY_LOSSES.register(
    "kl_cov", kernel_id=_KL_COV,
    doc="`-r*A` (no clip), `+ kl_cov_coef * abs(lp - lp_old)` on the `cov_ratio` of the tokens with the "
        "largest covariance `(A - mean A)(lp - mean lp)`",
    peers="verl `kl_cov`", agg="token-mean", sequence_ratio=False,
)
def _kl_cov(ratio, adv, lp, old, valid, o, selected):
    penalty = o.kl_cov_coef * (lp - old).abs()
    none = torch.zeros_like(valid)
    return -adv * ratio + torch.where(selected, penalty, torch.zeros_like(penalty)), none, none, none


POLICY_LOSSES.register(
    "luspo", kernel_id=_PPO, doc="PPO clip, each sequence's token sum averaged over the sequences",
    peers="TRL `loss_type='luspo'` (with `importance_level='sequence'`, as TRL recommends)",
    agg="seq-mean-token-sum", sequence_ratio=False,
)(_ppo_clip)

# log(1e-8): the lower clamp of VESPO's log sequence weight (TRL's)
_VESPO_LOG_W_MIN = math.log(1e-8)


def _vespo_weight(lp, old, adv, o) -> torch.Tensor:
    """VESPO's detached gamma weight ``phi(w) = exp(lam + k log w - lam w)`` (phi(1) = 1)
    of the sequence ratio ``w = exp(sum_t clamp(lp - lp_old, -20, 20))``, log w clamped to
    [log 1e-8, 20]; (k, lam) by the sign of A (A >= 0: the _pos pair), lam >= 1e-4; a
    non-finite phi is 0."""
    with torch.no_grad():
        log_w = (lp - old).clamp(-20.0, 20.0).sum(-1, keepdim=True).clamp(_VESPO_LOG_W_MIN, 20.0)
        nonneg = adv >= 0
        # Python-float pairs become fp32 scalars, as in TRL (and in the kernel)
        k = torch.where(nonneg, o.vespo_k_pos, o.vespo_k_neg).to(lp.dtype)
        lam = torch.where(nonneg, o.vespo_lambda_pos, o.vespo_lambda_neg).to(lp.dtype).clamp(min=1e-4)
        phi = torch.exp(lam + k * log_w - lam * log_w.exp())
        return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


@POLICY_LOSSES.register(
    "vespo", kernel_id=_VESPO,
    doc="`-phi(w_i) * A * lp`, `phi(w) = exp(lam + k log w - lam w)` a detached gamma weight of the "
        "sequence ratio `w_i = exp(sum_t clamp(lp - lp_old, -20, 20))`",
    peers="TRL `loss_type='vespo'`", agg="token-mean", sequence_ratio=False,
)
def _vespo(ratio, adv, lp, old, valid, o, selected):
    none = torch.zeros_like(valid)
    return -_vespo_weight(lp, old, adv, o) * adv * lp, none, none, none


def _covariance_selection(lp, old, adv, valid, o) -> torch.Tensor:
    """The (B, T) bool tokens Clip-Cov or KL-Cov picks from this call's valid tokens, from
    the raw inputs (the Triton path's; the torch path has these masked tensors already and
    calls ``_covariance_pick`` itself)."""
    acc = acc_dtype(lp)
    with torch.no_grad():
        zero = torch.zeros((), dtype=acc, device=lp.device)
        lp = torch.where(valid, lp.detach().to(acc), zero)
        adv = adv.detach().to(acc)
        adv = torch.where(valid, adv.unsqueeze(-1) if adv.dim() == 1 else adv, zero)
        ratio = None
        if POLICY_LOSSES.get(o.loss_type).kernel_id == _CLIP_COV:
            log_ratio = lp - torch.where(valid, old.detach().to(acc), zero)
            if o.log_ratio_clamp is not None:
                log_ratio = log_ratio.clamp(-o.log_ratio_clamp, o.log_ratio_clamp)
            ratio = log_ratio.exp()
        return _covariance_pick(lp, adv, ratio, valid, valid.sum(), o)


def _covariance_pick(lp, adv, ratio, valid, n, o) -> torch.Tensor:
    """Clip-Cov's or KL-Cov's tokens from ``lp`` and ``adv`` (B, T), detached, in the
    accumulation dtype and 0 at masked positions, (Clip-Cov) the token ratio, and ``n``
    the number of valid tokens (a 0-dim tensor).

    The covariance is ``(A_t - mean A) * (lp_t - mean lp)`` with masked means over the
    call, and the count ``k = max(1, floor(cov_ratio * n_valid))`` (verl's). No host sync:
    ``k`` stays a tensor; the ``k_max = max(1, floor(cov_ratio * B * T)) >= k`` largest
    values (a static count, small: cov_ratio is ~2e-4), found by
    ``_select.largest_values`` in one reduction over the batch rather than a ``topk``
    over all B * T tokens (8 ms at 512 x 1024 on the CPU), give the k-th by an index read,
    and the selection is a comparison with it. KL-Cov takes the k largest covariances;
    Clip-Cov takes k candidates at random (the k largest of uniform keys; every
    candidate when there are fewer than k); on the CPU, where counting is free, from the
    positions of the tokens in the covariance band.
    """
    if lp.numel() == 0:
        return valid.clone()
    count = n.clamp(min=1).to(lp.dtype)
    cov = (adv - adv.sum() / count).mul_(lp - lp.sum() / count)
    k = (o.cov_ratio * n.to(torch.float64)).floor().clamp(min=1).long().reshape(1)
    k_max = max(1, int(o.cov_ratio * lp.numel()))
    if ratio is None:  # KL-Cov
        scores = torch.where(valid, cov, -math.inf)
        threshold = largest_values(scores.reshape(1, -1), k_max)[0, k - 1]
        return valid & (scores >= threshold)
    in_band = cov > o.clip_cov_lb
    in_band &= cov < o.clip_cov_ub
    if host_reads_free(lp):
        # the band's tokens by position, then the clip test and random keys for them
        # alone (a key per token, torch.rand over B * T, was most of the selection's time)
        band = in_band.view(-1).nonzero().squeeze(1)
        token_ratio, advantage = ratio.reshape(-1)[band], adv.reshape(-1)[band]
        excess = token_ratio - token_ratio.clamp(1.0 - o.clip_eps_low, 1.0 + o.eps_high)
        candidates = band[(excess * advantage <= 0) & valid.reshape(-1)[band]]
        chosen = candidates[torch.rand(candidates.numel()).topk(min(int(k), candidates.numel())).indices]
        return torch.zeros_like(in_band).view(-1).index_fill_(0, chosen, True).view_as(in_band)
    # the PPO clip is active (-A*clip(r) > -A*r) where A and r - clip(r) have one sign
    # (in-place steps: each fresh (B, T) temporary costs about as much as the arithmetic)
    excess = ratio.clamp(1.0 - o.clip_eps_low, 1.0 + o.eps_high)
    candidate = torch.sub(ratio, excess, out=excess).mul_(adv) <= 0
    candidate &= valid
    candidate &= in_band
    keys = torch.rand(lp.shape, device=lp.device)
    keys = torch.where(candidate, keys, keys.new_full((), -math.inf), out=keys)
    # keys >= 0 are exactly the candidates': with fewer than k, the k-th is -inf, and 0 keeps them all
    threshold = largest_values(keys.reshape(1, -1), k_max)[0, k - 1].clamp(min=0.0)
    return keys >= threshold


# The aggregation of each loss type when ``agg`` is None (TRL GRPOTrainer's; verl's
# default, token-mean, for the loss types TRL does not have; verl's geo_mean averages
# over sequences whatever its loss_agg_mode).
PRESET_AGG = {variant.name: variant.params["agg"] for variant in POLICY_LOSSES}

# ------------------------------------------------------------------ options

IMPORTANCE_LEVELS = ("token", "sequence")
ROLLOUT_IS_LEVELS = ("token", "sequence")
ROLLOUT_IS_MODES = ("truncate", "mask")
ROLLOUT_IS_GATINGS = ("ratio", "binary_kl", "tv")  # kernel ids: their positions
ROLLOUT_IS_SEQ_RATIOS = ("product", "geometric_mean")
ROLLOUT_IS_WEIGHTS = ("unit", "token", "none")  # kernel ids: their positions
# verl's rollout rejection: a KL estimator of lp_old - lp_rollout per token, or its sum,
# mean or max over the sequence
ROLLOUT_RS = (
    "token_k1", "token_k2", "token_k3", "seq_sum_k1", "seq_sum_k2", "seq_sum_k3",
    "seq_mean_k1", "seq_mean_k2", "seq_mean_k3", "seq_max_k2", "seq_max_k3",
)
SEQ_MEAN_ROWS = ("all", "nonempty")
ENTROPY_AGGS = ("loss", "token-mean")


def _check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        message = f"{name}={value!r} is not one of {', '.join(repr(c) for c in choices)}"
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        raise ValueError(message + (f"; did you mean {close[0]!r}?" if close else ""))


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


def _check_max_len(agg: str, max_len, hint: str = ""):
    """``max_len`` is required by seq-mean-token-sum-norm and refused elsewhere."""
    if agg == "seq-mean-token-sum-norm":
        if max_len is None:
            raise ValueError(f"agg='seq-mean-token-sum-norm'{hint} needs max_len")
        return _check_count("max_len", max_len, allow_zero=False)
    if max_len is not None:
        raise ValueError(f"max_len applies to agg='seq-mean-token-sum-norm' only, not {agg!r}")
    return None


def _check_num_items(agg: str, num_items, device: torch.device):
    """A global token count, for token-mean only."""
    if num_items is None:
        return None
    if agg != "token-mean":
        raise ValueError(f"num_items applies to agg='token-mean' only, not {agg!r}")
    num_items = _check_count("num_items", num_items, allow_zero=True)
    if isinstance(num_items, torch.Tensor) and num_items.device != device:
        num_items = num_items.to(device)
    return num_items


@dataclass(frozen=True)
class PolicyLossOptions:
    """Every scalar and choice option of :func:`policy_loss` (all but the tensors,
    ``num_items`` and ``backend``), validated once, at construction: a bad value or a
    bad combination raises ValueError (TypeError for a wrong type) whose message starts
    with the option's name. Field meanings: :func:`policy_loss` and docs/rl-losses.md.

    ``PolicyLossOptions(**config_subset)`` builds it from a config in one line;
    :meth:`field_names` lists the fields, :meth:`matching` gives a peer's conventions.
    """

    loss_type: str = "grpo"
    clip_eps_low: float = 0.2
    clip_eps_high: float | None = None
    delta: float | None = None
    dual_clip: float | None = None
    importance_level: str = "token"
    kl_coef: float = 0.0
    kl_kind: str = "k3"
    entropy_coef: float = 0.0
    entropy_quantile: float | None = None
    rollout_is: str = "token"
    rollout_is_cap: float | None = None
    agg: str | None = None
    max_len: int | None = None
    sapo_tau_pos: float = 1.0
    sapo_tau_neg: float = 1.05
    dppo_ratio_cap: float = 20.0
    dro_beta: float | None = None
    cov_ratio: float = 0.0002
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    kl_cov_coef: float = 0.1
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    # conformance with the peers' code (docs/rl-losses.md, "Peer conventions")
    kl_ratio_weighted: bool = False
    kl_clamp: float | None = None
    log_ratio_clamp: float | None = None
    seq_log_ratio_cap: float | None = None
    cispo_ratio_min: float | None = None
    seq_mean_rows: str = "all"
    entropy_agg: str = "loss"
    # rollout-mismatch correction beyond truncation (OpenRLHF's is_correction_*, TRL's *_mask)
    rollout_is_mode: str = "truncate"
    rollout_is_min: float | None = None
    rollout_is_gating: str = "ratio"
    rollout_is_seq_ratio: str = "product"
    rollout_is_weight: str = "unit"
    rollout_rs: str | None = None
    rollout_rs_min: float | None = None
    rollout_rs_max: float | None = None
    off_policy_mask_threshold: float | None = None

    def __post_init__(self):
        def set_(name, value):
            object.__setattr__(self, name, value)

        POLICY_LOSSES.check(self.loss_type)
        KL_ESTIMATORS.check(self.kl_kind)
        for name, choices in (
            ("importance_level", IMPORTANCE_LEVELS), ("rollout_is", ROLLOUT_IS_LEVELS),
            ("rollout_is_mode", ROLLOUT_IS_MODES), ("rollout_is_gating", ROLLOUT_IS_GATINGS),
            ("rollout_is_seq_ratio", ROLLOUT_IS_SEQ_RATIOS), ("rollout_is_weight", ROLLOUT_IS_WEIGHTS),
            ("seq_mean_rows", SEQ_MEAN_ROWS), ("entropy_agg", ENTROPY_AGGS),
        ):
            _check_choice(name, getattr(self, name), choices)
        if self.agg is not None:
            AGGREGATIONS.check(self.agg)
        if not isinstance(self.kl_ratio_weighted, bool):
            raise TypeError(f"kl_ratio_weighted must be a bool, got {self.kl_ratio_weighted!r}")

        set_("clip_eps_low", positive_scalar("clip_eps_low", self.clip_eps_low))
        for name in ("clip_eps_high", "delta", "dual_clip", "rollout_is_cap", "kl_clamp", "log_ratio_clamp"):
            if getattr(self, name) is not None:
                set_(name, positive_scalar(name, getattr(self, name)))
        for name in ("sapo_tau_pos", "sapo_tau_neg", "dppo_ratio_cap"):
            set_(name, positive_scalar(name, getattr(self, name)))
        for name in ("kl_coef", "entropy_coef", "clip_cov_lb", "clip_cov_ub", "kl_cov_coef", "vespo_k_pos",
                     "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"):
            set_(name, finite_scalar(name, getattr(self, name)))
        for name in ("cispo_ratio_min", "rollout_is_min"):
            if getattr(self, name) is not None:
                set_(name, nonnegative_scalar(name, getattr(self, name)))
        if self.seq_log_ratio_cap is not None:
            set_("seq_log_ratio_cap", finite_scalar("seq_log_ratio_cap", self.seq_log_ratio_cap))

        kind = POLICY_LOSSES.get(self.loss_type).kernel_id
        if kind != _PPO:
            for name in ("delta", "dual_clip"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"{name}={getattr(self, name)!r} applies to the PPO-clip loss types only, "
                        f"not loss_type={self.loss_type!r}"
                    )
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1, got {self.dual_clip!r}")
        if self.cispo_ratio_min is not None:
            if kind != _CISPO:
                raise ValueError(
                    f"cispo_ratio_min={self.cispo_ratio_min!r} applies to loss_type='cispo' only, "
                    f"not {self.loss_type!r}"
                )
            if self.cispo_ratio_min > self.eps_high:
                raise ValueError(
                    f"cispo_ratio_min={self.cispo_ratio_min!r} is above the CISPO cap clip_eps_high={self.eps_high!r}"
                )
        set_("cov_ratio", positive_scalar("cov_ratio", self.cov_ratio))
        if self.cov_ratio > 1.0:
            raise ValueError(f"cov_ratio must be in (0, 1] (a fraction of the tokens), got {self.cov_ratio!r}")
        if self.clip_cov_lb >= self.clip_cov_ub:
            raise ValueError(
                f"clip_cov_lb={self.clip_cov_lb!r} must be below clip_cov_ub={self.clip_cov_ub!r}"
            )
        if self.dro_beta is not None:
            set_("dro_beta", positive_scalar("dro_beta", self.dro_beta))
            if kind != _DRO:
                raise ValueError(f"dro_beta={self.dro_beta!r} applies to loss_type='dro' only, not {self.loss_type!r}")
        elif kind == _DRO:
            raise ValueError("dro_beta=None: loss_type='dro' needs dro_beta > 0 (verl's policy_loss.dro_beta)")
        if self.seq_log_ratio_cap is not None and not self.sequence_ratio:
            raise ValueError(
                f"seq_log_ratio_cap={self.seq_log_ratio_cap!r} applies to the sequence ratio only "
                "(importance_level='sequence' or loss_type='gspo')"
            )
        if self.entropy_quantile is not None:
            set_("entropy_quantile", finite_scalar("entropy_quantile", self.entropy_quantile))
            if not 0.0 <= self.entropy_quantile <= 1.0:
                raise ValueError(f"entropy_quantile must be in [0, 1], got {self.entropy_quantile!r}")
        if self.rollout_is_min is not None and self.rollout_is_cap is not None:
            if self.rollout_is_min > self.rollout_is_cap:
                raise ValueError(
                    f"rollout_is_min={self.rollout_is_min!r} is above rollout_is_cap={self.rollout_is_cap!r}"
                )
        if self.rollout_rs is not None:
            _check_choice("rollout_rs", self.rollout_rs, ROLLOUT_RS)
            if self.rollout_rs_max is None:
                raise ValueError(f"rollout_rs={self.rollout_rs!r} needs rollout_rs_max (verl's rollout_rs_threshold)")
            set_("rollout_rs_max", positive_scalar("rollout_rs_max", self.rollout_rs_max))
            if self.rollout_rs_min is not None:
                set_("rollout_rs_min", positive_scalar("rollout_rs_min", self.rollout_rs_min))
                if not self.rollout_rs.endswith("k1"):
                    raise ValueError(
                        f"rollout_rs_min={self.rollout_rs_min!r} applies to the k1 rejections only, "
                        f"not rollout_rs={self.rollout_rs!r}"
                    )
                if self.rollout_rs_min > self.rollout_rs_max:
                    raise ValueError(
                        f"rollout_rs_min={self.rollout_rs_min!r} is above rollout_rs_max={self.rollout_rs_max!r}"
                    )
        else:
            for name in ("rollout_rs_min", "rollout_rs_max"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name}={getattr(self, name)!r} needs rollout_rs")
        if self.off_policy_mask_threshold is not None:
            set_("off_policy_mask_threshold", finite_scalar("off_policy_mask_threshold", self.off_policy_mask_threshold))
        if self.rollout_is_mode == "truncate":
            if self.rollout_is_gating != "ratio":
                raise ValueError(
                    f"rollout_is_gating={self.rollout_is_gating!r} needs rollout_is_mode='mask': a divergence "
                    "gates (masks) units, only the ratio is a weight that can be truncated"
                )
            if self.rollout_is_weight != "unit":
                raise ValueError(
                    f"rollout_is_weight={self.rollout_is_weight!r} needs rollout_is_mode='mask': "
                    "truncation weighs each unit by its own truncated ratio"
                )
        set_("max_len", _check_max_len(
            self.resolved_agg, self.max_len, f" (loss_type={self.loss_type!r})" if self.agg is None else ""
        ))

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def matching(cls, peer: str, **options) -> PolicyLossOptions:
        """The options with ``peer``'s conventions (``PEER_CONVENTIONS``), then ``options``."""
        _check_choice("peer", peer, tuple(PEER_CONVENTIONS))
        return cls(**{**PEER_CONVENTIONS[peer], **options})

    @property
    def eps_high(self) -> float:
        """The upper clip epsilon (the CISPO cap for cispo)."""
        return self.clip_eps_low if self.clip_eps_high is None else self.clip_eps_high

    @property
    def resolved_agg(self) -> str:
        return self.agg or PRESET_AGG[self.loss_type]

    @property
    def sequence_ratio(self) -> bool:
        return POLICY_LOSSES.get(self.loss_type).params["sequence_ratio"] or self.importance_level == "sequence"

    @property
    def needs_rollout_logprobs(self) -> bool:
        """Whether the options correct for the rollout mismatch, so that ``policy_loss``
        should get ``rollout_logprobs``: a band (``rollout_is_min``/``rollout_is_cap``),
        ``rollout_is_mode="mask"``, ``rollout_rs``, or the off-policy mask (which reads
        the sampler's log-probs when given). Given ``rollout_logprobs``, ``policy_loss``
        always weighs the policy term by the rollout correction."""
        return (
            self.rollout_is_min is not None or self.rollout_is_cap is not None or self.rollout_is_mode != "truncate"
            or self.rollout_rs is not None or self.off_policy_mask_threshold is not None
        )


# The conventions (not hyperparameters) by which each peer's code differs from fastpo's
# defaults; docs/rl-losses.md states each with the line of the peer it comes from.
PEER_CONVENTIONS = {
    "trl": {"kl_ratio_weighted": True, "entropy_agg": "token-mean"},
    "verl": {"log_ratio_clamp": 20.0, "seq_mean_rows": "nonempty", "kl_kind": "low_var_kl"},
    "openrlhf": {
        "log_ratio_clamp": 20.0, "seq_mean_rows": "nonempty", "kl_clamp": 10.0,
        "rollout_is_seq_ratio": "geometric_mean",
    },
}

# --------------------------------------------------------------------------- Triton

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
    _IS_WEIGHT,
    _IS_FILTERED,
    _KEPT_ENTROPY,
    _KEPT_COUNT,
    _OFF_POLICY_MASKED,
) = range(15)
N_STATS = 15
_VALUE_STATS = 3  # loss, count, clipped count
_TIS_LEVEL_ID = {None: 0, "token": 1, "sequence": 2}

if HAS_TRITON:

    @triton.jit
    def _clamp(x, lo, hi):
        """min(max(x, lo), hi), NaN propagating."""
        return tl.minimum(tl.maximum(x, lo, propagate_nan=tl.PropagateNan.ALL), hi, propagate_nan=tl.PropagateNan.ALL)

    @triton.jit
    def _kl_terms(d, KL_KIND: tl.constexpr):
        """KL estimate of ``d = lp - lp_ref`` and its derivative with respect to d, for
        each kernel id of KL_ESTIMATORS; any other id fails to compile."""
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
        elif KL_KIND == 5:  # low_var_kl: k3 of d clamped to [-20, 20], result clamped to [-10, 10]
            dc = _clamp(d, -20.0, 20.0)
            e = tl.exp(-dc)
            k3 = e + dc - 1.0
            kl = _clamp(k3, -10.0, 10.0)
            dkl = tl.where((d >= -20.0) & (d <= 20.0) & (k3 <= 10.0), 1.0 - e, zero)
        else:
            tl.static_assert(False, "KL_KIND is not the kernel id of a registered KL estimator")
        return kl, dkl

    @triton.jit
    def _clamped_kl_terms(d, kl_clamp, KL_KIND: tl.constexpr, KL_CLAMP: tl.constexpr):
        """_kl_terms, the estimate clamped to [-kl_clamp, kl_clamp] (no gradient outside)."""
        kl, dkl = _kl_terms(d, KL_KIND)
        if KL_CLAMP:
            dkl = tl.where((kl >= -kl_clamp) & (kl <= kl_clamp), dkl, 0.0)
            kl = _clamp(kl, -kl_clamp, kl_clamp)
        return kl, dkl

    @triton.jit
    def _kl_penalty_kernel(
        lp_ptr,
        ref_ptr,
        kl_ptr,
        dkl_ptr,
        n,
        kl_clamp,
        KL_KIND: tl.constexpr,
        KL_CLAMP: tl.constexpr,
        NEED_GRAD: tl.constexpr,
        ACC_DTYPE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = offs < n
        lp = tl.load(lp_ptr + offs, mask=valid, other=0.0).to(ACC_DTYPE)
        ref = tl.load(ref_ptr + offs, mask=valid, other=0.0).to(ACC_DTYPE)
        kl, dkl = _clamped_kl_terms(lp - ref, kl_clamp, KL_KIND, KL_CLAMP)
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
    def _rollout_divergence(old, roll, GATING: tl.constexpr):
        """Divergence between the sampler's and the trainer's probability of the sampled
        token (p = exp(roll), q = exp(old), both clamped to [1e-6, 1 - 1e-6])."""
        p = tl.minimum(tl.maximum(tl.exp(roll), 1e-6), 1.0 - 1e-6)
        q = tl.minimum(tl.maximum(tl.exp(old), 1e-6), 1.0 - 1e-6)
        if GATING == 1:  # binary_kl
            div = p * tl.log(p / q) + (1.0 - p) * tl.log((1.0 - p) / (1.0 - q))
        elif GATING == 2:  # tv
            div = tl.abs(p - q)
        else:
            tl.static_assert(False, "GATING is not the kernel id of a divergence of ROLLOUT_IS_GATINGS")
        return div

    @triton.jit
    def _gmpo_log_ratio_terms(d, adv, eps_low, eps_high):
        """GMPO's per-token log-ratio (the torch ``_gmpo_log_ratio``) and its derivative with
        respect to d (1 where the unclipped side is taken, 0 where the clip or A = 0 is)."""
        clipped = _clamp(d, -eps_low, eps_high)
        up = tl.minimum(d, clipped, propagate_nan=tl.PropagateNan.ALL)
        down = tl.maximum(d, clipped, propagate_nan=tl.PropagateNan.ALL)
        zero = d * 0.0
        term = tl.where(adv > 0, up, tl.where(adv < 0, down, zero))
        dterm = tl.where(adv > 0, tl.where(d <= eps_high, zero + 1.0, zero),
                         tl.where(adv < 0, tl.where(d >= -eps_low, zero + 1.0, zero), zero))
        return term, dterm

    @triton.jit
    def _dppo_kept(lp, old, adv, eps_low, eps_high, BINARY_KL: tl.constexpr):
        """DPPO's trust region on p = exp(lp), q = exp(lp_old) (see ``_dppo_kept_torch``)."""
        p = tl.exp(lp)
        q = tl.exp(old)
        if BINARY_KL:
            div = q * (old - lp) + (1.0 - q) * tl.log((1.0 - q + 1e-8) / (1.0 - p + 1e-8))
            up = (div <= eps_high) | (p <= q)
            down = (div <= eps_low) | (p >= q)
        else:
            up = p - q <= eps_high
            down = p - q >= -eps_low
        return tl.where(adv > 0, up, down)

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
        selected_ptr,
        opsm_ptr,
        grad_ptr,
        stats_ptr,
        T,
        stride_adv_b,
        stride_adv_t,
        lo,
        hi,
        delta,
        dual_clip,
        cispo_min,
        cispo_cap,
        tau_pos,
        tau_neg,
        kl_coef,
        kl_clamp,
        entropy_coef,
        log_ratio_clamp,
        seq_log_ratio_cap,
        is_min,
        is_cap,
        eps_low,
        eps_high,
        dppo_cap,
        dro_beta,
        kl_cov_coef,
        vespo_k_pos,
        vespo_lambda_pos,
        vespo_k_neg,
        vespo_lambda_neg,
        opsm_threshold,
        LOSS_KIND: tl.constexpr,
        SEQ_RATIO: tl.constexpr,
        HAS_DELTA: tl.constexpr,
        HAS_DUAL: tl.constexpr,
        HAS_CISPO_MIN: tl.constexpr,
        LOG_RATIO_CLAMP: tl.constexpr,
        SEQ_CAP: tl.constexpr,
        KL_KIND: tl.constexpr,
        KL_IN_LOSS: tl.constexpr,
        KL_CLAMP: tl.constexpr,
        KL_RATIO_WEIGHTED: tl.constexpr,
        HAS_ENTROPY: tl.constexpr,
        ENTROPY_MASK: tl.constexpr,
        ENTROPY_IN_ROWS: tl.constexpr,
        TIS_LEVEL: tl.constexpr,
        TIS_MASK: tl.constexpr,
        TIS_GATING: tl.constexpr,
        TIS_SEQ_MEAN: tl.constexpr,
        TIS_WEIGHT: tl.constexpr,
        OPSM: tl.constexpr,
        NEED_GRAD: tl.constexpr,
        ACC_DTYPE: tl.constexpr,
        N_STAT: tl.constexpr,
        BLOCK_T: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        base = row * T
        adv_base = row * stride_adv_b
        cols = tl.arange(0, BLOCK_T)

        # Pass 1, only for per-sequence quantities: the row's summed log-ratio (sequence
        # ratio) and its summed rollout log-ratio and divergence (sequence-level IS).
        seq_n = tl.zeros([], ACC_DTYPE)
        seq_log_ratio = tl.zeros([], ACC_DTYPE)
        seq_log_is = tl.zeros([], ACC_DTYPE)
        seq_div = tl.zeros([], ACC_DTYPE)
        vespo_log_w = tl.zeros([], ACC_DTYPE)
        opsm_kl = tl.zeros([], ACC_DTYPE)
        if SEQ_RATIO or TIS_LEVEL == 2 or LOSS_KIND == 10 or OPSM:
            for start in range(0, T, BLOCK_T):
                offs = start + cols
                in_row = offs < T
                valid = (tl.load(mask_ptr + base + offs, mask=in_row, other=0) != 0) & in_row
                old = _load_row(old_ptr + base, offs, in_row, valid, ACC_DTYPE)
                seq_n += tl.sum(valid.to(ACC_DTYPE), axis=0)
                if SEQ_RATIO:
                    lp = _load_row(lp_ptr + base, offs, in_row, valid, ACC_DTYPE)
                    seq_term = lp - old
                    if LOSS_KIND == 4:  # GMPO: the mean of the clipped token log-ratios
                        adv = tl.load(adv_ptr + adv_base + offs * stride_adv_t, mask=in_row, other=0.0)
                        adv = tl.where(valid, adv.to(ACC_DTYPE), 0.0)
                        seq_term, _ = _gmpo_log_ratio_terms(seq_term, adv, eps_low, eps_high)
                    seq_log_ratio += tl.sum(seq_term, axis=0)
                if LOSS_KIND == 10:  # VESPO: the summed (not averaged) clamped log-ratio
                    lp = _load_row(lp_ptr + base, offs, in_row, valid, ACC_DTYPE)
                    vespo_log_w += tl.sum(_clamp(lp - old, -20.0, 20.0), axis=0)
                if OPSM:  # off-policy sequence mask: the summed sampler-minus-current log-ratio, NaN as 0
                    lp = _load_row(lp_ptr + base, offs, in_row, valid, ACC_DTYPE)
                    sampler = _load_row(opsm_ptr + base, offs, in_row, valid, ACC_DTYPE)
                    drift = sampler - lp
                    opsm_kl += tl.sum(tl.where(drift == drift, drift, 0.0), axis=0)
                if TIS_LEVEL == 2:
                    roll = _load_row(roll_ptr + base, offs, in_row, valid, ACC_DTYPE)
                    seq_log_is += tl.sum(old - roll, axis=0)
                    if TIS_GATING != 0:
                        div = _rollout_divergence(old, roll, TIS_GATING)
                        seq_div += tl.sum(tl.where(valid, div, 0.0), axis=0)
        seq_count = tl.maximum(seq_n, 1.0)
        seq_log = seq_log_ratio / seq_count
        seq_inside = seq_log == seq_log  # True (False for NaN, whose gradient is NaN anyway)
        if SEQ_CAP:
            seq_inside = seq_log <= seq_log_ratio_cap
            seq_log = tl.minimum(seq_log, seq_log_ratio_cap, propagate_nan=tl.PropagateNan.ALL)
        seq_ratio = tl.exp(seq_log)
        if TIS_SEQ_MEAN:
            seq_log_is = seq_log_is / seq_count
        seq_is_ratio = tl.exp(seq_log_is)
        seq_div = seq_div / seq_count
        opsm_kl = opsm_kl / seq_count
        off_policy_masked = tl.zeros([], ACC_DTYPE)
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
        is_weight_sum = tl.zeros([], ACC_DTYPE)
        is_filtered = tl.zeros([], ACC_DTYPE)
        kept_entropy = tl.zeros([], ACC_DTYPE)
        kept_count = tl.zeros([], ACC_DTYPE)
        seq_grad = tl.zeros([], ACC_DTYPE)  # sum_t dL_t / ds for the sequence ratio

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
            log_ratio = lp - old
            d_log_ratio = zero + 1.0  # d clamp(log_ratio) / d lp
            if LOG_RATIO_CLAMP:
                d_log_ratio = tl.where((log_ratio >= -log_ratio_clamp) & (log_ratio <= log_ratio_clamp), d_log_ratio, zero)
                log_ratio = _clamp(log_ratio, -log_ratio_clamp, log_ratio_clamp)
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
            if LOSS_KIND == 0 or LOSS_KIND == 8:  # PPO clip (Clip-Cov: then drops its selected tokens)
                if HAS_DELTA:
                    r1 = tl.minimum(ratio, delta, propagate_nan=tl.PropagateNan.ALL)
                    d_r1 = tl.where(ratio <= delta, zero + 1.0, zero)
                else:
                    r1 = ratio
                    d_r1 = zero + 1.0
                r2 = _clamp(ratio, lo, hi)
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
                if LOSS_KIND == 8:
                    dropped = tl.load(selected_ptr + base + offs, mask=in_row, other=0) != 0
                    policy = tl.where(dropped, zero, policy)
                    d_ratio = tl.where(dropped, zero, d_ratio)
            elif LOSS_KIND == 1:  # CISPO: stop-gradient truncated ratio times lp
                truncated = ratio
                if HAS_CISPO_MIN:
                    truncated = tl.maximum(truncated, cispo_min, propagate_nan=tl.PropagateNan.ALL)
                    low_hit = valid & (ratio < cispo_min) & (adv < 0)
                direct = -tl.minimum(truncated, cispo_cap, propagate_nan=tl.PropagateNan.ALL) * adv
                policy = direct * lp
                high_hit = valid & (ratio > cispo_cap) & (adv > 0)
            elif LOSS_KIND == 2:  # SAPO soft gate
                tau = tl.where(adv > 0, zero + tau_pos, zero + tau_neg)
                gate = tl.sigmoid(tau * (ratio - 1.0))
                policy = -gate * 4.0 / tau * adv
                d_ratio = -4.0 * adv * gate * (1.0 - gate)
            elif LOSS_KIND == 3:  # GPG: -A * lp
                direct = -adv
                policy = direct * lp
            elif LOSS_KIND == 4:  # GMPO: -A * (geometric-mean sequence ratio)
                policy = -adv * ratio
                d_ratio = -adv
                raw = lp - old
                outside = valid & ((raw < -eps_low) | (raw > eps_high))
                low_hit = outside & (adv < 0)
                high_hit = outside & (adv > 0)
            elif LOSS_KIND == 5:  # DPPO binary-TV: detached truncated ratio times lp, in the trust region
                keep = _dppo_kept(lp, old, adv, eps_low, eps_high, False)
                direct = tl.where(keep, -tl.minimum(ratio, dppo_cap, propagate_nan=tl.PropagateNan.ALL) * adv, zero)
                policy = direct * lp
                high_hit = valid & ~keep & (adv > 0)
                low_hit = valid & ~keep & ~(adv > 0)
            elif LOSS_KIND == 6:  # DPPO binary-KL
                keep = _dppo_kept(lp, old, adv, eps_low, eps_high, True)
                direct = tl.where(keep, -tl.minimum(ratio, dppo_cap, propagate_nan=tl.PropagateNan.ALL) * adv, zero)
                policy = direct * lp
                high_hit = valid & ~keep & (adv > 0)
                low_hit = valid & ~keep & ~(adv > 0)
            elif LOSS_KIND == 7:  # DRO: -(A * lp - beta/2 * (lp - lp_old)^2)
                raw = lp - old
                direct = dro_beta * raw - adv
                policy = -(adv * lp - 0.5 * dro_beta * raw * raw)
            elif LOSS_KIND == 9:  # KL-Cov: -r*A, plus coef * |lp - lp_old| on the selected tokens
                policy = -adv * ratio
                d_ratio = -adv
                penalized = (tl.load(selected_ptr + base + offs, mask=in_row, other=0) != 0) & valid
                raw = lp - old
                policy += tl.where(penalized, kl_cov_coef * tl.abs(raw), zero)
                direct = tl.where(penalized & (raw != 0), tl.where(raw > 0, zero + kl_cov_coef, zero - kl_cov_coef), zero)
            elif LOSS_KIND == 10:  # VESPO: detached gamma weight of the sequence ratio, times A * lp
                log_w = _clamp(zero + vespo_log_w, -18.420680743952367, 20.0)  # [log 1e-8, 20]
                nonneg = adv >= 0
                k = tl.where(nonneg, zero + vespo_k_pos, zero + vespo_k_neg)
                lam = tl.maximum(tl.where(nonneg, zero + vespo_lambda_pos, zero + vespo_lambda_neg), 1e-4)
                phi = tl.exp(lam + k * log_w - lam * tl.exp(log_w))
                phi = tl.where(tl.abs(phi) < float("inf"), phi, zero)  # NaN and inf give 0
                direct = -phi * adv
                policy = direct * lp
            else:
                tl.static_assert(False, "LOSS_KIND is not the kernel id of a registered policy loss")

            # weights of the policy term (detached): entropy-quantile mask, rollout correction
            weight = m
            kept = valid
            if HAS_ENTROPY:
                ent = _load_row(ent_ptr + base, offs, in_row, valid, ACC_DTYPE)
            if ENTROPY_MASK:
                kept = valid & (ent >= ent_threshold)
                weight = tl.where(kept, weight, zero)
            if TIS_LEVEL != 0:
                roll = _load_row(roll_ptr + base, offs, in_row, valid, ACC_DTYPE)
                token_is_ratio = tl.exp(old - roll)
                if TIS_LEVEL == 1:
                    unit_ratio = token_is_ratio
                else:
                    unit_ratio = zero + seq_is_ratio
                if TIS_MASK:
                    stat = unit_ratio
                    if TIS_GATING != 0:
                        if TIS_LEVEL == 1:
                            stat = _rollout_divergence(old, roll, TIS_GATING)
                        else:
                            stat = zero + seq_div
                    in_band = (stat >= is_min) & (stat <= is_cap)
                    if TIS_WEIGHT == 0:
                        is_weight = unit_ratio
                    elif TIS_WEIGHT == 1:
                        is_weight = token_is_ratio
                    elif TIS_WEIGHT == 2:
                        is_weight = zero + 1.0
                    else:
                        tl.static_assert(False, "TIS_WEIGHT is not a kernel id of ROLLOUT_IS_WEIGHTS")
                    is_weight = tl.where(in_band, is_weight, zero)
                    filtered = valid & ~in_band
                else:  # truncate
                    is_weight = _clamp(unit_ratio, is_min, is_cap)
                    filtered = valid & ~((unit_ratio >= is_min) & (unit_ratio <= is_cap))
                is_weight = tl.where(valid, is_weight, zero)
                is_weight_sum += tl.sum(is_weight, axis=0)
                is_filtered += tl.sum(filtered.to(ACC_DTYPE), axis=0)
                weight = weight * is_weight
            if OPSM:  # drop the sequence's policy term where A < 0 and it drifted past the threshold
                opsm_keep = (adv >= 0) | ((zero + opsm_kl) <= opsm_threshold)
                weight = tl.where(opsm_keep, weight, zero)
                off_policy_masked += tl.sum((valid & ~opsm_keep).to(ACC_DTYPE), axis=0)
            token_loss = policy * weight
            d_ratio = d_ratio * weight
            grad = direct * weight

            if KL_KIND != 0:
                ref = _load_row(ref_ptr + base, offs, in_row, valid, ACC_DTYPE)
                kl, dkl = _clamped_kl_terms(lp - ref, kl_clamp, KL_KIND, KL_CLAMP)
                kl = tl.where(valid, kl, 0.0)
                ref_kl += tl.sum(kl, axis=0)
                if KL_IN_LOSS:
                    if KL_RATIO_WEIGHTED:  # beta * KL_t * r, differentiable through r too
                        token_loss += kl_coef * kl * ratio
                        grad += kl_coef * dkl * ratio
                        d_ratio += kl_coef * kl
                    else:
                        token_loss += kl_coef * kl
                        grad += kl_coef * dkl
            if SEQ_RATIO:
                seq_grad += tl.sum(tl.where(valid, d_ratio, 0.0), axis=0)
            else:
                grad += d_ratio * ratio * d_log_ratio
            if HAS_ENTROPY:
                entropy_sum += tl.sum(ent, axis=0)
                kept_entropy += tl.sum(tl.where(kept, ent, 0.0), axis=0)
                kept_count += tl.sum(kept.to(ACC_DTYPE), axis=0)
                if ENTROPY_IN_ROWS:
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

        # Pass 3 (sequence ratio): d s_i / d lp_t = m_t * s_i / n_i for every token of the
        # row (0 where seq_log_ratio_cap is active). The loss types whose gradient reaches
        # lp only directly (CISPO, GPG, DPPO, DRO, VESPO: a detached weight times lp, or lp
        # itself) have no dL/ds unless the KL term is weighted by the ratio.
        if NEED_GRAD and SEQ_RATIO and (LOSS_KIND == 0 or LOSS_KIND == 2 or LOSS_KIND == 4 or LOSS_KIND == 8
                                        or LOSS_KIND == 9 or KL_RATIO_WEIGHTED):
            shared = tl.where(seq_inside, seq_grad * seq_ratio / seq_count, 0.0)
            # Pass 2's stores must be visible to every thread of the program before they
            # are read back (the compiler does not promise the same element-to-thread map).
            tl.debug_barrier()
            for start in range(0, T, BLOCK_T):
                offs = start + cols
                in_row = offs < T
                valid = (tl.load(mask_ptr + base + offs, mask=in_row, other=0) != 0) & in_row
                g = tl.load(grad_ptr + base + offs, mask=in_row, other=0.0)
                add = tl.where(valid, shared, 0.0)
                if LOSS_KIND == 4:  # GMPO: d g_i / d lp_t = g_i / n_i * d clip_A(d_t) / d d_t
                    lp = _load_row(lp_ptr + base, offs, in_row, valid, ACC_DTYPE)
                    old = _load_row(old_ptr + base, offs, in_row, valid, ACC_DTYPE)
                    adv = tl.load(adv_ptr + adv_base + offs * stride_adv_t, mask=in_row, other=0.0)
                    adv = tl.where(valid, adv.to(ACC_DTYPE), 0.0)
                    _, dterm = _gmpo_log_ratio_terms(lp - old, adv, eps_low, eps_high)
                    add = add * dterm
                tl.store(grad_ptr + base + offs, g + add, mask=in_row)

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
        tl.store(out + 10, is_weight_sum)
        tl.store(out + 11, is_filtered)
        tl.store(out + 12, kept_entropy)
        tl.store(out + 13, kept_count)
        tl.store(out + 14, off_policy_masked)

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
                v_clip = _clamp(v, old - clip_eps, old + clip_eps)
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


def _mask_for_kernel(mask: torch.Tensor) -> torch.Tensor:
    """Triton reads bool tensors as bytes; the view costs nothing."""
    mask = mask.contiguous()
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


# ------------------------------------------------------------------------ KL penalty


def _kl_torch(d: torch.Tensor, kind: str, clamp: float | None) -> torch.Tensor:
    """The registered reference of ``kind``, clamped to [-clamp, clamp]. Outside the
    clamp the estimate is recomputed on a detached ``d``: its gradient is 0 there, and
    an overflowing estimate (k3 of a large negative ``d``) cannot turn it into 0 * inf."""
    reference = KL_ESTIMATORS.get(kind).reference
    if clamp is None:
        return reference(d)
    with torch.no_grad():
        outside_value = reference(d)
        inside = (outside_value >= -clamp) & (outside_value <= clamp)
    inside_value = reference(torch.where(inside, d, torch.zeros_like(d)))
    return torch.where(inside, inside_value, outside_value.clamp(-clamp, clamp))


class _KLPenalty(torch.autograd.Function):
    """Triton forward writes the estimate and its derivative; the backward scales it."""

    @staticmethod
    @on_tensor_device
    def forward(ctx, logprobs, ref_logprobs, kind_id, clamp, need_grad):
        acc = acc_dtype(logprobs, ref_logprobs)
        lp = logprobs.contiguous().view(-1)
        ref = ref_logprobs.contiguous().view(-1)
        kl = torch.empty(lp.numel(), dtype=acc, device=lp.device)
        dkl = torch.empty_like(kl) if need_grad else kl
        if lp.numel():
            block = 1024
            _kl_penalty_kernel[(triton.cdiv(lp.numel(), block),)](
                lp, ref, kl, dkl, lp.numel(), clamp if clamp is not None else 0.0,
                KL_KIND=kind_id, KL_CLAMP=clamp is not None, NEED_GRAD=need_grad,
                ACC_DTYPE=tl_acc_dtype(acc), BLOCK=block,
            )
        ctx.set_materialize_grads(False)
        ctx.dtypes = (logprobs.dtype, ref_logprobs.dtype)
        if need_grad:
            ctx.save_for_backward(dkl)
        return kl.view(logprobs.shape)

    @staticmethod
    def backward(ctx, grad_kl):
        if grad_kl is None:
            return None, None, None, None, None
        (dkl,) = ctx.saved_tensors
        g = grad_kl.reshape(-1) * dkl
        grad_lp = g.view(grad_kl.shape).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        grad_ref = (-g).view(grad_kl.shape).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return grad_lp, grad_ref, None, None, None


def _kl_penalty_torch(logprobs, ref_logprobs, kind, clamp):
    acc = acc_dtype(logprobs, ref_logprobs)
    return _kl_torch(logprobs.to(acc) - ref_logprobs.to(acc), kind, clamp)


def _kl_penalty_triton(logprobs, ref_logprobs, kind, clamp):
    need_grad = torch.is_grad_enabled() and (logprobs.requires_grad or ref_logprobs.requires_grad)
    return _KLPenalty.apply(logprobs, ref_logprobs, KL_ESTIMATORS.kernel_id(kind), clamp, need_grad)


def kl_penalty(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    kind: str = "k3",
    *,
    clamp: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Per-token KL estimate between the policy and the reference, ``d = lp - lp_ref``.

    Args:
        logprobs: log-probs of the sampled tokens under the policy, any shape, float.
        ref_logprobs: the same tokens under the reference model, same shape.
        kind: any name of ``KL_ESTIMATORS``: ``"k1"`` (``d``; TRL PPO/RLOO, verl
            ``kl``), ``"k2"`` (``0.5*d**2``; verl ``mse``), ``"k3"`` (``exp(-d) + d - 1``,
            unclamped; TRL GRPO), ``"abs"`` (``|d|``; verl), ``"low_var_kl"`` (k3 with
            ``d`` clamped to [-20, 20] and the result to [-10, 10]; verl's ``low_var_kl``
            and ``k3``).
        clamp: ``c > 0``: the estimate is clamped to [-c, c], with no gradient where the
            clamp is active (OpenRLHF clamps every estimator at 10). None: no clamp.
        backend: ``"triton"``, ``"torch"`` or None (automatic; see fastpo.kernels).

    Returns:
        float32 tensor of ``logprobs.shape`` (float64 if an input is float64),
        differentiable with respect to both inputs (``abs`` has derivative 0 at d = 0,
        the clamps pass no gradient outside their range).
    """
    check_tensor("logprobs", logprobs, FLOAT_DTYPES)
    check_tensor("ref_logprobs", ref_logprobs, FLOAT_DTYPES)
    check_same_device(logprobs=logprobs, ref_logprobs=ref_logprobs)
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"ref_logprobs.shape {tuple(ref_logprobs.shape)} does not match logprobs.shape {tuple(logprobs.shape)}"
        )
    KL_ESTIMATORS.check(kind, "kind")
    if clamp is not None:
        clamp = positive_scalar("clamp", clamp)
    run = dispatch("kl_penalty", logprobs.device, backend, torch=_kl_penalty_torch, triton=_kl_penalty_triton)
    return run(logprobs, ref_logprobs, kind, clamp)


# ---------------------------------------------------------------------- aggregation


def _row_scale(agg: str, counts: torch.Tensor, num_items, max_len, seq_mean_rows: str = "all") -> torch.Tensor:
    """Weight ``c_i`` of each row's loss sum, so that ``loss = sum_i c_i * rowsum_i``."""
    if seq_mean_rows == "nonempty":
        rows = (counts > 0).sum().to(counts.dtype).clamp(min=1.0)
    else:
        rows = max(counts.shape[0], 1)
    return AGGREGATIONS.get(agg).reference(counts, rows, num_items, max_len)


def _metrics(
    stats: torch.Tensor, sums: torch.Tensor, has_ref: bool, has_entropy: bool, has_dual: bool, has_rollout: bool
) -> dict:
    """Masked means over this call's valid tokens, as 0-dim tensors (no host sync);
    ``sums`` is ``stats.sum(0)``."""
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
    if has_rollout:
        metrics["rollout_is_weight_mean"] = sums[_IS_WEIGHT] / n
        metrics["rollout_is_filtered_frac"] = sums[_IS_FILTERED] / n
    return metrics


class _ScaledRowLoss(torch.autograd.Function):
    """``loss = sum_i c_i * rowsum_i - entropy_coef * kept_entropy_mean`` (the second
    term with entropy_agg='token-mean' only) with the per-token gradient precomputed by
    the forward kernel: the backward only scales it by ``grad_output * c_i``."""

    @staticmethod
    def forward(ctx, logprobs, entropy, row_loss, row_scale, token_grad, mask, entropy_coef,
                kept_mean, kept_count, ent_threshold):
        ctx.set_materialize_grads(False)
        ctx.entropy_coef = entropy_coef
        ctx.dtypes = (logprobs.dtype, None if entropy is None else entropy.dtype)
        ctx.kept_mode = kept_mean is not None
        ctx.save_for_backward(row_scale, token_grad, mask, entropy, kept_count, ent_threshold)
        loss = (row_scale * row_loss).sum()
        if kept_mean is not None:
            loss = loss - entropy_coef * kept_mean
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if grad_loss is None:
            return (None,) * 10
        row_scale, token_grad, mask, entropy, kept_count, ent_threshold = ctx.saved_tensors
        per_row = (grad_loss * row_scale).unsqueeze(-1)
        grad_lp = grad_ent = None
        if ctx.needs_input_grad[0]:
            grad_lp = (token_grad * per_row).to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            valid = mask != 0
            if ctx.kept_mode:
                kept = valid if ent_threshold is None else valid & (entropy.detach() >= ent_threshold)
                grad_ent = kept * (-ctx.entropy_coef * grad_loss / kept_count.clamp(min=1.0))
            else:
                grad_ent = valid * (-ctx.entropy_coef * per_row)
            grad_ent = grad_ent.to(ctx.dtypes[1])
        return (grad_lp, grad_ent) + (None,) * 8


# --------------------------------------------------------------------- policy loss


def _entropy_threshold(entropy: torch.Tensor, valid: torch.Tensor, quantile: float) -> torch.Tensor:
    """``torch.quantile`` (linear interpolation) of the valid entropies, without the host
    sync that boolean indexing would need: invalid entries sort last as +inf."""
    if entropy.numel() == 0:
        return entropy.new_zeros((), dtype=acc_dtype(entropy))
    flat = entropy.detach().to(acc_dtype(entropy)).masked_fill(~valid, float("inf")).reshape(-1)
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


def _rollout_divergence_torch(old, roll, gating):
    p = roll.exp().clamp(1e-6, 1.0 - 1e-6)
    q = old.exp().clamp(1e-6, 1.0 - 1e-6)
    if gating == "binary_kl":
        return p * (p / q).log() + (1.0 - p) * ((1.0 - p) / (1.0 - q)).log()
    return (p - q).abs()


def _outside(x: torch.Tensor, low: float | None, high: float | None) -> torch.Tensor:
    """Whether ``x`` is outside [low, high] (None: unbounded on that side; NaN is outside)."""
    if low is None and high is None:
        return x != x
    if low is None:
        return ~(x <= high)
    if high is None:
        return ~(x >= low)
    return ~((x >= low) & (x <= high))


def _rollout_weight_torch(old, roll, valid, o: PolicyLossOptions):
    """(weight, filtered): the detached rollout-correction weight of every token and
    whether its unit (token or sequence) lies outside [rollout_is_min, rollout_is_cap]."""
    zero = torch.zeros((), dtype=old.dtype, device=old.device)
    log_ratio = old - roll  # both already 0 at masked positions
    sequence = o.rollout_is == "sequence"
    per_sequence_mean = sequence and (o.rollout_is_seq_ratio == "geometric_mean" or o.rollout_is_gating != "ratio")
    count = valid.sum(-1, keepdim=True).clamp(min=1).to(old.dtype) if per_sequence_mean else None
    unit_log = log_ratio
    if sequence:
        unit_log = log_ratio.sum(-1, keepdim=True)
        if o.rollout_is_seq_ratio == "geometric_mean":
            unit_log = unit_log / count
    unit = unit_log.exp().expand(old.shape)
    if o.rollout_is_mode == "truncate":
        weight = unit
        if o.rollout_is_min is not None or o.rollout_is_cap is not None:
            weight = unit.clamp(min=o.rollout_is_min, max=o.rollout_is_cap)
        filtered = _outside(unit, o.rollout_is_min, o.rollout_is_cap)
    else:
        stat = unit
        if o.rollout_is_gating != "ratio":
            stat = torch.where(valid, _rollout_divergence_torch(old, roll, o.rollout_is_gating), zero)
            if sequence:
                stat = (stat.sum(-1, keepdim=True) / count).expand(old.shape)
        filtered = _outside(stat, o.rollout_is_min, o.rollout_is_cap)
        value = {"unit": unit, "token": log_ratio.exp(), "none": torch.ones_like(unit)}[o.rollout_is_weight]
        weight = torch.where(filtered, zero, value)
    # masked positions have a ratio of 1: keep them out of the metrics
    return torch.where(valid, weight, zero), valid & filtered


def _rollout_rejection(old, roll, valid, o: PolicyLossOptions) -> torch.Tensor:
    """verl's rollout rejection: the tokens kept in the mask (all of a sequence's, or none,
    at the seq_* levels). A KL estimator of ``x = clamp(lp_old - lp_rollout, -20, 20)``
    (k1 ``-x``, k2 ``x**2 / 2``, k3 ``exp(x) - 1 - x``) per token, or its sum, mean or max
    over the sequence's valid tokens, must be at most ``rollout_rs_max`` (k1: within
    ``[log rollout_rs_min, log rollout_rs_max]``, the min ``1 / max`` by default)."""
    acc = acc_dtype(old)
    with torch.no_grad():
        zero = torch.zeros((), dtype=acc, device=old.device)
        x = torch.where(valid, old.detach().to(acc) - roll.detach().to(acc), zero).clamp(-20.0, 20.0)
        level, estimator = o.rollout_rs.rsplit("_", 1)
        stat = {"k1": lambda: -x, "k2": lambda: 0.5 * x * x, "k3": lambda: x.exp() - 1.0 - x}[estimator]()
        if level == "seq_max":
            stat = torch.where(valid, stat, -math.inf).amax(-1, keepdim=True) if x.shape[-1] else stat.sum(-1, True)
            stat = torch.where(valid.any(-1, keepdim=True), stat, zero)
        elif level != "token":
            stat = torch.where(valid, stat, zero).sum(-1, keepdim=True)
            if level == "seq_mean":
                stat = stat / valid.sum(-1, keepdim=True).clamp(min=1).to(acc)
        if estimator == "k1":
            low = 1.0 / o.rollout_rs_max if o.rollout_rs_min is None else o.rollout_rs_min
            keep = (stat >= math.log(low)) & (stat <= math.log(o.rollout_rs_max))
        else:
            keep = stat <= o.rollout_rs_max
        return valid & keep


def _policy_loss_torch(lp, old, adv, valid, ref, entropy, rollout, ent_threshold, o: PolicyLossOptions):
    """Eager composition of the per-token formulas; returns (row loss sums, kept entropy
    sums, stats, the Clip-Cov/KL-Cov tokens or None)."""
    acc = acc_dtype(lp)
    zero = torch.zeros((), dtype=acc, device=lp.device)
    m = valid.to(acc)
    # Masked positions are zeroed first so that padding holding inf or NaN cannot
    # leak into the values or (through 0 * inf) into the gradients.
    lp = torch.where(valid, lp.to(acc), zero)
    old = torch.where(valid, old.detach().to(acc), zero)
    adv = adv.detach().to(acc)
    adv = torch.where(valid, adv.unsqueeze(-1) if adv.dim() == 1 else adv, zero)
    log_ratio = lp - old
    if o.log_ratio_clamp is not None:
        log_ratio = log_ratio.clamp(-o.log_ratio_clamp, o.log_ratio_clamp)
    token_ratio = log_ratio.exp()
    n = m.sum(-1, keepdim=True)
    selected = None
    kernel_id = POLICY_LOSSES.get(o.loss_type).kernel_id
    if kernel_id in _COVARIANCE_KINDS:  # from the tensors masked above, not masked again
        ratio = token_ratio.detach() if kernel_id == _CLIP_COV else None
        selected = _covariance_pick(lp.detach(), adv, ratio, valid, n.sum(), o)
    if o.sequence_ratio:
        seq_terms = lp - old
        if POLICY_LOSSES.get(o.loss_type).kernel_id == _GEO_MEAN:
            seq_terms = _gmpo_log_ratio(seq_terms, adv, o)
        seq_log = seq_terms.sum(-1, keepdim=True) / n.clamp(min=1.0)
        if o.seq_log_ratio_cap is not None:
            seq_log = seq_log.clamp(max=o.seq_log_ratio_cap)
        ratio = seq_log.exp().expand(lp.shape)
    else:
        ratio = token_ratio

    policy, low_hit, high_hit, dual_hit = POLICY_LOSSES.get(o.loss_type).reference(ratio, adv, lp, old, valid, o, selected)

    weight = m
    kept = valid
    if ent_threshold is not None:
        kept = valid & (entropy.detach().to(acc) >= ent_threshold)
        weight = weight * kept
    is_weight = is_filtered = None
    if rollout is not None:
        roll = torch.where(valid, rollout.detach().to(acc), zero)
        is_weight, is_filtered = _rollout_weight_torch(old, roll, valid, o)
        weight = weight * is_weight
    off_policy_dropped = None
    if o.off_policy_mask_threshold is not None:
        sampler = old if rollout is None else torch.where(valid, rollout.detach().to(acc), zero)
        drift = torch.where(valid, sampler - lp.detach(), zero).nan_to_num(nan=0.0)
        keep = (adv >= 0) | (drift.sum(-1, keepdim=True) / n.clamp(min=1.0) <= o.off_policy_mask_threshold)
        weight = weight * keep
        off_policy_dropped = valid & ~keep
    token_loss = policy * weight

    ref_kl = None
    if ref is not None:
        ref = torch.where(valid, ref.detach().to(acc), zero)
        ref_kl = torch.where(valid, _kl_torch(lp - ref, o.kl_kind, o.kl_clamp), zero)
        if o.kl_coef != 0:
            token_loss = token_loss + o.kl_coef * (ref_kl * ratio if o.kl_ratio_weighted else ref_kl)
    ent = kept_entropy = None
    if entropy is not None:
        ent = torch.where(valid, entropy.to(acc), zero)
        if o.entropy_agg == "loss":
            token_loss = token_loss - o.entropy_coef * ent
        else:
            kept_entropy = torch.where(kept, ent, zero).sum(-1)

    row_loss = torch.where(valid, token_loss, zero).sum(-1)
    with torch.no_grad():
        masked_ratio = torch.where(valid, ratio, float("-inf"))
        ratio_max = masked_ratio.amax(-1) if lp.shape[-1] else masked_ratio.new_full(lp.shape[:1], -math.inf)
        absent = torch.zeros(lp.shape[:1], dtype=acc, device=lp.device)  # the column of an unused feature

        def row_sums(x, used=True):
            return x.sum(-1) if used else absent

        columns = [
            row_loss,
            n.squeeze(-1),
            low_hit.sum(-1),
            high_hit.sum(-1),
            torch.where(valid, ratio, zero).sum(-1),
            ratio_max,
            torch.where(valid, token_ratio - 1.0 - log_ratio, zero).sum(-1),
            row_sums(ref_kl, ref is not None),
            row_sums(ent, entropy is not None),
            row_sums(dual_hit, o.dual_clip is not None),
            row_sums(is_weight, rollout is not None),
            row_sums(is_filtered, rollout is not None),
            absent if kept_entropy is None else kept_entropy,
            row_sums(kept, kept_entropy is not None),
            row_sums(off_policy_dropped, off_policy_dropped is not None),
        ]
        stats = torch.stack([c.to(acc) for c in columns], dim=-1)
    return row_loss, kept_entropy, stats, selected


@on_tensor_device
def _policy_loss_triton(lp, old, adv, mask, ref, entropy, rollout, ent_threshold, selected, o: PolicyLossOptions,
                        need_grad):
    B, T = lp.shape
    acc = acc_dtype(lp)
    lp_c = lp.detach().contiguous()
    stats = torch.empty((B, N_STATS), dtype=acc, device=lp.device)
    grad = torch.empty((B, T), dtype=acc, device=lp.device) if need_grad else stats
    adv = adv.detach()
    adv_view = adv.unsqueeze(-1).expand(B, T) if adv.dim() == 1 else adv.expand(B, T)
    if B:
        block, num_warps = _block_t(T, lp.device)
        kind = POLICY_LOSSES.kernel_id(o.loss_type)
        _policy_loss_fwd_kernel[(B,)](
            lp_c,
            old.detach().contiguous(),
            adv_view,
            _mask_for_kernel(mask),
            lp_c if ref is None else ref.detach().contiguous(),
            lp_c if entropy is None else entropy.detach().contiguous(),
            lp_c if rollout is None else rollout.detach().contiguous(),
            stats if ent_threshold is None else ent_threshold,
            _mask_for_kernel(mask) if selected is None else _mask_for_kernel(selected),
            (old if rollout is None else rollout).detach().contiguous(),
            grad,
            stats,
            T,
            adv_view.stride(0),
            adv_view.stride(1),
            1.0 - o.clip_eps_low,
            1.0 + o.eps_high,
            o.delta if o.delta is not None else 0.0,
            o.dual_clip if o.dual_clip is not None else 0.0,
            o.cispo_ratio_min if o.cispo_ratio_min is not None else 0.0,
            o.eps_high,
            o.sapo_tau_pos,
            o.sapo_tau_neg,
            o.kl_coef,
            o.kl_clamp if o.kl_clamp is not None else 0.0,
            o.entropy_coef,
            o.log_ratio_clamp if o.log_ratio_clamp is not None else 0.0,
            o.seq_log_ratio_cap if o.seq_log_ratio_cap is not None else 0.0,
            o.rollout_is_min if o.rollout_is_min is not None else -math.inf,
            o.rollout_is_cap if o.rollout_is_cap is not None else math.inf,
            o.clip_eps_low,
            o.eps_high,
            o.dppo_ratio_cap,
            o.dro_beta if o.dro_beta is not None else 0.0,
            o.kl_cov_coef,
            o.vespo_k_pos,
            o.vespo_lambda_pos,
            o.vespo_k_neg,
            o.vespo_lambda_neg,
            o.off_policy_mask_threshold if o.off_policy_mask_threshold is not None else 0.0,
            LOSS_KIND=kind,
            SEQ_RATIO=o.sequence_ratio,
            HAS_DELTA=o.delta is not None,
            HAS_DUAL=o.dual_clip is not None,
            HAS_CISPO_MIN=o.cispo_ratio_min is not None,
            LOG_RATIO_CLAMP=o.log_ratio_clamp is not None,
            SEQ_CAP=o.seq_log_ratio_cap is not None,
            KL_KIND=0 if ref is None else KL_ESTIMATORS.kernel_id(o.kl_kind),
            KL_IN_LOSS=o.kl_coef != 0,
            KL_CLAMP=o.kl_clamp is not None,
            KL_RATIO_WEIGHTED=o.kl_ratio_weighted,
            HAS_ENTROPY=entropy is not None,
            ENTROPY_MASK=ent_threshold is not None,
            ENTROPY_IN_ROWS=o.entropy_agg == "loss",
            TIS_LEVEL=_TIS_LEVEL_ID[None if rollout is None else o.rollout_is],
            TIS_MASK=o.rollout_is_mode == "mask",
            TIS_GATING=ROLLOUT_IS_GATINGS.index(o.rollout_is_gating),
            TIS_SEQ_MEAN=o.rollout_is_seq_ratio == "geometric_mean",
            TIS_WEIGHT=ROLLOUT_IS_WEIGHTS.index(o.rollout_is_weight),
            OPSM=o.off_policy_mask_threshold is not None,
            NEED_GRAD=need_grad,
            ACC_DTYPE=tl_acc_dtype(acc),
            N_STAT=N_STATS,
            BLOCK_T=block,
            num_warps=num_warps,
        )
    return stats, (grad if need_grad else None)


def _check_btensor(name: str, value, shape: tuple, dtypes=FLOAT_DTYPES) -> None:
    check_tensor(name, value, dtypes)
    if tuple(value.shape) != shape:
        raise ValueError(f"{name}.shape {tuple(value.shape)} does not match logprobs.shape {shape}")


MASK_DTYPES = (torch.bool, torch.uint8) + FLOAT_DTYPES + INDEX_DTYPES


def _policy_options(options, option_kwargs: dict) -> PolicyLossOptions:
    """``options`` with the keyword options applied over it (or over the defaults)."""
    unknown = sorted(set(option_kwargs) - set(PolicyLossOptions.field_names()))
    if unknown:
        close = difflib.get_close_matches(unknown[0], PolicyLossOptions.field_names(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise TypeError(f"policy_loss() got an unexpected keyword argument {unknown[0]!r}{hint}")
    if options is None:
        return PolicyLossOptions(**option_kwargs)
    if not isinstance(options, PolicyLossOptions):
        raise TypeError(f"options must be a PolicyLossOptions, got {type(options).__name__}")
    return dataclasses.replace(options, **option_kwargs) if option_kwargs else options


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    options: PolicyLossOptions | None = None,
    ref_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    rollout_logprobs: torch.Tensor | None = None,
    num_items: int | torch.Tensor | None = None,
    backend: str | None = None,
    **option_kwargs,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped-surrogate policy loss of the PPO/GRPO family, fused with its KL, entropy
    and rollout-correction terms and its aggregation.

    Per token (``r = exp(lp - lp_old)``, or GSPO's one ratio per sequence
    ``s_i = exp(sum_t m*(lp - lp_old) / max(1, n_i))``):

    * PPO clip (``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``, ``gspo``):
      ``L = -min(r*A, clip(r, 1 - clip_eps_low, 1 + clip_eps_high)*A)``;
    * ``cispo``: ``L = -stopgrad(clip(r, cispo_ratio_min, clip_eps_high)) * A * lp``;
    * ``sapo``: ``L = -sigmoid(tau*(r - 1)) * 4/tau * A``, ``tau = sapo_tau_pos`` if
      ``A > 0`` else ``sapo_tau_neg``;
    * ``luspo`` (PPO clip, seq-mean-token-sum), ``vespo``, ``gpg``, ``geo_mean`` (GMPO),
      ``dppo_tv``, ``dppo_kl``, ``dro``, ``clip_cov``, ``kl_cov``: the registered
      formulas of ``POLICY_LOSSES`` (docs/conventions.md);

    then ``L *= entropy_mask * rollout_weight`` (policy term only), ``L += kl_coef * KL``
    (``* r`` with ``kl_ratio_weighted``), ``L -= entropy_coef * H``, and the aggregation
    ``agg`` over the valid tokens.

    The options are given either as ``options=PolicyLossOptions(...)`` or as keywords
    (the fields of :class:`PolicyLossOptions`; given with ``options``, keywords replace
    its fields). Bad options raise ValueError (TypeError for a wrong type) naming the
    option and the value, before any work.

    Tensors:
        logprobs: (B, T) log-probs of the sampled tokens under the current policy. The
            loss is differentiable with respect to it.
        old_logprobs: (B, T) log-probs under the policy that sampled the rollouts.
        advantages: (B,) or (B, 1) (TRL's layout) one per sequence, or (B, T) one per token.
        mask: (B, T); nonzero marks a valid token. Masked positions may hold anything
            (even inf or NaN) in every other input; they contribute nothing.
        ref_logprobs: (B, T) reference log-probs; needed when ``kl_coef != 0``; when
            given, ``metrics["ref_kl"]`` is reported even with ``kl_coef=0``.
        entropy: (B, T) per-token entropy, needed by ``entropy_coef`` and
            ``entropy_quantile``; the loss is differentiable with respect to it
            through the bonus only.
        rollout_logprobs: (B, T) log-probs from the inference engine that produced the
            rollouts, for the rollout-mismatch correction (``rollout_is*`` options).
        num_items: for ``token-mean`` only: the global number of valid tokens of the
            whole optimizer step (an int, or a one-element tensor to avoid a host sync).
            None uses this call's count. With it, summing the gradients of every
            micro-batch and rank gives the whole batch's gradient: no extra factor
            (under DDP, which averages over ranks, multiply the loss by the world size,
            or pass ``num_items / world_size`` as TRL does).
        backend: ``"triton"``, ``"torch"`` or None (automatic; see fastpo.kernels).

    Options (fields of :class:`PolicyLossOptions`):
        loss_type: a name of ``POLICY_LOSSES``: ``"grpo"``, ``"bnpo"``, ``"dr_grpo"``,
            ``"dapo"``, ``"cispo"``, ``"sapo"``, ``"gspo"``, ``"luspo"``, ``"vespo"``
            (TRL's), ``"gpg"``, ``"geo_mean"``, ``"dppo_tv"``, ``"dppo_kl"``, ``"dro"``,
            ``"clip_cov"``, ``"kl_cov"`` (verl's); the clip form and the default
            aggregation of TRL's GRPOTrainer, verl's token-mean for the types TRL does
            not have (see ``PRESET_AGG``). ``gspo`` is
            the PPO clip with ``importance_level="sequence"`` (it overrides it).
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
        kl_coef: ``beta``; ``beta * KL_t`` is added per token before aggregation (TRL).
        kl_kind: a name of ``KL_ESTIMATORS``, as in ``kl_penalty`` (default k3, TRL GRPO).
        kl_clamp: ``c > 0``: the KL estimate is clamped to [-c, c] (OpenRLHF: 10).
        kl_ratio_weighted: the KL term is ``beta * KL_t * r`` with the ratio ``r`` the
            loss uses, not detached (TRL 1.16's ``use_bias_correction_kl``, its default).
        entropy_coef: entropy bonus ``-entropy_coef * H``, aggregated per ``entropy_agg``.
        entropy_agg: ``"loss"``: ``-entropy_coef * H_t`` per token, over every valid
            token, aggregated like the loss (verl); ``"token-mean"``:
            ``-entropy_coef * mean(H)`` over the tokens the policy term keeps (valid and
            above the entropy quantile), whatever ``agg`` is (TRL).
        entropy_quantile: ``q`` in [0, 1]: only tokens whose (detached) entropy is
            ``>= torch.quantile(valid entropies, q)`` contribute to the policy term, the
            top ``1 - q`` fraction: TRL's ``top_entropy_quantile`` is ``1 - q``. The
            quantile is over this call's valid tokens (TRL gathers it across processes
            first).
        rollout_is: the unit of the rollout correction: ``"token"`` (the ratio
            ``w_t = exp(lp_old - lp_rollout)``) or ``"sequence"`` (one ratio per sequence,
            ``exp(sum_t m*(lp_old - lp_rollout))``, or its geometric mean, see
            ``rollout_is_seq_ratio``).
        rollout_is_mode: ``"truncate"``: the policy term is multiplied by the unit's
            ratio clamped to ``[rollout_is_min, rollout_is_cap]``; ``"mask"``: units whose
            statistic (``rollout_is_gating``) is outside that band get weight 0, the
            others the weight ``rollout_is_weight``.
        rollout_is_min, rollout_is_cap: the band; None means unbounded on that side.
        rollout_is_gating: the statistic of ``"mask"``: ``"ratio"`` (the unit's ratio),
            ``"binary_kl"`` or ``"tv"`` (a divergence of the sampled token's
            probabilities under the sampler and the trainer; a sequence's is the mean
            over its tokens) (OpenRLHF's ``is_correction_gating``).
        rollout_is_seq_ratio: a sequence's ratio as the ``"product"`` of its token ratios
            (verl, TRL) or their ``"geometric_mean"`` (OpenRLHF).
        rollout_is_weight: with ``"mask"``, what kept units are weighted by: ``"unit"``
            (the unit's ratio, TRL ``*_mask``), ``"token"`` (each token's own ratio,
            OpenRLHF) or ``"none"`` (1: rejection only).
        agg: a name of ``AGGREGATIONS``, overriding the loss type's aggregation:
            ``"token-mean"``, ``"seq-mean-token-mean"``, ``"seq-mean-token-sum"`` or
            ``"seq-mean-token-sum-norm"``.
        seq_mean_rows: the number of sequences the ``seq-mean-*`` modes divide by:
            ``"all"`` (the batch size B; TRL) or ``"nonempty"`` (rows with at least
            one valid token; verl, OpenRLHF).
        max_len: for ``seq-mean-token-sum-norm`` (``dr_grpo``), required: the constant
            length normalizer (TRL's ``max_completion_length``).
        sapo_tau_pos, sapo_tau_neg: SAPO temperatures (TRL defaults 1.0, 1.05).
        log_ratio_clamp: ``c > 0``: the token log-ratio ``lp - lp_old`` is clamped to
            [-c, c] before the exponential (verl and OpenRLHF: 20).
        seq_log_ratio_cap: the sequence ratio's mean log-ratio is capped at this
            before the exponential (verl GSPO: 10); sequence ratio only.
        cispo_ratio_min: ``cispo`` only: the truncated ratio is also clamped from below
            (verl's CISPO clips to ``[1 - clip_ratio_low, 1 + clip_ratio_high]``).
        dppo_ratio_cap: ``dppo_*``: the cap of the detached ratio (verl's ``clip_ratio_c``);
            for DPPO ``clip_eps_low``/``clip_eps_high`` are the divergence thresholds.
        dro_beta: ``dro``, required: the weight of ``0.5 * (lp - lp_old)**2``.
        cov_ratio, clip_cov_lb, clip_cov_ub, kl_cov_coef: ``clip_cov`` / ``kl_cov``: the
            fraction of the call's valid tokens selected (at least one), Clip-Cov's
            covariance band, KL-Cov's ``abs(lp - lp_old)`` coefficient (verl's names:
            ``clip_cov_ratio``/``kl_cov_ratio``, ``clip_cov_lb``, ``clip_cov_ub``,
            ``ppo_kl_coef``). Clip-Cov draws its tokens from torch's generator.
        vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg: ``vespo``'s gamma
            weight parameters for ``A >= 0`` and ``A < 0`` (TRL's ``vespo_*``).
        rollout_rs, rollout_rs_min, rollout_rs_max: verl's rejection (needs
            ``rollout_logprobs``): a KL estimator of ``lp_old - lp_rollout`` per token or
            its sum/mean/max per sequence (``"token_k1"`` ... ``"seq_max_k3"``, see
            ``ROLLOUT_RS``) above ``rollout_rs_max`` (k1: outside ``[log min, log max]``,
            min ``1/max`` by default) removes the token or sequence from the mask.
        off_policy_mask_threshold: DeepSeek-V3.2's off-policy sequence mask (TRL): the
            policy term of tokens with ``A < 0`` in sequences whose mean
            ``lp_sampler - lp`` (rollout log-probs, else old) exceeds it is dropped.

    Gradient accumulation over ``k`` micro-batches: ``token-mean`` with ``num_items``
    needs no factor; every per-micro-batch mode (the ``seq-mean-*`` modes, and
    ``token-mean`` without ``num_items``) must be divided by ``k`` by the caller, as
    TRL divides by ``gradient_accumulation_steps``. With equal-size micro-batches the
    gradient then equals the whole batch's (for ``token-mean`` without ``num_items``
    only when every micro-batch has the same number of valid tokens).

    Returns:
        ``(loss, metrics)``: the 0-dim loss (float32, float64 for float64 logprobs) and
        a dict of 0-dim tensors over this call's valid tokens, computed without any
        host sync: ``clip_frac_low`` (``r < 1-eps_low`` and ``A < 0``; for cispo
        ``r < cispo_ratio_min`` and ``A < 0``), ``clip_frac_high`` (``r > 1+eps_high``
        and ``A > 0``; for cispo ``r > cap`` and ``A > 0``; both 0 for sapo),
        ``ratio_mean``, ``ratio_max`` (of the ratio the loss uses), ``approx_kl``
        (``mean(r - 1 - log r)`` with the token ratio, an estimate of KL(old ||
        current)), plus ``dual_clip_frac`` with ``dual_clip``, ``ref_kl`` with
        ``ref_logprobs``, ``entropy_mean`` with ``entropy``, and with
        ``rollout_logprobs`` ``rollout_is_weight_mean`` (mean rollout weight) and
        ``rollout_is_filtered_frac`` (fraction of tokens whose unit is outside the band:
        masked, or truncated), ``cov_selected_frac`` for ``clip_cov``/``kl_cov``,
        ``off_policy_masked_frac`` with ``off_policy_mask_threshold`` and
        ``rollout_rs_masked_frac`` (of the tokens valid before it) with ``rollout_rs``. A mask with no
        valid token gives loss 0, zero gradients and zero metrics.
    """
    o = _policy_options(options, option_kwargs)
    check_tensor("logprobs", logprobs, FLOAT_DTYPES)
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be (B, T), got shape {tuple(logprobs.shape)}")
    shape = tuple(logprobs.shape)
    _check_btensor("old_logprobs", old_logprobs, shape)
    _check_btensor("mask", mask, shape, MASK_DTYPES)
    check_tensor("advantages", advantages, FLOAT_DTYPES)
    if tuple(advantages.shape) not in (shape[:1], (shape[0], 1), shape):
        raise ValueError(
            f"advantages.shape {tuple(advantages.shape)} must be (B,) = {shape[:1]}, (B, 1) or (B, T) = {shape}"
        )
    for name, value in (("ref_logprobs", ref_logprobs), ("entropy", entropy), ("rollout_logprobs", rollout_logprobs)):
        if value is not None:
            _check_btensor(name, value, shape)
    check_same_device(
        logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask,
        ref_logprobs=ref_logprobs, entropy=entropy, rollout_logprobs=rollout_logprobs,
    )
    if o.kl_coef != 0 and ref_logprobs is None:
        raise ValueError(f"kl_coef={o.kl_coef!r} needs ref_logprobs")
    if o.entropy_coef != 0 and entropy is None:
        raise ValueError(f"entropy_coef={o.entropy_coef!r} needs entropy")
    if o.entropy_quantile is not None and entropy is None:
        raise ValueError(f"entropy_quantile={o.entropy_quantile!r} needs entropy")
    if rollout_logprobs is None:
        for name, default in (("rollout_is_cap", None), ("rollout_is_min", None), ("rollout_is_mode", "truncate"),
                              ("rollout_is_gating", "ratio"), ("rollout_rs", None)):
            if getattr(o, name) != default:
                raise ValueError(f"{name}={getattr(o, name)!r} needs rollout_logprobs")
    agg = o.resolved_agg
    num_items = _check_num_items(agg, num_items, logprobs.device)

    valid = mask != 0
    rejected = None
    if o.rollout_rs is not None:  # the rejected tokens leave the mask: no loss, no count
        kept = _rollout_rejection(old_logprobs, rollout_logprobs, valid, o)
        rejected, valid, mask = valid & ~kept, kept, kept
    ent_threshold = None if o.entropy_quantile is None else _entropy_threshold(entropy, valid, o.entropy_quantile)
    need_grad = torch.is_grad_enabled() and logprobs.requires_grad

    def run_torch():
        row_loss, kept_entropy, stats, selected = _policy_loss_torch(
            logprobs, old_logprobs, advantages, valid, ref_logprobs, entropy, rollout_logprobs, ent_threshold, o,
        )
        sums = stats.sum(0)
        loss = (_row_scale(agg, stats[:, _COUNT], num_items, o.max_len, o.seq_mean_rows) * row_loss).sum()
        if kept_entropy is not None:
            loss = loss - o.entropy_coef * kept_entropy.sum() / sums[_KEPT_COUNT].clamp(min=1.0)
        return loss, stats, sums, selected

    def run_triton():
        selected = None
        if POLICY_LOSSES.get(o.loss_type).kernel_id in _COVARIANCE_KINDS:
            selected = _covariance_selection(logprobs, old_logprobs, advantages, valid, o)
        stats, token_grad = _policy_loss_triton(
            logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, rollout_logprobs, ent_threshold,
            selected, o, need_grad,
        )
        sums = stats.sum(0)
        row_scale = _row_scale(agg, stats[:, _COUNT], num_items, o.max_len, o.seq_mean_rows)
        kept_mode = entropy is not None and o.entropy_agg == "token-mean"
        # with kept_mode: the mean entropy over the tokens the policy term keeps
        loss = _ScaledRowLoss.apply(
            logprobs, entropy, stats[:, _LOSS], row_scale, token_grad, mask, o.entropy_coef,
            sums[_KEPT_ENTROPY] / sums[_KEPT_COUNT].clamp(min=1.0) if kept_mode else None,
            sums[_KEPT_COUNT] if kept_mode else None, ent_threshold,
        )
        return loss, stats, sums, selected

    loss, stats, sums, selected = dispatch("policy_loss", logprobs.device, backend, torch=run_torch,
                                           triton=run_triton)()
    metrics = _metrics(
        stats, sums, ref_logprobs is not None, entropy is not None, o.dual_clip is not None,
        rollout_logprobs is not None,
    )
    count = sums[_COUNT]
    if selected is not None:
        metrics["cov_selected_frac"] = selected.sum() / count.clamp(min=1.0)
    if o.off_policy_mask_threshold is not None:
        metrics["off_policy_masked_frac"] = sums[_OFF_POLICY_MASKED] / count.clamp(min=1.0)
    if rejected is not None:  # a fraction of the tokens valid before the rejection
        rejected_count = rejected.sum().to(count.dtype)
        metrics["rollout_rs_masked_frac"] = rejected_count / (count + rejected_count).clamp(min=1.0)
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


def _value_loss_torch(values, old_values, returns, valid, clip_eps):
    """(row loss sums, counts, clipped counts), differentiable w.r.t. values."""
    acc = acc_dtype(values)
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
    return row_loss, valid.sum(-1).to(acc), clipped.sum(-1).to(acc)


@on_tensor_device
def _value_loss_triton(values, old_values, returns, mask, clip_eps, need_grad):
    """(row loss sums, counts, clipped counts, per-token gradient or None)."""
    B, T = values.shape
    acc = acc_dtype(values)
    stats = torch.empty((B, _VALUE_STATS), dtype=acc, device=values.device)
    grad = torch.empty((B, T), dtype=acc, device=values.device) if need_grad else stats
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
            ACC_DTYPE=tl_acc_dtype(acc),
            BLOCK_T=block,
            num_warps=num_warps,
        )
    return stats[:, 0], stats[:, 1], stats[:, 2], (grad if need_grad else None)


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
    seq_mean_rows: str = "all",
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
        agg: a name of ``AGGREGATIONS``: ``"token-mean"`` (default, verl),
            ``"seq-mean-token-mean"``, ``"seq-mean-token-sum"`` or
            ``"seq-mean-token-sum-norm"``.
        num_items: global valid-token count for ``token-mean``, as in ``policy_loss``.
        max_len: length normalizer, required by ``seq-mean-token-sum-norm``.
        seq_mean_rows: ``"all"`` or ``"nonempty"``, as in ``policy_loss``.
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
    AGGREGATIONS.check(agg)
    _check_choice("seq_mean_rows", seq_mean_rows, SEQ_MEAN_ROWS)
    if clip_eps is not None:
        clip_eps = positive_scalar("clip_eps", clip_eps)
    num_items = _check_num_items(agg, num_items, values.device)
    max_len = _check_max_len(agg, max_len)
    valid = mask != 0

    def run_torch():
        row_loss, counts, clipped_rows = _value_loss_torch(values, old_values, returns, valid, clip_eps)
        return (_row_scale(agg, counts, num_items, max_len, seq_mean_rows) * row_loss).sum(), counts, clipped_rows

    def run_triton():
        need_grad = torch.is_grad_enabled() and values.requires_grad
        row_loss, counts, clipped_rows, grad = _value_loss_triton(values, old_values, returns, mask, clip_eps, need_grad)
        row_scale = _row_scale(agg, counts, num_items, max_len, seq_mean_rows)
        return _ScaledValueLoss.apply(values, row_loss, row_scale, grad), counts, clipped_rows

    loss, counts, clipped_rows = dispatch("value_loss", values.device, backend, torch=run_torch, triton=run_triton)()
    metrics = {"clip_frac": clipped_rows.sum() / counts.sum().clamp(min=1.0)}
    return loss, metrics
