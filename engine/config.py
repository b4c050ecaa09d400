"""Run configuration: one typed dataclass per algorithm, loaded from YAML and ``key=value``.

Every option is a dataclass field whose metadata holds a one-line doc (``option``), so the
``--help`` text, the type checks and the defaults all come from one place. A field whose
type is itself a dataclass is a section: YAML nests it and overrides reach it by a dotted
key (``section.key=value``).

Values from YAML and from the command line go through the same coercion: strings are
parsed into the field's type (PyYAML reads ``1e-4`` as a string, so numbers may arrive as
text either way), ``Literal`` fields accept only their listed values, ``X | None`` fields
accept ``none``/``null``. Errors are ``ConfigError`` (a ``ValueError``) naming the key,
the value and what was expected; an unknown key names the nearest valid one.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "ALGORITHMS",
    "BaseConfig",
    "ConfigError",
    "DPOConfig",
    "IPOConfig",
    "KTOConfig",
    "RewardConfig",
    "SFTConfig",
    "config_class",
    "config_to_dict",
    "format_help",
    "from_dict",
    "load_config",
    "option",
    "save_yaml",
]


class ConfigError(ValueError):
    """A bad configuration key or value; the message names the key and the value."""


def option(default: Any, doc: str, *, minimum: float | None = None, positive: bool = False):
    """A config field with its default, its one-line ``--help`` doc and an optional bound.

    Args:
        default: the default value; mutable ones (lists, dicts, sections) are copied per instance.
        doc: one line shown by ``--help``.
        minimum: the smallest value allowed (inclusive); ``none`` values are not checked.
        positive: the value must be > 0.
    """
    metadata = {"doc": doc, "minimum": minimum, "positive": positive}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class BaseConfig:
    """Options shared by every algorithm."""

    model: str = option("builtin:tiny", "Model: builtin:tiny or a local Hugging Face checkpoint folder.")
    data: str = option("builtin:addition", "Training data: builtin:addition or a local .jsonl/.parquet file.")
    eval_data: str | None = option(None, "Held-out data file; none uses the built-in task's held-out split.")
    output_dir: str = option("runs/{algorithm}", "Run folder (metrics, plots, checkpoints); {algorithm} is replaced.")
    seed: int = option(0, "Seed of the model init, data order and sampling.", minimum=0)
    steps: int = option(200, "Optimizer steps to run.", positive=True)
    batch_size: int = option(16, "Examples per micro-batch (pairs or groups for preference data).", positive=True)
    grad_accum_steps: int = option(1, "Micro-batches accumulated into one optimizer step.", positive=True)
    max_length: int = option(64, "Longest prompt+response in tokens; longer rows are truncated.", positive=True)
    learning_rate: float = option(1e-3, "Peak learning rate of AdamW.", positive=True)
    weight_decay: float = option(0.0, "AdamW decoupled weight decay.", minimum=0)
    warmup_steps: int = option(10, "Steps of linear warmup from 0 to the peak learning rate.", minimum=0)
    lr_schedule: Literal["cosine", "linear", "constant"] = option(
        "cosine", "Learning-rate decay after warmup."
    )
    max_grad_norm: float | None = option(1.0, "Clip the global gradient norm to this; none disables.", positive=True)
    eval_every: int = option(50, "Evaluate on held-out data every N steps (0: only at the end).", minimum=0)
    save_every: int = option(0, "Write a checkpoint every N steps (0: only at the end).", minimum=0)
    log_every: int = option(10, "Log metrics every N steps.", positive=True)
    resume: bool = option(False, "Continue from the last checkpoint in output_dir.")
    max_bad_steps: int = option(
        3,
        "Stop the run after this many steps in a row with a non-finite loss or gradient (each is skipped).",
        positive=True,
    )
    device: str = option("auto", "Device: auto (cuda when available, else cpu), cpu, cuda, cuda:N.")
    warm_start_steps: int | None = option(
        None,
        "SFT steps on the built-in task before training, cached in output_dir/warm_start; "
        "none: 600 for builtin:tiny on builtin:addition (every algorithm but sft), else 0.",
        minimum=0,
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", "Parameter dtype; auto is float32 (bf16 autocast on GPUs is not implemented yet)."
    )


@dataclass
class SFTConfig(BaseConfig):
    """Supervised fine-tuning on prompt/completion rows; the loss covers completion tokens only."""

    packing: bool = option(False, "Pack several rows into each max_length sequence.")


@dataclass
class RewardConfig(BaseConfig):
    """Reward model: Bradley-Terry on pairs, K-wise ranking loss on ranked rows."""

    margin: float = option(0.0, "Bradley-Terry margin: -log sigmoid(r_c - r_r - margin).", minimum=0)
    center_coef: float = option(0.0, "Centering: adds center_coef * mean((r_c + r_r)**2).", minimum=0)
    ranking: bool = option(
        True, "Train rows of K ranked responses with the K-wise ranking loss; false rejects them."
    )


@dataclass
class DPOConfig(BaseConfig):
    """Direct Preference Optimization (Plackett-Luce on rows of K ranked responses)."""

    learning_rate: float = option(1e-4, "Peak learning rate of AdamW.", positive=True)
    beta: float = option(0.1, "Inverse temperature of the implicit reward beta*(lp - lp_ref).", positive=True)
    loss_type: Literal["sigmoid", "hinge", "robust", "ipo"] = option(
        "sigmoid", "Preference loss on h = (lp_c - lp_ref_c) - (lp_r - lp_ref_r)."
    )
    label_smoothing: float = option(0.0, "Label noise eps of cDPO (sigmoid) and rDPO (robust).", minimum=0)
    average: bool = option(False, "Average response log-probs over tokens instead of summing.")


@dataclass
class IPOConfig(BaseConfig):
    """Identity Preference Optimization: (h - 1/(2*beta))**2."""

    learning_rate: float = option(1e-4, "Peak learning rate of AdamW.", positive=True)
    beta: float = option(0.1, "IPO regularization; the target margin is 1/(2*beta).", positive=True)
    average: bool = option(True, "Average response log-probs over tokens (TRL); false sums (OpenRLHF).")


@dataclass
class KTOConfig(BaseConfig):
    """Kahneman-Tversky Optimization on prompt/completion/label rows."""

    learning_rate: float = option(1e-4, "Peak learning rate of AdamW.", positive=True)
    beta: float = option(0.1, "Inverse temperature of the reward lp - lp_ref.", positive=True)
    desirable_weight: float = option(1.0, "Loss weight lambda_D of desirable completions.", minimum=0)
    undesirable_weight: float = option(1.0, "Loss weight lambda_U of undesirable completions.", minimum=0)


ALGORITHMS: dict[str, type[BaseConfig]] = {
    "sft": SFTConfig,
    "reward": RewardConfig,
    "dpo": DPOConfig,
    "ipo": IPOConfig,
    "kto": KTOConfig,
}


def config_class(algorithm: str) -> type[BaseConfig]:
    """The config dataclass of ``algorithm``; an unknown name is a ConfigError."""
    try:
        return ALGORITHMS[algorithm]
    except KeyError:
        raise ConfigError(
            f"unknown algorithm {algorithm!r}{_suggestion(algorithm, ALGORITHMS)}; "
            f"choose one of {', '.join(ALGORITHMS)}"
        ) from None


# ---------------------------------------------------------------- types and coercion


def _field_types(cls) -> dict[str, Any]:
    # `from __future__ import annotations` stores annotations as strings; resolve them.
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("none" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "section"
    return tp.__name__


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _coerce(key: str, value, tp):
    """``value`` converted to ``tp``, or a ConfigError naming key, value and type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(tp)
        if type(None) in members and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        for member in members:
            if member is type(None):
                continue
            try:
                return _coerce(key, value, member)
            except ConfigError:
                continue
        raise _type_error(key, value, tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        raise _type_error(key, value, tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise _type_error(key, value, tp)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise _type_error(key, value, tp)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise _type_error(key, value, tp)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _type_error(key, value, tp)
    raise TypeError(f"config option {key!r} has an unsupported type {tp!r}")


def _type_error(key: str, value, tp) -> ConfigError:
    return ConfigError(f"option {key!r}: got {value!r} ({type(value).__name__}); expected {_type_name(tp)}")


def _suggestion(key: str, valid) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


# ---------------------------------------------------------------- building configs


def _flat_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    for name, tp in _field_types(cls).items():
        if dataclasses.is_dataclass(tp):
            keys += _flat_keys(tp, prefix + name + ".")
        else:
            keys.append(prefix + name)
    return keys


def _apply(config, mapping: dict, prefix: str, root_cls) -> None:
    types_ = _field_types(type(config))
    for key, value in mapping.items():
        dotted = prefix + str(key)
        if key not in types_:
            raise ConfigError(
                f"unknown option {dotted!r} for {root_cls.__name__}"
                f"{_suggestion(dotted, _flat_keys(root_cls))}"
            )
        tp = types_[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise _type_error(dotted, value, tp)
            _apply(getattr(config, key), value, dotted + ".", root_cls)
        else:
            value = _coerce(dotted, value, tp)
            _check_bounds(dotted, value, _field_metadata(type(config))[key])
            setattr(config, key, value)


def _field_metadata(cls) -> dict[str, Any]:
    return {f.name: f.metadata for f in dataclasses.fields(cls)}


def _check_bounds(key: str, value, metadata) -> None:
    if value is None:
        return
    if metadata.get("positive") and not value > 0:
        raise ConfigError(f"option {key!r}: got {value!r}; expected a value > 0")
    minimum = metadata.get("minimum")
    if minimum is not None and not value >= minimum:
        raise ConfigError(f"option {key!r}: got {value!r}; expected a value >= {minimum}")


def _nest(dotted: str, value) -> dict:
    head, _, rest = dotted.partition(".")
    return {head: _nest(rest, value) if rest else value}


def from_dict(cls: type, mapping: dict | None = None, overrides=()):
    """A ``cls`` instance from defaults, then ``mapping`` (nested dicts), then overrides.

    Args:
        cls: a config dataclass, for example ``DPOConfig``.
        mapping: option values, sections as nested dicts (a parsed YAML file).
        overrides: ``"key=value"`` strings; a dotted key reaches into a section.
    """
    config = cls()
    if mapping is not None:
        if not isinstance(mapping, dict):
            raise ConfigError(f"a config must be a mapping of options, got {type(mapping).__name__}")
        _apply(config, mapping, "", cls)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        _apply(config, _nest(key.strip(), value), "", cls)
    return config


def load_config(algorithm: str, config_file: str | Path | None = None, overrides=()) -> BaseConfig:
    """The validated config of ``algorithm`` from an optional YAML file and ``key=value`` overrides.

    Later sources win: defaults, then the file, then the overrides in order.
    """
    cls = config_class(algorithm)
    mapping = None
    if config_file is not None:
        import yaml

        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        with path.open() as f:
            mapping = yaml.safe_load(f)
        if mapping is None:
            mapping = {}
        if not isinstance(mapping, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of options")
    return from_dict(cls, mapping, overrides)


def config_to_dict(config) -> dict:
    """The config as plain nested dicts, fit for YAML and JSON."""
    return dataclasses.asdict(config)


def save_yaml(config, path: str | Path) -> None:
    """Write ``config`` as YAML that ``load_config`` reads back into an equal config."""
    import yaml

    with Path(path).open("w") as f:
        yaml.safe_dump(config_to_dict(config), f, sort_keys=False)


# ---------------------------------------------------------------- help text


def _help_rows(cls, prefix: str = "") -> list[tuple[str, str, str, str]]:
    rows = []
    defaults = cls()
    for f in dataclasses.fields(cls):
        tp = _field_types(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            rows += _help_rows(tp, prefix + f.name + ".")
            continue
        default = getattr(defaults, f.name)
        shown = "none" if default is None else str(default).lower() if isinstance(default, bool) else str(default)
        rows.append((prefix + f.name, _type_name(tp), shown, f.metadata.get("doc", "")))
    return rows


def format_help(algorithm: str) -> str:
    """The ``fastpo <algorithm> --help`` text: every option with type, default and doc."""
    cls = config_class(algorithm)
    lines = [
        f"usage: fastpo {algorithm} [--config FILE.yaml] [key=value ...]",
        "",
        (cls.__doc__ or "").strip(),
        "",
        "options (YAML keys or key=value overrides; later ones win):",
    ]
    for key, type_name, default, doc in _help_rows(cls):
        lines.append(f"  {key} ({type_name}, default: {default})")
        lines.append(f"      {doc}")
    return "\n".join(lines) + "\n"
