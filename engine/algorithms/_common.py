"""What every algorithm module needs around the loop: the run folder, the model on its
device, the training and held-out rows, the micro-batch stream and the held-out
exact-match accuracy.

The run's task (``builtin_task``) is the built-in task that ``data`` names
(``engine/tasks.py``), or the default one when ``data`` is a file: it gives the built-in
rows, the tokenizer's extra characters of a built-in model and, through its prompts,
the verifier of the exact-match evaluation."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..config import BUILTIN_DATA, ConfigError, task_settings
from ..data import load_dataset
from ..forward import greedy_completions
from ..distributed import launched_world, resolve_device
from ..loop import latest_checkpoint, load_model_weights, micro_batches_per_step, train_loop, write_run_config
from ..models import BUILTIN_MODELS, load_causal_lm
from ..plots import write_run_plot
from ..tasks import BUILTIN_TASKS, DEFAULT_TASK, Task, config_defaults, task_of_prompt
from ..tasks import builtin_task as make_task

__all__ = [
    "BUILTIN_DATA",
    "answer_rows",
    "builtin_task",
    "HELDOUT_SIZE",
    "MAX_BUILTIN_ROWS",
    "exact_match_accuracy",
    "heldout_rows",
    "micro_batches",
    "prepare_run",
    "run_folder",
    "train_and_evaluate",
    "training_rows",
    "warm_start_steps",
]

HELDOUT_SIZE = 200  # held-out problems evaluated before and after training
DEFAULT_WARM_START_STEPS = 1500  # the cap; the accuracy target usually ends it at 300-800
MAX_BUILTIN_ROWS = 20_000  # built-in training rows at most; the stream cycles over them
_DTYPES = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def run_folder(algorithm: str, config) -> Path:
    """The run folder: ``output_dir`` with ``{algorithm}`` replaced."""
    return Path(config.output_dir.replace("{algorithm}", algorithm))


def prepare_run(algorithm: str, config, load_model: Callable = load_causal_lm, warm_start=None):
    """``(run_dir, model, tokenizer, device)``: the run folder (with ``config.yaml``) and
    the initial model on its device, with the weights of ``warm_start`` (a
    ``fastpo.engine.warm_start.WarmStart``, made by ``train`` before the run starts) when
    given (the checkpoint of a resumed run is loaded later, by the loop).
    ``load_model(name, seed=, dtype=) -> (model, tokenizer)`` builds the model (a causal
    LM unless the algorithm trains something else, as reward does); a built-in model
    also gets ``characters=`` when the task writes characters beyond the built-in
    tokenizer's (countdown's ``*/``)."""
    if warm_start is None and warm_start_steps(algorithm, config):
        raise ValueError(
            f"{algorithm}: the config asks for a warm start (warm_start_steps); run it through "
            f"fastpo.engine.train, which makes it first, or pass warm_start=fastpo.engine.warm_start.prepare(...)"
        )
    run_dir = run_folder(algorithm, config)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)  # under torchrun: this rank's device, process group started
    write_run_config(config, run_dir, device)  # checks a resumed run's config against the old one first
    characters = builtin_task(config).characters if config.model in BUILTIN_MODELS else ""
    options = {"characters": characters} if characters else {}
    model, tokenizer = load_model(config.model, seed=config.seed, dtype=_DTYPES[config.dtype], **options)
    model = model.to(device)
    if warm_start is not None:
        _load_shared_weights(model, warm_start.model_dir)
    return run_dir, model, tokenizer, device


def warm_start_steps(algorithm: str, config) -> int:
    """The most SFT steps of the warm start that precedes ``algorithm``'s run
    (``fastpo.engine.warm_start``): ``config.warm_start_steps``, or when it is none
    ``DEFAULT_WARM_START_STEPS`` for the built-in model on a built-in task (a random
    model has nothing for preference or RL training to sharpen) and 0 otherwise. Always
    0 for sft itself."""
    if algorithm == "sft":
        return 0
    if config.warm_start_steps is not None:
        return config.warm_start_steps
    builtin = config.model in BUILTIN_MODELS and config.data in BUILTIN_TASKS
    return DEFAULT_WARM_START_STEPS if builtin else 0


def _load_shared_weights(model, model_dir: Path) -> None:
    """Load the tensors of ``model_dir``'s safetensors that ``model`` also has (a reward
    model takes the warm start's backbone and keeps its own score head); an error when
    they share none."""
    from safetensors.torch import load_file

    own = model.state_dict()
    loaded = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        loaded.update({k: v for k, v in load_file(file).items() if k in own and own[k].shape == v.shape})
    if not loaded:
        raise ValueError(f"the warm start {model_dir} shares no weights with {type(model).__name__}")
    model.load_state_dict(loaded, strict=False)


def builtin_task(config, name: str | None = None) -> Task:
    """The run's task: the built-in task ``name`` (by default the one ``config.data``
    names, else the default one) with the run's seed and the settings of its option
    section (``countdown.count``, ...)."""
    name = name or (config.data if config.data in BUILTIN_TASKS else DEFAULT_TASK)
    return make_task(name, seed=config.seed, **task_settings(config, name))


def run_tasks(config) -> dict[str, Task]:
    """Every built-in task by name, as the run sets it: its exact-match evaluation's
    checkers and its built-in reward sources."""
    return {name: builtin_task(config, name) for name in BUILTIN_TASKS}


def training_rows(algorithm: str, config, schema: str) -> list[dict]:
    """The training rows: ``config.data`` (a file, whose schema must be ``schema``) or the
    built-in task's train split, one row per example the run consumes (at most
    ``MAX_BUILTIN_ROWS``)."""
    if config.data in BUILTIN_TASKS:
        # Online runs draw prompts_per_rollout prompts per rollout, at most one rollout a step.
        if hasattr(config, "prompts_per_rollout"):
            per_step = config.prompts_per_rollout
        else:
            per_step = micro_batches_per_step(config) * config.batch_size
        needed = config.steps * per_step
        return builtin_task(config).rows(schema, min(needed, MAX_BUILTIN_ROWS), "train")
    found, rows = load_dataset(config.data, algorithm)
    if found != schema:
        raise NotImplementedError(f"{algorithm}: rows of schema {found!r} ({config.data}) are not supported yet")
    return rows


def heldout_rows(algorithm: str, config, schema: str) -> list[dict]:
    """The evaluation rows: ``config.eval_data`` or ``HELDOUT_SIZE`` held-out problems of
    the run's task. An sft run's are the task's prompt rows (each with a correct answer),
    not its demonstrations, which may mix kinds of rows (countdown's value judgements):
    every algorithm's exact match is then on the same problems."""
    if config.eval_data is None:
        return builtin_task(config).rows("prompt" if schema == "completion" else schema, HELDOUT_SIZE, "heldout")
    found, rows = load_dataset(config.eval_data, algorithm)
    if found != schema:
        raise NotImplementedError(f"{algorithm}: eval rows of schema {found!r} ({config.eval_data}) are not supported yet")
    return rows


def micro_batches(
    rows: list, batch_size: int, seed: int, collate: Callable[[list], dict]
) -> Callable[[int], Iterator[dict]]:
    """The loop's ``batches(position)``: micro-batches of ``batch_size`` rows, reshuffled
    every epoch by a generator seeded with ``seed`` and the epoch (never global RNG),
    the last incomplete batch of an epoch dropped. ``collate(rows)`` builds each batch."""
    if len(rows) < batch_size:
        raise ConfigError(f"option 'batch_size': got {batch_size}, more than the {len(rows)} training rows")
    per_epoch = len(rows) // batch_size

    def stream(position: int) -> Iterator[dict]:
        order_epoch, order = None, []
        while True:
            epoch, index = divmod(position, per_epoch)
            if epoch != order_epoch:  # once an epoch: a shuffle of 20,000 rows costs ~5 ms
                order_epoch, order = epoch, list(range(len(rows)))
                random.Random(f"batches/{seed}/{epoch}").shuffle(order)
            chosen = order[index * batch_size : (index + 1) * batch_size]
            yield collate([rows[i] for i in chosen])
            position += 1

    return stream


def answer_rows(config, eval_rows: list[dict], answer_field: str) -> list[dict]:
    """The ``{"prompt", "completion"}`` rows of the exact-match evaluation: the task's
    held-out prompt rows when ``eval_data`` is none (the same prompts for every
    algorithm, so ``heldout_accuracy`` compares across an sft run and a dpo run on its
    checkpoint), else each eval row's prompt with its ``answer_field`` as the answer."""
    if config.eval_data is None:
        return builtin_task(config).rows("prompt", HELDOUT_SIZE, "heldout")
    return [{"prompt": row["prompt"], "completion": row[answer_field]} for row in eval_rows]


def exact_match_accuracy(
    model, tokenizer, rows: list[dict], stop_strings: list[str] = (), tasks: dict[str, Task] | None = None
) -> float:
    """Share of ``{"prompt", "completion"}`` rows whose greedy completion of the prompt is
    right: checked by the verifier of the task among ``tasks`` (a run's: ``run_tasks``;
    by default the built-in tasks' default settings) whose prompt it is
    (``tasks.task_of_prompt``: an addition's sum, a countdown chain's every step and
    answer), else equal (stripped, up to the first newline) to the row's completion. The
    completions get the reference's length plus one token, or the task's completion
    budget when that is larger (a countdown chain other than the reference may be longer),
    and are cut at the first of ``stop_strings``, as an online run's samples are."""
    checkers = [task_of_prompt(row["prompt"], tasks) for row in rows]
    longest = max(len(tokenizer.encode(row["completion"], add_special_tokens=False)) for row in rows)
    budgets = {config_defaults(name, None).get("max_new_tokens", 0) for name, cls in BUILTIN_TASKS.items()
               if any(isinstance(task, cls) for task in checkers)}
    budget = max([longest + 1, *budgets])
    completions = greedy_completions(model, tokenizer, [row["prompt"] for row in rows], max_new_tokens=budget,
                                     stop_strings=stop_strings)
    correct = 0.0
    for row, task, completion in zip(rows, checkers, completions):
        if task is not None:
            correct += task.verify(row["prompt"], completion)
        else:
            correct += completion.split("\n", 1)[0].strip() == row["completion"].strip()
    return correct / len(rows)


def train_and_evaluate(
    model, tokenizer, config, loss_fn: Callable | None, batches, run_dir, evaluate: Callable,
    done: Callable | None = None, update: Callable | None = None,
) -> dict:
    """Evaluate the model this session starts from (a resumed run's checkpoint, loaded
    for it), train with the shared loop (which also evaluates periodically), and
    evaluate again unless the run was interrupted or had nothing left to train (a run
    that ``done`` ended early keeps the loop's evaluation of its last step: the same
    weights, evaluated greedily, give the same numbers): the
    algorithm module's ``run`` result (``metrics`` with ``<name>_before`` /
    ``<name>_after`` for each of ``evaluate``'s metrics, ``result``, ``run_dir``).
    ``update``: the loop's optimizer step, when not AdamW's."""
    checkpoint = latest_checkpoint(run_dir) if config.resume else None
    if checkpoint is not None:
        load_model_weights(model, checkpoint / "model")  # the loop loads it again, with its trainer state
    before = evaluate(model)
    options = {} if update is None else {"update": update}
    result = train_loop(model=model, tokenizer=tokenizer, config=config, loss_fn=loss_fn,
                        batches=batches, run_dir=run_dir, evaluate=evaluate, done=done, **options)
    metrics = {f"{name}_before": value for name, value in before.items()}
    if not result.interrupted:
        if result.already_done:
            after = before
        elif result.target_reached:  # the loop has just evaluated these weights
            after = {name: result.last_metrics[f"eval/{name}"] for name in before}
        else:
            after = evaluate(model)
        metrics.update({f"{name}_after": value for name, value in after.items()})
        if launched_world()[0] == 0:  # metrics.png: rank 0, with the evaluations before and after
            write_run_plot(run_dir, config, before=before, after=after, start_step=result.start_step)
    return {"metrics": metrics, "result": result, "run_dir": run_dir}
