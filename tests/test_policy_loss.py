"""policy_loss, kl_penalty and value_loss against independent float64 references written
per element from docs/conventions.md (Python loops over scalar tensors, so that
autograd of the reference gives the expected gradients), on every CPU-runnable backend."""

import dataclasses
import math

import pytest
import torch

from fastpo.kernels import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    PolicyLossOptions,
    kl_penalty,
    policy_loss,
    value_loss,
)
from fastpo.kernels import policy as policy_module
from fastpo.kernels._backend import triton_interpreter_enabled

# The aggregation of each loss type in TRL's GRPOTrainer, restated here independently.
TRL_AGGREGATION = {
    "grpo": "seq-mean-token-mean",
    "sapo": "seq-mean-token-mean",
    "gspo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dapo": "token-mean",
    "cispo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
    # verl's default (token-mean) for the loss types TRL does not have; GMPO averages its
    # per-sequence losses
    "gpg": "token-mean",
    "geo_mean": "seq-mean-token-mean",
    "dppo_tv": "token-mean",
    "dppo_kl": "token-mean",
    "dro": "token-mean",
    "clip_cov": "token-mean",
    "kl_cov": "token-mean",
    "luspo": "seq-mean-token-sum",
    "vespo": "token-mean",
}


# ------------------------------------------------------------------ references


def reference_kl(d, kind):
    """One token's KL estimate from a 0-dim float64 tensor d = lp - lp_ref."""
    assert kind in ("k1", "k2", "k3", "abs", "low_var_kl"), f"write an independent reference of {kind!r} here"
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d * d
    if kind == "k3":
        return torch.exp(-d) + d - 1
    if kind == "abs":
        return torch.abs(d)
    assert kind == "low_var_kl"
    clamped = torch.clamp(d, -20.0, 20.0)
    return torch.clamp(torch.exp(-clamped) + clamped - 1, -10.0, 10.0)


def reference_aggregate(rows, counts, agg, num_items=None, max_len=None, seq_mean_rows="all"):
    """rows[i] = sum over the valid tokens of row i of the per-token loss."""
    batch = len(rows) if seq_mean_rows == "all" else max(1, sum(1 for c in counts if c > 0))
    total = sum(rows, torch.zeros((), dtype=torch.float64))
    if agg == "token-mean":
        n = sum(counts) if num_items is None else num_items
        return total / n if n > 0 else total * 0.0
    if agg == "seq-mean-token-mean":
        return sum((r / max(1, c) for r, c in zip(rows, counts)), torch.zeros((), dtype=torch.float64)) / batch
    if agg == "seq-mean-token-sum":
        return total / batch
    assert agg == "seq-mean-token-sum-norm"
    return total / (batch * max_len)


def reference_rollout_divergence(old, roll, gating):
    """Divergence of the sampled token's probability under the sampler (p) and the
    trainer (q), both clamped to [1e-6, 1 - 1e-6]."""
    p = min(max(math.exp(roll), 1e-6), 1 - 1e-6)
    q = min(max(math.exp(old), 1e-6), 1 - 1e-6)
    if gating == "binary_kl":
        return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    assert gating == "tv"
    return abs(p - q)


