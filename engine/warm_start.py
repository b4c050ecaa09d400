"""The warm start: a stage of its own, run before an algorithm, cached once for every run.

A random model has nothing for preference or RL training to sharpen, so on the built-in
model and a built-in task (``data=builtin:addition`` or ``builtin:countdown``) every
algorithm but sft starts from an SFT run on that task's demonstrations: batch size 64,
constant learning rate 2e-3, until greedy exact match on ``CHECK_PROMPTS`` *training*
prompts reaches ``warm_start_accuracy`` (checked every ``CHECK_EVERY`` steps), at most
``warm_start_steps`` steps (``_common.warm_start_steps``: by default 1500 on the built-in
model and a built-in task, else none). The check is the held-out evaluation's, on
training prompts: the task's verifier on greedy completions (a countdown chain: every
step and the answer). A target rather than a step count: how many steps SFT needs
varies several-fold with the seed, and what follows needs a policy that is right
sometimes, not always. Training prompts, so the held-out split stays unseen by every
decision of the run.

The cache. One warm start per (model and its definition, task, warm-start settings,
seed, device type):
``cache_root()/warm_start/<key>``, ``key`` a hash of those settings (``settings``), an
ordinary run folder of ``fastpo sft`` plus ``done.json``, written last, that marks it
finished and records its outcome. Every algorithm and every output folder finds it
there: ``fastpo dpo`` after ``fastpo grpo`` reuses the warm start that grpo made, and
says so. The run folder gets a link ``warm_start`` to the entry it used.

``done.json`` holds ``checkpoint`` (relative to the entry), ``steps`` (SFT steps run),
``check_accuracy`` (the stopping check: exact match on the training prompts) and
``heldout_accuracy``: the same evaluation as every run's ``heldout_accuracy_before``
(``_common.exact_match_accuracy``, greedy, on the task's 200 held-out
problems), so the two agree for the same weights. The check's number is lower or higher
than the held-out one only because its prompts differ (before this record existed the
warm start reported the check, 0.385, beside grpo's 0.41 held-out for the same
checkpoint).

``FASTPO_CACHE`` sets the cache root; else ``$XDG_CACHE_HOME/fastpo``, else
``~/.cache/fastpo``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .algorithms import sft
from .algorithms._common import (
    HELDOUT_SIZE,
    builtin_task,
    exact_match_accuracy,
    run_folder,
    run_tasks,
    warm_start_steps,
)
from .config import TASK_SECTIONS, ConfigError, SFTConfig, cache_settings
from .tasks import BUILTIN_TASKS, config_defaults
from .distributed import launched_world, resolve_device
from .models import BUILTIN_MODELS, load_causal_lm, tiny_config
from .tokenizer import build_char_tokenizer

__all__ = [
    "CHECK_EVERY", "CHECK_PROMPTS", "WarmStart", "cache_entry", "cache_root", "device_type", "exclusive", "link_run",
    "prepare", "settings",
]

CHECK_PROMPTS = 200
CHECK_EVERY = 50
DONE = "done.json"  # written when the warm start finished: the cache entry's marker
RUN_LINK = "warm_start"  # the run folder's link to the entry it used
_RECIPE = 1  # bump when the warm start's recipe changes: older entries are then not reused


@dataclass(frozen=True)
class WarmStart:
    """A finished warm start.

    Attributes:
        folder: its cache entry (an sft run folder).
        model_dir: the checkpoint's model folder, whose weights the run starts from.
        reused: True when an earlier run made it.
        steps: SFT steps it ran.
        check_accuracy: exact match on the ``CHECK_PROMPTS`` training prompts (its stopping check).
        heldout_accuracy: exact match on the held-out problems, as the runs evaluate.
    """

    folder: Path
    model_dir: Path
    reused: bool
    steps: int
    check_accuracy: float
    heldout_accuracy: float

    def summary(self) -> dict:
        """The run summary's ``warm_start`` entry."""
        return {
            "folder": str(self.folder), "reused": self.reused, "steps": self.steps,
            "check_accuracy": self.check_accuracy, "heldout_accuracy": self.heldout_accuracy,
            "evaluation": f"greedy exact match: check on {CHECK_PROMPTS} training prompts, heldout as "
                          "heldout_accuracy_before (the built-in task's held-out problems)",
        }


def cache_root() -> Path:
    """``$FASTPO_CACHE``, else ``$XDG_CACHE_HOME/fastpo``, else ``~/.cache/fastpo`` (absolute)."""
    if os.environ.get("FASTPO_CACHE"):
        return Path(os.environ["FASTPO_CACHE"]).expanduser().resolve()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return (base / "fastpo").resolve()


