"""Reward model: a scalar head on a causal LM backbone, trained on preferences.

The model is the backbone with a ``Linear(H, 1)`` head (``score``) read at the last
valid token (the eos after the response): a Hugging Face
``AutoModelForSequenceClassification`` with one label, so the checkpoint (head included)
loads back with ``AutoModelForSequenceClassification.from_pretrained``. From
``builtin:tiny`` or a causal LM checkpoint the backbone is copied and the new head is
drawn from a normal of std ``head_init_std``, by default ``1/sqrt(H)``: the last hidden
state has unit RMS (the final norm), so the first scores are of unit scale. Not zero: a
zero head is a saddle of the pairwise loss (the backbone gets no gradient until the
head has grown, and the head alone has no feature to grow along), where the built-in
task's reward model stayed at chance for hundreds of steps; with the unit-scale head it
learns from the first steps. ``head_init_std=0`` gives the zero head (every score 0,
every pair tied). A checkpoint that already holds a one-label head keeps it.

Data decides the loss, whose unit is the row:

* ``{"prompt", "chosen", "rejected"}`` pairs (the built-in task's default):
  ``fastpo.kernels.bradley_terry_loss``, ``-log sigmoid(r_c - r_r - margin)`` plus
  ``center_coef * (r_c + r_r)**2`` (TRL's ``center_rewards_coefficient``);
* ``{"prompt", "responses"}`` rows ranked best first, every row with the same number K
  of responses: ``fastpo.kernels.ranking_loss`` (InstructGPT's K-wise loss), when
  ``ranking=true``; it has no margin or centering.

Evaluation, before and after training: ``preference_accuracy``, the share of held-out
pairs (the built-in task's, or ``eval_data``'s, a ranked row giving its K*(K-1)/2
ordered pairs) whose chosen response scores higher, ties counting one half. A reward
model does not generate, so there is no ``heldout_accuracy``.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch

from fastpo.kernels import bradley_terry_loss, ranking_loss

from ..config import ConfigError, RewardConfig
from ..models import load_causal_lm
from ._common import micro_batches, prepare_run, train_and_evaluate
from ._pairs import encode_pairs, encode_rankings, ordered_share, preference_data, preference_eval_data, ranked_first

__all__ = ["load_reward_model", "reward_scores", "run"]

_EVAL_BATCH = 64  # pairs per forward pass in evaluation


def load_reward_model(
    name: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, head_std: float | None = 0.0, characters: str = ""
):
    """``(model, tokenizer)``: a one-label ``AutoModelForSequenceClassification`` on the
    backbone of ``name`` (``builtin:tiny``, a causal LM checkpoint, or a reward-model
    checkpoint). A new head is drawn from ``normal(0, head_std)`` (none: ``1/sqrt(H)``)
    by a generator seeded with ``seed``, zero with ``head_std=0``; the global RNG is left
    untouched."""
    from transformers import AutoModelForSequenceClassification

    if name.startswith("builtin:"):
        causal, tokenizer = load_causal_lm(name, seed=seed, dtype=dtype, characters=characters)
        config = copy.deepcopy(causal.config)
        config.num_labels = 1
        with torch.random.fork_rng(devices=[]):  # leave the global RNG as load_causal_lm does
            torch.manual_seed(seed)
            model = AutoModelForSequenceClassification.from_config(config).to(dtype)
        model.base_model.load_state_dict(causal.base_model.state_dict())
        new_head = True
    else:
        from transformers import AutoTokenizer

        if not Path(name).is_dir():
            raise ValueError(f"model {name!r} is neither a built-in model nor a local checkpoint folder")
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
        model, info = AutoModelForSequenceClassification.from_pretrained(
            name, num_labels=1, local_files_only=True, dtype=dtype, output_loading_info=True
        )
        new_head = any(key.startswith("score.") for key in info["missing_keys"])
    if not isinstance(getattr(model, "score", None), torch.nn.Linear):
        raise ValueError(f"{type(model).__name__} has no linear 'score' head; reward needs a causal LM backbone")
    if new_head:
        std = model.config.hidden_size**-0.5 if head_std is None else head_std
        generator = torch.Generator().manual_seed(seed)
        weight = torch.randn(model.score.weight.shape, generator=generator) * std
        with torch.no_grad():
            model.score.weight.copy_(weight)
            if model.score.bias is not None:
                model.score.bias.zero_()
    return model, tokenizer


def reward_scores(model, batch) -> torch.Tensor:
    """Scores ``(B,)`` float32: the head applied to the hidden state of each row's last
    valid token (rows are right-padded)."""
    device = next(model.parameters()).device
    attention_mask = batch["attention_mask"].to(device)
    hidden = model.base_model(
        input_ids=batch["input_ids"].to(device), attention_mask=attention_mask, use_cache=False
    ).last_hidden_state
    last = attention_mask.sum(dim=1) - 1
    return model.score(hidden[torch.arange(hidden.shape[0], device=device), last]).squeeze(-1).float()


def run(config: RewardConfig, warm_start=None) -> dict:
    schema, rows = preference_data("reward", config)
    if schema == "ranked":
        if not config.ranking:
            raise ConfigError(f"option 'ranking': is false, but {config.data} holds ranked rows (prompt, responses)")
        if config.margin or config.center_coef:
            raise ConfigError("options 'margin' and 'center_coef' apply to pairs only; set them to 0 for ranked rows")
    eval_pairs, _ = preference_eval_data("reward", config)
    load_model = functools.partial(load_reward_model, head_std=config.head_init_std)
    run_dir, model, tokenizer, _ = prepare_run("reward", config, load_model=load_model, warm_start=warm_start)

    def collate(batch_rows):
        if schema == "pairwise":
            batch = encode_pairs(tokenizer, batch_rows, config.max_length)
        else:
            batch = encode_rankings(
                tokenizer, [r["prompt"] for r in batch_rows], [r["responses"] for r in batch_rows], config.max_length
            )
        batch["num_units"] = len(batch_rows)
        return batch

    def loss_fn(model, batch):
        scores = reward_scores(model, batch)
        if schema == "pairwise":
            chosen, rejected = scores.chunk(2)
            losses = bradley_terry_loss(chosen, rejected, margin=config.margin, center_coef=config.center_coef)
            return losses.sum(), {
                "reward_accuracy": ranked_first(chosen, rejected).sum(),
                "reward_margin": (chosen - rejected).sum(),
            }
        ranked = scores.view(batch["num_units"], -1)
        # reward_accuracy: per row, the share of its ordered pairs that the scores order.
        return ranking_loss(ranked).sum(), {"reward_accuracy": ordered_share(ranked.detach()).sum()}

    @torch.no_grad()
    def evaluate(model):
        was_training = model.training
        model.eval()
        correct = 0.0
        for start in range(0, len(eval_pairs), _EVAL_BATCH):
            batch = encode_pairs(tokenizer, eval_pairs[start : start + _EVAL_BATCH], config.max_length)
            chosen, rejected = reward_scores(model, batch).chunk(2)
            correct += float(ranked_first(chosen, rejected).sum())
        model.train(was_training)
        return {"preference_accuracy": correct / len(eval_pairs)}

    batches = micro_batches(rows, config.batch_size, config.seed, collate)
    return train_and_evaluate(model, tokenizer, config, loss_fn, batches, run_dir, evaluate)
