"""fastpo inside verl: its policy losses, advantage estimators and hidden-state
log-probs, registered in verl's own registries.

```python
import fastpo.integrations.verl
fastpo.integrations.verl.register()
# then, in verl's config:
#   actor_rollout_ref.actor.policy_loss.loss_mode=fastpo_vanilla   (or fastpo_gspo, fastpo_cispo, fastpo_sapo)
#   algorithm.adv_estimator=fastpo_grpo                             (or fastpo_rloo, fastpo_reinforce_plus_plus, ...)
#   actor_rollout_ref.model.use_fused_kernels=True                  (log-probs and entropy by fastpo)
```

``register()`` must run in every process that computes a loss or an advantage: verl's
Ray workers import their modules anew. Ray's setup hook does it in each of them:
``+ray_kwargs.ray_init.runtime_env.worker_process_setup_hook=fastpo.integrations.verl.register``.

Each ``fastpo_<name>`` policy loss has the math of verl's loss ``<name>`` and reads the
same config fields (``clip_ratio``, ``clip_ratio_low``/``_high``, ``clip_ratio_c``,
``tau_pos``/``tau_neg``, ``global_batch_info``, ``loss_scale_factor``), and each
``fastpo_<name>`` estimator has the signature of verl's ``<name>``; the arithmetic is
fastpo's kernels (``policy_loss``, ``kl_penalty``, ``group_advantages``,
``rloo_advantages``, ``gae``, ``whiten``, ``linear_token_logprobs``). Where fastpo's
math differs from verl's the function raises rather than compute another objective;
docs/integrations.md lists these cases.

verl is imported only by ``register()`` (fastpo imports without it).
"""

from __future__ import annotations

import importlib
from collections import defaultdict

import torch

from fastpo import kernels
from fastpo.integrations import installed_version, version_supported

# The verl releases this module is tested with (tests/test_integrations_verl.py); the
# registries' signatures and ``ActorConfig.global_batch_info`` are 0.9's.
SUPPORTED_VERSIONS = ">=0.9.1,<0.10"
TESTED_VERSIONS = ("0.9.1",)

# verl clamps the per-token log-ratio before exp in vanilla, CISPO and SAPO (and in
# their ppo_kl metric): one of its conventions in fastpo; and GSPO's log sequence-ratio
# at 10.
_LOG_RATIO_CLAMP = kernels.PolicyLossOptions.matching("verl").log_ratio_clamp
_SEQ_LOG_RATIO_CAP = 10.0


def check_version() -> str:
    """The installed verl version; ImportError when verl is missing, RuntimeError naming
    the installed version when it is outside ``SUPPORTED_VERSIONS``."""
    installed = installed_version("verl")
    if installed is None:
        raise ImportError(
            f"fastpo.integrations.verl needs verl{SUPPORTED_VERSIONS}, which is not installed "
            f"(pip install 'verl{SUPPORTED_VERSIONS}')"
        )
    if not version_supported(installed, SUPPORTED_VERSIONS):
        raise RuntimeError(
            f"fastpo.integrations.verl supports verl{SUPPORTED_VERSIONS} (tested: {', '.join(TESTED_VERSIONS)}); "
            f"the installed verl is {installed}"
        )
    return installed


# ------------------------------------------------------------------- aggregation