def reference_policy_loss(lp, ent, old, adv, mask, ref=None, roll=None, *, loss_type="grpo", clip_eps_low=0.2,
                          clip_eps_high=None, delta=None, dual_clip=None, importance_level="token", kl_coef=0.0,
                          kl_kind="k3", entropy_coef=0.0, entropy_quantile=None, rollout_is="token",
                          rollout_is_cap=None, agg=None, num_items=None, max_len=None, sapo_tau_pos=1.0,
                          sapo_tau_neg=1.05, kl_ratio_weighted=False, kl_clamp=None, log_ratio_clamp=None,
                          seq_log_ratio_cap=None, cispo_ratio_min=None, seq_mean_rows="all", entropy_agg="loss",
                          rollout_is_mode="truncate", rollout_is_min=None, rollout_is_gating="ratio",
                          rollout_is_seq_ratio="product", rollout_is_weight="unit", dppo_ratio_cap=20.0,
                          dro_beta=None, cov_ratio=0.0002, clip_cov_lb=1.0, clip_cov_ub=5.0, kl_cov_coef=0.1,
                          vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0,
                          rollout_rs=None, rollout_rs_min=None, rollout_rs_max=None, off_policy_mask_threshold=None,
                          chosen=None):
    """(loss, metrics) per element. ``lp`` and ``ent`` are float64 leaves; the rest lists.
    ``chosen``: the (i, t) Clip-Cov dropped, when it had more candidates than it keeps
    (a random choice); otherwise the reference selects them itself."""
    batch, length = lp.shape
    eps_high = clip_eps_low if clip_eps_high is None else clip_eps_high
    agg = agg or TRL_AGGREGATION[loss_type]
    sequence_ratio = loss_type in ("gspo", "geo_mean") or importance_level == "sequence"
    valid = [[bool(mask[i][t]) for t in range(length)] for i in range(batch)]
    n_before_rejection = sum(sum(row) for row in valid)
    if rollout_rs is not None:  # verl's rejection: the rejected tokens leave the mask
        level, estimator = rollout_rs.rsplit("_", 1)

        def estimate(i, t):
            x = min(max(old[i][t] - roll[i][t], -20.0), 20.0)
            return {"k1": -x, "k2": 0.5 * x * x, "k3": math.exp(x) - 1 - x}[estimator]

        def passes(stat):
            if estimator == "k1":
                low = 1 / rollout_rs_max if rollout_rs_min is None else rollout_rs_min
                return math.log(low) <= stat <= math.log(rollout_rs_max)
            return stat <= rollout_rs_max

        for i in range(batch):
            units = [t for t in range(length) if valid[i][t]]
            if level == "token":
                for t in units:
                    valid[i][t] = passes(estimate(i, t))
                continue
            values = [estimate(i, t) for t in units]
            stat = {"seq_sum": sum(values), "seq_mean": sum(values) / max(1, len(values)),
                    "seq_max": max(values, default=0.0)}[level]
            if not passes(stat):
                valid[i] = [False] * length
    counts = [sum(row) for row in valid]
    n_valid = sum(counts)

    def advantage(i, t):
        return adv[i][t] if isinstance(adv[i], list) else adv[i]

    def token_log_ratio(i, t):
        log_ratio = lp[i, t] - old[i][t]
        if log_ratio_clamp is not None:
            log_ratio = torch.clamp(log_ratio, -log_ratio_clamp, log_ratio_clamp)
        return log_ratio

    seq_ratio = []
    for i in range(batch):
        log_sum = torch.zeros((), dtype=torch.float64)
        for t in range(length):
            if valid[i][t]:
                d = lp[i, t] - old[i][t]
                if loss_type == "geo_mean":  # GMPO: sign(A) * min(sign(A) * d, sign(A) * clip(d))
                    sign = torch.sign(torch.tensor(advantage(i, t), dtype=torch.float64))
                    d = sign * torch.minimum(sign * d, sign * torch.clamp(d, -clip_eps_low, eps_high))
                log_sum = log_sum + d
        seq_log = log_sum / max(1, counts[i])
        if seq_log_ratio_cap is not None:
            seq_log = torch.clamp(seq_log, max=seq_log_ratio_cap)
        seq_ratio.append(torch.exp(seq_log))

    if loss_type in ("clip_cov", "kl_cov"):
        cells = [(i, t) for i in range(batch) for t in range(length) if valid[i][t]]
        mean_adv = sum(advantage(i, t) for i, t in cells) / max(1, len(cells))
        mean_lp = sum(lp[i, t].item() for i, t in cells) / max(1, len(cells))
        cov = {(i, t): (advantage(i, t) - mean_adv) * (lp[i, t].item() - mean_lp) for i, t in cells}
        k = max(1, int(cov_ratio * len(cells)))
        if loss_type == "kl_cov":
            chosen = set(sorted(cells, key=lambda cell: -cov[cell])[:k])
        elif chosen is None:
            def clipped(i, t):
                a, r = advantage(i, t), torch.exp(token_log_ratio(i, t)).item()
                return -a * min(max(r, 1 - clip_eps_low), 1 + eps_high) > -a * r

            chosen = {c for c in cells if not clipped(*c) and clip_cov_lb < cov[c] < clip_cov_ub}
            assert len(chosen) <= k, "a case whose Clip-Cov choice is random needs chosen="

    threshold = None
    if entropy_quantile is not None:
        values = sorted(ent[i, t].item() for i in range(batch) for t in range(length) if valid[i][t])
        position = entropy_quantile * (len(values) - 1)
        below = math.floor(position)
        above = math.ceil(position)
        threshold = values[below] + (position - below) * (values[above] - values[below])

    def kept(i, t):
        return threshold is None or ent[i, t].item() >= threshold

    def rollout_weight(i, t):
        """(weight, whether the unit is outside the band)."""
        if roll is None:
            return 1.0, False
        token_ratio = math.exp(old[i][t] - roll[i][t])
        units = [u for u in range(length) if valid[i][u]]
        if rollout_is == "token":
            unit = token_ratio
        else:
            log_sum = sum(old[i][u] - roll[i][u] for u in units)
            unit = math.exp(log_sum / len(units) if rollout_is_seq_ratio == "geometric_mean" else log_sum)
        low = -math.inf if rollout_is_min is None else rollout_is_min
        high = math.inf if rollout_is_cap is None else rollout_is_cap
        if rollout_is_mode == "truncate":
            return min(max(unit, low), high), not low <= unit <= high
        stat = unit
        if rollout_is_gating != "ratio":
            if rollout_is == "token":
                stat = reference_rollout_divergence(old[i][t], roll[i][t], rollout_is_gating)
            else:
                stat = sum(reference_rollout_divergence(old[i][u], roll[i][u], rollout_is_gating) for u in units)
                stat = stat / len(units)
        if not low <= stat <= high:
            return 0.0, True
        return {"unit": unit, "token": token_ratio, "none": 1.0}[rollout_is_weight], False

    rows = []
    clip_low = clip_high = dual_hits = 0
    ratios, approx_kl, ref_kl, entropies = [], 0.0, 0.0, 0.0
    is_weights, is_filtered = 0.0, 0
    off_policy_dropped = 0
    kept_entropy, kept_count = torch.zeros((), dtype=torch.float64), 0
    lo, hi = 1 - clip_eps_low, 1 + eps_high
    for i in range(batch):
        row = torch.zeros((), dtype=torch.float64)
        for t in range(length):
            if not valid[i][t]:
                continue
            a = advantage(i, t)
            log_ratio = token_log_ratio(i, t)
            token_ratio = torch.exp(log_ratio)
            r = seq_ratio[i] if sequence_ratio else token_ratio
            if loss_type == "cispo":
                loss = -torch.clamp(r, min=cispo_ratio_min, max=eps_high).detach() * a * lp[i, t]
                clip_high += r.item() > eps_high and a > 0
                clip_low += cispo_ratio_min is not None and r.item() < cispo_ratio_min and a < 0
            elif loss_type == "sapo":
                tau = sapo_tau_pos if a > 0 else sapo_tau_neg
                loss = -torch.sigmoid(tau * (r - 1)) * 4 / tau * a
            elif loss_type == "gpg":
                loss = -a * lp[i, t]
            elif loss_type == "geo_mean":
                loss = -a * r
                d = lp[i, t].item() - old[i][t]
                outside = not -clip_eps_low <= d <= eps_high
                clip_low += outside and a < 0
                clip_high += outside and a > 0
            elif loss_type in ("dppo_tv", "dppo_kl"):
                p, q = math.exp(lp[i, t].item()), math.exp(old[i][t])
                if loss_type == "dppo_tv":
                    in_region = p - q <= eps_high if a > 0 else p - q >= -clip_eps_low
                else:
                    quotient = (1 - q + 1e-8) / (1 - p + 1e-8)  # negative (NaN log) only if lp_old > 0
                    binary_kl = q * math.log(q / p) + (1 - q) * (math.log(quotient) if quotient > 0 else math.nan)
                    in_region = binary_kl <= eps_high or p <= q if a > 0 else binary_kl <= clip_eps_low or p >= q
                loss = -a * min(r.item(), dppo_ratio_cap) * lp[i, t] * in_region
                clip_high += not in_region and a > 0
                clip_low += not in_region and a <= 0
            elif loss_type == "kl_cov":
                loss = -a * r
                if (i, t) in chosen:
                    loss = loss + kl_cov_coef * torch.abs(lp[i, t] - old[i][t])
            elif loss_type == "vespo":
                log_w = sum(min(max(lp[i, u].item() - old[i][u], -20.0), 20.0) for u in range(length) if valid[i][u])
                log_w = min(max(log_w, math.log(1e-8)), 20.0)
                k, lam = (vespo_k_pos, vespo_lambda_pos) if a >= 0 else (vespo_k_neg, vespo_lambda_neg)
                lam = max(lam, 1e-4)
                phi = math.exp(lam + k * log_w - lam * math.exp(log_w))
                loss = -phi * a * lp[i, t]
            elif loss_type == "dro":
                d = lp[i, t] - old[i][t]
                loss = -(a * lp[i, t] - 0.5 * dro_beta * d * d)
            else:
                unclipped = torch.clamp(r, max=delta) if delta is not None else r
                loss = -torch.minimum(unclipped * a, torch.clamp(r, lo, hi) * a)
                if dual_clip is not None and a < 0:
                    bound = torch.tensor(-dual_clip * a, dtype=torch.float64)
                    dual_hits += bound.item() < loss.item()
                    loss = torch.minimum(loss, bound)
                clip_low += r.item() < lo and a < 0
                clip_high += r.item() > hi and a > 0
                if loss_type == "clip_cov" and (i, t) in chosen:
                    loss = loss * 0.0
            if not kept(i, t):
                loss = loss * 0.0
            weight, filtered = rollout_weight(i, t)
            is_weights += weight
            is_filtered += filtered
            loss = loss * weight
            if off_policy_mask_threshold is not None:  # DeepSeek-V3.2's off-policy sequence mask (TRL)
                sampler = old if roll is None else roll
                units = [u for u in range(length) if valid[i][u]]
                drift = sum(sampler[i][u] - lp[i, u].item() for u in units) / len(units)
                if a < 0 and drift > off_policy_mask_threshold:
                    loss = loss * 0.0
                    off_policy_dropped += 1
            if ref is not None:
                kl = reference_kl(lp[i, t] - ref[i][t], kl_kind)
                if kl_clamp is not None:
                    kl = torch.clamp(kl, -kl_clamp, kl_clamp)
                ref_kl += kl.item()
                if kl_coef != 0:
                    loss = loss + kl_coef * (kl * r if kl_ratio_weighted else kl)
            if ent is not None:
                entropies += ent[i, t].item()
                if entropy_coef != 0 and entropy_agg == "loss":
                    loss = loss - entropy_coef * ent[i, t]
                if kept(i, t):
                    kept_entropy = kept_entropy + ent[i, t]
                    kept_count += 1
            row = row + loss
            ratios.append(r.item())
            approx_kl += token_ratio.item() - 1 - log_ratio.item()
        rows.append(row)
    loss = reference_aggregate(rows, counts, agg, num_items, max_len, seq_mean_rows)
    if entropy_agg == "token-mean" and entropy_coef != 0:
        loss = loss - entropy_coef * kept_entropy / max(1, kept_count)
    n = max(1, n_valid)
    metrics = {
        "clip_frac_low": clip_low / n,
        "clip_frac_high": clip_high / n,
        "ratio_mean": sum(ratios) / n,
        "ratio_max": max(ratios) if ratios else 0.0,
        "approx_kl": approx_kl / n,
    }
    if dual_clip is not None:
        metrics["dual_clip_frac"] = dual_hits / n
    if ref is not None:
        metrics["ref_kl"] = ref_kl / n
    if ent is not None:
        metrics["entropy_mean"] = entropies / n
    if roll is not None:
        metrics["rollout_is_weight_mean"] = is_weights / n
        metrics["rollout_is_filtered_frac"] = is_filtered / n
    if loss_type in ("clip_cov", "kl_cov"):
        metrics["cov_selected_frac"] = len(chosen) / n
    if off_policy_mask_threshold is not None:
        metrics["off_policy_masked_frac"] = off_policy_dropped / n
    if rollout_rs is not None:
        metrics["rollout_rs_masked_frac"] = (n_before_rejection - n_valid) / max(1, n_before_rejection)
    return loss, metrics


def reference_value_loss(values, old, returns, mask, clip_eps, agg, max_len=None, seq_mean_rows="all"):
    batch, length = values.shape
    rows, counts, clipped = [], [], 0
    for i in range(batch):
        row = torch.zeros((), dtype=torch.float64)
        counts.append(sum(bool(mask[i][t]) for t in range(length)))
        for t in range(length):
            if not mask[i][t]:
                continue
            v = values[i, t]
            loss = 0.5 * (v - returns[i][t]) ** 2
            if clip_eps is not None:
                clipped_v = torch.clamp(v, old[i][t] - clip_eps, old[i][t] + clip_eps)
                loss_clipped = 0.5 * (clipped_v - returns[i][t]) ** 2
                clipped += loss_clipped.item() > loss.item()
                loss = torch.maximum(loss, loss_clipped)
            row = row + loss
        rows.append(row)
    return reference_aggregate(rows, counts, agg, max_len=max_len, seq_mean_rows=seq_mean_rows), clipped / max(
        1, sum(counts))


