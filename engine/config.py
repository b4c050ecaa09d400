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

A config validates itself before any work: each field's bound (``option(minimum=,
positive=)``) and every rule between fields (``validate``, run by ``__post_init__`` and
again by ``from_dict`` once every value is set), so a bad combination fails in
milliseconds, before a model is loaded. The rules of the kernels are the configs' rules:
GRPO builds ``fastpo.kernels.PolicyLossOptions`` from its fields, whose own checks run.
What only the data, the model or the launch can tell (a file's rows, a checkpoint's
attention, the number of processes) is checked before the model loads
(``engine/inputs.py``) or by the algorithm.

The class hierarchy follows what a run trains with: ``RunConfig`` holds the options of
every run; ``BaseConfig`` adds those of the AdamW step (the loop's default update);
``OnlineConfig`` the rollouts. ``TRPOConfig`` takes rollouts but no AdamW step: its
``NOT_APPLICABLE`` options are refused with the reason.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from fastpo.kernels import (
    ADVANTAGE_ESTIMATORS,
    AGGREGATIONS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    PREFERENCE_LOSSES,
    PolicyLossOptions,
)
from fastpo.kernels.policy import (
    ENTROPY_AGGS,
    IMPORTANCE_LEVELS,
    PRESET_AGG,
    ROLLOUT_IS_GATINGS,
    ROLLOUT_IS_LEVELS,
    ROLLOUT_IS_MODES,
    ROLLOUT_IS_SEQ_RATIOS,
    ROLLOUT_IS_WEIGHTS,
    ROLLOUT_RS,
    SEQ_MEAN_ROWS,
)

from .tasks import BUILTIN_TASKS, DEFAULT_TASK, STATE_TASKS, builtin_task, config_defaults

__all__ = [
    "ALGORITHMS",
    "AdditionOptions",
    "BUILTIN_DATA",
    "BaseConfig",
    "ConfigError",
    "CountdownOptions",
    "DPOConfig",
    "GRPOConfig",
    "IPOConfig",
    "KTOConfig",
    "OnlineConfig",
    "PPOConfig",
    "RLAIFConfig",
    "RewardConfig",
    "RunConfig",
    "SFTConfig",
    "TASK_SECTIONS",
    "TRPOConfig",
    "cache_settings",
    "check_task_sections",
    "config_class",
    "config_to_dict",
    "format_help",
    "from_dict",
    "load_config",
    "option",
    "save_yaml",
    "task_settings",
]


class ConfigError(ValueError):
    """A bad configuration key or value; the message names the key and the value."""


BUILTIN_DATA = "builtin:addition"  # the built-in task's data (engine/task.py)

# The choices of the options that name a kernel variant: the registries' names, so a
# variant registered in fastpo.kernels is an accepted value (and listed by --help).
LossType = Literal[POLICY_LOSSES.names()]
KLKind = Literal[KL_ESTIMATORS.names()]
Aggregation = Literal[AGGREGATIONS.names()]
PreferenceLoss = Literal[PREFERENCE_LOSSES.names()]
# GRPO's advantages come from the rewards alone: the estimators that need no critic.
OutcomeAdvantage = Literal[tuple(v.name for v in ADVANTAGE_ESTIMATORS if not v.params["needs_values"])]


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
class AdditionOptions:
    """The problems of ``builtin:addition`` (``engine/task.py``'s ``AdditionTask``)."""

    digits: int = option(2, "builtin:addition: digits per operand.", positive=True)


@dataclass
class CountdownOptions:
    """The problems and reward of ``builtin:countdown`` (``engine/countdown.py``'s
    ``CountdownTask``): the difficulty knobs and the partial credit."""

    # Options of the reward alone: SFT on the problems (a warm start) does not read them.
    REWARD_OPTIONS: ClassVar[tuple[str, ...]] = ("format_reward", "progress_reward")
    count: int = option(4, "builtin:countdown: numbers per problem, 2 to 6 (a solution takes count - 1 steps).",
                        positive=True)
    max_number: int = option(13, "builtin:countdown: the numbers are drawn from 1 to this.", positive=True)
    min_target: int = option(24, "builtin:countdown: smallest target (24 to 24: the Game of 24).", positive=True)
    max_target: int = option(24, "builtin:countdown: largest target.", positive=True)
    use_all: bool = option(True, "builtin:countdown: every number used exactly once, else at most once.")
    format_reward: float = option(0.1, "builtin:countdown: reward of a wrong but well-formed chain.", minimum=0)
    progress_reward: float = option(
        0.0, "builtin:countdown: partial credit of a wrong chain, times the share of its needed steps that were "
        "valid and kept the target reachable.", minimum=0,
    )


# The option section of each built-in task's settings: a run builds its task with them
# (``task_settings``), and only a run whose data or rewards name the task may change them.
TASK_SECTIONS = {"builtin:addition": "addition", "builtin:countdown": "countdown"}


def task_settings(config, task: str) -> dict:
    """The settings ``config`` gives built-in ``task`` (its section's values; none when
    the config has no such section)."""
    section = getattr(config, TASK_SECTIONS[task], None)
    return {} if section is None else dataclasses.asdict(section)


def cache_settings(config) -> dict:
    """``config_to_dict(config)`` without the task sections left at their defaults: what a
    cache key hashes, so that the keys of runs on the default problems stay those made
    before the sections existed."""
    values = config_to_dict(config)
    for section in TASK_SECTIONS.values():
        if section in values and values[section] == config_to_dict(type(getattr(config, section))()):
            del values[section]
    return values


def check_task_sections(config, named: set[str]) -> None:
    """ConfigError for task settings the task refuses, or changed for a task that the run
    does not use (``named``: its data, the task it evaluates on, its rewards)."""
    for task, section in TASK_SECTIONS.items():
        values = getattr(config, section, None)
        if values is None:
            continue
        settings, defaults = dataclasses.asdict(values), dataclasses.asdict(type(values)())
        try:
            builtin_task(task, **settings)
        except ValueError as error:
            raise ConfigError(f"option {section!r}: {error}") from None
        changed = [(key, value) for key, value in settings.items() if value != defaults[key]]
        if changed and task not in named:
            key, value = changed[0]
            raise ConfigError(
                f"option '{section}.{key}': got {value!r}, but the {section} options apply to {task}, which "
                f"this run does not use (data={config.data})"
            )


@dataclass
class RunConfig:
    """Options of every run."""

    model: str = option("builtin:tiny", "Model: builtin:tiny or a local Hugging Face checkpoint folder.")
    data: str = option(
        "builtin:addition",
        "Training data: a built-in task (builtin:addition, builtin:countdown) or a local .jsonl/.parquet file.",
    )
    eval_data: str | None = option(None, "Held-out data file; none uses the built-in task's held-out split.")
    output_dir: str = option("runs/{algorithm}", "Run folder (metrics, plots, checkpoints); {algorithm} is replaced.")
    seed: int = option(0, "Seed of the model init, data order and sampling.", minimum=0)
    steps: int = option(200, "Optimizer steps to run.", positive=True)
    batch_size: int = option(16, "Examples per micro-batch (pairs or groups for preference data).", positive=True)
    max_length: int = option(64, "Longest prompt+response in tokens; longer rows are truncated.", positive=True)
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
    threads: int | None = option(
        None,
        "CPU threads of torch and the native kernels; none: OMP_NUM_THREADS when set, else the cores free at "
        "the start (CPU affinity less the cores busy in a quarter-second sample, shared by torchrun's local processes).",
        positive=True,
    )
    warm_start_steps: int | None = option(
        None,
        "Most SFT steps on the built-in task before training, cached once for every run (FASTPO_CACHE); "
        "none: 1500 for builtin:tiny on a built-in task (every algorithm but sft), else 0.",
        minimum=0,
    )
    warm_start_accuracy: float = option(
        0.3,
        "The warm start ends at the first check (every 50 steps) where greedy exact match on "
        "200 training prompts reaches this.",
        minimum=0,
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", "Parameter dtype; auto is float32 (with bf16 autocast on CUDA: see autocast)."
    )
    autocast: Literal["auto", "bfloat16", "float16", "none"] = option(
        "auto",
        "Autocast of the forward and loss over float32 parameters; auto: bfloat16 on CUDA, none on the CPU "
        "or with bfloat16/float16 parameters. float16 is refused (it needs loss scaling).",
    )
    gradient_checkpointing: bool = option(
        False, "Recompute each layer's activations in the backward (Hugging Face gradient_checkpointing_enable)."
    )
    addition: AdditionOptions = option(AdditionOptions(), "builtin:addition's problems.")
    countdown: CountdownOptions = option(CountdownOptions(), "builtin:countdown's problems and reward.")

    # Options of a parent class that this one refuses, with the reason (see TRPOConfig).
    NOT_APPLICABLE = {}

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """ConfigError for a value out of its field's bounds or a combination of options
        that cannot train. Subclasses add their rules after calling this."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                _check_bounds(f.name, value, f.metadata)
        if self.autocast == "float16":
            raise ConfigError(
                "option 'autocast': got 'float16', which needs loss scaling (a GradScaler) that fastpo does not "
                "implement; use autocast=bfloat16 or none"
            )
        if self.autocast == "bfloat16" and self.dtype not in ("auto", "float32"):
            raise ConfigError(
                f"option 'autocast': got 'bfloat16' with dtype={self.dtype}; autocast runs float32 parameters "
                "in bfloat16, so use dtype=auto or float32 (or autocast=none)"
            )
        _check_unit_interval("warm_start_accuracy", self.warm_start_accuracy)
        # A run on a data file evaluates on the default task's held-out problems (when
        # eval_data is none), so that task's options apply to it too.
        evaluated = DEFAULT_TASK if self.data not in BUILTIN_TASKS else self.data
        check_task_sections(self, {self.data, evaluated, *getattr(self, "rewards", ())})
        if self.warm_start_steps and self.data not in BUILTIN_TASKS:
            raise ConfigError(
                f"option 'warm_start_steps': got {self.warm_start_steps}, but the warm start trains on a built-in "
                f"task ({', '.join(BUILTIN_TASKS)}) and data is {self.data!r}; warm-start with `fastpo sft` on your "
                "data and pass model=PATH"
            )


@dataclass
class BaseConfig(RunConfig):
    """Options shared by every algorithm whose step is the loop's AdamW update."""

    grad_accum_steps: int = option(
        1,
        "Micro-batches accumulated into one optimizer step, over all processes (under torchrun each of "
        "N processes takes every N-th, so a multiple of N).",
        positive=True,
    )
    learning_rate: float = option(1e-3, "Peak learning rate of AdamW.", positive=True)
    weight_decay: float = option(0.0, "AdamW decoupled weight decay.", minimum=0)
    warmup_steps: int = option(10, "Steps of linear warmup from 0 to the peak learning rate.", minimum=0)
    lr_schedule: Literal["cosine", "linear", "constant", "wsd"] = option(
        "cosine", "Learning-rate decay after warmup (wsd: constant, then linear to 0 over the last 20% of the steps)."
    )
    max_grad_norm: float | None = option(1.0, "Clip the global gradient norm to this; none disables.", positive=True)


@dataclass
class SFTConfig(BaseConfig):
    """Supervised fine-tuning on prompt/completion rows; the loss covers completion tokens only."""

    # builtin:tiny learns 2-digit addition to 80% held-out exact match in about a minute with these.
    steps: int = option(1000, "Optimizer steps to run.", positive=True)
    batch_size: int = option(64, "Completions per micro-batch.", positive=True)
    learning_rate: float = option(2e-3, "Peak learning rate of AdamW.", positive=True)
    warmup_steps: int = option(20, "Steps of linear warmup from 0 to the peak learning rate.", minimum=0)
    packing: bool = option(False, "Pack several rows into each max_length sequence.")
    target_accuracy: float | None = option(
        None, "End the run at the first periodic evaluation whose held-out exact match reaches this."
    )

    def validate(self) -> None:
        super().validate()
        if self.warm_start_steps:
            raise ConfigError(
                f"option 'warm_start_steps': got {self.warm_start_steps}, but sft is the warm start; leave it none or 0"
            )
        if self.target_accuracy is not None:
            _check_unit_interval("target_accuracy", self.target_accuracy)
            if not self.eval_every:
                raise ConfigError(
                    f"option 'target_accuracy': got {self.target_accuracy}, which needs periodic evaluation; "
                    "set eval_every > 0"
                )


@dataclass
class RewardConfig(BaseConfig):
    """Reward model: Bradley-Terry on pairs, K-wise ranking loss on ranked rows; or, with
    target=states, a value model: binary cross-entropy on labelled states."""

    # From the warm start, 800 steps reached held-out pairwise accuracy 0.825 (seed 0), still
    # climbing when the cosine schedule ran out; 1600 passed 0.9 by step 850 on seeds 0 and 1,
    # and with lm_coef=1 on seeds 0, 1 and 2; at 3e-4 a weaker warm start (seed 0 on another
    # machine) ended at 0.885, at 5e-4 all three seeds passed 0.9 (docs/engine.md, reward).
    steps: int = option(1600, "Optimizer steps to run.", positive=True)
    batch_size: int = option(32, "Pairs (or ranked rows) per micro-batch.", positive=True)
    learning_rate: float = option(5e-4, "Peak learning rate of AdamW.", positive=True)
    warmup_steps: int = option(20, "Steps of linear warmup from 0 to the peak learning rate.", minimum=0)
    margin: float = option(0.0, "Bradley-Terry margin: -log sigmoid(r_c - r_r - margin).", minimum=0)
    center_coef: float = option(0.0, "Centering: adds center_coef * mean((r_c + r_r)**2).", minimum=0)
    ranking: bool = option(
        True, "Train rows of K ranked responses with the K-wise ranking loss; false rejects them."
    )
    head_init_std: float | None = option(
        None,
        "Std of a new score head's normal init; none: 1/sqrt(hidden size), scores of unit scale; "
        "0: a zero head, every score 0 and every pair tied at the start.",
        minimum=0,
    )
    lm_coef: float = option(
        1.0,
        "Adds lm_coef * the chosen (best) response's mean negative log-likelihood per token under the LM head of "
        "the causal LM the run starts from, frozen (GRM's hidden-state regularization); 0: none. No term when the "
        "start has no LM head (a reward checkpoint, the random built-in model).",
        minimum=0,
    )
    target: Literal["preferences", "states"] = option(
        "preferences",
        "What the score learns: preferences (pairs, ranked rows), or states: a value model, sigmoid(score) the "
        "probability that a reasoning state can still reach the answer, by binary cross-entropy on labelled states "
        "(builtin:countdown's, labelled by its solver, or a file's unary rows: prompt, completion, label); "
        "fastpo reason value=head reads it. No LM term for states.",
    )

    def validate(self) -> None:
        super().validate()
        if self.target == "states" and self.data.startswith("builtin:") and self.data not in STATE_TASKS:
            raise ConfigError(
                f"option 'data': got {self.data!r} with target=states; built-in states come from "
                f"{', '.join(STATE_TASKS)} (or give a file of unary rows)"
            )
        if self.target == "states" and (self.margin or self.center_coef):
            raise ConfigError("options 'margin' and 'center_coef' apply to preferences only; set them to 0 for states")


@dataclass
class DPOConfig(BaseConfig):
    """Direct Preference Optimization (Plackett-Luce on rows of K ranked responses)."""

    learning_rate: float = option(1e-4, "Peak learning rate of AdamW.", positive=True)
    beta: float = option(0.1, "Inverse temperature of the implicit reward beta*(lp - lp_ref).", positive=True)
    loss_type: PreferenceLoss = option(
        "sigmoid", "Preference loss on h = (lp_c - lp_ref_c) - (lp_r - lp_ref_r) (fastpo.kernels.dpo_loss)."
    )
    label_smoothing: float = option(0.0, "Label noise eps of cDPO (sigmoid) and rDPO (robust).", minimum=0)
    average: bool = option(False, "Average response log-probs over tokens instead of summing.")
    rpo_alpha: float = option(
        0.0, "RPO: adds rpo_alpha * the chosen response's mean negative log-likelihood per token to each pair's "
        "loss (the best response's, on ranked rows); 0: none.", minimum=0,
    )

    def validate(self) -> None:
        super().validate()
        # The kernel's rule: each loss type registers the range of label noise it takes.
        allowed = PREFERENCE_LOSSES.get(self.loss_type).params["label_smoothing"]
        if allowed is None:
            if self.label_smoothing:
                takers = ", ".join(v.name for v in PREFERENCE_LOSSES if v.params["label_smoothing"] is not None)
                raise ConfigError(
                    f"option 'label_smoothing': got {self.label_smoothing}, but it must be 0 with "
                    f"loss_type={self.loss_type} (only {takers} take label noise)"
                )
            return
        upper, excluded = allowed
        if self.label_smoothing > upper or (excluded and self.label_smoothing == upper):
            raise ConfigError(
                f"option 'label_smoothing': got {self.label_smoothing}; loss_type={self.loss_type} needs a value "
                f"{'<' if excluded else '<='} {upper}"
            )


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

    def validate(self) -> None:
        super().validate()
        if self.batch_size < 2:
            raise ConfigError(
                f"option 'batch_size': got {self.batch_size}; kto needs at least 2 (z0 pairs each prompt "
                "with another row's completion)"
            )
        if self.desirable_weight == 0 and self.undesirable_weight == 0:
            raise ConfigError(
                "options 'desirable_weight' and 'undesirable_weight' are both 0: nothing would be trained; "
                "set one > 0"
            )


@dataclass
class RolloutOptions:
    """The rollouts of the online algorithms: sampling and rewards (a mixin of
    ``OnlineConfig`` and ``TRPOConfig``)."""

    batch_size: int = option(64, "Completions per micro-batch.", positive=True)
    prompts_per_rollout: int = option(16, "Prompts sampled per rollout.", positive=True)
    num_generations: int = option(8, "Completions sampled per prompt (the group size G).", positive=True)
    temperature: float = option(1.0, "Sampling temperature, applied identically in the training forward.", positive=True)
    top_p: float = option(1.0, "Nucleus sampling mass in (0, 1]; 1 disables.", positive=True)
    top_k: int = option(0, "Sample among the k most likely tokens; 0 disables.", minimum=0)
    max_new_tokens: int = option(8, "Completion budget in tokens.", positive=True)
    stop_strings: list[str] = option([], "Strings that end a completion (comma-separated).")
    rewards: list[str] = option(
        ["builtin:addition"],
        "Reward sources: a built-in task's verifier (builtin:addition, builtin:countdown), module:function "
        "callables, reward model folders (comma-separated).",
    )
    reward_weights: list[float] | None = option(None, "Weight of each reward source; none: 1 each.")

    def _check_rollouts(self) -> None:
        if self.top_p > 1:
            raise ConfigError(f"option 'top_p': got {self.top_p}; expected a value in (0, 1]")
        if not self.rewards:
            raise ConfigError("option 'rewards': got none; give at least one reward source")
        for spec in self.rewards:
            if spec in BUILTIN_TASKS and self.data in BUILTIN_TASKS and spec != self.data:
                raise ConfigError(
                    f"option 'rewards': got {spec!r}, the verifier of another task than data={self.data}; "
                    f"use {self.data}"
                )
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            raise ConfigError(
                f"option 'reward_weights': got {len(self.reward_weights)} weights for {len(self.rewards)} reward "
                f"sources ({', '.join(self.rewards)}); give one weight per source, or none"
            )


@dataclass
class OnlineConfig(RolloutOptions, BaseConfig):
    """Options shared by the online algorithms whose step is AdamW's (grpo, ppo): rollouts,
    rewards, and passes over each rollout."""

    num_iterations: int = option(1, "Passes of optimizer steps over each rollout (mu).", positive=True)

    def validate(self) -> None:
        super().validate()
        self._check_rollouts()
        completions = self.prompts_per_rollout * self.num_generations
        per_step = self.batch_size * self.grad_accum_steps
        if completions % per_step:
            raise ConfigError(
                f"option 'prompts_per_rollout': {self.prompts_per_rollout} prompts x num_generations="
                f"{self.num_generations} = {completions} completions per rollout, not a multiple of "
                f"batch_size x grad_accum_steps = {per_step}"
            )

    @property
    def steps_per_pass(self) -> int:
        """Optimizer steps per pass over a rollout."""
        return self.prompts_per_rollout * self.num_generations // (self.batch_size * self.grad_accum_steps)


@dataclass
class GRPOConfig(OnlineConfig):
    """Group Relative Policy Optimization: G samples per prompt, group-normalized rewards."""

    learning_rate: float = option(2e-4, "Peak learning rate of AdamW.", positive=True)
    steps: int = option(500, "Optimizer steps to run.", positive=True)
    grad_accum_steps: int = option(2, "Micro-batches accumulated into one optimizer step.", positive=True)
    eval_every: int = option(50, "Evaluate on held-out data every N steps (0: only at the end).", minimum=0)
    advantage: OutcomeAdvantage = option(
        "group",
        "Advantage estimator: the entries of fastpo.kernels.ADVANTAGE_ESTIMATORS that need no critic "
        "(docs/advantages.md); gdpo's reward components are the sources of rewards, remax scores a greedy completion.",
    )
    scale_rewards: Literal["group", "batch", "none"] = option(
        "group", "Std that divides the group-centered rewards: group, batch, none (Dr.GRPO)."
    )
    advantage_eps: float = option(1e-4, "Added to the std of the advantage (TRL 1e-4).", minimum=0)
    loss_type: LossType = option(
        "grpo", "Policy loss form and its default aggregation (fastpo.kernels.policy_loss)."
    )
    agg: Aggregation | None = option(None, "Loss aggregation; none: the loss type's preset.")
    clip_eps_low: float = option(0.2, "Lower clip range: ratio >= 1 - clip_eps_low.", positive=True)
    clip_eps_high: float | None = option(None, "Upper clip range (cispo: the absolute cap); none: clip_eps_low.")
    delta: float | None = option(None, "Two-sided clipping: the unclipped ratio is capped at delta.")
    dual_clip: float | None = option(None, "Dual-clip constant c > 1 for negative advantages.")
    importance_level: Literal[IMPORTANCE_LEVELS] = option("token", "Importance ratio per token or per sequence.")
    beta: float = option(0.0, "KL coefficient to the frozen reference; 0 loads no reference.", minimum=0)
    kl_kind: KLKind = option("k3", "KL estimator of the beta term (fastpo.kernels.kl_penalty).")
    entropy_coef: float = option(0.0, "Entropy bonus coefficient.", minimum=0)
    entropy_quantile: float | None = option(
        None, "Only tokens at or above this entropy quantile of the batch train the policy term."
    )
    kl_ratio_weighted: bool = option(
        False, "The KL term times the policy ratio, not detached (TRL 1.16's use_bias_correction_kl, its default)."
    )
    kl_clamp: float | None = option(
        None, "Clamp the KL estimate to [-c, c] (OpenRLHF: 10); none: no clamp.", positive=True
    )
    log_ratio_clamp: float | None = option(
        None, "Clamp the token log-ratio lp - lp_old to [-c, c] before exp (verl, OpenRLHF: 20); none: no clamp.",
        positive=True,
    )
    seq_log_ratio_cap: float | None = option(
        None, "Cap of a sequence ratio's mean log-ratio before exp (verl GSPO: 10); sequence ratios only."
    )
    seq_mean_rows: Literal[SEQ_MEAN_ROWS] = option(
        "all", "Rows the seq-mean-* aggregations divide by: all (the batch size, TRL) or nonempty (verl, OpenRLHF)."
    )
    entropy_agg: Literal[ENTROPY_AGGS] = option(
        "loss",
        "Entropy bonus: loss (per token, aggregated like the loss; verl) or token-mean (over the kept tokens; TRL).",
    )
    cispo_ratio_min: float | None = option(
        None, "cispo: lower clamp of the truncated ratio (verl: 1 - clip_ratio_low); none: no lower clamp.", minimum=0
    )
    sapo_tau_pos: float = option(1.0, "sapo: temperature of the soft gate for A > 0 (TRL 1.0).", positive=True)
    sapo_tau_neg: float = option(1.05, "sapo: temperature of the soft gate for A <= 0 (TRL 1.05).", positive=True)
    dppo_ratio_cap: float = option(
        20.0, "dppo_tv, dppo_kl: cap of the detached ratio (verl clip_ratio_c); clip_eps_* are the divergence bounds.",
        positive=True,
    )
    dro_beta: float | None = option(
        None, "dro: weight of 0.5 * (lp - lp_old)**2, required by loss_type=dro (verl dro_beta).", positive=True
    )
    cov_ratio: float = option(
        0.0002, "clip_cov, kl_cov: fraction of the valid tokens selected (verl clip_cov_ratio, kl_cov_ratio).",
        positive=True,
    )
    clip_cov_lb: float = option(1.0, "clip_cov: lower end of the covariance band of the tokens that may be detached.")
    clip_cov_ub: float = option(5.0, "clip_cov: upper end of the covariance band of the tokens that may be detached.")
    kl_cov_coef: float = option(0.1, "kl_cov: coefficient of |lp - lp_old| on the selected tokens (verl ppo_kl_coef).")
    vespo_k_pos: float = option(2.0, "vespo: gamma-weight shape k for A >= 0 (TRL vespo_k_pos).")
    vespo_lambda_pos: float = option(3.0, "vespo: gamma-weight rate lambda for A >= 0 (TRL vespo_lambda_pos).")
    vespo_k_neg: float = option(3.0, "vespo: gamma-weight shape k for A < 0 (TRL vespo_k_neg).")
    vespo_lambda_neg: float = option(2.0, "vespo: gamma-weight rate lambda for A < 0 (TRL vespo_lambda_neg).")
    rollout_is: Literal[ROLLOUT_IS_LEVELS] = option(
        "token", "Unit of the rollout-mismatch correction: each token or each sequence."
    )
    rollout_is_mode: Literal[ROLLOUT_IS_MODES] = option(
        "truncate", "truncate: weight by the unit's ratio clamped to [rollout_is_min, rollout_is_cap]; mask: weight "
        "0 outside that band (IcePop, TRL *_mask, OpenRLHF mask).",
    )
    rollout_is_min: float | None = option(
        None, "Lower end of the rollout-correction band; none: unbounded below.", minimum=0
    )
    rollout_is_cap: float | None = option(
        None, "Upper end of the band on exp(lp_old - lp_rollout) (TIS's cap C); none: unbounded above (with "
        "rollout_is_min none and mode truncate: no correction).",
    )
    rollout_is_gating: Literal[ROLLOUT_IS_GATINGS] = option(
        "ratio", "mode=mask: the statistic kept in the band: the ratio, or the binary_kl or tv divergence (OpenRLHF)."
    )
    rollout_is_seq_ratio: Literal[ROLLOUT_IS_SEQ_RATIOS] = option(
        "product", "A sequence's ratio: the product of its token ratios (verl, TRL) or their geometric_mean (OpenRLHF)."
    )
    rollout_is_weight: Literal[ROLLOUT_IS_WEIGHTS] = option(
        "unit",
        "mode=mask: the kept units' weight: unit (its ratio, TRL), token (each token's ratio, OpenRLHF), none (1).",
    )
    rollout_rs: Literal[ROLLOUT_RS] | None = option(
        None, "verl's rejection: a KL estimator of lp_old - lp_rollout per token, or its sum/mean/max per sequence; "
        "above rollout_rs_max the token or sequence leaves the mask.",
    )
    rollout_rs_min: float | None = option(
        None, "rollout_rs *_k1: lower bound of the ratio (default 1 / rollout_rs_max).", positive=True
    )
    rollout_rs_max: float | None = option(None, "rollout_rs: the threshold (verl rollout_rs_threshold).", positive=True)
    off_policy_mask_threshold: float | None = option(
        None, "DeepSeek-V3.2's off-policy mask (TRL): drop the policy term of A < 0 tokens in sequences whose mean "
        "lp_rollout - lp exceeds it.",
    )
    rollout: Literal["flat", "tree"] = option(
        "flat",
        "flat: num_generations independent samples per prompt; tree: a tree of num_generations leaves per prompt "
        "that share prefixes, with TreeRL's per-token advantages (docs/reasoning.md).",
    )
    tree_initial: int = option(2, "rollout=tree: chains sampled whole per prompt before any branching.", positive=True)
    tree_points: int = option(3, "rollout=tree: branch points chosen per tree and round.", positive=True)
    tree_branches: int = option(2, "rollout=tree: continuations sampled from each branch point.", positive=True)
    tree_split: Literal["entropy", "line", "last_line"] = option(
        "entropy",
        "rollout=tree: branch at the highest-entropy tokens (entropy), only where a line begins (line), or only where "
        "a leaf's last line begins (last_line: resample a chain's answer).",
    )

    def validate(self) -> None:
        super().validate()
        loss_options = self.policy_loss_options()  # the kernel's own rules
        if loss_options.needs_rollout_logprobs and loss_options.rollout_is_mode == "truncate" and (
            loss_options.rollout_is_min is None and loss_options.rollout_is_cap is None
        ):
            name = "rollout_rs" if self.rollout_rs is not None else "off_policy_mask_threshold"
            raise ConfigError(
                f"option {name!r}: got {getattr(self, name)!r}, which reads the sampler's log-probs, and with them "
                "policy_loss also weighs the policy term by the unbounded ratio exp(lp_old - lp_rollout); set "
                "rollout_is_cap (a truncation; TRL's default is 3.0), or rollout_is_mode=mask with "
                "rollout_is_weight=none for no weight"
            )
        self._check_advantage()
        if self.rollout == "tree":
            if self.tree_initial > self.num_generations:
                raise ConfigError(
                    f"option 'tree_initial': got {self.tree_initial}, more than the num_generations="
                    f"{self.num_generations} leaves of a tree"
                )
            if self.advantage != "group":
                raise ConfigError(
                    f"option 'advantage': got {self.advantage!r}, but rollout=tree computes TreeRL's per-token "
                    "advantages from the tree (scale_rewards and advantage_eps scale the rewards); leave it group"
                )

    def policy_loss_options(self) -> PolicyLossOptions:
        """This config's ``fastpo.kernels.policy_loss`` options (``beta`` is ``kl_coef``,
        dr_grpo's length normalizer ``max_len`` the completion budget, TRL's
        ``max_completion_length``), validated by the kernel's own rules: a ConfigError
        naming the option when they refuse it."""
        own = {name: getattr(self, name) for name in PolicyLossOptions.field_names() if hasattr(self, name)}
        # max_len must be known before the options exist: the aggregation they resolve to.
        agg = self.agg or PRESET_AGG[self.loss_type]
        max_len = self.max_new_tokens if agg == "seq-mean-token-sum-norm" else None
        try:
            return PolicyLossOptions(**own, kl_coef=self.beta, max_len=max_len)
        except (TypeError, ValueError) as error:
            name = re.match(r"\w+", str(error)).group()
            raise ConfigError(f"option {'beta' if name == 'kl_coef' else name!r}: {error}") from None

    def _check_advantage(self) -> None:
        """The advantage estimator's own rules on the options it takes from this config
        (its registered ``options``), tried on a probe of two groups: a ConfigError naming
        the option it refuses, before any work."""
        variant = ADVANTAGE_ESTIMATORS.get(self.advantage)
        arguments, taken = variant.params["arguments"], variant.params["options"]
        if "log_sum_sq_probs" in arguments and (self.top_k or self.top_p < 1):
            raise ConfigError(
                f"option 'advantage': got {self.advantage!r}, which needs sum_v p_v**2 of the sampling distribution, "
                f"computed without top-k/top-p truncation only (top_k={self.top_k}, top_p={self.top_p}); set top_k=0 "
                "and top_p=1"
            )
        options = {keyword: getattr(self, name) for keyword, name in taken.items()}
        try:
            variant.params["function"](
                *_estimator_probe(arguments, self.num_generations, len(self.rewards)), **options, backend="torch"
            )
        except (TypeError, ValueError) as error:
            keyword = re.match(r"\w*", str(error)).group()
            if keyword in taken:
                raise ConfigError(
                    f"option {taken[keyword]!r}: got {getattr(self, taken[keyword])!r} with advantage="
                    f"{self.advantage}: {error}"
                ) from None
            raise ConfigError(
                f"option 'advantage': got {self.advantage!r} with num_generations={self.num_generations}: {error}"
            ) from None


def _estimator_probe(arguments: tuple[str, ...], group_size: int, sources: int) -> list:
    """Valid inputs of two groups for the named arguments of an advantage estimator (the
    names of ``ADVANTAGE_ESTIMATORS``' ``arguments``)."""
    rows = 2 * group_size
    tokens = torch.zeros(rows, 2)
    inputs = {
        "rewards": torch.arange(rows, dtype=torch.float32), "group_size": group_size,
        "mask": torch.ones(rows, 2, dtype=torch.bool), "token_rewards": tokens, "values": tokens,
        "reward_components": torch.zeros(rows, sources), "baseline_rewards": torch.zeros(rows),
        "old_logprobs": tokens - 1.0, "log_sum_sq_probs": tokens - 1.0,
    }
    return [inputs[name] for name in arguments]


@dataclass
class PPOConfig(OnlineConfig):
    """Proximal Policy Optimization with a value function and the RLHF reward shaping of
    InstructGPT (per-token -beta*KL, the score on the last token), optionally PPO-ptx."""

    learning_rate: float = option(3e-4, "Peak learning rate of AdamW.", positive=True)
    steps: int = option(150, "Optimizer steps to run.", positive=True)
    eval_every: int = option(25, "Evaluate on held-out data every N steps (0: only at the end).", minimum=0)
    batch_size: int = option(64, "Completions per micro-batch.", positive=True)
    prompts_per_rollout: int = option(128, "Prompts sampled per rollout.", positive=True)
    num_generations: int = option(1, "Completions sampled per prompt.", positive=True)
    num_iterations: int = option(2, "PPO epochs: passes of optimizer steps over each rollout.", positive=True)
    beta: float = option(
        0.05, "KL coefficient of the shaped reward -beta*KL per token (the initial one with kl_target).", minimum=0
    )
    kl_kind: KLKind = option(
        "k1", "KL estimator of the shaped reward's per-token KL (fastpo.kernels.kl_penalty; InstructGPT: k1)."
    )
    kl_target: float | None = option(
        None, "Adaptive KL controller (Ziegler et al.): target per-completion KL; none keeps beta fixed.", positive=True
    )
    kl_horizon: int = option(10000, "Adaptive KL controller horizon, in completions.", positive=True)
    gamma: float = option(1.0, "GAE discount, in [0, 1].", minimum=0)
    lam: float = option(0.95, "GAE lambda, in [0, 1].", minimum=0)
    whiten_advantages: bool = option(True, "Whiten the advantages over the rollout's completion tokens.")
    clip_eps: float = option(0.2, "Policy clip range: the ratio is clipped to [1 - clip_eps, 1 + clip_eps].", positive=True)
    vf_coef: float = option(0.1, "Weight of the value loss.", minimum=0)
    value_clip: float | None = option(
        0.2, "Value clip range around the rollout's values; none: the unclipped squared error.", positive=True
    )
    entropy_coef: float = option(0.0, "Entropy bonus coefficient.", minimum=0)
    critic: str | None = option(
        None, "Separate critic: a one-label sequence-classification checkpoint folder; none: a value head on the policy."
    )
    ptx_data: str | None = option(
        None, "PPO-ptx pretraining text: builtin:addition (the task's SFT demonstrations) or a .jsonl/.parquet "
        "file of text rows; none: no ptx term.",
    )
    ptx_coef: float = option(
        0.0, "PPO-ptx coefficient: loss = ppo_loss - ptx_coef * mean log p(pretraining tokens).", minimum=0
    )

    def validate(self) -> None:
        super().validate()
        _check_unit_interval("gamma", self.gamma)
        _check_unit_interval("lam", self.lam)
        if self.ptx_coef > 0 and self.ptx_data is None:
            raise ConfigError(f"option 'ptx_coef': got {self.ptx_coef!r}, but ptx_data is none; set ptx_data too")
        if self.ptx_data is not None and self.ptx_coef == 0:
            raise ConfigError(f"option 'ptx_data': got {self.ptx_data!r}, but ptx_coef is 0; set ptx_coef > 0")
        if self.ptx_data is not None and self.ptx_data.startswith("builtin:") and self.ptx_data != BUILTIN_DATA:
            raise ConfigError(
                f"option 'ptx_data': got {self.ptx_data!r}; expected {BUILTIN_DATA} or a .jsonl/.parquet file"
            )


_NO_ADAMW = "trpo makes no AdamW step (its step is the natural gradient, sized by max_kl)"


@dataclass
class TRPOConfig(RolloutOptions, RunConfig):
    """Trust Region Policy Optimization: per rollout, the natural-gradient step on the surrogate
    mean(r*A) that keeps the mean KL(old || new) <= max_kl (no AdamW step: the AdamW options
    learning_rate, weight_decay, warmup_steps, lr_schedule and max_grad_norm, and
    grad_accum_steps and num_iterations, do not apply and are refused)."""

    steps: int = option(60, "Rollouts to run, one TRPO update each.", positive=True)
    eval_every: int = option(10, "Evaluate on held-out data every N steps (0: only at the end).", minimum=0)
    batch_size: int = option(
        64, "Completions per forward pass of the update (the whole rollout is one step).", positive=True
    )
    prompts_per_rollout: int = option(32, "Prompts sampled per rollout.", positive=True)
    scale_rewards: Literal["group", "batch", "none"] = option(
        "group", "Std that divides the group-centered rewards (the advantage): group, batch, none."
    )
    advantage_eps: float = option(1e-4, "Added to the std of the advantage.", minimum=0)
    advantage: Literal["group", "tree"] = option(
        "tree", "Advantage: tree (TreeRL's per-token advantage over the prefixes that the group's completions share, "
        "of the scaled rewards) or group (the completion's group z-score on each of its tokens).",
    )
    max_kl: float = option(0.04, "Trust region delta: mean KL(old || new) over completion tokens <= max_kl.", positive=True)
    cg_iters: int = option(
        1, "Conjugate-gradient iterations for the direction H^-1 g (1: the preconditioned gradient).", positive=True
    )
    cg_damping: float = option(0.1, "Damping added to the KL Hessian: (H + cg_damping I) d = g.", minimum=0)
    cg_preconditioner: Literal["gradient_rms", "none"] = option(
        "gradient_rms", "Conjugate gradient's diagonal preconditioner: gradient_rms (the root mean square of the "
        "updates' gradients so far, Adam's second moment) or none.",
    )
    fisher_every: int = option(
        8, "Conjugate gradient's KL-Hessian products on every N-th completion of the rollout (1: all).", positive=True
    )
    backtrack_factor: float = option(
        0.5, "Line search: each try shrinks the step by this factor, in (0, 1).", positive=True
    )
    line_search_tries: int = option(
        10, "Line search: steps tried at most (the full step first); none kept: no step.", positive=True
    )

    NOT_APPLICABLE = {
        "learning_rate": _NO_ADAMW,
        "weight_decay": _NO_ADAMW,
        "warmup_steps": _NO_ADAMW,
        "lr_schedule": _NO_ADAMW,
        "max_grad_norm": _NO_ADAMW,
        "grad_accum_steps": "trpo takes one update per rollout, the whole rollout one step (batch_size cuts "
                            "it into forward passes)",
        "num_iterations": "trpo takes one update per rollout (one pass)",
    }

    def validate(self) -> None:
        super().validate()
        self._check_rollouts()
        if not self.backtrack_factor < 1:
            raise ConfigError(f"option 'backtrack_factor': got {self.backtrack_factor}; expected a value in (0, 1)")


@dataclass
class RLAIFConfig(BaseConfig):
    """RL from AI feedback: a judge model labels pairs of the policy's own samples (both
    presentation orders averaged), and the labelled pairs train the policy (then=dpo) or a
    reward model and then ppo (then=reward+ppo). steps, batch_size, learning_rate and the other
    loop options are the training stage's."""

    steps: int | None = option(
        None, "Optimizer steps of the training stage; none: 300 for ppo (twice ppo's own), dpo's 200.", positive=True
    )
    batch_size: int | None = option(
        None, "Micro-batch of the training stage; none: the stage's default (ppo 64 completions, dpo 16 pairs).",
        positive=True,
    )
    learning_rate: float | None = option(
        None, "Peak learning rate of the training stage's AdamW; none: 5e-5 for ppo (a sixth of ppo's own), 2e-4 "
        "for dpo (twice dpo's own).",
        positive=True,
    )
    judge: str | None = option(
        None, "Judge: a local causal LM checkpoint folder; none: a builtin:tiny judge trained by sft on the "
        "built-in task's judgement rows (cached beside the warm starts, linked from output_dir/judge).",
    )
    judge_steps: int = option(2500, "SFT steps of the built-in judge.", positive=True)
    judge_template: str = option(
        "Q: {prompt}? A: {a} B: {b}. Better:",
        "Judge prompt; the judge's next token (after its reasoning, with judge_reasoning), A or B, names the better "
        "response.",
    )
    judge_reasoning: bool | None = option(
        None, "Judge reasons before its label: it greedily writes up to its first ', so ' (appended when it writes "
        "none within 32 tokens) and the label A or B is read next; none: true for the built-in judge (trained to "
        "solve the problem and restate answer A first, ' 12+34=46, A: 47, so B'), false for judge=PATH (the label "
        "right after the prompt) unless the folder is a built-in judge fastpo trained (its fastpo_judge.json says how it "
        "answers).",
    )
    num_prompts: int | None = option(
        None, "Prompts whose sampled responses the judge labels; none: 4096 for reward+ppo (a reward model needs more "
        "pairs), 1024 for dpo.", positive=True,
    )
    samples_per_prompt: int = option(
        4, "Responses sampled per prompt; the judge compares every two distinct ones and the pair of the best- and "
        "worst-scoring (summed win probabilities) trains.", minimum=2,
    )
    temperature: float = option(1.0, "Sampling temperature of the responses.", positive=True)
    max_new_tokens: int = option(8, "Response budget in tokens.", positive=True)
    judge_confidence: float = option(
        0.75, "Least judge probability of the chosen response that a labelled pair needs to train; 0.5: every pair "
        "(the built-in judge's pairs of two wrong answers are near 0.5).",
    )
    then: Literal["reward+ppo", "dpo"] = option(
        "reward+ppo", "What the labelled pairs train: a reward model then ppo (RLAIF's pipeline), or dpo."
    )
    beta: float | None = option(
        None, "dpo's beta (then=dpo), or ppo's KL coefficient (then=reward+ppo); none: 0.1 for dpo, 2 for ppo "
        "(ppo's own default, 0.05, let it chase the reward model's errors: docs/online-rl.md).", positive=True,
    )
    reward_steps: int = option(1600, "Steps of the reward model on the labelled pairs (then=reward+ppo).", positive=True)
    reward_learning_rate: float = option(
        1e-3, "Peak learning rate of the reward model on the labelled pairs (then=reward+ppo); reward's own 3e-4 left "
        "it ordering a quarter of the policy's own samples wrong.", positive=True
    )
    rpo_alpha: float = option(
        1.0, "dpo's rpo_alpha (then=dpo): the weight of the chosen response's NLL per token in each pair's loss.",
        minimum=0,
    )

    def validate(self) -> None:
        super().validate()
        if not 0.5 <= self.judge_confidence < 1.0:
            raise ConfigError(
                f"option 'judge_confidence': got {self.judge_confidence!r}; expected a value in [0.5, 1) (the judge "
                "probability of the chosen response is above 0.5)"
            )
        for field_name in ("{prompt}", "{a}", "{b}"):
            if field_name not in self.judge_template:
                raise ConfigError(f"option 'judge_template': got {self.judge_template!r}, which lacks {field_name}")
        if self.judge is None and self.data != BUILTIN_DATA:
            raise ConfigError(
                f"option 'judge': none trains the built-in judge on {BUILTIN_DATA}, but data is {self.data!r}; "
                "give a judge checkpoint folder"
            )


def _check_unit_interval(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"option {name!r}: got {value!r}; expected a value in [0, 1]")


# The one table of algorithms: name -> config class; the algorithm's code is the module
# fastpo.engine.algorithms.<name> (its run(config, warm_start=None)).
ALGORITHMS: dict[str, type[RunConfig]] = {
    "sft": SFTConfig,
    "reward": RewardConfig,
    "dpo": DPOConfig,
    "ipo": IPOConfig,
    "kto": KTOConfig,
    "grpo": GRPOConfig,
    "ppo": PPOConfig,
    "trpo": TRPOConfig,
    "rlaif": RLAIFConfig,
}


def config_class(algorithm: str) -> type[RunConfig]:
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
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])} (comma-separated)"
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
                if typing.get_origin(member) is list and isinstance(value, (str, list, tuple)):
                    raise  # a list with a bad element: that element's error is the precise one
                continue
        raise _type_error(key, value, tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        raise _type_error(key, value, tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):  # key=value overrides: a comma-separated list
            value = [part.strip() for part in value.split(",")] if value.strip() else []
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, value, tp)
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
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
            reason = getattr(type(config), "NOT_APPLICABLE", {}).get(key)
            if reason is not None:
                raise ConfigError(f"option {dotted!r}: got {value!r}, but {reason}; leave it out")
            raise ConfigError(
                f"unknown option {dotted!r} for {root_cls.__name__}"
                f"{_suggestion(dotted, _flat_keys(root_cls))}"
            )
        tp = types_[key]
        if dataclasses.is_dataclass(tp):
            if isinstance(value, tp):  # a section given as its dataclass (from Python)
                value = dataclasses.asdict(value)
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
    """A ``cls`` instance from defaults, then the defaults of the built-in task that its
    ``data`` will name (``tasks.CONFIG_DEFAULTS``: countdown's completion budget), then
    ``mapping`` (nested dicts), then overrides.

    Args:
        cls: a config dataclass, for example ``DPOConfig``.
        mapping: option values, sections as nested dicts (a parsed YAML file).
        overrides: ``"key=value"`` strings; a dotted key reaches into a section.
    """
    config = cls()
    if mapping is not None and not isinstance(mapping, dict):
        raise ConfigError(f"a config must be a mapping of options, got {type(mapping).__name__}")
    overrides = list(overrides)
    # The task named by data sets its defaults first (engine/tasks.py), so the user's values win.
    data = next((value for key, _, value in (item.partition("=") for item in reversed(overrides))
                 if key.strip() == "data"), (mapping or {}).get("data", getattr(config, "data", None)))
    own = _field_types(cls)
    defaults = config_defaults(str(data), _algorithm_of(cls))
    _apply(config, {key: value for key, value in defaults.items() if key in own}, "", cls)
    if mapping is not None:
        _apply(config, mapping, "", cls)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        _apply(config, _nest(key.strip(), value), "", cls)
    if hasattr(config, "validate"):
        config.validate()  # the rules between options, once every value is set
    return config


