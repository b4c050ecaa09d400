"""The peers' own modules, imported on the CPU for conformance tests.

verl's and OpenRLHF's package ``__init__`` files pull in their GPU and rollout stacks
(verl's imports its data protocol, OpenRLHF's flash-attn through its actor model). The
modules the tests need, verl's ``trainer.ppo.core_algos`` and OpenRLHF's
``models.loss`` and ``models.utils``, import with light dependencies once those
``__init__`` files are skipped: each package is registered as a bare namespace over its
installed folder, and its submodules then load from there as usual. OpenRLHF's
``models.utils`` imports DeepSpeed at the top for one function the tests never call; when
DeepSpeed is absent (the ``[test]`` extra leaves it out: installed, transformers imports it
when saving models and it prints to stdout) a placeholder stands in during that import.

Each function returns the module, or skips the calling test when the peer is not
installed (the ``[test]`` extra and ``make test`` install them).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest


def _bare_package(name: str) -> None:
    """Register ``name`` as a package over its installed folder without running its
    ``__init__``; a package already imported is left as it is."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.submodule_search_locations is None:
        pytest.skip(f"{name} is not installed")
    package = types.ModuleType(name)
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    sys.modules[name] = package


def _import(module: str, bare: tuple[str, ...], placeholders: tuple[str, ...] = ()):
    top = module.split(".")[0]
    if importlib.util.find_spec(top) is None:
        pytest.skip(f"{top} is not installed")
    for name in bare:
        _bare_package(name)
    absent = [name for name in placeholders if name not in sys.modules and importlib.util.find_spec(name) is None]
    for name in absent:
        sys.modules[name] = _Placeholder(name)
    try:
        return importlib.import_module(module)
    finally:
        for name in absent:  # nothing else may take the placeholder for the package
            del sys.modules[name]


class _Placeholder(types.ModuleType):
    """An absent module that a peer imports but the tests never use: any use is an error."""

    def __getattr__(self, attribute: str):
        raise AttributeError(f"{self.__name__}.{attribute}: {self.__name__} is not installed (a placeholder for the tests)")


def verl_core_algos():
    """``verl.trainer.ppo.core_algos``: verl's policy losses, advantage estimators and
    their registries."""
    return _import("verl.trainer.ppo.core_algos", ("verl",))


def openrlhf_loss():
    """``openrlhf.models.loss``: OpenRLHF's ``PolicyLoss``, ``ValueLoss`` and the others."""
    return _import("openrlhf.models.loss", ("openrlhf", "openrlhf.models"), ("deepspeed",))


def openrlhf_utils():
    """``openrlhf.models.utils``: OpenRLHF's ``compute_approx_kl`` and masked means."""
    return _import("openrlhf.models.utils", ("openrlhf", "openrlhf.models"), ("deepspeed",))
