"""Identity Preference Optimization on ``{"prompt", "chosen", "rejected"}`` pairs.

With response log-probs ``lp`` and the frozen reference's ``lp_ref``, the margin is
``h = (lp_c - lp_ref_c) - (lp_r - lp_ref_r)`` and ``fastpo.kernels.ipo_loss`` gives
``(h - 1/(2*beta))**2`` per pair: a squared loss that pulls the margin to the target
``1/(2*beta)`` instead of pushing it to infinity as the sigmoid loss does.

The target is set against per-response log-probs, whose scale the peers choose
differently: ``average=true`` (the default) averages each response's log-probs over its
tokens, as TRL does; ``average=false`` sums them, as OpenRLHF does.

The run around the loss (reference log-probs once per dataset, held-out
``preference_accuracy`` and ``heldout_accuracy`` before and after) is
``_pairs.train_on_pairs``, shared with dpo.
"""

from __future__ import annotations

from fastpo.kernels import ipo_loss

from ..config import IPOConfig
from ._pairs import preference_data, train_on_pairs

__all__ = ["run"]


def run(config: IPOConfig, warm_start=None) -> dict:
    def pair_loss(chosen, rejected, ref_chosen, ref_rejected):
        return ipo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=config.beta)

    return train_on_pairs("ipo", config, preference_data("ipo", config), pair_loss, warm_start=warm_start)
