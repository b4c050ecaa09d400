"""Supervised fine-tuning: the mean negative log-likelihood of the completion tokens.

Rows are ``{"prompt", "completion"}``; the prompt's tokens are context only (their labels
are the ignore index), the completion and its eos are the targets. The unit of the loss
is the completion token, so gradient accumulation averages over every completion token
of the optimizer step (TRL's ``completion_only_loss``; torchtune's SFT recipe).

Evaluation: exact-match accuracy of greedy answers on the held-out prompts, before and
after training (``heldout_accuracy_before`` / ``_after``).
"""

from __future__ import annotations

from ..config import SFTConfig
from ..forward import IGNORE_INDEX, encode_responses, response_logprobs
from ._common import (
    exact_match_accuracy,
    heldout_rows,
    micro_batches,
    prepare_run,
    train_and_evaluate,
    training_rows,
)

__all__ = ["run"]


def run(config: SFTConfig) -> dict:
    if config.packing:
        raise NotImplementedError("sft: packing=true is not implemented yet; run with packing=false")
    run_dir, model, tokenizer, _ = prepare_run("sft", config)
    rows = training_rows("sft", config, "completion")
    eval_rows = heldout_rows("sft", config, "completion")

    def collate(batch_rows):
        batch = encode_responses(
            tokenizer, [r["prompt"] for r in batch_rows], [r["completion"] for r in batch_rows], config.max_length
        )
        batch["num_units"] = int((batch["labels"] != IGNORE_INDEX).sum())
        return batch

    def loss_fn(model, batch):
        logprobs = response_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        return -logprobs.sum(), {}  # ignored positions hold 0: the sum covers completion tokens only

    def evaluate(model):
        return {"heldout_accuracy": exact_match_accuracy(model, tokenizer, eval_rows)}

    batches = micro_batches(rows, config.batch_size, config.seed, collate)
    return train_and_evaluate(model, tokenizer, config, loss_fn, batches, run_dir, evaluate)
