"""fastpo.integrations.verl against the installed verl: every fastpo_* policy loss and
advantage estimator registered in verl's registries equals verl's built-in of the same
math on the same float64 inputs, called the way verl's trainer calls them (values,
gradients, metrics), and verl's use_fused_kernels model forwards compute with fastpo."""

import importlib.util
import subprocess
import sys

import numpy as np
import pytest
import torch

from peer_modules import verl_core_algos

if importlib.util.find_spec("verl") is None:
    pytest.skip("verl is not installed (make test installs it)", allow_module_level=True)
core_algos = verl_core_algos()
import fastpo.integrations.verl as fastpo_verl  # noqa: E402

from verl.trainer.config import AlgoConfig  # noqa: E402
from verl.workers.config import ActorConfig, PolicyLossConfig  # noqa: E402

LOSS_MODES = ("vanilla", "gspo", "cispo", "sapo")
AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
# global_batch_info as verl's ppo_loss sets it: one process without global counts, and
# two data-parallel ranks with the global token and sequence counts of the mini-batch
BATCH_INFOS = {
    "local": {"dp_size": 1, "batch_num_tokens": None, "global_batch_size": None, "loss_scale_factor": None},
    "global": {"dp_size": 2, "batch_num_tokens": 53, "global_batch_size": 11, "loss_scale_factor": 9},
}
# Lengths of the responses; the third is fully masked (verl's aggregations skip it).
LENGTHS = [7, 5, 0, 3, 6, 1]


@pytest.fixture(scope="module", autouse=True)
def registered():
    fastpo_verl.register()
    yield
    fastpo_verl.unregister()


def policy_inputs(per_sequence: bool):
    """float64 (B, T) log-probs with ratios on both sides of the clip range, one token
    whose log-ratio exceeds verl's clamp of 20 and one response whose mean log-ratio
    exceeds GSPO's cap of 10; finite garbage at masked positions."""
    gen = torch.Generator().manual_seed(1)
    B, T = len(LENGTHS), max(LENGTHS)
    mask = torch.arange(T) < torch.tensor(LENGTHS)[:, None]
    lp = -2.0 * torch.rand(B, T, generator=gen, dtype=torch.float64)
    old = lp + 0.4 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    old[0, 1] = lp[0, 1] - 25.0
    old[3, :3] = lp[3, :3] - 12.0
    if per_sequence:
        adv = torch.randn(B, 1, generator=gen, dtype=torch.float64).expand(B, T) * mask
        weights = torch.rand(B, 1, generator=gen, dtype=torch.float64).expand(B, T) * 2.0
    else:
        adv = torch.randn(B, T, generator=gen, dtype=torch.float64)
        weights = torch.rand(B, T, generator=gen, dtype=torch.float64) * 2.0
        weights[1, 2] = 0.0  # a token rejected by verl's rollout correction
    adv[3] = -adv[3].abs()  # the response beyond GSPO's cap is penalized: its ratio matters
    return {"lp": lp, "old": old, "adv": adv, "mask": mask, "weights": weights}


def actor_config(loss_mode, agg, batch_info):
    config = ActorConfig(
        strategy="fsdp", rollout_n=2, ppo_micro_batch_size_per_gpu=2,
        clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0,
        tau_pos=1.0, tau_neg=1.05, loss_agg_mode=agg, policy_loss=PolicyLossConfig(loss_mode=loss_mode),
    )
    config.global_batch_info.update(batch_info)
    return config


def call_like_actor(config, inputs, with_weights):
    """verl's ppo_loss: the registered loss of config.policy_loss.loss_mode, keywords as
    verl passes them; returns the loss, the gradient of the log-probs and the metrics."""
    log_prob = inputs["lp"].clone().requires_grad_()
    policy_loss_fn = core_algos.get_policy_loss_fn(config.policy_loss.get("loss_mode", "vanilla"))
    loss, metrics = policy_loss_fn(
        old_log_prob=inputs["old"],
        log_prob=log_prob,
        advantages=inputs["adv"],
        response_mask=inputs["mask"],
        loss_agg_mode=config.loss_agg_mode,
        config=config,
        rollout_is_weights=inputs["weights"] if with_weights else None,
    )
    loss.backward()
    return loss.detach(), log_prob.grad, metrics


