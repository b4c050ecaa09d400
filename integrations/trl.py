"""fastpo inside TRL: one call makes TRL's fused LM head run on fastpo's kernels.

    import fastpo.integrations.trl
    fastpo.integrations.trl.enable()      # before or after building the trainer
    trainer = GRPOTrainer(...)            # or SFT, DPO, RLOO, KTO: unchanged otherwise
    trainer.train()

How TRL 1.16 is wired: every one of its SFT, DPO, GRPO, RLOO and KTO trainers calls
``trl.trainer.utils.add_fused_lm_head(model, ...)`` at construction, which wraps the
model's ``forward``; a call with ``fused_lm_head=True`` runs the backbone and hands
the hidden states of the labelled positions, the LM head's weight and bias, the
temperature, the config's ``final_logit_softcapping`` and logit scale and the requested
outputs to ``_ChunkedLogProbFunction.apply``, a name that forward looks up in
``trl.trainer.utils`` on every call. ``enable()`` points that name at fastpo's
``linear_token_logprobs`` (``_FastpoFusedHead``), so everything around it stays TRL's
own code: the output object, ``shift_labels``, the -100 positions, the FSDP2 DTensor
gather of the head, PEFT's look-up of the head, the MoE auxiliary loss. Two more
patches: TRL scores only the labelled positions on Triton devices and every position
elsewhere (on Neuron, to keep shapes static); fastpo scores only the labelled ones on
every device. And each trainer's ``add_fused_lm_head`` first checks what fastpo cannot
honour (DeepSpeed ZeRO-3, a logit scale <= 0), so that it raises at trainer construction
(``_checked``).

``enable(policy_loss=True)`` also computes GRPOTrainer's loss with
``fastpo.kernels.policy_loss`` where its configuration has an equivalent
(``_grpo_loss_support``); elsewhere TRL's own loss runs and a warning says why, once.
RLOOTrainer's loss (a clipped ratio of summed sequence log-probs) has none.

``disable()`` puts back exactly the objects ``enable()`` replaced.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import torch

__all__ = ["SUPPORTED_VERSIONS", "TESTED_VERSIONS", "disable", "enable", "is_enabled"]

SUPPORTED_VERSIONS = ">=1.16.0,<1.17"  # a packaging SpecifierSet
TESTED_VERSIONS = ("1.16.0",)
# The trainer modules that import add_fused_lm_head by name.
TRAINER_MODULES = ("sft_trainer", "dpo_trainer", "grpo_trainer", "rloo_trainer", "kto_trainer")
# TRL's optional fused-head outputs -> fastpo's statistics.
TRL_STATISTICS = {"log_sum_sq_probs": "log_sum_sq_probs", "mean_logits": "mean_logit", "is_top1": "is_top1"}
# TRL's GRPO loss types that fastpo's policy_loss computes, under the same names.
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")


@dataclasses.dataclass
class _State:
    patches: list = dataclasses.field(default_factory=list)  # (owner, attribute, original object)
    backend: str | None = None
    policy_loss: bool = False
    warned: set = dataclasses.field(default_factory=set)


_STATE = _State()


# ------------------------------------------------------------------ version


def _import_trl():
    """TRL's modules that enable() patches, after checking the installed version."""
    try:
        import trl
    except ImportError as error:
        raise ImportError(
            f"fastpo.integrations.trl needs TRL {SUPPORTED_VERSIONS} (tested: {', '.join(TESTED_VERSIONS)}); "
            f"it is not importable: {error}. Install it with pip install 'trl{SUPPORTED_VERSIONS}'"
        ) from error
    from fastpo.integrations import version_supported

    installed = getattr(trl, "__version__", "unknown")
    if installed == "unknown" or not version_supported(installed, SUPPORTED_VERSIONS):
        raise RuntimeError(
            f"fastpo.integrations.trl supports TRL {SUPPORTED_VERSIONS} (tested: {', '.join(TESTED_VERSIONS)}), "
            f"but TRL {installed} is installed: its fused LM head may be wired differently. Install "
            f"'trl{SUPPORTED_VERSIONS}', or leave TRL's own head in place (do not call enable())"
        )
    import importlib

    utils = importlib.import_module("trl.trainer.utils")
    modules = {name: importlib.import_module(f"trl.trainer.{name}") for name in TRAINER_MODULES}
    missing = [f"trl.trainer.utils.{name}" for name in ("_ChunkedLogProbFunction", "_use_triton", "add_fused_lm_head")
               if not hasattr(utils, name)]
    missing += [f"trl.trainer.{name}.add_fused_lm_head" for name, module in modules.items()
                if not hasattr(module, "add_fused_lm_head")]
    if missing:
        raise RuntimeError(f"TRL {installed} has no {', '.join(missing)}: fastpo.integrations.trl cannot patch it")
    return utils, modules


