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

``lm_coef`` > 0 adds to each pair's (ranked row's) loss that weight times the chosen
(best) response's mean negative log-likelihood per token under the LM head of the model
the run starts from (the warm start, or a causal LM checkpoint), frozen: the
hidden-state regularization of GRM (Yang et al., 2024). The backbone keeps computing
what the generative model computed (on the built-in task, the sum: the warm start's own
log-probs already rank the held-out pairs 0.915-0.955), and the score head learns to
read it. Without the term the model found the check at a step that varied from run to
run (150 to 950 on the built-in task's seed 2), and the held-out accuracy with it
(0.74-0.97); with it, runs of seeds 0, 1 and 2 ended at 0.91-0.965 (docs/engine.md). A
start with no LM head (a reward checkpoint, or the random built-in model) has no such
term.

With ``target=states`` the score is a value instead: unary rows ``{"prompt",
"completion", "label"}`` (builtin:countdown's states, ``CountdownTask.state_examples``:
a state's value prompt labelled true when the solver can still reach the target; or a
file's) train ``sigmoid(score)`` as the probability that the label is true, by binary
cross-entropy (a value model, or an outcome reward model on whole responses); no LM
term. Its evaluation is ``value_accuracy``, the share of held-out rows (``eval_data``'s
unary rows when given, else the task's held-out states; none for a data file alone) on
the side of 1/2 their label says. ``fastpo reason value=head`` searches with it.

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

from fastpo.kernels import bradley_terry_loss, linear_token_logprobs, ranking_loss, sequence_logprobs

from ..config import ConfigError, RewardConfig
from ..data import load_rows
from ..forward import IGNORE_INDEX, encode_responses
from ..models import load_causal_lm
from ..tasks import BUILTIN_TASKS
from ._common import heldout_rows, micro_batches, prepare_run, train_and_evaluate, training_rows
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


def _stored_tensor_files(folder: Path) -> dict[str, Path]:
    """Each tensor name in ``folder``'s safetensors files, with the file that holds it,
    read from the files' headers without loading a tensor."""
    from safetensors import safe_open

    files = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as tensors:
            files.update(dict.fromkeys(tensors.keys(), file))
    return files


def has_score_head(folder: str | Path) -> bool:
    """Whether the checkpoint ``folder`` stores a score head (a reward or value model's)."""
    return "score.weight" in _stored_tensor_files(Path(folder))


def reward_scores(model, batch) -> torch.Tensor:
    """Scores ``(B,)`` float32: the head applied to the hidden state of each row's last
    valid token (rows are right-padded)."""
    return _scores_and_hidden(model, batch)[0]


def _scores_and_hidden(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores, hidden)``: ``reward_scores`` and the last hidden states ``(B, T, H)``."""
    device = next(model.parameters()).device
    attention_mask = batch["attention_mask"].to(device)
    hidden = model.base_model(
        input_ids=batch["input_ids"].to(device), attention_mask=attention_mask, use_cache=False
    ).last_hidden_state
    last = attention_mask.sum(dim=1) - 1
    scores = model.score(hidden[torch.arange(hidden.shape[0], device=device), last]).squeeze(-1).float()
    return scores, hidden


def _starting_lm_head(config: RewardConfig, model, warm_start) -> torch.Tensor | None:
    """The frozen ``(V, H)`` LM head of the causal LM the run starts from: the warm
    start's, or ``config.model``'s when it is a causal LM checkpoint (a tied head: its
    input embedding); none when there is none (a reward checkpoint, the random built-in
    model)."""
    from safetensors import safe_open

    if warm_start is not None:
        folder = Path(warm_start.model_dir)
    elif not config.model.startswith("builtin:"):
        folder = Path(config.model)
    else:
        return None
    files = _stored_tensor_files(folder)
    if "lm_head.weight" in files:
        with safe_open(str(files["lm_head.weight"]), framework="pt") as tensors:
            return tensors.get_tensor("lm_head.weight").to(model.score.weight)
    if "score.weight" in files or not getattr(model.config, "tie_word_embeddings", False):
        return None  # a reward checkpoint, or no LM head stored
    return model.get_input_embeddings().weight.detach().clone()  # tied: as loaded, before any step


def _state_rows(config: RewardConfig, split: str) -> list[dict]:
    """The unary rows of ``target=states`` for ``split``: ``eval_data``'s when held out
    and given, else the built-in task's states, else ``data``'s (a file has no held-out
    rows of its own)."""
    if split == "heldout" and config.eval_data is not None:
        return load_rows(config.eval_data, "unary")
    if config.data in BUILTIN_TASKS:
        rows_of = training_rows if split == "train" else heldout_rows
        return rows_of("reward", config, "states")
    return load_rows(config.data, "unary") if split == "train" else []


def run(config: RewardConfig, warm_start=None) -> dict:
    if config.target == "states":
        schema, rows, eval_rows = "states", _state_rows(config, "train"), _state_rows(config, "heldout")
    else:
        schema, rows = preference_data("reward", config)
        eval_rows, _ = preference_eval_data("reward", config)
    if schema == "ranked":
        if not config.ranking:
            raise ConfigError(f"option 'ranking': is false, but {config.data} holds ranked rows (prompt, responses)")
        if config.margin or config.center_coef:
            raise ConfigError("options 'margin' and 'center_coef' apply to pairs only; set them to 0 for ranked rows")
    load_model = functools.partial(load_reward_model, head_std=config.head_init_std)
    run_dir, model, tokenizer, _ = prepare_run("reward", config, load_model=load_model, warm_start=warm_start)
    lm_head = _starting_lm_head(config, model, warm_start) if config.lm_coef and schema != "states" else None

    def encode_states(batch_rows):
        batch = encode_responses(
            tokenizer, [r["prompt"] for r in batch_rows], [r["completion"] for r in batch_rows], config.max_length
        )
        batch["value_labels"] = torch.tensor([float(r["label"]) for r in batch_rows])
        return batch

    def collate(batch_rows):
        if schema == "states":
            batch = encode_states(batch_rows)
        elif schema == "pairwise":
            batch = encode_pairs(tokenizer, batch_rows, config.max_length)
        else:
            batch = encode_rankings(
                tokenizer, [r["prompt"] for r in batch_rows], [r["responses"] for r in batch_rows], config.max_length
            )
        batch["num_units"] = len(batch_rows)
        return batch

    def chosen_nll(hidden, labels):
        """Per row, the mean negative log-likelihood per token of its response under the
        frozen LM head ``lm_head``."""
        labels = labels.to(hidden.device)
        token_lp = linear_token_logprobs(hidden, lm_head, labels, ignore_index=IGNORE_INDEX)
        return -sequence_logprobs(token_lp, labels != IGNORE_INDEX, average=True)

    def loss_fn(model, batch):
        scores, hidden = _scores_and_hidden(model, batch)
        if schema == "states":
            labels = batch["value_labels"].to(scores.device)
            losses = torch.nn.functional.binary_cross_entropy_with_logits(scores, labels, reduction="none")
            return losses.sum(), {"value_accuracy": _on_label_side(scores.detach(), labels).sum()}
        if schema == "pairwise":
            chosen, rejected = scores.chunk(2)
            losses = bradley_terry_loss(chosen, rejected, margin=config.margin, center_coef=config.center_coef)
            metrics = {
                "reward_accuracy": ranked_first(chosen, rejected).sum(),
                "reward_margin": (chosen - rejected).sum(),
            }
            best_rows = slice(0, batch["num_units"])  # the chosen responses
        else:
            ranked = scores.view(batch["num_units"], -1)
            losses = ranking_loss(ranked)
            # reward_accuracy: per row, the share of its ordered pairs that the scores order.
            metrics = {"reward_accuracy": ordered_share(ranked.detach()).sum()}
            best_rows = slice(0, None, ranked.shape[1])  # each ranking's first response
        if lm_head is not None:
            nll = chosen_nll(hidden[best_rows], batch["labels"][best_rows])
            losses = losses + config.lm_coef * nll
            metrics["chosen_nll"] = nll.detach().sum()
        return losses.sum(), metrics

    @torch.no_grad()
    def evaluate(model):
        if not eval_rows:
            return {}
        was_training = model.training
        model.eval()
        correct = 0.0
        for start in range(0, len(eval_rows), _EVAL_BATCH):
            chunk = eval_rows[start : start + _EVAL_BATCH]
            if schema == "states":
                batch = encode_states(chunk)
                correct += float(_on_label_side(reward_scores(model, batch), batch["value_labels"]).sum())
            else:
                chosen, rejected = reward_scores(model, encode_pairs(tokenizer, chunk, config.max_length)).chunk(2)
                correct += float(ranked_first(chosen, rejected).sum())
        model.train(was_training)
        return {"value_accuracy" if schema == "states" else "preference_accuracy": correct / len(eval_rows)}

    batches = micro_batches(rows, config.batch_size, config.seed, collate)
    return train_and_evaluate(model, tokenizer, config, loss_fn, batches, run_dir, evaluate)


def _on_label_side(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """1 where ``sigmoid(score)`` is on the side of 1/2 that the 0/1 label is, 1/2 at a
    score of exactly 0 (as ``ranked_first`` counts a tie), else 0."""
    side = torch.sign(scores.float()) * (2 * labels.to(scores.device).float() - 1)
    return (side + 1) / 2
