"""Kahneman-Tversky Optimization on unary ``{"prompt", "completion", "label"}`` rows.

Each row is one completion labelled desirable (``label`` true) or undesirable; no pairs
are needed. With summed log-probs ``lp`` of the policy and ``lp_ref`` of the frozen
reference, ``fastpo.kernels.kto_loss`` (TRL's formulation) computes per example

* ``rw = lp - lp_ref``;
* ``z0 = max(0, mean(lp_kl - lp_ref_kl))`` over the micro-batch's mismatched pairs
  (``fastpo.kernels.kto_mismatched_pairs``: each prompt with the previous row's
  completion, as TRL rotates), detached: the policy's drift from the reference;
* desirable: ``desirable_weight * (1 - sigmoid(beta * (rw - z0)))``, undesirable:
  ``undesirable_weight * (1 - sigmoid(beta * (z0 - rw)))``.

The unit of the loss is the example (TRL averages the weighted losses over all examples
of the batch). ``batch_size`` must be at least 2 (a mismatched pair needs another row).
The reference is a frozen copy of the initial policy, kept for the run: the mismatched
pairs depend on the micro-batch, so their log-probs cannot be computed once per dataset.
A resumed run's reference is again the initial model, not the checkpoint.

Evaluation, before and after training, on held-out *pairs* (the built-in task's, or
``eval_data``: a file of ``{"prompt", "chosen", "rejected"}`` rows):
``preference_accuracy``: share of pairs whose implicit reward ``beta * (lp - lp_ref)``
(summed log-probs) is higher for the chosen (correct) answer, ties counting one half;
``heldout_accuracy``: exact-match accuracy of greedy answers on the held-out prompts.
"""

from __future__ import annotations

import copy

import torch

from fastpo.kernels import kto_loss, kto_mismatched_pairs

from ..config import KTOConfig
from ..data import load_rows
from ..forward import encode_responses
from ._common import (
    HELDOUT_SIZE,
    answer_rows,
    builtin_task,
    exact_match_accuracy,
    micro_batches,
    prepare_run,
    run_tasks,
    train_and_evaluate,
    training_rows,
)
from ._pairs import implicit_reward_accuracy, pair_logprobs, sequence_logprobs_of

__all__ = ["run"]


def run(config: KTOConfig, warm_start=None) -> dict:
    run_dir, model, tokenizer, device = prepare_run("kto", config, warm_start=warm_start)
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    rows = training_rows("kto", config, "unary")
    if config.eval_data is None:
        eval_rows = builtin_task(config).rows("pairwise", HELDOUT_SIZE, "heldout")
    else:
        eval_rows = load_rows(config.eval_data, "pairwise")
    exact_match_rows = answer_rows(config, eval_rows, "chosen")
    eval_ref_chosen, eval_ref_rejected = pair_logprobs(model, tokenizer, eval_rows, config.max_length, False)

    def collate(batch_rows):
        prompts, completions = [r["prompt"] for r in batch_rows], [r["completion"] for r in batch_rows]
        batch = encode_responses(tokenizer, prompts, completions, config.max_length)
        mismatched = kto_mismatched_pairs({"prompt": prompts, "completion": completions})
        batch["mismatched"] = encode_responses(
            tokenizer, mismatched["prompt"], mismatched["completion"], config.max_length
        )
        batch["desirable"] = torch.tensor([bool(r["label"]) for r in batch_rows])
        batch["num_units"] = len(batch_rows)
        return batch

    def loss_fn(model, batch):
        policy = sequence_logprobs_of(model, batch, average=False)
        with torch.no_grad():  # z0 and the reference receive no gradient
            ref = sequence_logprobs_of(reference, batch, average=False)
            policy_kl = sequence_logprobs_of(model, batch["mismatched"], average=False)
            ref_kl = sequence_logprobs_of(reference, batch["mismatched"], average=False)
        desirable = batch["desirable"].to(device)
        losses, rewards, z0 = kto_loss(
            policy,
            ref,
            desirable,
            policy_kl,
            ref_kl,
            beta=config.beta,
            desirable_weight=config.desirable_weight,
            undesirable_weight=config.undesirable_weight,
        )
        # signed_reward: the reward of desirable rows, minus that of undesirable ones.
        return losses.sum(), {
            "z0": z0 * len(losses),
            "signed_reward": torch.where(desirable, rewards, -rewards).sum(),
        }

    checkers = run_tasks(config)  # the verifiers of the held-out answers

    def evaluate(model):
        return {
            "preference_accuracy": implicit_reward_accuracy(
                model, tokenizer, eval_rows, (eval_ref_chosen, eval_ref_rejected), config, False
            ),
            "heldout_accuracy": exact_match_accuracy(model, tokenizer, exact_match_rows, tasks=checkers),
        }

    batches = micro_batches(rows, config.batch_size, config.seed, collate)
    return train_and_evaluate(model, tokenizer, config, loss_fn, batches, run_dir, evaluate)
