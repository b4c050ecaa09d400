"""Group Relative Policy Optimization (and RLOO, Dr.GRPO, DAPO, GSPO, CISPO, SAPO through
``loss_type``).

Each rollout: ``prompts_per_rollout`` prompts, ``num_generations`` (G) samples each;
the advantages come from the estimator ``advantage`` of
``fastpo.kernels.ADVANTAGE_ESTIMATORS``, called with the arguments its entry declares
(``arguments``: the rewards, the group size, the mask, the reward on each completion's
last token, each reward source's rewards, the greedy completion's reward, the sampling
policy's log-probs and ``log sum_v p_v**2``), each built from the rollout only when
declared, and its ``options`` from the config (``scale_rewards``, ``advantage_eps``,
``reward_weights``). A sequence estimator's advantage is carried by every token of its
completion; a token-level one's are per token. The policy then takes
``num_iterations`` passes of optimizer steps over the rollout with the clipped
surrogate ``fastpo.kernels.policy_loss``: the ratio to the log-probs of the policy that
sampled (stored at rollout time when the rollout spans several optimizer steps; the
detached current log-probs otherwise, which are the same numbers), plus
``beta`` times the KL estimator to the frozen reference (loaded only when beta > 0),
the entropy bonus and quantile mask, and the rollout-mismatch corrections (given the
sampler's log-probs whenever the options ask for them).

With ``top_k``/``top_p`` the policy's log-probs (old and current) are those of the
truncated distribution the rollout sampled from, as the rollout records them; a sampled
token outside the current kept set (log-prob -inf) leaves the mask, logged as
``outside_kept_set_frac``.

Units: with ``token-mean`` aggregation the loss unit is the completion token (the
loop's accumulation then divides by the step's global token count, TRL's ``dapo``);
with the ``seq-mean-*`` modes it is the completion, each micro-batch's per-completion
mean multiplied back by its completion count, so micro-batches of any size average
correctly.

The ``policy_loss`` options are ``config.policy_loss_options()``: the kernel's
``PolicyLossOptions``, built from the config's fields (and so validated by the kernel's
rules when the config is built).

``rollout=tree`` samples each prompt's group as a tree of ``num_generations`` leaves that
share prefixes and trains on TreeRL's per-token advantages
(``fastpo.engine.tree_rollout.grpo_tree_rollout``; docs/reasoning.md).

Logged per step: ``reward`` (mean over completions), ``completion_length``,
``generated_tokens`` (tokens decoded per completion: a tree leaf's beyond its shared prefix; the run's
summary has their total over every session and rank, the budget that compares rollouts),
``truncated``, ``logprob_mismatch`` (mean ``|lp_train - lp_rollout|`` over tokens: the
sampler and the training forward disagree by this much), and ``policy_loss``'s
metrics (``clip_frac_low``/``high``, ``ratio_mean``, ``approx_kl``, ``ref_kl``,
``entropy_mean``: means over the step's tokens; ``ratio_max``: the step's maximum).
"""

from __future__ import annotations

import copy

import torch

from fastpo.kernels import ADVANTAGE_ESTIMATORS, policy_loss

from ..config import GRPOConfig
from ..forward import greedy_completions, response_logprobs
from ..tree_rollout import grpo_tree_rollout
from ._common import prepare_run
from ._online import (
    OnlineRun,
    RolloutStream,
    per_completion_metrics,
    policy_loss_metrics,
    split_micro_batches,
    training_precision,
)

__all__ = ["run"]


