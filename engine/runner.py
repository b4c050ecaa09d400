"""``train``: the Python entry point of every algorithm.

Every algorithm of ``config.ALGORITHMS`` trains, each one module of ``engine/algorithms``:
the offline ``sft``, ``reward``, ``dpo``, ``ipo``, ``kto`` and the online ``grpo``,
``ppo``, ``trpo``, ``rlaif``.

The final metrics (returned, and printed as one JSON line on stdout):

=============================  =========================================================
key                            meaning
=============================  =========================================================
algorithm                      the algorithm's name
status                         ``completed``, or ``interrupted`` (SIGINT/SIGTERM: a
                               checkpoint was written; ``resume=true`` continues)
steps                          optimizer steps done, skipped ones included
skipped_steps                  steps skipped in this session for a non-finite loss
loss                           training loss of the last step (per unit: completion
                               token for sft, pair for dpo and ipo, example for kto,
                               pair or ranked row for reward; completion token or
                               completion for grpo (by its aggregation), completion
                               token for ppo)
heldout_accuracy_before/after  exact-match accuracy of greedy answers on the held-out
                               prompts (``_after`` absent when interrupted); not for
                               reward (a reward model does not generate); for the
                               online algorithms on a data file with eval_data:
                               ``heldout_reward_before/after`` instead, the mean
                               reward of the greedy completions
preference_accuracy_before/    share of held-out pairs ranked chosen first (ties count
after                          1/2): by the implicit reward ``beta*(lp - lp_ref)`` for
                               dpo, ipo and kto, by the score for reward
train_time_s                   wall clock of the whole call
run_dir, metrics_file,         the run folder, its ``metrics.jsonl`` and the last
checkpoint                     checkpoint written (paths as strings)
=============================  =========================================================
"""

from __future__ import annotations

import dataclasses
import json
import time

from .config import BaseConfig, ConfigError, config_class, from_dict
from .distributed import launched_world
from .loop import METRICS_FILE

__all__ = ["IMPLEMENTED", "train"]

IMPLEMENTED = ("sft", "reward", "dpo", "ipo", "kto", "grpo", "ppo", "trpo", "rlaif")


def _algorithm_module(algorithm: str):
    from .algorithms import dpo, grpo, ipo, kto, ppo, reward, rlaif, sft, trpo

    return {
        "sft": sft, "reward": reward, "dpo": dpo, "ipo": ipo, "kto": kto, "grpo": grpo, "ppo": ppo, "trpo": trpo,
        "rlaif": rlaif,
    }[algorithm]


def train(algorithm: str, config: BaseConfig | dict | None = None) -> dict:
    """Run ``algorithm`` with ``config`` (its config dataclass, a dict of options, or None
    for the defaults); print and return its final metrics and paths (keys above).

    Raises:
        ConfigError: unknown algorithm, or a bad option (see ``config.py``).
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
    outcome = _algorithm_module(algorithm).run(config)
    result = outcome["result"]
    summary = {
        "algorithm": algorithm,
        "status": "interrupted" if result.interrupted else "completed",
        "steps": result.step,
        "skipped_steps": result.skipped_steps,
        "loss": result.last_metrics.get("loss"),
        **outcome["metrics"],
        "train_time_s": round(time.perf_counter() - started, 3),
        "run_dir": str(outcome["run_dir"]),
        "metrics_file": str(outcome["run_dir"] / METRICS_FILE),
        "checkpoint": None if result.checkpoint is None else str(result.checkpoint),
    }
    if launched_world()[0] == 0:  # under torchrun every rank returns it; rank 0 prints it
        print(json.dumps(summary), flush=True)
    return summary
