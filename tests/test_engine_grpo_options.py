"""``fastpo grpo`` reaches what fastpo.kernels offers: every advantage estimator of
``ADVANTAGE_ESTIMATORS`` (its call built from its registered arguments, each checked
against an independent construction from the rollout), every ``PolicyLossOptions``
field as a config option, the rollout corrections with the sampler's log-probs, and
training log-probs under the sampler's top-k truncation."""

import dataclasses
import importlib
import inspect
import json
import math
import types

import pytest
import torch
from cli_checks import fails_in_one_line

from fastpo.engine import cli
from fastpo.engine.algorithms import grpo
from fastpo.engine.config import ConfigError, GRPOConfig, format_help
from fastpo.engine.forward import IGNORE_INDEX, greedy_completions, response_logprobs
from fastpo.engine.models import load_causal_lm
from fastpo.kernels import ADVANTAGE_ESTIMATORS, PolicyLossOptions
from fastpo.kernels.registry import Registry
from grpo_runs import record_rollouts

G = 4
# one step on one rollout of 4 prompts x 4 completions; evaluation on two prompts
QUICK = ["steps=1", "batch_size=16", "grad_accum_steps=1", "prompts_per_rollout=4", f"num_generations={G}",
         "warmup_steps=1", "log_every=1", "eval_every=0", "warm_start_steps=0", "max_new_tokens=4",
         "rewards=test_engine_grpo_options:digit_reward,test_engine_grpo_options:length_reward",
         "reward_weights=1,0.5"]
WEIGHTS = torch.tensor([1.0, 0.5])
OUTCOME = [v.name for v in ADVANTAGE_ESTIMATORS if not v.params["needs_values"]]
# What a rollout provides to an estimator (ADVANTAGE_ESTIMATORS' params["arguments"]).
ARGUMENTS = {"rewards", "group_size", "mask", "token_rewards", "reward_components", "baseline_rewards",
             "old_logprobs", "log_sum_sq_probs", "values"}

SCORED = []  # (source, prompts, completions, values) of every reward call


def _scored_calls() -> list:
    """``SCORED`` of the module the engine's ``rewards=`` spec imports,
    ``test_engine_grpo_options``: pytest may have imported this file under another name."""
    return importlib.import_module("test_engine_grpo_options").SCORED


def digit_reward(prompts, completions, **fields):
    """Share of a completion's characters that are digits: a dense reward."""
    values = [sum(ch.isdigit() for ch in c) / len(c) if c else 0.0 for c in completions]
    SCORED.append(("digits", list(prompts), list(completions), values))
    return values


def length_reward(prompts, completions, **fields):
    """A second reward source: the completion's length, capped at 4 characters."""
    values = [min(len(c), 4) / 4 for c in completions]
    SCORED.append(("length", list(prompts), list(completions), values))
    return values


def _spying(calls: list) -> Registry:
    """ADVANTAGE_ESTIMATORS with each function recording ``(args, kwargs, out)``."""
    registry = Registry(ADVANTAGE_ESTIMATORS.name, ADVANTAGE_ESTIMATORS.option)
    for variant in ADVANTAGE_ESTIMATORS:
        def spy(*args, _function=variant.params["function"], **kwargs):
            out = _function(*args, **kwargs)
            calls.append((args, kwargs, out))
            return out

        params = types.MappingProxyType({**variant.params, "function": spy})
        registry.add(dataclasses.replace(variant, params=params))
    return registry


def _run(tmp_path, monkeypatch, *overrides):
    """``fastpo grpo QUICK overrides`` in this process: the estimator's calls, the
    rollout tensors the loss trains on, the logged records and the greedy completions."""
    calls, greedy = [], []
    monkeypatch.setattr(grpo, "ADVANTAGE_ESTIMATORS", _spying(calls))
    rollouts = record_rollouts(monkeypatch)
    real_greedy = grpo.greedy_completions
    monkeypatch.setattr(grpo, "greedy_completions", lambda *a, **k: greedy.append(real_greedy(*a, **k)) or greedy[-1])
    _scored_calls().clear()
    eval_file = tmp_path / "heldout.jsonl"
    eval_file.write_text('{"prompt": "12+34="}\n{"prompt": "1+2="}\n')
    run_dir = tmp_path / "run"
    assert cli.main(["grpo", *QUICK, f"eval_data={eval_file}", f"output_dir={run_dir}", *overrides]) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(calls) == 1 and len(rollouts) == 1
    return calls[0], rollouts[0], records, greedy


def _eager(rollout):
    """Float64 log-probs of the sampled tokens and log sum_v p_v**2 under the initial
    builtin:tiny policy (seed 0, no warm start: the policy that sampled the rollout)."""
    model, _ = load_causal_lm("builtin:tiny", seed=0)
    with torch.no_grad():
        logits = model(input_ids=rollout["input_ids"], attention_mask=rollout["attention_mask"]).logits.double()
    logprobs = logits.log_softmax(-1)
    targets = rollout["labels"].clamp(min=0)[..., None]
    return logprobs.gather(-1, targets).squeeze(-1), (2 * logprobs).exp().sum(-1).log()


