"""Inference strategies for reasoning tasks: answer directly, think in a chain, vote over
chains, or search a tree of thoughts.

A *state* is a problem's prompt and the lines (thoughts) written so far; a line that is
the task's answer ends the chain. The strategies:

==================  ==================================================================
``direct``          the answer alone, greedy, from the task's direct prompt
``cot``             one greedy chain of thought
``self_consistency`` ``samples`` sampled chains, majority vote on the canonical answer;
                    a tie goes to the answer whose first vote came first
``tot_bfs``         Tree-of-Thought breadth first: each open state of the frontier
                    proposes ``proposals`` sampled next lines, every new state is valued,
                    the ``breadth`` best (stable order on ties) make the next frontier,
                    for at most the chain's length in lines; the best state is then
                    finished greedily when it has no answer yet
``tot_dfs``         Tree-of-Thought depth first: expand the most valuable child first,
                    prune children valued below ``threshold``, backtrack when a state's
                    children are all pruned, stop at the first answer valued at or above
                    the threshold or after ``node_budget`` expansions (then the best
                    state seen, deepest on ties, is finished greedily)
==================  ==================================================================

The value of a state (``value=``): ``"self"``, the model's own judgement of the state
(the task's value prompt, e.g. ``"8 9 24 to 24 value:"``, scored against each label
``sure``/``likely``/``impossible`` by teacher forcing; the value is the labels' values
weighted by their probabilities, normalized over the three), which the model learns from
the solver-labelled rows of the task's SFT data; or ``"verifier"``, the task's check of
the state (an answered chain: 1 when correct, else 0; before the answer: 0.5 while every
step is valid, else 0), which costs no model call; or ``"self_checked"``, the model's
judgement where the verifier finds every step valid, else 0, and the verifier's
outcome on an answered chain; or ``"head"``, a learned value head: ``sigmoid(score)``
of a separate value model (``fastpo reward target=states``: a score head trained by
binary cross-entropy on the task's solver-labelled states) on the same value prompt,
the probability that the state can still reach the answer; or ``"head_checked"``, the
head where the verifier finds every step valid, as ``"self_checked"``. A state with a
step line that does not parse is worth 0 under all five.

Proposals are one Hugging Face ``generate`` call (KV cache) for the whole frontier of
every problem at once (each state repeated ``proposals`` times, each line stopped at its
newline); the self-evaluation is one teacher-forced forward for all states (through the
fused ``linear_token_logprobs``). Both run in chunks of ``batch_size`` rows. Per problem
the strategies count the generated tokens (eos included), the model calls it took part
in (one per batched call, however many of its states the call held) and the states the
model valued; ``evaluate_strategy`` reports them with the accuracy and the wall time
as a JSON-ready dict, and ``format_table`` lays several out as a Markdown table.

``fastpo reason`` (``ReasonConfig``, ``reason``) runs the strategies on a task's held-out
problems with a trained model: one JSON line per strategy on stdout (and in ``output``),
the table on stderr.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal, Protocol, Sequence

import torch

from .config import ConfigError, CountdownOptions, check_task_sections, option
from .forward import encode_responses, response_logprobs
from .rollout import sample_completions

__all__ = [
    "HEAD_VALUES",
    "STRATEGIES",
    "VALUES",
    "LanguageModelReasoner",
    "ReasonConfig",
    "ReasoningOptions",
    "State",
    "evaluate_strategy",
    "format_table",
    "majority_vote",
    "reason",
    "run_strategy",
    "tot_bfs",
    "tot_dfs",
]

STRATEGIES = ("direct", "cot", "self_consistency", "tot_bfs", "tot_dfs")
VALUES = ("self", "verifier", "self_checked", "head", "head_checked")
# The values that read a value model (the reasoner's ``value_model``).
HEAD_VALUES = ("head", "head_checked")


@dataclass(frozen=True)
class ReasoningOptions:
    """The knobs of the strategies, checked when made.

    Args:
        samples: chains sampled by ``self_consistency`` (>= 1).
        breadth: states kept per step by ``tot_bfs`` (>= 1).
        proposals: next lines sampled per expanded state by both searches (>= 1).
        value: one of ``VALUES`` (the module docstring says what each is).
        threshold: ``tot_dfs`` prunes children valued below it, in [0, 1].
        node_budget: most states ``tot_dfs`` expands per problem (>= 1).
        temperature: of the searches' proposed lines (> 0).
        chain_temperature: of ``self_consistency``'s sampled chains (> 0). Lower than the
            searches': a vote gains only when single samples are nearly as good as the
            greedy chain (docs/reasoning.md measures both).
        max_line_tokens: token budget of one proposed line (>= 1).
        max_chain_tokens: token budget of a whole chain or of its greedy finish (>= 1).
        batch_size: most rows per model call (>= 1).
    """

    samples: int = 15
    breadth: int = 5
    proposals: int = 4
    value: str = "self"
    threshold: float = 0.25
    node_budget: int = 16
    temperature: float = 1.0
    chain_temperature: float = 0.5
    max_line_tokens: int = 48
    max_chain_tokens: int = 192
    batch_size: int = 256

    def __post_init__(self):
        counts = ("samples", "breadth", "proposals", "node_budget", "max_line_tokens", "max_chain_tokens", "batch_size")
        for name in counts:
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ValueError(f"option {name!r}: got {value!r}; expected an integer >= 1")
        if self.value not in VALUES:
            raise ValueError(f"option 'value': got {self.value!r}; expected one of {', '.join(VALUES)}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"option 'threshold': got {self.threshold!r}; expected a value in [0, 1]")
        for name in ("temperature", "chain_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"option {name!r}: got {getattr(self, name)!r}; expected a value > 0")


@dataclass(frozen=True)
class State:
    """A partial chain: the index of its problem and the lines written so far (each
    without its newline)."""

    problem: int
    lines: tuple[str, ...] = ()

    def child(self, line: str) -> "State":
        return State(self.problem, self.lines + (line,))

    def completion(self, rest: str = "") -> str:
        """The chain as a completion of the problem's prompt, then ``rest``."""
        return "".join(line + "\n" for line in self.lines) + rest


