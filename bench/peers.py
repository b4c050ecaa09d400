"""The other libraries the suite measures fastpo against, found at run time.

Each peer is optional: ``discover_peers`` says which are importable, which run on the
benchmarked device, and why an absent one is absent. A peer that only runs on CUDA is
not imported at all on the CPU (importing some of them needs a GPU driver).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import importlib.util


@dataclasses.dataclass(frozen=True)
class PeerSpec:
    name: str
    module: str  # the module holding the functions the suite calls
    functions: tuple[str, ...]
    devices: tuple[str, ...]  # "cpu", "cuda"
    install: str  # the pip requirement that provides it
    min_capability: tuple[int, int] | None = None  # CUDA compute capability it needs


PEERS = (
    PeerSpec("trl", "trl.trainer.utils", ("selective_log_softmax", "entropy_from_logits"),
             ("cpu", "cuda"), "trl"),
    PeerSpec("liger", "liger_kernel.transformers.functional",
             ("liger_cross_entropy", "liger_fused_linear_cross_entropy"), ("cuda",), "liger-kernel"),
    PeerSpec("liger_chunked", "liger_kernel.chunked_loss",
             ("LigerFusedLinearGRPOLoss", "LigerFusedLinearDPOLoss", "LigerFusedLinearKTOLoss"),
             ("cpu", "cuda"), "liger-kernel"),  # PyTorch code under torch.compile, no Triton
    PeerSpec("flash_attn", "flash_attn.ops.triton.cross_entropy", ("cross_entropy_loss",),
             ("cuda",), "flash-attn"),
    PeerSpec("cut_cross_entropy", "cut_cross_entropy", ("linear_cross_entropy",), ("cuda",),
             "cut-cross-entropy"),
    PeerSpec("quack", "quack.cross_entropy", ("cross_entropy",), ("cuda",), "quack-kernels",
             min_capability=(9, 0)),
)


def _installed(module: str) -> bool:
    """Whether ``module``'s top-level package can be found, without importing it."""
    top = module.split(".")[0]
    try:
        return importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):  # ValueError: a module in sys.modules without a spec
        return True


def _device_support(spec: PeerSpec, device: str) -> str | None:
    """Why ``spec`` cannot run on ``device``, or None when it can."""
    if device not in spec.devices:
        return f"runs on {' or '.join(spec.devices)} only, not on {device}"
    if device == "cuda" and spec.min_capability:
        import torch

        capability = torch.cuda.get_device_capability()
        if capability < spec.min_capability:
            need = ".".join(map(str, spec.min_capability))
            return f"needs compute capability {need}, the GPU has {capability[0]}.{capability[1]}"
    return None


def discover_peers(device: str, specs=PEERS) -> dict[str, dict]:
    """``{name: {"available", "installed", "module", "note"}}`` for every peer of ``specs``.

    ``available`` is True when the peer's module imports, holds every function the suite
    calls, and runs on ``device``; ``note`` then gives its version, otherwise why not.
    """
    found = {}
    for spec in specs:
        status = {"available": False, "installed": _installed(spec.module), "module": spec.module}
        unsupported = _device_support(spec, device)
        if unsupported:
            status["note"] = unsupported + ("" if status["installed"] else f"; not installed (pip install {spec.install})")
        else:
            try:
                module = importlib.import_module(spec.module)
            except Exception as error:  # a broken install raises more than ImportError
                status["installed"] = status["installed"] and not isinstance(error, ModuleNotFoundError)
                status["note"] = f"not importable ({type(error).__name__}: {error}); pip install {spec.install}"
            else:
                status["installed"] = True
                missing = [name for name in spec.functions if not hasattr(module, name)]
                if missing:
                    status["note"] = f"{spec.module} has no {', '.join(missing)} (an incompatible version?)"
                else:
                    status["available"] = True
                    status["note"] = "version " + _version(spec)
        found[spec.name] = status
    return found


def _version(spec: PeerSpec) -> str:
    """The installed distribution's version (liger_kernel has no ``__version__``), else
    the module's."""
    try:
        return importlib.metadata.version(spec.install)
    except importlib.metadata.PackageNotFoundError:
        top = importlib.import_module(spec.module.split(".")[0])
        return str(getattr(top, "__version__", "unknown"))
