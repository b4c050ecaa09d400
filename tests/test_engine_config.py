"""Engine configuration and command line: YAML and key=value loading, errors, --help."""

import dataclasses
import subprocess
import sys
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest

from fastpo.engine import cli
from fastpo.engine.config import (
    ALGORITHMS,
    ConfigError,
    DPOConfig,
    format_help,
    from_dict,
    load_config,
    option,
    save_yaml,
)
from fastpo.engine.runner import train

REPO = Path(__file__).resolve().parent.parent


def _non_default(value, tp):
    """A valid value of type ``tp`` that differs from ``value``."""
    if dataclasses.is_dataclass(tp):  # a section: every option in it changed
        hints = typing.get_type_hints(tp)
        return tp(**{f.name: _non_default(getattr(value, f.name), hints[f.name]) for f in dataclasses.fields(tp)})
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return next(choice for choice in typing.get_args(tp) if choice != value)
    if origin is list:
        (item,) = typing.get_args(tp)
        return [*value, _non_default(item(1), item)]
    if origin is not None:  # X | None: a value of X
        member = next(a for a in typing.get_args(tp) if a is not type(None))
        if value is None:
            kind = typing.get_origin(member)
            if kind is typing.Literal:
                return typing.get_args(member)[0]
            value = [] if kind is list else member(1)
        return _non_default(value, member)
    if tp is bool:
        return not value
    if tp is str:
        return value + "-x"
    return tp(value + 1) if tp is int else value * 1.5 + 0.25


def _obeying_the_rules(changed: dict, defaults) -> dict:
    """``changed`` with the values that a rule between options (``validate``) would
    refuse together replaced by other non-default values that it accepts."""
    fixed = dict(changed)
    rules = {
        "data": "train.jsonl",  # with warm_start_steps > 0: not the built-in task
        "warm_start_steps": 0 if defaults.warm_start_steps is None else None,  # a data file has no warm start
        "target_accuracy": 0.5, "entropy_quantile": 0.5, "top_p": 0.5, "gamma": 0.5, "lam": 0.5,  # in [0, 1]
        "backtrack_factor": 0.25,  # in (0, 1)
        "judge_confidence": 0.75,  # in [0.5, 1)
        "loss_type": "robust" if "label_smoothing" in changed else fixed.get("loss_type"),  # takes label noise < 0.5
        # options of one policy loss type only keep their defaults: grpo's loss_type is a
        # PPO-clip type here, which delta and dual_clip need
        "cispo_ratio_min": None, "dro_beta": None,
        "rollout": "flat",  # rollout=tree takes advantage=group only, and advantage is changed
        "target": "preferences",  # reward's margin and center_coef (changed) apply to preferences only
        # a task's section applies to runs on that task, and data is a file
        "addition": type(defaults.addition)(), "countdown": type(defaults.countdown)(),
    }
    fixed.update({name: value for name, value in rules.items() if name in changed})
    if "judge" in changed:
        fixed["data"] = changed["data"]  # a judge folder serves any data
    if "prompts_per_rollout" in changed and "num_iterations" in changed:  # whole optimizer steps per rollout
        per_step = fixed["grad_accum_steps"]
        fixed["prompts_per_rollout"] = changed["prompts_per_rollout"] * per_step
        fixed["batch_size"] = changed["prompts_per_rollout"] * changed["num_generations"]
    if "reward_weights" in changed:
        fixed["reward_weights"] = [0.5] * len(changed["rewards"])
    return fixed


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_yaml_round_trip_of_every_option(algorithm, tmp_path):
    cls = ALGORITHMS[algorithm]
    hints = typing.get_type_hints(cls)
    changed = {f.name: _non_default(getattr(cls(), f.name), hints[f.name]) for f in dataclasses.fields(cls)}
    changed = _obeying_the_rules(changed, cls())
    config = from_dict(cls, changed)
    for name, value in changed.items():
        assert getattr(config, name) == value, name
    save_yaml(config, tmp_path / "run.yaml")
    assert load_config(algorithm, tmp_path / "run.yaml") == config