# ------------------------------------------------------------------ inputs


def ragged_mask(batch, length):
    """Random holes, one empty row and one full row."""
    mask = torch.rand(batch, length) > 0.35
    mask[0] = False
    mask[1] = True
    return mask


def make_inputs(batch=5, length=7, per_token_advantages=False):
    """Random inputs with a ragged mask; masked positions hold garbage (inf, NaN) that
    must not reach the loss or the gradients."""
    mask = ragged_mask(batch, length)
    lp = -torch.rand(batch, length) * 3 - 0.05
    old = lp + 0.35 * torch.randn(batch, length)
    ref = lp + 1.5 * torch.randn(batch, length)
    roll = old + 0.2 * torch.randn(batch, length)
    ent = torch.rand(batch, length) * 2
    adv = torch.randn(batch, length) if per_token_advantages else torch.randn(batch)
    adv = adv.abs() * torch.tensor([1.0, -1.0]).repeat(length).narrow(0, 0, adv.shape[-1])  # both signs
    lp[~mask] = -math.inf
    old[~mask] = math.inf
    ref[~mask] = math.nan
    roll[~mask] = math.nan
    ent[~mask] = math.nan
    return {"lp": lp, "old": old, "ref": ref, "roll": roll, "ent": ent, "adv": adv, "mask": mask}


def assert_close(actual, expected, rtol=2e-5, atol=2e-6):
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def run_both(inputs, backend, case):
    """policy_loss and the reference on the same inputs; returns both losses, gradients
    (logprobs, entropy) and metrics."""
    case = dict(case)
    with_ref, with_entropy = case.pop("with_ref", False), case.pop("with_entropy", False)
    uses_ref = with_ref or "kl_coef" in case
    uses_ent = with_entropy or "entropy_coef" in case or "entropy_quantile" in case
    uses_roll = case.pop("with_rollout", False) or any(key.startswith(("rollout_is", "rollout_rs")) for key in case)
    case.pop("per_token_advantages", None)
    case.pop("expect_positive", None)
    chosen = case.pop("chosen", None)
    mask = inputs["mask"]

    lp = inputs["lp"].clone().requires_grad_()
    ent = inputs["ent"].clone().requires_grad_() if uses_ent else None
    loss, metrics = policy_loss(
        lp, inputs["old"], inputs["adv"], mask, ref_logprobs=inputs["ref"] if uses_ref else None, entropy=ent,
        rollout_logprobs=inputs["roll"] if uses_roll else None, backend=backend, **case,
    )
    grads = torch.autograd.grad(loss, [x for x in (lp, ent) if x is not None])

    lp64 = torch.where(mask, inputs["lp"], 0.0).double().requires_grad_()
    ent64 = torch.where(mask, inputs["ent"], 0.0).double().requires_grad_() if uses_ent else None
    expected, expected_metrics = reference_policy_loss(
        lp64, ent64, inputs["old"].double().tolist(), inputs["adv"].double().tolist(), mask.tolist(),
        inputs["ref"].double().tolist() if uses_ref else None, inputs["roll"].double().tolist() if uses_roll else None,
        chosen=chosen, **case,
    )
    leaves = [x for x in (lp64, ent64) if x is not None]
    if expected.requires_grad:
        expected_grads = torch.autograd.grad(expected, leaves, allow_unused=True)
    else:  # no valid token reaches the loss
        expected_grads = [None] * len(leaves)
    expected_grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, expected_grads)]
    return loss, grads, metrics, expected, expected_grads, expected_metrics


# ------------------------------------------------------------------ kl_penalty


def test_trl_aggregation_table_covers_every_loss_type():
    assert set(TRL_AGGREGATION) == set(POLICY_LOSSES.names())
    assert policy_module.PRESET_AGG == TRL_AGGREGATION


@pytest.mark.parametrize("kind", KL_ESTIMATORS.names())
def test_kl_penalty_matches_reference(kind, backend):
    lp = -torch.rand(40) * 3
    # d spans both clamps of low_var_kl (|d| > 20, k3 > 10) and an exact zero for abs
    offsets = torch.cat([torch.randn(30) * 2, torch.tensor([-25.0, -12.0, -3.0, 3.0, 12.0, 25.0, 0.0, 0.5, -0.5, 1.0])])
    ref = lp - offsets
    lp_leaf = lp.clone().requires_grad_()
    ref_leaf = ref.clone().requires_grad_()
    kl = kl_penalty(lp_leaf, ref_leaf, kind, backend=backend)
    assert kl.dtype == torch.float32 and kl.shape == lp.shape
    weights = torch.rand(40)
    grad_lp, grad_ref = torch.autograd.grad((kl * weights).sum(), [lp_leaf, ref_leaf])

    lp64 = lp.double().requires_grad_()
    ref64 = ref.double().requires_grad_()
    expected = torch.stack([reference_kl(lp64[i] - ref64[i], kind) for i in range(40)])
    expected_lp, expected_ref = torch.autograd.grad((expected * weights.double()).sum(), [lp64, ref64])
    assert_close(kl, expected, rtol=1e-5, atol=1e-5)
    assert_close(grad_lp, expected_lp, rtol=1e-5, atol=1e-5)
    assert_close(grad_ref, expected_ref, rtol=1e-5, atol=1e-5)


def test_kl_penalty_keeps_shape_and_input_dtype_gradient(backend):
    lp = (-torch.rand(3, 4, 5)).to(torch.bfloat16).requires_grad_()
    ref = (-torch.rand(3, 4, 5)).to(torch.bfloat16)
    kl = kl_penalty(lp, ref, "k2", backend=backend)
    assert kl.shape == (3, 4, 5) and kl.dtype == torch.float32
    kl.sum().backward()
    assert lp.grad.dtype == torch.bfloat16
    assert_close(lp.grad, (lp.float() - ref.float()).detach(), rtol=1e-2, atol=1e-2)


needs_interpreter = pytest.mark.skipif(
    not (policy_module.HAS_TRITON and triton_interpreter_enabled()), reason="needs Triton's interpreter"
)


@needs_interpreter
@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # k3 of d = -100, then clamped
@pytest.mark.parametrize("kind", KL_ESTIMATORS.names())
@pytest.mark.parametrize("clamp", [None, 2.0])
def test_every_kl_estimator_has_a_kernel_branch(kind, clamp):
    """The Triton branch of each registered estimator equals its torch reference, and,
    clamped, the independent reference clamped; where the clamp is active the gradient
    is 0, even where the unclamped estimate overflows (k3 of d = -100)."""
    offsets = torch.tensor([-100.0, -25.0, -12.0, -3.0, -0.7, 0.0, 0.4, 3.0, 12.0, 25.0])
    if clamp is None:
        offsets = offsets[1:]
    lp = -torch.rand(offsets.numel()) * 3
    weights = torch.rand(offsets.numel())
    results = []
    for backend in ("triton", "torch"):
        lp_leaf, ref_leaf = lp.clone().requires_grad_(), (lp - offsets).requires_grad_()
        kl = kl_penalty(lp_leaf, ref_leaf, kind, clamp=clamp, backend=backend)
        results.append((kl, *torch.autograd.grad((kl * weights).sum(), [lp_leaf, ref_leaf])))
    for triton_value, torch_value in zip(*results):
        assert torch.isfinite(triton_value).all()
        assert_close(triton_value, torch_value, rtol=1e-6, atol=1e-6)
    d64 = offsets.double()
    expected = torch.stack([reference_kl(d, kind) for d in d64])
    if clamp is not None:
        expected = expected.clamp(-clamp, clamp)
        assert (expected.abs() == clamp).any() and (results[0][1][expected.abs() == clamp] == 0).all()
    assert_close(results[0][0], expected, rtol=1e-5, atol=1e-5)


