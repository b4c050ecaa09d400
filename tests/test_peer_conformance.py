"""policy_loss and kl_penalty against the peers' REAL functions on the same float64
inputs, under the options docs/rl-losses.md names for each peer: verl's
``core_algos`` policy losses, ``agg_loss`` and ``kl_penalty``, OpenRLHF's
``PolicyLoss`` and ``compute_approx_kl``, and TRL's ``GRPOTrainer._compute_loss``
(called on tensors through a minimal single-process stand-in for the trainer). Values
and gradients are compared, on every CPU-runnable backend.

verl and OpenRLHF are imported only through tests/peer_modules.py; a peer that is not
installed skips its tests.
"""

import collections
import math
import types

import pytest
import torch

from fastpo.kernels import AGGREGATIONS, PolicyLossOptions, kl_penalty, policy_loss

import peer_modules

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the peers use deprecated torch APIs

B, T = 6, 7


def make_inputs(seed=0, extreme_row=None):
    """float64 inputs with a ragged mask: row 0 fully masked, row 1 full. Masked
    positions hold finite values (the peers multiply by the mask, so NaN would
    leak into their results, not into fastpo's). ``extreme_row`` gets a log-ratio of
    ``+12`` on every token (it exercises the GSPO cap)."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.rand(*shape, generator=generator, dtype=torch.float64)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    mask = rand(B, T) > 0.3
    mask[0] = False
    mask[1] = True
    lp = -rand(B, T) * 3 - 0.05
    old = lp + 0.3 * randn(B, T)
    if extreme_row is not None:
        old[extreme_row] = lp[extreme_row] - 12.0
    ref = lp + 1.5 * randn(B, T)
    roll = old + 0.2 * randn(B, T)
    # entropies exact in float32: TRL takes its quantile in float32
    entropy = (rand(B, T) * 2).float().double()
    adv = randn(B)
    adv[1::2] = adv[1::2].abs()
    adv[2::2] = -adv[2::2].abs()
    return dict(lp=lp, old=old, ref=ref, roll=roll, entropy=entropy, adv=adv, mask=mask)


# verl's seq-mean-token-mean and OpenRLHF's per-sample mean divide by (count + 1e-8)
PEER_RTOL = 1e-7


def close(actual, expected, rtol=1e-9, atol=1e-11):
    torch.testing.assert_close(torch.as_tensor(actual).double(), torch.as_tensor(expected).double(),
                               rtol=rtol, atol=atol)


def fastpo_loss(x, backend, *, peer=None, with_entropy=False, **options):
    """policy_loss under ``peer``'s conventions (PolicyLossOptions.matching) and
    ``options``, and its gradient with respect to logprobs (and entropy)."""
    lp = x["lp"].clone().requires_grad_()
    ent = x["entropy"].clone().requires_grad_() if with_entropy else None
    tensor_options = {k: options.pop(k) for k in ("ref_logprobs", "rollout_logprobs", "num_items") if k in options}
    loss_options = PolicyLossOptions.matching(peer, **options) if peer else PolicyLossOptions(**options)
    loss, metrics = policy_loss(lp, x["old"], x["adv"], x["mask"], entropy=ent, backend=backend,
                                options=loss_options, **tensor_options)
    grads = torch.autograd.grad(loss, [lp] + ([ent] if with_entropy else []))
    return loss, grads, metrics


# --------------------------------------------------------------------------- verl


@pytest.fixture(scope="module")
def verl():
    return peer_modules.verl_core_algos()


def verl_config(**fields):
    from verl.workers.config import ActorConfig

    return ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, **fields)


def verl_loss(verl, loss_mode, x, agg, config):
    lp = x["lp"].clone().requires_grad_()
    advantages = x["adv"][:, None].expand(B, T)
    loss, _ = verl.get_policy_loss_fn(loss_mode)(
        old_log_prob=x["old"], log_prob=lp, advantages=advantages, response_mask=x["mask"].double(),
        loss_agg_mode=agg, config=config,
    )
    return loss, torch.autograd.grad(loss, lp)[0]


@pytest.mark.parametrize("agg", AGGREGATIONS.names())
def test_verl_vanilla_dual_clip(verl, agg, backend):
    """verl's `vanilla` (dual clip always on, clip_ratio_c=3) under every loss_agg_mode,
    with a fully masked row: seq_mean_rows='nonempty' and log_ratio_clamp=20."""
    x = make_inputs()
    # row 2 has A < 0: log-ratios beyond verl's clamp on both sides, and a ratio past the dual clip
    x["old"][2, :3] = x["lp"][2, :3] + torch.tensor([-25.0, 25.0, -1.5], dtype=torch.float64)
    x["mask"][2, :3] = True
    config = verl_config(clip_ratio=0.2, clip_ratio_low=0.1, clip_ratio_high=0.28, clip_ratio_c=3.0)
    expected, expected_grad = verl_loss(verl, "vanilla", x, agg, config)
    loss, (grad,), metrics = fastpo_loss(
        x, backend, peer="verl", loss_type="grpo", clip_eps_low=0.1, clip_eps_high=0.28, dual_clip=3.0, agg=agg,
        max_len=T if agg == "seq-mean-token-sum-norm" else None,
    )
    close(loss, expected, rtol=PEER_RTOL)
    close(grad, expected_grad, rtol=PEER_RTOL)
    assert metrics["dual_clip_frac"] > 0


def test_verl_actor_objective_with_kl_and_entropy(verl, backend):
    """verl's actor loss: pg_loss - entropy_coeff * agg_loss(entropy) + kl_loss_coef *
    agg_loss(kl_penalty(low_var_kl)), all under one loss_agg_mode, as its ppo_loss."""
    x = make_inputs(seed=1)
    agg = "seq-mean-token-mean"
    config = verl_config(clip_ratio=0.2, clip_ratio_c=3.0)
    lp = x["lp"].clone().requires_grad_()
    ent = x["entropy"].clone().requires_grad_()
    mask = x["mask"].double()
    pg, _ = verl.get_policy_loss_fn("vanilla")(
        old_log_prob=x["old"], log_prob=lp, advantages=x["adv"][:, None].expand(B, T), response_mask=mask,
        loss_agg_mode=agg, config=config,
    )
    kl = verl.agg_loss(verl.kl_penalty(lp, x["ref"], "low_var_kl"), mask, agg)
    expected = pg - 0.01 * verl.agg_loss(ent, mask, agg) + 0.05 * kl
    expected_grads = torch.autograd.grad(expected, [lp, ent])
    loss, grads, _ = fastpo_loss(
        x, backend, peer="verl", with_entropy=True, loss_type="grpo", dual_clip=3.0, agg=agg,
        ref_logprobs=x["ref"], kl_coef=0.05, entropy_coef=0.01,
    )
    close(loss, expected, rtol=PEER_RTOL)
    for grad, expected_grad in zip(grads, expected_grads):
        close(grad, expected_grad, rtol=PEER_RTOL)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_verl_gspo_caps_the_log_sequence_ratio(verl, agg, backend):
    x = make_inputs(seed=2, extreme_row=2)  # A < 0: the loss is -s*A, unclipped
    config = verl_config(clip_ratio=0.2, clip_ratio_low=0.0003, clip_ratio_high=0.0004)
    expected, expected_grad = verl_loss(verl, "gspo", x, agg, config)
    loss, (grad,), _ = fastpo_loss(
        x, backend, peer="verl", loss_type="gspo", clip_eps_low=0.0003, clip_eps_high=0.0004, agg=agg,
        seq_log_ratio_cap=10.0,
    )
    close(loss, expected, rtol=PEER_RTOL)
    close(grad, expected_grad, rtol=PEER_RTOL)
    # without the cap the extreme row's ratio is e^12, not e^10: fastpo's default differs
    uncapped, _, _ = fastpo_loss(x, backend, loss_type="gspo", clip_eps_low=0.0003, clip_eps_high=0.0004, agg=agg,
                                 seq_mean_rows="nonempty")
    assert abs(uncapped.item() - expected.item()) > 1.0


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum"])
def test_verl_cispo_clips_the_ratio_on_both_sides(verl, agg, backend):
    x = make_inputs(seed=3)
    config = verl_config(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28)
    expected, expected_grad = verl_loss(verl, "cispo", x, agg, config)
    loss, (grad,), metrics = fastpo_loss(
        x, backend, peer="verl", loss_type="cispo", clip_eps_high=1 + 0.28, cispo_ratio_min=1 - 0.2, agg=agg,
    )
    close(loss, expected)
    close(grad, expected_grad)
    assert metrics["clip_frac_low"] > 0


def test_verl_sapo(verl, backend):
    """verl's SAPO always aggregates seq-mean-token-mean over the non-empty rows."""
    x = make_inputs(seed=4)
    config = verl_config(tau_pos=1.5, tau_neg=2.5)
    expected, expected_grad = verl_loss(verl, "sapo", x, "token-mean", config)
    loss, (grad,), _ = fastpo_loss(x, backend, peer="verl", loss_type="sapo", sapo_tau_pos=1.5, sapo_tau_neg=2.5)
    close(loss, expected, rtol=PEER_RTOL)
    close(grad, expected_grad, rtol=PEER_RTOL)


