"""Rollouts for the online algorithms: sampled completions with their log-probs, and rewards.

``sample_completions`` runs Hugging Face ``generate`` (KV cache, batched, left-padded
prompts) with temperature, top-p, top-k, a token budget and stop strings, and returns
the samples laid out exactly as ``forward.encode_responses`` lays out training rows
(``[bos] prompt completion``, right-padded, ``labels`` shifted), so the training forward
reads the sampled tokens themselves, never a re-tokenization of their text.

The rollout log-prob of a sampled token is its log-probability under the distribution
``generate`` drew it from: ``log_softmax(logits / temperature)`` with top-k/top-p
truncation renormalized over the kept set (``fastpo.kernels.token_logprobs(...,
top_k=, top_p=)``, HF's conventions), recorded step by step as ``generate`` samples
(never the whole ``(B, steps, V)`` logits), from the logits its temperature starts from.
Without top-k/top-p it equals the training forward's ``linear_token_logprobs(...,
temperature=)``; with them the training forward gives the same quantity when passed the
same ``top_k``/``top_p`` (``forward.response_logprobs``), and otherwise differs by the log
of the kept mass. The two can be compared token by token: the mismatch is a metric and
can feed the rollout correction of ``policy_loss``.

A completion ends at its first eos (kept: the policy learns to stop), at the end of its
first stop string (the tokens up to the one that completes it), or after
``max_new_tokens`` tokens (truncated).

Rewards: ``reward_function(specs, weights)`` combines reward sources, each called as
``fn(prompts, completions, **row_fields) -> list of floats``: a built-in task's name
(``builtin:addition``, ``builtin:countdown``: the task's verifier, ``tasks.BUILTIN_TASKS``),
``module:function`` (a Python callable), or the path of a reward
model checkpoint (a one-label ``AutoModelForSequenceClassification``, as ``fastpo
reward`` saves).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from fastpo.kernels import token_logprobs as kernel_token_logprobs
from .forward import IGNORE_INDEX, cut_at_stop, encode_prompts, generation_pad_id, prompt_width
from .tasks import BUILTIN_TASKS, builtin_task

__all__ = ["RewardSources", "Rollout", "check_reward_source", "concatenate_rollouts", "continue_prefixes",
           "reward_function", "rollout_from_tokens", "sample_completions"]


@dataclass
class Rollout:
    """Sampled completions, one row per sample.

    Attributes:
        prompts, completions: the texts (completions decoded without special tokens,
            cut at the stop string).
        input_ids, attention_mask, labels: (B, T) int64 training layout of
            ``encode_responses``; ``labels[t]`` is the sampled token predicted at ``t``
            or ``IGNORE_INDEX``.
        rollout_logprobs: (B, T) float32 log-probs of ``labels`` at sampling time, 0
            where ``labels`` is ignored.
        truncated: (B,) bool, the completion hit ``max_new_tokens`` without ending.
    """

    prompts: list[str]
    completions: list[str]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    rollout_logprobs: torch.Tensor
    truncated: torch.Tensor

    @property
    def mask(self) -> torch.Tensor:
        return self.labels != IGNORE_INDEX


def _completion_length(tokens: list[int], tokenizer, eos: int | None, stop_strings: list[str]) -> tuple[int, bool]:
    """``(length, ended)``: how many of ``tokens`` the completion keeps, and whether it
    ended (eos or stop string) rather than ran out of tokens."""
    ended = eos is not None and eos in tokens
    end = tokens.index(eos) + 1 if ended else len(tokens)
    if stop_strings:
        # The shortest prefix whose text holds a stop string ends the completion.
        for length in range(1, end + 1):
            text = tokenizer.decode(tokens[:length], skip_special_tokens=True)
            if any(stop in text for stop in stop_strings):
                return length, True
    return end, ended


class _SampledTokenLogprobs:
    """A ``generate`` logits processor that records the log-prob of each sampled token
    under the sampling distribution (temperature, then top-k/top-p renormalized) without
    keeping the ``(B, steps, V)`` logits (``output_logits`` would: hundreds of GB for a
    real rollout on a 150k vocabulary). Custom processors run before ``generate``'s
    temperature, top-k and top-p, so it sees the logits those start from; the token
    sampled at one step is the last input id of the next call."""

    def __init__(self, temperature: float, top_k: int = 0, top_p: float = 1.0):
        self.temperature = temperature
        self.top_k = top_k if top_k > 0 else None
        self.top_p = top_p
        self.previous: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []
        self.truncated = self.top_k is not None or top_p < 1.0

    def _record(self, sampled: torch.Tensor) -> None:
        if self.truncated:
            lp = kernel_token_logprobs(
                self.previous, sampled, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
            )
        else:
            lp = self.previous.gather(-1, sampled[:, None]).squeeze(-1)
        self.steps.append(lp)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.previous is not None:
            self._record(input_ids[:, -1])
        if self.truncated:
            # a copy: the processors after this one may write to scores in place
            self.previous = scores.to(torch.float32, copy=True)
        else:
            # Without truncation the whole distribution is the sampling one: one eager
            # log_softmax per step is cheaper than a kernel call per step (its argument
            # checks cost more than the work at a rollout's (B, V)).
            self.previous = (scores.float() / self.temperature).log_softmax(-1)
        return scores

    def finish(self, sequences: torch.Tensor, generated: int) -> torch.Tensor:
        """``(B, generated)`` float32 log-probs of the sampled tokens."""
        if len(self.steps) < generated:
            self._record(sequences[:, -1])
        return torch.stack(self.steps, dim=1).cpu()


@torch.no_grad()
def sample_completions(
    model,
    tokenizer,
    prompts: list[str],
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    max_new_tokens: int = 16,
    stop_strings: list[str] = (),
    max_length: int | None = None,
    prompt_token_ids: list[list[int]] | None = None,
) -> Rollout:
    """One sampled completion per prompt (repeat a prompt G times for G samples); the
    global torch RNG draws the samples, so a seeded run (and a resumed one, whose
    checkpoint holds the RNG state) draws the same ones.

    Args:
        temperature: > 0; 1 samples the model's distribution.
        top_p: nucleus mass in (0, 1]; 1 disables.
        top_k: keep the k most likely tokens; 0 disables.
        max_new_tokens: completion budget in tokens.
        stop_strings: a completion ends after the token that completes one of them.
        max_length: prompts longer than this minus ``max_new_tokens`` are an error
            (the training rows would be cut).
        prompt_token_ids: each prompt's tokens (bos included) in place of the encoded
            ``prompts``: a tree rollout continues a sampled prefix from its own tokens,
            never from a re-tokenization of their text.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = generation_pad_id(tokenizer)
    if prompt_token_ids is None:
        encoded = encode_prompts(tokenizer, prompts)
    elif len(prompt_token_ids) != len(prompts):
        raise ValueError(f"got {len(prompt_token_ids)} prompt_token_ids for {len(prompts)} prompts")
    else:
        encoded = [list(ids) for ids in prompt_token_ids]
    width = prompt_width(encoded, max_new_tokens, max_length)
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded], device=device)
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
    from transformers import LogitsProcessorList

    recorder = _SampledTokenLogprobs(temperature, top_k, top_p)
    sequences = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        logits_processor=LogitsProcessorList([recorder]),
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k if top_k > 0 else None,
        max_new_tokens=max_new_tokens,
        stop_strings=list(stop_strings) or None,
        tokenizer=tokenizer if stop_strings else None,
        pad_token_id=pad,
        eos_token_id=eos,
    )
    model.train(was_training)
    sampled = sequences[:, width:].cpu()
    token_logprobs = recorder.finish(sequences, sampled.shape[1])

    rows, row_logprobs, texts, truncated = [], [], [], []
    for i, ids in enumerate(encoded):
        tokens = sampled[i].tolist()
        length, ended = _completion_length(tokens, tokenizer, eos, list(stop_strings))
        rows.append((ids, tokens[:length]))
        row_logprobs.append(token_logprobs[i, :length])
        text = tokenizer.decode(tokens[:length], skip_special_tokens=True)
        texts.append(cut_at_stop(text, stop_strings))
        truncated.append(not ended)
    return rollout_from_tokens(list(prompts), texts, rows, row_logprobs, truncated, pad)


