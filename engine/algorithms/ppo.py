"""Proximal Policy Optimization with a value function, RLHF reward shaping and PPO-ptx.

Each rollout: ``prompts_per_rollout`` prompts, ``num_generations`` samples each, scored
by the reward sources of ``OnlineConfig`` (score ``s_i`` per completion). Without
gradient, at every completion token ``t``: the log-probs of the sampling policy
``lp_old``, of the frozen reference ``lp_ref`` (the model at the start of the run) and
the values ``V_old``. Then (docs/conventions.md):

* shaped rewards (InstructGPT): ``r_t = -beta * KL_t`` on every completion token, with
  ``KL_t`` the estimator ``kl_kind`` (``fastpo.kernels.kl_penalty``; by default k1,
  ``lp_old_t - lp_ref_t``, as InstructGPT and TRL) of ``lp_old_t - lp_ref_t``, plus
  ``s_i`` on the completion's last token;
* ``fastpo.kernels.gae`` (``gamma``, ``lam``): advantages, and returns ``A + V_old``;
  the advantages optionally whitened over the rollout's tokens (``fastpo.kernels.whiten``);
* ``beta`` fixed, or with ``kl_target`` adapted after every rollout by the controller of
  Ziegler et al. (2019): ``beta *= 1 + clip(KL / kl_target - 1, -0.2, 0.2) * n / kl_horizon``,
  ``KL`` the rollout's mean per-completion sum of ``KL_t``, ``n`` its completions.

The policy takes ``num_iterations`` passes of optimizer steps over the rollout; per
micro-batch the loss is ``policy_loss`` (the PPO clip, ``clip_eps``) plus ``vf_coef``
times ``value_loss`` (clipped by ``value_clip`` around ``V_old``), both token means,
with the optional entropy bonus. The loss unit is the completion token: the loop's
accumulation divides each step's summed loss by the step's completion tokens.

Values: a ``Linear(hidden, 1)`` head on the policy's last hidden states (one decoder
pass gives both), registered as the policy's submodule ``value_head``, so that the
optimizer trains it with the policy and every checkpoint saves and restores it (a
checkpoint's ``model/`` then loads as a causal LM with ``value_head.*`` left unused).
It starts at zero (every value starts at 0), and the value loss trains the shared
decoder too, as in TRL's value-head models. With ``critic=PATH`` the values come from a
separate one-label ``AutoModelForSequenceClassification`` (a ``fastpo reward``
checkpoint: its score head read at every token), registered as the submodule
``critic`` for the same reasons; it must share the policy's tokenizer.

PPO-ptx (``ptx_data`` and ``ptx_coef`` > 0): every micro-batch carries ``batch_size``
rows of pretraining text (``[bos] text [eos]``, every token after bos a target, at
temperature 1), drawn in order from a stream seeded by ``seed``. The loss of an
optimizer step is ``ppo_loss - ptx_coef * sum(log p) / P``: ``ppo_loss`` the step's
mean over its completion tokens, ``sum(log p)`` over the pretraining tokens of the
step's micro-batches and ``P`` their number (a token mean over the whole step, however
the step is cut into micro-batches). ``ptx_data=builtin:addition`` renders the task's
SFT demonstrations as ``prompt + completion`` text; a file holds ``{"text": ...}`` rows.

The adaptive ``beta`` and the micro-batches waiting in the rollout buffer (pretraining
batches included) are part of every checkpoint: a resumed run reproduces the
uninterrupted one.

Logged per step: ``reward`` (mean score), ``completion_length``, ``truncated``, ``kl``
(mean per-completion sum of ``KL_t`` at rollout time), ``kl_coef`` (the ``beta`` of the
shaping), ``policy_loss``, ``value_loss``, ``value_clip_frac``, ``policy_loss``'s metrics
(``clip_frac_low``/``high``, ``ratio_mean``, ``approx_kl``, and ``entropy_mean`` with the
entropy bonus; ``ratio_max`` the step's maximum), and ``ptx_loss`` (mean ``-log p`` per
pretraining token) with ptx.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch

from fastpo.kernels import gae, kl_penalty, policy_loss, value_loss, whiten

from ..config import ConfigError, PPOConfig
from ..data import DataError, load_rows
from ..forward import IGNORE_INDEX, encode_responses, response_logprobs
from ._common import BUILTIN_DATA, MAX_BUILTIN_ROWS, builtin_task, micro_batches, prepare_run
from ._online import (
    OnlineRun,
    RolloutStream,
    per_completion_metrics,
    policy_loss_metrics,
    split_micro_batches,
    training_precision,
)
from .reward import load_reward_model

__all__ = ["adaptive_kl_coef", "run", "shaped_rewards"]

_KL_ERROR_CLIP = 0.2  # Ziegler et al.'s bound on the controller's proportional error


def shaped_rewards(kl: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token RLHF rewards ``(B, T)``: ``-kl_coef * kl`` at every valid position of
    ``mask``, plus ``scores[i]`` at row ``i``'s last valid position; 0 elsewhere."""
    rewards = torch.where(mask, -kl_coef * kl, 0.0)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, -1).amax(dim=1)
    rows = torch.nonzero(last >= 0).squeeze(1)
    return rewards.index_put((rows, last[rows]), scores[rows].to(rewards.dtype), accumulate=True)