@needs_interpreter
def test_an_unregistered_kernel_id_is_an_error_not_another_variant(monkeypatch):
    x = torch.zeros(4)
    unregistered = max(v.kernel_id for v in KL_ESTIMATORS) + 1
    with pytest.raises(Exception, match="not the kernel id of a registered KL estimator"):
        policy_module._kl_penalty_kernel[(1,)](
            x, x, x, x, 4, 0.0, KL_KIND=unregistered, KL_CLAMP=False, NEED_GRAD=False,
            ACC_DTYPE=policy_module.tl.float32, BLOCK=16,
        )
    # a loss type registered without a kernel branch fails on the Triton backend
    registry = policy_module.Registry("POLICY_LOSSES", "loss_type")
    for variant in POLICY_LOSSES:
        registry.add(variant)
    registry.register("no_branch", kernel_id=99, doc="test", agg="token-mean", sequence_ratio=False)(
        POLICY_LOSSES.get("grpo").reference
    )
    monkeypatch.setattr(policy_module, "POLICY_LOSSES", registry)
    inputs = make_inputs()
    args = (inputs["lp"], inputs["old"], inputs["adv"], inputs["mask"])
    torch_loss, _ = policy_loss(*args, loss_type="no_branch", agg="token-mean", backend="torch")
    assert torch.isfinite(torch_loss)
    with pytest.raises(Exception, match="not the kernel id of a registered policy loss"):
        policy_loss(*args, loss_type="no_branch", agg="token-mean", backend="triton")


# ------------------------------------------------------------------ policy_loss vs reference