# ------------------------------------------------------------------ the fused head


def _zero3_enabled() -> bool:
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:
        return False
    return is_deepspeed_zero3_enabled()


ZERO3_MESSAGE = (
    "fastpo.integrations.trl: DeepSpeed ZeRO-3 is not supported: fastpo's fused head recomputes the "
    "LM head in the backward, where TRL's gather of the partitioned head weight is no longer active. "
    "Use ZeRO-2 or FSDP2, or call fastpo.integrations.trl.disable() to keep TRL's own head"
)


# The config attributes from which TRL's add_fused_lm_head derives the logit scale (it
# multiplies by one of them, or divides by logits_scaling): a positive scale needs each
# present one positive.
LOGIT_SCALE_ATTRIBUTES = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def _check_logit_scale(logit_scale) -> float:
    if not (isinstance(logit_scale, (int, float)) and math.isfinite(logit_scale) and logit_scale > 0):
        raise ValueError(
            f"fastpo.integrations.trl: the model's logit scale is {logit_scale!r}; fastpo folds it into the "
            f"temperature and softcap, which needs a finite scale > 0. Call fastpo.integrations.trl.disable() "
            f"to keep TRL's own head for this model"
        )
    return float(logit_scale)


class _FastpoFusedHead:
    """Stands in for TRL's ``_ChunkedLogProbFunction``: the same ``apply`` arguments and
    return value, computed by ``fastpo.kernels.linear_token_logprobs``.

    TRL's transform is ``z = softcap * tanh(scale * x / softcap) / T``; with ``s = scale``
    that is fastpo's ``c' * tanh(x / c') / T'`` with ``c' = softcap / s`` and ``T' = T / s``
    (and ``z = x / (T / s)`` without a softcap), so the scale costs nothing.
    """

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=("log_probs",)):
        from fastpo.kernels import linear_token_logprobs

        del chunk_size  # TRL's vocabulary tile; fastpo chunks the tokens instead
        unknown = [name for name in outputs if name not in ("log_probs", "entropy", *TRL_STATISTICS)]
        if unknown:
            raise ValueError(
                f"fastpo.integrations.trl: TRL asked the fused head for {unknown}, which fastpo does not compute; "
                f"call fastpo.integrations.trl.disable() to keep TRL's own head"
            )
        for name, value in (("hidden states", hidden), ("LM head weight", weight), ("LM head bias", bias)):
            if _is_dtensor(value):
                raise TypeError(
                    f"fastpo.integrations.trl: the {name} reached the fused head as a DTensor "
                    f"({value.placements}); TRL gathers FSDP2's sharded head with full_tensor() first, this layout "
                    f"it did not. Call fastpo.integrations.trl.disable() to keep TRL's own head"
                )
        if _zero3_enabled():
            raise RuntimeError(ZERO3_MESSAGE)
        scale = _check_logit_scale(logit_scale)
        softcap = None if final_logit_softcapping is None else final_logit_softcapping / scale
        # TRL computes the head in autocast's dtype when autocast is on, else in the hidden
        # states' (float32 under its cast_lm_head_to_fp32, which turns autocast off)
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
        else:
            dtype = hidden.dtype
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        statistics = tuple(TRL_STATISTICS[name] for name in outputs if name in TRL_STATISTICS)
        with torch.autocast(device_type, enabled=False):
            out = linear_token_logprobs(
                hidden, weight, targets, bias=bias, temperature=temperature / scale, softcap=softcap,
                return_entropy="entropy" in outputs, statistics=statistics, backend=_STATE.backend,
            )
        if statistics:
            logprobs, entropy, stats = out
        else:
            (logprobs, entropy), stats = (out if "entropy" in outputs else (out, None)), {}
        return (logprobs, entropy, *(stats.get(fastpo_name) for fastpo_name in TRL_STATISTICS.values()))


