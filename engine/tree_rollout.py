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
of the fused ``linear_token_logprobs(..., return_entropy=True)`` over each round's new
leaves, only those of trees that will branch again (a full tree's leaves are never branch
points, so the last round skips it). ``generated_tokens`` counts the decoded tokens only
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
from .rollout import Rollout, rollout_from_tokens, sample_completions

__all__ = ["SPLITS", "GroupTrees", "TreeRollout", "branch_points", "grpo_tree_rollout", "sample_tree",
           "tree_advantages", "treerl_advantages"]

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


def branch_points(
    leaves: Sequence[Sequence[int]],
    entropies: Sequence[Sequence[float]],
    count: int,
    *,
    used: set[tuple[int, ...]],
    line_ends: set[int] | None = None,
    last_line: bool = False,
    max_prefix: int | None = None,
) -> list[tuple[int, int]]:
    """Up to ``count`` branch points ``(leaf, position)`` of one tree, highest entropy
    first (ties: earlier leaf, then earlier position): position ``p`` of a leaf stands
    for its prefix ``leaf[:p]``, which must not be in ``used`` nor chosen twice (leaves
    that share it offer it once). ``line_ends`` (``split="line"``: the tokens whose text
    ends with a newline) limits the points to position 0 and those right after such a
    token; with ``last_line`` too, to the last of those in each leaf (its last line's
    start, or 0 for a leaf of one line); ``max_prefix`` keeps room for a continuation."""
    if last_line and line_ends is None:
        raise ValueError("last_line=True needs line_ends, the tokens that end a line")
    candidates = []
    for i, (tokens, entropy) in enumerate(zip(leaves, entropies)):
        positions = [
            p for p in range(len(tokens))
            if (max_prefix is None or p <= max_prefix) and (line_ends is None or p == 0 or tokens[p - 1] in line_ends)
        ]
        if last_line:
            positions = positions[-1:]
        candidates += [(-float(entropy[p]), i, p) for p in positions]
    chosen, seen = [], set(used)
    for _, i, p in sorted(candidates):
        key = tuple(leaves[i][:p])
        if key not in seen:
            seen.add(key)
            chosen.append((i, p))
            if len(chosen) == count:
                break
    return chosen


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
        shortest = min(len(prefix) for _, prefix, _ in requests)
        rollout = sample_completions(
            model, tokenizer, [prompts[i] for i, _, _ in requests], max_new_tokens=max_new_tokens - shortest,
            prompt_token_ids=[heads[i] + prefix for i, prefix, _ in requests], **sampling,
        )
        new = []
        for row, (i, prefix, prefix_logprobs) in enumerate(requests):
            kept = rollout.mask[row]
            tokens = prefix + rollout.labels[row][kept].tolist()
            logprobs = torch.cat([prefix_logprobs, rollout.rollout_logprobs[row][kept]])
            truncated = bool(rollout.truncated[row])
            if len(tokens) > max_new_tokens:  # a longer prefix leaves less room
                tokens, logprobs, truncated = tokens[:max_new_tokens], logprobs[:max_new_tokens], True
            generated[i] += len(tokens) - len(prefix)
            new.append(_Leaf(i, tokens, logprobs, truncated, len(prefix)))
        return new

    def add(new: list[_Leaf]) -> None:
        """Put ``new`` in their trees; record the entropies of those whose tree will be
        branched again (a full tree's never are: the last round's forward is skipped)."""
        for leaf in new:
            trees[leaf.prompt].append(leaf)
        growing = [leaf for leaf in new if len(trees[leaf.prompt]) < leaves]
        if growing:
            record_entropies(growing)

    def record_entropies(new: list[_Leaf]) -> None:
        batch = layout(new, decode=False)  # only the token layout is read
        _, entropy = response_logprobs(
            model, batch.input_ids, batch.attention_mask, batch.labels, temperature=temperature, return_entropy=True
        )
        for leaf, row_entropy, row_mask in zip(new, entropy.cpu(), batch.mask):
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
    add(grow([(i, [], empty) for i in range(len(prompts)) for _ in range(initial)]))
    used = [{()} for _ in prompts]  # prefixes already branched from (the root: the initial chains)
    while any(len(tree) < leaves for tree in trees):
        requests = []
        for i, tree in enumerate(trees):
            room = leaves - len(tree)
            if room <= 0:
                continue
            wanted = min(points, math.ceil(room / branches))
            line_ends = None
            if split in ("line", "last_line"):
                for token in {t for leaf in tree for t in leaf.tokens} - ends_line.keys():
                    ends_line[token] = tokenizer.decode([token]).endswith("\n")
                line_ends = {t for t, ends in ends_line.items() if ends}
            chosen = branch_points(
                [leaf.tokens for leaf in tree], [leaf.entropy for leaf in tree], wanted,
                used=used[i], line_ends=line_ends, last_line=split == "last_line", max_prefix=max_new_tokens - 1,
            ) or [(0, 0)]  # nothing left to branch from: new chains from the root
            for j, p in chosen:
                source = tree[j]
                used[i].add(tuple(source.tokens[:p]))
                take = min(branches, room)
                room -= take
                requests += [(i, source.tokens[:p], source.logprobs[:p])] * take
                if room == 0:
                    break
        add(grow(requests))
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
