"""Trust Region Policy Optimization (Schulman et al., 2015) for a language-model policy.

One optimizer step of the shared loop is one rollout and one TRPO update:

1. Rollout: ``prompts_per_rollout`` prompts, ``num_generations`` samples each, and their
   rewards. The advantage of a completion is its group z-score
   (``fastpo.kernels.group_advantages`` with ``scale_rewards`` and ``advantage_eps``, as
   in grpo): the baseline is the mean reward of the prompt's samples, and no value
   function is fitted. Every completion token carries its completion's advantage.
2. Surrogate ``L(theta) = sum_t r_t A_t / N`` over the rollout's ``N`` completion tokens,
   ``r = exp(lp - lp_old)`` with ``lp_old`` the log-probs at the sampling weights
   ``theta_old`` (from the training forward, so ``r = 1`` there); ``g = grad L(theta_old)``.
3. ``H``: the Hessian at ``theta_old`` of the mean over the completion tokens of the
   full-vocabulary ``KL(pi_old || pi_theta)``. Products ``H v`` are exact: double backward
   through an eager KL of the float32 logits, because ``fastpo.kernels.logits_kl`` has
   no second derivative (and takes no gradient for its second distribution).
   ``cg_iters`` steps of conjugate gradient give ``d ~ (H + cg_damping I)^-1 g``. The
   KL's gradient is built once per update with its graph kept, so each product is one
   backward pass; that graph holds the whole rollout's activations during the solve.
4. Full step ``s = sqrt(2 max_kl / d^T (H + cg_damping I) d) d``: where the quadratic
   model of the KL reaches ``max_kl``.
5. Line search: ``theta_old + backtrack_factor**k s`` for ``k = 0 .. line_search_tries-1``;
   the first whose surrogate exceeds ``L(theta_old)`` and whose KL, measured by
   ``fastpo.kernels.logits_kl`` over the completion tokens, is at most ``max_kl`` is
   kept. When none is, the parameters stay at ``theta_old``.

The update runs with dropout off (``model.eval()``), so that the line search compares
deterministic functions of the parameters.

In the shared loop, which owns AdamW: ``loss_fn`` makes the whole update on the
parameters in place and returns ``-L`` of the kept parameters as a leaf tensor with no
path to them. The loop's backward then gives no parameter a gradient, and AdamW skips
parameters without one: the TRPO step is the only change to the weights (no AdamW step,
no weight decay), and the logged ``grad_norm`` is 0. So ``learning_rate``,
``warmup_steps``, ``lr_schedule`` and ``max_grad_norm`` do not apply, and
``weight_decay`` must be 0. The micro-batch of a step is the whole rollout
(``grad_accum_steps=1``), cut into forward passes of ``batch_size`` completions;
``num_iterations`` must be 1. The unit of the loss is the rollout (``num_units`` 1): the
logged ``loss`` is ``-L(theta_new)``. One process only (the update needs the full
parameters).

Logged per step: ``surrogate_improvement`` (``L(theta_new) - L(theta_old)``, 0 without a
step), ``kl`` (measured KL of the kept step, 0 without), ``accepted`` (1 or 0),
``backtracks`` (line-search tries rejected), ``reward``, ``completion_length`` and
``truncated`` (means over the rollout's completions).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastpo.kernels import group_advantages, logits_kl, token_logprobs

from .. import distributed
from ..config import ConfigError, TRPOConfig
from ._common import prepare_run, train_and_evaluate
from ._online import OnlineRun, RolloutStream, per_completion_metrics

__all__ = [
    "completion_logits",
    "conjugate_gradient",
    "kl_hessian_product",
    "rollout_chunks",
    "run",
    "trpo_update",
]

# Conjugate gradient stops early once |residual|^2 <= this share of |g|^2.
_CG_RELATIVE_TOLERANCE = 1e-10


def run(config: TRPOConfig) -> dict:
    for name in ("grad_accum_steps", "num_iterations"):
        if getattr(config, name) != 1:
            raise ConfigError(
                f"option {name!r}: got {getattr(config, name)}; trpo takes one update per rollout, so it must be 1"
            )
    if not config.backtrack_factor < 1:
        raise ConfigError(f"option 'backtrack_factor': got {config.backtrack_factor}; expected a value in (0, 1)")
    if config.weight_decay:
        raise ConfigError(f"option 'weight_decay': got {config.weight_decay}; trpo makes no AdamW step, so it must be 0")
    run_dir, model, tokenizer, device = prepare_run("trpo", config)
    if distributed.world(device).size > 1:
        raise NotImplementedError("trpo: the update needs the full parameters; run it in one process")
    online = OnlineRun("trpo", config, tokenizer, device)

    def make_rollout(index: int) -> list[dict]:
        rows = online.prompt_rows(index)
        rollout, rewards = online.sample(model, rows)
        advantages = group_advantages(
            rewards, config.num_generations, scale=config.scale_rewards, eps=config.advantage_eps
        )
        return [{
            "chunks": rollout_chunks(rollout, advantages, config.batch_size),
            "metrics": online.rollout_metrics(rollout, rewards),
            "num_units": 1,
        }]

    def loss_fn(model, batch):
        model.eval()
        stats, surrogate = trpo_update(model, batch["chunks"], config)
        model.train()
        return torch.tensor(-surrogate, requires_grad=True), {**stats, **per_completion_metrics(batch["metrics"])}

    return train_and_evaluate(model, tokenizer, config, loss_fn, RolloutStream(make_rollout), run_dir, online.evaluate)


def rollout_chunks(rollout, advantages: torch.Tensor, batch_size: int) -> list[dict]:
    """The rollout cut into forward passes of ``batch_size`` completions, each holding
    ``input_ids``, ``attention_mask``, ``mask`` (B, T) and, per completion token in
    mask order, ``targets`` and ``advantages`` (N,)."""
    chunks = []
    for start in range(0, rollout.input_ids.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        mask = rollout.mask[rows]
        chunks.append({
            "input_ids": rollout.input_ids[rows],
            "attention_mask": rollout.attention_mask[rows],
            "mask": mask,
            "targets": rollout.labels[rows][mask],
            "advantages": advantages[rows, None].expand(mask.shape)[mask],
        })
    return chunks


def completion_logits(model, chunk: dict) -> torch.Tensor:
    """Logits ``(N, V)`` at the chunk's completion positions, as the model's head gives
    them (bias and Gemma 2's softcap included), before the temperature; float32, or
    float64 for a float64 model."""
    device = next(model.parameters()).device
    hidden = model.get_decoder()(
        input_ids=chunk["input_ids"].to(device), attention_mask=chunk["attention_mask"].to(device), use_cache=False
    ).last_hidden_state
    logits = model.get_output_embeddings()(hidden[chunk["mask"].to(device)])
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    softcap = getattr(model.config, "final_logit_softcapping", None)
    return softcap * torch.tanh(logits / softcap) if softcap else logits


def _full_kl(old_logits: torch.Tensor, logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-token ``KL(softmax(old/T) || softmax(new/T))``, eager and twice differentiable
    in ``logits``."""
    old = (old_logits / temperature).log_softmax(-1)
    new = (logits / temperature).log_softmax(-1)
    return (old.exp() * (old - new)).sum(-1)


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1).to(torch.promote_types(t.dtype, torch.float32)) for t in tensors])