def _is_dtensor(value) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(value, DTensor)


def _score_labelled_positions_only(device) -> bool:
    """Replaces TRL's ``_use_triton`` in ``trl.trainer.utils``, where it only decides
    whether the fused forward drops the -100 positions before the head (True)."""
    return True


def _checked(add_fused_lm_head):
    """TRL's ``add_fused_lm_head``, raising first for what fastpo cannot honour, so that
    the error comes at trainer construction rather than at the first step."""

    def add_fused_lm_head_checked(model, *args, **kwargs):
        if _zero3_enabled():
            raise RuntimeError(ZERO3_MESSAGE)
        text_config = model.config.get_text_config()
        for name in LOGIT_SCALE_ATTRIBUTES:
            if getattr(text_config, name, None) is not None:
                _check_logit_scale(getattr(text_config, name))
        return add_fused_lm_head(model, *args, **kwargs)

    add_fused_lm_head_checked.__wrapped__ = add_fused_lm_head
    add_fused_lm_head_checked.__doc__ = add_fused_lm_head.__doc__
    return add_fused_lm_head_checked


# ------------------------------------------------------------------ enable / disable


def enable(*, policy_loss: bool = False, backend: str | None = None) -> None:
    """Make TRL's fused LM head (SFT, DPO, GRPO, RLOO, KTO trainers) run on fastpo.

    Idempotent (a second call with the same arguments does nothing); a call with other
    arguments replaces the earlier ones. It patches TRL's modules, so it applies to
    trainers built before and after the call.

    Args:
        policy_loss: also compute GRPOTrainer's loss with ``fastpo.kernels.policy_loss``
            where the trainer's configuration has an equivalent; elsewhere (and for
            RLOOTrainer) TRL's loss runs and a warning says why, once.
        backend: the backend of fastpo's row kernels (``None``: automatic; see
            ``fastpo.kernels``).

    Raises:
        ImportError / RuntimeError: TRL is absent, or outside ``SUPPORTED_VERSIONS``
            (the message names the installed version).
        RuntimeError: DeepSpeed ZeRO-3 is active (also at trainer construction).
    """
    if backend is not None:
        from fastpo.kernels import BACKENDS

        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    utils, modules = _import_trl()
    if _zero3_enabled():
        raise RuntimeError(ZERO3_MESSAGE)
    if is_enabled() and (_STATE.backend, _STATE.policy_loss) == (backend, bool(policy_loss)):
        return
    disable()
    _STATE.backend = backend
    _STATE.policy_loss = bool(policy_loss)
    checked = _checked(utils.add_fused_lm_head)
    _patch(utils, "_ChunkedLogProbFunction", _FastpoFusedHead)
    _patch(utils, "_use_triton", _score_labelled_positions_only)
    _patch(utils, "add_fused_lm_head", checked)
    for module in modules.values():
        _patch(module, "add_fused_lm_head", checked)
    if policy_loss:
        grpo = modules["grpo_trainer"].GRPOTrainer
        _patch(grpo, "_compute_loss", _grpo_compute_loss(grpo._compute_loss))
        _warn_once("rloo", "RLOOTrainer's loss (the clipped ratio of summed sequence log-probs) has no "
                           "fastpo policy_loss equivalent; TRL's own code computes it")


def disable() -> None:
    """Undo ``enable()``: every patched object is put back exactly. No-op when not enabled."""
    while _STATE.patches:
        owner, name, original = _STATE.patches.pop()
        setattr(owner, name, original)
    _STATE.backend = None
    _STATE.policy_loss = False
    _STATE.warned.clear()


def is_enabled() -> bool:
    return bool(_STATE.patches)


def _patch(owner, name: str, value) -> None:
    # the class's own attribute (not an inherited one) is what disable() must restore
    original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
    _STATE.patches.append((owner, name, original))
    setattr(owner, name, value)


def _warn_once(key: str, message: str) -> None:
    if key not in _STATE.warned:
        _STATE.warned.add(key)
        warnings.warn(f"fastpo.integrations.trl: {message}", stacklevel=3)


# ------------------------------------------------------------------ GRPO's loss


