"""fastpo.integrations.openrlhf against the installed OpenRLHF: PolicyLoss, ValueLoss and
compute_approx_kl built with the same arguments and called on the same float64 inputs
return what OpenRLHF's own return (every element of the tuples, and the gradients)."""

import importlib.util
import itertools
import subprocess
import sys

import pytest
import torch

from peer_modules import openrlhf_loss, openrlhf_utils

if importlib.util.find_spec("openrlhf") is None:
    pytest.skip("OpenRLHF is not installed (make test installs it)", allow_module_level=True)
peer_loss = openrlhf_loss()
peer_utils = openrlhf_utils()
import fastpo.integrations.openrlhf as fastpo_openrlhf  # noqa: E402

# Lengths of the responses; the third is fully masked.
LENGTHS = [7, 5, 0, 3, 6, 1]
# dp_size / batch_num_tokens / global_batch_size as OpenRLHF's loss_utils passes them
BATCH_INFOS = {"local": {}, "global": {"dp_size": 2, "batch_num_tokens": 53, "global_batch_size": 11}}


def inputs(seed=1):
    """float64 (B, T) log-probs with policy ratios on both sides of the clip range, one
    log-ratio beyond OpenRLHF's clamp of 20, rollout log-probs off the old ones by up to
    about a factor 3 (some tokens and sequences outside the IS bands), and advantages of
    both signs; finite garbage at masked positions."""
    gen = torch.Generator().manual_seed(seed)
    B, T = len(LENGTHS), max(LENGTHS)
    mask = torch.arange(T) < torch.tensor(LENGTHS)[:, None]
    old = -3.0 * torch.rand(B, T, generator=gen, dtype=torch.float64) - 0.05
    lp = old + 0.4 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    lp[0, 1] = old[0, 1] + 22.0
    rollout = old + 0.6 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    adv = torch.randn(B, T, generator=gen, dtype=torch.float64)
    return {"lp": lp, "old": old, "rollout": rollout, "adv": adv, "mask": mask}


def run_policy_loss(module, data, batch_info):
    log_probs = data["lp"].clone().requires_grad_()
    outputs = module(
        log_probs, data["old"], data["adv"], action_mask=data["mask"], rollout_log_probs=data["rollout"], **batch_info
    )
    outputs[0].backward()
    return [None if x is None else x.detach() for x in outputs], log_probs.grad


def assert_same_policy_loss(kwargs, batch_info, data=None, compare_filter_ratio=True):
    data = data or inputs()
    expected, expected_grad = run_policy_loss(peer_loss.PolicyLoss(**kwargs), data, batch_info)
    actual, grad = run_policy_loss(fastpo_openrlhf.PolicyLoss(**kwargs), data, batch_info)
    assert expected[0].abs() > 1e-3
    # OpenRLHF's per-sample mean divides each response's sum by (n_i + 1e-8): a relative
    # difference of at most 1e-8 from fastpo's n_i
    rtol = 1e-10 if kwargs.get("token_level_loss", True) and kwargs.get("policy_loss_type") != "gspo" else 1e-7
    torch.testing.assert_close(actual[0], expected[0], rtol=rtol, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=rtol, atol=1e-12)
    names = ("clip_ratio", "ppo_kl", "vllm_kl", "is_filter_ratio")
    for name, got, want in zip(names, actual[1:], expected[1:]):
        if name == "is_filter_ratio" and not compare_filter_ratio:
            continue
        if want is None:
            assert got is None, name
        else:
            # OpenRLHF's fractions are float32 (a float() of a bool tensor)
            rtol = 1e-10 if want.dtype == torch.float64 else 1e-6
            assert got.item() == pytest.approx(want.item(), rel=rtol, abs=1e-12), name


@pytest.mark.parametrize("batch_info", list(BATCH_INFOS))
@pytest.mark.parametrize("token_level_loss", [True, False])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("policy_loss_type", ["ppo", "gspo"])
def test_policy_loss_equals_openrlhfs(policy_loss_type, dual_clip, token_level_loss, batch_info):
    kwargs = dict(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=dual_clip, token_level_loss=token_level_loss,
                  policy_loss_type=policy_loss_type)
    assert_same_policy_loss(kwargs, BATCH_INFOS[batch_info])


# Every IS-correction combination OpenRLHF accepts: clip only at token level on the ratio;
# the divergence gates take an upper bound only.
IS_CORRECTIONS = [
    (level, mode, gating)
    for level, mode, gating in itertools.product(["token", "seq"], ["mask", "clip"], ["ratio", "binary_kl", "tv"])
    if mode == "mask" or (level == "token" and gating == "ratio")
]
IS_THRESHOLDS = {"ratio": (0.5, 2.0), "binary_kl": (0.0, 0.05), "tv": (0.0, 0.1)}


def is_correction(level, mode, gating):
    return dict(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=3.0, is_correction_level=level,
                is_correction_mode=mode, is_correction_gating=gating, is_correction_threshold=IS_THRESHOLDS[gating])


@pytest.mark.parametrize("level,mode,gating", IS_CORRECTIONS)
def test_is_correction_equals_openrlhfs(level, mode, gating):
    """At sequence level is_filter_ratio differs by definition (OpenRLHF: the fraction of
    sequences; fastpo: the fraction of tokens whose sequence is filtered), see below."""
    assert_same_policy_loss(is_correction(level, mode, gating), BATCH_INFOS["local"],
                            compare_filter_ratio=level == "token")