CASES = {
    "grpo": dict(loss_type="grpo"),
    "bnpo": dict(loss_type="bnpo"),
    "dr_grpo": dict(loss_type="dr_grpo", max_len=9),
    "dapo_global_count": dict(loss_type="dapo", clip_eps_high=0.28, num_items=41),
    "dapo_local_count": dict(loss_type="dapo", clip_eps_high=0.28),
    "cispo": dict(loss_type="cispo", clip_eps_high=1.1),
    "cispo_sequence": dict(loss_type="cispo", clip_eps_high=1.02, importance_level="sequence"),
    "sapo": dict(loss_type="sapo"),
    "sapo_sequence_taus": dict(loss_type="sapo", sapo_tau_pos=2.0, sapo_tau_neg=3.0, importance_level="sequence"),
    "gspo": dict(loss_type="gspo", clip_eps_low=0.03, clip_eps_high=0.04),
    "gspo_token_advantages": dict(loss_type="gspo", clip_eps_low=0.03, per_token_advantages=True),
    "asymmetric_clip_delta": dict(loss_type="grpo", clip_eps_low=0.1, clip_eps_high=0.3, delta=1.15),
    "dual_clip": dict(loss_type="grpo", clip_eps_low=0.02, dual_clip=1.05, expect_positive="dual_clip_frac"),
    "delta_dual_clip_token_advantages": dict(loss_type="bnpo", delta=1.2, dual_clip=1.25, per_token_advantages=True),
    "agg_token_mean": dict(loss_type="grpo", agg="token-mean"),
    "agg_seq_mean_token_mean": dict(loss_type="dapo", agg="seq-mean-token-mean"),
    "agg_seq_mean_token_sum": dict(loss_type="sapo", agg="seq-mean-token-sum"),
    "agg_seq_mean_token_sum_norm": dict(
        loss_type="cispo", clip_eps_high=1.2, agg="seq-mean-token-sum-norm", max_len=11
    ),
    # every registered KL estimator in the loss, each with another loss type
    **{f"kl_{kind}": dict(loss_type=loss_type, kl_coef=0.05, kl_kind=kind, **extra) for kind, (loss_type, extra) in zip(
        KL_ESTIMATORS.names(),
        [("grpo", {}), ("dapo", {}), ("gspo", {}), ("sapo", {}), ("cispo", {"clip_eps_high": 1.1})]
        + [("bnpo", {})] * len(KL_ESTIMATORS),
    )},
    "ref_metric_only": dict(loss_type="grpo", with_ref=True, kl_kind="k2"),
    "entropy_bonus": dict(loss_type="grpo", entropy_coef=0.01),
    "entropy_metric_only": dict(loss_type="dapo", with_entropy=True),
    "entropy_quantile": dict(loss_type="dapo", entropy_quantile=0.6),
    "entropy_quantile_bonus_sequence": dict(loss_type="gspo", entropy_quantile=0.3, entropy_coef=0.02),
    "entropy_quantile_all": dict(loss_type="sapo", entropy_quantile=0.0),
    "entropy_quantile_top": dict(loss_type="cispo", clip_eps_high=1.1, entropy_quantile=1.0),
    "tis_token": dict(loss_type="grpo", rollout_is="token"),
    "tis_token_capped": dict(loss_type="dapo", rollout_is="token", rollout_is_cap=1.1),
    "tis_sequence_capped": dict(loss_type="gspo", rollout_is="sequence", rollout_is_cap=1.3),
    "tis_sequence": dict(loss_type="sapo", rollout_is="sequence"),
    # conformance options (docs/rl-losses.md, "Peer conventions")
    "log_ratio_clamp": dict(loss_type="grpo", log_ratio_clamp=0.3, kl_coef=0.05, kl_ratio_weighted=True),
    "log_ratio_clamp_cispo": dict(loss_type="cispo", clip_eps_high=1.2, log_ratio_clamp=0.25),
    "seq_log_ratio_cap": dict(loss_type="gspo", clip_eps_low=0.03, seq_log_ratio_cap=0.05),
    "cispo_ratio_min": dict(loss_type="cispo", clip_eps_high=1.2, cispo_ratio_min=0.8,
                            expect_positive="clip_frac_low"),
    "kl_clamp": dict(loss_type="grpo", kl_coef=0.05, kl_clamp=1.0),
    "kl_clamp_low_var": dict(loss_type="dapo", kl_coef=0.05, kl_kind="k2", kl_clamp=0.5),
    "kl_ratio_weighted": dict(loss_type="dapo", kl_coef=0.05, kl_ratio_weighted=True),
    "kl_ratio_weighted_sequence": dict(loss_type="gspo", kl_coef=0.05, kl_kind="k1", kl_ratio_weighted=True),
    "kl_ratio_weighted_cispo_sequence": dict(loss_type="cispo", clip_eps_high=1.1, importance_level="sequence",
                                             kl_coef=0.05, kl_ratio_weighted=True),
    "seq_mean_rows_nonempty": dict(loss_type="grpo", seq_mean_rows="nonempty"),
    "seq_mean_rows_nonempty_sum": dict(loss_type="sapo", agg="seq-mean-token-sum", seq_mean_rows="nonempty"),
    "seq_mean_rows_nonempty_norm": dict(loss_type="dr_grpo", max_len=9, seq_mean_rows="nonempty"),
    "entropy_token_mean": dict(loss_type="grpo", entropy_coef=0.02, entropy_agg="token-mean"),
    "entropy_token_mean_quantile": dict(loss_type="dapo", entropy_coef=0.02, entropy_agg="token-mean",
                                        entropy_quantile=0.4, num_items=37),
    "is_token_truncate_band": dict(loss_type="grpo", rollout_is_min=0.9, rollout_is_cap=1.1,
                                   expect_positive="rollout_is_filtered_frac"),
    "is_token_mask": dict(loss_type="grpo", rollout_is_mode="mask", rollout_is_min=0.85, rollout_is_cap=1.15,
                          expect_positive="rollout_is_filtered_frac"),
    "is_sequence_mask": dict(loss_type="dapo", rollout_is="sequence", rollout_is_mode="mask", rollout_is_cap=1.3,
                             expect_positive="rollout_is_filtered_frac"),
    "is_sequence_mask_geometric_token_weight": dict(
        loss_type="grpo", rollout_is="sequence", rollout_is_mode="mask", rollout_is_seq_ratio="geometric_mean",
        rollout_is_weight="token", rollout_is_min=0.95, rollout_is_cap=1.05, expect_positive="rollout_is_filtered_frac",
    ),
    "is_token_binary_kl": dict(loss_type="grpo", rollout_is_mode="mask", rollout_is_gating="binary_kl",
                               rollout_is_cap=0.004, rollout_is_weight="token",
                               expect_positive="rollout_is_filtered_frac"),
    "is_sequence_tv_no_weight": dict(loss_type="gspo", rollout_is="sequence", rollout_is_mode="mask",
                                     rollout_is_gating="tv", rollout_is_cap=0.03, rollout_is_weight="none",
                                     expect_positive="rollout_is_filtered_frac"),
    # loss types of verl's registry (docs/rl-losses.md, "Loss types")
    "gpg": dict(loss_type="gpg"),
    "gpg_seq_mean_kl": dict(loss_type="gpg", agg="seq-mean-token-mean", kl_coef=0.05),
    "geo_mean": dict(loss_type="geo_mean", expect_positive="clip_frac_high"),
    "geo_mean_token_advantages_kl": dict(loss_type="geo_mean", clip_eps_low=0.1, clip_eps_high=0.3, kl_coef=0.05,
                                         kl_ratio_weighted=True, per_token_advantages=True,
                                         expect_positive="clip_frac_low"),
    "geo_mean_rollout_mask": dict(loss_type="geo_mean", rollout_is_mode="mask", rollout_is_cap=1.15,
                                  expect_positive="rollout_is_filtered_frac"),
    "dppo_tv": dict(loss_type="dppo_tv", clip_eps_low=0.05, clip_eps_high=0.04, expect_positive="clip_frac_low"),
    "dppo_tv_sequence_capped": dict(loss_type="dppo_tv", clip_eps_low=0.1, importance_level="sequence",
                                    dppo_ratio_cap=1.05, kl_coef=0.05, kl_ratio_weighted=True),
    "dppo_kl": dict(loss_type="dppo_kl", clip_eps_low=0.01, clip_eps_high=0.01, dppo_ratio_cap=1.3,
                    expect_positive="clip_frac_low"),
    "dro": dict(loss_type="dro", dro_beta=0.3),
    "dro_token_advantages_entropy": dict(loss_type="dro", dro_beta=0.1, entropy_coef=0.01, entropy_quantile=0.3,
                                         per_token_advantages=True),
    "clip_cov_every_candidate": dict(loss_type="clip_cov", cov_ratio=1.0, clip_cov_lb=-0.2, clip_cov_ub=0.3,
                                     expect_positive="cov_selected_frac"),
    "kl_cov": dict(loss_type="kl_cov", cov_ratio=0.2, kl_cov_coef=0.5, expect_positive="cov_selected_frac"),
    "kl_cov_one_token_sequence_ratio": dict(loss_type="kl_cov", importance_level="sequence", kl_coef=0.05,
                                            per_token_advantages=True),
    "luspo_sequence": dict(loss_type="luspo", importance_level="sequence", clip_eps_low=0.03),
    "vespo": dict(loss_type="vespo"),
    "vespo_sequence_ratio_kl": dict(loss_type="vespo", importance_level="sequence", kl_coef=0.05,
                                    kl_ratio_weighted=True),
    "vespo_token_advantages_kl": dict(loss_type="vespo", vespo_k_pos=0.5, vespo_lambda_pos=0.75, vespo_k_neg=1.5,
                                      vespo_lambda_neg=0.25, kl_coef=0.05, per_token_advantages=True),
    # rollout-mismatch corrections: verl's rejection by a KL estimator, DeepSeek-V3.2's off-policy mask
    **{f"rejection_{rs}": dict(loss_type=loss_type, rollout_rs=rs, rollout_rs_max=cap, rollout_rs_min=low,
                               expect_positive="rollout_rs_masked_frac")
       for rs, loss_type, cap, low in [
           ("token_k1", "grpo", 1.15, None), ("token_k2", "dapo", 0.01, None), ("token_k3", "gspo", 0.01, None),
           ("seq_sum_k1", "grpo", 1.3, 0.9), ("seq_sum_k2", "grpo", 0.05, None), ("seq_sum_k3", "sapo", 0.05, None),
           ("seq_mean_k1", "cispo", 1.05, None), ("seq_mean_k2", "grpo", 0.015, None),
           ("seq_mean_k3", "geo_mean", 0.015, None), ("seq_max_k2", "dapo", 0.04, None),
           ("seq_max_k3", "grpo", 0.04, None),
       ]},
    "rejection_with_truncation": dict(loss_type="grpo", rollout_rs="token_k2", rollout_rs_max=0.02,
                                      rollout_is_cap=1.1, agg="token-mean"),
    "off_policy_mask": dict(loss_type="grpo", off_policy_mask_threshold=-0.5, expect_positive="off_policy_masked_frac"),
    "off_policy_mask_rollout": dict(loss_type="dapo", off_policy_mask_threshold=0.02, with_rollout=True,
                                    rollout_is_cap=2.0, per_token_advantages=True,
                                    expect_positive="off_policy_masked_frac"),
    "everything": dict(
        loss_type="dapo", clip_eps_low=0.1, clip_eps_high=0.28, delta=1.4, dual_clip=2.0, kl_coef=0.03,
        kl_kind="low_var_kl", entropy_coef=0.01, entropy_quantile=0.5, rollout_is="token", rollout_is_cap=1.2,
        num_items=50, per_token_advantages=True,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_policy_loss_matches_reference(name, backend):
    case = CASES[name]
    inputs = make_inputs(per_token_advantages=case.get("per_token_advantages", False))
    loss, grads, metrics, expected, expected_grads, expected_metrics = run_both(inputs, backend, case)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert_close(loss, expected)
    for grad, expected_grad in zip(grads, expected_grads):
        assert torch.isfinite(grad).all()
        assert_close(grad, expected_grad)
    assert set(metrics) == set(expected_metrics)
    for key, value in metrics.items():
        assert value.dim() == 0, key
        assert_close(value, expected_metrics[key])
    if "expect_positive" in case:  # the option under test is actually exercised
        assert expected_metrics[case["expect_positive"]] > 0


@pytest.mark.parametrize("host_reads", ["free", "synchronizing"])
def test_clip_cov_drops_k_random_candidates(backend, host_reads, monkeypatch):
    """With more candidates than it drops, Clip-Cov drops exactly k = floor(cov_ratio * n)
    of them (verl draws them with randperm; fastpo with uniform keys: for the candidates
    found by position where host reads are free, the CPU; for every token with no host
    sync elsewhere), a different subset per seed, and the loss is the reference's with
    that subset."""
    if host_reads == "synchronizing":
        monkeypatch.setattr(policy_module, "host_reads_free", lambda t: False)
    inputs = make_inputs(batch=6, length=30)
    mask, n = inputs["mask"], int(inputs["mask"].sum())
    options = dict(loss_type="clip_cov", cov_ratio=0.1, clip_cov_lb=-10.0, clip_cov_ub=10.0)
    lp = torch.where(mask, inputs["lp"], 0.0).double()
    adv = inputs["adv"].double()[:, None].expand_as(lp)
    ratio = torch.exp(lp - torch.where(mask, inputs["old"], 0.0).double())
    unclipped = ~(-adv * ratio.clamp(0.8, 1.2) > -adv * ratio)
    candidates = {tuple(cell) for cell in torch.nonzero(mask & unclipped).tolist()}
    k = int(0.1 * n)
    assert len(candidates) > k
    subsets = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        selected = policy_module._covariance_selection(inputs["lp"], inputs["old"], inputs["adv"], mask,
                                                       PolicyLossOptions(**options))
        chosen = {tuple(cell) for cell in torch.nonzero(selected).tolist()}
        assert len(chosen) == k and chosen <= candidates
        subsets.append(chosen)
        torch.manual_seed(seed)
        loss, grads, metrics, expected, expected_grads, _ = run_both(inputs, backend, dict(options, chosen=chosen))
        assert_close(loss, expected)
        assert_close(grads[0], expected_grads[0])
        assert_close(metrics["cov_selected_frac"], k / n)
    assert subsets[0] != subsets[1]


@pytest.mark.parametrize(
    "name", ["gspo_token_advantages", "everything", "tis_sequence_capped", "geo_mean_token_advantages_kl"]
)
def test_policy_loss_rows_longer_than_one_block(name, monkeypatch):
    """The kernels walk a row in several blocks (the last one partial) on a GPU; force
    that on the interpreter with a 16-token block and 37-token rows."""
    if not (policy_module.HAS_TRITON and triton_interpreter_enabled()):
        pytest.skip("needs Triton's interpreter")
    monkeypatch.setattr(policy_module, "_block_t", lambda length, device: (16, 1))
    case = CASES[name]
    inputs = make_inputs(batch=3, length=37, per_token_advantages=case.get("per_token_advantages", False))
    loss, grads, metrics, expected, expected_grads, expected_metrics = run_both(inputs, "triton", case)
    assert_close(loss, expected)
    for grad, expected_grad in zip(grads, expected_grads):
        assert_close(grad, expected_grad)
    for key, value in metrics.items():
        assert_close(value, expected_metrics[key])


def test_policy_loss_float64_and_bfloat16(backend):
    inputs = make_inputs()
    # hyperparameters exact in fp32: the Triton kernels take Python floats as fp32 scalars
    case = dict(loss_type="gspo", clip_eps_low=0.0625, kl_coef=0.0625, with_entropy=True, entropy_coef=0.015625)
    inputs64 = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    loss, grads, _, expected, expected_grads, _ = run_both(inputs64, backend, case)
    assert loss.dtype == torch.float64 and grads[0].dtype == torch.float64
    assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    assert_close(grads[0], expected_grads[0], rtol=1e-12, atol=1e-12)

    lp = inputs["lp"].to(torch.bfloat16).requires_grad_()
    loss, _ = policy_loss(lp, inputs["old"], inputs["adv"], inputs["mask"], backend=backend)
    loss.backward()
    assert loss.dtype == torch.float32 and lp.grad.dtype == torch.bfloat16
    assert torch.isfinite(lp.grad.float()).all()


@pytest.mark.parametrize("name", [
    "gpg", "geo_mean_token_advantages_kl", "dppo_tv", "dppo_kl", "dro", "clip_cov_every_candidate", "kl_cov",
    "luspo_sequence", "vespo_token_advantages_kl", "rejection_seq_mean_k3", "off_policy_mask_rollout",
])
@pytest.mark.filterwarnings("ignore:invalid value encountered in log")  # DPPO's binary KL where lp_old > 0
def test_registry_objectives_in_float64(name, backend):
    """The loss types of verl's and TRL's registries and the new corrections in float64:
    the torch backend to 1e-12 of the reference; the Triton kernels take their
    hyperparameters as fp32 scalars (0.05 is not exact there), hence 1e-6."""
    case = CASES[name]
    inputs = make_inputs(per_token_advantages=case.get("per_token_advantages", False))
    inputs64 = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    loss, grads, metrics, expected, expected_grads, expected_metrics = run_both(inputs64, backend, case)
    tol = 1e-12 if backend == "torch" else 1e-6
    assert loss.dtype == torch.float64
    assert_close(loss, expected, rtol=tol, atol=tol)
    assert_close(grads[0], expected_grads[0], rtol=tol, atol=tol)
    for key, value in metrics.items():  # the reference's metrics are Python floats: keep them float64
        assert_close(value, torch.tensor(expected_metrics[key], dtype=torch.float64), rtol=tol, atol=tol)


# ------------------------------------------------------------------ gradient accumulation

ACCUMULATION_CASES = [
    ("dapo", None),  # token-mean with the global count: no factor
    ("grpo", None),
    ("gspo", None),
    ("dr_grpo", None),
    ("cispo", "seq-mean-token-sum"),
    ("sapo", "token-mean"),
]


@pytest.mark.parametrize("loss_type,agg", ACCUMULATION_CASES)
def test_gradient_accumulation_invariance(loss_type, agg, backend):
    """One batch of 8 sequences == 4 micro-batches of 2 == 2 data-parallel ranks x 2
    micro-batches of 2 (ranks averaged as DDP does), with the documented factors."""
    inputs = make_inputs(batch=8, length=7)
    inputs["mask"][5, :2] = False  # micro-batches with different token counts
    mode = agg or TRL_AGGREGATION[loss_type]
    options = dict(loss_type=loss_type, agg=agg, kl_coef=0.05, entropy_coef=0.01,
                   max_len=9 if mode == "seq-mean-token-sum-norm" else None,
                   clip_eps_high=1.1 if loss_type == "cispo" else None)
    total_tokens = int(inputs["mask"].sum())

    def grads_of(rows, factor, num_items):
        lp = inputs["lp"].clone().requires_grad_()
        ent = inputs["ent"].clone().requires_grad_()
        for chunk in rows:
            loss, _ = policy_loss(
                lp[chunk], inputs["old"][chunk], inputs["adv"][chunk], inputs["mask"][chunk],
                ref_logprobs=inputs["ref"][chunk], entropy=ent[chunk], num_items=num_items, backend=backend,
                **options,
            )
            (loss * factor).backward()
        return lp.grad, ent.grad

    whole = grads_of([slice(0, 8)], 1.0, total_tokens if mode == "token-mean" else None)
    micro = [slice(k, k + 2) for k in range(0, 8, 2)]
    if mode == "token-mean":
        accumulated = grads_of(micro, 1.0, total_tokens)
        # DDP averages the ranks' gradients: the documented factor is the world size
        ranks = [grads_of(micro[2 * r: 2 * r + 2], 2.0, total_tokens) for r in range(2)]
    else:
        accumulated = grads_of(micro, 1 / 4, None)
        ranks = [grads_of(micro[2 * r: 2 * r + 2], 1 / 2, None) for r in range(2)]
    data_parallel = [(a + b) / 2 for a, b in zip(*ranks)]
    for expected, got_micro, got_ranks in zip(whole, accumulated, data_parallel):
        assert expected.abs().sum() > 0
        assert_close(got_micro, expected, rtol=1e-5, atol=1e-7)
        assert_close(got_ranks, expected, rtol=1e-5, atol=1e-7)


def test_token_mean_without_global_count_is_not_invariant(backend):
    """Why num_items exists: per-micro-batch token means weigh tokens unequally when the
    micro-batches hold different numbers of valid tokens."""
    inputs = make_inputs(batch=4, length=7)
    inputs["mask"][2:, 3:] = False

    def grad_of(rows, factor):
        lp = inputs["lp"].clone().requires_grad_()
        for chunk in rows:
            loss, _ = policy_loss(lp[chunk], inputs["old"][chunk], inputs["adv"][chunk], inputs["mask"][chunk],
                                  loss_type="bnpo", backend=backend)
            (loss * factor).backward()
        return lp.grad

    assert not torch.allclose(grad_of([slice(0, 2), slice(2, 4)], 0.5), grad_of([slice(0, 4)], 1.0))


# ------------------------------------------------------------------ edge cases


@pytest.mark.parametrize("loss_type,kl_kind", [("grpo", "low_var_kl"), ("dapo", "k3"), ("cispo", "k1")])
def test_nan_at_a_valid_position_gives_nan_loss(loss_type, kl_kind, backend):
    # Clamps must not turn a NaN log-prob into a finite loss (torch.clamp propagates NaN;
    # Triton's min/max must be told to).
    lp = torch.randn(3, 5) * 0.1 - 1.0
    old = lp + 0.01
    lp[1, 2] = float("nan")
    loss, _ = policy_loss(lp, old, torch.randn(3), torch.ones(3, 5, dtype=torch.bool), loss_type=loss_type,
                          clip_eps_high=5.0 if loss_type == "cispo" else None, ref_logprobs=old.clone(),
                          kl_coef=0.1, kl_kind=kl_kind, backend=backend)
    assert torch.isnan(loss)
    assert torch.isnan(kl_penalty(lp, old, kind=kl_kind, backend=backend)[1, 2])


@pytest.mark.parametrize("loss_type", POLICY_LOSSES.names())
def test_mask_without_valid_token(loss_type, backend):
    """Loss 0, zero gradients, zero metrics, no NaN, even with garbage everywhere."""
    inputs = make_inputs()
    mask = torch.zeros(5, 7, dtype=torch.bool)
    garbage = torch.full((5, 7), math.nan)
    lp = garbage.clone().requires_grad_()
    ent = garbage.clone().requires_grad_()
    loss, metrics = policy_loss(
        lp, garbage, inputs["adv"], mask, loss_type=loss_type, ref_logprobs=garbage, kl_coef=0.1, entropy=ent,
        entropy_coef=0.1, entropy_quantile=0.5, rollout_logprobs=garbage, rollout_is_cap=2.0,
        max_len=7 if loss_type == "dr_grpo" else None, dro_beta=0.1 if loss_type == "dro" else None,
        rollout_rs="seq_mean_k3", rollout_rs_max=1.0, off_policy_mask_threshold=0.1, backend=backend,
    )
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(lp.grad, torch.zeros(5, 7)) and torch.equal(ent.grad, torch.zeros(5, 7))
    for key, value in metrics.items():
        assert value.item() == 0.0, key


def test_float_mask_and_no_gradient_needed(backend):
    inputs = make_inputs()
    float_mask = inputs["mask"].float()
    with_bool, _ = policy_loss(inputs["lp"], inputs["old"], inputs["adv"], inputs["mask"], backend=backend)
    with_float, _ = policy_loss(inputs["lp"], inputs["old"], inputs["adv"], float_mask, backend=backend)
    assert torch.isfinite(with_bool) and with_bool.item() == with_float.item()
    assert not with_bool.requires_grad


# ------------------------------------------------------------------ value_loss


@pytest.mark.parametrize("clip_eps", [0.2, None])
@pytest.mark.parametrize("agg", AGGREGATIONS.names())
@pytest.mark.parametrize("seq_mean_rows", ["all", "nonempty"])
def test_value_loss_matches_reference(clip_eps, agg, seq_mean_rows, backend):
    mask = ragged_mask(5, 7)
    values = torch.randn(5, 7)
    old = values + 0.4 * torch.randn(5, 7)
    returns = torch.randn(5, 7)
    old[~mask] = math.nan
    returns[~mask] = math.inf
    max_len = 9 if agg == "seq-mean-token-sum-norm" else None
    leaf = values.clone().requires_grad_()
    loss, metrics = value_loss(leaf, old, returns, mask, clip_eps=clip_eps, agg=agg, max_len=max_len,
                               seq_mean_rows=seq_mean_rows, backend=backend)
    (grad,) = torch.autograd.grad(loss, leaf)

    v64 = torch.where(mask, values, 0.0).double().requires_grad_()
    expected, clip_frac = reference_value_loss(v64, old.double().tolist(), returns.double().tolist(), mask.tolist(),
                                               clip_eps, agg, max_len, seq_mean_rows)
    (expected_grad,) = torch.autograd.grad(expected, v64)
    assert_close(loss, expected)
    assert_close(grad, expected_grad)
    assert_close(metrics["clip_frac"], clip_frac)
    if clip_eps is not None:
        assert clip_frac > 0


def test_value_loss_empty_mask(backend):
    values = torch.full((3, 4), math.nan, requires_grad=True)
    loss, metrics = value_loss(values, values.detach(), values.detach(), torch.zeros(3, 4, dtype=torch.bool),
                               backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and metrics["clip_frac"].item() == 0.0
    assert torch.equal(values.grad, torch.zeros(3, 4))


# ------------------------------------------------------------------ bad input


def _base():
    return make_inputs()


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(old=torch.zeros(5, 6)), ValueError, r"old_logprobs.shape \(5, 6\)"),
        (dict(mask=torch.ones(4, 7, dtype=torch.bool)), ValueError, r"mask.shape \(4, 7\)"),
        (dict(adv=torch.zeros(7)), ValueError, r"advantages.shape \(7,\)"),
        (dict(lp=torch.zeros(5)), ValueError, r"logprobs must be \(B, T\)"),
        (dict(ref_logprobs=torch.zeros(5, 8)), ValueError, r"ref_logprobs.shape \(5, 8\)"),
        (dict(lp=torch.zeros(5, 7, dtype=torch.int64)), TypeError, "logprobs has dtype torch.int64"),
        (dict(loss_type="ppo2"), ValueError, r"loss_type='ppo2' is not one of 'grpo', 'bnpo', 'dr_grpo', 'dapo', "
                                             r"'cispo', 'sapo', 'gspo'"),
        (dict(kl_kind="k4"), ValueError, r"kl_kind='k4' is not one of 'k1', 'k2', 'k3', 'abs', 'low_var_kl'"),
        (dict(agg="mean"), ValueError, r"agg='mean' is not one of 'token-mean', 'seq-mean-token-mean', "
                                       r"'seq-mean-token-sum', 'seq-mean-token-sum-norm'"),
        (dict(importance_level="batch"), ValueError, r"importance_level='batch' is not one of 'token', 'sequence'"),
        (dict(rollout_is="geometric"), ValueError, r"rollout_is='geometric' is not one of"),
        (dict(kl_coef=0.1), ValueError, r"kl_coef=0.1 needs ref_logprobs"),
        (dict(entropy_coef=0.1), ValueError, r"entropy_coef=0.1 needs entropy"),
        (dict(entropy_quantile=0.5), ValueError, r"entropy_quantile=0.5 needs entropy"),
        (dict(rollout_is_cap=2.0), ValueError, r"rollout_is_cap=2.0 needs rollout_logprobs"),
        (dict(loss_type="dr_grpo"), ValueError, "needs max_len"),
        (dict(max_len=10), ValueError, "max_len applies to agg='seq-mean-token-sum-norm' only"),
        (dict(num_items=10), ValueError, "num_items applies to agg='token-mean' only"),
        (dict(dual_clip=1.0), ValueError, "dual_clip must be > 1"),
        (dict(loss_type="sapo", delta=2.0), ValueError, "delta=2.0 applies to the PPO-clip loss types only"),
        (dict(clip_eps_low=-0.1), ValueError, "clip_eps_low must be a finite number > 0"),
        (dict(backend="tpu"), ValueError, "backend='tpu' is not one of"),
    ],
)
def test_policy_loss_bad_input(change, error, match):
    inputs = _base()
    args = {"lp": inputs["lp"], "old": inputs["old"], "adv": inputs["adv"], "mask": inputs["mask"]}
    for key in ("lp", "old", "adv", "mask"):
        if key in change:
            args[key] = change.pop(key)
    with pytest.raises(error, match=match):
        policy_loss(args["lp"], args["old"], args["adv"], args["mask"], **change)


