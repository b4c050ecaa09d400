"""The built-in reasoning task ``builtin:countdown``: reach a target from a few numbers.

A problem is a few positive integers and a target; an operation combines two of the
numbers with ``+ - * /`` into one, and every result must be a positive integer (no
zero, no negative, no fraction: Countdown's rules). With ``use_all`` (the default, the
rule of the Game of 24, Tree-of-Thought's benchmark: 4 numbers, target 24) every number
is used exactly once; without it each number is used at most once. The defaults are
the Game of 24 with numbers 1 to 13; problems that need fractions (``3 3 8 8``) are
not generated, since they have no solution under these rules.

Formats (one line per step, so that a step is one "thought" of a search)::

    prompt           "4 6 8 9 to 24\\n"
    chain of thought "4 * 6 = 24 (left: 8 9 24)\\n9 - 8 = 1 (left: 24 1)\\n24 * 1 = 24 (left: 24)\\nanswer: (4*6)*(9-8)"
    direct prompt    "4 6 8 9 to 24\\nanswer: "      its completion: "(4*6)*(9-8)"
    value prompt     "8 9 24 to 24 value:"           its completion: " sure", " likely" or " impossible"

A step ``a op b = c (left: ...)`` lists the numbers left after it: the previous ones
without ``a`` and ``b``, then ``c``. The answer is one expression over the problem's
numbers. The value prompt asks the model to judge a state (the numbers left) as the
solver labels it: ``sure`` when the target is reached or one step away, ``likely`` when
it is reachable in more steps, ``impossible`` when it is not reachable at all; the
self-evaluation of ``reasoning.py`` reads these judgements.

The verifier (``check``) replays every step: the operands must be among the numbers
left, the arithmetic right and allowed, the ``left`` list the true one (as a multiset);
the answer must parse, use the problem's numbers (each at most once, all of them with
``use_all``), make only allowed operations and equal the target. A completion is
correct when every step and the answer are. Rewards (``reward``): 1 for a correct
completion, else ``format_reward`` when the completion is well formed (every line
parses and an answer line ends it) plus ``progress_reward`` times the share of the
needed steps that were valid and kept the target reachable (partial credit; 0 by
default, until it is measured to help).

Problems are split into train and held-out by a seed-independent hash of the problem
(its sorted numbers and target), as in ``task.py``: no seed or sample size leaks a
held-out problem into training. Every generator draws from ``random.Random`` seeded by
the task's settings, the split and the stream, so each stream is reproducible.

Rows follow ``data.py``'s schemas: ``"completion"`` (SFT: chains of thought, direct
answers and value judgements, mixed), ``"pairwise"`` and ``"unary"`` (a solver's chain
against a chain of valid steps that misses the target) and ``"prompt"`` (the online
algorithms; the rows also carry a solver's chain as ``"completion"`` and the problem as
``"numbers"`` and ``"target"``, which the reward reads when present, so rows from
another source with their own prompt wording can be scored).
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

from .task import _check_split

__all__ = [
    "ANSWER_PREFIX",
    "CountdownTask",
    "Step",
    "Verdict",
    "VALUE_LABELS",
    "min_steps",
    "moves",
    "parse_expression",
]

ANSWER_PREFIX = "answer: "
VALUE_SUFFIX = " value:"
# A judgement's value, as Tree-of-Thought maps sure/likely/impossible to a number; the
# order is what matters to a search.
VALUE_LABELS = {"sure": 1.0, "likely": 0.5, "impossible": 0.0}
OPERATORS = "+-*/"
_ENUMERATE_UP_TO = 200_000  # problems listed outright when picking distinct held-out ones
# The mix of the SFT rows: chains of thought (the main skill), direct answers (the
# ``direct`` strategy) and value judgements (the self-evaluation of the searches).
SFT_MIX = {"cot": 0.5, "direct": 0.25, "value": 0.25}
_PROMPT = re.compile(r"^(\d+(?: \d+)*) to (\d+)$")
_STEP = re.compile(r"^(\d+) ([-+*/]) (\d+) = (\d+) \(left: (\d+(?: \d+)*)\)$")
_VALUE_PROMPT = re.compile(r"^(\d+(?: \d+)*) to (\d+)" + re.escape(VALUE_SUFFIX) + "$")


# ---------------------------------------------------------------- arithmetic and solver


def apply(a: int, op: str, b: int) -> int | None:
    """``a op b`` when it is allowed (a positive integer), else None."""
    if op == "+":
        return a + b
    if op == "*":
        return a * b
    if op == "-":
        return a - b if a > b else None
    if op == "/":
        return a // b if b > 0 and a % b == 0 else None
    raise ValueError(f"op must be one of {OPERATORS}, got {op!r}")


@dataclass(frozen=True)
class Step:
    """One operation ``a op b = c`` and the numbers left after it."""

    a: int
    op: str
    b: int
    c: int
    left: tuple[int, ...]

    def line(self) -> str:
        return f"{self.a} {self.op} {self.b} = {self.c} (left: {' '.join(map(str, self.left))})"


def _remove(numbers: tuple[int, ...], *used: int) -> tuple[int, ...] | None:
    """``numbers`` without one occurrence of each of ``used`` (order kept), or None when
    one is missing."""
    rest = list(numbers)
    for value in used:
        if value not in rest:
            return None
        rest.remove(value)
    return tuple(rest)


def moves(numbers: tuple[int, ...]) -> list[Step]:
    """Every allowed step from ``numbers``, each pair once with its larger number first
    (``9 - 8``, never ``8 - 9``), in a fixed order."""
    steps, seen = [], set()
    for i in range(len(numbers)):
        for j in range(len(numbers)):
            a, b = numbers[i], numbers[j]
            if i == j or a < b or (a == b and i > j) or (a, b) in seen:
                continue
            seen.add((a, b))
            rest = _remove(numbers, a, b)
            for op in OPERATORS:
                c = apply(a, op, b)
                if c is not None:
                    steps.append(Step(a, op, b, c, rest + (c,)))
    return steps


@functools.lru_cache(maxsize=1 << 20)
def _min_steps_sorted(numbers: tuple[int, ...], target: int, use_all: bool) -> int | None:
    if (len(numbers) == 1 or not use_all) and target in numbers:
        return 0
    if len(numbers) == 1:
        return None
    best = None
    for step in moves(numbers):
        rest = _min_steps_sorted(tuple(sorted(step.left)), target, use_all)
        if rest is not None and (best is None or rest + 1 < best):
            best = rest + 1
            # Nothing is shorter: one step, or with use_all every solution's len - 1 steps.
            if best == 1 or use_all:
                break
    return best


def min_steps(numbers, target: int, use_all: bool = True) -> int | None:
    """The fewest steps from ``numbers`` to ``target``, or None when it cannot be reached.
    With ``use_all`` the target must be the last number left (so the answer is
    ``len(numbers) - 1`` steps or None); without it, any number equal to the target ends
    the problem."""
    return _min_steps_sorted(tuple(sorted(numbers)), target, use_all)


# ---------------------------------------------------------------- expressions


def _tokenize_expression(text: str) -> list[str] | None:
    tokens = re.findall(r"\d+|[-+*/()]|\S", text)
    return None if any(t not in "+-*/()" and not t.isdigit() for t in tokens) else tokens


@dataclass(frozen=True)
class Expression:
    """A parsed answer: its value (None when an operation is not allowed), the numbers it
    uses, and a canonical form in which ``+`` and ``*`` are commutative and associative
    (``(9-8)*(6*4)`` and ``4*6*(9-8)`` share one), the key of a majority vote."""

    value: int | None
    numbers: tuple[int, ...]
    canonical: str


def parse_expression(text: str) -> Expression | None:
    """``text`` as an expression over positive integers with ``+ - * /`` and parentheses
    (the usual precedence, left to right), or None when it does not parse. Every
    operation must give a positive integer, or the value is None."""
    tokens = _tokenize_expression(text)
    if not tokens:
        return None
    position = 0

    def peek():
        return tokens[position] if position < len(tokens) else None

    def take():
        nonlocal position
        position += 1
        return tokens[position - 1]

    # Each parser returns (value or None, numbers, canonical node); a canonical node is
    # (op, [children]) or a number string.
    def combine(op, left, right):
        value = None if left[0] is None or right[0] is None else apply(left[0], op, right[0])
        if op in "+*":  # associative: (a+b)+c and a+(b+c) are one node a+b+c
            node = (op, _operands(left[2], op) + _operands(right[2], op))
        else:
            node = (op, [left[2], right[2]])
        return value, left[1] + right[1], node

    def factor():
        token = peek()
        if token is None:
            raise SyntaxError
        if token == "(":
            take()
            inner = expression()
            if peek() != ")":
                raise SyntaxError
            take()
            return inner
        if token.isdigit():
            take()
            return int(token), (int(token),), token
        raise SyntaxError

    def term():
        node = factor()
        while peek() in ("*", "/"):
            node = combine(take(), node, factor())
        return node

    def expression():
        node = term()
        while peek() in ("+", "-"):
            node = combine(take(), node, term())
        return node

    try:
        value, numbers, node = expression()
    except SyntaxError:
        return None
    if position != len(tokens):
        return None
    return Expression(value, numbers, _render(node, top=True))


def _operands(node, op: str) -> list:
    """The operands of ``node`` under ``op``: its children when it is an ``op`` node, else itself."""
    return node[1] if isinstance(node, tuple) and node[0] == op else [node]


def _render(node, top: bool = False) -> str:
    if isinstance(node, str):
        return node
    op, children = node
    rendered = [_render(child) for child in children]
    if op in "+*":
        rendered.sort()
    text = op.join(rendered)
    return text if top else f"({text})"


# ---------------------------------------------------------------- the verifier


@dataclass(frozen=True)
class Verdict:
    """What the verifier found in a completion.

    Attributes:
        correct: every step valid and the answer valid and equal to the target.
        well_formed: every line is a step or the answer, and an answer line ends it.
        steps: step lines before the answer (or in the whole text without one).
        valid_steps: the leading steps that are valid.
        progress: the leading valid steps whose state still reaches the target, over the
            steps a solution needs (at most 1).
        answer: the parsed answer, or None.
    """

    correct: bool
    well_formed: bool
    steps: int
    valid_steps: int
    progress: float
    answer: Expression | None


def _chain_lines(text: str) -> tuple[list[str], str | None]:
    """``(step lines, answer text or None)``: the lines up to the first answer line;
    text after the answer line is ignored (the completion has ended)."""
    steps = []
    for line in text.split("\n"):
        if CountdownTask.is_answer(line):
            return steps, line[len(ANSWER_PREFIX.rstrip()) :].strip()
        steps.append(line)
    if steps and steps[-1] == "":  # a trailing newline ends the last step, it is no line
        steps.pop()
    return steps, None


def _reasoning_text(prompt: str, completion: str) -> str:
    """What follows the problem line: the rest of the prompt (a direct prompt's
    ``answer: ``), then the completion."""
    return prompt.split("\n", 1)[1] + completion if "\n" in prompt else completion


def parse_step(line: str) -> Step | None:
    match = _STEP.match(line.strip())
    if match is None:
        return None
    a, op, b, c, left = match.groups()
    return Step(int(a), op, int(b), int(c), tuple(int(x) for x in left.split()))


def replay(numbers: tuple[int, ...], step: Step) -> tuple[int, ...] | None:
    """The numbers left after ``step`` from ``numbers`` when the step is valid (its
    operands are there, its arithmetic right and allowed, its ``left`` list the true
    one as a multiset), else None."""
    rest = _remove(numbers, step.a, step.b)
    if rest is None or apply(step.a, step.op, step.b) != step.c:
        return None
    after = rest + (step.c,)
    return after if Counter(after) == Counter(step.left) else None


# ---------------------------------------------------------------- the task


@dataclass(frozen=True)
class CountdownTask:
    """Countdown problems and their verifier.

    Args:
        count: numbers per problem (2 to 6): the depth of a solution (count - 1 steps).
        max_number: the numbers are drawn from 1 to ``max_number``.
        min_target, max_target: the target is drawn from this range (24 to 24: the Game
            of 24).
        use_all: every number used exactly once (Game of 24), else at most once.
        seed: seed of every generator stream.
        heldout_fraction: share of all problems reserved for evaluation, in (0, 1).
        format_reward: reward of a wrong but well-formed completion, in [0, 1).
        progress_reward: weight of the partial credit (share of needed steps valid and
            still on a path to the target), in [0, 1); format + progress stay below 1.
    """

    characters: ClassVar[str] = "*/"  # beyond the built-in tokenizer's CHARACTERS
    count: int = 4
    max_number: int = 13
    min_target: int = 24
    max_target: int = 24
    use_all: bool = True
    seed: int = 0
    heldout_fraction: float = 0.2
    format_reward: float = 0.1
    progress_reward: float = 0.0
    # The judgements a model gives in answer to a value prompt, and what each is worth.
    value_labels: ClassVar[dict[str, float]] = VALUE_LABELS

    def __post_init__(self):
        if not (isinstance(self.count, int) and 2 <= self.count <= 6):
            raise ValueError(f"count must be an integer in [2, 6], got {self.count!r}")
        if not (isinstance(self.max_number, int) and self.max_number >= 1):
            raise ValueError(f"max_number must be an integer >= 1, got {self.max_number!r}")
        if not (isinstance(self.min_target, int) and self.min_target >= 1):
            raise ValueError(f"min_target must be an integer >= 1, got {self.min_target!r}")
        if not (isinstance(self.max_target, int) and self.max_target >= self.min_target):
            raise ValueError(f"max_target must be an integer >= min_target={self.min_target}, got {self.max_target!r}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction!r}")
        if not 0.0 <= self.format_reward < 1.0:
            raise ValueError(f"format_reward must be in [0, 1), got {self.format_reward!r}")
        if not 0.0 <= self.progress_reward < 1.0:
            raise ValueError(f"progress_reward must be in [0, 1), got {self.progress_reward!r}")
        if self.format_reward + self.progress_reward >= 1.0:
            raise ValueError(
                f"format_reward + progress_reward must stay below the reward 1 of a correct completion, "
                f"got {self.format_reward!r} + {self.progress_reward!r}"
            )

    # ------------------------------------------------------------ problems and the split

    def is_heldout(self, numbers, target: int) -> bool:
        """Whether a problem belongs to the held-out split (a hash of its sorted numbers
        and target; independent of the seed)."""
        key = f"{' '.join(map(str, sorted(numbers)))} to {target}".encode()
        fraction = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") / 2**64
        return fraction < self.heldout_fraction

    def is_solvable(self, numbers, target: int) -> bool:
        """A problem is generated only when the solver reaches its target, in at least one step."""
        steps = min_steps(numbers, target, self.use_all)
        return steps is not None and steps >= 1

    def problems(self, n: int, split: str = "train", stream: str = "problems") -> list[tuple[tuple[int, ...], int]]:
        """``n`` solvable problems ``(sorted numbers, target)`` of ``split``: drawn with
        replacement for ``"train"``, distinct for ``"heldout"`` (an error when the split
        has fewer than ``n``)."""
        _check_split(split)
        if not (isinstance(n, int) and n >= 0):
            raise ValueError(f"n must be an integer >= 0, got {n!r}")
        rng = self._rng(split, stream)
        if split == "heldout":
            return self._distinct_heldout(n, rng)
        drawn, tries = [], 0
        while len(drawn) < n:
            numbers, target = self._draw(rng)
            tries += 1
            if not self.is_heldout(numbers, target) and self.is_solvable(numbers, target):
                drawn.append((numbers, target))
            elif tries > 1000 and not drawn:
                raise ValueError(f"{self} draws no solvable training problem in 1000 tries; widen the ranges")
        return drawn

    @staticmethod
    def prompt(numbers, target: int) -> str:
        return f"{' '.join(map(str, numbers))} to {target}\n"

    @classmethod
    def direct_prompt(cls, numbers, target: int) -> str:
        """The prompt of an answer without steps (the ``direct`` strategy)."""
        return cls.prompt(numbers, target) + ANSWER_PREFIX

    @staticmethod
    def value_prompt(numbers, target: int) -> str:
        """The prompt of the model's judgement of a state (the numbers left)."""
        return f"{' '.join(map(str, numbers))} to {target}{VALUE_SUFFIX}"

    @staticmethod
    def parse_prompt(prompt: str) -> tuple[tuple[int, ...], int]:
        """``(numbers, target)`` of a prompt (its first line); a ValueError when it is
        not a countdown prompt."""
        match = _PROMPT.match(prompt.split("\n", 1)[0])
        if match is None:
            raise ValueError(f"prompt {prompt!r} is not a countdown prompt 'N N ... to TARGET'")
        return tuple(int(x) for x in match[1].split()), int(match[2])

    def label(self, numbers, target: int) -> str:
        """The solver's judgement of a state: sure, likely or impossible."""
        steps = min_steps(numbers, target, self.use_all)
        if steps is None:
            return "impossible"
        return "sure" if steps <= 1 else "likely"

    # ------------------------------------------------------------ solver chains

    def solution(self, numbers, target: int, rng: random.Random | None = None) -> list[Step] | None:
        """A solution's steps: at each state a step that keeps the target reachable in
        the fewest steps (the first in ``moves`` order, or one drawn by ``rng``); None
        when the problem has no solution."""
        state = tuple(numbers)
        remaining = min_steps(state, target, self.use_all)
        if remaining is None:
            return None
        steps = []
        while remaining > 0:
            good = [s for s in moves(state) if min_steps(s.left, target, self.use_all) == remaining - 1]
            step = good[0] if rng is None else rng.choice(good)
            steps.append(step)
            state, remaining = step.left, remaining - 1
        return steps

    def random_walk(self, numbers, target: int, rng: random.Random) -> list[Step]:
        """Steps drawn uniformly among the allowed ones until one number is left (or,
        without ``use_all``, until the target is reached): valid steps, which may miss."""
        state, steps = tuple(numbers), []
        while len(state) > 1 and (self.use_all or target not in state):
            step = rng.choice(moves(state))
            steps.append(step)
            state = step.left
        return steps

    @staticmethod
    def expression(numbers, steps: list[Step]) -> str:
        """The answer expression that the ``steps`` build: each step's result written as
        its parenthesized operation, the outer parentheses dropped; the expression of
        the last step's result (or of the number left, without steps)."""
        pool = [(n, str(n)) for n in numbers]

        def take(value):
            for i, (v, _) in enumerate(pool):
                if v == value:
                    return pool.pop(i)[1]
            raise ValueError(f"step operand {value} is not among the numbers left")

        text = str(numbers[0]) if numbers else ""
        for step in steps:
            a, b = take(step.a), take(step.b)
            text = f"({a}{step.op}{b})"
            pool.append((step.c, text))
        return text[1:-1] if text.startswith("(") and steps else text

    def chain(self, numbers, target: int, steps: list[Step]) -> str:
        """The chain-of-thought completion of ``steps``: one line per step, then the answer."""
        lines = [step.line() for step in steps]
        return "\n".join(lines + [ANSWER_PREFIX + self.expression(numbers, steps)])

    # ------------------------------------------------------------ generators

    def cot_examples(self, n: int, split: str = "train") -> list[dict]:
        """``{"prompt", "completion"}``: a solution drawn among the shortest, as a chain of thought."""
        rng = self._rng(split, "cot-solutions")
        return [
            {"prompt": self.prompt(p, t), "completion": self.chain(p, t, self.solution(p, t, rng))}
            for p, t in self.problems(n, split, "cot")
        ]

    def direct_examples(self, n: int, split: str = "train") -> list[dict]:
        """``{"prompt", "completion"}``: the direct prompt and a solution's expression."""
        rng = self._rng(split, "direct-solutions")
        return [
            {"prompt": self.direct_prompt(p, t), "completion": self.expression(p, self.solution(p, t, rng))}
            for p, t in self.problems(n, split, "direct")
        ]

    def value_examples(self, n: int, split: str = "train") -> list[dict]:
        """``{"prompt", "completion"}``: a state (``_states``) and the solver's judgement
        of it."""
        return [
            {"prompt": self.value_prompt(state, target), "completion": " " + self.label(state, target)}
            for state, target in self._states(n, split, "value")
        ]

    def state_examples(self, n: int, split: str = "train") -> list[dict]:
        """Unary rows ``{"prompt", "completion", "label"}`` of a value model: a state's
        value prompt, an empty completion, and ``label`` true when the solver can still
        reach the target from it (``sure`` or ``likely``)."""
        return [
            {"prompt": self.value_prompt(state, target), "completion": "",
             "label": min_steps(state, target, self.use_all) is not None}
            for state, target in self._states(n, split, "value-model")
        ]

    def _states(self, n: int, split: str, stream: str) -> list[tuple[tuple[int, ...], int]]:
        """``(numbers left, target)`` of ``n`` states, each after 1 to ``count - 1`` steps
        of a solution or of a random walk, with equal odds (so that reachable and
        unreachable states both appear), drawn by ``stream``'s generators."""
        rng = self._rng(split, f"{stream}-states")
        states = []
        for numbers, target in self.problems(n, split, stream):
            walk = self.solution if rng.random() < 0.5 else self.random_walk
            steps = walk(numbers, target, rng)
            states.append((steps[rng.randrange(len(steps))].left if steps else numbers, target))
        return states

    def sft_examples(self, n: int, split: str = "train") -> list[dict]:
        """``n`` SFT rows mixing chains of thought, direct answers and value judgements in
        the shares of ``SFT_MIX``, each row's kind drawn by its own stream."""
        rng = self._rng(split, "sft-mix")
        kinds = rng.choices(list(SFT_MIX), weights=list(SFT_MIX.values()), k=n)
        made = {
            "cot": iter(self.cot_examples(kinds.count("cot"), split)),
            "direct": iter(self.direct_examples(kinds.count("direct"), split)),
            "value": iter(self.value_examples(kinds.count("value"), split)),
        }
        return [next(made[kind]) for kind in kinds]

    def prompt_rows(self, n: int, split: str = "train") -> list[dict]:
        """Online rows ``{"prompt", "completion", "numbers", "target"}``; the completion is
        a solver's chain (a reference, never a training target)."""
        return [
            {
                "prompt": self.prompt(numbers, target),
                "completion": self.chain(numbers, target, self.solution(numbers, target)),
                "numbers": list(numbers),
                "target": target,
            }
            for numbers, target in self.problems(n, split, "prompts")
        ]

    def preference_pairs(self, n: int, split: str = "train") -> list[dict]:
        """``{"prompt", "chosen", "rejected"}``: a solution's chain over a chain of valid
        steps that misses the target."""
        rng = self._rng(split, "pairs")
        rows = []
        for numbers, target in self.problems(n, split, "pairs"):
            rows.append({
                "prompt": self.prompt(numbers, target),
                "chosen": self.chain(numbers, target, self.solution(numbers, target, rng)),
                "rejected": self.chain(numbers, target, self._missing_walk(numbers, target, rng)),
            })
        return rows

    def unary_examples(self, n: int, split: str = "train") -> list[dict]:
        """KTO rows ``{"prompt", "completion", "label"}``: a solution (``True``) on even
        rows, a chain that misses the target (``False``) on odd rows."""
        rng = self._rng(split, "unary")
        rows = []
        for i, (numbers, target) in enumerate(self.problems(n, split, "unary")):
            good = i % 2 == 0
            steps = self.solution(numbers, target, rng) if good else self._missing_walk(numbers, target, rng)
            chain = self.chain(numbers, target, steps)
            rows.append({"prompt": self.prompt(numbers, target), "completion": chain, "label": good})
        return rows

    def rows(self, schema: str, n: int, split: str = "train") -> list[dict]:
        """``n`` rows of one of ``data.py``'s schemas (all but ``"ranked"``), or
        ``"states"``: a value model's unary rows (``state_examples``)."""
        generators = {
            "completion": self.sft_examples,
            "pairwise": self.preference_pairs,
            "unary": self.unary_examples,
            "prompt": self.prompt_rows,
            "states": self.state_examples,
        }
        if schema not in generators:
            raise ValueError(f"schema {schema!r} is not one of builtin:countdown's: {', '.join(generators)}")
        return generators[schema](n, split)

    # ------------------------------------------------------------ verifier and rewards

    def check(self, prompt: str, completion: str, numbers=None, target: int | None = None) -> Verdict:
        """The verdict on ``completion``: the text after the prompt's first line, then
        the completion (so a direct prompt's ``answer: `` counts as the answer line).
        ``numbers`` and ``target`` default to the prompt's."""
        if numbers is None or target is None:
            numbers, target = self.parse_prompt(prompt)
        numbers = tuple(numbers)
        lines, answer_text = _chain_lines(_reasoning_text(prompt, completion))
        state, valid, on_track, broken = numbers, 0, 0, False
        well_formed = answer_text is not None
        for line in lines:
            step = parse_step(line)
            well_formed &= step is not None
            if broken:  # later lines still count for the format
                continue
            after = None if step is None else replay(state, step)
            if after is None:
                broken = True
                continue
            state, valid = after, valid + 1
            if on_track == valid - 1 and min_steps(state, target, self.use_all) is not None:
                on_track = valid
        needed = max(1, min_steps(numbers, target, self.use_all) or len(numbers) - 1)
        answer = parse_expression(answer_text) if answer_text is not None else None
        well_formed &= answer is not None
        answer_ok = (
            answer is not None
            and answer.value == target
            and _remove(numbers, *answer.numbers) is not None
            and (not self.use_all or len(answer.numbers) == len(numbers))
        )
        correct = answer_ok and valid == len(lines)
        return Verdict(correct, bool(well_formed), len(lines), valid, min(1.0, on_track / needed), answer)

    def verify(self, prompt: str, completion: str) -> float:
        """1.0 when ``completion`` solves the prompt's problem (every step and the answer
        right), else 0.0."""
        return 1.0 if self.check(prompt, completion).correct else 0.0

    def score(self, verdict: Verdict) -> float:
        """The reward of a verdict (the module docstring gives the rule)."""
        if verdict.correct:
            return 1.0
        return self.format_reward * verdict.well_formed + self.progress_reward * verdict.progress

    def reward(
        self, prompts: list[str], completions: list[str], numbers=None, target=None, **row_fields
    ) -> list[float]:
        """The rewards of a batch; the rows' ``numbers`` and ``target`` fields, when
        present, give the problems (else each prompt's first line). Other row fields are
        accepted and unused, as the online algorithms' reward signature asks."""
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
        problems = (
            list(zip(numbers, target)) if numbers is not None and target is not None else [(None, None)] * len(prompts)
        )
        return [self.score(self.check(p, c, n, t)) for p, c, (n, t) in zip(prompts, completions, problems)]

    # ------------------------------------------------------------ what a search reads

    def chain_length(self, prompt: str) -> int:
        """The most lines of a chain for the prompt's problem: ``count - 1`` steps and the answer."""
        return len(self.parse_prompt(prompt)[0])

    @staticmethod
    def is_answer(line: str) -> bool:
        """Whether a chain's line is its answer (the chain ends with it)."""
        return line.startswith(ANSWER_PREFIX.rstrip())

    def state_numbers(self, prompt: str, lines) -> tuple[int, ...] | None:
        """The numbers left after ``lines`` as the chain itself states them (the last
        step's ``left``; the problem's numbers without steps), or None when a step line
        does not parse. The arithmetic is not checked: a search's self-evaluation judges
        the state the model wrote."""
        numbers, _ = self.parse_prompt(prompt)
        for line in lines:
            if self.is_answer(line):
                break
            step = parse_step(line)
            if step is None:
                return None
            numbers = step.left
        return numbers

    def partial_value(self, prompt: str, lines) -> float:
        """The verifier's value of a state: for a chain ended by its answer, 1 when
        correct else 0; before the answer, 0.5 while every step is valid, 0 after an
        invalid or malformed one. It knows nothing of reachability (the solver would)."""
        text = "".join(line + "\n" for line in lines)
        if lines and self.is_answer(lines[-1]):
            return self.verify(prompt, text)
        verdict = self.check(prompt, text)
        return 0.5 if verdict.valid_steps == verdict.steps else 0.0

    def answer_key(self, prompt: str, completion: str) -> str | None:
        """The canonical form of the completion's answer (the key of a majority vote), or
        None when it has no answer that parses."""
        _, answer_text = _chain_lines(_reasoning_text(prompt, completion))
        answer = parse_expression(answer_text) if answer_text is not None else None
        return None if answer is None else answer.canonical

    # ------------------------------------------------------------ helpers

    def _draw(self, rng: random.Random) -> tuple[tuple[int, ...], int]:
        numbers = tuple(sorted(rng.randint(1, self.max_number) for _ in range(self.count)))
        return numbers, rng.randint(self.min_target, self.max_target)

    def _missing_walk(self, numbers, target: int, rng: random.Random) -> list[Step]:
        for _ in range(1000):
            steps = self.random_walk(numbers, target, rng)
            if target not in (steps[-1].left if steps else tuple(numbers)):
                return steps
        raise ValueError(f"every random walk of {numbers} reaches {target}; no missing chain to contrast")

    def _rng(self, split: str, stream: str) -> random.Random:
        # String seeds hash with SHA-512 in random.Random: stable across runs and platforms.
        settings = f"{self.count}/{self.max_number}/{self.min_target}/{self.max_target}/{self.use_all}"
        return random.Random(f"countdown/{settings}/{self.seed}/{split}/{stream}")

    def _problem_space(self) -> int:
        return math.comb(self.max_number + self.count - 1, self.count) * (self.max_target - self.min_target + 1)

    def _distinct_heldout(self, n: int, rng: random.Random) -> list[tuple[tuple[int, ...], int]]:
        if self._problem_space() <= _ENUMERATE_UP_TO:
            import itertools

            pool = [
                (numbers, target)
                for target in range(self.min_target, self.max_target + 1)
                for numbers in itertools.combinations_with_replacement(range(1, self.max_number + 1), self.count)
                if self.is_heldout(numbers, target) and self.is_solvable(numbers, target)
            ]
            if n > len(pool):
                raise ValueError(f"n={n} exceeds the {len(pool)} held-out problems of {self}")
            return rng.sample(pool, n)
        # Too many problems to list: draw until n distinct held-out ones.
        drawn: dict[tuple[tuple[int, ...], int], None] = {}
        tries = 0
        while len(drawn) < n:
            numbers, target = self._draw(rng)
            tries += 1
            if self.is_heldout(numbers, target) and self.is_solvable(numbers, target):
                drawn[(numbers, target)] = None
            elif tries > 100 * (n + 10) and len(drawn) < n // 10:
                raise ValueError(f"{self} finds too few held-out problems ({len(drawn)} in {tries} draws) for n={n}")
        return list(drawn)
