"""fastpo inside OpenRLHF: its ``PolicyLoss``, ``ValueLoss`` and ``compute_approx_kl``
with OpenRLHF's constructor arguments, forward signatures and return values, computed
by fastpo's kernels (``policy_loss``, ``value_loss``, ``kl_penalty``).

```python
from fastpo.integrations.openrlhf import PolicyLoss, ValueLoss, compute_approx_kl

actor_loss_fn = PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=3.0,
                           is_correction_level="token", is_correction_mode="mask")
loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio = actor_loss_fn(
    log_probs, old_log_probs, advantages, action_mask=mask, rollout_log_probs=rollout_lp)
```

OpenRLHF's Ray actors bind these names when their modules are imported
(``openrlhf.trainer.ray.ppo_actor``: ``PolicyLoss``, ``compute_approx_kl``;
``ppo_critic``: ``ValueLoss``; ``trainer.ppo_utils.experience_maker``:
``compute_approx_kl``): replacing them there, in each worker before its actors are
created, routes OpenRLHF's trainer through fastpo (not done here, nor tested).
OpenRLHF itself is not imported here; when it is installed, constructing a module
checks its version against ``SUPPORTED_VERSIONS``.
"""

from __future__ import annotations

import torch
from torch import nn

from fastpo import kernels
from fastpo.integrations import installed_version, version_supported

# The OpenRLHF releases whose models/loss.py and models/utils.py these modules match
# (tests/test_integrations_openrlhf.py runs them against 0.11.2's).
SUPPORTED_VERSIONS = ">=0.11.2,<0.12"
TESTED_VERSIONS = ("0.11.2",)

# OpenRLHF clamps every KL estimate (one of its conventions in fastpo, as its clamp of
# PPO's log-ratio).
_KL_CLAMP = kernels.PolicyLossOptions.matching("openrlhf").kl_clamp

# OpenRLHF's kl_estimator -> fastpo's kl_penalty kind. OpenRLHF's k3 bounds the
# log-ratio below at -10 and the estimate to [-10, 10]: the same values and gradients as
# fastpo's low_var_kl (whose clamps of d at +-20 bind only where the estimate is already
# at its bound of 10).
KL_ESTIMATORS = {"k1": "k1", "k2": "k2", "k3": "low_var_kl"}

# OpenRLHF's is_correction_level -> fastpo's rollout_is level
_IS_LEVELS = {"token": "token", "seq": "sequence"}


def check_version() -> str | None:
    """The installed OpenRLHF version (None when it is not installed: the modules work
    without it); RuntimeError naming it when it is outside ``SUPPORTED_VERSIONS``."""
    installed = installed_version("openrlhf")
    if installed is None:
        return None
    if not version_supported(installed, SUPPORTED_VERSIONS):
        raise RuntimeError(
            f"fastpo.integrations.openrlhf matches OpenRLHF{SUPPORTED_VERSIONS} (tested: "
            f"{', '.join(TESTED_VERSIONS)}); the installed openrlhf is {installed}"
        )
    return installed