class Reasoner(Protocol):
    """What the strategies ask of a model (``LanguageModelReasoner``, or a stub in tests)."""

    def is_final(self, state: State) -> bool: ...

    def propose(self, states: Sequence[State], k: int) -> list[list[str]]:
        """``k`` sampled next lines for each state."""

    def complete(self, states: Sequence[State], *, greedy: bool, samples: int = 1) -> list[list[str]]:
        """``samples`` continuations of each state to the end of its chain (text after
        the state's lines)."""


# ---------------------------------------------------------------- the strategies


def majority_vote(keys: Sequence[str | None]) -> int:
    """The index of the chain whose answer wins the vote: the most frequent key (None,
    an answer that does not parse, never votes); among tied keys the one that occurs
    first. 0 when no chain has a key."""
    counts = Counter(key for key in keys if key is not None)
    if not counts:
        return 0
    top = max(counts.values())
    return next(i for i, key in enumerate(keys) if key is not None and counts[key] == top)


def tot_bfs(
    roots: Sequence[State],
    reasoner: Reasoner,
    value: Callable[[list[State]], list[float]],
    *,
    breadth: int,
    proposals: int,
    depth: int,
) -> list[State]:
    """Breadth-first Tree-of-Thought over every root at once: the best state of each
    root's last frontier (sorted by value, stable on ties). Answered states stay in the
    frontier, unexpanded, and compete with the new ones; a state is valued once."""
    frontiers = [[root] for root in roots]
    values: dict[State, float] = {}
    for _ in range(depth):
        expand = [state for frontier in frontiers for state in frontier if not reasoner.is_final(state)]
        if not expand:
            break
        children = dict(zip(expand, reasoner.propose(expand, proposals)))
        candidates = []
        for frontier in frontiers:
            pool: dict[State, None] = {}  # ordered and without duplicates
            for state in frontier:
                if reasoner.is_final(state):
                    pool[state] = None
                else:
                    pool.update((state.child(line), None) for line in children[state])
            candidates.append(list(pool))
        new = [state for pool in candidates for state in pool if state not in values]
        values.update(zip(new, value(new)))
        # A root whose states proposed nothing keeps its frontier.
        frontiers = [
            sorted(pool, key=lambda s: -values[s])[:breadth] or frontier
            for pool, frontier in zip(candidates, frontiers)
        ]
    return [frontier[0] for frontier in frontiers]


