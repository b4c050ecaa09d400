"""fastpo.kernels: fused, autograd-aware ops for policy optimization of language models.

Every op takes ``backend=None`` and picks, in order: the ``backend=`` argument, the
``FASTPO_BACKEND`` environment variable, then Triton for CUDA tensors and pure
PyTorch elsewhere. See the README for the conventions each option matches.

The variants of the ops are named registries (fastpo.kernels.registry):
``POLICY_LOSSES``, ``KL_ESTIMATORS``, ``AGGREGATIONS``, ``ADVANTAGE_ESTIMATORS`` and
``PREFERENCE_LOSSES``; ``PolicyLossOptions`` holds every option of ``policy_loss``.
"""

from ._backend import BACKENDS
from .advantages import (
    ADVANTAGE_ESTIMATORS,
    gae,
    gdpo_advantages,
    group_advantages,
    grpo_passk_advantages,
    opo_advantages,
    optimal_token_baseline_advantages,
    reinforce_pp_advantages,
    remax_advantages,
    rloo_advantages,
    whiten,
)
from .kl import fisher_vector_product, linear_fisher_vector_product, logits_kl
from .linear_logprobs import linear_policy_loss, linear_preference_logprobs, linear_token_logprobs
from .logprobs import token_logprobs
from .policy import AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES, PolicyLossOptions, kl_penalty, policy_loss, value_loss
from .preference import (
    PREFERENCE_LOSSES,
    bradley_terry_loss,
    dpo_loss,
    ipo_loss,
    kto_loss,
    kto_mismatched_pairs,
    plackett_luce_loss,
    ranking_loss,
)
from .sequence import sequence_logprobs

__all__ = [
    "BACKENDS",
    "token_logprobs",
    "logits_kl",
    "fisher_vector_product",
    "linear_fisher_vector_product",
    "group_advantages",
    "rloo_advantages",
    "reinforce_pp_advantages",
    "grpo_passk_advantages",
    "opo_advantages",
    "remax_advantages",
    "gdpo_advantages",
    "optimal_token_baseline_advantages",
    "gae",
    "whiten",
    "sequence_logprobs",
    "dpo_loss",
    "ipo_loss",
    "kto_loss",
    "kto_mismatched_pairs",
    "plackett_luce_loss",
    "bradley_terry_loss",
    "ranking_loss",
    "kl_penalty",
    "policy_loss",
    "PolicyLossOptions",
    "POLICY_LOSSES",
    "KL_ESTIMATORS",
    "AGGREGATIONS",
    "ADVANTAGE_ESTIMATORS",
    "PREFERENCE_LOSSES",
    "value_loss",
    "linear_token_logprobs",
    "linear_policy_loss",
    "linear_preference_logprobs",
]