def _grpo_compute_loss(trl_compute_loss):
    def _compute_loss(self, model, inputs):
        reason = _grpo_loss_support(self)
        if reason is not None:
            _warn_once(f"grpo:{reason}", f"GRPOTrainer's loss with {reason} has no fastpo policy_loss "
                                         f"equivalent; TRL's own code computes it")
            return trl_compute_loss(self, model, inputs)
        return _grpo_loss(self, model, inputs)

    _compute_loss.__wrapped__ = trl_compute_loss
    return _compute_loss


def _grpo_loss_support(trainer) -> str | None:
    """None when fastpo's policy_loss computes this GRPOTrainer's loss exactly, else the
    option that prevents it, as TRL's config names it."""
    if trainer.loss_type not in GRPO_LOSS_TYPES:
        return f"loss_type={trainer.loss_type!r}"
    if trainer.off_policy_mask_threshold is not None:
        return "off_policy_mask_threshold"  # DeepSeek-V3.2's off-policy sequence masking
    if trainer.use_vllm and trainer.vllm_importance_sampling_correction:
        return "vllm_importance_sampling_correction"  # TRL's own ratio modes, computed at generation
    if trainer.use_adaptive_entropy:
        return "use_adaptive_entropy"  # a coefficient that TRL's controller updates between steps
    if trainer.top_entropy_quantile < 1.0:
        if trainer.accelerator.num_processes > 1:
            return "top_entropy_quantile < 1 on several processes"  # TRL's quantile spans every rank
        if trainer._entropy_bonus_enabled:
            return "top_entropy_quantile < 1 together with entropy_coef"
    return None


# GRPOTrainer._get_per_token_logps_and_entropies's optional inputs, taken from the batch
GRPO_MODEL_INPUTS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                     "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


def _grpo_loss(trainer, model, inputs):
    """GRPOTrainer._compute_loss with the loss from ``fastpo.kernels.policy_loss`` and the
    metrics TRL logs, under the same names and definitions."""
    from fastpo.kernels import PolicyLossOptions, policy_loss

    args = trainer.args
    prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
    mask = inputs["completion_mask"]
    if "tool_mask" in inputs:
        mask = mask * inputs["tool_mask"]
    logps, entropies, aux_loss = trainer._get_per_token_logps_and_entropies(
        model,
        torch.cat([prompt_ids, completion_ids], dim=1),
        torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1),
        completion_ids.size(1),
        compute_entropy=True,
        compute_aux_loss=trainer.aux_loss_enabled,
        **{name: inputs.get(name) for name in GRPO_MODEL_INPUTS},
    )
    advantages = inputs["advantages"]
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    old_logps = inputs.get("old_per_token_logps")
    old_logps = logps.detach() if old_logps is None else old_logps
    ref_logps = inputs["ref_per_token_logps"] if trainer.beta != 0.0 else None

    training = trainer.model.training
    mode = "train" if training else "eval"
    # TRL divides every per-micro-batch loss by the accumulation steps; dapo and cispo
    # divide their token sum by `num_items_in_batch` rescaled to one accumulation window
    accumulation = trainer.current_gradient_accumulation_steps if training else 1.0
    num_items = None
    if trainer.loss_type in ("dapo", "cispo"):
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / trainer.accelerator.num_processes
        if training:
            normalizer = normalizer * trainer.current_gradient_accumulation_steps / args.steps_per_generation
        num_items = normalizer / accumulation  # the whole loss is divided by `accumulation` below
    entropy_coef = trainer.entropy_coef if trainer._entropy_bonus_enabled else 0.0
    quantile = 1.0 - trainer.top_entropy_quantile if trainer.top_entropy_quantile < 1.0 else None
    options = PolicyLossOptions.matching(
        "trl",
        loss_type=trainer.loss_type,
        clip_eps_low=trainer.epsilon_low,
        clip_eps_high=trainer.epsilon_high,
        delta=args.delta if trainer.loss_type not in ("cispo", "sapo") else None,
        importance_level=trainer.importance_sampling_level,
        kl_coef=trainer.beta,
        kl_kind="k3",
        kl_ratio_weighted=bool(args.use_bias_correction_kl),
        entropy_coef=entropy_coef,
        entropy_quantile=quantile,
        max_len=trainer.max_completion_length if trainer.loss_type == "dr_grpo" else None,
        sapo_tau_pos=args.sapo_temperature_pos,
        sapo_tau_neg=args.sapo_temperature_neg,
    )
    need_entropy = entropy_coef != 0.0 or quantile is not None
    loss, _ = policy_loss(
        logps, old_logps, advantages, mask, options=options, ref_logprobs=ref_logps,
        entropy=entropies if need_entropy else None, num_items=num_items, backend=_loss_backend(),
    )
    loss = loss / accumulation

    metrics = trainer._metrics[mode]
    with torch.no_grad():
        if trainer._entropy_bonus_enabled:
            # TRL logs the policy term alone: before its division by the accumulation steps
            # (after it for dapo and cispo, whose normalizer already includes them)
            entropy_mean = (entropies * mask).sum() / mask.sum().clamp(min=1.0)
            policy_term = loss * accumulation + entropy_coef * entropy_mean
            if trainer.loss_type in ("dapo", "cispo"):
                policy_term = policy_term / accumulation
            metrics["policy_loss"].append(trainer.accelerator.gather(policy_term).nanmean().item())
            if training and trainer.accelerator.sync_gradients:
                metrics["entropy_coef"].append(trainer.entropy_coef)
        if trainer.aux_loss_enabled:
            metrics["aux_loss"].append(trainer.accelerator.gather_for_metrics(aux_loss).mean().item())
        _log_grpo_metrics(trainer, metrics, logps, old_logps, ref_logps, entropies, advantages, mask)
    if trainer.aux_loss_enabled:
        loss = loss + trainer.router_aux_loss_coef * aux_loss / accumulation
    return loss