@dataclass
class SearchTrace:
    """What ``tot_dfs`` did: the states it expanded, in order."""

    expanded: list[State] = field(default_factory=list)


def tot_dfs(
    root: State,
    reasoner: Reasoner,
    value: Callable[[list[State]], list[float]],
    *,
    proposals: int,
    threshold: float,
    budget: int,
    depth: int,
    trace: SearchTrace | None = None,
) -> State:
    """Depth-first Tree-of-Thought from ``root``: the first answered state valued at or
    above ``threshold``, else (budget spent or tree exhausted) the most valuable state
    seen, the deepest among equals."""
    trace = trace if trace is not None else SearchTrace()
    stack = [root]
    best, best_key = root, (-math.inf, 0)
    while stack and len(trace.expanded) < budget:
        state = stack.pop()
        trace.expanded.append(state)
        children = list(dict.fromkeys(state.child(line) for line in reasoner.propose([state], proposals)[0]))
        ranked = sorted(zip(children, value(children)), key=lambda pair: -pair[1])
        for child, v in ranked:
            if (v, len(child.lines)) > best_key:
                best, best_key = child, (v, len(child.lines))
        kept = [child for child, v in ranked if v >= threshold]
        answered = [child for child in kept if reasoner.is_final(child)]
        if answered:
            return answered[0]
        # The most valuable child on top of the stack: it is expanded next.
        stack.extend(reversed([child for child in kept if len(child.lines) < depth]))
    return best


# ---------------------------------------------------------------- the language model