def device_type(name: str) -> str:
    """The device type (``cpu``, ``cuda``, ...) a ``device`` option resolves to: part of
    a cache key, since weights trained on another device type differ."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name).type


def _model_identity(name: str, characters: str) -> dict:
    """The model's part of the key: a built-in model's name with its definition (its
    config and vocabulary, the task's ``characters`` included: a version of fastpo that
    changes them builds another model),
    or a folder's absolute path with the size and modification time of its files (a
    checkpoint retrained in place is another model)."""
    if name in BUILTIN_MODELS:
        tokenizer = build_char_tokenizer(characters)
        definition = tiny_config(tokenizer).to_dict()
        definition.pop("transformers_version", None)
        return {"model": name, "definition": definition, "vocabulary": tokenizer.get_vocab()}
    folder = Path(name).resolve()
    files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    return {"model": str(folder), "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def _sft_config(config, steps: int, folder: Path) -> SFTConfig:
    return SFTConfig(
        model=config.model, data=config.data, seed=config.seed, device=config.device, dtype=config.dtype,
        max_length=config.max_length, steps=steps, batch_size=64, learning_rate=2e-3, warmup_steps=20,
        lr_schedule="constant", eval_every=CHECK_EVERY, eval_data=str(folder / "check_prompts.jsonl"),
        target_accuracy=config.warm_start_accuracy, output_dir=str(folder),
        packing=config_defaults(config.data, "sft").get("packing", False),
        **{section: _problem_settings(getattr(config, section)) for section in TASK_SECTIONS.values()},
    )


def _problem_settings(section):
    """A task section with its reward options at their defaults: a warm start trains on
    the problems alone, so a run that changes only the reward shares it."""
    defaults = type(section)()
    reward_options = getattr(section, "REWARD_OPTIONS", ())
    return dataclasses.replace(section, **{key: getattr(defaults, key) for key in reward_options})


def settings(config, steps: int) -> dict:
    """What the warm start depends on (the cache key hashes it): the SFT run's options
    but its folders, the device type and the model's identity."""
    options = cache_settings(_sft_config(config, steps, Path(".")))
    for name in ("output_dir", "eval_data", "device"):
        options.pop(name)
    # options hold data, the task (builtin:addition's entries keep the key they always had)
    values = {"recipe": _RECIPE, "device_type": device_type(config.device),
              **options, **_model_identity(config.model, builtin_task(config).characters)}
    return json.loads(json.dumps(values))  # as done.json stores them (tuples as lists, keys as strings)


def cache_entry(kind: str, values: dict) -> Path:
    """The cache folder of a ``kind`` of entry (``warm_start``, ``judge``) made with
    ``values``: ``cache_root()/kind/<key>``, ``key`` a hash of the values."""
    return cache_root() / kind / hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


@contextlib.contextmanager
def exclusive(folder: Path):
    """Hold a lock on the cache entry ``folder`` (another process making the same entry
    waits for it); under torchrun none: every rank takes part in the one SFT run."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        fcntl = None
    if fcntl is None or launched_world()[1] > 1:
        yield
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _finished(folder: Path, values: dict) -> dict | None:
    """The entry's record when it is a finished warm start of ``values``."""
    try:
        record = json.loads((folder / DONE).read_text())
    except (OSError, ValueError):
        return None
    if record.get("settings") != values or not (folder / record["checkpoint"] / "model").is_dir():
        return None
    return record


def link_run(run_dir: Path, folder: Path, name: str = RUN_LINK) -> None:
    """Point ``run_dir/name`` at the cache entry ``folder`` (a folder of that name from
    an older fastpo, which kept the entry there, is left alone)."""
    link = run_dir / name
    if link.exists() and not link.is_symlink():
        return
    with contextlib.suppress(OSError):  # a file system without links: the summary still names the entry
        link.unlink(missing_ok=True)
        link.symlink_to(folder, target_is_directory=True)


def prepare(algorithm: str, config) -> WarmStart | None:
    """The warm start that ``algorithm``'s run with ``config`` starts from, made unless
    the cache holds it; None when the run has none (``warm_start_steps``).

    Raises:
        ConfigError: a warm start is asked for but ``data`` is not a built-in task.
    """
    steps = warm_start_steps(algorithm, config)
    if not steps:
        return None
    if config.data not in BUILTIN_TASKS:  # the config refuses an explicit one; this guards direct calls
        raise ConfigError(
            f"option 'warm_start_steps': got {steps}, but the warm start trains on a built-in task "
            f"({', '.join(BUILTIN_TASKS)}) and data is {config.data!r}; warm-start with `fastpo sft` on your data "
            "and pass model=PATH"
        )
    values = settings(config, steps)
    folder = cache_entry("warm_start", values)
    is_main = launched_world()[0] == 0
    with exclusive(folder):
        record = _finished(folder, values)
        reused = record is not None
        if reused:
            if is_main:
                print(f"fastpo: warm start: reusing {folder} ({record['steps']} SFT steps, made by an earlier run)",
                      file=sys.stderr)
        else:
            record = _make(config, steps, folder, values, is_main)
    run_dir = run_folder(algorithm, config)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        link_run(run_dir, folder)
    return WarmStart(folder, folder / record["checkpoint"] / "model", reused, record["steps"],
                     record["check_accuracy"], record["heldout_accuracy"])


def _make(config, steps: int, folder: Path, values: dict, is_main: bool) -> dict:
    """Train the warm start into ``folder`` and write its ``done.json``; its record."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / DONE).unlink(missing_ok=True)
    if is_main:  # an interrupted attempt's checkpoints: the new run starts from scratch
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    rows = builtin_task(config).rows("prompt", CHECK_PROMPTS, "train")
    (folder / "check_prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    if is_main:
        print(
            f"fastpo: warm start: SFT on the built-in task {config.data} until {config.warm_start_accuracy:.0%} "
            f"exact match on {CHECK_PROMPTS} training prompts (at most {steps} steps), cached in {folder}",
            file=sys.stderr,
        )
    outcome = sft.run(_sft_config(config, steps, folder))
    result = outcome["result"]
    if result.interrupted:
        raise KeyboardInterrupt("the warm start was interrupted; run again to redo it")
    model_dir = result.checkpoint / "model"
    model, tokenizer = load_causal_lm(str(model_dir))
    model = model.to(resolve_device(config.device))
    heldout = builtin_task(config).rows("prompt", HELDOUT_SIZE, "heldout")  # the runs' held-out rows
    record = {
        "checkpoint": str(result.checkpoint.relative_to(folder)),
        "steps": result.step,
        "check_accuracy": outcome["metrics"]["heldout_accuracy_after"],
        "heldout_accuracy": exact_match_accuracy(model, tokenizer, heldout, tasks=run_tasks(config)),
        "settings": values,
    }
    if is_main:
        (folder / DONE).write_text(json.dumps(record) + "\n")
    return record