VERL_REGISTRY_CASES = {
    # name: (verl loss_mode, verl ActorConfig fields, verl PolicyLossConfig fields, fastpo options, exercised metric)
    "gpg": ("gpg", {}, {}, dict(loss_type="gpg"), None),
    "geo_mean": ("geo_mean", dict(clip_ratio_low=0.1, clip_ratio_high=0.15), {},
                 dict(loss_type="geo_mean", clip_eps_low=0.1, clip_eps_high=0.15), "clip_frac_high"),
    "dppo_tv": ("dppo_tv", dict(clip_ratio_low=0.04, clip_ratio_high=0.03, clip_ratio_c=1.2), {},
                dict(loss_type="dppo_tv", clip_eps_low=0.04, clip_eps_high=0.03, dppo_ratio_cap=1.2), "clip_frac_low"),
    "dppo_kl": ("dppo_kl", dict(clip_ratio_low=0.01, clip_ratio_high=0.005, clip_ratio_c=1.2), {},
                dict(loss_type="dppo_kl", clip_eps_low=0.01, clip_eps_high=0.005, dppo_ratio_cap=1.2), "clip_frac_low"),
    "dro": ("dro", {}, dict(dro_beta=0.3), dict(loss_type="dro", dro_beta=0.3), None),
    # every candidate dropped (clip_cov_ratio=1): verl's random choice is then deterministic
    "clip_cov": ("clip_cov", {}, dict(clip_cov_ratio=1.0, clip_cov_lb=-0.2, clip_cov_ub=0.3),
                 dict(loss_type="clip_cov", cov_ratio=1.0, clip_cov_lb=-0.2, clip_cov_ub=0.3), "cov_selected_frac"),
    "kl_cov": ("kl_cov", {}, dict(kl_cov_ratio=0.2, ppo_kl_coef=0.5),
               dict(loss_type="kl_cov", cov_ratio=0.2, kl_cov_coef=0.5), "cov_selected_frac"),
}