def test_kl_penalty_and_value_loss_bad_input():
    with pytest.raises(ValueError, match=r"kind='k5' is not one of 'k1', 'k2', 'k3', 'abs', 'low_var_kl'"):
        kl_penalty(torch.zeros(3), torch.zeros(3), "k5")
    with pytest.raises(ValueError, match=r"ref_logprobs.shape \(4,\) does not match logprobs.shape \(3,\)"):
        kl_penalty(torch.zeros(3), torch.zeros(4))
    values = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"returns.shape \(2, 4\)"):
        value_loss(values, values, torch.zeros(2, 4), values > 0)
    with pytest.raises(ValueError, match=r"agg='sum' is not one of"):
        value_loss(values, values, values, values > 0, agg="sum")
    with pytest.raises(ValueError, match="clip_eps must be a finite number > 0"):
        value_loss(values, values, values, values > 0, clip_eps=0.0)


# ------------------------------------------------------------------ options object


@pytest.mark.parametrize("name", ["everything", "gspo", "is_sequence_mask_geometric_token_weight"])
def test_options_object_equals_keywords(name, backend):
    case = {k: v for k, v in CASES[name].items() if k not in ("per_token_advantages", "expect_positive")}
    num_items = case.pop("num_items", None)
    inputs = make_inputs(per_token_advantages=CASES[name].get("per_token_advantages", False))
    tensors = dict(ref_logprobs=inputs["ref"], entropy=inputs["ent"], rollout_logprobs=inputs["roll"],
                   num_items=num_items, backend=backend)
    args = (inputs["lp"], inputs["old"], inputs["adv"], inputs["mask"])
    with_keywords, metrics_a = policy_loss(*args, **tensors, **case)
    options = PolicyLossOptions(**case)
    with_options, metrics_b = policy_loss(*args, options=options, **tensors)
    assert with_keywords.item() == with_options.item()
    assert {k: v.item() for k, v in metrics_a.items()} == {k: v.item() for k, v in metrics_b.items()}
    # keywords given with options replace its fields
    overridden, _ = policy_loss(*args, options=PolicyLossOptions(**{**case, "clip_eps_low": 0.01}),
                                clip_eps_low=case.get("clip_eps_low", 0.2), **tensors)
    assert overridden.item() == with_keywords.item()


