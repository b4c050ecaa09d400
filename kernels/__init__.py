"""fastpo.kernels: fused, autograd-aware ops for policy optimization of language models.

Every op takes ``backend=None`` and picks, in order: the ``backend=`` argument, the
``FASTPO_BACKEND`` environment variable, then Triton for CUDA tensors and pure
PyTorch elsewhere. See the README for the conventions each option matches.
"""

from ._backend import BACKENDS
from .advantages import gae, group_advantages, reinforce_pp_advantages, rloo_advantages, whiten
from .kl import logits_kl
from .linear_logprobs import linear_policy_loss, linear_preference_logprobs, linear_token_logprobs
from .logprobs import token_logprobs
from .policy import kl_penalty, policy_loss, value_loss
from .preference import (
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
    "group_advantages",
    "rloo_advantages",
    "reinforce_pp_advantages",
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
    "value_loss",
    "linear_token_logprobs",
    "linear_policy_loss",
    "linear_preference_logprobs",
]
