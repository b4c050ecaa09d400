"""metrics.png (engine/plots.py): per algorithm the series its users watch, the held-out
curve from the evaluation before training to the final one, a title naming the run, no
empty panels; and the same from real runs' metrics.jsonl."""

import json
import random

import pytest

from fastpo.engine import train
from fastpo.engine.plots import PANELS, metrics_figure
from fastpo.engine.task import AdditionTask

# What each algorithm's metrics.jsonl holds beside step, lr, grad_norm, units and
# step_time_s (names as logged by engine/algorithms/*.py; grpo with beta > 0 and an
# entropy bonus, so that its KL and entropy are logged; the real runs below check these).
LOGGED = {
    "sft": ["loss"],
    "reward": ["loss", "reward_accuracy", "reward_margin"],
    "dpo": ["loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "chosen_logprob",
            "rejected_logprob"],
    "kto": ["loss", "signed_reward", "z0"],
    "grpo": ["loss", "reward", "completion_length", "truncated", "clip_frac_low", "clip_frac_high", "ratio_mean",
             "ratio_max", "approx_kl", "ref_kl", "entropy_mean", "logprob_mismatch"],
    "ppo": ["loss", "reward", "completion_length", "truncated", "kl", "kl_coef", "clip_frac_low", "clip_frac_high",
            "ratio_mean", "ratio_max", "approx_kl", "entropy_mean", "policy_loss", "value_loss", "value_clip_frac"],
    "trpo": ["loss", "reward", "completion_length", "truncated", "kl", "surrogate_improvement", "accepted",
             "backtracks"],
}
LOGGED["ipo"] = LOGGED["dpo"]
EVALUATED = {  # what each algorithm's evaluate() returns (logged with the eval/ prefix)
    "sft": ["heldout_accuracy"], "reward": ["preference_accuracy"],
    "dpo": ["preference_accuracy", "heldout_accuracy"], "ipo": ["preference_accuracy", "heldout_accuracy"],
    "kto": ["preference_accuracy", "heldout_accuracy"],
    "grpo": ["heldout_accuracy"], "ppo": ["heldout_accuracy"], "trpo": ["heldout_accuracy"],
}
# The series its users watch, by panel title.
WATCHED = {
    "sft": {"loss (NLL per completion token)": ["loss"],
            "held-out accuracy (greedy exact match)": ["eval/heldout_accuracy"]},
    "reward": {"loss": ["loss"], "preference accuracy": ["reward_accuracy", "eval/preference_accuracy"],
               "reward margin (chosen - rejected)": ["reward_margin"]},
    "dpo": {"preference accuracy": ["reward_accuracy", "eval/preference_accuracy"],
            "reward margin (chosen - rejected)": ["reward_margin"],
            "sequence log-probs": ["chosen_logprob", "rejected_logprob"],
            "implicit rewards beta*(lp - lp_ref)": ["chosen_reward", "rejected_reward"],
            "loss": ["loss"], "held-out accuracy (greedy exact match)": ["eval/heldout_accuracy"]},
    "kto": {"preference accuracy": ["eval/preference_accuracy"],
            "reward of desirable minus undesirable": ["signed_reward"], "KL estimate z0": ["z0"],
            "loss": ["loss"], "held-out accuracy (greedy exact match)": ["eval/heldout_accuracy"]},
    "grpo": {"reward (rollout mean)": ["reward"], "held-out accuracy (greedy exact match)": ["eval/heldout_accuracy"],
             "KL to the reference": ["ref_kl"], "clip fraction": ["clip_frac_low", "clip_frac_high"],
             "KL(old || new): the policy's change per step": ["approx_kl"],
             "entropy (token mean)": ["entropy_mean"], "completion length (tokens)": ["completion_length"]},
    "ppo": {"reward (rollout mean)": ["reward"], "held-out accuracy (greedy exact match)": ["eval/heldout_accuracy"],
            "KL to the reference (per completion)": ["kl"],
            "clip fraction": ["clip_frac_low", "clip_frac_high", "value_clip_frac"], "value loss": ["value_loss"],
            "KL(old || new): the policy's change per step": ["approx_kl"],
            "entropy (token mean)": ["entropy_mean"], "completion length (tokens)": ["completion_length"]},
    "trpo": {"reward (rollout mean)": ["reward"], "held-out accuracy (greedy exact match)": ["eval/heldout_accuracy"],
             "KL(old || new): the policy's change per step": ["kl"],
             "surrogate improvement": ["surrogate_improvement"], "line search": ["accepted", "backtracks"],
             "completion length (tokens)": ["completion_length"]},
}
WATCHED["ipo"] = WATCHED["dpo"]


