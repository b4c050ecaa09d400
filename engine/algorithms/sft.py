"""Supervised fine-tuning: the mean negative log-likelihood of the completion tokens.

Rows are ``{"prompt", "completion"}``; the prompt's tokens are context only (their labels
are the ignore index), the completion and its eos are the targets. The unit of the loss
is the completion token, so gradient accumulation averages over every completion token
of the optimizer step (TRL's ``completion_only_loss``; torchtune's SFT recipe).

Packing (``packing=true``): the ``batch_size`` rows of a micro-batch are laid end to end
into as few sequences of at most ``max_length`` tokens as fit them (first fit, in batch
order), instead of one padded row each. No row sees another: attention takes a 4D
block-diagonal causal mask (one block per row; the padding at the end of a sequence is
a block of its own), and each row's ``position_ids`` restart at 0, so every token's
log-prob is the one it has in the unpacked row. The loss and its unit are unchanged.
The mask is the additive float mask that transformers' ``eager`` and ``sdpa`` attention
take as given; other attention implementations are refused.

Evaluation: exact-match accuracy of greedy answers on the held-out prompts, before and
after training (``heldout_accuracy_before`` / ``_after``).
"""

from __future__ import annotations

import torch

from fastpo.kernels import linear_token_logprobs

from ..config import SFTConfig
from ..forward import IGNORE_INDEX, encode_responses, response_logprobs
from ._common import (
    exact_match_accuracy,
    heldout_rows,
    micro_batches,
    prepare_run,
    run_tasks,
    train_and_evaluate,
    training_rows,
)

__all__ = ["block_causal_mask", "pack_rows", "packed_logprobs", "run"]

_PACKING_ATTENTION = ("eager", "sdpa")  # the implementations that take a 4D mask as given


def pack_rows(batch: dict, max_length: int, pad_token_id: int) -> dict:
    """Pack the rows of an ``encode_responses`` batch into sequences of at most
    ``max_length`` tokens: ``input_ids``, ``labels``, ``position_ids`` and ``segments``
    ``(S, L)``, ``L`` the longest packed sequence. ``segments`` numbers the rows of each
    sequence from 0; padding (``pad_token_id``) is segment -1. A row's last label is already the ignore index, so
    no row is trained to predict the next row's first token."""
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    sequences: list[list[int]] = []  # the batch rows packed into each sequence
    room: list[int] = []
    for row, length in enumerate(lengths):
        fits = next((i for i, free in enumerate(room) if free >= length), None)
        if fits is None:
            sequences.append([])
            room.append(max_length)
            fits = len(sequences) - 1
        sequences[fits].append(row)
        room[fits] -= length
    width = max(max_length - free for free in room)
    shape = (len(sequences), width)
    packed = {
        "input_ids": torch.full(shape, pad_token_id, dtype=torch.long),
        "labels": torch.full(shape, IGNORE_INDEX, dtype=torch.long),
        "position_ids": torch.zeros(shape, dtype=torch.long),
        "segments": torch.full(shape, -1, dtype=torch.long),
    }
    for s, rows in enumerate(sequences):
        start = 0
        for segment, row in enumerate(rows):
            end = start + lengths[row]
            packed["input_ids"][s, start:end] = batch["input_ids"][row, : lengths[row]]
            packed["labels"][s, start:end] = batch["labels"][row, : lengths[row]]
            packed["position_ids"][s, start:end] = torch.arange(lengths[row])
            packed["segments"][s, start:end] = segment
            start = end
    return packed


def block_causal_mask(segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive attention mask ``(S, 1, L, L)`` of packed ``segments``: 0 where
    query ``i`` may see key ``j`` (same segment, ``j <= i``), the dtype's lowest value
    elsewhere (a finite value: a padding query still sees itself, so no row is empty)."""
    length = segments.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
    allowed = (segments[:, :, None] == segments[:, None, :]) & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def packed_logprobs(model, batch: dict) -> torch.Tensor:
    """Per-token log-probs ``(S, L)`` float32 of a ``pack_rows`` batch, 0 where a label is
    the ignore index: the decoder run with the block-diagonal mask and the per-row
    positions, then ``linear_token_logprobs`` on its hidden states (as
    ``forward.response_logprobs``, which takes no ``position_ids``)."""
    parameter = next(model.parameters())
    segments = batch["segments"].to(parameter.device)
    hidden = model.get_decoder()(
        input_ids=batch["input_ids"].to(parameter.device),
        attention_mask=block_causal_mask(segments, parameter.dtype),
        position_ids=batch["position_ids"].to(parameter.device),
        use_cache=False,
    ).last_hidden_state
    head = model.get_output_embeddings()
    return linear_token_logprobs(
        hidden,
        head.weight,
        batch["labels"].to(parameter.device),
        bias=getattr(head, "bias", None),
        softcap=getattr(model.config, "final_logit_softcapping", None),
        ignore_index=IGNORE_INDEX,
    )


def run(config: SFTConfig, warm_start=None) -> dict:
    # sft is the warm start of the others: it has none (its config refuses warm_start_steps).
    run_dir, model, tokenizer, _ = prepare_run("sft", config, warm_start=warm_start)
    if config.packing and model.config._attn_implementation not in _PACKING_ATTENTION:
        raise NotImplementedError(
            f"sft: packing=true needs {' or '.join(_PACKING_ATTENTION)} attention (a 4D mask); "
            f"{config.model} uses {model.config._attn_implementation!r}"
        )
    rows = training_rows("sft", config, "completion")
    eval_rows = heldout_rows("sft", config, "completion")

    def collate(batch_rows):
        batch = encode_responses(
            tokenizer, [r["prompt"] for r in batch_rows], [r["completion"] for r in batch_rows], config.max_length
        )
        if config.packing:
            batch = pack_rows(batch, config.max_length, tokenizer.pad_token_id or 0)
        batch["num_units"] = int((batch["labels"] != IGNORE_INDEX).sum())
        return batch

    def loss_fn(model, batch):
        if config.packing:
            logprobs = packed_logprobs(model, batch)
        else:
            logprobs = response_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        return -logprobs.sum(), {}  # ignored positions hold 0: the sum covers completion tokens only

    checkers = run_tasks(config)  # the verifiers of the held-out answers

    def evaluate(model):
        return {"heldout_accuracy": exact_match_accuracy(model, tokenizer, eval_rows, tasks=checkers)}

    batches = micro_batches(rows, config.batch_size, config.seed, collate)

    def reached_target(results):
        return config.target_accuracy is not None and results["heldout_accuracy"] >= config.target_accuracy

    return train_and_evaluate(model, tokenizer, config, loss_fn, batches, run_dir, evaluate, done=reached_target)
