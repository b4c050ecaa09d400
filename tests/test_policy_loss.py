"""policy_loss, kl_penalty and value_loss against independent float64 references written
per element from docs/conventions.md (Python loops over scalar tensors, so that
autograd of the reference gives the expected gradients), on every CPU-runnable backend."""

import math

import pytest
import torch

from fastpo.kernels import kl_penalty, policy_loss, value_loss
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
}


# ------------------------------------------------------------------ references


def reference_kl(d, kind):
    """One token's KL estimate from a 0-dim float64 tensor d = lp - lp_ref."""
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


def reference_aggregate(rows, counts, agg, num_items=None, max_len=None):
    """rows[i] = sum over the valid tokens of row i of the per-token loss."""
    batch = len(rows)
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


def reference_policy_loss(lp, ent, old, adv, mask, ref=None, roll=None, *, loss_type="grpo", clip_eps_low=0.2,
                          clip_eps_high=None, delta=None, dual_clip=None, importance_level="token", kl_coef=0.0,
                          kl_kind="k3", entropy_coef=0.0, entropy_quantile=None, rollout_is="token",
                          rollout_is_cap=None, agg=None, num_items=None, max_len=None, sapo_tau_pos=1.0,
                          sapo_tau_neg=1.05):
    """(loss, metrics) per element. ``lp`` and ``ent`` are float64 leaves; the rest lists."""
    batch, length = lp.shape
    eps_high = clip_eps_low if clip_eps_high is None else clip_eps_high
    agg = agg or TRL_AGGREGATION[loss_type]
    sequence_ratio = loss_type == "gspo" or importance_level == "sequence"
    valid = [[bool(mask[i][t]) for t in range(length)] for i in range(batch)]
    counts = [sum(row) for row in valid]
    n_valid = sum(counts)

    def advantage(i, t):
        return adv[i][t] if isinstance(adv[i], list) else adv[i]

    seq_ratio = []
    for i in range(batch):
        log_sum = torch.zeros((), dtype=torch.float64)
        for t in range(length):
            if valid[i][t]:
                log_sum = log_sum + (lp[i, t] - old[i][t])
        seq_ratio.append(torch.exp(log_sum / max(1, counts[i])))

    threshold = None
    if entropy_quantile is not None:
        values = sorted(ent[i, t].item() for i in range(batch) for t in range(length) if valid[i][t])
        position = entropy_quantile * (len(values) - 1)
        below = math.floor(position)
        above = math.ceil(position)
        threshold = values[below] + (position - below) * (values[above] - values[below])

    def tis_weight(i, t):
        if roll is None:
            return 1.0
        if rollout_is == "token":
            log_w = old[i][t] - roll[i][t]
        else:
            log_w = sum(old[i][u] - roll[i][u] for u in range(length) if valid[i][u])
        weight = math.exp(log_w)
        return weight if rollout_is_cap is None else min(weight, rollout_is_cap)

    rows = []
    clip_low = clip_high = dual_hits = 0
    ratios, approx_kl, ref_kl, entropies = [], 0.0, 0.0, 0.0
    lo, hi = 1 - clip_eps_low, 1 + eps_high
    for i in range(batch):
        row = torch.zeros((), dtype=torch.float64)
        for t in range(length):
            if not valid[i][t]:
                continue
            a = advantage(i, t)
            token_ratio = torch.exp(lp[i, t] - old[i][t])
            r = seq_ratio[i] if sequence_ratio else token_ratio
            if loss_type == "cispo":
                loss = -torch.clamp(r, max=eps_high).detach() * a * lp[i, t]
                clip_high += r.item() > eps_high and a > 0
            elif loss_type == "sapo":
                tau = sapo_tau_pos if a > 0 else sapo_tau_neg
                loss = -torch.sigmoid(tau * (r - 1)) * 4 / tau * a
            else:
                unclipped = torch.clamp(r, max=delta) if delta is not None else r
                loss = -torch.minimum(unclipped * a, torch.clamp(r, lo, hi) * a)
                if dual_clip is not None and a < 0:
                    bound = torch.tensor(-dual_clip * a, dtype=torch.float64)
                    dual_hits += bound.item() < loss.item()
                    loss = torch.minimum(loss, bound)
                clip_low += r.item() < lo and a < 0
                clip_high += r.item() > hi and a > 0
            if threshold is not None and ent[i, t].item() < threshold:
                loss = loss * 0.0
            loss = loss * tis_weight(i, t)
            if ref is not None:
                kl = reference_kl(lp[i, t] - ref[i][t], kl_kind)
                ref_kl += kl.item()
                if kl_coef != 0:
                    loss = loss + kl_coef * kl
            if ent is not None:
                entropies += ent[i, t].item()
                if entropy_coef != 0:
                    loss = loss - entropy_coef * ent[i, t]
            row = row + loss
            ratios.append(r.item())
            approx_kl += token_ratio.item() - 1 - (lp[i, t].item() - old[i][t])
        rows.append(row)
    loss = reference_aggregate(rows, counts, agg, num_items, max_len)
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
    return loss, metrics