def _gradient(value: torch.Tensor, params: list, **options) -> torch.Tensor:
    return _flat(torch.autograd.grad(value, params, materialize_grads=True, **options))


@torch.no_grad()
def _set_parameters(params: list, flat: torch.Tensor) -> None:
    offset = 0
    for p in params:
        p.copy_(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


def kl_hessian_product(model, params: list, chunks: list[dict], old_logits: list[torch.Tensor],
                       temperature: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """``v -> H v`` for flat vectors over ``params``: ``H`` the Hessian, at the current
    parameters, of the mean over the chunks' completion tokens of
    ``KL(softmax(old_logits/T) || pi_theta)``, by double backward. The KL's gradient is
    built once, with its graph kept, and each product back-propagates ``grad . v``
    through that graph: the parameters must not change while the products are taken."""
    tokens = sum(int(chunk["mask"].sum()) for chunk in chunks)
    kl_gradient = 0
    # The fused attention kernels of CUDA have no second derivative; the math one has.
    with sdpa_kernel(SDPBackend.MATH):
        for chunk, old in zip(chunks, old_logits):
            kl = _full_kl(old, completion_logits(model, chunk), temperature).sum() / tokens
            kl_gradient = kl_gradient + _gradient(kl, params, create_graph=True)

    def product(vector: torch.Tensor) -> torch.Tensor:
        return _gradient(kl_gradient @ vector, params, retain_graph=True)

    return product


def conjugate_gradient(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, iterations: int) -> torch.Tensor:
    """``x ~ A^-1 b`` after at most ``iterations`` steps of conjugate gradient, for the
    symmetric positive definite ``A`` of ``matvec(v) = A v``, starting from 0."""
    x = torch.zeros_like(b)
    residual = b.clone()
    direction = b.clone()
    squared = residual @ residual
    stop = _CG_RELATIVE_TOLERANCE * squared
    for _ in range(iterations):
        if squared <= stop:
            break
        product = matvec(direction)
        alpha = squared / (direction @ product)
        x += alpha * direction
        residual -= alpha * product
        new_squared = residual @ residual
        direction = residual + (new_squared / squared) * direction
        squared = new_squared
    return x


@torch.no_grad()
def _surrogate_and_kl(model, chunks, old_logits, old_logprobs, temperature, tokens) -> tuple[float, float]:
    surrogate, kl = 0.0, 0.0
    for chunk, old, old_lp in zip(chunks, old_logits, old_logprobs):
        logits = completion_logits(model, chunk)
        ratio = torch.exp(token_logprobs(logits, chunk["targets"], temperature=temperature) - old_lp)
        surrogate += float((ratio * chunk["advantages"]).sum()) / tokens
        kl += float(logits_kl(old, logits, temperature=temperature).sum()) / tokens
    return surrogate, kl


def trpo_update(model, chunks: list[dict], config) -> tuple[dict, float]:
    """One TRPO update of ``model``'s parameters in place on a rollout's ``chunks``
    (``rollout_chunks``); ``(stats, surrogate)``: the logged statistics and the
    surrogate of the kept parameters. ``config`` gives ``temperature``, ``max_kl``,
    ``cg_iters``, ``cg_damping``, ``backtrack_factor`` and ``line_search_tries``."""
    device = next(model.parameters()).device
    chunks = [{name: value.to(device) for name, value in chunk.items()} for chunk in chunks]
    params = [p for p in model.parameters() if p.requires_grad]
    temperature = config.temperature
    tokens = sum(int(chunk["mask"].sum()) for chunk in chunks)
    # r = 1 at theta_old: the surrogate there is the mean advantage.
    old_surrogate = float(sum(chunk["advantages"].sum() for chunk in chunks)) / tokens
    no_step = {"surrogate_improvement": 0.0, "kl": 0.0, "accepted": 0.0, "backtracks": 0.0}

    old_logits, old_logprobs = [], []
    gradient = 0
    for chunk in chunks:
        logits = completion_logits(model, chunk)
        logprobs = token_logprobs(logits, chunk["targets"], temperature=temperature)
        surrogate = (torch.exp(logprobs - logprobs.detach()) * chunk["advantages"]).sum() / tokens
        gradient = gradient + _gradient(surrogate, params)
        old_logits.append(logits.detach())
        old_logprobs.append(logprobs.detach())
    if not gradient.any():  # every advantage 0: no direction to improve in
        return no_step, old_surrogate

    hessian_product = kl_hessian_product(model, params, chunks, old_logits, temperature)

    def damped_product(vector):
        return hessian_product(vector) + config.cg_damping * vector

    direction = conjugate_gradient(damped_product, gradient, config.cg_iters)
    curvature = direction @ damped_product(direction)
    if not curvature > 0:
        return no_step, old_surrogate
    step = torch.sqrt(2 * config.max_kl / curvature) * direction
    old_params = _flat(params).detach().clone()
    for tried in range(config.line_search_tries):
        _set_parameters(params, old_params + config.backtrack_factor**tried * step)
        surrogate, kl = _surrogate_and_kl(model, chunks, old_logits, old_logprobs, temperature, tokens)
        if kl <= config.max_kl and surrogate > old_surrogate:
            return {
                "surrogate_improvement": surrogate - old_surrogate, "kl": kl, "accepted": 1.0, "backtracks": float(tried),
            }, surrogate
    _set_parameters(params, old_params)
    return {**no_step, "backtracks": float(config.line_search_tries)}, old_surrogate
