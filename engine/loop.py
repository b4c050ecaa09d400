"""The one training loop every algorithm shares.

The loop owns the data order, gradient accumulation, evaluation, logging, checkpoints,
resume, signals and the NaN guard; an algorithm supplies its loss, its data and, when
its step is not an AdamW step, the update itself:

``loss_fn(model, batch) -> (loss, metrics)``
    ``loss`` is the *sum* of the per-unit losses of the micro-batch (a unit is what the
    loss averages over: a completion token for SFT, a preference pair for DPO), a scalar
    tensor with gradient. ``metrics`` maps names to the micro-batch's values, each
    declaring how the step reduces it (``engine/step_metrics.py``): a plain value is a
    *sum* over the same units (logged as the step's mean per unit), a pair ``(sum,
    count)`` a mean over ``count`` (a per-sequence mean, such as the rollout reward, in a
    loss whose unit is the token), and ``maximum``/``minimum``/``total`` the step's
    extreme or sum. They stay tensors until the step ends: one transfer to the host per
    step, none per micro-batch. ``batch["num_units"]`` (an int) is the micro-batch's
    unit count.

``batches(position) -> iterator of micro-batches``
    The stream of micro-batches starting at micro-batch number ``position`` (0 is the
    first micro-batch of the run). It must be a pure function of ``position`` (the data
    order depends on the seed, never on global RNG state), so that resume continues
    exactly where the interrupted run stopped. A stream that also holds state of its
    own (the online algorithms' rollout buffer, which depends on the model that
    generated it) exposes ``state_dict()`` and ``load_state_dict(state)``: checkpoints
    store that state and resume restores it before asking for the stream.

``update`` (optional): the optimizer step, an ``Update`` built by
``update(model=, params=, config=, world=)`` once the model is on its device (and
sharded). Its ``step(model, loss_fn, micro_batches, world=, autocast=)`` changes the
weights from this rank's micro-batches of one step and returns a ``StepOutcome``: the
record to log and, when the step was thrown away, why (the NaN guard counts it). Its
``state_dict``/``load_state_dict`` are stored in every checkpoint. The default,
``AdamWUpdate``, is accumulation, clipping and an AdamW step under a learning-rate
schedule; trpo's natural-gradient step is another (it takes no ``loss_fn``).

Gradient accumulation and token normalization. One optimizer step takes
``grad_accum_steps`` micro-batches ``b_1..b_G`` with ``n_i = b_i["num_units"]`` units and
``N = n_1 + ... + n_G``. Micro-batch ``i`` is back-propagated with the weight ``1 / N``
(``loss_i / N``, not ``loss_i / n_i / G``), so the step's gradient is the gradient of the
mean loss over every unit of the step: exactly the gradient of one batch holding all of
them, whatever the micro-batches' sizes (TRL's and torchtune's "num_items_in_batch"
normalization; averaging per micro-batch first would over-weight short micro-batches).
The logged ``loss`` and every mean metric are likewise step sums divided by ``N``.

Checkpoints are folders ``checkpoints/step-NNNNNNNN`` in the run directory, written to a
temporary name and renamed when complete (a crash mid-write never leaves a checkpoint that
resume would pick up). Each holds ``model/`` (``save_pretrained``, with the tokenizer) and
``trainer_state.pt`` (the update's state: AdamW's optimizer and scheduler; RNG states
of torch, Python and NumPy, data position, step). ``resume=true`` loads the latest,
truncates ``metrics.jsonl`` to the checkpoint's step, and continues: on the CPU the
resumed run's metrics equal the uninterrupted run's exactly. It refuses
(``ConfigError``) when the folder's ``config.yaml`` differs from the new config in an
option that changes the training's math (every option but those of
``RESUMABLE_CHANGES``). A checkpoint already at ``steps`` or beyond trains nothing, and
says so (``LoopResult.already_done``).

Precision. Parameters keep the ``dtype`` they were loaded in (float32 for ``auto``);
``autocast`` runs each ``loss_fn`` call (forward and loss, not the backward or the
optimizer) under ``torch.autocast``: bfloat16 by default on CUDA, on request on the CPU.
float16 autocast would need loss scaling (a GradScaler, whose overflow steps the NaN
guard would count as bad steps) and is refused. ``gradient_checkpointing`` switches on
Hugging Face's activation recomputation (non-reentrant).

Outputs besides ``metrics.jsonl``: TensorBoard event files in ``run_dir/tensorboard``
when the ``tensorboard`` package is installed (a resumed run purges the events after its
checkpoint); the algorithms' ``train_and_evaluate`` then writes ``run_dir/metrics.png``
(``engine/plots.py``) when the run completes. Progress goes to stderr, one line per
stage (``engine/progress.py``).

Several processes. Under ``torchrun`` (``WORLD_SIZE`` > 1) the same loop shards the model
with FSDP2, gives each rank every N-th micro-batch of the step, normalizes by the step's
units over all ranks and writes files on rank 0 only; ``engine/distributed.py`` says how.
One config trains the same model on any number of processes.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from . import distributed
from .config import ConfigError, config_to_dict, from_dict, save_yaml
from .distributed import World
from .progress import Progress, folder_label
from .step_metrics import StepMetrics, mean

__all__ = [
    "CHECKPOINT_DIR",
    "CONFIG_FILE",
    "METRICS_PLOT",
    "LoopResult",
    "RESUMABLE_CHANGES",
    "TrainingDiverged",
    "AdamWUpdate",
    "StepOutcome",
    "Update",
    "accumulate_gradients",
    "autocast_dtype",
    "backpropagate",
    "check_resume_config",
    "latest_checkpoint",
    "learning_rate_factor",
    "load_model_weights",
    "micro_batches_per_step",
    "train_loop",
    "write_run_config",
]

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "trainer_state.pt"
METRICS_FILE = "metrics.jsonl"
METRICS_PLOT = "metrics.png"
CONFIG_FILE = "config.yaml"
TENSORBOARD_DIR = "tensorboard"

# Options a resumed run may change: they leave the math of the remaining steps alone,
# except ``steps``, which may change so that a finished run can be extended (a note then
# says that the schedule, and for the built-in data the rows drawn, follow the new total).
RESUMABLE_CHANGES = frozenset({
    "steps", "resume", "eval_every", "save_every", "log_every", "output_dir", "device",
    "max_bad_steps", "eval_data", "gradient_checkpointing", "threads",
})


class TrainingDiverged(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


@dataclass
class LoopResult:
    """What ``train_loop`` hands back.

    Attributes:
        step: optimizer steps done (skipped steps included).
        interrupted: the run stopped on SIGINT/SIGTERM after writing a checkpoint.
        last_metrics: the last logged training record.
        checkpoint: the last checkpoint written or resumed from (None if none).
        skipped_steps: steps skipped for a non-finite loss or gradient in this session.
        start_step: the step this session started from: 0, or the resumed checkpoint's.
        already_done: it resumed a checkpoint at ``steps`` or beyond: nothing trained.
        target_reached: ``done`` ended the run early; ``last_metrics`` holds (``eval/``)
            the evaluation of the weights handed back.
    """

    step: int
    interrupted: bool
    last_metrics: dict
    checkpoint: Path | None
    skipped_steps: int
    start_step: int = 0
    already_done: bool = False
    target_reached: bool = False


WSD_DECAY_SHARE = 0.2  # of the steps: the decay of lr_schedule=wsd


def learning_rate_factor(step: int, *, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """The multiplier of the peak learning rate for optimizer step ``step`` (from 0).

    Linear warmup ``(step + 1) / (warmup_steps + 1)`` (nanoGPT's; the first step is never
    at 0), then ``cosine`` (half a cosine from 1 to 0 over the remaining steps), ``linear``
    (1 to 0), ``constant``, or ``wsd`` (warmup-stable-decay, MiniCPM's: constant, then
    linear from 1 to 0 over the last ``WSD_DECAY_SHARE`` of the steps).
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    if schedule == "wsd":
        decay_steps = max(1, round(WSD_DECAY_SHARE * total_steps))
        return min(1.0, (total_steps - step) / decay_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    raise ValueError(f"lr_schedule must be cosine, linear, constant or wsd, got {schedule!r}")


# ---------------------------------------------------------------- options


def autocast_dtype(config, device: torch.device) -> torch.dtype | None:
    """The dtype ``loss_fn`` runs under ``torch.autocast`` on ``device``, or None for none:
    ``autocast=auto`` is bfloat16 on CUDA with float32 parameters and none otherwise.
    (The config refused the combinations that cannot train, such as float16 autocast.)"""
    if config.autocast == "bfloat16":
        return torch.bfloat16
    if config.autocast == "auto" and device.type == "cuda" and config.dtype in ("auto", "float32"):
        return torch.bfloat16
    return None


def _flatten(mapping: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def check_resume_config(config, run_dir: str | Path, done: int | None = None) -> None:
    """Refuse to resume the run of ``run_dir`` under a config whose math differs.

    Compares ``config`` with the folder's ``config.yaml`` (the config of the run being
    resumed) option by option, options of ``RESUMABLE_CHANGES`` excepted; an option the
    older file lacks counts with its default, and one that the config class declares
    not applicable (``NOT_APPLICABLE``: trpo's files from before it dropped the AdamW
    options) is ignored. ``done``: the step of the checkpoint to resume, when known (a
    note about a changed ``steps`` is printed only when steps remain to train).

    Raises:
        ConfigError: naming every differing option with the folder's and the new value.
    """
    import yaml

    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return
    mapping = yaml.safe_load(path.read_text()) or {}
    if isinstance(mapping, dict):
        dropped = getattr(type(config), "NOT_APPLICABLE", {})
        mapping = {key: value for key, value in mapping.items() if key not in dropped}
    try:
        previous = from_dict(type(config), mapping)
    except ConfigError as error:
        raise ConfigError(
            f"resume=true: {path} does not hold a {type(config).__name__} ({error}); "
            "resume it with the algorithm that wrote it, or use another output_dir"
        ) from None
    old, new = _flatten(config_to_dict(previous)), _flatten(config_to_dict(config))
    differing = [key for key in new if key.split(".")[0] not in RESUMABLE_CHANGES and old[key] != new[key]]
    if differing:
        changes = "; ".join(f"option {key!r}: {old[key]!r} in {path}, {new[key]!r} now" for key in differing)
        raise ConfigError(
            f"resume=true: the run in {run_dir} was trained with another config ({changes}); "
            "resume with the same values, or start a new run (another output_dir, or resume=false)"
        )
    if old["steps"] != new["steps"] and (done is None or new["steps"] > done):
        print(
            f"fastpo: resuming with steps={new['steps']} (the run had {old['steps']}); the learning-rate "
            "schedule of the remaining steps (and, for built-in data, the rows drawn) follow the new total",
            file=sys.stderr,
        )


def micro_batches_per_step(config) -> int:
    """``grad_accum_steps``; 1 for a config without it (trpo: one rollout, one step)."""
    return getattr(config, "grad_accum_steps", 1)


def _check_share(config, world: World) -> None:
    per_step = micro_batches_per_step(config)
    if per_step % world.size:
        raise ConfigError(
            f"option 'grad_accum_steps': got {per_step}, which {world.size} processes cannot "
            f"share; use a multiple of {world.size} (it counts the micro-batches of a step over all processes)"
        )


def write_run_config(config, run_dir: str | Path, device: torch.device) -> None:
    """Write ``run_dir/config.yaml`` for a run about to start, after checking that the
    processes can share its steps and, when it resumes a checkpoint, the folder's
    previous config (``check_resume_config``). Under torchrun every rank checks and rank
    0 writes. (The config validated itself when it was built.)"""
    run_dir = Path(run_dir)
    current = distributed.world(device)
    _check_share(config, current)
    checkpoint = latest_checkpoint(run_dir) if config.resume else None
    if checkpoint is not None:
        check_resume_config(config, run_dir, done=int(checkpoint.name[5:]))
    current.barrier()  # every rank has read the old config.yaml before rank 0 replaces it
    if current.is_main:
        save_yaml(config, run_dir / CONFIG_FILE)


# ---------------------------------------------------------------- checkpoints


def _checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint of ``run_dir`` with the highest step, or None."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return None
    complete = [p for p in folder.glob("step-*") if p.name[5:].isdigit() and (p / STATE_FILE).is_file()]
    return max(complete, key=lambda p: int(p.name[5:]), default=None)


def _rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _save_checkpoint(run_dir: Path, step: int, model, tokenizer, update: Update, position: int, batches,
                     world: World) -> Path:
    """Write the checkpoint of ``step`` (rank 0 writes; every rank must call it)."""
    final = run_dir / CHECKPOINT_DIR / _checkpoint_name(step)
    # Gathering the shards is a collective: every rank takes part, rank 0 gets the result.
    weights = distributed.model_state(model, world.size)
    update_state = update.state_dict()
    rng = world.gather(_rng_states())
    if world.is_main:
        partial = final.with_name(final.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        model.save_pretrained(partial / "model", state_dict=weights)
        if tokenizer is not None:
            tokenizer.save_pretrained(partial / "model")
        torch.save(
            {
                "step": step,
                "data_position": position,
                **update_state,  # AdamW's: "optimizer" and "scheduler"
                "rng": rng,  # one entry per rank
                "stream": batches.state_dict() if hasattr(batches, "state_dict") else None,
            },
            partial / STATE_FILE,
        )
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
    world.barrier()  # no rank goes on (or reads the checkpoint) before it is complete
    return final


def load_model_weights(model, model_dir: str | Path) -> None:
    """Load the ``*.safetensors`` files that ``save_pretrained`` wrote into ``model`` (a
    plain model, or one sharded by the loop under torchrun).

    A parameter may be absent from the files only when it is tied to one that is present
    (tied embeddings, which ``save_pretrained`` writes once).
    """
    from safetensors.torch import load_file
    from torch.distributed.tensor import DTensor

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    own = model.state_dict(keep_vars=True)  # the Parameter objects: tied ones are one object
    sharded = any(isinstance(value, DTensor) for value in own.values())
    # A sharded model takes its shards from full tensors on the CPU: no rank holds the
    # whole model on its device.
    device = "cpu" if sharded else str(next(model.parameters()).device)
    state = {}
    for file in files:
        state.update(load_file(file, device=device))
    loaded = {id(own[k]) for k in state if k in own}
    untied = [k for k in own if k not in state and id(own[k]) not in loaded]
    unexpected = [k for k in state if k not in own]
    if untied or unexpected:
        raise ValueError(f"checkpoint {model_dir} does not match the model: missing {untied}, unexpected {unexpected}")
    if sharded:
        distributed.load_full_model_state(model, state)
    else:
        model.load_state_dict(state, strict=False)


def _load_checkpoint(checkpoint: Path, model, update: Update) -> dict:
    load_model_weights(model, checkpoint / "model")
    # weights_only=False: the state holds Python's and NumPy's RNG tuples; the file is
    # one this loop wrote into the user's own run directory.
    state = torch.load(checkpoint / STATE_FILE, weights_only=False)
    update.load_state_dict(state)
    return state


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the records an interrupted run logged after its last checkpoint."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


# ---------------------------------------------------------------- TensorBoard


_tensorboard_note_shown = False


class _TensorBoard:
    """Each logged record as TensorBoard scalars in ``run_dir/tensorboard`` when the
    ``tensorboard`` package is installed; else nothing, and one note per process."""

    def __init__(self, run_dir: Path, step: int):
        global _tensorboard_note_shown
        self.writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            if not _tensorboard_note_shown:
                _tensorboard_note_shown = True
                print("fastpo: tensorboard is not installed; metrics go to metrics.jsonl only", file=sys.stderr)
            return
        folder = run_dir / TENSORBOARD_DIR
        if step == 0:
            shutil.rmtree(folder, ignore_errors=True)  # a fresh run does not add to an older run's curves
        # purge_step: the events an interrupted run wrote after its checkpoint are dropped.
        self.writer = SummaryWriter(str(folder), purge_step=step + 1 if step else None)

    def write(self, record: dict) -> None:
        if self.writer is None:
            return
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(name, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# ---------------------------------------------------------------- the loop


class _StopRequest:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the end of the current step."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second signal: stop now, no checkpoint
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\nfastpo: got {signal.Signals(signum).name}; writing a checkpoint after this step", file=sys.stderr)

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False


def _step_units(group: list[dict], world: World) -> int:
    total_units = int(world.sum([sum(int(batch["num_units"]) for batch in group)])[0])
    if total_units <= 0:
        raise ValueError("the micro-batches of this step hold no units (tokens or pairs) to train on")
    return total_units


def backpropagate(model, loss_fn: Callable, group: list[dict], *, world: World = World(),
                  autocast: torch.dtype | None = None) -> tuple[StepMetrics, int]:
    """Back-propagate the micro-batches of one optimizer step into the ``.grad`` fields,
    with no host sync: ``(metrics, N)``, the step's ``StepMetrics`` (the loss's sum as
    the mean metric ``loss``, and ``loss_fn``'s metrics) and its unit count ``N``.

    Micro-batch ``i`` contributes ``loss_i / N`` where ``N`` is the step's total
    ``num_units`` (see the module doc), so the accumulated gradient is that of the mean
    loss over all the step's units. With ``world.size`` > 1, ``group`` is this rank's
    share of the step, ``N`` counts every rank's units, and each loss is weighted
    ``world.size / N`` because the sharded model averages the ranks' gradients.
    ``autocast``: the dtype of ``torch.autocast`` around each ``loss_fn`` call (on
    ``world.device``'s type), or None.
    """
    total_units = _step_units(group, world)
    metrics = StepMetrics(world.device)
    for batch in group:
        with torch.autocast(world.device.type, dtype=autocast) if autocast else contextlib.nullcontext():
            loss, batch_metrics = loss_fn(model, batch)
        (loss * world.size / total_units).backward()
        metrics.add({"loss": mean(loss), **batch_metrics})
    return metrics, total_units


def accumulate_gradients(model, loss_fn: Callable, group: list[dict], *, world: World = World(),
                         autocast: torch.dtype | None = None) -> tuple[float, dict, int]:
    """``backpropagate``, then the step's values: ``(loss_sum, metric_values, N)``, the
    loss summed over the step's units (and ranks), each metric reduced as it declares
    (a plain one: its step sum over ``N``; a ``(sum, count)`` one: over its summed
    count), and ``N``. Every rank returns the same values (``loss_fn`` must return the
    same metric names on every rank)."""
    values, total_units = _accumulate(model, loss_fn, group, world=world, autocast=autocast)
    return values.pop("loss") * total_units, values, total_units


def _accumulate(model, loss_fn: Callable, group: list[dict], *, world: World, autocast: torch.dtype | None,
                extra: Callable[[], dict[str, torch.Tensor]] | None = None) -> tuple[dict, int]:
    """What ``accumulate_gradients`` and ``AdamWUpdate.step`` share: ``backpropagate``,
    then ``(values, N)``, the reduced metrics with ``loss`` as its mean over ``N`` (the
    value the step logs, not rebuilt from the sum) and ``extra()``'s 0-d tensors, called
    once the gradients are in (a gradient norm), riding along in the same transfer."""
    metrics, total_units = backpropagate(model, loss_fn, group, world=world, autocast=autocast)
    return metrics.reduce(total_units, world, extra=extra() if extra is not None else None), total_units


@dataclass
class StepOutcome:
    """What an ``Update.step`` hands the loop.

    Attributes:
        record: the step's logged values (the loop adds ``step`` and ``step_time_s``).
        skipped: why the step was thrown away (``"non-finite loss"``), or None; the loop
            prints it and counts it toward ``max_bad_steps``.
    """

    record: dict
    skipped: str | None = None


class Update:
    """The optimizer step, the loop's hook: how one step's micro-batches change the
    weights. Built once per run by ``cls(model=, params=, config=, world=)`` (the model
    on its device, sharded under torchrun; ``params`` its trainable parameters)."""

    def step(self, model, loss_fn: Callable | None, micro_batches: list[dict], *, world: World,
             autocast: torch.dtype | None) -> StepOutcome:
        """Change the weights from this rank's ``micro_batches`` of one step (the loss
        goes through ``loss_fn(model, batch)``, the FSDP root's under torchrun)."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """What a checkpoint stores of the update (top-level keys of ``trainer_state.pt``;
        every rank calls it, it may be a collective)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore from a checkpoint's ``trainer_state.pt`` (every key of it is passed)."""


class AdamWUpdate(Update):
    """The default step: accumulate the micro-batches' gradients (``backpropagate``),
    clip their global norm to ``max_grad_norm``, then an AdamW step (``learning_rate``,
    ``weight_decay``) under the schedule of ``learning_rate_factor`` (``warmup_steps``,
    ``lr_schedule`` over ``steps``). A step whose loss or gradient norm is not finite is
    thrown away (its gradient dropped; the schedule still advances, so the learning rate
    stays a function of the step number). Logs ``lr``, ``loss``, ``grad_norm`` (before
    clipping), ``units`` and ``loss_fn``'s metrics."""

    def __init__(self, *, model, params: list, config, world: World):
        self.model, self.params, self.world = model, params, world
        self.max_norm = config.max_grad_norm if config.max_grad_norm is not None else math.inf
        self.optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: learning_rate_factor(
                step, total_steps=config.steps, warmup_steps=config.warmup_steps, schedule=config.lr_schedule
            ),
        )

    def step(self, model, loss_fn, micro_batches, *, world, autocast) -> StepOutcome:
        self.optimizer.zero_grad(set_to_none=True)
        values, total_units = _accumulate(
            model, loss_fn, micro_batches, world=world, autocast=autocast,
            extra=lambda: {"grad_norm": _grad_norm(self.params, self.max_norm)},
        )
        loss, grad_norm = values.pop("loss"), values.pop("grad_norm")
        record = {"lr": self.scheduler.get_last_lr()[0]}
        skipped = None
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.optimizer.step()
            record.update(loss=loss, grad_norm=grad_norm, units=total_units, **values)
        else:
            self.optimizer.zero_grad(set_to_none=True)
            skipped = f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'}"
            # null rather than NaN: metrics.jsonl stays standard JSON.
            record.update(skipped=skipped, loss=None, grad_norm=None)
        self.scheduler.step()
        return StepOutcome(record, skipped)

    def state_dict(self) -> dict:
        return {
            "optimizer": distributed.optimizer_state(self.model, self.optimizer, self.world.size),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        distributed.load_optimizer_state(self.model, self.optimizer, state["optimizer"], self.world.size)
        self.scheduler.load_state_dict(state["scheduler"])


def _call_root(root, batch: dict):
    return root(batch)


def _enable_gradient_checkpointing(model) -> None:
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(
            f"option 'gradient_checkpointing': got true, but {type(model).__name__} does not support "
            "gradient checkpointing (Hugging Face's supports_gradient_checkpointing); set it to false"
        )
    # Non-reentrant: correct with inputs that need no gradient and under FSDP (PyTorch's advice).
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _grad_norm(params: list, max_norm: float) -> torch.Tensor:
    """Clip the gradients' global norm to ``max_norm``; the norm before clipping, a 0-d
    tensor on the device (no host sync)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    # Sharded parameters give a DTensor norm; its full value is the global norm.
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def train_loop(
    *,
    model,
    tokenizer,
    config,
    loss_fn: Callable | None,
    batches: Callable[[int], Iterator[dict]],
    run_dir: str | Path,
    evaluate: Callable[[object], dict] | None = None,
    done: Callable[[dict], bool] | None = None,
    update: Callable[..., Update] = AdamWUpdate,
) -> LoopResult:
    """Train ``model`` with ``loss_fn`` on ``batches`` under ``config``, each optimizer
    step made by ``update`` (``AdamWUpdate`` by default; see the module doc).

    Uses from ``config``: ``steps``, ``grad_accum_steps`` (1 when the config has none),
    ``eval_every``, ``save_every``, ``log_every``, ``resume``, ``max_bad_steps``,
    ``seed``, ``dtype``, ``autocast``, ``gradient_checkpointing``, and what ``update``
    uses (AdamW: ``learning_rate``, ``weight_decay``, ``warmup_steps``, ``lr_schedule``,
    ``max_grad_norm``).

    Each logged record (one JSON line of ``run_dir/metrics.jsonl``) holds ``step``, the
    update's record (AdamW: ``loss``, ``lr``, ``grad_norm`` before clipping, ``units`` of
    the step and the algorithm's metrics) and ``step_time_s`` (wall clock, the one field
    a resumed run does not reproduce). Records are written every ``log_every`` steps, at
    the last step, at every evaluation and at every skipped step; a skipped step's
    record holds ``skipped`` (the reason) and null ``loss`` and ``grad_norm``.
    ``evaluate(model)`` runs every ``eval_every`` steps before the last and its results
    are logged with an ``eval/`` prefix (the algorithm evaluates before and after
    training on its own: ``_common.train_and_evaluate``).
    ``done(results)``, when given, sees each periodic evaluation's results; True ends
    the run at that step (a checkpoint is written and the run counts as completed).
    Returns a ``LoopResult``.

    Under torchrun every rank calls it; the model is sharded in place during the run
    and handed back with its full parameters on every rank, for evaluation and saving
    (it stays FSDP-managed: it cannot be handed to the loop a second time). A ``batches``
    with a ``full_model`` attribute (the online algorithms' ``RolloutStream``) gets a
    context that gathers the full parameters there, for generating with the model.

    Raises:
        TrainingDiverged: ``max_bad_steps`` steps in a row with a non-finite loss or
            gradient norm; the model is left as after the last good step and the last
            checkpoint on disk is untouched.
        ConfigError: ``gradient_checkpointing`` on a model without it, or a
            ``grad_accum_steps`` that is not a multiple of the number of processes.
    """
    run_dir = Path(run_dir)
    device = next(model.parameters()).device
    autocast = autocast_dtype(config, device)
    world = distributed.world(device)
    _check_share(config, world)
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = run_dir / METRICS_FILE
    # Each rank draws its own random numbers (sampling, dropout); rank 0 those of one process.
    _seed_all(config.seed + world.rank)

    if config.gradient_checkpointing:
        _enable_gradient_checkpointing(model)
    root = None
    if world.size > 1:
        if loss_fn is None:
            raise NotImplementedError("an update without a loss_fn (trpo) runs in one process only")
        root = distributed.shard_model(model, loss_fn, device, world.size)
        trained, compute_loss = root, _call_root
        if hasattr(batches, "full_model"):  # a stream that generates with the model (RolloutStream)
            batches.full_model = lambda: distributed.full_parameters(root)
    else:
        trained, compute_loss = model, loss_fn
    params = [p for p in model.parameters() if p.requires_grad]  # after sharding: the shards
    updater = update(model=model, params=params, config=config, world=world)

    say = (lambda text: print(text, file=sys.stderr)) if world.is_main else (lambda text: None)
    step, position, checkpoint = 0, 0, None
    if config.resume:
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is None:
            say(f"fastpo: resume=true but {run_dir} holds no checkpoint; starting from step 0")
        else:
            state = _load_checkpoint(checkpoint, model, updater)
            step, position = state["step"], state["data_position"]
            rng = state["rng"]
            if world.rank < len(rng):
                _set_rng_states(rng[world.rank])
            else:  # a checkpoint of fewer processes: this rank starts its own stream
                _seed_all(config.seed + world.rank)
            if state.get("stream") is not None:
                batches.load_state_dict(state["stream"])
            say(f"fastpo: resumed from {checkpoint} (step {step})")
    if world.is_main:
        if step == 0:
            metrics_path.write_text("")  # a fresh run does not append to an older run's log
        else:
            _truncate_metrics(metrics_path, step)
    world.barrier()  # the log is settled before any rank reads it
    logged = metrics_path.read_text().splitlines() if step else []
    last_record = json.loads(logged[-1]) if logged else {}
    start_step = step
    already_done = step > 0 and step >= config.steps
    if already_done:
        say(
            f"fastpo: resume=true: {checkpoint} is already at step {step} and steps={config.steps}: nothing to "
            f"train (set steps above {step} to train further)"
        )

    model.train()
    stream = batches(position)
    progress = Progress(folder_label(run_dir), config.steps, step, shown=world.is_main)
    tensorboard = _TensorBoard(run_dir, step) if world.is_main else None
    bad_in_row, skipped, interrupted = 0, 0, False
    target_reached = False
    try:
        with _StopRequest() as stop, contextlib.ExitStack() as files:
            log = files.enter_context(metrics_path.open("a")) if world.is_main else None

            def write(record: dict) -> None:
                if log is not None:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    tensorboard.write(record)

            while step < config.steps:
                started = time.perf_counter()
                group = [next(stream) for _ in range(micro_batches_per_step(config))]
                position += len(group)
                outcome = updater.step(
                    trained, compute_loss, group[world.rank :: world.size], world=world, autocast=autocast
                )
                step += 1
                record = {"step": step, **outcome.record}
                if outcome.skipped is None:
                    bad_in_row = 0
                else:
                    bad_in_row += 1
                    skipped += 1
                    say(f"fastpo: step {step}: {outcome.skipped}; step skipped")
                record["step_time_s"] = time.perf_counter() - started
                if bad_in_row >= config.max_bad_steps:
                    write(record)
                    kept = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written"
                    raise TrainingDiverged(
                        f"{bad_in_row} steps in a row (up to step {step}) had a non-finite loss or gradient; "
                        f"stopping ({kept}). Lower learning_rate or check the data."
                    )
                evaluating = evaluate is not None and config.eval_every and step % config.eval_every == 0
                finished_early = False
                if evaluating and step < config.steps:
                    # Every rank evaluates the full model (the same numbers); rank 0 logs them.
                    with distributed.full_parameters(root) if root is not None else contextlib.nullcontext():
                        results = evaluate(model)
                    record.update({f"eval/{k}": v for k, v in results.items()})
                    finished_early = done is not None and done(results)
                    model.train()
                if step % config.log_every == 0 or step == config.steps or evaluating or "skipped" in record:
                    write(record)
                last_record = record
                progress.update(step, record)
                # The ranks may get a signal at different steps; they stop at the same one.
                stopping = world.any(stop.signal is not None)
                saving = (config.save_every and step % config.save_every == 0) or step == config.steps
                if stopping or saving or finished_early:
                    if bad_in_row == 0:  # never replace a good checkpoint by a skipped step's state
                        checkpoint = _save_checkpoint(
                            run_dir, step, model, tokenizer, updater, position, batches, world
                        )
                    if stopping:
                        interrupted = True
                        progress.close()
                        say(f"fastpo: stopped at step {step}; checkpoint {checkpoint}")
                        break
                    if finished_early:
                        target_reached = True
                        progress.finish(f"target reached at step {step}")
                        say(f"fastpo: the run's target is reached at step {step}; checkpoint {checkpoint}")
                        break
    finally:
        progress.close()
        if tensorboard is not None:
            tensorboard.close()
    if root is not None:
        distributed.unshard_all(root)
    return LoopResult(step, interrupted, last_record, checkpoint, skipped, start_step, already_done, target_reached)