def test_options_are_frozen_listed_and_peer_presets():
    options = PolicyLossOptions(loss_type="dapo", clip_eps_high=0.28)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.loss_type = "grpo"
    assert set(PolicyLossOptions.field_names()) >= {
        "loss_type", "clip_eps_low", "clip_eps_high", "delta", "dual_clip", "importance_level", "kl_coef",
        "kl_kind", "entropy_coef", "entropy_quantile", "rollout_is", "rollout_is_cap", "agg", "max_len",
        "sapo_tau_pos", "sapo_tau_neg", "kl_ratio_weighted", "seq_log_ratio_cap", "log_ratio_clamp",
        "seq_mean_rows", "cispo_ratio_min", "kl_clamp",
    }
    assert PolicyLossOptions(clip_eps_low=1).clip_eps_low == 1.0 and isinstance(
        PolicyLossOptions(clip_eps_low=1).clip_eps_low, float
    )
    trl = PolicyLossOptions.matching("trl", loss_type="dapo")
    assert trl.kl_ratio_weighted and trl.entropy_agg == "token-mean" and trl.loss_type == "dapo"
    assert PolicyLossOptions.matching("verl", loss_type="gspo", seq_log_ratio_cap=10.0).seq_mean_rows == "nonempty"
    with pytest.raises(ValueError, match="peer='deepspeed' is not one of 'trl', 'verl', 'openrlhf'"):
        PolicyLossOptions.matching("deepspeed")
    with pytest.raises(TypeError, match="unexpected keyword argument 'clip_eps_hihg'; did you mean 'clip_eps_high'"):
        policy_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1), clip_eps_hihg=0.3)
    with pytest.raises(TypeError, match="options must be a PolicyLossOptions"):
        policy_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1), options={})