def assert_same_loss(loss_mode, agg, batch_info, with_weights, rtol):
    inputs = policy_inputs(per_sequence=loss_mode == "gspo")
    expected, expected_grad, expected_metrics = call_like_actor(
        actor_config(loss_mode, agg, batch_info), inputs, with_weights
    )
    loss, grad, metrics = call_like_actor(actor_config(f"fastpo_{loss_mode}", agg, batch_info), inputs, with_weights)
    assert expected.abs() > 1e-3  # the inputs make a loss worth comparing
    torch.testing.assert_close(loss, expected, rtol=rtol, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=rtol, atol=1e-12)
    # verl's metrics that fastpo reproduces carry verl's names (CISPO's pg_clipfrac is
    # the exception: it counts ratios out of the band whatever the advantage's sign)
    shared = set(metrics) & set(expected_metrics)
    assert shared == set(expected_metrics) - ({"actor/pg_clipfrac"} if loss_mode == "cispo" else set())
    for name in shared:
        assert metrics[name] == pytest.approx(expected_metrics[name], rel=1e-7, abs=1e-12), name


# verl's seq-mean-token-mean (SAPO's whatever loss_agg_mode says) divides each
# response's sum by (n_i + 1e-8): a relative difference of at most 1e-8 from fastpo's n_i
def tolerance(loss_mode, agg):
    return 1e-7 if agg == "seq-mean-token-mean" or loss_mode == "sapo" else 1e-10


@pytest.mark.parametrize("batch_info", list(BATCH_INFOS))
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("loss_mode", LOSS_MODES)
def test_policy_loss_equals_verls(loss_mode, agg, batch_info):
    assert_same_loss(loss_mode, agg, BATCH_INFOS[batch_info], with_weights=False, rtol=tolerance(loss_mode, agg))


@pytest.mark.parametrize("loss_mode", LOSS_MODES)
def test_policy_loss_with_rollout_weights_equals_verls(loss_mode):
    """verl's rollout-correction weights (a rejected token among them) multiply the policy
    term; GSPO's are per sequence (fastpo_gspo requires it)."""
    assert_same_loss(
        loss_mode, "token-mean", BATCH_INFOS["global"], with_weights=True, rtol=tolerance(loss_mode, "token-mean")
    )


@pytest.mark.parametrize("loss_mode", ["vanilla", "gspo"])
def test_policy_loss_triton_backend_equals_verls(loss_mode, monkeypatch):
    """The same through fastpo's Triton kernel (the GPU path; here Triton's interpreter).
    Its clip bounds are fp32 scalars, hence the tolerance."""
    monkeypatch.setenv("FASTPO_BACKEND", "triton")
    assert_same_loss(loss_mode, "seq-mean-token-sum", BATCH_INFOS["global"], with_weights=False, rtol=1e-6)


def test_gspo_refuses_per_token_advantages():
    """verl's gspo is GSPO-token: its gradient at a token carries that token's advantage.
    fastpo's is the sequence-level GSPO gradient, equal only for per-sequence advantages."""
    inputs = policy_inputs(per_sequence=False)
    with pytest.raises(ValueError, match="advantages vary along response 0.*loss_mode=gspo"):
        call_like_actor(actor_config("fastpo_gspo", "token-mean", BATCH_INFOS["local"]), inputs, False)


def test_dp_size_without_global_counts_raises_like_verl():
    inputs = policy_inputs(per_sequence=False)
    info = dict(BATCH_INFOS["local"], dp_size=2)
    for mode in ("vanilla", "fastpo_vanilla"):
        with pytest.raises(ValueError, match="batch_num_tokens"):
            call_like_actor(actor_config(mode, "token-mean", info), inputs, False)


# ------------------------------------------------------------ advantage estimators


def outcome_inputs():
    """Sequence rewards on the last valid token of responses of 4 prompts in verl's
    shuffled row order (uids interleaved), groups of 3 and 2, one of equal rewards."""
    gen = torch.Generator().manual_seed(2)
    index = ["a", "b", "a", "c", "b", "d", "a", "c", "d", "d"]
    lengths = torch.tensor([4, 2, 5, 5, 3, 1, 5, 4, 2, 3])
    # float64 like the rewards: verl's whitening computes its Bessel factor in the mask's dtype
    mask = (torch.arange(5) < lengths[:, None]).to(torch.float64)
    scores = torch.randn(len(index), generator=gen, dtype=torch.float64)
    scores[[5, 8, 9]] = 0.5  # prompt d: all equal
    rewards = torch.zeros(len(index), 5, dtype=torch.float64)
    rewards[torch.arange(len(index)), lengths - 1] = scores
    return rewards, mask, np.array(index, dtype=object)