def _scored(size):
    """The (size, 2) rewards of the reward call that scored ``size`` completions, with
    its prompts and completions."""
    found = {source: (prompts, texts, values) for source, prompts, texts, values in _scored_calls()
             if len(texts) == size}
    (prompts, texts, digits), (_, texts_again, lengths) = found["digits"], found["length"]
    assert texts == texts_again
    return torch.tensor([digits, lengths]).T, prompts, texts


@pytest.mark.parametrize("name", OUTCOME)
def test_every_estimator_trains_on_the_arguments_it_declares(name, tmp_path, monkeypatch):
    (args, kwargs, out), rollout, records, greedy = _run(tmp_path, monkeypatch, f"advantage={name}")
    variant = ADVANTAGE_ESTIMATORS.get(name)
    mask = rollout["mask"]
    rewards = rollout["metric/reward"]
    components, _, _ = _scored(mask.shape[0])
    torch.testing.assert_close(rewards, (components * WEIGHTS).sum(-1))
    lengths = mask.sum(-1).tolist()
    assert min(lengths) >= 1
    assert len(args) == len(variant.params["arguments"])
    for argument, value in zip(variant.params["arguments"], args):
        if argument == "rewards":
            assert torch.equal(value, rewards)
        elif argument == "group_size":
            assert value == G
        elif argument == "mask":
            assert torch.equal(value, mask)
        elif argument == "token_rewards":  # the reward on each completion's last token
            expected = torch.zeros(mask.shape)
            for row in range(mask.shape[0]):
                last = [t for t in range(mask.shape[1]) if mask[row, t]][-1]
                expected[row, last] = rewards[row]
            assert torch.equal(value, expected)
        elif argument == "reward_components":
            assert torch.equal(value, components)
        elif argument == "baseline_rewards":  # each prompt's greedy completion, scored
            baseline, prompts, texts = _scored(mask.shape[0] // G)
            model, tokenizer = load_causal_lm("builtin:tiny", seed=0)
            assert greedy == [greedy_completions(model, tokenizer, prompts, max_new_tokens=4)] == [texts]
            torch.testing.assert_close(value, (baseline * WEIGHTS).sum(-1).repeat_interleave(G))
        elif argument in ("old_logprobs", "log_sum_sq_probs"):
            eager = dict(zip(("old_logprobs", "log_sum_sq_probs"), _eager(rollout)))[argument]
            torch.testing.assert_close(value[mask].double(), eager[mask], rtol=0, atol=1e-4)
        else:
            raise AssertionError(f"{name} declares {argument!r}, which the test does not know")
    options = {"scale_rewards": "group", "advantage_eps": 1e-4, "reward_weights": [1.0, 0.5]}
    assert kwargs == {keyword: options[option] for keyword, option in variant.params["options"].items()}
    # the advantages the loss trains on are the estimator's (a token-level one's per token)
    assert torch.equal(rollout["advantages"], out[0] if isinstance(out, tuple) else out)
    assert rollout["advantages"].abs().sum() > 0 and math.isfinite(records[0]["reward"])


def test_every_estimator_declares_its_call():
    """The registered arguments and options match each function's signature; the GRPO
    config's choices are the registry's critic-free estimators, its options real ones."""
    fields = {f.name for f in dataclasses.fields(GRPOConfig)}
    for variant in ADVANTAGE_ESTIMATORS:
        parameters = inspect.signature(variant.params["function"]).parameters.values()
        positional = [p.name for p in parameters if p.kind == p.POSITIONAL_OR_KEYWORD]
        keywords = {p.name for p in parameters if p.kind == p.KEYWORD_ONLY}
        arguments, options = variant.params["arguments"], variant.params["options"]
        assert set(arguments) <= ARGUMENTS and len(arguments) == len(positional), variant.name
        assert set(options) <= keywords and set(options.values()) <= fields, variant.name
        assert variant.params["needs_values"] == ("values" in arguments)
    assert f"advantage (one of {', '.join(OUTCOME)}," in format_help("grpo")
    assert set(OUTCOME) == set(ADVANTAGE_ESTIMATORS.names()) - {"gae"}


def test_every_policy_loss_option_is_a_grpo_option_with_the_kernel_default():
    config, kernel = GRPOConfig(), PolicyLossOptions()
    text = format_help("grpo")
    for name in set(PolicyLossOptions.field_names()) - {"kl_coef", "max_len"}:
        assert hasattr(config, name), f"PolicyLossOptions.{name} is not a GRPOConfig option"
        assert getattr(config, name) == getattr(kernel, name), name
        assert f"  {name} (" in text, name
    assert config.policy_loss_options() == kernel


@pytest.mark.parametrize("options, needs", [
    ({}, False), ({"rollout_is": "sequence"}, False), ({"rollout_is_cap": 2.0}, True),
    ({"rollout_is_min": 0.5}, True), ({"rollout_is_mode": "mask"}, True),
    ({"rollout_rs": "token_k1", "rollout_rs_max": 2.0}, True), ({"off_policy_mask_threshold": 0.5}, True),
])
def test_needs_rollout_logprobs(options, needs):
    assert PolicyLossOptions(**options).needs_rollout_logprobs is needs


@pytest.mark.parametrize("args, names", [
    (["advantage=grpoo"], ["option 'advantage'", "'grpoo'", ", ".join(OUTCOME)]),
    (["advantage=gdpo", "scale_rewards=batch"], ["option 'scale_rewards'", "'batch'", "advantage=gdpo",
                                                 "('group', 'none')"]),
    (["advantage=rloo", "num_generations=1", "batch_size=8"], ["option 'advantage'", "'rloo'",
                                                                "num_generations=1", "group_size >= 2"]),
    (["advantage=optimal_token_baseline", "top_k=5"], ["option 'advantage'", "top_k=5", "top_k=0"]),
    (["rollout_rs=seq_k3"], ["option 'rollout_rs'", "'seq_k3'", "seq_mean_k3"]),
    (["rollout_rs=seq_mean_k3"], ["option 'rollout_rs'", "needs rollout_rs_max"]),
    (["rollout_rs=seq_mean_k3", "rollout_rs_max=0.01"], ["option 'rollout_rs'", "unbounded", "rollout_is_cap"]),
    (["off_policy_mask_threshold=0.5"], ["option 'off_policy_mask_threshold'", "0.5", "rollout_is_weight=none"]),
    (["rollout_is_gating=tv"], ["option 'rollout_is_gating'", "'tv'", "rollout_is_mode='mask'"]),
    (["loss_type=dro"], ["option 'dro_beta'", "loss_type='dro' needs dro_beta"]),
    (["cispo_ratio_min=0.5"], ["option 'cispo_ratio_min'", "0.5", "loss_type='cispo' only"]),
    (["seq_log_ratio_cap=10"], ["option 'seq_log_ratio_cap'", "sequence ratio only"]),
])
def test_bad_grpo_options_fail_in_one_line(args, names, tmp_path, capsys):
    line = fails_in_one_line(["grpo", *args], capsys, run_dir=tmp_path / "run")
    for name in names:
        assert name in line, (name, line)


def test_a_good_rollout_correction_config_is_accepted():
    config = GRPOConfig(rollout_rs="seq_mean_k3", rollout_rs_max=0.01, rollout_is_mode="mask",
                        rollout_is_weight="none", off_policy_mask_threshold=0.5)
    assert config.policy_loss_options().needs_rollout_logprobs
    with pytest.raises(ConfigError, match="option 'scale_rewards'.*advantage=grpo_passk"):
        GRPOConfig(advantage="grpo_passk", scale_rewards="batch")


def test_training_logprobs_are_the_samplers_under_top_k(tmp_path, monkeypatch):
    """With top_k the stored old log-probs equal the rollout's (the same truncated
    distribution), not the untruncated ones, and every rollout correction gets the
    sampler's log-probs and reports its mask or weight."""
    (_, _, _), rollout, records, _ = _run(
        tmp_path, monkeypatch, "top_k=5", "num_iterations=2", "rollout_is_mode=mask", "rollout_is_min=0.5",
        "rollout_is_cap=2", "rollout_rs=token_k3", "rollout_rs_max=1", "off_policy_mask_threshold=1",
    )
    mask = rollout["mask"]
    old, sampled = rollout["old_logprobs"], rollout["rollout_logprobs"]
    torch.testing.assert_close(old[mask], sampled[mask], rtol=0, atol=2e-5)
    untruncated = response_logprobs(load_causal_lm("builtin:tiny", seed=0)[0], rollout["input_ids"],
                                    rollout["attention_mask"], rollout["labels"])
    gap = (old - untruncated)[mask]  # the log of the kept mass: the ratio's bias without truncation
    assert (gap >= -1e-5).all() and gap.min() > 0.1, gap
    assert (rollout["labels"][~mask] == IGNORE_INDEX).all()
    assert records[0]["logprob_mismatch"] < 1e-4
    for key in ("rollout_is_weight_mean", "rollout_is_filtered_frac", "rollout_rs_masked_frac",
                "off_policy_masked_frac", "outside_kept_set_frac"):
        assert key in records[0], key
    assert records[0]["outside_kept_set_frac"] == 0.0
    assert records[0]["rollout_is_weight_mean"] == pytest.approx(1.0, abs=1e-4)