def continue_prefixes(
    model,
    tokenizer,
    prompts: list[str],
    heads: list[list[int]],
    prefixes: list[list[int]],
    *,
    budget: int,
    **sampling,
) -> list[tuple[list[int], torch.Tensor, bool]]:
    """A sampled continuation of each prompt's completion prefix (``heads``: the prompts'
    tokens, bos included; ``prefixes``: tokens already sampled after them), one
    ``generate`` call for all, the prefix prefilled from its own tokens: per request,
    ``(new tokens, their sampling log-probs, truncated)``, prefix and continuation
    together at most ``budget`` tokens. ``sampling``: ``sample_completions``' options."""
    rollout = sample_completions(
        model, tokenizer, prompts, max_new_tokens=budget - min(len(prefix) for prefix in prefixes),
        prompt_token_ids=[head + prefix for head, prefix in zip(heads, prefixes)], **sampling,
    )
    out = []
    for row, prefix in enumerate(prefixes):
        kept = rollout.mask[row]
        tokens, logprobs = rollout.labels[row][kept].tolist(), rollout.rollout_logprobs[row][kept]
        room = budget - len(prefix)  # a longer prefix leaves less room than the call's budget
        out.append((tokens[:room], logprobs[:room], bool(rollout.truncated[row]) or len(tokens) > room))
    return out


