"""What the online algorithms (grpo, ppo, trpo, rlaif's policy stage) share: the prompt
stream, rollouts with rewards, the rollout buffer the shared loop reads micro-batches
from, and held-out evaluation by greedy decoding.

The loop's unit of work is the optimizer step; an online algorithm's is the rollout:
``prompts_per_rollout`` prompts, ``num_generations`` samples each, trained for
``num_iterations`` passes. ``RolloutStream`` bridges the two: it hands the loop
micro-batches from a buffer and makes the next rollout, with the model as the loop
has left it, when the buffer runs dry. The buffer depends on the model that sampled it,
so it is part of every checkpoint (``state_dict``); the sampling RNG is the global torch
RNG, which the loop's checkpoints hold too: a resumed run draws the same samples.

Under torchrun the rollout is made with the full parameters gathered on every rank (the
loop sets ``RolloutStream.full_model``), each rank samples its share of the completions
and scores them, and the shares are gathered: every rank then holds the whole rollout,
computes its old and reference log-probs and advantages over the whole batch (whitening
and group statistics see every completion), and trains on its share of the step's
micro-batches, as for any other data. Generation, the costly part, is split N ways.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from .. import distributed
from ..forward import greedy_completions
from ..loop import autocast_dtype
from ..rollout import Rollout, concatenate_rollouts, reward_function, sample_completions
from ..step_metrics import maximum
from ..tasks import BUILTIN_TASKS
from ._common import exact_match_accuracy, heldout_rows, micro_batches, run_tasks, train_and_evaluate, training_rows

__all__ = [
    "OnlineRun",
    "RolloutStream",
    "per_completion_metrics",
    "policy_loss_metrics",
    "split_micro_batches",
    "training_precision",
]


class RolloutStream:
    """The loop's ``batches``: micro-batches from a buffer refilled by
    ``make_rollout(index) -> list of micro-batches`` (every micro-batch of the rollout's
    optimizer steps, all passes included), ``index`` counting rollouts from 0.
    ``generated_tokens``: the tokens the run's rollouts decoded, as ``make_rollout`` adds
    them (each process counts the whole rollout it trains on, the same on every rank),
    over every session of the run (None when resumed from a checkpoint that predates the
    count)."""

    def __init__(self, make_rollout: Callable[[int], list[dict]]):
        self.make_rollout = make_rollout
        self.pending: list[dict] = []
        self.rollouts = 0
        self.generated_tokens: int | None = 0
        # The context a rollout is made in; the loop of a sharded model sets one that
        # gathers its full parameters, so that generate can call the model as a plain module.
        self.full_model: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext

    def __call__(self, position: int) -> Iterator[dict]:
        while True:
            if not self.pending:
                with self.full_model():
                    self.pending = self.make_rollout(self.rollouts)
                self.rollouts += 1
            yield self.pending.pop(0)

    def count_generated(self, tokens: int) -> None:
        if self.generated_tokens is not None:
            self.generated_tokens += tokens

    def state_dict(self) -> dict:
        return {"pending": list(self.pending), "rollouts": self.rollouts, "generated_tokens": self.generated_tokens}

    def load_state_dict(self, state: dict) -> None:
        self.pending, self.rollouts = list(state["pending"]), state["rollouts"]
        self.generated_tokens = state.get("generated_tokens")


def split_micro_batches(tensors: dict[str, torch.Tensor], batch_size: int, passes: int) -> list[dict]:
    """``tensors`` (each with the completions on dim 0) cut into micro-batches of
    ``batch_size`` rows, the whole sequence repeated ``passes`` times."""
    total = next(iter(tensors.values())).shape[0]
    chunks = [
        {name: value[start : start + batch_size] for name, value in tensors.items()}
        for start in range(0, total, batch_size)
    ]
    return [dict(chunk) for _ in range(passes) for chunk in chunks]


class OnlineRun:
    """The prompts, rewards and evaluation of one online run.

    Attributes:
        rows: training rows (each with a ``"prompt"``).
        rewards: ``rewards(prompts, completions, rows) -> (B,)`` from ``config.rewards``
            (``engine.rollout.RewardSources``: also each source's rewards).
    """

    def __init__(self, algorithm: str, config, tokenizer, device: torch.device):
        self.config = config
        self.tokenizer = tokenizer
        self.world = distributed.world(device)
        self.rows = training_rows(algorithm, config, "prompt")
        self.eval_rows = heldout_rows(algorithm, config, "prompt")
        self.tasks = run_tasks(config)
        self.rewards = reward_function(config.rewards, config.reward_weights, self.tasks)
        self._prompt_batches = micro_batches(self.rows, config.prompts_per_rollout, config.seed, list)

    def prompt_rows(self, index: int) -> list[dict]:
        """The rows of rollout ``index``, each repeated ``num_generations`` times in a row
        (the group layout of ``fastpo.kernels.group_advantages``)."""
        rows = next(self._prompt_batches(index))
        return [row for row in rows for _ in range(self.config.num_generations)]

    def sample(self, model, rows: list[dict]) -> tuple[Rollout, torch.Tensor]:
        """Sampled completions of ``rows``' prompts and their rewards ``(B,)``; under
        torchrun each rank samples and scores a contiguous share of ``rows`` (the loop's
        ``grad_accum_steps`` check makes the shares equal) and every rank gets them all."""
        rollout, components = self.sample_components(model, rows)
        return rollout, self.rewards.combine(components)

    def sample_components(self, model, rows: list[dict]) -> tuple[Rollout, torch.Tensor]:
        """``sample``'s rollout with each reward source's rewards, ``(B, K)`` unweighted."""
        c, world = self.config, self.world
        share = len(rows) // world.size
        mine = rows[world.rank * share : (world.rank + 1) * share]
        rollout = sample_completions(
            model, self.tokenizer, [row["prompt"] for row in mine], temperature=c.temperature, top_p=c.top_p,
            top_k=c.top_k, max_new_tokens=c.max_new_tokens, stop_strings=c.stop_strings, max_length=c.max_length,
        )
        rewards = self.rewards.components(rollout.prompts, rollout.completions, mine)
        if world.size == 1:
            return rollout, rewards
        parts = world.gather((rollout, rewards))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        return concatenate_rollouts([part for part, _ in parts], pad), torch.cat([scores for _, scores in parts])

    def rollout_metrics(self, rollout: Rollout, rewards: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-completion values the loss functions log as per-completion means."""
        return {
            "reward": rewards,
            "completion_length": rollout.mask.sum(-1).float(),
            "truncated": rollout.truncated.float(),
        }

    def train(
        self, model, loss_fn: Callable | None, stream: RolloutStream, run_dir, update: Callable | None = None
    ) -> dict:
        """``train_and_evaluate`` on ``stream``'s rollouts with this run's ``evaluate``; the
        summary's ``generated_tokens`` is the stream's count over the whole run."""
        outcome = train_and_evaluate(
            model, self.tokenizer, self.config, loss_fn, stream, run_dir, self.evaluate, update=update
        )
        outcome["metrics"]["generated_tokens"] = stream.generated_tokens
        return outcome

    def evaluate(self, model) -> dict:
        """Greedy completions of the held-out prompts, cut at ``stop_strings`` as the
        samples are: ``heldout_accuracy`` (exact match) on a built-in task, else
        ``heldout_reward`` (the mean reward)."""
        stops = self.config.stop_strings
        if self.config.data in BUILTIN_TASKS and self.config.eval_data is None:
            return {"heldout_accuracy": exact_match_accuracy(model, self.tokenizer, self.eval_rows, stops, self.tasks)}
        prompts = [row["prompt"] for row in self.eval_rows]
        completions = greedy_completions(model, self.tokenizer, prompts, max_new_tokens=self.config.max_new_tokens,
                                         stop_strings=stops)
        return {"heldout_reward": float(self.rewards(prompts, completions, self.eval_rows).mean())}


def training_precision(config, device: torch.device):
    """The ``torch.autocast`` context the loop runs ``loss_fn`` under (a null context
    without autocast): stored old and reference log-probs must be computed in the same
    precision as the training forward, or the first pass's ratio is not 1."""
    dtype = autocast_dtype(config, device)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def per_completion_metrics(values: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """``{name: (sum, count)}`` over a micro-batch's completions, for the loop's log."""
    return {name: (value.sum(), value.numel()) for name, value in values.items()}


def policy_loss_metrics(stats: dict[str, torch.Tensor], tokens: torch.Tensor) -> dict:
    """``fastpo.kernels.policy_loss``'s metrics of a micro-batch of ``tokens`` valid
    tokens, declared for the loop's step reduction: ``ratio_max`` the step's maximum,
    every other one (a mean over the micro-batch's tokens) a mean over the step's tokens."""
    return {
        name: maximum(value) if name == "ratio_max" else (value * tokens, tokens)
        for name, value in stats.items()
    }
