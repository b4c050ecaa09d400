"""fastpo.kernels: fused, autograd-aware ops for policy optimization of language models.

Every op takes ``backend=None`` and picks, in order: the ``backend=`` argument, the
``FASTPO_BACKEND`` environment variable, then Triton for CUDA tensors and pure
PyTorch elsewhere. See the README for the conventions each option matches.
"""

from ._backend import BACKENDS
from .logprobs import token_logprobs

__all__ = ["BACKENDS", "token_logprobs"]