def reference_value_loss(values, old, returns, mask, clip_eps, agg, max_len=None):
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
    return reference_aggregate(rows, counts, agg, max_len=max_len), clipped / max(1, sum(counts))


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
    uses_roll = "rollout_is" in case or "rollout_is_cap" in case
    case.pop("per_token_advantages", None)
    case.pop("expect_positive", None)
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
        **case,
    )
    leaves = [x for x in (lp64, ent64) if x is not None]
    if expected.requires_grad:
        expected_grads = torch.autograd.grad(expected, leaves, allow_unused=True)
    else:  # no valid token reaches the loss
        expected_grads = [None] * len(leaves)
    expected_grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, expected_grads)]
    return loss, grads, metrics, expected, expected_grads, expected_metrics


# ------------------------------------------------------------------ kl_penalty


@pytest.mark.parametrize("kind", ["k1", "k2", "k3", "abs", "low_var_kl"])
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
    "kl_k1": dict(loss_type="grpo", kl_coef=0.05, kl_kind="k1"),
    "kl_k2": dict(loss_type="dapo", kl_coef=0.05, kl_kind="k2"),
    "kl_k3": dict(loss_type="gspo", kl_coef=0.04),
    "kl_abs": dict(loss_type="sapo", kl_coef=0.05, kl_kind="abs"),
    "kl_low_var": dict(loss_type="cispo", clip_eps_high=1.1, kl_coef=0.05, kl_kind="low_var_kl"),
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


@pytest.mark.parametrize("name", ["gspo_token_advantages", "everything", "tis_sequence_capped"])
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


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "cispo", "sapo", "gspo"])
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
        max_len=7 if loss_type == "dr_grpo" else None, backend=backend,
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
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_value_loss_matches_reference(clip_eps, agg, backend):
    mask = ragged_mask(5, 7)
    values = torch.randn(5, 7)
    old = values + 0.4 * torch.randn(5, 7)
    returns = torch.randn(5, 7)
    old[~mask] = math.nan
    returns[~mask] = math.inf
    max_len = 9 if agg == "seq-mean-token-sum-norm" else None
    leaf = values.clone().requires_grad_()
    loss, metrics = value_loss(leaf, old, returns, mask, clip_eps=clip_eps, agg=agg, max_len=max_len, backend=backend)
    (grad,) = torch.autograd.grad(loss, leaf)

    v64 = torch.where(mask, values, 0.0).double().requires_grad_()
    expected, clip_frac = reference_value_loss(v64, old.double().tolist(), returns.double().tolist(), mask.tolist(),
                                               clip_eps, agg, max_len)
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


# ------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["everything", "gspo", "tis_sequence_capped", "entropy_quantile"])
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
    uses_roll = "rollout_is" in case or "rollout_is_cap" in case
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