def _aggregation(loss_agg_mode: str, mask: torch.Tensor, config):
    """verl's ``agg_loss`` as fastpo's: ``(options, num_items, scale)``, the aggregation
    options of ``policy_loss``, the token count and the factor applied to its loss.

    verl normalizes by the global batch (``config.global_batch_info``: ``dp_size``,
    ``batch_num_tokens``, ``global_batch_size``, ``loss_scale_factor``) and multiplies by
    ``dp_size`` (DDP/FSDP average over ranks); without a global sequence count its
    sequence means are over the rows that have at least one valid token.
    """
    info = config.global_batch_info
    dp_size = info.get("dp_size") or 1
    batch_num_tokens = info.get("batch_num_tokens")
    global_batch_size = info.get("global_batch_size")
    loss_scale_factor = info.get("loss_scale_factor")
    if loss_agg_mode in ("token-mean", "token-sum"):
        if loss_agg_mode == "token-mean" and batch_num_tokens is None and dp_size > 1:
            raise ValueError(
                f"loss_agg_mode='token-mean' with dp_size={dp_size} needs global_batch_info['batch_num_tokens'] "
                "(verl raises the same)"
            )
        # token-sum is the token mean over a count of one
        count = 1 if loss_agg_mode == "token-sum" else batch_num_tokens
        num_items = None if count is None else torch.as_tensor(count, dtype=torch.float64, device=mask.device)
        return {"agg": "token-mean"}, num_items, float(dp_size)
    if loss_agg_mode not in ("seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean"):
        raise ValueError(
            f"loss_agg_mode={loss_agg_mode!r} is not one of 'token-mean', 'token-sum', 'seq-mean-token-sum', "
            "'seq-mean-token-sum-norm', 'seq-mean-token-mean'"
        )
    options = {"agg": loss_agg_mode}
    if loss_agg_mode == "seq-mean-token-sum-norm":
        options["max_len"] = int(loss_scale_factor) if loss_scale_factor is not None else mask.shape[-1]
    if global_batch_size is None:
        if dp_size > 1:
            raise ValueError(
                f"loss_agg_mode={loss_agg_mode!r} with dp_size={dp_size} needs global_batch_info['global_batch_size'] "
                "(verl raises the same)"
            )
        return dict(options, seq_mean_rows="nonempty"), None, 1.0
    # fastpo's "all" mean divides by this micro-batch's rows, verl by the global count
    return dict(options, seq_mean_rows="all"), None, mask.shape[0] * dp_size / float(global_batch_size)


# ------------------------------------------------------------------ policy losses


def _clip_range(config) -> tuple[float, float]:
    low = config.clip_ratio_low if config.clip_ratio_low is not None else config.clip_ratio
    high = config.clip_ratio_high if config.clip_ratio_high is not None else config.clip_ratio
    return low, high


def _rollout_weights(old_log_prob: torch.Tensor, rollout_is_weights: torch.Tensor | None) -> dict:
    """verl hands the loss precomputed rollout-correction weights ``w``; fastpo's
    token-level correction multiplies the policy term by ``exp(lp_old - lp_rollout)``,
    which is ``w`` for ``lp_rollout = lp_old - log w`` (``w = 0``, a rejected token,
    gives ``+inf`` there and weight 0)."""
    if rollout_is_weights is None:
        return {}
    weights = rollout_is_weights.detach().to(old_log_prob.dtype)
    return {"rollout_logprobs": old_log_prob.detach() - weights.log(), "rollout_is": "token"}


def _require_config(loss_mode: str, config) -> None:
    if config is None:
        raise ValueError(f"fastpo_{loss_mode} needs verl's actor config, got config=None")


def _require_row_constant(name: str, values: torch.Tensor, mask: torch.Tensor, why: str) -> None:
    """ValueError when ``values`` differ between the valid tokens of one row."""
    if values.dim() < 2:
        return
    values = values.detach().expand(mask.shape)
    row_max = values.masked_fill(~mask, float("-inf")).amax(-1)
    row_min = values.masked_fill(~mask, float("inf")).amin(-1)
    varying = (mask.any(-1) & (row_max != row_min)).nonzero()
    if varying.numel():
        row = int(varying[0, 0])
        low, high = row_min[row].item(), row_max[row].item()
        raise ValueError(f"{name} vary along response {row} (from {low} to {high}); {why}")


def _policy_loss(old_log_prob, log_prob, advantages, mask, loss_agg_mode, config, rollout_is_weights,
                 options, ppo_kl_clamp):
    """fastpo's ``policy_loss`` with verl's conventions, ``options`` and verl's
    aggregation. Returns the loss and fastpo's metrics plus ``ppo_kl``, verl's masked
    mean of ``lp_old - lp`` (k1 of the old policy against the current one, clamped like
    the loss's log-ratio), as 0-dim tensors."""
    aggregation, num_items, scale = _aggregation(loss_agg_mode, mask, config)
    loss, metrics = kernels.policy_loss(
        log_prob, old_log_prob, advantages, mask,
        options=kernels.PolicyLossOptions.matching("verl", **options, **aggregation),
        num_items=num_items, **_rollout_weights(old_log_prob, rollout_is_weights),
    )
    if scale != 1.0:
        loss = loss * scale
    with torch.no_grad():
        k1 = kernels.kl_penalty(old_log_prob.detach(), log_prob.detach(), "k1", clamp=ppo_kl_clamp)
        metrics["ppo_kl"] = torch.where(mask, k1, 0.0).sum() / mask.sum().clamp(min=1)
    return loss, metrics


