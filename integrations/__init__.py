"""fastpo inside the trainers people already run: one module per trainer family.

* ``fastpo.integrations.trl``: ``enable()`` makes TRL's fused LM head (SFT, DPO, GRPO,
  RLOO, KTO) run on ``fastpo.kernels.linear_token_logprobs``.
* ``fastpo.integrations.verl``: fastpo's policy losses and advantage estimators in verl's
  registries.
* ``fastpo.integrations.openrlhf``: OpenRLHF's loss modules computed by fastpo.

Each module imports its trainer only when called, so fastpo imports without any of
them, and checks the installed version against the range it was tested with.
"""

import importlib.metadata


def installed_version(distribution: str) -> str | None:
    """The installed version of ``distribution``; None when it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def version_supported(installed: str, supported: str) -> bool:
    """Whether version ``installed`` lies in ``supported`` (a packaging SpecifierSet),
    pre-releases included."""
    from packaging.specifiers import SpecifierSet

    return SpecifierSet(supported).contains(installed, prereleases=True)
