"""The one training loop every offline algorithm shares.

An algorithm supplies two things and the loop owns everything else (optimizer, schedule,
accumulation, clipping, evaluation, logging, checkpoints, resume, signals, NaN guard):

``loss_fn(model, batch) -> (loss, metrics)``
    ``loss`` is the *sum* of the per-unit losses of the micro-batch (a unit is what the
    loss averages over: a completion token for SFT, a preference pair for DPO), a scalar
    tensor with gradient. ``metrics`` maps names to *sums* over the same units (floats or
    0-d tensors). ``batch["num_units"]`` (an int) is the micro-batch's unit count.

``batches(position) -> iterator of micro-batches``
    The stream of micro-batches starting at micro-batch number ``position`` (0 is the
    first micro-batch of the run). It must be a pure function of ``position`` (the data
    order depends on the seed, never on global RNG state), so that resume continues
    exactly where the interrupted run stopped. A stream that also holds state of its
    own (the online algorithms' rollout buffer, which depends on the model that
    generated it) exposes ``state_dict()`` and ``load_state_dict(state)``: checkpoints
    store that state and resume restores it before asking for the stream.

A metric may also be a pair ``(sum, count)``: it is logged as the step's sum over the
step's count (a per-sequence mean, such as the rollout reward, in a loss whose unit is
the token).

Gradient accumulation and token normalization. One optimizer step takes
``grad_accum_steps`` micro-batches ``b_1..b_G`` with ``n_i = b_i["num_units"]`` units and
``N = n_1 + ... + n_G``. Micro-batch ``i`` is back-propagated with the weight ``1 / N``
(``loss_i / N``, not ``loss_i / n_i / G``), so the step's gradient is the gradient of the
mean loss over every unit of the step: exactly the gradient of one batch holding all of
them, whatever the micro-batches' sizes (TRL's and torchtune's "num_items_in_batch"
normalization; averaging per micro-batch first would over-weight short micro-batches).
The logged ``loss`` and every metric are likewise step sums divided by ``N``.

Checkpoints are folders ``checkpoints/step-NNNNNNNN`` in the run directory, written to a
temporary name and renamed when complete (a crash mid-write never leaves a checkpoint that
resume would pick up). Each holds ``model/`` (``save_pretrained``, with the tokenizer) and
``trainer_state.pt`` (optimizer, scheduler, RNG states of torch, Python and NumPy, data
position, step). ``resume=true`` loads the latest, truncates ``metrics.jsonl`` to the
checkpoint's step, and continues: on the CPU the resumed run's metrics equal the
uninterrupted run's exactly.
"""

from __future__ import annotations

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

__all__ = [
    "CHECKPOINT_DIR",
    "LoopResult",
    "TrainingDiverged",
    "accumulate_gradients",
    "latest_checkpoint",
    "learning_rate_factor",
    "load_model_weights",
    "train_loop",
]

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "trainer_state.pt"
METRICS_FILE = "metrics.jsonl"


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
    """

    step: int
    interrupted: bool
    last_metrics: dict
    checkpoint: Path | None
    skipped_steps: int


def learning_rate_factor(step: int, *, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """The multiplier of the peak learning rate for optimizer step ``step`` (from 0).

    Linear warmup ``(step + 1) / (warmup_steps + 1)`` (nanoGPT's; the first step is never
    at 0), then ``cosine`` (half a cosine from 1 to 0 over the remaining steps), ``linear``
    (1 to 0) or ``constant``.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    raise ValueError(f"lr_schedule must be cosine, linear or constant, got {schedule!r}")


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


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _save_checkpoint(run_dir: Path, step: int, model, tokenizer, optimizer, scheduler, position: int, batches) -> Path:
    final = run_dir / CHECKPOINT_DIR / _checkpoint_name(step)
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial / "model")
    if tokenizer is not None:
        tokenizer.save_pretrained(partial / "model")
    torch.save(
        {
            "step": step,
            "data_position": position,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": _rng_states(),
            "stream": batches.state_dict() if hasattr(batches, "state_dict") else None,
        },
        partial / STATE_FILE,
    )
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    return final