def _log_grpo_metrics(trainer, metrics, logps, old_logps, ref_logps, entropies, advantages, mask):
    """The per-step metrics GRPOTrainer logs besides its loss, by their definitions:
    ``kl`` (the per-token KL term, ratio-weighted as the loss weights it), ``entropy``,
    the clip fractions of the ratio (``clip_ratio/*`` for the PPO-clip losses,
    ``cispo_clip_ratio``), each a mean over every process's valid tokens (over sequences
    for a sequence-level ratio) or, for ``*_min``/``*_max``, over sequences."""
    from trl.trainer.utils import nanmax, nanmin

    accelerator = trainer.accelerator

    def global_mean(x):
        if x.shape[1] == 1:  # one value per sequence
            local = torch.stack([x.sum(), torch.tensor(float(x.shape[0]), device=x.device)])
        else:
            local = torch.stack([(x * mask).sum(), mask.sum().float()])
        total = accelerator.reduce(local, reduction="sum")
        return (total[0] / total[1].clamp(min=1.0)).item()

    def sequence_means(x):
        return x.squeeze(1) if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1)

    log_ratio = logps - old_logps
    if trainer.importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    ratio = torch.exp(log_ratio)
    if ref_logps is not None:
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        if trainer.args.use_bias_correction_kl:
            kl = kl * ratio
        metrics["kl"].append(global_mean(kl))
    metrics["entropy"].append(global_mean(entropies))
    if trainer.loss_type == "cispo":
        metrics["cispo_clip_ratio"].append(global_mean(((ratio > trainer.epsilon_high) & (advantages > 0)).float()))
    elif trainer.loss_type != "sapo":
        if trainer.args.delta is not None:
            ratio = ratio.clamp(max=trainer.args.delta)
        low = ((ratio < 1 - trainer.epsilon_low) & (advantages < 0)).float()
        high = ((ratio > 1 + trainer.epsilon_high) & (advantages > 0)).float()
        metrics["clip_ratio/low_mean"].append(global_mean(low))
        metrics["clip_ratio/high_mean"].append(global_mean(high))
        metrics["clip_ratio/region_mean"].append(global_mean(torch.maximum(low, high)))
        metrics["clip_ratio/low_min"].append(nanmin(accelerator.gather(sequence_means(low))).item())
        metrics["clip_ratio/high_max"].append(nanmax(accelerator.gather(sequence_means(high))).item())


def _loss_backend() -> str | None:
    """enable()'s backend for policy_loss, which has no native (cpp/cuda) kernels."""
    return _STATE.backend if _STATE.backend in ("triton", "torch") else None