def _floats(metrics: dict) -> dict:
    """verl's losses return their metrics as Python floats: one host sync for all."""
    names = [name for name, value in metrics.items() if isinstance(value, torch.Tensor)]
    values = torch.stack([metrics[name].detach().double().reshape(()) for name in names]).tolist() if names else []
    return {**metrics, **dict(zip(names, values))}


def compute_policy_loss_vanilla(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: torch.Tensor | None = None,
):
    """verl's ``vanilla`` (PPO clip with dual clip ``clip_ratio_c``) by fastpo's
    ``policy_loss``; registered as ``fastpo_vanilla``."""
    _require_config("vanilla", config)
    low, high = _clip_range(config)
    options = {"loss_type": "grpo", "clip_eps_low": low, "clip_eps_high": high,
               "dual_clip": config.get("clip_ratio_c", 3.0)}
    loss, m = _policy_loss(old_log_prob, log_prob, advantages, response_mask.bool(), loss_agg_mode, config,
                           rollout_is_weights, options, _LOG_RATIO_CLAMP)
    return loss, _floats({
        # verl counts the tokens whose clipped term is the larger loss: fastpo's
        # clip_frac_low (r < 1 - low, A < 0) plus clip_frac_high (r > 1 + high, A > 0)
        "actor/pg_clipfrac": m["clip_frac_low"] + m["clip_frac_high"],
        "actor/ppo_kl": m["ppo_kl"],
        "actor/pg_clipfrac_lower": m["dual_clip_frac"],
    })


def compute_policy_loss_gspo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "seq-mean-token-mean",
    config=None,
    rollout_is_weights: torch.Tensor | None = None,
):
    """verl's ``gspo`` by fastpo's ``policy_loss(loss_type="gspo")``; registered as
    ``fastpo_gspo``.

    fastpo differentiates GSPO's sequence ratio with respect to every token of the
    sequence (the GSPO objective); verl's is GSPO-token, whose gradient at a token
    carries that token's own advantage and weight. The two agree, in value and
    gradient, when the advantages and the rollout weights are constant along each
    response (GRPO-style estimators, sequence-level corrections); otherwise this raises.
    """
    _require_config("gspo", config)
    mask = response_mask.bool()
    why = "fastpo_gspo's gradient equals verl's GSPO-token only for per-sequence values; use loss_mode=gspo"
    _require_row_constant("advantages", advantages, mask, why)
    if rollout_is_weights is not None:
        _require_row_constant("rollout_is_weights", rollout_is_weights, mask, why)
    low, high = _clip_range(config)
    options = {"loss_type": "gspo", "clip_eps_low": low, "clip_eps_high": high,
               "seq_log_ratio_cap": _SEQ_LOG_RATIO_CAP}
    loss, m = _policy_loss(old_log_prob, log_prob, advantages, mask, loss_agg_mode, config,
                           rollout_is_weights, options, None)
    return loss, _floats({
        "actor/pg_clipfrac": m["clip_frac_low"] + m["clip_frac_high"],
        "actor/ppo_kl": m["ppo_kl"],
        "actor/pg_clipfrac_lower": 0.0,  # verl's constant for GSPO
    })


def compute_policy_loss_cispo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: torch.Tensor | None = None,
):
    """verl's ``cispo`` (the stop-gradient ratio clamped to ``[1 - clip_ratio_low,
    1 + clip_ratio_high]``) by fastpo's ``policy_loss(loss_type="cispo")``; registered
    as ``fastpo_cispo``."""
    _require_config("cispo", config)
    low, high = _clip_range(config)
    # fastpo's CISPO cap is the absolute ratio
    options = {"loss_type": "cispo", "clip_eps_high": 1.0 + high, "cispo_ratio_min": 1.0 - low}
    loss, m = _policy_loss(old_log_prob, log_prob, advantages, response_mask.bool(), loss_agg_mode, config,
                           rollout_is_weights, options, _LOG_RATIO_CLAMP)
    return loss, _floats({
        # verl's pg_clipfrac counts every ratio outside the band whatever the
        # advantage's sign; fastpo counts the clips that bind (above the cap with A > 0,
        # below the floor with A < 0): reported under fastpo's names, not verl's
        "actor/fastpo/clip_frac_low": m["clip_frac_low"],
        "actor/fastpo/clip_frac_high": m["clip_frac_high"],
        "actor/ppo_kl": m["ppo_kl"],
        "actor/pg_clipfrac_lower": 0.0,  # verl's constant for CISPO
    })