# binary KL of a token whose lp_old > 0 (random inputs, not log-probs): NaN, as in verl
@pytest.mark.filterwarnings("ignore:invalid value encountered in log")
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("name", list(VERL_REGISTRY_CASES))
def test_verl_registry_loss_types(verl, name, agg, backend):
    """verl's gpg, geo_mean, dppo_tv, dppo_kl, dro, clip_cov and kl_cov under its conventions. verl's
    geo_mean ignores loss_agg_mode: it is the mean of its per-sequence losses over every
    row (fastpo's default aggregation of geo_mean, with seq_mean_rows='all')."""
    from verl.workers.config import PolicyLossConfig

    loss_mode, actor_fields, loss_fields, options, exercised = VERL_REGISTRY_CASES[name]
    x = make_inputs(seed=5)
    config = verl_config(clip_ratio=0.2, policy_loss=PolicyLossConfig(loss_mode=loss_mode, **loss_fields),
                         **actor_fields)
    expected, expected_grad = verl_loss(verl, loss_mode, x, agg, config)
    if name == "geo_mean":
        options = dict(options, seq_mean_rows="all")
    else:
        options = dict(options, agg=agg)
    loss, (grad,), metrics = fastpo_loss(x, backend, peer="verl", **options)
    close(loss, expected, rtol=PEER_RTOL)
    close(grad, expected_grad, rtol=PEER_RTOL)
    if exercised:
        assert metrics[exercised] > 0


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("threshold", [1.05, "0.95_1.05"])
def test_verl_rollout_is_weights_tis_and_icepop(verl, level, threshold, backend):
    """verl's rollout IS weights (compute_rollout_correction_weights) in vanilla's loss: a
    single threshold truncates (TIS), a "lo_hi" one masks outside the band (IcePop)."""
    import importlib

    helper = importlib.import_module("verl.trainer.ppo.rollout_corr_helper")
    x = make_inputs(seed=10)
    x["roll"] = x["old"] + 0.05 * torch.randn(B, T, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    weights, _ = helper.compute_rollout_correction_weights(
        x["old"] - x["roll"], x["mask"].double(), rollout_is=level, rollout_is_threshold=threshold
    )
    config = verl_config(clip_ratio=0.2, clip_ratio_c=3.0)
    lp = x["lp"].clone().requires_grad_()
    expected, _ = verl.get_policy_loss_fn("vanilla")(
        old_log_prob=x["old"], log_prob=lp, advantages=x["adv"][:, None].expand(B, T),
        response_mask=x["mask"].double(), loss_agg_mode="token-mean", config=config, rollout_is_weights=weights,
    )
    expected_grad = torch.autograd.grad(expected, lp)[0]
    if isinstance(threshold, str):  # IcePop
        low, high = map(float, threshold.split("_"))
        options = dict(rollout_is_mode="mask", rollout_is_min=low, rollout_is_cap=high)
    else:
        options = dict(rollout_is_cap=threshold)
    loss, (grad,), metrics = fastpo_loss(
        x, backend, peer="verl", loss_type="grpo", dual_clip=3.0, agg="token-mean", rollout_logprobs=x["roll"],
        rollout_is=level, **options,
    )
    close(loss, expected, rtol=PEER_RTOL)
    close(grad, expected_grad, rtol=PEER_RTOL)
    assert metrics["rollout_is_filtered_frac"] > 0


@pytest.mark.parametrize("rollout_rs,threshold", [
    ("token_k1", "0.9_1.1"), ("token_k2", 0.01), ("token_k3", 0.01), ("seq_sum_k1", 1.4), ("seq_sum_k2", 0.05),
    ("seq_sum_k3", 0.05), ("seq_mean_k1", "0.9_1.05"), ("seq_mean_k2", 0.012), ("seq_mean_k3", 0.012),
    ("seq_max_k2", 0.04), ("seq_max_k3", 0.04),
])
def test_verl_rollout_rejection(verl, rollout_rs, threshold, backend):
    """verl's rollout rejection (rollout_corr_helper.compute_rollout_rejection_mask): the
    mask it returns is the one fastpo's rollout_rs keeps, and the loss is vanilla's on it."""
    import importlib

    helper = importlib.import_module("verl.trainer.ppo.rollout_corr_helper")
    x = make_inputs(seed=8)
    x["roll"] = x["old"] + 0.15 * torch.randn(B, T, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    verl_mask, _ = helper.compute_rollout_rejection_mask(
        x["old"] - x["roll"], x["mask"].double(), rollout_rs=rollout_rs, rollout_rs_threshold=threshold
    )
    kept = verl_mask.bool()
    assert 0 < kept.sum() < x["mask"].sum(), "the threshold rejects nothing or everything"
    low, high = (None, float(threshold)) if "_" not in str(threshold) else map(float, threshold.split("_"))
    config = verl_config(clip_ratio=0.2, clip_ratio_c=3.0)
    expected, expected_grad = verl_loss(verl, "vanilla", dict(x, mask=kept), "token-mean", config)
    loss, (grad,), metrics = fastpo_loss(
        x, backend, peer="verl", loss_type="grpo", dual_clip=3.0, agg="token-mean", rollout_logprobs=x["roll"],
        rollout_is_mode="mask", rollout_is_weight="none", rollout_rs=rollout_rs, rollout_rs_min=low,
        rollout_rs_max=high,
    )
    close(loss, expected, rtol=PEER_RTOL)
    close(grad, expected_grad, rtol=PEER_RTOL)
    close(metrics["rollout_rs_masked_frac"], 1 - kept.sum().double() / x["mask"].sum())


@pytest.mark.parametrize("verl_kind,kind", [("kl", "k1"), ("k1", "k1"), ("mse", "k2"), ("k2", "k2"),
                                             ("abs", "abs"), ("low_var_kl", "low_var_kl"), ("k3", "low_var_kl")])
def test_verl_kl_penalty(verl, verl_kind, kind, backend):
    """verl's "k3" is the clamped estimator, fastpo's low_var_kl; |d| beyond both clamps."""
    d = torch.tensor([-30.0, -15.0, -3.0, -0.5, 0.0, 0.25, 2.0, 11.0, 14.0, 30.0], dtype=torch.float64)
    lp = -torch.rand(d.numel(), dtype=torch.float64) * 3
    weights = torch.rand(d.numel(), dtype=torch.float64)
    results = []
    for fn in (lambda a, b: verl.kl_penalty(a, b, verl_kind), lambda a, b: kl_penalty(a, b, kind, backend=backend)):
        a, b = lp.clone().requires_grad_(), (lp - d).requires_grad_()
        value = fn(a, b)
        results.append((value, *torch.autograd.grad((value * weights).sum(), [a, b])))
    for ours, theirs in zip(*results[::-1]):
        close(ours, theirs)


# ------------------------------------------------------------------------- OpenRLHF


@pytest.fixture(scope="module")
def openrlhf():
    return peer_modules.openrlhf_loss()


OPENRLHF_CASES = {
    # name: (PolicyLoss keywords, fastpo options)
    "ppo_token_dual_clip": (dict(dual_clip=3.0), dict(dual_clip=3.0)),
    "ppo_sample_level": (dict(clip_eps_high=0.28, token_level_loss=False),
                         dict(clip_eps_high=0.28, agg="seq-mean-token-mean")),
    "gspo": (dict(clip_eps_low=0.003, clip_eps_high=0.004, policy_loss_type="gspo", dual_clip=2.0),
             dict(loss_type="gspo", clip_eps_low=0.003, clip_eps_high=0.004, dual_clip=2.0, agg="seq-mean-token-mean")),
    "is_token_mask_ratio": (
        dict(is_correction_level="token", is_correction_threshold=(0.85, 1.15)),
        dict(rollout_is="token", rollout_is_mode="mask", rollout_is_min=0.85, rollout_is_cap=1.15,
             rollout_is_weight="token"),
    ),
    "is_token_clip_ratio": (
        dict(is_correction_level="token", is_correction_mode="clip", is_correction_threshold=(0.85, 1.15)),
        dict(rollout_is="token", rollout_is_min=0.85, rollout_is_cap=1.15),
    ),
    "is_seq_mask_ratio": (
        dict(is_correction_level="seq", is_correction_threshold=(0.95, 1.05), token_level_loss=False),
        dict(rollout_is="sequence", rollout_is_mode="mask", rollout_is_min=0.95, rollout_is_cap=1.05,
             rollout_is_weight="token", agg="seq-mean-token-mean"),
    ),
    "is_token_mask_binary_kl": (
        dict(is_correction_level="token", is_correction_gating="binary_kl", is_correction_threshold=(0.0, 0.004)),
        dict(rollout_is="token", rollout_is_mode="mask", rollout_is_gating="binary_kl", rollout_is_min=0.0,
             rollout_is_cap=0.004, rollout_is_weight="token"),
    ),
    "is_seq_mask_tv": (
        dict(is_correction_level="seq", is_correction_gating="tv", is_correction_threshold=(0.0, 0.03)),
        dict(rollout_is="sequence", rollout_is_mode="mask", rollout_is_gating="tv", rollout_is_min=0.0,
             rollout_is_cap=0.03, rollout_is_weight="token"),
    ),
    "is_token_mask_tv": (
        dict(is_correction_level="token", is_correction_gating="tv", is_correction_threshold=(0.0, 0.02)),
        dict(rollout_is="token", rollout_is_mode="mask", rollout_is_gating="tv", rollout_is_min=0.0,
             rollout_is_cap=0.02, rollout_is_weight="token"),
    ),
}


@pytest.mark.parametrize("name", list(OPENRLHF_CASES))
def test_openrlhf_policy_loss(openrlhf, name, backend):
    peer_options, options = OPENRLHF_CASES[name]
    x = make_inputs(seed=5)
    lp = x["lp"].clone().requires_grad_()
    uses_is = "is_correction_level" in peer_options
    peer = openrlhf.PolicyLoss(**peer_options)
    expected, _, _, _, filtered = peer(lp, x["old"], x["adv"][:, None], x["mask"].double(),
                                       rollout_log_probs=x["roll"] if uses_is else None)
    (expected_grad,) = torch.autograd.grad(expected, lp)
    loss, (grad,), metrics = fastpo_loss(
        x, backend, peer="openrlhf", rollout_logprobs=x["roll"] if uses_is else None, **{"agg": "token-mean", **options}
    )
    close(loss, expected, rtol=PEER_RTOL)
    close(grad, expected_grad, rtol=PEER_RTOL)
    if uses_is:
        filtered_frac = metrics["rollout_is_filtered_frac"]
        assert 0 < filtered_frac < 1
        if peer_options["is_correction_level"] == "token":  # a fraction of tokens on both sides
            close(filtered_frac, filtered)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_openrlhf_compute_approx_kl_is_the_clamped_estimator(estimator, backend):
    utils = peer_modules.openrlhf_utils()
    d = torch.tensor([-40.0, -12.0, -9.0, -3.0, -0.5, 0.0, 0.25, 2.0, 4.0, 11.0, 30.0])
    lp = -torch.rand(d.numel()) * 3
    weights = torch.rand(d.numel())
    results = []
    for fn in (lambda a, b: utils.compute_approx_kl(a, b, kl_estimator=estimator),
               lambda a, b: kl_penalty(a, b, estimator, clamp=10.0, backend=backend)):
        a, b = lp.clone().requires_grad_(), (lp - d).requires_grad_()
        value = fn(a, b)
        results.append((value, *torch.autograd.grad((value * weights).sum(), [a, b])))
    for theirs, ours in zip(*results):
        assert torch.isfinite(ours).all()
        close(ours, theirs, rtol=1e-6, atol=1e-6)  # OpenRLHF computes in float32


# ----------------------------------------------------------------------------- TRL


@pytest.fixture(scope="module")
def trl_trainer():
    grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")
    return grpo_trainer.GRPOTrainer


class _SingleProcess:
    """The accelerator calls of GRPOTrainer._compute_loss, for one process."""

    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x

    def reduce(self, x, reduction="sum"):
        return x


def trl_loss(trainer_cls, x, *, loss_type="grpo", beta=0.0, use_bias_correction_kl=True, importance_level="token",
             epsilon=0.2, epsilon_high=None, delta=None, entropy_coef=0.0, top_entropy_quantile=1.0,
             max_completion_length=T, sapo_tau=(1.0, 1.05), vespo=(2.0, 3.0, 3.0, 2.0), off_policy_mask_threshold=None,
             old=None):
    """TRL 1.16's real ``_compute_loss`` on these tensors: (loss, d loss/d lp, d loss/d H)."""
    lp = x["lp"].clone().requires_grad_()
    ent = x["entropy"].clone().requires_grad_()
    stub = types.SimpleNamespace(
        top_entropy_quantile=top_entropy_quantile, off_policy_mask_threshold=off_policy_mask_threshold,
        importance_sampling_level=importance_level, beta=beta, loss_type=loss_type, epsilon_low=epsilon,
        epsilon_high=epsilon if epsilon_high is None else epsilon_high, use_vllm=False,
        vllm_importance_sampling_correction=False, model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=max_completion_length,
        accelerator=_SingleProcess(), entropy_coef=entropy_coef, use_adaptive_entropy=False,
        _entropy_bonus_enabled=entropy_coef != 0.0, aux_loss_enabled=False,
        _metrics={"train": collections.defaultdict(list)},
        args=types.SimpleNamespace(use_bias_correction_kl=use_bias_correction_kl, delta=delta,
                                   sapo_temperature_pos=sapo_tau[0], sapo_temperature_neg=sapo_tau[1],
                                   vespo_k_pos=vespo[0], vespo_lambda_pos=vespo[1], vespo_k_neg=vespo[2],
                                   vespo_lambda_neg=vespo[3], steps_per_generation=1),
    )
    stub._get_per_token_logps_and_entropies = lambda *args, **kwargs: (lp, ent, None)
    stub.get_high_entropy_mask = types.MethodType(trainer_cls.get_high_entropy_mask, stub)
    stub.get_gamma_weights = trainer_cls.get_gamma_weights
    stub.get_off_policy_mask = trainer_cls.get_off_policy_mask
    mask = x["mask"].long()
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
        "advantages": x["adv"], "old_per_token_logps": x["old"] if old is None else old,
        "ref_per_token_logps": x["ref"], "num_items_in_batch": mask.sum().double(),
    }
    loss = trainer_cls._compute_loss(stub, None, inputs)
    return loss, torch.autograd.grad(loss, [lp, ent], allow_unused=True)


TRL_CASES = {
    # name: (TRL options, fastpo options)
    "grpo_bias_corrected_kl": (dict(beta=0.04), dict(loss_type="grpo", kl_coef=0.04)),
    "grpo_plain_kl": (dict(beta=0.04, use_bias_correction_kl=False),
                      dict(loss_type="grpo", kl_coef=0.04, kl_ratio_weighted=False)),
    "gspo_bias_corrected_kl": (dict(beta=0.04, importance_level="sequence", epsilon=3e-4, epsilon_high=4e-4),
                               dict(loss_type="gspo", kl_coef=0.04, clip_eps_low=3e-4, clip_eps_high=4e-4)),
    "dapo_entropy_bonus_top_quantile": (
        dict(loss_type="dapo", epsilon_high=0.28, entropy_coef=0.01, top_entropy_quantile=0.5),
        dict(loss_type="dapo", clip_eps_high=0.28, entropy_coef=0.01, entropy_quantile=0.5, num_items=True),
    ),
    "grpo_entropy_bonus": (dict(entropy_coef=0.02, beta=0.04),
                           dict(loss_type="grpo", entropy_coef=0.02, kl_coef=0.04)),
    "dr_grpo_delta": (dict(loss_type="dr_grpo", delta=1.2, max_completion_length=9),
                      dict(loss_type="dr_grpo", delta=1.2, max_len=9)),
    "bnpo": (dict(loss_type="bnpo"), dict(loss_type="bnpo")),
    "cispo": (dict(loss_type="cispo", epsilon_high=1.1, beta=0.04),
              dict(loss_type="cispo", clip_eps_high=1.1, kl_coef=0.04)),
    "sapo": (dict(loss_type="sapo", sapo_tau=(1.5, 2.0), entropy_coef=0.01),
             dict(loss_type="sapo", sapo_tau_pos=1.5, sapo_tau_neg=2.0, entropy_coef=0.01)),
    "luspo_sequence": (dict(loss_type="luspo", importance_level="sequence", epsilon=3e-4, epsilon_high=4e-4,
                            beta=0.04),
                       dict(loss_type="luspo", importance_level="sequence", clip_eps_low=3e-4, clip_eps_high=4e-4,
                            kl_coef=0.04)),
    "luspo_token": (dict(loss_type="luspo"), dict(loss_type="luspo")),
    "vespo": (dict(loss_type="vespo", beta=0.04), dict(loss_type="vespo", kl_coef=0.04, num_items=True)),
    # seed 6: the A < 0 rows drift by -0.118 and -0.108: one dropped, then both
    "off_policy_mask": (dict(off_policy_mask_threshold=-0.11, beta=0.04),
                        dict(loss_type="grpo", off_policy_mask_threshold=-0.11, kl_coef=0.04)),
    "off_policy_mask_dapo": (dict(loss_type="dapo", off_policy_mask_threshold=-0.2),
                             dict(loss_type="dapo", off_policy_mask_threshold=-0.2, num_items=True)),
    "vespo_parameters": (dict(loss_type="vespo", vespo=(0.5, 0.75, 1.5, 0.25)),
                         dict(loss_type="vespo", vespo_k_pos=0.5, vespo_lambda_pos=0.75, vespo_k_neg=1.5,
                              vespo_lambda_neg=0.25, num_items=True)),
}


@pytest.mark.parametrize("name", list(TRL_CASES))
def test_trl_grpo_loss(trl_trainer, name, backend):
    trl_options, options = TRL_CASES[name]
    x = make_inputs(seed=6)
    expected, expected_grads = trl_loss(trl_trainer, x, **trl_options)
    options = dict(options)
    if options.pop("num_items", False):
        options["num_items"] = int(x["mask"].sum())
    with_entropy = "entropy_coef" in options or "entropy_quantile" in options
    if "entropy_quantile" in options:
        options["entropy_quantile"] = 1.0 - options["entropy_quantile"]  # TRL keeps the top fraction
    loss, grads, _ = fastpo_loss(x, backend, peer="trl", with_entropy=with_entropy, ref_logprobs=x["ref"], **options)
    close(loss, expected)
    close(grads[0], expected_grads[0])
    if with_entropy:
        close(grads[1], expected_grads[1])


def test_trl_bias_corrected_kl_changes_the_gradient_on_policy(trl_trainer, backend):
    """On-policy (old = lp) the ratio is 1 but its gradient is not: TRL's default KL
    gradient differs from the plain k3's, and kl_ratio_weighted reproduces it."""
    x = make_inputs(seed=7)
    x["old"] = x["lp"].clone()
    _, (expected_grad, _) = trl_loss(trl_trainer, x, beta=0.1, old=x["old"])
    _, (plain_grad,), _ = fastpo_loss(x, backend, ref_logprobs=x["ref"], kl_coef=0.1)
    _, (grad,), _ = fastpo_loss(x, backend, ref_logprobs=x["ref"], kl_coef=0.1, kl_ratio_weighted=True)
    close(grad, expected_grad)
    assert not torch.allclose(plain_grad, expected_grad)


def test_verl_seq_mean_divides_by_the_nonempty_rows(verl, backend):
    """A fully masked row leaves verl's seq-mean modes unchanged under
    seq_mean_rows='nonempty', and changes fastpo's default ('all', TRL's)."""
    x = make_inputs(seed=8)
    results = {}
    for rows in ("all", "nonempty"):
        loss, _, _ = fastpo_loss(x, backend, loss_type="grpo", agg="seq-mean-token-sum", seq_mean_rows=rows)
        results[rows] = loss.item()
    lp = x["lp"].clone()
    config = verl_config(clip_ratio=0.2, clip_ratio_c=1e9)
    expected, _ = verl.get_policy_loss_fn("vanilla")(
        old_log_prob=x["old"], log_prob=lp, advantages=x["adv"][:, None].expand(B, T),
        response_mask=x["mask"].double(), loss_agg_mode="seq-mean-token-sum", config=config,
    )
    assert math.isclose(results["nonempty"], expected.item(), rel_tol=1e-12)
    assert math.isclose(results["all"], expected.item() * (B - 1) / B, rel_tol=1e-12)
