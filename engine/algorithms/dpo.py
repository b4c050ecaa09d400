"""Direct Preference Optimization on ``{"prompt", "chosen", "rejected"}`` pairs.

With sequence log-probs ``lp`` (summed over response tokens, or averaged with
``average=true``) and the reference's ``lp_ref``, the margin is
``h = (lp_c - lp_ref_c) - (lp_r - lp_ref_r)`` and ``fastpo.kernels.dpo_loss`` gives the
per-pair loss of ``loss_type``: sigmoid (with ``label_smoothing``: cDPO), hinge, robust or
ipo. The unit of the loss is the pair.

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

import torch

from fastpo.kernels import dpo_loss, sequence_logprobs

from ..config import ConfigError, DPOConfig
from ..forward import IGNORE_INDEX, encode_responses, response_logprobs
from ..loop import train_loop
from ._common import answer_rows, exact_match_accuracy, heldout_rows, micro_batches, prepare_run, training_rows

__all__ = ["run"]

_REFERENCE_BATCH = 64  # rows per forward pass when computing reference log-probs


def _encode_pairs(tokenizer, rows, max_length):
    """Chosen responses in rows ``0..B-1``, rejected ones in ``B..2B-1``."""
    prompts = [r["prompt"] for r in rows]
    return encode_responses(
        tokenizer, prompts + prompts, [r["chosen"] for r in rows] + [r["rejected"] for r in rows], max_length
    )


def _sequence_logprobs(model, batch, average):
    token_lp = response_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    return sequence_logprobs(token_lp, (batch["labels"] != IGNORE_INDEX).to(token_lp.device), average=average)


@torch.no_grad()
def _pair_logprobs(model, tokenizer, rows, config) -> tuple[torch.Tensor, torch.Tensor]:
    """``(chosen, rejected)`` sequence log-probs ``(len(rows),)`` of ``model`` in eval mode."""
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    for start in range(0, len(rows), _REFERENCE_BATCH):
        batch = _encode_pairs(tokenizer, rows[start : start + _REFERENCE_BATCH], config.max_length)
        c, r = _sequence_logprobs(model, batch, config.average).chunk(2)
        chosen.append(c)
        rejected.append(r)
    model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


def _ranked_first(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """1 where the chosen reward is higher, 0.5 on ties, 0 otherwise (per pair)."""
    return (chosen_rewards > rejected_rewards).float() + 0.5 * (chosen_rewards == rejected_rewards).float()


def run(config: DPOConfig) -> dict:
    if config.label_smoothing and config.loss_type in ("hinge", "ipo"):
        raise ConfigError(f"option 'label_smoothing': must be 0 with loss_type={config.loss_type}")
    if config.loss_type == "robust" and config.label_smoothing >= 0.5:
        raise ConfigError(f"option 'label_smoothing': got {config.label_smoothing}; robust needs a value < 0.5")
    if config.label_smoothing > 1:
        raise ConfigError(f"option 'label_smoothing': got {config.label_smoothing}; expected a value <= 1")
    run_dir, model, tokenizer, device = prepare_run("dpo", config)
    rows = training_rows("dpo", config, "pairwise")
    eval_rows = heldout_rows("dpo", config, "pairwise")
    exact_match_rows = answer_rows(config, eval_rows, "chosen")

    # The frozen reference: the initial policy's log-probs, once per dataset.
    ref_chosen, ref_rejected = _pair_logprobs(model, tokenizer, rows, config)
    eval_ref_chosen, eval_ref_rejected = _pair_logprobs(model, tokenizer, eval_rows, config)
    indexed = [{**row, "index": i} for i, row in enumerate(rows)]

    def collate(batch_rows):
        batch = _encode_pairs(tokenizer, batch_rows, config.max_length)
        index = torch.tensor([r["index"] for r in batch_rows])
        batch["ref_chosen"], batch["ref_rejected"] = ref_chosen[index], ref_rejected[index]
        batch["num_units"] = len(batch_rows)
        return batch

    def loss_fn(model, batch):
        chosen, rejected = _sequence_logprobs(model, batch, config.average).chunk(2)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen,
            rejected,
            batch["ref_chosen"].to(device),
            batch["ref_rejected"].to(device),
            beta=config.beta,
            loss_type=config.loss_type,
            label_smoothing=config.label_smoothing,
        )
        return losses.sum(), {
            "reward_accuracy": _ranked_first(chosen_rewards, rejected_rewards).sum(),
            "reward_margin": (chosen_rewards - rejected_rewards).sum(),
            "chosen_reward": chosen_rewards.sum(),
            "rejected_reward": rejected_rewards.sum(),
        }

    def preference_accuracy(model):
        chosen, rejected = _pair_logprobs(model, tokenizer, eval_rows, config)
        chosen_rewards = config.beta * (chosen - eval_ref_chosen)
        rejected_rewards = config.beta * (rejected - eval_ref_rejected)
        return float(_ranked_first(chosen_rewards, rejected_rewards).mean())

    def evaluate(model):
        return {
            "preference_accuracy": preference_accuracy(model),
            "heldout_accuracy": exact_match_accuracy(model, tokenizer, exact_match_rows),
        }

    before = evaluate(model)
    result = train_loop(
        model=model,
        tokenizer=tokenizer,
        config=config,
        loss_fn=loss_fn,
        batches=micro_batches(indexed, config.batch_size, config.seed, collate),
        run_dir=run_dir,
        evaluate=evaluate,
    )
    metrics = {f"{name}_before": value for name, value in before.items()}
    if not result.interrupted:
        metrics.update({f"{name}_after": value for name, value in evaluate(model).items()})
    return {"metrics": metrics, "result": result, "run_dir": run_dir}