class LanguageModelReasoner:
    """The ``Reasoner`` of a causal LM and a reasoning task over ``prompts`` (state
    ``problem`` indexes them), counting per problem the generated tokens, the model
    calls and the valued states.

    The task gives ``is_answer(line)``, ``state_numbers(prompt, lines)``,
    ``value_prompt(numbers, target)``, ``value_labels`` (label -> value),
    ``parse_prompt(prompt)``, ``partial_value(prompt, lines)``, ``answer_key(prompt,
    completion)`` and ``chain_length(prompt)`` (``countdown.CountdownTask`` does).
    """

    def __init__(self, model, tokenizer, task, prompts: Sequence[str], options: ReasoningOptions, value_model=None):
        self.model, self.tokenizer, self.task, self.options = model, tokenizer, task, options
        self.value_model = value_model  # (model, tokenizer) of value="head": reward.load_reward_model's
        self.prompts = list(prompts)
        self.tokens = [0] * len(self.prompts)
        self.calls = [0] * len(self.prompts)
        self.evaluations = [0] * len(self.prompts)

    def text(self, state: State) -> str:
        return self.prompts[state.problem] + state.completion()

    def is_final(self, state: State) -> bool:
        return bool(state.lines) and self.task.is_answer(state.lines[-1])

    def _generate(self, states: Sequence[State], *, greedy: bool, samples: int, one_line: bool) -> list[list[str]]:
        """``samples`` continuations per state; one line each (stopped at its newline) or
        the rest of the chain (stopped at eos). Greedy is top-k 1, which draws the
        argmax token."""
        o = self.options
        temperature = 1.0 if greedy else (o.temperature if one_line else o.chain_temperature)
        texts = [self.text(state) for state in states for _ in range(samples)]
        owners = [state.problem for state in states for _ in range(samples)]
        outputs: list[str] = []
        for start in range(0, len(texts), o.batch_size):
            rollout = sample_completions(
                self.model, self.tokenizer, texts[start : start + o.batch_size],
                temperature=temperature, top_k=1 if greedy else 0,
                max_new_tokens=o.max_line_tokens if one_line else o.max_chain_tokens,
                stop_strings=["\n"] if one_line else (),
            )
            chunk_owners = owners[start : start + o.batch_size]
            for owner, count in zip(chunk_owners, rollout.mask.sum(-1).tolist()):
                self.tokens[owner] += count
            for owner in set(chunk_owners):
                self.calls[owner] += 1
            outputs += rollout.completions
        return [outputs[i * samples : (i + 1) * samples] for i in range(len(states))]

    def propose(self, states: Sequence[State], k: int) -> list[list[str]]:
        return self._generate(states, greedy=False, samples=k, one_line=True)

    def complete(self, states: Sequence[State], *, greedy: bool, samples: int = 1) -> list[list[str]]:
        return self._generate(states, greedy=greedy, samples=samples, one_line=False)

    def _value_prompts(self, states: Sequence[State]) -> list[tuple[int, str]]:
        """``(index, value prompt)`` of the states whose step lines all parse."""
        asked = []
        for i, state in enumerate(states):
            prompt = self.prompts[state.problem]
            numbers = self.task.state_numbers(prompt, state.lines)
            if numbers is not None:
                asked.append((i, self.task.value_prompt(numbers, self.task.parse_prompt(prompt)[1])))
        return asked

    @torch.no_grad()
    def self_values(self, states: Sequence[State]) -> list[float]:
        """The model's judgement of each state (module docstring); 0 for a state with a
        step line that does not parse, without a model call."""
        labels = [" " + label for label in self.task.value_labels]
        weights = torch.tensor(list(self.task.value_labels.values()), dtype=torch.float32)
        values = [0.0] * len(states)
        asked = self._value_prompts(states)
        per_call = max(1, self.options.batch_size // len(labels))
        was_training = self.model.training
        self.model.eval()
        for start in range(0, len(asked), per_call):
            chunk = asked[start : start + per_call]
            prompts = [prompt for _, prompt in chunk for _ in labels]
            batch = encode_responses(
                self.tokenizer, prompts, labels * len(chunk), max_length=self.tokenizer.model_max_length
            )
            logprobs = response_logprobs(self.model, batch["input_ids"], batch["attention_mask"], batch["labels"])
            probabilities = logprobs.sum(-1).float().cpu().view(len(chunk), len(labels)).softmax(-1)
            for (i, _), v in zip(chunk, (probabilities @ weights).tolist()):
                values[i] = v
            for owner in {states[i].problem for i, _ in chunk}:
                self.calls[owner] += 1
        self.model.train(was_training)
        for i, _ in asked:
            self.evaluations[states[i].problem] += 1
        return values

    @torch.no_grad()
    def head_values(self, states: Sequence[State]) -> list[float]:
        """The value model's ``sigmoid(score)`` of each state's value prompt (module
        docstring); 0 for a state with a step line that does not parse, without a call."""
        from .algorithms.reward import reward_scores

        if self.value_model is None:
            raise ValueError("value 'head' needs the reasoner's value_model")
        model, tokenizer = self.value_model
        values = [0.0] * len(states)
        asked = self._value_prompts(states)
        was_training = model.training
        model.eval()
        for start in range(0, len(asked), self.options.batch_size):
            chunk = asked[start : start + self.options.batch_size]
            batch = encode_responses(
                tokenizer, [prompt for _, prompt in chunk], [""] * len(chunk), max_length=tokenizer.model_max_length
            )
            for (i, _), v in zip(chunk, torch.sigmoid(reward_scores(model, batch)).tolist()):
                values[i] = v
            for owner in {states[i].problem for i, _ in chunk}:
                self.calls[owner] += 1
        model.train(was_training)
        for i, _ in asked:
            self.evaluations[states[i].problem] += 1
        return values

    def verifier_values(self, states: Sequence[State]) -> list[float]:
        return [self.task.partial_value(self.prompts[s.problem], s.lines) for s in states]

    def checked_values(self, states: Sequence[State], judge: Callable | None = None) -> list[float]:
        """``judge``'s values (default: the model's own judgement) of the states whose steps
        the verifier finds valid, 0 for the others; an answered chain is worth the
        verifier's 1 or 0."""
        judge = self.self_values if judge is None else judge
        checks = self.verifier_values(states)
        values = [check if self.is_final(state) else 0.0 for state, check in zip(states, checks)]
        judged = [i for i, (state, check) in enumerate(zip(states, checks)) if check > 0 and not self.is_final(state)]
        for i, value in zip(judged, judge([states[i] for i in judged])):
            values[i] = value
        return values

    def values(self, name: str) -> Callable[[Sequence[State]], list[float]]:
        """The value function ``name`` (one of ``VALUES``)."""
        return {
            "self": self.self_values,
            "verifier": self.verifier_values,
            "self_checked": self.checked_values,
            "head": self.head_values,
            "head_checked": lambda states: self.checked_values(states, self.head_values),
        }[name]


# ---------------------------------------------------------------- running and reporting


def run_strategy(
    strategy: str, reasoner: Reasoner, task, count: int, options: ReasoningOptions, value: Callable | None = None
) -> list[str]:
    """The completion of each of ``count`` problems (states ``State(i)`` of the
    reasoner's prompts) by ``strategy``. ``value`` defaults to the reasoner's value of
    ``options.value``."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    roots = [State(i) for i in range(count)]
    if strategy in ("direct", "cot"):
        return [rest[0] for rest in reasoner.complete(roots, greedy=True)]
    if strategy == "self_consistency":
        chains = reasoner.complete(roots, greedy=False, samples=options.samples)
        prompts = reasoner.prompts
        return [c[majority_vote([task.answer_key(prompts[i], x) for x in c])] for i, c in enumerate(chains)]
    if value is None:
        value = reasoner.values(options.value)
    depth = max(task.chain_length(reasoner.prompts[i]) for i in range(count))
    if strategy == "tot_bfs":
        best = tot_bfs(roots, reasoner, value, breadth=options.breadth, proposals=options.proposals, depth=depth)
    else:
        best = [
            tot_dfs(root, reasoner, value, proposals=options.proposals, threshold=options.threshold,
                    budget=options.node_budget, depth=depth)
            for root in roots
        ]
    return _finish(best, reasoner)


def _finish(states: list[State], reasoner: Reasoner) -> list[str]:
    """Each state's chain, finished greedily (in one batched call) when it has no answer."""
    open_states = [state for state in states if not reasoner.is_final(state)]
    rests = {}
    if open_states:
        rests = dict(zip(open_states, (rest[0] for rest in reasoner.complete(open_states, greedy=True))))
    return [state.completion(rests.get(state, "")) for state in states]


@dataclass
class StrategyReport:
    """One strategy's results over a problem set (``asdict`` makes the JSON line)."""

    strategy: str
    value: str | None
    problems: int
    accuracy: float
    generated_tokens: float  # per problem
    model_calls: float  # per problem
    evaluations: float  # states valued by the model, per problem
    wall_seconds: float


def evaluate_strategy(
    model, tokenizer, task, problems, strategy: str, options: ReasoningOptions, value_model=None
) -> dict:
    """Run ``strategy`` on ``problems`` (``(numbers, target)`` pairs of ``task``) and
    report its accuracy (the task's verifier) and per-problem costs, as a dict.
    ``value_model``: ``(model, tokenizer)`` of the values ``HEAD_VALUES``."""
    prompts = [
        task.direct_prompt(*problem) if strategy == "direct" else task.prompt(*problem) for problem in problems
    ]
    reasoner = LanguageModelReasoner(model, tokenizer, task, prompts, options, value_model)
    start = time.perf_counter()
    completions = run_strategy(strategy, reasoner, task, len(prompts), options)
    wall = time.perf_counter() - start
    correct = sum(task.verify(prompt, completion) for prompt, completion in zip(prompts, completions))
    n = max(1, len(prompts))
    return asdict(StrategyReport(
        strategy=strategy,
        value=options.value if strategy.startswith("tot_") else None,
        problems=len(prompts),
        accuracy=correct / n,
        generated_tokens=sum(reasoner.tokens) / n,
        model_calls=sum(reasoner.calls) / n,
        evaluations=sum(reasoner.evaluations) / n,
        wall_seconds=wall,
    ))


def format_table(reports: Sequence[dict]) -> str:
    """The reports as a Markdown table, one row per strategy."""
    columns = ("strategy", "value", "problems", "accuracy", "tokens/problem", "calls/problem", "evaluations/problem",
               "wall s")
    rows = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in reports:
        rows.append(
            f"| {r['strategy']} | {r['value'] or '-'} | {r['problems']} | {r['accuracy']:.1%} | "
            f"{r['generated_tokens']:.1f} | {r['model_calls']:.1f} | {r['evaluations']:.1f} | {r['wall_seconds']:.1f} |"
        )
    return "\n".join(rows)


# ---------------------------------------------------------------- the fastpo reason command

# The tasks whose chains the strategies can read (LanguageModelReasoner's list of what a
# task gives).
REASONING_TASKS = ("builtin:countdown",)
_DEFAULTS = ReasoningOptions()


@dataclass
class ReasonConfig:
    """Solve a reasoning task's held-out problems with each inference strategy and report
    accuracy (the task's verifier), generated tokens, model calls and states valued per
    problem, and wall time: one JSON line per strategy on stdout, a table on stderr."""

    model: str = option(
        "runs/grpo",
        "The model: a run folder (its last checkpoint), a checkpoint folder, a model folder, or builtin:tiny "
        "(untrained: a baseline).",
    )
    data: str = option("builtin:countdown", f"The task: {', '.join(REASONING_TASKS)}.")
    strategies: list[str] = option(list(STRATEGIES), f"Strategies to run, in order: {', '.join(STRATEGIES)}.")
    problems: int = option(
        200, "Problems solved: the first of the held-out problems that training evaluates at the same seed.",
        positive=True,
    )
    split: Literal["heldout", "train"] = option("heldout", "Problems of the held-out or the training split.")
    samples: int = option(_DEFAULTS.samples, "self_consistency: chains sampled per problem.", positive=True)
    breadth: int = option(_DEFAULTS.breadth, "tot_bfs: states kept per step.", positive=True)
    proposals: int = option(_DEFAULTS.proposals, "tot_bfs, tot_dfs: next lines proposed per expanded state.",
                            positive=True)
    value: Literal[VALUES] = option(
        "self_checked",
        "Value of a state for the searches: self (the model's own sure/likely/impossible judgement), verifier "
        "(the task's check of the steps), self_checked (the judgement where the verifier finds every step valid; "
        "the default: self alone does not see a wrong step, docs/reasoning.md), head (a learned value head: "
        "value_model's sigmoid(score)), head_checked (the head where the verifier finds every step valid).",
    )
    value_model: str | None = option(
        None,
        "value=head, head_checked: the value model, a `fastpo reward target=states` run folder, checkpoint folder "
        "or model folder.",
    )
    threshold: float = option(_DEFAULTS.threshold, "tot_dfs: children valued below this are pruned, in [0, 1].",
                              minimum=0)
    node_budget: int = option(_DEFAULTS.node_budget, "tot_dfs: most states expanded per problem.", positive=True)
    temperature: float = option(_DEFAULTS.temperature, "tot_bfs, tot_dfs: temperature of proposed lines.",
                                positive=True)
    chain_temperature: float = option(_DEFAULTS.chain_temperature,
                                      "self_consistency: temperature of the sampled chains.", positive=True)
    max_line_tokens: int = option(_DEFAULTS.max_line_tokens, "Token budget of a proposed line.", positive=True)
    max_chain_tokens: int = option(_DEFAULTS.max_chain_tokens, "Token budget of a whole chain.", positive=True)
    batch_size: int = option(_DEFAULTS.batch_size, "Most rows per model call.", positive=True)
    seed: int = option(
        0, "Seed of the problems' draw (training's held-out set at this seed) and of sampling (reset per strategy).",
        minimum=0,
    )
    device: str = option("auto", "Device: auto (cuda when available, else cpu), cpu, cuda, cuda:N.")
    threads: int | None = option(None, "CPU threads; none: as training runs choose them (threads.py).", positive=True)
    output: str | None = option(None, "Also write the JSON lines to this file; none: stdout only.")
    countdown: CountdownOptions = option(CountdownOptions(), "builtin:countdown's problems (those the model trained on).")

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """ConfigError for a task without strategies, an unknown or repeated strategy, or
        an option ``ReasoningOptions`` refuses."""
        if self.data not in REASONING_TASKS:
            raise ConfigError(f"option 'data': got {self.data!r}; expected one of {', '.join(REASONING_TASKS)}")
        if not self.strategies:
            raise ConfigError(f"option 'strategies': got none; choose among {', '.join(STRATEGIES)}")
        for strategy in self.strategies:
            if strategy not in STRATEGIES:
                raise ConfigError(f"option 'strategies': got {strategy!r}; expected one of {', '.join(STRATEGIES)}")
        if len(set(self.strategies)) < len(self.strategies):
            raise ConfigError(f"option 'strategies': got {','.join(self.strategies)}, which names one twice")
        if not (isinstance(self.problems, int) and self.problems >= 1):
            raise ConfigError(f"option 'problems': got {self.problems!r}; expected an integer >= 1")
        if (self.value in HEAD_VALUES) != (self.value_model is not None):
            got = "none" if self.value_model is None else repr(self.value_model)
            raise ConfigError(
                f"option 'value_model': got {got} with value={self.value}; value={'/'.join(HEAD_VALUES)} reads a value "
                f"model (fastpo reward target=states), and only they do"
            )
        check_task_sections(self, {self.data})
        try:
            self.reasoning_options()
        except ValueError as error:
            raise ConfigError(str(error)) from None

    def reasoning_options(self) -> ReasoningOptions:
        return ReasoningOptions(
            samples=self.samples, breadth=self.breadth, proposals=self.proposals, value=self.value,
            threshold=self.threshold, node_budget=self.node_budget, temperature=self.temperature,
            chain_temperature=self.chain_temperature,
            max_line_tokens=self.max_line_tokens, max_chain_tokens=self.max_chain_tokens, batch_size=self.batch_size,
        )


def _model_folder(name: str, option_name: str = "model") -> str:
    """The model folder that option ``option_name`` names (module docstring of
    ``ReasonConfig``); a one-line ConfigError otherwise."""
    from .loop import latest_checkpoint
    from .models import BUILTIN_MODELS

    if name in BUILTIN_MODELS:
        return name
    path = Path(name)
    if (path / "config.json").is_file():
        return name
    if (path / "model" / "config.json").is_file():
        return str(path / "model")
    checkpoint = latest_checkpoint(path) if path.is_dir() else None
    if checkpoint is not None:
        return str(checkpoint / "model")
    reason = "a folder without a model or checkpoints" if path.is_dir() else "no such folder"
    raise ConfigError(
        f"option '{option_name}': got {name!r} ({reason}); expected a run folder, a checkpoint folder, a model "
        f"folder or {', '.join(BUILTIN_MODELS)}"
    )


def _value_model_folder(name: str) -> str:
    """The model folder of option ``value_model``, which must hold a trained score head
    (a causal LM would get a random one); a one-line ConfigError otherwise."""
    from .algorithms.reward import has_score_head

    folder = _model_folder(name, "value_model")
    if folder.startswith("builtin:") or not has_score_head(folder):
        raise ConfigError(
            f"option 'value_model': got {name!r}, which holds no trained score head (not a reward or value model); "
            "train one with fastpo reward target=states"
        )
    return folder


def reason(config: ReasonConfig) -> list[dict]:
    """Run ``config.strategies`` (class docstring); the reports, in order. The problems
    and the model folder are checked before the model loads (one-line ConfigErrors)."""
    from .algorithms._common import HELDOUT_SIZE, builtin_task
    from .distributed import resolve_device
    from .inputs import short_budget_warnings
    from .models import load_causal_lm
    from .progress import hugging_face_bars_off
    from .threads import run_threads

    task = builtin_task(config)  # the task of config.data with the countdown section's settings
    for line in short_budget_warnings(task, {"max_chain_tokens": (config.max_chain_tokens, True)}):
        print(line, file=sys.stderr)
    try:  # the held-out evaluation's problems (OnlineRun's "prompt" rows), the first config.problems
        problems = task.problems(max(config.problems, HELDOUT_SIZE), config.split, "prompts")[: config.problems]
    except ValueError as error:
        raise ConfigError(f"option 'problems': got {config.problems}: {error}") from None
    folder = _model_folder(config.model)
    value_folder = None if config.value_model is None else _value_model_folder(config.value_model)
    options = config.reasoning_options()
    if config.output is not None:
        Path(config.output).write_text("")
    reports = []
    with run_threads(config.threads), hugging_face_bars_off():
        device = resolve_device(config.device)
        model, tokenizer = load_causal_lm(folder, seed=config.seed, characters=task.characters)
        model = model.to(device).eval()
        value_model = None
        if value_folder is not None:
            from .algorithms.reward import load_reward_model

            value_model, value_tokenizer = load_reward_model(value_folder)
            value_model = (value_model.to(device).eval(), value_tokenizer)
        for strategy in config.strategies:
            torch.manual_seed(config.seed)
            report = {"model": folder,
                      **evaluate_strategy(model, tokenizer, task, problems, strategy, options, value_model)}
            line = json.dumps(report)
            print(line, flush=True)
            if config.output is not None:
                with open(config.output, "a") as f:
                    f.write(line + "\n")
            reports.append(report)
    print(format_table(reports), file=sys.stderr, flush=True)
    return reports
