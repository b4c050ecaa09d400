"""Training on several processes under ``torchrun``: the same loop, sharded with FSDP2.

``torchrun --nproc-per-node N -m fastpo.engine sft ...`` starts N processes of the same
command. When ``WORLD_SIZE`` > 1 each process joins one process group (nccl on CUDA,
gloo on the CPU) and uses ``cuda:LOCAL_RANK`` (or the CPU); the shared loop then

- shards the trained model with PyTorch FSDP2 (``fully_shard``): each block that Hugging
  Face lists in the model's ``_no_split_modules`` (the decoder layers) is one unit, and
  the rest (embeddings, final norm, heads) is the root unit, a module whose forward is
  the algorithm's ``loss_fn`` (``LossModule``), so the root parameters are gathered for
  exactly the span of one loss computation, however ``loss_fn`` reaches them;
- splits each optimizer step's micro-batches over the ranks: ``grad_accum_steps`` counts
  the micro-batches of the whole step, and rank ``r`` takes micro-batches ``r``,
  ``r + N``, ``r + 2N``, ... of them (so ``grad_accum_steps`` must be a multiple of N,
  and one config trains the same model whatever N is);
- normalizes by the step's unit count summed over all ranks and back-propagates
  ``loss_i * N / units``: FSDP averages the gradients over the N ranks, so the result is
  the gradient of the mean loss over every unit of the global step;
- writes metrics, plots and checkpoints on rank 0 only; a checkpoint holds the full
  (gathered) state dicts, a normal Hugging Face folder that any number of processes
  can resume from.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from dataclasses import dataclass

import torch

from .config import ConfigError

__all__ = [
    "LossModule",
    "World",
    "full_parameters",
    "launched_world",
    "load_full_model_state",
    "load_optimizer_state",
    "model_state",
    "optimizer_state",
    "reshard_all",
    "resolve_device",
    "shard_model",
    "unshard_all",
    "world",
]


@dataclass(frozen=True)
class World:
    """This process's place among the training processes: ``rank`` of ``size``, and its
    training ``device`` (where the collectives' tensors live: nccl needs CUDA ones).

    With ``size == 1`` every collective is the identity and no process group exists.
    """

    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and prints progress."""
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """``values`` summed element-wise over all ranks (float64)."""
        if self.size == 1:
            return list(values)
        total = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(total)
        return total.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on at least one."""
        return self.sum([float(flag)])[0] > 0

    def gather(self, obj) -> list:
        """Every rank's ``obj`` in rank order (on every rank)."""
        if self.size == 1:
            return [obj]
        gathered = [None] * self.size
        torch.distributed.all_gather_object(gathered, obj)
        return gathered

    def barrier(self) -> None:
        if self.size > 1:
            torch.distributed.barrier()


def launched_world() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment variables."""
    try:
        return tuple(int(os.environ.get(name, default)) for name, default in
                     (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    except ValueError:
        raise RuntimeError(
            "RANK, WORLD_SIZE and LOCAL_RANK must be integers (torchrun sets them); got "
            + ", ".join(f"{n}={os.environ.get(n)!r}" for n in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        ) from None


def world(device: torch.device) -> World:
    """This process's ``World`` training on ``device``; under torchrun (``WORLD_SIZE`` >
    1) the process group is started on first use, nccl when ``device`` is CUDA and gloo
    otherwise."""
    rank, size, _ = launched_world()
    if size == 1:
        return World(device=device)
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, device_id=device if backend == "nccl" else None)
        atexit.register(_destroy_process_group)
    return World(torch.distributed.get_rank(), torch.distributed.get_world_size(), device)


def _destroy_process_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def shutdown_distributed() -> None:
    """End this process's share of a torchrun job: wait for every rank, then destroy
    the process group. Call it on every rank after the last ``train`` that finished
    (``fastpo`` on the command line does). Without the barrier a gloo rank that tears
    its group down while another is still finishing aborts now and then at exit
    ("terminate called without an active exception": about 1 in 7 two-process runs
    here, none in 24 with it). Not for a rank leaving on an error, where the others
    would wait; the atexit hook destroys the group then. A no-op outside torchrun."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def resolve_device(name: str) -> torch.device:
    """The device of option ``device`` for this process, starting the process group
    under torchrun. ``auto`` is CUDA when available, else the CPU; under torchrun
    ``cuda`` and ``auto`` mean ``cuda:LOCAL_RANK``, one GPU per process."""
    _, size, local_rank = launched_world()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"option 'device': got {name!r}; expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and size > 1:
        if device.index is not None:
            raise ConfigError(
                f"option 'device': got {name!r}, but under torchrun each process uses cuda:LOCAL_RANK; "
                "use device=cuda or auto"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)  # nccl and CUDA's current device follow it
    world(device)
    return device