@pytest.mark.parametrize("gating", ["ratio", "binary_kl", "tv"])
def test_sequence_filter_ratio_equals_openrlhfs_for_equal_lengths(gating):
    """fastpo's token fraction is OpenRLHF's sequence fraction when every response has
    the same length."""
    data = inputs(seed=4)
    data["mask"] = torch.ones_like(data["mask"])
    assert_same_policy_loss(is_correction("seq", "mask", gating), BATCH_INFOS["local"], data)


def test_is_correction_filters_something():
    """The IS inputs above exercise both outcomes of every gate."""
    for level, mode, gating in IS_CORRECTIONS:
        module = peer_loss.PolicyLoss(is_correction_level=level, is_correction_mode=mode,
                                      is_correction_gating=gating, is_correction_threshold=IS_THRESHOLDS[gating])
        (_, _, _, _, filtered), _ = run_policy_loss(module, inputs(), {})
        assert 0 < filtered < 1, (level, mode, gating)


def test_gspo_with_is_correction_takes_the_ratio_against_the_rollout():
    """OpenRLHF's GSPO does not weight by the IS correction: with it on, its sequence
    ratio is the current policy's against the rollout's."""
    kwargs = dict(policy_loss_type="gspo", is_correction_level="seq", is_correction_threshold=(0.5, 2.0))
    assert_same_policy_loss(kwargs, BATCH_INFOS["global"])


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(dual_clip=0.5), "dual_clip"),
        (dict(is_correction_level="sequence"), "is_correction_level='sequence'"),
        (dict(is_correction_level="seq", is_correction_mode="clip"), "is_correction_mode"),
        (dict(is_correction_level="token", is_correction_gating="tv"), "is_correction"),
    ],
)
def test_invalid_arguments_raise_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fastpo_openrlhf.PolicyLoss(**kwargs)


# ----------------------------------------------------------------------- ValueLoss


@pytest.mark.parametrize("batch_info", list(BATCH_INFOS))
@pytest.mark.parametrize("token_level_loss", [True, False])
@pytest.mark.parametrize("clip_eps", [None, 0.2])
def test_value_loss_equals_openrlhfs(clip_eps, token_level_loss, batch_info):
    gen = torch.Generator().manual_seed(2)
    data = inputs()
    old_values = torch.randn(data["lp"].shape, generator=gen, dtype=torch.float64)
    values = old_values + 0.4 * torch.randn(data["lp"].shape, generator=gen, dtype=torch.float64)
    returns = torch.randn(data["lp"].shape, generator=gen, dtype=torch.float64)

    def run(module):
        v = values.clone().requires_grad_()
        loss = module(v, old_values, returns, action_mask=data["mask"], **BATCH_INFOS[batch_info])
        loss.backward()
        return loss.detach(), v.grad

    expected = run(peer_loss.ValueLoss(clip_eps, token_level_loss))
    actual = run(fastpo_openrlhf.ValueLoss(clip_eps, token_level_loss))
    rtol = 1e-10 if token_level_loss else 1e-7
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want, rtol=rtol, atol=1e-12)


# ---------------------------------------------------------------- compute_approx_kl


@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3"])
def test_approx_kl_equals_openrlhfs(kl_estimator):
    """Values and gradients with log-ratios inside and beyond every clamp (|d| up to 30)."""
    gen = torch.Generator().manual_seed(3)
    base = -3.0 * torch.rand(64, generator=gen, dtype=torch.float64)
    log_ratio = torch.cat([
        torch.linspace(-30.0, 30.0, 33, dtype=torch.float64),
        0.5 * torch.randn(31, generator=gen, dtype=torch.float64),
    ])

    def run(function):
        log_probs = (base + log_ratio).requires_grad_()
        kl = function(log_probs, base, kl_estimator=kl_estimator)
        (kl * torch.linspace(0.5, 1.5, 64)).sum().backward()
        return kl.detach(), log_probs.grad

    expected = run(peer_utils.compute_approx_kl)
    actual = run(fastpo_openrlhf.compute_approx_kl)
    # OpenRLHF computes in float32 (log_probs.float()), and so does the adapter
    assert actual[0].dtype == expected[0].dtype == torch.float32
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_approx_kl_refuses_the_unbiased_gradient():
    lp = torch.zeros(3)
    with pytest.raises(ValueError, match="unbiased_gradient=True"):
        fastpo_openrlhf.compute_approx_kl(lp, lp, lp, kl_estimator="k3", unbiased_gradient=True)
    with pytest.raises(ValueError, match="kl_estimator='k4'"):
        fastpo_openrlhf.compute_approx_kl(lp, lp, kl_estimator="k4")


# ---------------------------------------------------------------------- the package


def test_version_outside_the_tested_range_raises(monkeypatch):
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.10.1")
    with pytest.raises(RuntimeError, match="installed openrlhf is 0.10.1"):
        fastpo_openrlhf.PolicyLoss()


def test_fastpo_imports_without_openrlhf():
    code = "import sys, fastpo.integrations.openrlhf; assert 'openrlhf' not in sys.modules, 'openrlhf imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
