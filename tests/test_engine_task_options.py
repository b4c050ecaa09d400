"""The built-in tasks' option sections (``countdown.count=5``, ``addition.digits=3``): validated
with the config, applied to every place a run builds its task (rows, rewards, evaluation,
warm start), and kept out of the cache keys of runs on the default problems."""

import pytest

from fastpo.engine import warm_start
from fastpo.engine.algorithms._common import builtin_task, run_tasks
from fastpo.engine.config import ConfigError, CountdownOptions, from_dict, load_config, save_yaml
from fastpo.engine.countdown import CountdownTask
from fastpo.engine.inputs import check_inputs, reference_lengths, short_budget_warnings
from fastpo.engine.loop import check_resume_config
from fastpo.engine.reasoning import ReasonConfig
from fastpo.engine.rollout import reward_function
from fastpo.engine.task import AdditionTask
from fastpo.engine.tasks import task_of_prompt

COUNTDOWN = ["data=builtin:countdown"]


@pytest.mark.parametrize("overrides,message", [
    (COUNTDOWN + ["countdown.count=7"], "option 'countdown': count must be an integer in [2, 6], got 7"),
    (COUNTDOWN + ["countdown.max_target=20"], "option 'countdown': max_target must be an integer >= min_target=24, got 20"),
    (COUNTDOWN + ["countdown.progress_reward=0.95"], "option 'countdown': format_reward + progress_reward must stay"),
    (COUNTDOWN + ["countdown.count=0"], "option 'countdown.count': got 0; expected a value > 0"),
    (["countdown.count=5"], "option 'countdown.count': got 5, but the countdown options apply to builtin:countdown, "
                            "which this run does not use (data=builtin:addition)"),
    (["data=rows.jsonl", "warm_start_steps=0", "countdown.count=5"], "option 'countdown.count': got 5"),
    (COUNTDOWN + ["addition.digits=3"], "option 'addition.digits': got 3, but the addition options apply to"),
])
def test_a_bad_or_misplaced_task_option_fails_with_one_line(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config("grpo", None, overrides)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_a_file_run_may_set_the_task_its_rewards_name(tmp_path):
    config = load_config("grpo", None, ["data=rows.jsonl", "rewards=builtin:countdown", "countdown.progress_reward=0.3",
                                        "warm_start_steps=0"])
    assert config.countdown.progress_reward == 0.3
    # From Python a section may be its dataclass, and the YAML of the run reads back equal.
    same = from_dict(type(config), {"data": "rows.jsonl", "rewards": ["builtin:countdown"], "warm_start_steps": 0,
                                    "countdown": CountdownOptions(progress_reward=0.3)})
    assert same == config
    save_yaml(config, tmp_path / "run.yaml")
    assert load_config("grpo", tmp_path / "run.yaml") == config
    # A run on a file evaluates on the default task's held-out problems: its options apply.
    assert load_config("dpo", None, ["data=pairs.jsonl", "warm_start_steps=0", "addition.digits=3"]).addition.digits == 3


def test_the_run_builds_its_task_with_its_settings():
    config = load_config("sft", None, COUNTDOWN + ["countdown.count=3", "countdown.max_number=9", "seed=4"])
    rows = builtin_task(config).rows("prompt", 40, "train")
    numbers = [CountdownTask.parse_prompt(row["prompt"])[0] for row in rows]
    assert all(len(n) == 3 and max(n) <= 9 for n in numbers)
    assert rows == CountdownTask(count=3, max_number=9, seed=4).rows("prompt", 40, "train")
    addition = load_config("sft", None, ["addition.digits=3"])
    sums = [row["prompt"] for row in builtin_task(addition).rows("prompt", 200, "train")]
    assert sums == [row["prompt"] for row in AdditionTask(digits=3).rows("prompt", 200, "train")]
    assert any(len(prompt.split("+")[0]) == 3 for prompt in sums)


def test_rewards_and_evaluation_use_the_runs_task():
    config = load_config("grpo", None, COUNTDOWN + ["countdown.progress_reward=0.3", "countdown.use_all=false"])
    tasks = run_tasks(config)
    prompt = "2 3 4 6 to 24\n"
    # One valid step that keeps 24 reachable, then a wrong one: partial credit under the run's settings.
    wrong = "4 * 6 = 24 (left: 2 3 24)\n2 + 3 = 6 (left: 6 24)\nanswer: 4*6+2+3"
    shaped = reward_function(["builtin:countdown"], None, tasks)([prompt], [wrong], [{"prompt": prompt}])
    default = reward_function(["builtin:countdown"])([prompt], [wrong], [{"prompt": prompt}])
    expected = CountdownTask(progress_reward=0.3, use_all=False).reward([prompt], [wrong])
    assert shaped.tolist() == pytest.approx(expected) and shaped.item() > default.item()
    # Without use_all, 4 * 6 alone answers; the default rules need every number.
    short = "4 * 6 = 24 (left: 2 3 24)\nanswer: 4*6"
    checker = task_of_prompt(prompt, tasks)
    assert checker is tasks["builtin:countdown"]
    assert checker.verify(prompt, short) == 1.0 and task_of_prompt(prompt).verify(prompt, short) == 0.0


def test_warm_start_keys_change_with_the_problems_only():
    default = load_config("grpo", None, COUNTDOWN)
    key = warm_start.settings(default, 1500)
    assert "countdown" not in key and "addition" not in key  # the key it had before the sections existed
    reward_only = load_config("grpo", None, COUNTDOWN + ["countdown.progress_reward=0.3"])
    assert warm_start.settings(reward_only, 1500) == key  # the same SFT: the reward is not read
    harder = load_config("grpo", None, COUNTDOWN + ["countdown.count=5", "max_new_tokens=160"])
    assert warm_start.settings(harder, 1500)["countdown"]["count"] == 5


def test_a_resumed_run_compares_the_sections(tmp_path):
    config = load_config("grpo", None, COUNTDOWN)
    save_yaml(config, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    # A run folder from before the sections existed resumes under the defaults.
    (tmp_path / "config.yaml").write_text(text.split("addition:")[0])
    check_resume_config(config, tmp_path)
    harder = load_config("grpo", None, COUNTDOWN + ["countdown.count=3"])
    with pytest.raises(ConfigError, match="countdown.count"):
        check_resume_config(harder, tmp_path)


def test_budgets_shorter_than_the_solutions_are_warned_about():
    harder = CountdownTask(count=5)
    completion, row = reference_lengths(harder)
    assert completion > 128 > reference_lengths(CountdownTask())[0]  # count 5 outgrows countdown's default
    assert row > completion
    lines = short_budget_warnings(harder, {"max_new_tokens": (128, True), "max_length": (row, False)})
    assert lines == [f"fastpo: warning: max_new_tokens=128, but the solutions of this task take up to {completion} "
                     f"tokens, so longer ones are cut; max_new_tokens>={completion} fits them"]
    assert short_budget_warnings(harder, {"max_new_tokens": (completion, True)}) == []


def test_a_run_on_harder_problems_warns_before_its_model_loads(capsys):
    check_inputs("grpo", load_config("grpo", None, COUNTDOWN))
    assert capsys.readouterr().err == ""  # countdown's own budgets fit its default problems
    check_inputs("grpo", load_config("grpo", None, COUNTDOWN + ["countdown.count=5"]))
    completion, _ = reference_lengths(CountdownTask(count=5))
    assert capsys.readouterr().err.splitlines() == [
        f"fastpo: warning: max_new_tokens=128, but the solutions of this task take up to {completion} tokens, so "
        f"longer ones are cut; max_new_tokens>={completion} fits them"
    ]


def test_reason_takes_the_countdown_section():
    assert ReasonConfig(countdown=CountdownOptions(count=3)).countdown.count == 3
    with pytest.raises(ConfigError, match="option 'countdown': count must be"):
        ReasonConfig(countdown=CountdownOptions(count=1))