# verl's masked means divide by (count + 1e-8): whitened advantages differ from fastpo's
# by about 1e-9 relative (more where they are near 0)
WHITENED = {"rtol": 1e-7, "atol": 1e-9}


def call_like_trainer(name, rewards, mask, index, config):
    """verl's compute_advantage for a registered estimator: keywords as it passes them."""
    estimator = core_algos.get_adv_estimator_fn(name)
    return estimator(token_level_rewards=rewards, response_mask=mask, config=config, index=index)


@pytest.mark.parametrize("norm_by_std", [True, False])
def test_grpo_equals_verls(norm_by_std):
    rewards, mask, index = outcome_inputs()
    config = AlgoConfig(adv_estimator="fastpo_grpo", norm_adv_by_std_in_grpo=norm_by_std)
    expected, expected_returns = core_algos.compute_grpo_outcome_advantage(
        token_level_rewards=rewards, response_mask=mask, index=index, norm_adv_by_std_in_grpo=norm_by_std
    )
    advantages, returns = call_like_trainer("fastpo_grpo", rewards, mask, index, config)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(advantages, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(returns, expected_returns, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["rloo", "reinforce_plus_plus_baseline"])
def test_group_baseline_estimators_equal_verls(name):
    rewards, mask, index = outcome_inputs()
    config = AlgoConfig(adv_estimator=f"fastpo_{name}")
    expected = call_like_trainer(name, rewards, mask, index, config)
    actual = call_like_trainer(f"fastpo_{name}", rewards, mask, index, config)
    assert expected[0].abs().max() > 0.1
    tolerance = WHITENED if name == "reinforce_plus_plus_baseline" else {"rtol": 1e-12, "atol": 1e-12}
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want, **tolerance)


@pytest.mark.parametrize("name", ["grpo", "rloo", "reinforce_plus_plus_baseline"])
def test_group_of_one_raises(name):
    """verl leaves a lone response's score without a baseline; fastpo has none to give
    and says so rather than train on something else."""
    rewards, mask, index = outcome_inputs()
    index[5] = "lone"
    with pytest.raises(ValueError, match="index 'lone' has one response"):
        call_like_trainer(f"fastpo_{name}", rewards, mask, index, AlgoConfig())


def token_reward_inputs():
    """Per-token rewards and values, masks with holes (multi-turn observations)."""
    gen = torch.Generator().manual_seed(3)
    B, T = 4, 6
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[0, 4:] = 0
    mask[1, 1:3] = 0  # a hole
    mask[2, 0] = 0
    mask[3, 2:] = 0
    rewards = torch.randn(B, T, generator=gen, dtype=torch.float64)
    values = torch.randn(B, T, generator=gen, dtype=torch.float64)
    return rewards, values, mask


def test_reinforce_plus_plus_equals_verls():
    rewards, _, mask = token_reward_inputs()
    config = AlgoConfig(adv_estimator="fastpo_reinforce_plus_plus", gamma=0.9)
    expected = core_algos.compute_reinforce_plus_plus_outcome_advantage(rewards, mask, config=config)
    actual = call_like_trainer("fastpo_reinforce_plus_plus", rewards, mask, None, config)
    torch.testing.assert_close(actual[0], expected[0], **WHITENED)
    torch.testing.assert_close(actual[1], expected[1], rtol=1e-12, atol=1e-12)


def test_gae_equals_verls():
    """Equal on the valid tokens (verl leaves values at masked positions, which its losses
    mask out; fastpo zeroes them)."""
    rewards, values, mask = token_reward_inputs()
    expected = core_algos.compute_gae_advantage_return(rewards, values, mask, gamma=0.95, lam=0.8)
    actual = core_algos.get_adv_estimator_fn("fastpo_gae")(
        token_level_rewards=rewards, values=values, response_mask=mask, gamma=0.95, lam=0.8
    )
    valid = mask.bool()
    torch.testing.assert_close(actual[0][valid], expected[0][valid], **WHITENED)
    torch.testing.assert_close(actual[1][valid], expected[1][valid], rtol=1e-12, atol=1e-12)
    assert (actual[0][~valid] == 0).all() and (actual[1][~valid] == 0).all()


