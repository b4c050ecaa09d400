"""The run shared by the reference-based preference algorithms (dpo, ipo) and the pieces
of it that kto and reward reuse: preference data, response encoding, sequence log-probs,
the frozen reference's log-probs computed once per dataset, and held-out preference
accuracy.

``train_on_pairs(algorithm, config, data, pair_loss, ranking_loss=None)`` trains on
``data``, the ``(schema, rows)`` of ``preference_data``:

* ``{"prompt", "chosen", "rejected"}`` pairs: the algorithm module supplies
  ``pair_loss(chosen, rejected, ref_chosen, ref_rejected) -> (losses, chosen_rewards,
  rejected_rewards)``, the ``fastpo.kernels`` call that is its math; the unit of the
  loss is the pair;
* ``{"prompt", "responses"}`` rows of K responses ranked best first (dpo only):
  ``ranking_loss(policy, reference) -> losses`` on ``(B, K)`` sequence log-probs; the
  unit of the loss is the ranked row.

The reference is the initial policy, frozen: its log-probs of every training and
held-out response are computed once, under ``no_grad``, before the first update (the
values a frozen copy would give at every step, without keeping the copy in memory). A
resumed run recomputes them from the initial model, not from the checkpoint.

Evaluation, before and after training:
``preference_accuracy``: share of held-out pairs (a ranked row gives its K*(K-1)/2
ordered pairs) whose implicit reward ``beta * (lp - lp_ref)`` is higher for the better
response; ties count one half, so the untrained policy (equal to its reference) scores
exactly 0.5, chance.
``heldout_accuracy``: exact-match accuracy of greedy answers on the held-out prompts
(the built-in task's, the same as sft's; or the eval rows' prompts, the chosen or best
response being the answer).
"""

from __future__ import annotations

from typing import Callable

import torch

from fastpo.kernels import sequence_logprobs

from ..data import load_dataset
from ..forward import IGNORE_INDEX, encode_responses, response_logprobs
from ._common import (
    answer_rows,
    exact_match_accuracy,
    heldout_rows,
    micro_batches,
    prepare_run,
    run_tasks,
    train_and_evaluate,
    training_rows,
)

__all__ = [
    "encode_pairs",
    "encode_rankings",
    "implicit_reward_accuracy",
    "ordered_pairs",
    "ordered_share",
    "pair_logprobs",
    "preference_data",
    "preference_eval_data",
    "ranked_first",
    "ranking_logprobs",
    "sequence_logprobs_of",
    "train_on_pairs",
]

_REFERENCE_BATCH = 64  # rows per forward pass when computing reference log-probs


def preference_data(algorithm: str, config) -> tuple[str, list[dict]]:
    """The training rows as ``(schema, rows)``: the built-in task's pairs, or
    ``config.data``'s pairwise or ranked rows (every ranked row holding as many
    responses as the first)."""
    if config.data.startswith("builtin:"):
        return "pairwise", training_rows(algorithm, config, "pairwise")
    schema, rows = load_dataset(config.data, algorithm)
    if schema == "ranked":
        k = len(rows[0]["responses"])
        for number, row in enumerate(rows, start=1):
            if len(row["responses"]) != k:
                raise ValueError(
                    f"{config.data}: row {number}: field 'responses' holds {len(row['responses'])} responses; "
                    f"every row must hold as many as the first ({k})"
                )
    return schema, rows


def ordered_pairs(rows: list[dict]) -> list[dict]:
    """Every ordered pair (better, worse) of ranked rows, as pairwise rows."""
    return [
        {"prompt": row["prompt"], "chosen": better, "rejected": worse}
        for row in rows
        for i, better in enumerate(row["responses"])
        for worse in row["responses"][i + 1 :]
    ]