def rollout_from_tokens(
    prompts: list[str],
    completions: list[str],
    rows: list[tuple[list[int], list[int]]],
    row_logprobs: list[torch.Tensor],
    truncated: list[bool],
    pad: int,
) -> Rollout:
    """The ``Rollout`` of ``rows``, each ``(prompt tokens with bos, completion tokens)``,
    with each completion token's sampling log-prob (``row_logprobs``, one (m,) tensor a
    row): the training layout of ``forward.encode_responses``."""
    seq_width = max(len(head) + len(tail) for head, tail in rows)
    batch_ids = torch.full((len(rows), seq_width), pad, dtype=torch.long)
    batch_mask = torch.zeros((len(rows), seq_width), dtype=torch.long)
    labels = torch.full((len(rows), seq_width), IGNORE_INDEX, dtype=torch.long)
    rollout_logprobs = torch.zeros((len(rows), seq_width), dtype=torch.float32)
    for i, ((head, tail), lps) in enumerate(zip(rows, row_logprobs)):
        n, m = len(head), len(tail)
        batch_ids[i, : n + m] = torch.tensor(head + tail, dtype=torch.long)
        batch_mask[i, : n + m] = 1
        # Position t predicts token t + 1: the completion's tokens are predicted from
        # positions n - 1 .. n + m - 2.
        labels[i, n - 1 : n + m - 1] = torch.tensor(tail, dtype=torch.long)
        rollout_logprobs[i, n - 1 : n + m - 1] = lps
    return Rollout(list(prompts), completions, batch_ids, batch_mask, labels, rollout_logprobs, torch.tensor(truncated))


def concatenate_rollouts(parts: list[Rollout], pad_token_id: int) -> Rollout:
    """``parts`` one after the other in one ``Rollout``, each right-padded to the widest
    part's length (``pad_token_id``, attention 0, ignored labels): the rollout of a
    multi-process run, whose ranks each sample a share of the prompts."""
    width = max(part.input_ids.shape[1] for part in parts)

    def padded(name: str, value) -> torch.Tensor:
        return torch.cat([
            torch.nn.functional.pad(getattr(part, name), (0, width - part.input_ids.shape[1]), value=value)
            for part in parts
        ])

    return Rollout(
        [p for part in parts for p in part.prompts],
        [c for part in parts for c in part.completions],
        padded("input_ids", pad_token_id),
        padded("attention_mask", 0),
        padded("labels", IGNORE_INDEX),
        padded("rollout_logprobs", 0.0),
        torch.cat([part.truncated for part in parts]),
    )


# ---------------------------------------------------------------- rewards


def _callable_reward(spec: str) -> Callable:
    module_name, _, name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"reward {spec!r}: cannot import module {module_name!r} ({error})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"reward {spec!r}: module {module_name!r} has no callable {name!r}")
    return fn


