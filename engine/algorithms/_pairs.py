"""The run shared by the reference-based pairwise algorithms (dpo, ipo) and the pieces of
it that kto reuses: pair encoding, sequence log-probs, the frozen reference's log-probs
computed once per dataset, and held-out preference accuracy.

``train_on_pairs(algorithm, config, pair_loss)`` trains on ``{"prompt", "chosen",
"rejected"}`` rows; the algorithm module supplies only ``pair_loss(chosen, rejected,
ref_chosen, ref_rejected) -> (losses, chosen_rewards, rejected_rewards)``, the
``fastpo.kernels`` call that is its math. The unit of the loss is the pair.

The reference is the initial policy, frozen: its log-probs of every training and
held-out response are computed once, under ``no_grad``, before the first update (the
values a frozen copy would give at every step, without keeping the copy in memory). A
resumed run recomputes them from the initial model, not from the checkpoint.

Evaluation, before and after training:
``preference_accuracy``: share of held-out pairs whose implicit reward
``beta * (lp - lp_ref)`` is higher for the chosen response; ties count one half, so the
untrained policy (equal to its reference) scores exactly 0.5, chance.
``heldout_accuracy``: exact-match accuracy of greedy answers on the held-out prompts
(the built-in task's, the same as sft's; or the eval rows' prompts, the chosen
response being the answer).
"""

from __future__ import annotations

from typing import Callable

import torch

from fastpo.kernels import sequence_logprobs

from ..forward import IGNORE_INDEX, encode_responses, response_logprobs
from ._common import (
    answer_rows,
    exact_match_accuracy,
    heldout_rows,
    micro_batches,
    prepare_run,
    train_and_evaluate,
    training_rows,
)

__all__ = [
    "encode_pairs",
    "implicit_reward_accuracy",
    "pair_logprobs",
    "ranked_first",
    "sequence_logprobs_of",
    "train_on_pairs",
]

_REFERENCE_BATCH = 64  # rows per forward pass when computing reference log-probs


def encode_pairs(tokenizer, rows, max_length):
    """Chosen responses in rows ``0..B-1``, rejected ones in ``B..2B-1``."""
    prompts = [r["prompt"] for r in rows]
    return encode_responses(
        tokenizer, prompts + prompts, [r["chosen"] for r in rows] + [r["rejected"] for r in rows], max_length
    )


def sequence_logprobs_of(model, batch, average):
    """Per-row response log-probs ``(B,)``, summed over tokens or averaged (``average``)."""
    token_lp = response_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    return sequence_logprobs(token_lp, (batch["labels"] != IGNORE_INDEX).to(token_lp.device), average=average)


@torch.no_grad()
def pair_logprobs(model, tokenizer, rows, max_length, average) -> tuple[torch.Tensor, torch.Tensor]:
    """``(chosen, rejected)`` sequence log-probs ``(len(rows),)`` of ``model`` in eval mode."""
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    for start in range(0, len(rows), _REFERENCE_BATCH):
        batch = encode_pairs(tokenizer, rows[start : start + _REFERENCE_BATCH], max_length)
        c, r = sequence_logprobs_of(model, batch, average).chunk(2)
        chosen.append(c)
        rejected.append(r)
    model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


def ranked_first(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """1 where the chosen reward is higher, 0.5 on ties, 0 otherwise (per pair)."""
    return (chosen_rewards > rejected_rewards).float() + 0.5 * (chosen_rewards == rejected_rewards).float()


def implicit_reward_accuracy(model, tokenizer, rows, ref_logprobs, config, average) -> float:
    """Share of pairs whose implicit reward ``beta * (lp - lp_ref)`` ranks the chosen
    response first (ties count one half); ``ref_logprobs`` = (chosen, rejected)."""
    chosen, rejected = pair_logprobs(model, tokenizer, rows, config.max_length, average)
    ref_chosen, ref_rejected = ref_logprobs
    return float(ranked_first(config.beta * (chosen - ref_chosen), config.beta * (rejected - ref_rejected)).mean())


def train_on_pairs(algorithm: str, config, pair_loss: Callable) -> dict:
    """Train ``config.model`` on pairs with ``pair_loss``; the algorithm module's ``run``
    result (``metrics``, ``result``, ``run_dir``). ``config`` needs ``beta`` and
    ``average`` besides the shared options."""
    run_dir, model, tokenizer, device = prepare_run(algorithm, config)
    rows = training_rows(algorithm, config, "pairwise")
    eval_rows = heldout_rows(algorithm, config, "pairwise")
    exact_match_rows = answer_rows(config, eval_rows, "chosen")

    # The frozen reference: the initial policy's log-probs, once per dataset.
    ref_chosen, ref_rejected = pair_logprobs(model, tokenizer, rows, config.max_length, config.average)
    eval_ref_chosen, eval_ref_rejected = pair_logprobs(model, tokenizer, eval_rows, config.max_length, config.average)
    indexed = [{**row, "index": i} for i, row in enumerate(rows)]

    def collate(batch_rows):
        batch = encode_pairs(tokenizer, batch_rows, config.max_length)
        index = torch.tensor([r["index"] for r in batch_rows])
        batch["ref_chosen"], batch["ref_rejected"] = ref_chosen[index], ref_rejected[index]
        batch["num_units"] = len(batch_rows)
        return batch

    def loss_fn(model, batch):
        chosen, rejected = sequence_logprobs_of(model, batch, config.average).chunk(2)
        losses, chosen_rewards, rejected_rewards = pair_loss(
            chosen, rejected, batch["ref_chosen"].to(device), batch["ref_rejected"].to(device)
        )
        return losses.sum(), {
            "reward_accuracy": ranked_first(chosen_rewards, rejected_rewards).sum(),
            "reward_margin": (chosen_rewards - rejected_rewards).sum(),
            "chosen_reward": chosen_rewards.sum(),
            "rejected_reward": rejected_rewards.sum(),
        }

    def evaluate(model):
        return {
            "preference_accuracy": implicit_reward_accuracy(
                model, tokenizer, eval_rows, (eval_ref_chosen, eval_ref_rejected), config, config.average
            ),
            "heldout_accuracy": exact_match_accuracy(model, tokenizer, exact_match_rows),
        }

    batches = micro_batches(indexed, config.batch_size, config.seed, collate)
    return train_and_evaluate(model, tokenizer, config, loss_fn, batches, run_dir, evaluate)