@pytest.mark.parametrize(
    "options,error,match",
    [
        (dict(loss_type="cispo", dual_clip=3.0), ValueError, r"^dual_clip=3.0 applies to the PPO-clip loss types only"),
        (dict(dual_clip=0.5), ValueError, r"^dual_clip must be > 1, got 0.5"),
        (dict(delta=0.0), ValueError, r"^delta must be a finite number > 0, got 0.0"),
        (dict(entropy_quantile=1.5), ValueError, r"^entropy_quantile must be in \[0, 1\], got 1.5"),
        (dict(kl_kind="k33"), ValueError, r"^kl_kind='k33' is not one of .*; did you mean 'k3'\?"),
        (dict(loss_type="gspoo"), ValueError, r"^loss_type='gspoo' is not one of .*POLICY_LOSSES.*did you mean 'gspo'"),
        (dict(agg="token_mean"), ValueError, r"^agg='token_mean' is not one of .*did you mean 'token-mean'"),
        (dict(kl_clamp=-1.0), ValueError, r"^kl_clamp must be a finite number > 0"),
        (dict(log_ratio_clamp=math.inf), ValueError, r"^log_ratio_clamp must be a finite number > 0"),
        (dict(seq_log_ratio_cap=10.0), ValueError, r"^seq_log_ratio_cap=10.0 applies to the sequence ratio only"),
        (dict(cispo_ratio_min=0.8), ValueError, r"^cispo_ratio_min=0.8 applies to loss_type='cispo' only"),
        (dict(loss_type="cispo", clip_eps_high=2.0, cispo_ratio_min=2.5), ValueError,
         r"^cispo_ratio_min=2.5 is above the CISPO cap"),
        (dict(seq_mean_rows="some"), ValueError, r"^seq_mean_rows='some' is not one of 'all', 'nonempty'"),
        (dict(entropy_agg="mean"), ValueError, r"^entropy_agg='mean' is not one of 'loss', 'token-mean'"),
        (dict(rollout_is_gating="tv"), ValueError, r"^rollout_is_gating='tv' needs rollout_is_mode='mask'"),
        (dict(rollout_is_weight="token"), ValueError, r"^rollout_is_weight='token' needs rollout_is_mode='mask'"),
        (dict(rollout_is_min=2.0, rollout_is_cap=1.5), ValueError, r"^rollout_is_min=2.0 is above rollout_is_cap"),
        (dict(rollout_is_mode="drop"), ValueError, r"^rollout_is_mode='drop' is not one of 'truncate', 'mask'"),
        (dict(loss_type="dr_grpo"), ValueError, r"^agg='seq-mean-token-sum-norm' \(loss_type='dr_grpo'\) needs max_len"),
        (dict(kl_ratio_weighted=1), TypeError, r"^kl_ratio_weighted must be a bool"),
        (dict(kl_coef="0.1"), TypeError, r"^kl_coef must be a float"),
        (dict(loss_type="dro"), ValueError, r"^dro_beta=None: loss_type='dro' needs dro_beta > 0"),
        (dict(dro_beta=0.1), ValueError, r"^dro_beta=0.1 applies to loss_type='dro' only, not 'grpo'"),
        (dict(loss_type="dro", dro_beta=-1.0), ValueError, r"^dro_beta must be a finite number > 0"),
        (dict(loss_type="dppo_tv", dppo_ratio_cap=0.0), ValueError, r"^dppo_ratio_cap must be a finite number > 0"),
        (dict(loss_type="geo_mean", dual_clip=3.0), ValueError, r"^dual_clip=3.0 applies to the PPO-clip loss types"),
        (dict(cov_ratio=1.5), ValueError, r"^cov_ratio must be in \(0, 1\]"),
        (dict(clip_cov_lb=5.0), ValueError, r"^clip_cov_lb=5.0 must be below clip_cov_ub=5.0"),
        (dict(rollout_rs="seq_max_k1", rollout_rs_max=2.0), ValueError,
         r"^rollout_rs='seq_max_k1' is not one of .*did you mean"),
        (dict(rollout_rs="token_k2"), ValueError, r"^rollout_rs='token_k2' needs rollout_rs_max"),
        (dict(rollout_rs="token_k2", rollout_rs_max=0.1, rollout_rs_min=0.01), ValueError,
         r"^rollout_rs_min=0.01 applies to the k1 rejections only"),
        (dict(rollout_rs="token_k1", rollout_rs_max=1.1, rollout_rs_min=1.2), ValueError,
         r"^rollout_rs_min=1.2 is above rollout_rs_max=1.1"),
        (dict(rollout_rs_max=2.0), ValueError, r"^rollout_rs_max=2.0 needs rollout_rs"),
        (dict(off_policy_mask_threshold=math.nan), ValueError, r"^off_policy_mask_threshold must be finite"),
    ],
)
def test_options_validate_at_construction(options, error, match):
    with pytest.raises(error, match=match):
        PolicyLossOptions(**options)


def test_rollout_options_need_rollout_logprobs():
    inputs = make_inputs()
    args = (inputs["lp"], inputs["old"], inputs["adv"], inputs["mask"])
    with pytest.raises(ValueError, match="rollout_is_mode='mask' needs rollout_logprobs"):
        policy_loss(*args, rollout_is_mode="mask")
    with pytest.raises(ValueError, match="rollout_is_min=0.5 needs rollout_logprobs"):
        policy_loss(*args, rollout_is_min=0.5)
    with pytest.raises(ValueError, match="rollout_rs='token_k3' needs rollout_logprobs"):
        policy_loss(*args, rollout_rs="token_k3", rollout_rs_max=0.1)


def test_trl_advantages_layout(backend):
    """TRL's (B, 1) advantages give exactly the (B,) result (issue 19, item 7)."""
    inputs = make_inputs()
    results = []
    for adv in (inputs["adv"], inputs["adv"][:, None]):
        lp = inputs["lp"].clone().requires_grad_()
        loss, metrics = policy_loss(lp, inputs["old"], adv, inputs["mask"], loss_type="gspo", backend=backend,
                                    ref_logprobs=inputs["ref"], kl_coef=0.04, kl_ratio_weighted=True)
        results.append((loss, torch.autograd.grad(loss, lp)[0], metrics["ratio_mean"]))
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.parametrize(
    "name", ["everything", "gspo", "tis_sequence_capped", "entropy_quantile", "geo_mean_token_advantages_kl", "dppo_kl"]
)
def test_triton_matches_torch_on_cuda(name):
    """Real kernels on a GPU, rows of several blocks: Triton against the torch backend."""
    case = dict(CASES[name])
    torch.manual_seed(1)
    inputs = {k: v.cuda() for k, v in make_inputs(batch=64, length=3001,
                                                  per_token_advantages=case.get("per_token_advantages", False)).items()}
    results = []
    for backend in ("triton", "torch"):
        loss, grads, metrics, *_ = run_both_device(inputs, backend, case)
        results.append((loss, grads, metrics))
    (loss_a, grads_a, metrics_a), (loss_b, grads_b, metrics_b) = results
    assert_close(loss_a, loss_b, rtol=1e-4, atol=1e-6)
    for a, b in zip(grads_a, grads_b):
        assert_close(a, b, rtol=1e-4, atol=1e-7)
    for key in metrics_a:
        assert_close(metrics_a[key], metrics_b[key], rtol=1e-4, atol=1e-6)


def run_both_device(inputs, backend, case):
    """policy_loss alone (the float64 loop reference is too slow at GPU sizes)."""
    case = dict(case)
    with_ref, with_entropy = case.pop("with_ref", False), case.pop("with_entropy", False)
    uses_ref = with_ref or "kl_coef" in case
    uses_ent = with_entropy or "entropy_coef" in case or "entropy_quantile" in case
    uses_roll = case.pop("with_rollout", False) or any(key.startswith(("rollout_is", "rollout_rs")) for key in case)
    case.pop("per_token_advantages", None)
    case.pop("expect_positive", None)
    lp = inputs["lp"].clone().requires_grad_()
    ent = inputs["ent"].clone().requires_grad_() if uses_ent else None
    loss, metrics = policy_loss(
        lp, inputs["old"], inputs["adv"], inputs["mask"], ref_logprobs=inputs["ref"] if uses_ref else None,
        entropy=ent, rollout_logprobs=inputs["roll"] if uses_roll else None, backend=backend, **case,
    )
    grads = torch.autograd.grad(loss, [x for x in (lp, ent) if x is not None])
    return loss, grads, metrics