def adaptive_kl_coef(kl_coef: float, kl: float, *, target: float, horizon: int, completions: int) -> float:
    """The adaptive controller's next ``beta`` after a rollout of ``completions`` whose
    mean per-completion KL was ``kl`` (Ziegler et al. 2019, as InstructGPT and TRL)."""
    error = min(max(kl / target - 1.0, -_KL_ERROR_CLIP), _KL_ERROR_CLIP)
    return kl_coef * (1.0 + error * completions / horizon)


class _ShapingStream(RolloutStream):
    """The rollout stream, whose checkpointed state also holds ``kl_coef``: the ``beta``
    that shapes the next rollout's rewards (the adaptive controller's state)."""

    def __init__(self, make_rollout, kl_coef: float):
        super().__init__(make_rollout)
        self.kl_coef = kl_coef

    def state_dict(self) -> dict:
        return {**super().state_dict(), "kl_coef": self.kl_coef}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.kl_coef = state["kl_coef"]


def _pretraining_texts(config: PPOConfig) -> list[str]:
    """The PPO-ptx texts: the built-in task's SFT demonstrations as prompt + completion,
    or the ``"text"`` field of every row of ``ptx_data``."""
    if config.ptx_data == BUILTIN_DATA:
        needed = min(config.steps * config.grad_accum_steps * config.batch_size, MAX_BUILTIN_ROWS)
        return [row["prompt"] + row["completion"] for row in builtin_task(config).sft_examples(needed, "train")]
    path = Path(config.ptx_data)
    texts = [row["text"] for row in load_rows(path, "text")]
    if len(texts) < config.batch_size:
        raise DataError(f"option 'ptx_data': {path} holds {len(texts)} rows, fewer than batch_size={config.batch_size}")
    return texts


def _attach_critic(model, tokenizer, config: PPOConfig) -> None:
    """Register the value function as a submodule of ``model``: ``value_head`` on the
    policy's hidden states, or the separate ``critic`` model of ``config.critic``."""
    parameter = next(model.parameters())
    if config.critic is None:
        head = torch.nn.Linear(model.get_output_embeddings().weight.shape[1], 1)
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
        model.value_head = head.to(device=parameter.device, dtype=parameter.dtype)
        return
    critic, critic_tokenizer = load_reward_model(config.critic, seed=config.seed, dtype=parameter.dtype)
    if critic_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"option 'critic': {config.critic!r} has another tokenizer than the policy {config.model!r}")
    model.critic = critic.to(parameter.device)


@contextlib.contextmanager
def _last_hidden_state(decoder):
    """Keeps the ``last_hidden_state`` of ``decoder``'s forwards in the yielded dict."""
    captured = {}
    handle = decoder.register_forward_hook(lambda module, args, output: captured.update(hidden=output.last_hidden_state))
    try:
        yield captured
    finally:
        handle.remove()


