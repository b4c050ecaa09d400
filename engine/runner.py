"""``train``: the Python entry point of every algorithm.

Every algorithm of ``config.ALGORITHMS`` (the one table of algorithms) trains, each the
module of ``engine/algorithms`` of its name: ``sft``, ``reward``, ``dpo``, ``ipo``,
``kto`` on a dataset and the online ``grpo``, ``ppo``, ``trpo``, ``rlaif``.

A run goes through its stages in order, each failing before the next costs anything:
the config (built and validated: ranges and rules between options), the inputs
(``engine/inputs.py``: model, data files' first rows, reward sources, folders), the
warm start (``engine/warm_start.py``: made once and cached, or reused), then the
algorithm's ``run(config, warm_start=)``.

The final metrics (returned, and printed as one JSON line on stdout):

=============================  =========================================================
key                            meaning
=============================  =========================================================
algorithm                      the algorithm's name
status                         ``completed``; ``interrupted`` (SIGINT/SIGTERM: a
                               checkpoint was written; ``resume=true`` continues);
                               or ``already_completed`` (``resume=true`` found a
                               checkpoint at ``steps`` or beyond: nothing trained)
steps                          optimizer steps done, skipped ones included
resumed_from_step              the checkpoint's step when the run resumed one
skipped_steps                  steps skipped in this session for a non-finite loss
loss                           training loss of the last step (per unit: completion
                               token for sft, pair for dpo and ipo, example for kto,
                               pair or ranked row for reward; completion token or
                               completion for grpo (by its aggregation), completion
                               token for ppo; none for trpo, which minimizes no loss:
                               its ``surrogate`` is in metrics.jsonl)
heldout_accuracy_before/after  exact-match accuracy of greedy answers on the held-out
                               prompts (``_after`` absent when interrupted), before
                               and after this session: ``_before`` is the resumed
                               checkpoint's when the run resumed; not for
                               reward (a reward model does not generate); for the
                               online algorithms on a data file with eval_data:
                               ``heldout_reward_before/after`` instead, the mean
                               reward of the greedy completions
preference_accuracy_before/    share of held-out pairs ranked chosen first (ties count
after                          1/2): by the implicit reward ``beta*(lp - lp_ref)`` for
                               dpo, ipo and kto, by the score for reward
value_accuracy_before/after    reward with target=states: share of held-out states on
                               their label's side of sigmoid(score) = 1/2
generated_tokens               grpo, ppo, trpo, rlaif: tokens the policy decoded over
                               the whole run (every session and rank; a tree leaf's
                               beyond its shared prefix; rlaif's labelled samples and
                               its ppo stage's rollouts, ``labelling_generated_tokens``
                               the former), the budget that compares rollouts; None
                               when resumed from a checkpoint written before the count
warm_start                     the warm start the run started from, or none: its cache
                               ``folder``, ``reused``, its SFT ``steps``, its
                               ``check_accuracy`` (exact match on the training prompts
                               of its stopping check) and ``heldout_accuracy`` (the
                               same evaluation as ``heldout_accuracy_before``)
train_time_s                   wall clock of the whole call
run_dir, metrics_file,         the run folder, its ``metrics.jsonl`` and the last
checkpoint                     checkpoint written (paths as strings)
=============================  =========================================================
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import time

from . import warm_start
from .config import ConfigError, RunConfig, config_class, from_dict
from .distributed import launched_world
from .inputs import check_inputs
from .loop import METRICS_FILE
from .progress import hugging_face_bars_off
from .threads import run_threads

__all__ = ["train"]


def train(algorithm: str, config: RunConfig | dict | None = None) -> dict:
    """Run ``algorithm`` with ``config`` (its config dataclass, a dict of options, or None
    for the defaults); print and return its final metrics and paths (keys above).

    Raises:
        ConfigError: unknown algorithm, a bad option (see ``config.py``), or an option
            naming a missing model, folder or reward source (``inputs.py``).
        fastpo.engine.data.DataError: a data file that is missing or malformed.
        NotImplementedError: an option this model or setup does not support.
        fastpo.engine.loop.TrainingDiverged: too many non-finite steps in a row.
    """
    started = time.perf_counter()
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
    check_inputs(algorithm, config)
    with run_threads(config.threads, shown=launched_world()[0] == 0), hugging_face_bars_off():
        warm = warm_start.prepare(algorithm, config)
        outcome = importlib.import_module(f"{__package__}.algorithms.{algorithm}").run(config, warm_start=warm)
    result = outcome["result"]
    status = "interrupted" if result.interrupted else "already_completed" if result.already_done else "completed"
    summary = {
        "algorithm": algorithm,
        "status": status,
        "steps": result.step,
        **({"resumed_from_step": result.start_step} if result.start_step else {}),
        "skipped_steps": result.skipped_steps,
        "loss": result.last_metrics.get("loss"),
        **outcome["metrics"],
        "warm_start": None if warm is None else warm.summary(),
        "train_time_s": round(time.perf_counter() - started, 3),
        "run_dir": str(outcome["run_dir"]),
        "metrics_file": str(outcome["run_dir"] / METRICS_FILE),
        "checkpoint": None if result.checkpoint is None else str(result.checkpoint),
    }
    if launched_world()[0] == 0:  # under torchrun every rank returns it; rank 0 prints it
        print(json.dumps(summary), flush=True)
    return summary
