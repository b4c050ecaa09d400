"""The built-in task: multi-digit addition with a checkable answer.

A problem is a pair of operands ``0 <= a, b < 10**digits``; its prompt is ``"12+34="`` and
its correct completion ``"46"``. A corrupted completion is the correct sum moved by a
nonzero distance (``46 +- d``, never negative), so candidates can be ranked by how far
they are from the truth.

The problems split into train and held-out by a fixed hash of the operands: the split
never depends on the seed, so no seed or sample size can leak a held-out problem into
training. Every generator draws from ``random.Random`` seeded by the task's seed, the
split and the kind of data, so each stream is reproducible on its own.

Rows follow the schemas of ``data.py``: ``"completion"`` (SFT), ``"pairwise"``,
``"ranked"``, ``"unary"`` (KTO) and ``"prompt"`` (the online algorithms; the rows
also carry the correct answer as ``"completion"``).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import ClassVar

__all__ = ["AdditionTask"]

_PROMPT = re.compile(r"^(\d+)\+(\d+)=$")
_HASH_MULTIPLIER = 2654435761  # Knuth's multiplicative hash constant (a prime near 2**32 / phi)
_SPLITS = ("train", "heldout")
_ENUMERATE_UP_TO = 10**6  # problems listed outright when picking distinct held-out ones


@dataclass(frozen=True)
class AdditionTask:
    """Addition of two operands with up to ``digits`` digits.

    Args:
        digits: digits per operand (1 or more).
        seed: seed of every generator stream.
        heldout_fraction: share of all problems reserved for evaluation, in (0, 1).
        max_distance: largest distance of a corrupted answer from the correct sum.
    """

    characters: ClassVar[str] = ""  # the built-in tokenizer's CHARACTERS cover the task
    digits: int = 2
    seed: int = 0
    heldout_fraction: float = 0.1
    max_distance: int = 20

    def __post_init__(self):
        if not (isinstance(self.digits, int) and self.digits >= 1):
            raise ValueError(f"digits must be an integer >= 1, got {self.digits!r}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction!r}")
        if not (isinstance(self.max_distance, int) and self.max_distance >= 1):
            raise ValueError(f"max_distance must be an integer >= 1, got {self.max_distance!r}")

    # ------------------------------------------------------------ problems and the split

    def is_heldout(self, a: int, b: int) -> bool:
        """Whether the problem ``a+b`` belongs to the held-out split (seed-independent)."""
        index = a * 10**self.digits + b
        return (index * _HASH_MULTIPLIER) % 2**32 < self.heldout_fraction * 2**32

    def problems(self, n: int, split: str = "train", stream: str = "problems") -> list[tuple[int, int]]:
        """``n`` operand pairs of ``split``: drawn with replacement for ``"train"``,
        distinct for ``"heldout"`` (an error when the split has fewer than ``n``)."""
        _check_split(split)
        rng = self._rng(split, stream)
        size = 10**self.digits
        if split == "heldout":
            return self._distinct_heldout(n, rng)
        drawn = []
        while len(drawn) < n:
            a, b = rng.randrange(size), rng.randrange(size)
            if not self.is_heldout(a, b):
                drawn.append((a, b))
        return drawn

    @staticmethod
    def prompt(a: int, b: int) -> str:
        return f"{a}+{b}="

    # ------------------------------------------------------------ generators

    def sft_examples(self, n: int, split: str = "train") -> list[dict]:
        """Demonstrations ``{"prompt", "completion"}`` with the correct answer."""
        return [{"prompt": self.prompt(a, b), "completion": str(a + b)} for a, b in self.problems(n, split, "sft")]

    def preference_pairs(self, n: int, split: str = "train") -> list[dict]:
        """Pairs ``{"prompt", "chosen", "rejected"}``: the correct answer over a corrupted one."""
        rows = []
        rng = self._rng(split, "pairs-corruption")
        for a, b in self.problems(n, split, "pairs"):
            distance = rng.randint(1, self.max_distance)
            rows.append({
                "prompt": self.prompt(a, b),
                "chosen": str(a + b),
                "rejected": str(self._corrupt(a + b, distance, rng)),
            })
        return rows

    def rankings(self, n: int, k: int = 4, split: str = "train") -> list[dict]:
        """Rankings ``{"prompt", "responses"}`` of ``k`` answers, best first: the correct one,
        then ``k - 1`` corrupted ones at strictly increasing distances from it."""
        if not 2 <= k <= self.max_distance + 1:
            raise ValueError(f"k must be in [2, max_distance + 1 = {self.max_distance + 1}], got {k!r}")
        rows = []
        rng = self._rng(split, f"rankings-{k}-corruption")
        for a, b in self.problems(n, split, f"rankings-{k}"):
            distances = sorted(rng.sample(range(1, self.max_distance + 1), k - 1))
            wrong = [str(self._corrupt(a + b, d, rng)) for d in distances]
            rows.append({"prompt": self.prompt(a, b), "responses": [str(a + b), *wrong]})
        return rows

    def unary_examples(self, n: int, split: str = "train") -> list[dict]:
        """KTO rows ``{"prompt", "completion", "label"}``: desirable (``True``, the correct
        answer) on even rows, undesirable (``False``, a corrupted answer) on odd rows."""
        rows = []
        rng = self._rng(split, "unary-corruption")
        for i, (a, b) in enumerate(self.problems(n, split, "unary")):
            desirable = i % 2 == 0
            answer = a + b if desirable else self._corrupt(a + b, rng.randint(1, self.max_distance), rng)
            rows.append({"prompt": self.prompt(a, b), "completion": str(answer), "label": desirable})
        return rows

    def rows(self, schema: str, n: int, split: str = "train") -> list[dict]:
        """``n`` rows of one of ``data.py``'s schemas (``"ranked"`` rows hold 4 responses)."""
        generators = {
            "completion": self.sft_examples,
            "pairwise": self.preference_pairs,
            "ranked": lambda n, split: self.rankings(n, split=split),
            "unary": self.unary_examples,
            # Online algorithms read the prompt; the answer rides along for reward functions.
            "prompt": self.sft_examples,
        }
        if schema not in generators:
            raise ValueError(f"schema {schema!r} is not one of {', '.join(generators)}")
        return generators[schema](n, split)

    # ------------------------------------------------------------ verifier

    @staticmethod
    def verify(prompt: str, completion: str) -> float:
        """1.0 when ``completion`` is the sum asked by ``prompt``, else 0.0.

        The answer is the completion up to its first newline, surrounding spaces removed;
        it must be the decimal sum exactly (no sign, no leading zeros). A prompt that is
        not of the form ``"a+b="`` is a ValueError.
        """
        match = _PROMPT.match(prompt)
        if match is None:
            raise ValueError(f"prompt {prompt!r} is not an addition prompt 'a+b='")
        answer = completion.split("\n", 1)[0].strip()
        return 1.0 if answer == str(int(match[1]) + int(match[2])) else 0.0

    def reward(self, prompts: list[str], completions: list[str], **row_fields) -> list[float]:
        """The verifiable reward of a batch: ``verify`` of each prompt/completion pair.

        ``row_fields`` (the dataset rows' other fields) are accepted and unused, matching
        the reward-callable signature of the online algorithms.
        """
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
        return [self.verify(p, c) for p, c in zip(prompts, completions)]

    # ------------------------------------------------------------ helpers

    def _rng(self, split: str, stream: str) -> random.Random:
        # String seeds hash with SHA-512 in random.Random: stable across runs and platforms.
        return random.Random(f"addition/{self.digits}/{self.seed}/{split}/{stream}")

    def _distinct_heldout(self, n: int, rng: random.Random) -> list[tuple[int, int]]:
        size = 10**self.digits
        if size * size <= _ENUMERATE_UP_TO:
            pool = [(a, b) for a in range(size) for b in range(size) if self.is_heldout(a, b)]
            if n > len(pool):
                raise ValueError(f"n={n} exceeds the {len(pool)} held-out problems of {self.digits}-digit addition")
            return rng.sample(pool, n)
        # Too many problems to list: draw until n distinct held-out ones (the split holds
        # about heldout_fraction * 10**(2*digits) >= 10**5 of them, far more than any n used).
        drawn: dict[tuple[int, int], None] = {}
        while len(drawn) < n:
            a, b = rng.randrange(size), rng.randrange(size)
            if self.is_heldout(a, b):
                drawn[(a, b)] = None
        return list(drawn)

    @staticmethod
    def _corrupt(answer: int, distance: int, rng: random.Random) -> int:
        if answer - distance < 0 or rng.random() < 0.5:
            return answer + distance
        return answer - distance


def _check_split(split: str) -> None:
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {', '.join(_SPLITS)}, got {split!r}")