def run(config: PPOConfig, warm_start=None) -> dict:
    run_dir, model, tokenizer, device = prepare_run("ppo", config, warm_start=warm_start)
    online = OnlineRun("ppo", config, tokenizer, device)
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    _attach_critic(model, tokenizer, config)
    need_entropy = config.entropy_coef > 0
    micro_per_step = config.grad_accum_steps
    micro_per_rollout = config.steps_per_pass * micro_per_step * config.num_iterations
    if config.ptx_data is not None:
        texts = _pretraining_texts(config)

        def encode_texts(batch_texts):
            return encode_responses(tokenizer, [""] * len(batch_texts), batch_texts, config.max_length)

        pretraining_batches = micro_batches(texts, config.batch_size, config.seed, encode_texts)

    def forward(model, batch, *, return_entropy=False):
        """``(logprobs, entropy or None, values)``, each ``(B, T)``, of a rollout batch."""
        if config.critic is None:
            # response_logprobs runs the decoder; the value head reads the same hidden states.
            decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
            with _last_hidden_state(decoder) as captured:
                out = logprobs_of(model, batch, return_entropy)
            values = model.value_head(captured["hidden"])
        else:
            out = logprobs_of(model, batch, return_entropy)
            critic = model.critic
            hidden = critic.base_model(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                use_cache=False,
            ).last_hidden_state
            values = critic.score(hidden)
        logprobs, entropy = out if return_entropy else (out, None)
        return logprobs, entropy, values.squeeze(-1).float()

    def logprobs_of(policy, batch, return_entropy=False):
        return response_logprobs(
            policy, batch["input_ids"], batch["attention_mask"], batch["labels"],
            temperature=config.temperature, return_entropy=return_entropy,
        )

    def make_rollout(index: int) -> list[dict]:
        rows = online.prompt_rows(index)
        rollout, scores = online.sample(model, rows)
        mask = rollout.mask
        stream.count_generated(int(mask.sum()))  # every process holds the whole rollout
        tensors = {"input_ids": rollout.input_ids, "attention_mask": rollout.attention_mask,
                   "labels": rollout.labels, "mask": mask}
        with torch.no_grad(), training_precision(config, device):
            old_logprobs, _, old_values = forward(model, tensors)
            ref_logprobs = logprobs_of(reference, tensors)
        old_logprobs, old_values, ref_logprobs = old_logprobs.cpu(), old_values.cpu(), ref_logprobs.cpu()
        kl = kl_penalty(old_logprobs, ref_logprobs, config.kl_kind) * mask
        kl_coef = stream.kl_coef
        advantages, returns = gae(
            shaped_rewards(kl, scores, mask, kl_coef), old_values, mask, gamma=config.gamma, lam=config.lam
        )
        if config.whiten_advantages:
            advantages = whiten(advantages, mask)
        sequence_kl = kl.sum(dim=1)
        if config.kl_target is not None:
            stream.kl_coef = adaptive_kl_coef(
                kl_coef, float(sequence_kl.mean()), target=config.kl_target, horizon=config.kl_horizon,
                completions=len(rows),
            )
        tensors.update(old_logprobs=old_logprobs, old_values=old_values, advantages=advantages, returns=returns)
        metrics = {**online.rollout_metrics(rollout, scores), "kl": sequence_kl,
                   "kl_coef": torch.full(scores.shape, kl_coef, dtype=torch.float64)}
        tensors.update({f"metric/{name}": value for name, value in metrics.items()})
        micro = split_micro_batches(tensors, config.batch_size, config.num_iterations)
        for batch in micro:
            batch["num_units"] = int(batch["mask"].sum())
        if config.ptx_data is not None:
            add_pretraining(micro, index)
        return micro

    def add_pretraining(micro: list[dict], index: int) -> None:
        """Give each micro-batch a pretraining batch and the weight ``ptx_coef * N / P``
        of its summed log-probs, ``N`` and ``P`` the completion and pretraining tokens of
        its optimizer step: the loop divides the step's loss by ``N``."""
        texts = pretraining_batches(index * micro_per_rollout)
        for start in range(0, len(micro), micro_per_step):
            step = micro[start : start + micro_per_step]
            extra = [next(texts) for _ in step]
            completion_tokens = sum(batch["num_units"] for batch in step)
            pretraining_tokens = sum(int((batch["labels"] != IGNORE_INDEX).sum()) for batch in extra)
            for batch, pretraining in zip(step, extra):
                batch.update({f"ptx_{name}": value for name, value in pretraining.items()})
                batch["ptx_weight"] = config.ptx_coef * completion_tokens / pretraining_tokens

    def loss_fn(model, batch):
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        logprobs, entropy, values = forward(model, batch, return_entropy=need_entropy)
        mask = batch["mask"]
        # The PPO clip, token mean (every PPO-clip loss type of policy_loss is this formula).
        policy_term, stats = policy_loss(
            logprobs, batch["old_logprobs"], batch["advantages"], mask, loss_type="grpo", agg="token-mean",
            clip_eps_low=config.clip_eps, entropy=entropy, entropy_coef=config.entropy_coef,
        )
        value_term, value_stats = value_loss(values, batch["old_values"], batch["returns"], mask, clip_eps=config.value_clip)
        loss = (policy_term + config.vf_coef * value_term) * batch["num_units"]
        tokens = mask.sum()
        metrics = policy_loss_metrics(stats, tokens)
        metrics["policy_loss"] = (policy_term * tokens, tokens)
        metrics["value_loss"] = (value_term * tokens, tokens)
        metrics["value_clip_frac"] = (value_stats["clip_frac"] * tokens, tokens)
        if "ptx_input_ids" in batch:
            # Plain log-likelihood of the pretraining text: temperature 1.
            ptx_logprobs = response_logprobs(
                model, batch["ptx_input_ids"], batch["ptx_attention_mask"], batch["ptx_labels"]
            ).sum()
            loss = loss - batch["ptx_weight"] * ptx_logprobs
            metrics["ptx_loss"] = (-ptx_logprobs, (batch["ptx_labels"] != IGNORE_INDEX).sum())
        metrics.update(per_completion_metrics({k[7:]: v for k, v in batch.items() if k.startswith("metric/")}))
        return loss, metrics

    stream = _ShapingStream(make_rollout, config.beta)
    return online.train(model, loss_fn, stream, run_dir)