def compute_policy_loss_sapo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "seq-mean-token-mean",
    config=None,
    rollout_is_weights: torch.Tensor | None = None,
):
    """verl's ``sapo`` (soft gate with ``tau_pos``/``tau_neg``; verl aggregates it with
    ``seq-mean-token-mean`` whatever ``loss_agg_mode`` says) by fastpo's
    ``policy_loss(loss_type="sapo")``; registered as ``fastpo_sapo``."""
    _require_config("sapo", config)
    options = {"loss_type": "sapo", "sapo_tau_pos": config.tau_pos, "sapo_tau_neg": config.tau_neg}
    loss, m = _policy_loss(old_log_prob, log_prob, advantages, response_mask.bool(), "seq-mean-token-mean", config,
                           rollout_is_weights, options, _LOG_RATIO_CLAMP)
    return loss, _floats({
        "actor/pg_clipfrac": 0.0,  # verl's constants for SAPO, which clips nothing
        "actor/ppo_kl": m["ppo_kl"],
        "actor/pg_clipfrac_lower": 0.0,
    })


# verl's loss_mode -> the fastpo function with its math
POLICY_LOSSES = {
    "vanilla": compute_policy_loss_vanilla,
    "gspo": compute_policy_loss_gspo,
    "cispo": compute_policy_loss_cispo,
    "sapo": compute_policy_loss_sapo,
}


# ------------------------------------------------------------ advantage estimators


def _groups(index, batch: int) -> dict:
    """Rows of each prompt (verl's ``index``: one uid per row), in first-seen order."""
    rows = defaultdict(list)
    for row in range(batch):
        rows[index[row]].append(row)
    return rows


def _per_group(scores: torch.Tensor, index, estimator: str, compute) -> torch.Tensor:
    """Runs ``compute(rewards, group_size)`` (a fastpo group op, rewards laid out group
    by group) once per group size present and scatters the results back to verl's row
    order. A group of one raises: verl gives it its score without a baseline, fastpo has
    no baseline to give it."""
    groups = _groups(index, scores.shape[0])
    by_size = defaultdict(list)
    for uid, rows in groups.items():
        if len(rows) == 1:
            raise ValueError(
                f"fastpo_{estimator}: the group of index {uid!r} has one response; fastpo has no baseline for a group "
                f"of one (verl's {estimator} gives it its score without a baseline); sample at least 2 responses per "
                f"prompt (actor_rollout_ref.rollout.n) or use adv_estimator={estimator}"
            )
        by_size[len(rows)].extend(rows)
    out = torch.empty_like(scores, dtype=torch.promote_types(scores.dtype, torch.float32))
    for size, rows in by_size.items():
        order = torch.tensor(rows, device=scores.device)
        out[order] = compute(scores[order], size).to(out.dtype)
    return out


@torch.no_grad()
def compute_grpo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool | None = None,
    config=None,
    **kwargs,
):
    """verl's ``grpo`` by fastpo's ``group_advantages`` (``scale="group"``, or ``"none"``
    without std normalization); registered as ``fastpo_grpo``. ``norm_adv_by_std_in_grpo``
    defaults to the algorithm config's (verl's trainer passes only the config to a
    registered estimator)."""
    if norm_adv_by_std_in_grpo is None:
        norm_adv_by_std_in_grpo = config.get("norm_adv_by_std_in_grpo", True) if config is not None else True
    scale = "group" if norm_adv_by_std_in_grpo else "none"
    scores = _per_group(
        token_level_rewards.sum(dim=-1), index, "grpo",
        lambda rewards, size: kernels.group_advantages(rewards, size, scale=scale, eps=epsilon),
    )
    scores = scores.unsqueeze(-1) * response_mask
    return scores, scores


@torch.no_grad()
def compute_rloo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index,
    epsilon: float = 1e-6,
    config=None,
    **kwargs,
):
    """verl's ``rloo`` by fastpo's ``rloo_advantages``; registered as ``fastpo_rloo``."""
    scores = _per_group(token_level_rewards.sum(dim=-1), index, "rloo", kernels.rloo_advantages)
    scores = scores.unsqueeze(-1) * response_mask
    return scores, scores