def preference_eval_data(algorithm: str, config) -> tuple[list[dict], list[dict]]:
    """``(pairs, answers)``: the held-out pairs (the built-in task's, or ``eval_data``'s,
    ranked rows expanded by ``ordered_pairs``) and the ``{"prompt", "completion"}``
    rows of the exact-match evaluation (``answer_rows``: the chosen or best response)."""
    if config.eval_data is None:
        pairs = heldout_rows(algorithm, config, "pairwise")
        return pairs, answer_rows(config, pairs, "chosen")
    schema, rows = load_dataset(config.eval_data, algorithm)
    if schema == "pairwise":
        return rows, answer_rows(config, rows, "chosen")
    best = [{"prompt": row["prompt"], "best": row["responses"][0]} for row in rows]
    return ordered_pairs(rows), answer_rows(config, best, "best")


def encode_pairs(tokenizer, rows, max_length):
    """Chosen responses in rows ``0..B-1``, rejected ones in ``B..2B-1``."""
    prompts = [r["prompt"] for r in rows]
    return encode_responses(
        tokenizer, prompts + prompts, [r["chosen"] for r in rows] + [r["rejected"] for r in rows], max_length
    )


def encode_rankings(tokenizer, prompts: list[str], rankings: list[list[str]], max_length):
    """Ranking ``i``'s K responses in rows ``i*K .. i*K + K-1`` (every ranking of the
    same length K), so that per-row values ``.view(B, K)`` are ordered best first."""
    return encode_responses(
        tokenizer,
        [prompt for prompt, ranking in zip(prompts, rankings) for _ in ranking],
        [response for ranking in rankings for response in ranking],
        max_length,
    )


def _ranking(row: dict) -> list[str]:
    """A row's responses best first: a pair is a ranking of two."""
    return row["responses"] if "responses" in row else [row["chosen"], row["rejected"]]


def sequence_logprobs_of(model, batch, average):
    """Per-row response log-probs ``(B,)``, summed over tokens or averaged (``average``)."""
    token_lp = response_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    return sequence_logprobs(token_lp, (batch["labels"] != IGNORE_INDEX).to(token_lp.device), average=average)


@torch.no_grad()
def ranking_logprobs(model, tokenizer, rows, max_length, average) -> torch.Tensor:
    """Sequence log-probs ``(len(rows), K)`` of each row's responses, best first (pairs:
    chosen then rejected), of ``model`` in eval mode."""
    was_training = model.training
    model.eval()
    chunks = []
    for start in range(0, len(rows), _REFERENCE_BATCH):
        chunk = rows[start : start + _REFERENCE_BATCH]
        batch = encode_rankings(tokenizer, [r["prompt"] for r in chunk], [_ranking(r) for r in chunk], max_length)
        chunks.append(sequence_logprobs_of(model, batch, average).view(len(chunk), -1))
    model.train(was_training)
    return torch.cat(chunks)


def pair_logprobs(model, tokenizer, rows, max_length, average) -> tuple[torch.Tensor, torch.Tensor]:
    """``(chosen, rejected)`` sequence log-probs ``(len(rows),)`` of ``model`` in eval mode."""
    chosen, rejected = ranking_logprobs(model, tokenizer, rows, max_length, average).unbind(dim=1)
    return chosen, rejected