class LossModule(torch.nn.Module):
    """The FSDP2 root: ``forward(batch)`` is ``loss_fn(model, batch)``.

    FSDP gathers a unit's parameters in the unit's forward; the algorithms' loss
    functions reach parts of the model without calling its forward (the decoder for the
    hidden states, the LM head's weight for ``linear_token_logprobs``), so the root unit
    is this module around the whole loss computation."""

    def __init__(self, model: torch.nn.Module, loss_fn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict):
        return self.loss_fn(self.model, batch)


def shard_model(model: torch.nn.Module, loss_fn, device: torch.device, size: int) -> LossModule:
    """Shard ``model`` in place with FSDP2 over ``size`` ranks and return the root
    ``LossModule``. The parameters of ``model`` become DTensor shards (collect them for
    the optimizer afterwards)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (size,))
    block_names = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in block_names:
            fully_shard(module, mesh=mesh, reshard_after_forward=True)
    root = LossModule(model, loss_fn)
    # The root's parameters (embeddings, head) are needed again at once by the backward.
    fully_shard(root, mesh=mesh, reshard_after_forward=False)
    # FSDP makes whichever unit runs forward first the root; an online algorithm's first
    # forward is generation through the decoder layers, so settle the root now.
    root._get_fsdp_state()._lazy_init()
    return root


def unshard_all(root: LossModule) -> None:
    """Gather the full parameters of every unit on every rank and keep them across
    forwards, so that the model can be called as a plain module (evaluation,
    generation, the model a run hands back). A collective."""
    from torch.distributed.fsdp import FSDPModule

    for unit in root.modules():
        if isinstance(unit, FSDPModule):
            unit.unshard()
            unit.set_reshard_after_forward(False, recurse=False)


def reshard_all(root: LossModule) -> None:
    """Undo ``unshard_all``: back to the shards and the resharding of ``shard_model``."""
    from torch.distributed.fsdp import FSDPModule

    for unit in root.modules():
        if isinstance(unit, FSDPModule):
            unit.set_reshard_after_forward(unit is not root, recurse=False)
            unit.reshard()


@contextlib.contextmanager
def full_parameters(root: LossModule):
    """Full parameters on every rank inside the block (``unshard_all``); every rank must enter it."""
    unshard_all(root)
    try:
        yield
    finally:
        reshard_all(root)


def optimizer_state(model: torch.nn.Module, optimizer, size: int) -> dict:
    """The optimizer's state keyed by parameter name, with full tensors: the same format
    for any number of processes, so a checkpoint resumes on any. With ``size`` > 1 a
    collective whose result is on rank 0 (on the CPU; the other ranks get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=size > 1, cpu_offload=size > 1)
    return get_optimizer_state_dict(model, optimizer, options=options)


def model_state(model: torch.nn.Module, size: int) -> dict | None:
    """The full model state dict on rank 0 (CPU) when sharded over ``size`` > 1 ranks (a
    collective; the other ranks get an empty dict); None for one process, where
    ``save_pretrained`` reads the model itself."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if size == 1:
        return None
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: torch.nn.Module, optimizer, state: dict, size: int) -> None:
    """Load what ``optimizer_state`` returned (every rank passes the full state)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=size > 1))


def load_full_model_state(model: torch.nn.Module, state: dict) -> None:
    """Load a full state dict (every rank holds it) into a model sharded by ``shard_model``;
    keys absent from ``state`` are left as they are."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