def load_model_weights(model, model_dir: str | Path) -> None:
    """Load the ``*.safetensors`` files that ``save_pretrained`` wrote into ``model``.

    A parameter may be absent from the files only when it shares storage with one that
    is present (tied embeddings, which ``save_pretrained`` writes once).
    """
    from safetensors.torch import load_file

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    state = {}
    for file in files:
        state.update(load_file(file, device=str(next(model.parameters()).device)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    own = model.state_dict()
    loaded_storage = {own[k].data_ptr() for k in state if k in own}
    untied = [k for k in missing if own[k].data_ptr() not in loaded_storage]
    if untied or unexpected:
        raise ValueError(f"checkpoint {model_dir} does not match the model: missing {untied}, unexpected {unexpected}")


def _load_checkpoint(checkpoint: Path, model, optimizer, scheduler) -> dict:
    load_model_weights(model, checkpoint / "model")
    # weights_only=False: the state holds Python's and NumPy's RNG tuples; the file is
    # one this loop wrote into the user's own run directory.
    state = torch.load(checkpoint / STATE_FILE, weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the records an interrupted run logged after its last checkpoint."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


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


class _Progress:
    """tqdm when installed, else one printed line every ``log_every`` steps."""

    def __init__(self, total: int, initial: int, log_every: int):
        self.log_every = log_every
        try:
            from tqdm.auto import tqdm
        except ImportError:
            self.bar = None
        else:
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
        self.total = total

    def update(self, step: int, record: dict) -> None:
        shown = {k: record[k] for k in ("loss", "lr", "grad_norm") if record.get(k) is not None}
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
        elif step % self.log_every == 0 or step == self.total:
            text = " ".join(f"{k}={v:.4g}" for k, v in shown.items())
            print(f"step {step}/{self.total} {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _as_float(value) -> float:
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


def accumulate_gradients(model, loss_fn: Callable, group: list[dict]) -> tuple[float, dict, int]:
    """Back-propagate the micro-batches of one optimizer step into the ``.grad`` fields.

    Micro-batch ``i`` contributes ``loss_i / N`` where ``N`` is the step's total
    ``num_units`` (see the module doc), so the accumulated gradient is that of the mean
    loss over all the step's units. Returns ``(loss_sum, metric_means, N)``: the loss
    sum as a float, each metric's step sum over ``N`` (or over its own summed count,
    for a ``(sum, count)`` metric), and ``N``.
    """
    total_units = sum(int(batch["num_units"]) for batch in group)
    if total_units <= 0:
        raise ValueError("the micro-batches of this step hold no units (tokens or pairs) to train on")
    loss_sum, metric_sums = 0.0, {}
    for batch in group:
        loss, metrics = loss_fn(model, batch)
        (loss / total_units).backward()
        loss_sum += _as_float(loss)
        for name, value in metrics.items():
            value, count = value if isinstance(value, tuple) else (value, None)
            total, counted = metric_sums.get(name, (0.0, 0.0))
            metric_sums[name] = (total + _as_float(value), None if count is None else counted + _as_float(count))
    means = {
        name: total / (total_units if count is None else max(count, 1.0))
        for name, (total, count) in metric_sums.items()
    }
    return loss_sum, means, total_units


def train_loop(
    *,
    model,
    tokenizer,
    config,
    loss_fn: Callable,
    batches: Callable[[int], Iterator[dict]],
    run_dir: str | Path,
    evaluate: Callable[[object], dict] | None = None,
) -> LoopResult:
    """Train ``model`` with ``loss_fn`` on ``batches`` under ``config`` (a ``BaseConfig``).

    Uses from ``config``: ``steps``, ``grad_accum_steps``, ``learning_rate``,
    ``weight_decay``, ``warmup_steps``, ``lr_schedule``, ``max_grad_norm``, ``eval_every``,
    ``save_every``, ``log_every``, ``resume``, ``max_bad_steps``, ``seed``.

    Each logged record (one JSON line of ``run_dir/metrics.jsonl``) holds ``step``,
    ``loss``, ``lr``, ``grad_norm`` (before clipping), ``units`` (of the step), the
    algorithm's metrics and ``step_time_s`` (wall clock, the one field a resumed run
    does not reproduce). Records are written every ``log_every`` steps, at the last
    step, at every evaluation and at every skipped step; a skipped step's record holds
    ``skipped`` (the reason) and null ``loss`` and ``grad_norm``. ``evaluate(model)``
    runs every ``eval_every`` steps before the last (the algorithm evaluates before and
    after training on its own) and its results are logged with an ``eval/`` prefix.
    Returns a ``LoopResult``.

    Raises:
        TrainingDiverged: ``max_bad_steps`` steps in a row with a non-finite loss or
            gradient norm; the model is left as after the last good step and the last
            checkpoint on disk is untouched.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = run_dir / METRICS_FILE
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: learning_rate_factor(
            step, total_steps=config.steps, warmup_steps=config.warmup_steps, schedule=config.lr_schedule
        ),
    )

    step, position, checkpoint = 0, 0, None
    if config.resume:
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is None:
            print(f"fastpo: resume=true but {run_dir} holds no checkpoint; starting from step 0", file=sys.stderr)
        else:
            state = _load_checkpoint(checkpoint, model, optimizer, scheduler)
            step, position = state["step"], state["data_position"]
            _set_rng_states(state["rng"])
            if state.get("stream") is not None:
                batches.load_state_dict(state["stream"])
            print(f"fastpo: resumed from {checkpoint} (step {step})", file=sys.stderr)
    last_record = {}
    if step == 0:
        metrics_path.write_text("")  # a fresh run does not append to an older run's log
    else:
        _truncate_metrics(metrics_path, step)
        logged = metrics_path.read_text().splitlines()
        last_record = json.loads(logged[-1]) if logged else {}

    model.train()
    stream = batches(position)
    progress = _Progress(config.steps, step, config.log_every)
    bad_in_row, skipped, interrupted = 0, 0, False
    try:
        with _StopRequest() as stop, metrics_path.open("a") as log:
            while step < config.steps:
                started = time.perf_counter()
                group = [next(stream) for _ in range(config.grad_accum_steps)]
                position += len(group)
                optimizer.zero_grad(set_to_none=True)
                loss_sum, metric_means, total_units = accumulate_gradients(model, loss_fn, group)
                max_norm = config.max_grad_norm if config.max_grad_norm is not None else math.inf
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
                lr = scheduler.get_last_lr()[0]
                step += 1
                record = {"step": step, "lr": lr}
                if math.isfinite(loss_sum) and math.isfinite(grad_norm):
                    optimizer.step()
                    bad_in_row = 0
                    record.update(loss=loss_sum / total_units, grad_norm=grad_norm, units=total_units)
                    record.update(metric_means)
                else:
                    # The step's gradient is thrown away; the schedule still advances so
                    # that the learning rate stays a function of the step number.
                    optimizer.zero_grad(set_to_none=True)
                    bad_in_row += 1
                    skipped += 1
                    what = "loss" if not math.isfinite(loss_sum) else "gradient norm"
                    # null rather than NaN: metrics.jsonl stays standard JSON.
                    record.update(skipped=f"non-finite {what}", loss=None, grad_norm=None)
                    print(f"fastpo: step {step}: non-finite {what}; step skipped", file=sys.stderr)
                scheduler.step()
                record["step_time_s"] = time.perf_counter() - started
                if bad_in_row >= config.max_bad_steps:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    kept = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written"
                    raise TrainingDiverged(
                        f"{bad_in_row} steps in a row (up to step {step}) had a non-finite loss or gradient; "
                        f"stopping ({kept}). Lower learning_rate or check the data."
                    )
                evaluating = evaluate is not None and config.eval_every and step % config.eval_every == 0
                if evaluating and step < config.steps:
                    record.update({f"eval/{k}": v for k, v in evaluate(model).items()})
                    model.train()
                if step % config.log_every == 0 or step == config.steps or evaluating or "skipped" in record:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                last_record = record
                progress.update(step, record)
                saving = (config.save_every and step % config.save_every == 0) or step == config.steps
                if stop.signal is not None or saving:
                    if bad_in_row == 0:  # never replace a good checkpoint by a skipped step's state
                        checkpoint = _save_checkpoint(
                            run_dir, step, model, tokenizer, optimizer, scheduler, position, batches
                        )
                    if stop.signal is not None:
                        interrupted = True
                        print(f"fastpo: stopped at step {step}; checkpoint {checkpoint}", file=sys.stderr)
                        break
    finally:
        progress.close()
    return LoopResult(step, interrupted, last_record, checkpoint, skipped)