def test_gae_through_the_trainer_needs_replace_gae():
    """verl's trainer passes the critic's values only to its own gae: fastpo_gae called as
    a registered estimator says how to get there; register(replace_gae=True) makes the
    trainer's gae fastpo's."""
    rewards, values, mask = token_reward_inputs()
    with pytest.raises(ValueError, match="replace_gae=True"):
        call_like_trainer("fastpo_gae", rewards, mask, None, AlgoConfig(adv_estimator="fastpo_gae"))
    builtin = core_algos.compute_gae_advantage_return
    fastpo_verl.register(replace_gae=True)
    try:
        assert core_algos.compute_gae_advantage_return is fastpo_verl.compute_gae_advantage_return
        advantages, _ = core_algos.compute_gae_advantage_return(rewards, values, mask, gamma=1.0, lam=1.0)
        expected, _ = builtin(rewards, values, mask, gamma=1.0, lam=1.0)
        torch.testing.assert_close(advantages[mask.bool()], expected[mask.bool()], **WHITENED)
    finally:
        fastpo_verl.unregister()
        fastpo_verl.register()
    assert core_algos.compute_gae_advantage_return is builtin


# ------------------------------------------------------------------ fused kernels


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=67, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1,
    )
    return Qwen2ForCausalLM(config)


@pytest.mark.parametrize("verl_backend", ["torch", "triton"])
def test_fused_kernels_forward_runs_fastpo(tiny_model, verl_backend, monkeypatch):
    """verl's use_fused_kernels forward of a Qwen2 model (dense_common, the function verl
    patches onto the model class) returns fastpo's log-probs and entropy, equal with their
    gradients to verl's own torch implementation (FusedLinearForPPOFunction)."""
    from verl.models.transformers import dense_common
    from verl.utils.experimental.torch_functional import FusedLinearForPPOFunction

    import fastpo.kernels

    calls = []
    fastpo_op = fastpo.kernels.linear_token_logprobs
    monkeypatch.setattr(fastpo.kernels, "linear_token_logprobs", lambda *a, **k: calls.append(1) or fastpo_op(*a, **k))
    forward = getattr(dense_common, f"forward_with_{verl_backend}_backend")
    input_ids = torch.randint(0, 67, (2, 9), generator=torch.Generator().manual_seed(4))
    weights = torch.randn(2, 2, 9, generator=torch.Generator().manual_seed(5))

    def run(compute):
        tiny_model.zero_grad()
        log_probs, entropy = compute()
        ((log_probs * weights[0]).sum() + (entropy * weights[1]).sum()).backward()
        return log_probs.detach(), entropy.detach(), [p.grad.clone() for p in tiny_model.parameters()]

    def verls():
        hidden = tiny_model.model(input_ids=input_ids)[0]
        labels = torch.roll(input_ids, shifts=-1, dims=-1)
        return FusedLinearForPPOFunction.apply(hidden, tiny_model.lm_head.weight, labels, 0.7, 512)

    def through_verl():
        out = forward(tiny_model, input_ids=input_ids, return_dict=True, temperature=0.7)
        return out.log_probs, out.entropy

    expected = run(verls)
    actual = run(through_verl)
    assert calls, "verl's forward did not call fastpo"
    for got, want in zip(actual[:2], expected[:2]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for got, want in zip(actual[2], expected[2]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_linear_cross_entropy_refuses_what_it_does_not_cover():
    from verl.utils.kernel import linear_cross_entropy as module

    hidden, weight, labels = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="reduction='mean'"):
        module.linear_cross_entropy(hidden, weight, labels, 1.0, "mean")
    with pytest.raises(ValueError, match="dist_process_group"):
        module.linear_cross_entropy(hidden, weight, labels, 1.0, "none", object())


# ------------------------------------------------------------------- the package


def test_version_outside_the_tested_range_raises(monkeypatch):
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.8.5")
    with pytest.raises(RuntimeError, match="installed verl is 0.8.5"):
        fastpo_verl.register()


def test_unregister_restores_verl():
    from verl.utils.experimental import torch_functional

    assert torch_functional.FusedLinearForPPO is fastpo_verl.FusedLinearForPPO
    fastpo_verl.unregister()
    try:
        assert torch_functional.FusedLinearForPPO is not fastpo_verl.FusedLinearForPPO
        assert not any(name.startswith("fastpo_") for name in core_algos.POLICY_LOSS_REGISTRY)
        assert not any(name.startswith("fastpo_") for name in core_algos.ADV_ESTIMATOR_REGISTRY)
    finally:
        fastpo_verl.register()


def test_fastpo_imports_without_verl():
    """Importing the integration does not import verl (register() does)."""
    code = "import sys, fastpo.integrations.verl; assert 'verl' not in sys.modules, 'verl imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
