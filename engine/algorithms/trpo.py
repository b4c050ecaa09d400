"""Trust Region Policy Optimization (Schulman et al., 2015) for a language-model policy.

One optimizer step of the shared loop is one rollout and one TRPO update:

1. Rollout: ``prompts_per_rollout`` prompts, ``num_generations`` samples each, and their
   rewards. The advantages are relative to the prompt's group of samples (no value
   function is fitted): with ``advantage=tree``, per token, TreeRL's advantage over the
   prefixes that the group's completions share (``fastpo.engine.tree_rollout.tree_advantages``)
   of the rewards scaled by the group's std; with ``advantage=group``, the completion's
   group z-score (``fastpo.kernels.group_advantages`` with ``scale_rewards`` and
   ``advantage_eps``, as in grpo) on each of its tokens.
2. Surrogate ``L(theta) = sum_t r_t A_t / N`` over the rollout's ``N`` completion tokens,
   ``r = exp(lp - lp_old)`` with ``lp_old`` the log-probs at the sampling weights
   ``theta_old`` (from the training forward, so ``r = 1`` there); ``g = grad L(theta_old)``.
3. ``H``: the Hessian at ``theta_old`` of the mean over the completion tokens of the
   full-vocabulary ``KL(pi_old || pi_theta)``, which there is the Fisher matrix
   ``J^T (diag(p) - p p^T) J / T^2`` per token. Products ``H v`` are exact and fused
   (``kl_hessian_product``): a Jacobian-vector product below the LM head, the head and
   the softmax's Fisher by ``fastpo.kernels.linear_fisher_vector_product`` without the
   (N, V) logits, and a vector-Jacobian product back. ``cg_iters`` steps of conjugate
   gradient give ``d ~ (H + cg_damping I)^-1 g``, preconditioned with
   ``cg_preconditioner=gradient_rms`` by the diagonal ``M = sqrt(v) + eps``, ``v`` the
   bias-corrected running mean of the squared gradients of the updates so far (Adam's
   second moment): one iteration gives ``d = M^-1 g`` (at the first update the
   gradient's sign). Conjugate gradient also returns ``d^T (H + cg_damping I) d`` from
   its residual, so one iteration is one product. The products are taken on every
   ``fisher_every``-th completion of the rollout (``every_nth_completion``; Schulman's
   TRPO also estimates the Fisher on a subsample), whose hidden states' graph is built
   once per update and kept during the solve.
4. Full step ``s = sqrt(2 max_kl / d^T (H + cg_damping I) d) d``: where the quadratic
   model of the KL reaches ``max_kl``.
5. Line search: ``theta_old + backtrack_factor**k s`` for ``k = 0 .. line_search_tries-1``;
   the first whose surrogate exceeds ``L(theta_old)`` and whose KL, measured by
   ``fastpo.kernels.logits_kl`` over the completion tokens, is at most ``max_kl`` is
   kept. When none is, the parameters stay at ``theta_old``.

The update runs with dropout off (``model.eval()``), so that the line search compares
deterministic functions of the parameters.

In the shared loop: TRPO's step is the loop's update hook (``TRPOUpdate``, in place of
the default AdamW step), and it has no loss function. The loop keeps the data order,
logging, evaluation, checkpoints and resume; the update takes the step's one
micro-batch, the whole rollout (cut into forward passes of ``batch_size`` completions),
and changes the weights by the steps above. There is no AdamW step, so its options
(``learning_rate``, ``weight_decay``, ``warmup_steps``, ``lr_schedule``,
``max_grad_norm``) and ``grad_accum_steps`` and ``num_iterations`` are not options of
``TRPOConfig``, which refuses them by name. One process only (the update needs the full
parameters).

Logged per step: ``surrogate`` (``L`` of the kept parameters), ``surrogate_improvement``
(``L(theta_new) - L(theta_old)``, 0 without a step), ``kl`` (measured KL of the kept
step, 0 without), ``accepted`` (1 or 0), ``backtracks`` (line-search tries rejected),
``units`` (the rollout's completion tokens), ``reward``, ``completion_length`` and
``truncated`` (means over the rollout's completions). No ``loss``, ``lr`` or
``grad_norm``: TRPO has none.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastpo.kernels import group_advantages, linear_fisher_vector_product, logits_kl, token_logprobs

from .. import distributed
from ..config import TRPOConfig
from ..loop import StepOutcome, Update
from ..step_metrics import StepMetrics
from ..tree_rollout import tree_advantages
from ._common import prepare_run
from ._online import OnlineRun, RolloutStream, per_completion_metrics

__all__ = [
    "TRPOUpdate",
    "completion_logits",
    "conjugate_gradient",
    "every_nth_completion",
    "kl_hessian_product",
    "rollout_chunks",
    "run",
    "trpo_update",
]

# Conjugate gradient stops early once |residual|^2 <= this share of |g|^2.
_CG_RELATIVE_TOLERANCE = 1e-10
# cg_preconditioner=gradient_rms: Adam's second-moment decay and epsilon.
_RMS_DECAY = 0.99
_RMS_EPS = 1e-8


def run(config: TRPOConfig, warm_start=None) -> dict:
    run_dir, model, tokenizer, device = prepare_run("trpo", config, warm_start=warm_start)
    if distributed.world(device).size > 1:
        raise NotImplementedError("trpo: the update needs the full parameters; run it in one process")
    online = OnlineRun("trpo", config, tokenizer, device)

    def make_rollout(index: int) -> list[dict]:
        rows = online.prompt_rows(index)
        rollout, rewards = online.sample(model, rows)
        stream.count_generated(int(rollout.mask.sum()))
        advantages = group_advantages(
            rewards, config.num_generations, scale=config.scale_rewards, eps=config.advantage_eps
        )
        if config.advantage == "tree":
            # TreeRL's advantages are differences of the group's mean rewards: the group
            # z-scores give those of the scaled rewards (each group's mean cancels).
            advantages = tree_advantages(rollout, advantages, config.num_generations)
        return [{
            "chunks": rollout_chunks(rollout, advantages, config.batch_size),
            "metrics": online.rollout_metrics(rollout, rewards),
            "num_units": int(rollout.mask.sum()),
        }]

    stream = RolloutStream(make_rollout)
    return online.train(model, None, stream, run_dir, update=TRPOUpdate)


class TRPOUpdate(Update):
    """The loop's step for trpo: ``trpo_update`` on the step's one micro-batch (a whole
    rollout: ``chunks``, per-completion ``metrics`` and ``num_units``, its completion
    tokens), with dropout off so that the line search compares deterministic functions
    of the parameters. With ``cg_preconditioner=gradient_rms`` its state is the running
    mean of the squared gradients and the number of updates taken (restored from a
    checkpoint's step); a checkpoint of an older fastpo, whose TRPO ran beside an idle
    AdamW, holds an optimizer state that is ignored."""

    def __init__(self, *, model, params, config: TRPOConfig, world):
        self.config = config
        self.updates = 0
        self.square_average = None

    def gradient_rms_preconditioner(self, gradient: torch.Tensor) -> torch.Tensor:
        """``1 / (sqrt(v) + eps)``, ``v`` the bias-corrected running mean of the squared
        gradients of the updates so far, this one's included (Adam's second moment)."""
        squared = gradient.square()
        if self.square_average is None:
            self.square_average = torch.zeros_like(squared)
        self.square_average.mul_(_RMS_DECAY).add_(squared, alpha=1 - _RMS_DECAY)
        corrected = self.square_average / (1 - _RMS_DECAY ** (self.updates + 1))
        return 1 / (corrected.sqrt() + _RMS_EPS)

    def step(self, model, loss_fn, micro_batches, *, world, autocast) -> StepOutcome:
        (batch,) = micro_batches
        preconditioner = self.gradient_rms_preconditioner if self.config.cg_preconditioner == "gradient_rms" else None
        model.eval()
        with torch.autocast(world.device.type, dtype=autocast) if autocast else contextlib.nullcontext():
            stats, surrogate = trpo_update(model, batch["chunks"], self.config, preconditioner=preconditioner)
        model.train()
        self.updates += 1
        metrics = StepMetrics(world.device)
        metrics.add(per_completion_metrics(batch["metrics"]))
        record = {"surrogate": surrogate, **stats, "units": batch["num_units"], **metrics.reduce(batch["num_units"])}
        return StepOutcome(record, None if math.isfinite(surrogate) else "non-finite surrogate")

    def state_dict(self) -> dict:
        return {} if self.square_average is None else {"trpo_gradient_square_average": self.square_average}

    def load_state_dict(self, state: dict) -> None:
        self.updates = state["step"]
        self.square_average = state.get("trpo_gradient_square_average")


def rollout_chunks(rollout, advantages: torch.Tensor, batch_size: int) -> list[dict]:
    """The rollout cut into forward passes of ``batch_size`` completions, each holding
    ``input_ids``, ``attention_mask``, ``mask`` (B, T) and, per completion token in
    mask order, ``targets`` and ``advantages`` (N,); ``advantages`` are one per
    completion (B,) or per token (B, T)."""
    chunks = []
    for start in range(0, rollout.input_ids.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        mask = rollout.mask[rows]
        per_token = advantages[rows] if advantages.dim() == 2 else advantages[rows, None].expand(mask.shape)
        chunks.append({
            "input_ids": rollout.input_ids[rows],
            "attention_mask": rollout.attention_mask[rows],
            "mask": mask,
            "targets": rollout.labels[rows][mask],
            "advantages": per_token[mask],
        })
    return chunks


def every_nth_completion(chunks: list[dict], n: int) -> list[dict]:
    """The completions ``0, n, 2n, ...`` of the rollout in ``chunks`` (counted across the
    chunks), as chunks of ``input_ids``, ``attention_mask`` and ``mask``: the subsample
    the KL-Hessian products are taken on. A rollout lists each prompt's completions in a
    row, so a stride of at most the group size keeps every prompt."""
    picked, offset = [], 0
    for chunk in chunks:
        rows = chunk["mask"].shape[0]
        first = -offset % n
        if first < rows:
            picked.append({name: chunk[name][first::n] for name in ("input_ids", "attention_mask", "mask")})
        offset += rows
    return picked


def _completion_hidden(model, chunk: dict) -> torch.Tensor:
    """The last hidden states ``(N, H)`` at the chunk's completion positions: the input of
    the LM head."""
    device = next(model.parameters()).device
    hidden = model.get_decoder()(
        input_ids=chunk["input_ids"].to(device), attention_mask=chunk["attention_mask"].to(device), use_cache=False
    ).last_hidden_state
    return hidden[chunk["mask"].to(device)]


def completion_logits(model, chunk: dict) -> torch.Tensor:
    """Logits ``(N, V)`` at the chunk's completion positions, as the model's head gives
    them (bias and Gemma 2's softcap included), before the temperature; float32, or
    float64 for a float64 model."""
    logits = model.get_output_embeddings()(_completion_hidden(model, chunk))
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    softcap = getattr(model.config, "final_logit_softcapping", None)
    return softcap * torch.tanh(logits / softcap) if softcap else logits


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


def kl_hessian_product(model, params: list, chunks: list[dict],
                       temperature: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """``v -> F v`` for flat vectors over ``params``: ``F`` the Fisher matrix of the policy at
    the current parameters, averaged over the chunks' completion tokens, which is the Hessian
    of the mean ``KL(pi_old || pi_theta)`` at ``theta = theta_old``. The parameters must be
    theta_old and must not change while the products are taken.

    Per token ``F v = J^T (p * (J v - <p, J v>)) / T^2``, J the Jacobian of the logits, in
    three parts. Below the LM head, ``J v`` by the double-vjp trick: the graph of the hidden
    states is built once, with the graph of ``w -> J^T w`` for a dummy ``w``; differentiating
    ``(J^T w) . v`` in ``w`` gives ``J v``. Through the head and the softmax,
    ``fastpo.kernels.linear_fisher_vector_product``, chunk by chunk, without the (N, V)
    logits. Back below the head, one vector-Jacobian product through the kept graph.

    Forward-mode ``torch.func.jvp`` gives ``J v`` too, but it runs the whole forward again
    at every product: about twice the time of the double-vjp on the built-in model
    (``torch.func.linearize``, which would trace it once, fails on the data-dependent
    control flow of Hugging Face's attention masks). The double-vjp needs what the double
    backward through the eager KL that it replaced needed: the math attention kernel."""
    tokens = sum(int(chunk["mask"].sum()) for chunk in chunks)
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    index = {id(p): i for i, p in enumerate(params)}
    weight_index = index.get(id(head.weight))
    bias_index = None if head.bias is None else index.get(id(head.bias))
    graphs = []
    # The fused attention kernels have no second derivative; the math one has.
    with sdpa_kernel(SDPBackend.MATH):
        for chunk in chunks:
            hidden = _completion_hidden(model, chunk)
            dummy = torch.zeros_like(hidden, requires_grad=True)
            transposed = torch.autograd.grad(hidden, params, dummy, create_graph=True, allow_unused=True)
            graphs.append((hidden, dummy, transposed))

    def product(vector: torch.Tensor) -> torch.Tensor:
        # The mean over tokens, applied once to the tangent (F is linear).
        pieces = (vector / tokens).split([p.numel() for p in params])
        pieces = [piece.view_as(p).to(p.dtype) for piece, p in zip(pieces, params)]
        total = torch.zeros_like(vector)
        for hidden, dummy, transposed in graphs:
            used = [(t, piece) for t, piece in zip(transposed, pieces) if t is not None]
            d_hidden = torch.zeros_like(hidden) if not used else torch.autograd.grad(
                [t for t, _ in used], dummy, [piece for _, piece in used], retain_graph=True, materialize_grads=True
            )[0]
            grad_hidden, grad_weight, grad_bias = linear_fisher_vector_product(
                hidden.detach(), head.weight, d_hidden, None if weight_index is None else pieces[weight_index],
                bias=head.bias, d_bias=None if bias_index is None else pieces[bias_index],
                temperature=temperature, softcap=softcap,
            )
            grads = list(torch.autograd.grad(hidden, params, grad_hidden, retain_graph=True, materialize_grads=True))
            for i, head_grad in ((weight_index, grad_weight), (bias_index, grad_bias)):
                if i is not None:
                    grads[i] = grads[i] + head_grad
            total += _flat(grads)
        return total

    return product


def conjugate_gradient(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, iterations: int,
                       inverse_preconditioner: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, x^T A x)``: ``x ~ A^-1 b`` after at most ``iterations`` steps of conjugate
    gradient, for the symmetric positive definite ``A`` of ``matvec(v) = A v``, starting
    from 0; preconditioned by the diagonal ``M`` given as ``inverse_preconditioner = 1 / M``
    (positive; none: ``M = I``). ``x^T A x = x^T (b - r)`` with the residual ``r = b - A x``
    that the iteration keeps, so it costs no further product."""
    def precondition(vector):
        return vector if inverse_preconditioner is None else inverse_preconditioner * vector

    x = torch.zeros_like(b)
    residual = b.clone()
    preconditioned = precondition(residual)
    direction = preconditioned.clone()
    squared = residual @ preconditioned
    stop = _CG_RELATIVE_TOLERANCE * squared
    for _ in range(iterations):
        if squared <= stop:
            break
        product = matvec(direction)
        alpha = squared / (direction @ product)
        x += alpha * direction
        residual -= alpha * product
        preconditioned = precondition(residual)
        new_squared = residual @ preconditioned
        direction = preconditioned + (new_squared / squared) * direction
        squared = new_squared
    return x, x @ (b - residual)


@torch.no_grad()
def _surrogate_and_kl(model, chunks, old_logits, old_logprobs, temperature, tokens) -> tuple[float, float]:
    surrogate, kl = 0.0, 0.0
    for chunk, old, old_lp in zip(chunks, old_logits, old_logprobs):
        logits = completion_logits(model, chunk)
        ratio = torch.exp(token_logprobs(logits, chunk["targets"], temperature=temperature) - old_lp)
        surrogate += float((ratio * chunk["advantages"]).sum()) / tokens
        kl += float(logits_kl(old, logits, temperature=temperature).sum()) / tokens
    return surrogate, kl


def trpo_update(model, chunks: list[dict], config, *,
                preconditioner: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[dict, float]:
    """One TRPO update of ``model``'s parameters in place on a rollout's ``chunks``
    (``rollout_chunks``); ``(stats, surrogate)``: the logged statistics and the
    surrogate of the kept parameters. ``config`` gives ``temperature``, ``max_kl``,
    ``cg_iters``, ``cg_damping``, ``fisher_every``, ``backtrack_factor`` and
    ``line_search_tries``; ``preconditioner(gradient)`` gives conjugate gradient's
    inverse diagonal preconditioner (none: plain conjugate gradient)."""
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

    fisher_chunks = every_nth_completion(chunks, config.fisher_every)
    hessian_product = kl_hessian_product(model, params, fisher_chunks, temperature)

    def damped_product(vector):
        return hessian_product(vector) + config.cg_damping * vector

    inverse_preconditioner = None if preconditioner is None else preconditioner(gradient)
    direction, curvature = conjugate_gradient(damped_product, gradient, config.cg_iters, inverse_preconditioner)
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
