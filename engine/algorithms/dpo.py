"""Direct Preference Optimization on ``{"prompt", "chosen", "rejected"}`` pairs.

With sequence log-probs ``lp`` (summed over response tokens, or averaged with
``average=true``) and the reference's ``lp_ref``, the margin is
``h = (lp_c - lp_ref_c) - (lp_r - lp_ref_r)`` and ``fastpo.kernels.dpo_loss`` gives the
per-pair loss of ``loss_type``: sigmoid (with ``label_smoothing``: cDPO), hinge, robust or
ipo. The unit of the loss is the pair.

The run around the loss (the frozen reference's log-probs computed once per dataset, the
held-out ``preference_accuracy`` and ``heldout_accuracy`` before and after training) is
``_pairs.train_on_pairs``, shared with ipo; its module doc gives the details.
"""

from __future__ import annotations

from fastpo.kernels import dpo_loss

from ..config import ConfigError, DPOConfig
from ._pairs import train_on_pairs

__all__ = ["run"]


def run(config: DPOConfig) -> dict:
    if config.label_smoothing and config.loss_type in ("hinge", "ipo"):
        raise ConfigError(f"option 'label_smoothing': must be 0 with loss_type={config.loss_type}")
    if config.loss_type == "robust" and config.label_smoothing >= 0.5:
        raise ConfigError(f"option 'label_smoothing': got {config.label_smoothing}; robust needs a value < 0.5")
    if config.label_smoothing > 1:
        raise ConfigError(f"option 'label_smoothing': got {config.label_smoothing}; expected a value <= 1")

    def pair_loss(chosen, rejected, ref_chosen, ref_rejected):
        return dpo_loss(
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            beta=config.beta,
            loss_type=config.loss_type,
            label_smoothing=config.label_smoothing,
        )

    return train_on_pairs("dpo", config, pair_loss)