def _records(algorithm: str, steps: int = 10, eval_every: int = 5) -> list[dict]:
    rng = random.Random(algorithm)
    records = []
    for step in range(1, steps + 1):
        record = {"step": step, "lr": 1e-3, "grad_norm": rng.random(), "units": 64, "step_time_s": 0.1}
        record.update({name: rng.random() for name in LOGGED[algorithm]})
        if step % eval_every == 0 and step < steps:
            record.update({f"eval/{name}": rng.random() for name in EVALUATED[algorithm]})
        records.append(record)
    return records


def _panels(figure) -> dict[str, dict[str, tuple[list, list]]]:
    """``{panel title: {series label: (steps, values)}}`` of a figure's subplots."""
    return {
        axes.get_title(): {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in axes.lines}
        for axes in figure.axes
    }


def test_every_algorithm_has_its_panels():
    assert set(PANELS) == set(WATCHED)


@pytest.mark.parametrize("algorithm", sorted(WATCHED))
def test_each_algorithm_plots_what_its_users_watch(algorithm):
    records = _records(algorithm)
    before = {name: 0.25 for name in EVALUATED[algorithm]}
    after = {name: 0.75 for name in EVALUATED[algorithm]}
    figure = metrics_figure(records, algorithm=algorithm, run_dir="runs/x", before=before, after=after)
    panels = _panels(figure)
    assert {title: list(series) for title, series in panels.items()} == WATCHED[algorithm]
    for title, series in panels.items():  # no empty panel, no empty line
        assert series and all(steps for steps, _ in series.values()), title
    # Each held-out curve runs from the evaluation before training (step 0) to the final one.
    for name in EVALUATED[algorithm]:
        (steps, values), = [series[f"eval/{name}"] for series in panels.values() if f"eval/{name}" in series]
        periodic = [r[f"eval/{name}"] for r in records if f"eval/{name}" in r]
        assert steps == [0, 5, 10] and values == [0.25, *periodic, 0.75], name
    title = figure.get_suptitle()
    assert title.startswith(f"{algorithm} | runs/x | 10 steps | ")
    assert f"{EVALUATED[algorithm][0]} 0.25 -> 0.75" in title


def test_a_resumed_runs_evaluation_before_is_drawn_at_its_checkpoint():
    records = _records("sft", steps=8, eval_every=100)
    panels = _panels(metrics_figure(records, algorithm="sft", before={"heldout_accuracy": 0.4},
                                    after={"heldout_accuracy": 0.5}, start_step=4))
    assert panels["held-out accuracy (greedy exact match)"]["eval/heldout_accuracy"] == ([4, 8], [0.4, 0.5])


def test_a_held_out_metric_without_a_panel_gets_its_own():
    records = [{"step": 1, "loss": 1.0, "reward": 0.5, "eval/heldout_reward": 0.2, "eval/judge_agreement": 0.9}]
    panels = _panels(metrics_figure(records, algorithm="grpo"))
    assert list(panels) == ["reward (rollout mean)", "held-out reward (greedy)", "eval/judge_agreement"]


def _pairs_file(path, n=16):
    rows = AdditionTask(seed=5).preference_pairs(n)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


REAL_RUNS = {
    # the cheapest real run of each family whose names the table above assumes
    "ppo": {"steps": 2, "prompts_per_rollout": 4, "num_generations": 2, "batch_size": 4, "grad_accum_steps": 1,
            "max_new_tokens": 4, "entropy_coef": 0.01},
    "dpo": {"steps": 2, "batch_size": 4},
}


@pytest.mark.parametrize("algorithm", sorted(REAL_RUNS))
def test_a_real_runs_plot_has_the_watched_series(algorithm, tmp_path):
    options = {**REAL_RUNS[algorithm], "warm_start_steps": 0, "warmup_steps": 0, "eval_every": 1, "log_every": 1,
               "output_dir": str(tmp_path / algorithm)}
    if algorithm == "dpo":
        options.update(data=_pairs_file(tmp_path / "pairs.jsonl"), eval_data=_pairs_file(tmp_path / "eval.jsonl", 8))
    summary = train(algorithm, options)
    assert (tmp_path / algorithm / "metrics.png").is_file()
    records = [json.loads(line) for line in open(summary["metrics_file"])]
    names = EVALUATED[algorithm]
    before = {name: summary[f"{name}_before"] for name in names if f"{name}_before" in summary}
    after = {name: summary[f"{name}_after"] for name in names if f"{name}_after" in summary}
    panels = _panels(metrics_figure(records, algorithm=algorithm, before=before, after=after))
    assert {title: list(series) for title, series in panels.items()} == WATCHED[algorithm]
