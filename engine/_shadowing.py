"""Keep the repository's kernels/ folder from being imported as a top-level ``kernels``.

kernels/ installs as ``fastpo.kernels``. But when Python runs from the repository root
(``python -m fastpo.engine``, ``python -c``, a notebook), the root is on ``sys.path`` and
``importlib.util.find_spec("kernels")`` finds that folder. transformers probes for Hugging
Face's ``kernels`` package that way (``is_kernels_available``, run when a model class is
built); finding no version metadata it then *imports* the folder as ``kernels`` to read a
``__version__``: a second copy of fastpo.kernels under another name (its own autograd
Functions and Triton kernels, compiled again), and a failure of transformers itself if
that import ever breaks. The probe then reports the package absent, so the copy serves no
purpose.

``hide_repository_kernels`` marks the name as not importable (``sys.modules["kernels"] =
None``, Python's documented way to make an import fail and ``find_spec`` return None), and
does so only when the name would resolve to this repository's folder: an installed Hugging
Face ``kernels`` that is found first is left alone. Run before transformers is imported;
once something has imported a top-level ``kernels`` it is too late and nothing is changed.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

__all__ = ["hide_repository_kernels"]


def _origin(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).resolve()


def hide_repository_kernels() -> bool:
    """Block ``import kernels`` when it would load this repository's kernels/ folder.

    Returns whether the name was blocked by this call.
    """
    if "kernels" in sys.modules:
        return False
    top_level = _origin("kernels")
    if top_level is None or top_level != _origin("fastpo.kernels"):
        return False
    sys.modules["kernels"] = None
    return True