def _reward_model(path: str) -> Callable:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True).eval()
    if model.config.num_labels != 1:
        raise ValueError(f"reward model {path!r} has {model.config.num_labels} labels; a reward model has 1")

    @torch.no_grad()
    def score(prompts, completions, **_):
        from .forward import encode_responses

        batch = encode_responses(tokenizer, prompts, completions, tokenizer.model_max_length)
        device = next(model.parameters()).device
        out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        return out.logits[:, 0].float().cpu().tolist()

    return score


def _reward_source(spec: str, tasks: dict) -> Callable:
    kind, function = _reward_kind(spec)
    if kind == "builtin":
        return (tasks.get(spec) or builtin_task(spec)).reward
    return _reward_model(spec) if kind == "model" else function


def check_reward_source(spec: str) -> str:
    """The kind of reward source ``spec`` names: ``"builtin"``, ``"model"`` (a folder) or
    ``"callable"`` (``module:function``, imported to check it); a ValueError naming the
    spec otherwise. Loads no model: a run checks its rewards with it before its own
    model loads."""
    return _reward_kind(spec)[0]


def _reward_kind(spec: str) -> tuple[str, Callable | None]:
    """``check_reward_source``'s kind and, for a ``"callable"``, the function it imported
    (None for the others)."""
    if spec in BUILTIN_TASKS:
        return "builtin", None
    if Path(spec).is_dir():
        return "model", None
    if ":" in spec and not spec.startswith("builtin:"):
        return "callable", _callable_reward(spec)
    raise ValueError(
        f"reward {spec!r} is not a built-in task ({', '.join(BUILTIN_TASKS)}), a module:function callable or a "
        "reward model folder"
    )


def reward_function(
    specs: list[str], weights: list[float] | None = None, tasks: dict | None = None
) -> RewardSources:
    """``rewards(prompts, completions, rows) -> (B,) float32``: the weighted sum of the
    sources ``specs`` (weights default to 1 each); ``rows`` are the dataset rows, whose
    fields other than ``prompt`` reach each source as keyword lists. A built-in task's
    source is the verifier of ``tasks[name]`` (a run's task with its settings: its
    partial credit, its rules) when given, else of the task's defaults. Its
    ``components(prompts, completions, rows)`` are the sources' own rewards, (B, K)."""
    if not specs:
        raise ValueError("at least one reward source is needed")
    weights = [1.0] * len(specs) if weights is None else list(weights)
    if len(weights) != len(specs):
        raise ValueError(f"got {len(weights)} reward weights for {len(specs)} reward sources")
    return RewardSources(list(specs), weights, tasks or {})


class RewardSources:
    """The reward sources of ``reward_function``: called, the weighted sum of their rewards;
    ``components`` the rewards of each source unweighted (a column each, in ``specs``
    order: GDPO normalizes them one by one), ``combine`` their weighted sum."""

    def __init__(self, specs: list[str], weights: list[float], tasks: dict):
        self.specs = specs
        self.weights = torch.tensor(weights, dtype=torch.float32)
        self._sources = [_reward_source(spec, tasks) for spec in specs]

    def components(self, prompts: list[str], completions: list[str], rows: list[dict]) -> torch.Tensor:
        fields = {key: [row.get(key) for row in rows] for key in (rows[0] if rows else {}) if key != "prompt"}
        columns = []
        for spec, source in zip(self.specs, self._sources):
            values = torch.as_tensor(source(prompts, completions, **fields), dtype=torch.float32)
            if values.shape != (len(prompts),):
                raise ValueError(f"reward {spec!r} returned {tuple(values.shape)} values for {len(prompts)} completions")
            if not torch.isfinite(values).all():
                raise ValueError(f"reward {spec!r} returned a non-finite value")
            columns.append(values)
        return torch.stack(columns, dim=1)

    def combine(self, components: torch.Tensor) -> torch.Tensor:
        """(B,) the weighted sum of (B, K) ``components``."""
        return (components * self.weights).sum(-1)

    def __call__(self, prompts: list[str], completions: list[str], rows: list[dict]) -> torch.Tensor:
        return self.combine(self.components(prompts, completions, rows))
