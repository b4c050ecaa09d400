"""``train``: the Python entry point of every algorithm.

The shared training loop is not written yet (issue 6, part 2): ``train`` validates the
algorithm and its config, then raises ``NotImplementedError``. It never pretends to train.
"""

from __future__ import annotations

import dataclasses

from .config import BaseConfig, ConfigError, config_class, from_dict

__all__ = ["train"]


def train(algorithm: str, config: BaseConfig | dict | None = None):
    """Run ``algorithm`` with ``config`` (its config dataclass, a dict of options, or None
    for the defaults) and return its final metrics and paths.

    Raises:
        ConfigError: unknown algorithm, or a bad option (see ``config.py``).
        NotImplementedError: always, once the config is valid: the loop does not exist yet.
    """
    cls = config_class(algorithm)
    if config is None or isinstance(config, dict):
        config = from_dict(cls, config)
    elif not isinstance(config, cls):
        raise ConfigError(
            f"config for {algorithm!r} must be a {cls.__name__}, a dict or None, got {type(config).__name__}"
        )
    else:
        # Re-validate: fields of a dataclass can be assigned anything after construction.
        config = from_dict(cls, dataclasses.asdict(config))
    raise NotImplementedError(
        f"{algorithm}: the configuration is valid, but the training loop is not implemented yet; nothing was trained"
    )
