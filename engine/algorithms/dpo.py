"""Direct Preference Optimization on ``{"prompt", "chosen", "rejected"}`` pairs, or
Plackett-Luce DPO on ``{"prompt", "responses"}`` rows of K responses ranked best first.

With sequence log-probs ``lp`` (summed over response tokens, or averaged with
``average=true``) and the reference's ``lp_ref``:

* pairs: the margin is ``h = (lp_c - lp_ref_c) - (lp_r - lp_ref_r)`` and
  ``fastpo.kernels.dpo_loss`` gives the per-pair loss of ``loss_type``: sigmoid (with
  ``label_smoothing``: cDPO), hinge, robust or ipo. The unit of the loss is the pair.
* ranked rows: with ``h_k = lp_k - lp_ref_k``, ``fastpo.kernels.plackett_luce_loss``
  gives ``-sum_{k<K} log(exp(beta*h_k) / sum_{j>=k} exp(beta*h_j))`` per row, the
  likelihood of the whole ranking under the implicit reward (for K = 2, the sigmoid
  loss). It has no other ``loss_type`` and no ``label_smoothing``. The unit of the loss
  is the ranked row.

The run around the loss (the frozen reference's log-probs computed once per dataset, the
held-out ``preference_accuracy`` and ``heldout_accuracy`` before and after training) is
``_pairs.train_on_pairs``, shared with ipo; its module doc gives the details.

``rpo_alpha`` > 0 adds ``rpo_alpha * (-lp_c / n_c)`` to each pair's loss, the chosen
response's negative log-likelihood per token (RPO, Pang et al. 2024; TRL 1.16 writes it
``loss_type=["sigmoid", "sft"]``, ``loss_weights=[1, rpo_alpha]``, averaging over the
batch's chosen tokens rather than per pair): on the policy's own samples the sigmoid
loss alone lowers the likelihood of both responses, the chosen one included.
"""

from __future__ import annotations

from fastpo.kernels import dpo_loss, plackett_luce_loss

from ..config import ConfigError, DPOConfig
from ._pairs import preference_data, train_on_pairs

__all__ = ["run"]


def run(config: DPOConfig, warm_start=None) -> dict:
    data = preference_data("dpo", config)
    if data[0] == "ranked" and (config.loss_type != "sigmoid" or config.label_smoothing):
        raise ConfigError(
            f"options 'loss_type' and 'label_smoothing': got {config.loss_type} and {config.label_smoothing}; "
            f"ranked rows ({config.data}) train with the Plackett-Luce loss: use loss_type=sigmoid, label_smoothing=0"
        )

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

    def ranking_loss(policy, reference):
        return plackett_luce_loss(policy, reference, beta=config.beta)

    return train_on_pairs(
        "dpo", config, data, pair_loss, ranking_loss, warm_start=warm_start, chosen_nll_coef=config.rpo_alpha
    )
