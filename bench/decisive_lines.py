"""Where a chain of thought's outcome is decided: the share of the reward's variance that
each line of a model's sampled countdown chains resolves.

    python -m fastpo.bench.decisive_lines MODEL [--seed S] [--problems N] [--chains K] [--continuations M]

For each of ``N`` held-out problems of ``builtin:countdown`` (the task's ``seed``), ``K``
chains are sampled at temperature 1. The value ``V`` of a prefix is the mean reward
(1 correct, else 0) of ``M`` continuations sampled from it: at the root (``2M`` there),
at the start of each of a chain's lines after the first, and at the end, where it is the
chain's own reward. Along a chain these values are a martingale, so their increments are
uncorrelated and their mean squares add up to the reward's variance: the mean square of
the increment across line ``l`` is the variance that line resolves. Each estimated value
adds its sampling variance ``v (1 - v) / (m - 1)`` to the squares, which is subtracted.

It is the measurement behind countdown's ``rollout=tree`` default (docs/reasoning.md): a
tree saves tokens only by sharing prefixes, so it should share the lines that decide
little and resample those that decide much.
"""

from __future__ import annotations

import argparse
from typing import Sequence

import torch

from fastpo.engine.countdown import CountdownTask
from fastpo.engine.forward import encode_prompts
from fastpo.engine.models import load_causal_lm
from fastpo.engine.rollout import continue_prefixes
from fastpo.engine.tasks import config_defaults

MAX_NEW_TOKENS = config_defaults("builtin:countdown", "grpo")["max_new_tokens"]  # the budget its runs sample with


def resolved_variance(paths: Sequence[Sequence[tuple[float, int | None]]]) -> list[float]:
    """Per line ``l``, the variance it resolves, averaged over ``paths``: each path is a
    chain's ``(value, samples)`` from the root to its end (``samples`` None for an exact
    value, the chain's reward), and line ``l`` the step from its value ``l`` to ``l + 1``."""
    if not paths:
        raise ValueError("paths must hold at least one chain")
    lines = max(len(path) for path in paths) - 1
    totals = [0.0] * lines

    def noise(value: float, samples: int | None) -> float:
        return 0.0 if samples is None else value * (1 - value) / (samples - 1)

    for path in paths:
        for line, ((before, n_before), (after, n_after)) in enumerate(zip(path, path[1:])):
            totals[line] += (after - before) ** 2 - noise(before, n_before) - noise(after, n_after)
    return [total / len(paths) for total in totals]


@torch.no_grad()
def line_value_paths(model, tokenizer, task: CountdownTask, problems: int, chains: int, continuations: int):
    """The ``(value, samples)`` paths of ``chains`` sampled chains for each of ``problems``
    held-out problems (module docstring); draws from the global torch RNG."""
    prompts = [task.prompt(numbers, target) for numbers, target in task.problems(problems, "heldout")]
    heads = encode_prompts(tokenizer, prompts)
    newline = tokenizer.convert_tokens_to_ids("\n")

    def sample(requests: list[tuple[int, list[int]]], chunk: int = 256) -> list[tuple[list[int], float]]:
        """Continue each ``(problem, prefix tokens)``: the whole tokens and their reward."""
        out = []
        for start in range(0, len(requests), chunk):
            part = requests[start : start + chunk]
            continuations = continue_prefixes(
                model, tokenizer, [prompts[i] for i, _ in part], [heads[i] for i, _ in part],
                [prefix for _, prefix in part], budget=MAX_NEW_TOKENS,
            )
            for (i, prefix), (tokens, _, _) in zip(part, continuations):
                whole = prefix + tokens
                out.append((whole, task.verify(prompts[i], tokenizer.decode(whole, skip_special_tokens=True))))
        return out

    def mean_rewards(samples: list[tuple[list[int], float]], size: int) -> list[float]:
        """The mean reward of each run of ``size`` consecutive samples."""
        return [sum(reward for _, reward in samples[k : k + size]) / size for k in range(0, len(samples), size)]

    model.eval()
    roots = mean_rewards(sample([(i, []) for i in range(problems) for _ in range(2 * continuations)]),
                         2 * continuations)
    drawn = sample([(i, []) for i in range(problems) for _ in range(chains)])
    starts = [[p + 1 for p, token in enumerate(tokens[:-1]) if token == newline] for tokens, _ in drawn]
    requests = [
        (c // chains, tokens[:p])
        for c, (tokens, _) in enumerate(drawn) for p in starts[c] for _ in range(continuations)
    ]
    values = iter(mean_rewards(sample(requests), continuations))
    return [
        [(roots[c // chains], 2 * continuations)]
        + [(next(values), continuations) for _ in starts[c]]
        + [(reward, None)]
        for c, (_, reward) in enumerate(drawn)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description="Share of a countdown chain's reward variance each line resolves.")
    parser.add_argument("model", help="a causal LM folder (a run's checkpoints/step-N/model)")
    parser.add_argument("--seed", type=int, default=0, help="the task's seed (its held-out problems) and the RNG's")
    parser.add_argument("--problems", type=int, default=96)
    parser.add_argument("--chains", type=int, default=4, help="chains sampled per problem")
    parser.add_argument("--continuations", type=int, default=8, help="samples per prefix value")
    args = parser.parse_args()
    model, tokenizer = load_causal_lm(args.model)
    torch.manual_seed(args.seed)
    paths = line_value_paths(model, tokenizer, CountdownTask(seed=args.seed), args.problems, args.chains,
                             args.continuations)
    resolved = resolved_variance(paths)
    total = sum(resolved)
    print(f"{len(paths)} chains, mean reward {sum(p[-1][0] for p in paths) / len(paths):.3f}")
    print("| line | variance resolved | share |\n|---|---|---|")
    for line, value in enumerate(resolved, 1):
        share = f"{100 * value / total:.0f}%" if total > 0 else "-"  # no variance: every chain scored alike
        print(f"| {line} | {value:.4f} | {share} |")


if __name__ == "__main__":
    main()
