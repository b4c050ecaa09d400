"""fastpo.engine: training entry points built on fastpo.kernels."""

from ._shadowing import hide_repository_kernels

# Before anything here imports transformers: see _shadowing.py.
hide_repository_kernels()

from .config import ALGORITHMS, ConfigError, load_config  # noqa: E402
from .distributed import shutdown_distributed  # noqa: E402
from .runner import train  # noqa: E402

__all__ = ["ALGORITHMS", "ConfigError", "load_config", "shutdown_distributed", "train"]