@torch.no_grad()
def compute_reinforce_plus_plus_baseline_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index,
    epsilon: float = 1e-6,
    config=None,
    **kwargs,
):
    """verl's ``reinforce_plus_plus_baseline`` (group mean subtracted, then whitened over
    the batch's valid tokens) by fastpo's ``group_advantages(scale="none")`` and
    ``whiten``, the two steps of ``reinforce_pp_advantages``, which needs one group size;
    registered as ``fastpo_reinforce_plus_plus_baseline``."""
    centered = _per_group(
        token_level_rewards.sum(dim=-1), index, "reinforce_plus_plus_baseline",
        lambda rewards, size: kernels.group_advantages(rewards, size, scale="none"),
    )
    mask = response_mask.bool()
    scores = kernels.whiten(torch.where(mask, centered.unsqueeze(-1), 0.0), mask)
    return scores, scores


@torch.no_grad()
def compute_reinforce_plus_plus_outcome_advantage(
    token_level_rewards: torch.Tensor, response_mask: torch.Tensor, config=None, **kwargs
):
    """verl's ``reinforce_plus_plus``: the discounted return of each valid token (masked
    positions skipped), whitened over the batch's valid tokens. The return is fastpo's
    ``gae`` with zero values and ``lam=1`` (``A_t = r_t + gamma * A_next``); the
    whitening is ``whiten``. Registered as ``fastpo_reinforce_plus_plus``."""
    if config is None:
        raise ValueError("fastpo_reinforce_plus_plus needs verl's algorithm config for gamma (config=None)")
    returns, _ = kernels.gae(
        token_level_rewards, torch.zeros_like(token_level_rewards), response_mask, gamma=config.gamma, lam=1.0
    )
    advantages = kernels.whiten(returns, response_mask)
    return advantages, returns


@torch.no_grad()
def compute_gae_advantage_return(
    token_level_rewards: torch.Tensor,
    values: torch.Tensor | None = None,
    response_mask: torch.Tensor | None = None,
    gamma: float | None = None,
    lam: float | None = None,
    config=None,
    **kwargs,
):
    """verl's ``gae`` (GAE skipping masked positions, advantages whitened over the valid
    tokens) by fastpo's ``gae`` and ``whiten``; registered as ``fastpo_gae``.

    Positions outside the mask are 0 in both outputs (verl leaves values there that its
    losses mask out). verl's trainer computes ``adv_estimator=gae`` by calling its own
    function with the critic's values and passes no values to a registered estimator:
    to run GAE by fastpo in the trainer keep ``adv_estimator=gae`` and call
    ``register(replace_gae=True)``.
    """
    if values is None:
        raise ValueError(
            "fastpo_gae needs the critic's values, which verl 0.9's trainer passes only to its built-in gae: set "
            "algorithm.adv_estimator=gae and call fastpo.integrations.verl.register(replace_gae=True)"
        )
    if gamma is None:
        gamma = config.gamma if config is not None else 1.0
    if lam is None:
        lam = config.lam if config is not None else 1.0
    advantages, returns = kernels.gae(token_level_rewards, values, response_mask, gamma=float(gamma), lam=float(lam))
    return kernels.whiten(advantages, response_mask), returns


# verl's adv_estimator -> the fastpo function with its math
ADVANTAGE_ESTIMATORS = {
    "gae": compute_gae_advantage_return,
    "grpo": compute_grpo_outcome_advantage,
    "rloo": compute_rloo_outcome_advantage,
    "reinforce_plus_plus": compute_reinforce_plus_plus_outcome_advantage,
    "reinforce_plus_plus_baseline": compute_reinforce_plus_plus_baseline_outcome_advantage,
}


# ------------------------------------------------------- hidden-state log-probs


class FusedLinearForPPO(torch.nn.Module):
    """verl's ``FusedLinearForPPO`` (the ``use_fused_kernels`` path of its ``torch`` and
    ``liger`` backends) computed by fastpo's ``linear_token_logprobs``: log-probs and
    entropy from hidden states and the LM head, never holding the logits.

    ``chunk_size`` and ``impl_backend`` are accepted for verl's constructor and unused
    (fastpo sizes its own chunks). Returns float32 log-probs and the entropy in the
    logits' dtype, as verl does.
    """

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch"):
        super().__init__()
        self.chunk_size = chunk_size
        self.impl_backend = impl_backend

    def forward(self, hidden_states, vocab_weights, input_ids, temperature=1.0):
        logprobs, entropy = kernels.linear_token_logprobs(
            hidden_states, vocab_weights, input_ids, temperature=temperature, return_entropy=True
        )
        return logprobs, entropy.to(torch.promote_types(hidden_states.dtype, vocab_weights.dtype))