def test_list_options_take_comma_separated_overrides_and_yaml_lists(tmp_path):
    config = load_config("grpo", None, ["stop_strings=\\n, ;", "reward_weights=1,0.5", "rewards=builtin:addition,m:f"])
    assert config.stop_strings == ["\\n", ";"] and config.reward_weights == [1.0, 0.5]
    assert config.rewards == ["builtin:addition", "m:f"]
    assert load_config("grpo", None, ["stop_strings="]).stop_strings == []
    (tmp_path / "c.yaml").write_text("reward_weights: [2, 3.5]\nrewards: [builtin:addition, m:f]\n")
    assert load_config("grpo", tmp_path / "c.yaml").reward_weights == [2.0, 3.5]
    with pytest.raises(ConfigError, match=r"'reward_weights\[1\]': got 'x'.*expected float"):
        load_config("grpo", None, ["reward_weights=1,x"])
    with pytest.raises(ConfigError, match="'stop_strings': got 3"):
        from_dict(ALGORITHMS["grpo"], {"stop_strings": 3})


def test_sources_apply_in_order_and_strings_are_coerced(tmp_path):
    # PyYAML reads 1e-4 (no dot) as a string; it must still become a float.
    (tmp_path / "c.yaml").write_text("learning_rate: 1e-4\nsteps: 7\nbeta: 0.3\nmax_grad_norm: null\n")
    config = load_config("dpo", tmp_path / "c.yaml", ["steps=9", "resume=true", "loss_type=hinge", "steps=11"])
    assert config.learning_rate == 1e-4 and isinstance(config.learning_rate, float)
    assert config.steps == 11 and config.beta == 0.3 and config.max_grad_norm is None
    assert config.resume is True and config.loss_type == "hinge"
    assert load_config("dpo", None, ["max_grad_norm=none"]).max_grad_norm is None
    assert load_config("dpo", None, ["max_grad_norm=2"]).max_grad_norm == 2.0
    assert load_config("dpo").beta == DPOConfig().beta


@pytest.mark.parametrize(
    "override, nearest",
    [("learing_rate=1", "learning_rate"), ("bta=0.2", "beta"), ("los_type=ipo", "loss_type"),
     ("max_grad=1", "max_grad_norm")],
)
def test_unknown_key_names_the_nearest_valid_key(override, nearest):
    with pytest.raises(ConfigError, match=rf"unknown option '{override.split('=')[0]}'.*did you mean '{nearest}'"):
        load_config("dpo", None, [override])


def test_unknown_key_in_yaml_file(tmp_path):
    (tmp_path / "c.yaml").write_text("desirable_weigth: 2.0\n")
    with pytest.raises(ConfigError, match="did you mean 'desirable_weight'"):
        load_config("kto", tmp_path / "c.yaml")
    # A DPO-only option is unknown to SFT.
    with pytest.raises(ConfigError, match="unknown option 'beta'"):
        load_config("sft", None, ["beta=0.1"])


@pytest.mark.parametrize(
    "key, value, expected",
    [("steps", "abc", "int"), ("steps", 1.5, "int"), ("steps", True, "int"), ("resume", "maybe", "bool"),
     ("learning_rate", "fast", "float"), ("model", 3, "str"), ("loss_type", "sigmod", "one of sigmoid"),
     ("max_grad_norm", "big", "float or none"), ("average", 2, "bool")],
)
def test_wrong_type_names_key_value_and_type(key, value, expected):
    with pytest.raises(ConfigError) as error:
        from_dict(DPOConfig, {key: value})
    message = str(error.value)
    assert repr(key) in message and repr(value) in message and f"expected {expected}" in message


