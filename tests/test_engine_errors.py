"""What a user meets first when an input is wrong: every bad option, combination of
options, data file, model or reward source fails through the command line in one line
naming it, with exit status 2, before any model is loaded (a config error in under 2 s,
an input error in under 5 s); an error inside training keeps its traceback."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cli_checks import fails_in_one_line

from fastpo.engine import cli, train
from fastpo.engine.config import format_help
from fastpo.kernels import ADVANTAGE_ESTIMATORS, AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES, PREFERENCE_LOSSES

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("args, names", [
    # the option, the value, and what is allowed
    (["grpo", "loss_type=cispo", "dual_clip=3"], ["option 'dual_clip'", "3.0", "PPO-clip loss types only", "cispo"]),
    (["grpo", "dual_clip=0.5"], ["option 'dual_clip'", "0.5", "> 1"]),
    (["grpo", "entropy_quantile=1.5"], ["option 'entropy_quantile'", "1.5", "[0, 1]"]),
    (["grpo", "delta=0"], ["option 'delta'", "0.0", "> 0"]),
    (["grpo", "loss_type=ppo"], ["option 'loss_type'", "'ppo'", ", ".join(POLICY_LOSSES.names())]),
    (["grpo", "prompts_per_rollout=3"], ["option 'prompts_per_rollout'", "3 prompts", "multiple of"]),
    (["grpo", "reward_weights=1,2"], ["option 'reward_weights'", "2 weights for 1 reward sources"]),
    (["ppo", "kl_kind=k9"], ["option 'kl_kind'", "'k9'", ", ".join(KL_ESTIMATORS.names())]),
    (["ppo", "lam=1.5"], ["option 'lam'", "1.5", "[0, 1]"]),
    (["ppo", "ptx_coef=0.5"], ["option 'ptx_coef'", "0.5", "ptx_data"]),
    (["trpo", "learning_rate=0.1"], ["option 'learning_rate'", "0.1", "trpo makes no AdamW step"]),
    (["trpo", "grad_accum_steps=2"], ["option 'grad_accum_steps'", "2", "one update per rollout"]),
    (["trpo", "backtrack_factor=1"], ["option 'backtrack_factor'", "1.0", "(0, 1)"]),
    (["dpo", "loss_type=hinge", "label_smoothing=0.1"], ["option 'label_smoothing'", "0.1", "hinge"]),
    (["dpo", "loss_type=robust", "label_smoothing=0.5"], ["option 'label_smoothing'", "0.5", "< 0.5"]),
    (["kto", "batch_size=1"], ["option 'batch_size'", "1", "at least 2"]),
    (["sft", "target_accuracy=0.5", "eval_every=0"], ["option 'target_accuracy'", "0.5", "eval_every > 0"]),
    (["sft", "warm_start_steps=10"], ["option 'warm_start_steps'", "10", "sft is the warm start"]),
    (["dpo", "data=pairs.jsonl", "warm_start_steps=10"], ["option 'warm_start_steps'", "10", "builtin:addition"]),
    (["sft", "autocast=float16"], ["option 'autocast'", "'float16'", "bfloat16 or none"]),
    (["rlaif", "judge_template=Q: {prompt}"], ["option 'judge_template'", "{a}"]),
])
def test_a_bad_config_fails_in_one_line_before_any_work(args, names, tmp_path, capsys):
    line = fails_in_one_line(args, capsys, within_s=2.0, run_dir=tmp_path / "run")
    for name in names:
        assert name in line, (name, line)


def _write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def test_bad_inputs_fail_in_one_line_before_the_model_loads(tmp_path, capsys):
    good = {"prompt": "1+1=", "completion": "2"}
    files = {
        "missing": str(tmp_path / "missing.jsonl"),
        "empty": _write(tmp_path / "empty.jsonl", [""]),
        "broken": _write(tmp_path / "broken.jsonl", [good, '{"prompt": "1+2=", "completion"']),
        "field": _write(tmp_path / "field.jsonl", [good, good, {"prompt": "1+3="}]),
        "schema": _write(tmp_path / "schema.jsonl", [{"text": "no pairs here"}]),
        "type": _write(tmp_path / "type.jsonl", [{"prompt": "1+1=", "completion": 2}]),
    }
    cases = [
        (["sft", f"data={files['missing']}"], ["option 'data'", "missing.jsonl", "does not exist"]),
        (["sft", f"data={files['empty']}"], ["option 'data'", "empty.jsonl", "no rows"]),
        (["sft", f"data={files['broken']}"], ["broken.jsonl: line 2", "not valid JSON"]),
        (["sft", f"data={files['field']}"], ["field.jsonl: line 3", "field 'completion' is missing"]),
        (["dpo", f"data={files['schema']}"], ["schema.jsonl: line 1", "(prompt, chosen, rejected)", "(text)"]),
        (["sft", f"data={files['type']}"], ["type.jsonl: line 1", "field 'completion' must be a string"]),
        (["sft", f"eval_data={files['broken']}"], ["broken.jsonl: line 2", "not valid JSON"]),
        (["kto", f"eval_data={files['field']}"], ["field.jsonl: line 1", "field 'chosen'"]),
        (["sft", "model=/nonexistent"], ["option 'model'", "'/nonexistent'", "no such folder", "builtin:tiny"]),
        (["sft", "model=builtin:huge"], ["option 'model'", "'builtin:huge'", "builtin:tiny"]),
        (["sft", f"model={tmp_path}"], ["option 'model'", "without config.json"]),
        (["grpo", "rewards=nomod:fn"], ["option 'rewards'", "'nomod:fn'", "cannot import module 'nomod'"]),
        (["grpo", "rewards=online_rewards:missing"], ["option 'rewards'", "no callable 'missing'"]),
        (["grpo", "rewards=nowhere"], ["option 'rewards'", "'nowhere'", "module:function"]),
        (["ppo", "critic=no/such/folder"], ["option 'critic'", "'no/such/folder'", "no such folder"]),
        (["ppo", f"ptx_data={files['field']}", "ptx_coef=1"], ["field.jsonl: line 1", "field 'text' is missing"]),
        (["rlaif", f"judge={files['empty']}"], ["option 'judge'", "a file, not a folder"]),
    ]
    for args, names in cases:
        # warm_start_steps=0: a case that wrongly passed would not start a long warm start.
        line = fails_in_one_line([*args, "warm_start_steps=0"], capsys, within_s=5.0, run_dir=tmp_path / "run")
        for name in names:
            assert name in line, (args, name, line)


def test_the_command_prints_one_line_and_exits_2(tmp_path):
    # As a user runs it: the console script's module, a fresh process.
    done = subprocess.run([sys.executable, "-m", "fastpo.engine", "sft", f"data={tmp_path / 'nope.jsonl'}",
                           f"output_dir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    missing = tmp_path / "nope.jsonl"
    assert done.stderr.splitlines() == [f"fastpo: error: option 'data': data file '{missing}' does not exist"]


def exploding_reward(prompts, completions, **_):
    """A reward source that fails while the run trains."""
    raise RuntimeError("the reward service is down")


def test_an_error_inside_training_keeps_its_traceback(tmp_path):
    args = ["grpo", "warm_start_steps=0", "prompts_per_rollout=2", "num_generations=2", "batch_size=4",
            "grad_accum_steps=1", "max_new_tokens=2", "eval_every=0", "rewards=test_engine_errors:exploding_reward",
            f"output_dir={tmp_path}"]
    with pytest.raises(RuntimeError, match="the reward service is down"):
        cli.main(args)


def test_help_lists_the_registered_variants():
    """Adding a variant to a kernel registry adds it to the options that name one."""
    grpo, ppo, dpo = format_help("grpo"), format_help("ppo"), format_help("dpo")
    assert f"loss_type (one of {', '.join(POLICY_LOSSES.names())}," in grpo
    assert f"kl_kind (one of {', '.join(KL_ESTIMATORS.names())}," in grpo
    assert f"kl_kind (one of {', '.join(KL_ESTIMATORS.names())}," in ppo  # the reward shaping's estimator
    assert f"agg (one of {', '.join(AGGREGATIONS.names())} or none," in grpo
    assert f"loss_type (one of {', '.join(PREFERENCE_LOSSES.names())}," in dpo
    outcome = [v.name for v in ADVANTAGE_ESTIMATORS if not v.params["needs_values"]]
    assert f"advantage (one of {', '.join(outcome)}," in grpo and "gae" not in outcome


def test_train_checks_inputs_too(tmp_path):
    """From Python as from the command line: the same errors, before any work."""
    from fastpo.engine.config import ConfigError
    from fastpo.engine.data import DataError

    with pytest.raises(ConfigError, match="option 'model': got '/nonexistent'"):
        train("dpo", {"model": "/nonexistent", "output_dir": str(tmp_path)})
    with pytest.raises(DataError, match="option 'data'.*does not exist"):
        train("dpo", {"data": str(tmp_path / "none.jsonl"), "output_dir": str(tmp_path)})
    assert not any(tmp_path.iterdir())
