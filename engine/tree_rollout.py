"""Tree-structured rollouts for GRPO: a tree of completions per prompt that shares its
prefixes, and per-token advantages from the tree.

Sampling follows TreeRL's EPTree (Hou et al., 2025, "TreeRL: LLM Reinforcement Learning
with On-Policy Tree Search"):

1. ``initial`` chains per prompt are sampled whole (one ``generate`` call for every
   prompt).
2. Then, round after round until every prompt has ``leaves`` leaves: each prompt's
   ``points`` branch points of highest entropy are chosen among the tokens of its tree
   (``split="entropy"``: any token; ``split="line"``: only a token that begins a line,
   i.e. a step boundary of a chain of thought; ``split="last_line"``: only the token that
   begins a leaf's last line, the answer of a chain that ends with one), never a prefix
   already branched from;
   from each, ``branches`` continuations of the prefix before that token are sampled
   (the last round takes only what the budget has left). A prefix is never generated
   again: its tokens are the prompt of the continuation's ``generate`` call (prefilled,
   one forward, with the KV cache then extended by decoding) and its log-probs are the
   ones recorded when it was first sampled.

The entropy of each sampled token (at the sampling temperature) comes from one forward
of the fused ``linear_token_logprobs(..., return_entropy=True)`` a round, over the leaves
not yet measured of the trees that must choose: a tree that takes every candidate point it
has (countdown's answer-line tree, four last lines for four points) or is full needs no
ranking, and so no forward. ``generated_tokens`` counts the decoded tokens only
(a shared prefix once): the budget that a comparison with flat GRPO holds equal.

Advantages (``tree_advantages``) are TreeRL's process supervision: with ``V(s)`` the mean
reward of the leaves below node ``s`` (a node: a maximal run of tokens shared by the same
set of leaves ``L(s)``), every token of ``s`` gets

    A(s) = ( (V(s) - V(root)) + (V(s) - V(parent(s))) ) / sqrt(|L(s)|)

the global advantage (against the whole tree) plus the local one (against the node it
branched from, i.e. its siblings' mean), scaled down for nodes that appear in many
leaves' rows (a shared prefix is trained once per leaf). TreeRL rather than TreePO: its
advantage is per token, which is what a shared prefix needs (the prefix's own value,
not each leaf's outcome repeated on it) and what ``policy_loss`` takes as a ``(B, T)``
advantage; TreePO's averages subgroup-normalized leaf rewards into one advantage per
leaf, a sequence-level signal that hands a shared prefix the conflicting advantages of
its leaves. The tree is read from the leaves' tokens themselves (a trie), so two
continuations that happen to start alike share those tokens as one node. On a group
with no shared prefix the advantage is ``2 * (r - mean)``, GRPO's without the std;
advantages are linear in the rewards, so rewards standardized per group give GRPO's
scale.

``fastpo grpo rollout=tree`` (``grpo_tree_rollout``) samples each rollout's prompts this
way, ``num_generations`` leaves a tree, divides the rewards by their group's (or the
batch's) standard deviation plus ``advantage_eps`` as ``scale_rewards`` says, and trains
on these advantages with the same ``policy_loss``; its ``generated_tokens`` metric is the
tokens decoded per leaf (the flat rollout's completion length), the budget of the
comparison.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .distributed import launched_world
from .forward import cut_at_stop, encode_prompts, generation_pad_id, prompt_width, response_logprobs
from .rollout import Rollout, continue_prefixes, rollout_from_tokens

__all__ = ["SPLITS", "GroupTrees", "TreeRollout", "branch_points", "candidate_points", "grpo_tree_rollout",
           "sample_tree", "tree_advantages", "treerl_advantages"]

SPLITS = ("entropy", "line", "last_line")


@dataclass
class TreeRollout:
    """The leaves of every prompt's tree.

    Attributes:
        rollout: one row per leaf, the ``group_size`` leaves of each prompt in a row
            (GRPO's group layout), each the whole completion (shared prefix included).
        group_size: leaves per prompt.
        generated_tokens: (prompts,) int64, tokens decoded for each prompt's tree.
        prefix_lengths: per leaf, the tokens it shares by construction with the leaf it
            branched from (0 for the initial chains).
    """

    rollout: Rollout
    group_size: int
    generated_tokens: torch.Tensor
    prefix_lengths: list[int]


@dataclass
class _Leaf:
    prompt: int
    tokens: list[int]
    logprobs: torch.Tensor  # (len(tokens),) sampling log-probs
    truncated: bool
    prefix: int
    entropy: torch.Tensor | None = None


def _check_tree_shape(leaves: int, initial: int, branches: int, points: int, split: str) -> None:
    for name, value in (("leaves", leaves), ("initial", initial), ("branches", branches), ("points", points)):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if initial > leaves:
        raise ValueError(f"initial={initial} chains exceed the budget of leaves={leaves}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")


def candidate_points(
    leaves: Sequence[Sequence[int]],
    *,
    used: set[tuple[int, ...]],
    line_ends: set[int] | None = None,
    last_line: bool = False,
    max_prefix: int | None = None,
) -> list[tuple[int, int]]:
    """The branch points ``(leaf, position)`` one tree offers, by leaf then position:
    position ``p`` of a leaf stands for its prefix ``leaf[:p]``, which must not be in
    ``used`` and is offered once (by the first leaf that has it). ``line_ends``
    (``split="line"``: the tokens whose text ends with a newline) limits the points to
    position 0 and those right after such a token; with ``last_line`` too, to the last of
    those in each leaf (its last line's start, or 0 for a leaf of one line);
    ``max_prefix`` keeps room for a continuation."""
    if last_line and line_ends is None:
        raise ValueError("last_line=True needs line_ends, the tokens that end a line")
    candidates, seen = [], set(used)
    for i, tokens in enumerate(leaves):
        positions = [
            p for p in range(len(tokens))
            if (max_prefix is None or p <= max_prefix) and (line_ends is None or p == 0 or tokens[p - 1] in line_ends)
        ]
        if last_line:
            positions = positions[-1:]
        for p in positions:
            key = tuple(tokens[:p])
            if key not in seen:
                seen.add(key)
                candidates.append((i, p))
    return candidates


def branch_points(
    candidates: list[tuple[int, int]], entropies: Sequence[Sequence[float]], count: int
) -> list[tuple[int, int]]:
    """Up to ``count`` of a tree's ``candidate_points``, highest entropy first (ties:
    earlier leaf, then earlier position); ``entropies[leaf][position]``."""
    return sorted(candidates, key=lambda point: (-float(entropies[point[0]][point[1]]), *point))[:count]


@torch.no_grad()
def sample_tree(
    model,
    tokenizer,
    prompts: list[str],
    *,
    leaves: int,
    initial: int = 2,
    branches: int = 2,
    points: int = 1,
    split: str = "entropy",
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    max_new_tokens: int = 16,
    stop_strings: list[str] = (),
    max_length: int | None = None,
) -> TreeRollout:
    """A tree of ``leaves`` completions for each prompt (module docstring). The sampling
    options are ``rollout.sample_completions``'s; ``max_new_tokens`` bounds a whole leaf,
    shared prefix included. Draws from the global torch RNG, as flat rollouts do."""
    _check_tree_shape(leaves, initial, branches, points, split)
    heads = encode_prompts(tokenizer, prompts)
    pad = generation_pad_id(tokenizer)
    # Checked here for whole leaves: a continuation's own prompt holds its prefix.
    prompt_width(heads, max_new_tokens, max_length)
    sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k, stop_strings=stop_strings)
    ends_line: dict[int, bool] = {}  # token -> its text ends with a newline, decoded once
    generated = torch.zeros(len(prompts), dtype=torch.long)

    def grow(requests: list[tuple[int, list[int], torch.Tensor]]) -> list[_Leaf]:
        """Continue each ``(prompt, prefix tokens, prefix log-probs)`` to a new leaf."""
        continuations = continue_prefixes(
            model, tokenizer, [prompts[i] for i, _, _ in requests], [heads[i] for i, _, _ in requests],
            [prefix for _, prefix, _ in requests], budget=max_new_tokens, **sampling,
        )
        new = []
        for (i, prefix, prefix_logprobs), (tokens, logprobs, truncated) in zip(requests, continuations):
            generated[i] += len(tokens)
            new.append(_Leaf(i, prefix + tokens, torch.cat([prefix_logprobs, logprobs]), truncated, len(prefix)))
        return new

    def record_entropies(unmeasured: list[_Leaf]) -> None:
        batch = layout(unmeasured, decode=False)  # only the token layout is read
        _, entropy = response_logprobs(
            model, batch.input_ids, batch.attention_mask, batch.labels, temperature=temperature, return_entropy=True
        )
        for leaf, row_entropy, row_mask in zip(unmeasured, entropy.cpu(), batch.mask):
            leaf.entropy = row_entropy[row_mask]

    def layout(items: list[_Leaf], decode: bool = True) -> Rollout:
        """The rollout of ``items``; with ``decode=False`` its completion texts are empty."""
        stops = list(stop_strings)
        if decode:
            texts = [cut_at_stop(tokenizer.decode(leaf.tokens, skip_special_tokens=True), stops) for leaf in items]
        else:
            texts = [""] * len(items)
        return rollout_from_tokens(
            [prompts[leaf.prompt] for leaf in items], texts, [(heads[leaf.prompt], leaf.tokens) for leaf in items],
            [leaf.logprobs for leaf in items], [leaf.truncated for leaf in items], pad,
        )

    was_training = model.training
    model.eval()
    empty = torch.zeros(0, dtype=torch.float32)
    trees = [[] for _ in prompts]
    for leaf in grow([(i, [], empty) for i in range(len(prompts)) for _ in range(initial)]):
        trees[leaf.prompt].append(leaf)
    used = [{()} for _ in prompts]  # prefixes already branched from (the root: the initial chains)
    while any(len(tree) < leaves for tree in trees):
        plans = []  # (prompt, leaves it still needs, points it takes, its candidate points)
        for i, tree in enumerate(trees):
            room = leaves - len(tree)
            if room <= 0:
                continue
            line_ends = None
            if split in ("line", "last_line"):
                for token in {t for leaf in tree for t in leaf.tokens} - ends_line.keys():
                    ends_line[token] = tokenizer.decode([token]).endswith("\n")
                line_ends = {t for t, ends in ends_line.items() if ends}
            candidates = candidate_points(
                [leaf.tokens for leaf in tree], used=used[i], line_ends=line_ends, last_line=split == "last_line",
                max_prefix=max_new_tokens - 1,
            )
            plans.append((i, room, min(points, math.ceil(room / branches)), candidates))
        # Entropies only rank: a tree that takes all its candidates needs none (under
        # countdown's answer-line shape, no tree does), and a leaf's are taken once.
        unranked = [leaf for i, _, wanted, candidates in plans if len(candidates) > wanted
                    for leaf in trees[i] if leaf.entropy is None]
        if unranked:
            record_entropies(unranked)
        requests = []
        for i, room, wanted, candidates in plans:
            tree = trees[i]
            if len(candidates) > wanted:
                candidates = branch_points(candidates, [leaf.entropy for leaf in tree], wanted)
            for j, p in candidates[:wanted] or [(0, 0)]:  # nothing left to branch from: new chains from the root
                source = tree[j]
                used[i].add(tuple(source.tokens[:p]))
                take = min(branches, room)
                room -= take
                requests += [(i, source.tokens[:p], source.logprobs[:p])] * take
                if room == 0:
                    break
        for leaf in grow(requests):
            trees[leaf.prompt].append(leaf)
    model.train(was_training)
    ordered = [leaf for tree in trees for leaf in tree]
    return TreeRollout(layout(ordered), leaves, generated, [leaf.prefix for leaf in ordered])


# ---------------------------------------------------------------- advantages


def treerl_advantages(sequences: Sequence[Sequence[int]], rewards: Sequence[float]) -> list[list[float]]:
    """TreeRL's advantage of every token of one prompt's leaves (module docstring):
    ``sequences[i]`` is leaf ``i``'s completion tokens, ``rewards[i]`` its reward. The
    node of token ``t`` of a leaf is the set of leaves that share its first ``t + 1``
    tokens."""
    if len(sequences) != len(rewards):
        raise ValueError(f"got {len(sequences)} sequences but {len(rewards)} rewards")
    if not sequences:
        return []
    r = torch.as_tensor(rewards, dtype=torch.float64)
    if not torch.isfinite(r).all():
        raise ValueError("rewards must be finite")
    root = float(r.mean())
    out = []
    for i, leaf in enumerate(sequences):
        # shared[j]: how many leading tokens leaf j shares with leaf i.
        shared = torch.tensor([_common_prefix(leaf, other) for other in sequences])
        # The node changes only where t reaches one of the shared lengths: count there.
        cuts = set(shared.tolist())
        node_value, node_size, parent_value = root, len(sequences), root
        advantages = []
        for t in range(len(leaf)):
            if t == 0 or t in cuts:
                below = shared > t
                size = int(below.sum())
            if size != node_size:  # a new node starts at t; the one before is its parent
                parent_value, node_value, node_size = node_value, float(r[below].mean()), size
            advantages.append(((node_value - root) + (node_value - parent_value)) / math.sqrt(node_size))
        out.append(advantages)
    return out


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tree_advantages(rollout: Rollout, rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(B, T)`` float32 per-token advantages of a tree rollout's rows (``group_size``
    leaves per prompt, consecutive), at the completion tokens (``rollout.mask``), 0
    elsewhere: the ``advantages`` that ``policy_loss`` takes."""
    batch = rollout.labels.shape[0]
    if rewards.shape != (batch,):
        raise ValueError(f"rewards must have shape ({batch},), got {tuple(rewards.shape)}")
    if not (isinstance(group_size, int) and group_size >= 1 and batch % group_size == 0):
        raise ValueError(f"group_size must be a positive divisor of the {batch} rows, got {group_size!r}")
    mask = rollout.mask
    sequences = [rollout.labels[i][mask[i]].tolist() for i in range(batch)]
    advantages = torch.zeros(rollout.labels.shape, dtype=torch.float32)
    for start in range(0, batch, group_size):
        group = treerl_advantages(sequences[start : start + group_size], rewards[start : start + group_size].tolist())
        for offset, values in enumerate(group):
            advantages[start + offset][mask[start + offset]] = torch.tensor(values, dtype=torch.float32)
    return advantages


# ---------------------------------------------------------------- GRPO's rollout=tree


@dataclass
class GroupTrees:
    """One GRPO rollout sampled as trees: ``rollout`` (a leaf a row, GRPO's group layout),
    ``rewards`` (B,), per-token ``advantages`` (B, T), and ``generated`` (B,) float32,
    the tokens decoded for each leaf (its length less the prefix it branched from)."""

    rollout: Rollout
    rewards: torch.Tensor
    advantages: torch.Tensor
    generated: torch.Tensor


def _scaled_rewards(rewards: torch.Tensor, group_size: int, scale: str, eps: float) -> torch.Tensor:
    """``rewards`` divided by their group's (``"group"``) or the batch's (``"batch"``)
    standard deviation (unbiased, as ``group_advantages``) plus ``eps``; ``"none"``
    leaves them. TreeRL's advantages center them themselves."""
    if scale == "none":
        return rewards
    if scale == "batch":
        return rewards / (rewards.std() + eps)
    groups = rewards.view(-1, group_size)
    return (groups / (groups.std(dim=1, keepdim=True) + eps)).flatten()


def grpo_tree_rollout(model, tokenizer, rows: list[dict], rewards_fn, config) -> GroupTrees:
    """The rollout of ``fastpo grpo rollout=tree``: ``rows`` are the rollout's rows, each
    prompt's ``num_generations`` times in a row (``OnlineRun.prompt_rows``), scored by
    ``rewards_fn(prompts, completions, rows)``; the tree and sampling options are
    ``config``'s. One process only (a tree is not split across ranks)."""
    if launched_world()[1] > 1:
        raise NotImplementedError("grpo: rollout=tree samples on one process; run it without torchrun")
    group = config.num_generations
    tree = sample_tree(
        model, tokenizer, [row["prompt"] for row in rows[::group]], leaves=group, initial=config.tree_initial,
        branches=config.tree_branches, points=config.tree_points, split=config.tree_split,
        temperature=config.temperature, top_p=config.top_p, top_k=config.top_k, max_new_tokens=config.max_new_tokens,
        stop_strings=config.stop_strings, max_length=config.max_length,
    )
    rollout = tree.rollout
    rewards = rewards_fn(rollout.prompts, rollout.completions, rows)
    scaled = _scaled_rewards(rewards, group, config.scale_rewards, config.advantage_eps)
    generated = rollout.mask.sum(-1) - torch.tensor(tree.prefix_lengths)
    return GroupTrees(rollout, rewards, tree_advantages(rollout, scaled, group), generated.float())