def ranked_first(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """1 where the chosen reward is higher, 0.5 on ties, 0 otherwise (per pair)."""
    return (chosen_rewards > rejected_rewards).float() + 0.5 * (chosen_rewards == rejected_rewards).float()


def ordered_share(scores: torch.Tensor) -> torch.Tensor:
    """Per ranking ``(B, K)`` best first: the share of its K*(K-1)/2 ordered pairs whose
    scores put the better response first (ties count one half), ``(B,)``."""
    better, worse = torch.triu_indices(scores.shape[1], scores.shape[1], offset=1, device=scores.device)
    return ranked_first(scores[:, better], scores[:, worse]).mean(dim=1)


def implicit_reward_accuracy(model, tokenizer, rows, ref_logprobs, config, average) -> float:
    """Share of pairs whose implicit reward ``beta * (lp - lp_ref)`` ranks the chosen
    response first (ties count one half); ``ref_logprobs`` = (chosen, rejected)."""
    chosen, rejected = pair_logprobs(model, tokenizer, rows, config.max_length, average)
    ref_chosen, ref_rejected = ref_logprobs
    return float(ranked_first(config.beta * (chosen - ref_chosen), config.beta * (rejected - ref_rejected)).mean())


def train_on_pairs(
    algorithm: str, config, data: tuple[str, list[dict]], pair_loss: Callable, ranking_loss: Callable | None = None,
    warm_start=None, chosen_nll_coef: float = 0.0,
) -> dict:
    """Train ``config.model`` on ``data`` (``preference_data``'s ``(schema, rows)``) with
    ``pair_loss``, or ``ranking_loss`` for ranked rows; the algorithm module's ``run``
    result (``metrics``, ``result``, ``run_dir``). ``config`` needs ``beta`` and
    ``average`` besides the shared options; ``warm_start``: the weights it starts from
    (``prepare_run``). ``chosen_nll_coef`` > 0 adds to each unit's loss that weight times
    the chosen (best) response's negative log-likelihood per token (``chosen_nll``): RPO's
    term, which keeps the likelihood of the chosen response from falling while the margin
    grows."""
    schema, rows = data
    run_dir, model, tokenizer, device = prepare_run(algorithm, config, warm_start=warm_start)
    eval_pairs, exact_match_rows = preference_eval_data(algorithm, config)

    # The frozen reference: the initial policy's log-probs, once per dataset.
    reference = ranking_logprobs(model, tokenizer, rows, config.max_length, config.average)
    eval_reference = pair_logprobs(model, tokenizer, eval_pairs, config.max_length, config.average)
    indexed = [{"prompt": row["prompt"], "ranking": _ranking(row), "index": i} for i, row in enumerate(rows)]

    def collate(batch_rows):
        batch = encode_rankings(
            tokenizer, [r["prompt"] for r in batch_rows], [r["ranking"] for r in batch_rows], config.max_length
        )
        batch["reference"] = reference[torch.tensor([r["index"] for r in batch_rows])]
        batch["num_units"] = len(batch_rows)
        return batch

    def loss_fn(model, batch):
        policy = sequence_logprobs_of(model, batch, config.average).view(batch["num_units"], -1)
        ref = batch["reference"].to(device)
        if schema == "ranked":
            rewards = config.beta * (policy - ref).detach()
            losses = ranking_loss(policy, ref)
            # reward_accuracy: per row, the share of its ordered pairs that the implicit rewards order.
            metrics = {
                "reward_accuracy": ordered_share(rewards).sum(),
                "reward_margin": (rewards[:, 0] - rewards[:, -1]).sum(),
            }
        else:
            losses, chosen_rewards, rejected_rewards = pair_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1])
            metrics = {
                "reward_accuracy": ranked_first(chosen_rewards, rejected_rewards).sum(),
                "reward_margin": (chosen_rewards - rejected_rewards).sum(),
                "chosen_reward": chosen_rewards.sum(),
                "rejected_reward": rejected_rewards.sum(),
                # The policy's own log-probs (summed, or averaged with average=true): DPO can raise the
                # margin while both fall, which the rewards alone do not show.
                "chosen_logprob": policy[:, 0].detach().sum(),
                "rejected_logprob": policy[:, 1].detach().sum(),
            }
        if chosen_nll_coef:
            chosen_nll = -policy[:, 0]
            if not config.average:  # a sum over the response's tokens: made a mean
                tokens = (batch["labels"] != IGNORE_INDEX).sum(dim=1).view(policy.shape)[:, 0]
                chosen_nll = chosen_nll / tokens.to(device).clamp(min=1)
            losses = losses + chosen_nll_coef * chosen_nll
            metrics["chosen_nll"] = chosen_nll.detach().sum()
        return losses.sum(), metrics

    checkers = run_tasks(config)  # the verifiers of the held-out answers

    def evaluate(model):
        return {
            "preference_accuracy": implicit_reward_accuracy(
                model, tokenizer, eval_pairs, eval_reference, config, config.average
            ),
            "heldout_accuracy": exact_match_accuracy(model, tokenizer, exact_match_rows, tasks=checkers),
        }

    batches = micro_batches(indexed, config.batch_size, config.seed, collate)
    return train_and_evaluate(model, tokenizer, config, loss_fn, batches, run_dir, evaluate)