def _mask_of(action_mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """OpenRLHF's ``action_mask=None`` means every token counts."""
    if action_mask is None:
        return torch.ones(like.shape, dtype=torch.bool, device=like.device)
    return action_mask.bool()


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp(min=1)


def _aggregation(token_level_loss: bool, mask, dp_size, batch_num_tokens, global_batch_size):
    """OpenRLHF's ``aggregate_loss`` as fastpo's: ``(options, num_items, scale)``, the
    aggregation options, the token count and the factor applied to fastpo's loss. Token
    level: the token mean, over ``batch_num_tokens`` (times ``dp_size``) when given;
    sample level: the mean of per-sequence token means over the rows with a valid token,
    or over ``global_batch_size`` (times ``dp_size``)."""
    if token_level_loss:
        if batch_num_tokens is None:
            return {"agg": "token-mean"}, None, 1.0
        num_items = torch.as_tensor(batch_num_tokens, dtype=torch.float64, device=mask.device)
        return {"agg": "token-mean"}, num_items, float(dp_size)
    if global_batch_size is None:
        return {"agg": "seq-mean-token-mean", "seq_mean_rows": "nonempty"}, None, 1.0
    # fastpo's "all" mean divides by this micro-batch's rows, OpenRLHF by the global count
    scale = mask.shape[0] * dp_size / float(global_batch_size)
    return {"agg": "seq-mean-token-mean", "seq_mean_rows": "all"}, None, scale


class PolicyLoss(nn.Module):
    """OpenRLHF's ``PolicyLoss`` (PPO clip with optional dual clip, or GSPO; vLLM
    importance-sampling correction) computed by fastpo's ``policy_loss``.

    Same arguments as OpenRLHF 0.11's; invalid combinations raise ``ValueError`` at
    construction (fastpo's ``PolicyLossOptions`` checks them). ``forward`` returns
    ``(loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)`` as OpenRLHF's does, the last
    two None unless the correction is on for PPO. One difference: at
    ``is_correction_level="seq"``, ``is_filter_ratio`` is the fraction of tokens whose
    sequence is filtered (fastpo's ``rollout_is_filtered_frac``), OpenRLHF's the
    fraction of sequences; they agree for responses of equal length.
    """

    def __init__(
        self,
        clip_eps_low: float = 0.2,
        clip_eps_high: float = 0.2,
        dual_clip: float | None = None,
        token_level_loss: bool = True,
        policy_loss_type: str = "ppo",
        is_correction_level: str = "off",
        is_correction_mode: str = "mask",
        is_correction_gating: str = "ratio",
        is_correction_threshold=(0.5, 5.0),
    ) -> None:
        super().__init__()
        check_version()
        if policy_loss_type not in ("ppo", "gspo"):
            raise ValueError(f"policy_loss_type={policy_loss_type!r} is not one of 'ppo', 'gspo'")
        if is_correction_level not in ("off", *_IS_LEVELS):
            raise ValueError(f"is_correction_level={is_correction_level!r} is not one of 'off', 'token', 'seq'")
        if is_correction_mode not in ("mask", "clip"):
            raise ValueError(f"is_correction_mode={is_correction_mode!r} is not one of 'mask', 'clip'")
        if is_correction_gating not in ("ratio", "binary_kl", "tv"):
            raise ValueError(f"is_correction_gating={is_correction_gating!r} is not one of 'ratio', 'binary_kl', 'tv'")
        self.clip_eps_low = clip_eps_low
        self.clip_eps_high = clip_eps_high
        self.dual_clip = dual_clip
        # OpenRLHF's GSPO is always a per-sample mean
        self.token_level_loss = token_level_loss and policy_loss_type != "gspo"
        self.policy_loss_type = policy_loss_type
        self.is_correction_level = is_correction_level
        self.is_correction_mode = is_correction_mode
        self.is_correction_gating = is_correction_gating
        self.is_correction_threshold = tuple(is_correction_threshold)

        if is_correction_level != "off":
            # OpenRLHF's own rules, on top of fastpo's: a per-sequence statistic or a
            # divergence is a rejection filter, and a divergence is bounded above only
            if is_correction_mode == "clip" and (is_correction_level == "seq" or is_correction_gating != "ratio"):
                raise ValueError(
                    f"is_correction_mode='clip' requires is_correction_level='token' and is_correction_gating="
                    f"'ratio', got is_correction_level={is_correction_level!r}, "
                    f"is_correction_gating={is_correction_gating!r}"
                )
            if is_correction_gating != "ratio" and self.is_correction_threshold[0] > 0:
                raise ValueError(
                    f"is_correction_gating={is_correction_gating!r} takes an upper bound only: "
                    f"is_correction_threshold={self.is_correction_threshold!r} must start with a bound <= 0"
                )

        options = {"clip_eps_low": clip_eps_low, "clip_eps_high": clip_eps_high, "dual_clip": dual_clip}
        if policy_loss_type == "ppo":
            options["loss_type"] = "grpo"
            if is_correction_level != "off":
                low, high = self.is_correction_threshold
                options.update(
                    rollout_is=_IS_LEVELS[is_correction_level],
                    # clip: the token ratio clamped to the band; mask: units outside the
                    # band dropped, the others weighted by their token ratio
                    rollout_is_mode="truncate" if is_correction_mode == "clip" else "mask",
                    rollout_is_weight="unit" if is_correction_mode == "clip" else "token",
                    rollout_is_gating=is_correction_gating,
                    # every statistic is >= 0: a bound below 0 bounds nothing
                    rollout_is_min=low if low >= 0 else None,
                    rollout_is_cap=high,
                )
        else:
            # OpenRLHF's GSPO has no IS correction: with it on, the sequence ratio is
            # taken against the rollout log-probs instead of the old ones
            options["loss_type"] = "gspo"
        self.options = kernels.PolicyLossOptions.matching("openrlhf", **options)

    @property
    def _corrected(self) -> bool:
        return self.is_correction_level != "off" and self.policy_loss_type == "ppo"

    def forward(
        self,
        log_probs: torch.Tensor,
        old_log_probs: torch.Tensor,
        advantages: torch.Tensor,
        action_mask: torch.Tensor | None = None,
        rollout_log_probs: torch.Tensor | None = None,
        dp_size: int = 1,
        batch_num_tokens: float | None = None,
        global_batch_size: float | None = None,
    ):
        mask = _mask_of(action_mask, log_probs)
        if self.is_correction_level != "off" and rollout_log_probs is None:
            raise ValueError(f"is_correction_level={self.is_correction_level!r} needs rollout_log_probs")
        aggregation, num_items, scale = _aggregation(
            self.token_level_loss, mask, dp_size, batch_num_tokens, global_batch_size
        )
        tensors = {}
        ratio_base = old_log_probs
        if self._corrected:
            tensors["rollout_logprobs"] = rollout_log_probs
        elif self.is_correction_level != "off":
            ratio_base = rollout_log_probs
        loss, metrics = kernels.policy_loss(
            log_probs, ratio_base, advantages, mask, options=self.options, num_items=num_items, **aggregation, **tensors
        )
        if scale != 1.0:
            loss = loss * scale
        with torch.no_grad():
            # OpenRLHF's clip_ratio counts the tokens where the clipped surrogate is the
            # smaller one: fastpo's clip_frac_low (r < 1 - low, A < 0) + clip_frac_high
            clip_ratio = metrics["clip_frac_low"] + metrics["clip_frac_high"]
            ppo_kl = _masked_mean(kernels.kl_penalty(old_log_probs.detach(), log_probs.detach(), "k1"), mask)
            vllm_kl = is_filter_ratio = None
            if self._corrected:
                vllm_kl = _masked_mean(kernels.kl_penalty(rollout_log_probs, old_log_probs.detach(), "k1"), mask)
                is_filter_ratio = metrics["rollout_is_filtered_frac"]
        return loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio


class ValueLoss(nn.Module):
    """OpenRLHF's ``ValueLoss`` (``0.5 * max((V - R)**2, (clip(V) - R)**2)``, clipped
    around the old values when ``clip_eps`` is set) computed by fastpo's ``value_loss``.
    ``forward`` returns the loss tensor, as OpenRLHF's does."""

    def __init__(self, clip_eps: float | None = None, token_level_loss: bool = True) -> None:
        super().__init__()
        check_version()
        self.clip_eps = clip_eps
        self.token_level_loss = token_level_loss

    def forward(
        self,
        values: torch.Tensor,
        old_values: torch.Tensor,
        returns: torch.Tensor,
        action_mask: torch.Tensor | None = None,
        dp_size: int = 1,
        batch_num_tokens: float | None = None,
        global_batch_size: float | None = None,
    ) -> torch.Tensor:
        mask = _mask_of(action_mask, values)
        aggregation, num_items, scale = _aggregation(
            self.token_level_loss, mask, dp_size, batch_num_tokens, global_batch_size
        )
        loss, _ = kernels.value_loss(
            values, old_values, returns, mask, clip_eps=self.clip_eps, num_items=num_items, **aggregation
        )
        return loss * scale if scale != 1.0 else loss


def compute_approx_kl(
    log_probs: torch.Tensor,
    log_probs_base: torch.Tensor,
    log_probs_old: torch.Tensor | None = None,
    kl_estimator: str = "k1",
    unbiased_gradient: bool = False,
) -> torch.Tensor:
    """OpenRLHF's ``compute_approx_kl``: the per-token estimate of KL(policy || base),
    ``k1``, ``k2`` or ``k3`` clamped to [-10, 10], in float32 as OpenRLHF computes it,
    by fastpo's ``kl_penalty``. ``unbiased_gradient=True`` (OpenRLHF's straight-through
    importance-weighted gradient) is not covered and raises."""
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator={kl_estimator!r} is not one of {', '.join(map(repr, KL_ESTIMATORS))}")
    if unbiased_gradient:
        raise ValueError(
            "unbiased_gradient=True (OpenRLHF's importance-weighted straight-through KL gradient) is not covered by "
            "fastpo; use OpenRLHF's compute_approx_kl for it"
        )
    return kernels.kl_penalty(log_probs.float(), log_probs_base.float(), KL_ESTIMATORS[kl_estimator], clamp=_KL_CLAMP)