def linear_cross_entropy(hidden, weight, labels, temperature=1.0, reduction="none", dist_process_group=None):
    """verl's ``linear_cross_entropy`` (the ``use_fused_kernels`` path of its ``triton``
    backend): ``(log-probs, entropy)`` per token by fastpo's ``linear_token_logprobs``.
    Covers ``reduction="none"`` with an unsharded head, what verl's model forwards pass."""
    if reduction != "none":
        raise ValueError(
            f"fastpo's linear_cross_entropy covers reduction='none' only, got reduction={reduction!r}; call "
            "fastpo.integrations.verl.register(fused_kernels=False) to keep verl's kernel"
        )
    if dist_process_group is not None:
        raise ValueError(
            "fastpo's linear_cross_entropy does not cover a vocabulary-parallel LM head (dist_process_group is set, "
            "verl's Megatron path); call fastpo.integrations.verl.register(fused_kernels=False) to keep verl's kernel"
        )
    return kernels.linear_token_logprobs(hidden, weight, labels, temperature=temperature, return_entropy=True)


# ------------------------------------------------------------------ registration

# (module, attribute) -> verl's original, for unregister()
_patched: dict[tuple[str, str], object] = {}


def _patch(module_name: str, attribute: str, value) -> None:
    module = importlib.import_module(module_name)
    _patched.setdefault((module_name, attribute), getattr(module, attribute))
    setattr(module, attribute, value)


def register(*, fused_kernels: bool = True, replace_gae: bool = False) -> None:
    """Registers fastpo in the running verl (idempotent).

    * policy losses ``fastpo_vanilla``, ``fastpo_gspo``, ``fastpo_cispo``,
      ``fastpo_sapo`` (``actor_rollout_ref.actor.policy_loss.loss_mode``);
    * advantage estimators ``fastpo_gae``, ``fastpo_grpo``, ``fastpo_rloo``,
      ``fastpo_reinforce_plus_plus``, ``fastpo_reinforce_plus_plus_baseline``
      (``algorithm.adv_estimator``);
    * ``fused_kernels``: verl's ``use_fused_kernels`` path (``FusedLinearForPPO`` of the
      torch/liger backends, ``linear_cross_entropy`` of the triton backend) computes
      log-probs and entropy with fastpo's ``linear_token_logprobs``;
    * ``replace_gae``: verl's own ``adv_estimator=gae``, which its trainer calls
      directly with the critic's values, runs fastpo's GAE.

    Raises ImportError without verl and RuntimeError naming the installed version when
    it is outside ``SUPPORTED_VERSIONS``.
    """
    check_version()
    from verl.trainer.ppo import core_algos

    for name, function in POLICY_LOSSES.items():
        core_algos.register_policy_loss(f"fastpo_{name}")(function)
    for name, function in ADVANTAGE_ESTIMATORS.items():
        core_algos.register_adv_est(f"fastpo_{name}")(function)
    if fused_kernels:
        _patch("verl.utils.experimental.torch_functional", "FusedLinearForPPO", FusedLinearForPPO)
        _patch("verl.utils.kernel.linear_cross_entropy", "linear_cross_entropy", linear_cross_entropy)
    if replace_gae:
        _patch("verl.trainer.ppo.core_algos", "compute_gae_advantage_return", compute_gae_advantage_return)


def unregister() -> None:
    """Undoes ``register()``: removes the ``fastpo_*`` entries from verl's registries and
    restores what it patched."""
    from verl.trainer.ppo import core_algos

    for name in POLICY_LOSSES:
        core_algos.POLICY_LOSS_REGISTRY.pop(f"fastpo_{name}", None)
    for name in ADVANTAGE_ESTIMATORS:
        core_algos.ADV_ESTIMATOR_REGISTRY.pop(f"fastpo_{name}", None)
    for (module_name, attribute), original in _patched.items():
        setattr(importlib.import_module(module_name), attribute, original)
    _patched.clear()