def run(config: GRPOConfig, warm_start=None) -> dict:
    run_dir, model, tokenizer, device = prepare_run("grpo", config, warm_start=warm_start)
    online = OnlineRun("grpo", config, tokenizer, device)
    reference = copy.deepcopy(model).eval().requires_grad_(False) if config.beta > 0 else None
    # The sampling policy's log-probs are needed only when the rollout spans several
    # optimizer steps; with one, they equal the detached current log-probs.
    store_old = config.steps_per_pass * config.num_iterations > 1
    loss_options = config.policy_loss_options()
    token_mean = loss_options.resolved_agg == "token-mean"
    need_entropy = config.entropy_coef > 0 or config.entropy_quantile is not None
    estimator = ADVANTAGE_ESTIMATORS.get(config.advantage)
    # The policy's log-probs are those of the distribution the rollout sampled from (top-k
    # and top-p renormalized over the kept set, as the rollout records them), so that the
    # ratio to the sampler's log-probs carries no log of the kept mass. The reference's
    # are untruncated: the KL term estimates KL(sampler || reference), finite wherever
    # the sampler draws.
    truncation = {"top_k": config.top_k, "top_p": config.top_p}
    truncated_sampling = config.top_k > 0 or config.top_p < 1

    def logprobs_of(policy, batch, **options):
        return response_logprobs(
            policy, batch["input_ids"], batch["attention_mask"], batch["labels"],
            temperature=config.temperature, **options,
        )

    def greedy_rewards(rows: list[dict]) -> torch.Tensor:
        """(B,) ReMax's baseline of each row: the reward of its prompt's greedy completion
        (one per group), cut at the stop strings as the samples are."""
        firsts = rows[:: config.num_generations]
        prompts = [row["prompt"] for row in firsts]
        completions = greedy_completions(model, tokenizer, prompts, config.max_new_tokens,
                                         stop_strings=config.stop_strings)
        return online.rewards(prompts, completions, firsts).repeat_interleave(config.num_generations)

    def estimate_advantages(rows, rollout, rewards, components, sampling) -> torch.Tensor:
        """The estimator's advantages: its arguments (the names its ADVANTAGE_ESTIMATORS
        entry declares) built from the rollout, only those it takes; its options from the
        config. A (B,) or (B, T) tensor: a token-level estimator's advantages per token."""
        inputs = {
            "rewards": lambda: rewards,
            "group_size": lambda: config.num_generations,
            "mask": lambda: rollout.mask,
            "token_rewards": lambda: last_token_rewards(rewards, rollout.mask),
            "reward_components": lambda: components,
            "baseline_rewards": lambda: greedy_rewards(rows),
            "old_logprobs": lambda: sampling["old_logprobs"],
            "log_sum_sq_probs": lambda: sampling["log_sum_sq_probs"],
        }
        options = {keyword: getattr(config, name) for keyword, name in estimator.params["options"].items()}
        out = estimator.params["function"](*(inputs[name]() for name in estimator.params["arguments"]), **options)
        return out[0] if isinstance(out, tuple) else out

    def make_rollout(index: int) -> list[dict]:
        rows = online.prompt_rows(index)
        tree = grpo_tree_rollout(model, tokenizer, rows, online.rewards, config) if config.rollout == "tree" else None
        if tree is None:
            rollout, components = online.sample_components(model, rows)
            rewards = online.rewards.combine(components)
        else:
            rollout, rewards, components = tree.rollout, tree.rewards, None
        tensors = {
            "input_ids": rollout.input_ids,
            "attention_mask": rollout.attention_mask,
            "labels": rollout.labels,
            "mask": rollout.mask,
            "rollout_logprobs": rollout.rollout_logprobs,
            **{f"metric/{k}": v for k, v in online.rollout_metrics(rollout, rewards).items()},
            "metric/generated_tokens": rollout.mask.sum(-1).float() if tree is None else tree.generated,
        }
        stream.count_generated(int(tensors["metric/generated_tokens"].sum()))  # every process holds the whole rollout
        sampling = {}
        with torch.no_grad(), training_precision(config, device):
            if "log_sum_sq_probs" in estimator.params["arguments"]:
                # the sampling policy's log-probs and log sum_v p_v**2, from one forward
                # (the config refuses top-k/top-p here: the statistic is untruncated)
                old, _, statistics = logprobs_of(model, tensors, statistics=("log_sum_sq_probs",))
                sampling = {"old_logprobs": old.cpu(), "log_sum_sq_probs": statistics["log_sum_sq_probs"].cpu()}
            if store_old:
                old = sampling["old_logprobs"] if sampling else logprobs_of(model, tensors, **truncation).cpu()
                tensors["old_logprobs"] = old
                kept = rollout.mask & old.isfinite()  # see loss_fn: a token outside the kept set
                tensors["mismatch"] = torch.where(kept, old - rollout.rollout_logprobs, 0.0).abs()
            if reference is not None:
                tensors["ref_logprobs"] = logprobs_of(reference, tensors).cpu()
        tensors["advantages"] = (
            tree.advantages if tree is not None else estimate_advantages(rows, rollout, rewards, components, sampling)
        )
        micro = split_micro_batches(tensors, config.batch_size, config.num_iterations)
        for batch in micro:
            batch["num_units"] = int(batch["mask"].sum()) if token_mean else batch["mask"].shape[0]
        return micro

    def loss_fn(model, batch):
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        out = logprobs_of(model, batch, return_entropy=need_entropy, **truncation)
        logprobs, entropy = out if need_entropy else (out, None)
        old_logprobs = batch["old_logprobs"] if store_old else logprobs.detach()
        mask = batch["mask"]
        if truncated_sampling:
            # A sampled token outside the current (or the sampling) policy's kept set (it
            # left the top-k / top-p set after an update, or sits on its boundary) has
            # log-prob -inf, probability 0 and no gradient: it leaves the loss's mask.
            valid = mask
            mask = valid & logprobs.detach().isfinite() & old_logprobs.isfinite()
        loss, stats = policy_loss(
            logprobs, old_logprobs, batch["advantages"], mask, options=loss_options,
            ref_logprobs=batch.get("ref_logprobs"), entropy=entropy,
            rollout_logprobs=batch["rollout_logprobs"] if loss_options.needs_rollout_logprobs else None,
        )
        tokens = mask.sum()
        # Sampler against training forward, both with the sampling policy's weights.
        if store_old:
            mismatch = batch["mismatch"].sum()
        else:
            mismatch = torch.where(mask, old_logprobs - batch["rollout_logprobs"], 0.0).abs().sum()
        metrics = policy_loss_metrics(stats, tokens)
        metrics["logprob_mismatch"] = (mismatch, tokens)
        if truncated_sampling:
            metrics["outside_kept_set_frac"] = ((valid & ~mask).sum(), valid.sum())
        metrics.update(per_completion_metrics({k[7:]: v for k, v in batch.items() if k.startswith("metric/")}))
        return loss * batch["num_units"], metrics

    stream = RolloutStream(make_rollout)
    return online.train(model, loss_fn, stream, run_dir)


def last_token_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T): each row's reward on its last valid token, 0 elsewhere (verl's
    ``token_level_rewards`` of an outcome reward), the input of the token-level
    estimators."""
    last = torch.where(mask, torch.arange(mask.shape[1]), -1).amax(-1)
    token_rewards = torch.zeros(mask.shape, dtype=rewards.dtype)
    rows = (last >= 0).nonzero().squeeze(-1)
    token_rewards[rows, last[rows]] = rewards[rows]
    return token_rewards