def _algorithm_of(cls) -> str | None:
    return next((name for name, known in ALGORITHMS.items() if known is cls), None)


def load_config(algorithm: str, config_file: str | Path | None = None, overrides=(), cls: type | None = None):
    """The validated config of ``algorithm`` (of class ``cls``, by default the
    algorithm's) from an optional YAML file and ``key=value`` overrides.

    Later sources win: defaults, then the data task's defaults (``engine/tasks.py``),
    then the file, then the overrides in order.
    """
    cls = cls or config_class(algorithm)
    mapping = None
    if config_file is not None:
        import yaml

        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        with path.open() as f:
            try:
                mapping = yaml.safe_load(f)
            except yaml.YAMLError as error:
                raise ConfigError(f"config file {str(path)!r} is not valid YAML ({' '.join(str(error).split())})") from None
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
        if default is None:
            shown = "none"
        elif isinstance(default, bool):
            shown = str(default).lower()
        elif isinstance(default, list):
            shown = ",".join(str(v) for v in default)
        else:
            shown = str(default)
        rows.append((prefix + f.name, _type_name(tp), shown, f.metadata.get("doc", "")))
    return rows


def format_help(algorithm: str, cls: type | None = None) -> str:
    """The ``fastpo <algorithm> --help`` text: every option with type, default and doc
    (``cls``: the config class, by default the algorithm's), then the defaults each
    built-in task changes."""
    cls = cls or config_class(algorithm)
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
    own = _field_types(cls)
    for task in BUILTIN_TASKS if "data" in own else ():
        changed = {key: value for key, value in config_defaults(task, _algorithm_of(cls)).items() if key in own}
        if changed:
            shown = " ".join(f"{key}={','.join(map(str, v)) if isinstance(v, list) else v}"
                             for key, v in changed.items())
            lines += ["", f"data={task} changes the defaults: {shown}"]
    return "\n".join(lines) + "\n"