@pytest.mark.parametrize("override", ["steps=0", "batch_size=-2", "beta=0", "learning_rate=-1e-3",
                                      "max_grad_norm=0", "label_smoothing=-0.1", "warmup_steps=-1"])
def test_out_of_range_values(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"option '{key}'.*expected a value"):
        load_config("dpo", None, [override])


def test_bad_inputs_of_the_loader(tmp_path):
    with pytest.raises(ConfigError, match="unknown algorithm 'dop'.*did you mean 'dpo'"):
        load_config("dop")
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config("sft", None, ["steps"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("sft", tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- steps\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config("sft", tmp_path / "list.yaml")


@dataclass
class _Generation:
    temperature: float = option(1.0, "Sampling temperature.", positive=True)
    top_k: int | None = option(None, "Top-k sampling.")


@dataclass
class _Nested:
    steps: int = option(1, "Steps.")
    generation: _Generation = option(_Generation(), "Generation options.")


def test_dotted_keys_reach_sections():
    config = from_dict(_Nested, {"generation": {"top_k": 5}}, ["generation.temperature=0.7"])
    assert config.generation == _Generation(temperature=0.7, top_k=5)
    assert _Nested().generation is not _Nested().generation  # sections are not shared
    with pytest.raises(ConfigError, match="unknown option 'generation.temprature'.*'generation.temperature'"):
        from_dict(_Nested, None, ["generation.temprature=1"])
    with pytest.raises(ConfigError, match="option 'generation.temperature'.*> 0"):
        from_dict(_Nested, None, ["generation.temperature=0"])


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_help_lists_every_option_with_type_default_and_doc(algorithm, capsys):
    assert cli.main([algorithm, "--help"]) == 0
    text = capsys.readouterr().out
    assert text == format_help(algorithm)
    sections = [(ALGORITHMS[algorithm], "")]
    while sections:
        cls, prefix = sections.pop()
        defaults = cls()
        for f in dataclasses.fields(cls):
            doc = f.metadata["doc"]
            assert doc and "\n" not in doc, f.name
            default = getattr(defaults, f.name)
            if dataclasses.is_dataclass(default):
                sections.append((type(default), f"{prefix}{f.name}."))
                continue
            if isinstance(default, list):
                shown = ",".join(str(v) for v in default)
            else:
                shown = "none" if default is None else str(default).lower() if isinstance(default, bool) else str(default)
            name = prefix + f.name
            assert f"  {name} (" in text and f"default: {shown})" in text and doc in text, name


def test_cli_fails_clearly_for_bad_options(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("steps: 3\n")
    assert cli.main(["kto", "--config", str(tmp_path / "c.yaml"), "batch_size=1"]) == 2
    assert "option 'batch_size': got 1; kto needs at least 2" in capsys.readouterr().err
    assert cli.main(["dpo", "bta=0.2"]) == 2
    assert "did you mean 'beta'" in capsys.readouterr().err
    assert cli.main(["dop"]) == 2
    assert "did you mean 'dpo'" in capsys.readouterr().err
    assert cli.main(["sft", "--steps", "3"]) == 2
    assert "key=value" in capsys.readouterr().err
    assert cli.main([]) == 2
    assert "algorithms: sft, reward, dpo, ipo, kto" in capsys.readouterr().out


def test_train_validates_its_config():
    bad = DPOConfig()
    bad.steps = "many"
    with pytest.raises(ConfigError, match="'steps'"):
        train("dpo", bad)
    with pytest.raises(ConfigError, match="must be a DPOConfig"):
        train("dpo", ALGORITHMS["kto"]())


def test_console_script_and_module_entry_point():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["fastpo"] == "fastpo.engine.cli:main"
    # From the repository root, as a user would run it.
    # A config error stops the run before it writes anything into the repository.
    done = subprocess.run([sys.executable, "-m", "fastpo.engine", "kto", "batch_size=1"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "option 'batch_size': got 1; kto needs at least 2" in done.stderr
