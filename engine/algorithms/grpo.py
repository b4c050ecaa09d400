"""Group Relative Policy Optimization (and RLOO, Dr.GRPO, DAPO, GSPO, CISPO, SAPO through
``loss_type``).

Each rollout: ``prompts_per_rollout`` prompts, ``num_generations`` (G) samples each;
the rewards of a prompt's G samples are normalized within the group by the estimator
``advantage`` of ``fastpo.kernels.ADVANTAGE_ESTIMATORS`` (``group_advantages``, with
``scale_rewards`` and ``advantage_eps``; ``rloo_advantages``; ``reinforce_pp_advantages``,
whitened over the rollout's tokens), and every token of a completion carries its
completion's advantage. The policy then takes
``num_iterations`` passes of optimizer steps over the rollout with the clipped
surrogate ``fastpo.kernels.policy_loss``: the ratio to the log-probs of the policy that
sampled (stored at rollout time when the rollout spans several optimizer steps; the
detached current log-probs otherwise, which are the same numbers), plus
``beta`` times the KL estimator to the frozen reference (loaded only when beta > 0),
the entropy bonus and quantile mask, and the rollout-mismatch correction.

Units: with ``token-mean`` aggregation the loss unit is the completion token (the
loop's accumulation then divides by the step's global token count, TRL's ``dapo``);
with the ``seq-mean-*`` modes it is the completion, each micro-batch's per-completion
mean multiplied back by its completion count, so micro-batches of any size average
correctly.

The ``policy_loss`` options are ``config.policy_loss_options()``: the kernel's
``PolicyLossOptions``, built from the config's fields (and so validated by the kernel's
rules when the config is built).

Logged per step: ``reward`` (mean over completions), ``completion_length``,
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
from ..forward import response_logprobs
from ._common import prepare_run, train_and_evaluate
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

    def logprobs_of(policy, batch, **options):
        return response_logprobs(
            policy, batch["input_ids"], batch["attention_mask"], batch["labels"],
            temperature=config.temperature, **options,
        )

    def make_rollout(index: int) -> list[dict]:
        rows = online.prompt_rows(index)
        rollout, rewards = online.sample(model, rows)
        estimator = ADVANTAGE_ESTIMATORS.get(config.advantage).params["function"]
        # What an estimator takes beyond the rewards and the group size.
        estimator_options = {"group": {"scale": config.scale_rewards, "eps": config.advantage_eps},
                             "reinforce_pp": {"mask": rollout.mask}}.get(config.advantage, {})
        advantages = estimator(rewards, config.num_generations, **estimator_options)
        tensors = {
            "input_ids": rollout.input_ids,
            "attention_mask": rollout.attention_mask,
            "labels": rollout.labels,
            "mask": rollout.mask,
            "advantages": advantages,
            "rollout_logprobs": rollout.rollout_logprobs,
            **{f"metric/{k}": v for k, v in online.rollout_metrics(rollout, rewards).items()},
        }
        with torch.no_grad(), training_precision(config, device):
            if store_old:
                tensors["old_logprobs"] = logprobs_of(model, tensors).cpu()
                tensors["mismatch"] = (tensors["old_logprobs"] - rollout.rollout_logprobs).abs() * rollout.mask
            if reference is not None:
                tensors["ref_logprobs"] = logprobs_of(reference, tensors).cpu()
        micro = split_micro_batches(tensors, config.batch_size, config.num_iterations)
        for batch in micro:
            batch["num_units"] = int(batch["mask"].sum()) if token_mean else batch["mask"].shape[0]
        return micro

    def loss_fn(model, batch):
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        out = logprobs_of(model, batch, return_entropy=need_entropy)
        logprobs, entropy = out if need_entropy else (out, None)
        old_logprobs = batch["old_logprobs"] if store_old else logprobs.detach()
        loss, stats = policy_loss(
            logprobs, old_logprobs, batch["advantages"], batch["mask"], options=loss_options,
            ref_logprobs=batch.get("ref_logprobs"), entropy=entropy,
            rollout_logprobs=batch["rollout_logprobs"] if config.rollout_is_cap is not None else None,
        )
        mask = batch["mask"]
        tokens = mask.sum()
        # Sampler against training forward, both with the sampling policy's weights.
        mismatch = batch["mismatch"] if store_old else (old_logprobs - batch["rollout_logprobs"]).abs() * mask
        mismatch = mismatch.sum()
        metrics = policy_loss_metrics(stats, tokens)
        metrics["logprob_mismatch"] = (mismatch, tokens)
        metrics.update(per_completion_metrics({k[7:]: v for k, v in batch.items() if k.startswith("metric/")}))
        return loss * batch["num_units"], metrics

    return train_and_evaluate(model, tokenizer, config, loss_fn, RolloutStream(make_rollout), run_dir, online.evaluate)
