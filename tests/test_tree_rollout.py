"""Tree rollouts: TreeRL's advantages against a hand-computed tree, the branch-point
choice, and the sampler on a tiny random model (leaf budget, shared prefixes generated
once, log-probs that match the training forward, reproducible from the seed), and the
measurement of which lines decide a chain (``fastpo.bench.decisive_lines``)."""

import math

import pytest
import torch

import fastpo.engine.rollout as rollout_module
import fastpo.engine.tree_rollout as tree_rollout
from fastpo.bench.decisive_lines import line_value_paths, resolved_variance
from fastpo.engine.countdown import CountdownTask
from fastpo.engine.forward import encode_prompts, response_logprobs
from fastpo.engine.rollout import rollout_from_tokens
from fastpo.engine.tree_rollout import (
    branch_points, candidate_points, sample_tree, tree_advantages, treerl_advantages,
)

# A hand-drawn tree of four leaves (tokens) and their rewards:
#
#   root (V = 1/2)
#   |-- 1 (leaves 0, 1, 2; V = 2/3)
#   |   |-- 2 (leaves 0, 1; V = 1/2)
#   |   |   |-- 3 (leaf 0, r = 1)
#   |   |   `-- 4 (leaf 1, r = 0)
#   |   `-- 5 6 (leaf 2, r = 1)
#   `-- 7 8 (leaf 3, r = 0)
LEAVES = [[1, 2, 3], [1, 2, 4], [1, 5, 6], [7, 8]]
REWARDS = [1.0, 0.0, 1.0, 0.0]
# A(s) = ((V(s) - V(root)) + (V(s) - V(parent))) / sqrt(|L(s)|), worked by hand:
NODE_1 = ((2 / 3 - 1 / 2) + (2 / 3 - 1 / 2)) / math.sqrt(3)  # = (1/3) / sqrt(3)
NODE_12 = ((1 / 2 - 1 / 2) + (1 / 2 - 2 / 3)) / math.sqrt(2)  # = (-1/6) / sqrt(2)
EXPECTED = [
    [NODE_1, NODE_12, (1 - 1 / 2) + (1 - 1 / 2)],  # leaf 0's own token: +1
    [NODE_1, NODE_12, (0 - 1 / 2) + (0 - 1 / 2)],  # leaf 1's: -1
    [NODE_1, (1 - 1 / 2) + (1 - 2 / 3), (1 - 1 / 2) + (1 - 2 / 3)],  # 5/6 on both
    [(0 - 1 / 2) + (0 - 1 / 2)] * 2,  # -1 on both
]


def test_treerl_advantages_of_a_hand_computed_tree():
    got = treerl_advantages(LEAVES, REWARDS)
    assert [len(a) for a in got] == [3, 3, 3, 2]
    for row, expected in zip(got, EXPECTED):
        assert row == pytest.approx(expected, abs=1e-12)


def test_treerl_advantages_special_trees():
    # No shared prefix: 2 * (r - mean) on every token (GRPO's advantage without the std).
    flat = treerl_advantages([[1, 2], [3], [4, 5, 6]], [1.0, 0.0, 0.5])
    assert flat == [pytest.approx([1.0, 1.0]), pytest.approx([-1.0]), pytest.approx([0.0] * 3)]
    # Equal rewards: nothing to learn anywhere.
    assert treerl_advantages(LEAVES, [0.3] * 4) == [[0.0] * 3, [0.0] * 3, [0.0] * 3, [0.0] * 2]
    # A prefix shared by every leaf is the root's: advantage 0; then the leaves split.
    shared = treerl_advantages([[9, 9, 1], [9, 9, 2]], [1.0, 0.0])
    assert shared == [pytest.approx([0.0, 0.0, 1.0]), pytest.approx([0.0, 0.0, -1.0])]
    # Two identical leaves are one node of two leaves.
    twins = treerl_advantages([[1, 2], [1, 2], [3]], [1.0, 0.0, 1.0])
    mean = 2 / 3
    assert twins[0] == twins[1] == pytest.approx([2 * (0.5 - mean) / math.sqrt(2)] * 2)
    with pytest.raises(ValueError, match="2 sequences but 1 rewards"):
        treerl_advantages([[1], [2]], [1.0])


def test_tree_advantages_lay_out_per_token_and_per_group():
    tokenizer_pad = 0
    rows = [([5, 6], leaf) for leaf in LEAVES] * 2  # two prompts' groups, the same tree
    rollout = rollout_from_tokens(["p"] * 8, [""] * 8, rows, [torch.zeros(len(leaf)) for _, leaf in rows],
                                  [False] * 8, tokenizer_pad)
    rewards = torch.tensor(REWARDS + [1.0 - r for r in REWARDS])
    advantages = tree_advantages(rollout, rewards, group_size=4)
    assert advantages.shape == rollout.labels.shape and advantages.dtype == torch.float32
    assert (advantages[~rollout.mask] == 0).all()
    for i, expected in enumerate(EXPECTED):
        assert advantages[i][rollout.mask[i]].tolist() == pytest.approx(expected, abs=1e-6)
        # Flipped rewards flip every advantage (they are linear in the rewards around the mean).
        assert advantages[4 + i][rollout.mask[4 + i]].tolist() == pytest.approx([-x for x in expected], abs=1e-6)
    with pytest.raises(ValueError, match="group_size must be a positive divisor of the 8 rows"):
        tree_advantages(rollout, rewards, group_size=3)
    with pytest.raises(ValueError, match=r"rewards must have shape \(8,\)"):
        tree_advantages(rollout, rewards[:4], group_size=4)


def test_branch_points_highest_entropy_first_never_a_used_prefix():
    leaves = [[1, 2, 3], [1, 5, 4]]
    entropies = [[0.1, 0.9, 0.5], [0.1, 0.9, 0.7]]
    # Position 1 of both leaves is the same prefix [1]: offered once (the first leaf's).
    assert branch_points(candidate_points(leaves, used={()}), entropies, 3) == [(0, 1), (1, 2), (0, 2)]
    assert branch_points(candidate_points(leaves, used={(), (1,)}), entropies, 2) == [(1, 2), (0, 2)]
    # Line mode: only position 0 and positions right after a token that ends a line (2 here).
    assert branch_points(candidate_points(leaves, used=set(), line_ends={2}), entropies, 3) == [(0, 2), (0, 0)]
    assert branch_points(candidate_points(leaves, used={()}, max_prefix=1), entropies, 3) == [(0, 1)]


def test_branch_points_last_line_offers_each_leafs_last_line_start():
    # Token 2 ends a line. Leaf 0's lines start at 0, 2 and 4; leaf 1's at 0 and 2 (the
    # prefix [1, 2], which leaf 0 shares); leaf 2 is one line: it offers the root alone.
    leaves = [[1, 2, 3, 2, 4], [1, 2, 5], [6, 7]]
    entropies = [[0.0, 0.0, 0.9, 0.0, 0.1], [0.0, 0.0, 0.8], [0.5, 0.0]]

    def last_lines(used, **where):
        return branch_points(candidate_points(leaves, used=used, line_ends={2}, last_line=True, **where), entropies, 3)

    assert last_lines({()}) == [(1, 2), (0, 4)]
    assert last_lines(set()) == [(1, 2), (2, 0), (0, 4)]
    # The last line start within max_prefix: leaf 0's becomes 2, the prefix leaf 1 offers too.
    assert last_lines({()}, max_prefix=3) == [(0, 2)]
    with pytest.raises(ValueError, match="last_line=True needs line_ends"):
        candidate_points(leaves, used=set(), last_line=True)


@pytest.mark.parametrize("split", ["entropy", "line", "last_line"])
def test_sample_tree_shares_prefixes_and_keeps_its_budget(tiny_countdown, split):
    model, tokenizer = tiny_countdown
    prompts = ["4 6 8 9 to 24\n", "1 2 3 4 to 24\n"]
    torch.manual_seed(3)
    tree = sample_tree(model, tokenizer, prompts, leaves=7, initial=2, branches=2, points=1, split=split,
                       max_new_tokens=12)
    rollout = tree.rollout
    assert tree.group_size == 7 and rollout.labels.shape[0] == 14 and len(tree.prefix_lengths) == 14
    assert rollout.prompts == [prompts[0]] * 7 + [prompts[1]] * 7
    tails = [rollout.labels[i][rollout.mask[i]].tolist() for i in range(14)]
    assert all(1 <= len(t) <= 12 for t in tails)
    for g in range(2):
        group = tails[7 * g : 7 * g + 7]
        prefixes = tree.prefix_lengths[7 * g : 7 * g + 7]
        assert prefixes[:2] == [0, 0]  # the initial chains
        for leaf, prefix in zip(group[2:], prefixes[2:]):
            # Each branched leaf continues the prefix of an earlier leaf of its tree.
            assert any(other[:prefix] == leaf[:prefix] and len(other) >= prefix for other in group)
        # The decoded tokens: each leaf's own tokens, its shared prefix counted once (by its source).
        assert int(tree.generated_tokens[g]) == sum(len(t) - p for t, p in zip(group, prefixes))
        assert int(tree.generated_tokens[g]) < sum(len(t) for t in group) or not any(prefixes)
    assert any(tree.prefix_lengths[2:7]) or any(tree.prefix_lengths[9:])  # some leaf did branch mid-chain
    newline = tokenizer.convert_tokens_to_ids("\n")
    if split != "entropy":
        assert all(p == 0 or tails[i][p - 1] == newline for i, p in enumerate(tree.prefix_lengths))
    if split == "last_line":  # a branched leaf resamples the last line of a leaf before it
        for i, p in enumerate(tree.prefix_lengths):
            group = range(7 * (i // 7), i)
            assert p == 0 or any(tails[j][:p] == tails[i][:p] and newline not in tails[j][p:] for j in group)
    # The recorded log-probs (shared prefix's included) are the policy's: the training forward agrees.
    with torch.no_grad():
        logprobs = response_logprobs(model, rollout.input_ids, rollout.attention_mask, rollout.labels)
    assert torch.allclose(logprobs, rollout.rollout_logprobs, atol=1e-4)
    # The completions' texts are their tokens'.
    for i in range(14):
        assert rollout.completions[i] == tokenizer.decode(tails[i], skip_special_tokens=True)


def test_continue_prefixes_keeps_prefix_and_continuation_within_the_budget(tiny_countdown):
    # One generate call for a short and a long prefix: its budget is the short prefix's room,
    # so the long prefix's continuation is cut to its own room and flagged truncated.
    model, tokenizer = tiny_countdown
    prompt = "4 6 8 9 to 24\n"
    head = encode_prompts(tokenizer, [prompt])[0]
    short, long = (tokenizer.encode(text, add_special_tokens=False) for text in ("1", "1+2=3\n3*"))
    torch.manual_seed(0)
    continuations = rollout_module.continue_prefixes(
        model, tokenizer, [prompt] * 8, [head] * 8, [short, long] * 4, budget=12, stop_strings=["\n\n"]
    )
    cut = 0
    for prefix, (tokens, logprobs, truncated) in zip([short, long] * 4, continuations):
        assert 1 <= len(tokens) <= 12 - len(prefix) and logprobs.shape == (len(tokens),)
        assert bool(torch.all(logprobs <= 0))
        if len(tokens) == 12 - len(prefix) and prefix is long:
            cut += 1
            assert truncated
    assert cut > 0  # the case this test is about did occur
    # The log-probs are the policy's, continuing the prefix: the training forward agrees.
    tokens, logprobs, _ = continuations[1]
    ids = torch.tensor([head + long + tokens])
    labels = torch.full_like(ids, -100)
    labels[0, len(head) + len(long) - 1 : -1] = torch.tensor(tokens)
    with torch.no_grad():
        recomputed = response_logprobs(model, ids, torch.ones_like(ids), labels)
    assert torch.allclose(recomputed[labels != -100], logprobs, atol=1e-4)


@pytest.mark.parametrize("leaves, initial, points, forwarded", [(7, 2, 1, [4, 4, 4]), (5, 1, 2, [2]), (2, 2, 1, [])])
def test_sample_tree_takes_entropies_only_of_trees_that_branch_again(tiny_countdown, monkeypatch, leaves, initial,
                                                                     points, forwarded):
    # Rounds of two prompts' trees: (7, 2 initial, 1 point x 2) grows 2 -> 4 -> 6 -> 7 leaves
    # a tree, each round's new leaves measured once; (5, 1 initial, 2 points x 2) grows 1 -> 5;
    # (2, 2 initial) is full at once: a full tree's leaves are never branched from.
    rows = []

    def counting(model, input_ids, *args, **kwargs):
        rows.append(input_ids.shape[0])
        return response_logprobs(model, input_ids, *args, **kwargs)

    model, tokenizer = tiny_countdown
    monkeypatch.setattr(tree_rollout, "response_logprobs", counting)
    torch.manual_seed(5)
    tree = sample_tree(model, tokenizer, ["4 6 8 9 to 24\n", "1 2 3 4 to 24\n"], leaves=leaves, initial=initial,
                       branches=2, points=points, max_new_tokens=10)
    assert tree.rollout.labels.shape[0] == 2 * leaves
    assert rows == forwarded


@pytest.mark.parametrize("points, forwarded", [(2, []), (1, [2, 1])])
def test_sample_tree_ranks_only_trees_with_more_candidate_points_than_they_take(tiny_countdown, monkeypatch, points,
                                                                                forwarded):
    # A scripted sampler: the chains "1+2=3\n3*8" and "4*6\n24" (last lines at 6 and 4),
    # then every continuation "9\n8", a line of its own. Two points take both last lines,
    # unranked. One point ranks the two chains' (a forward of 2), then the branched leaf's
    # new last line against the other chain's (a forward of the 1 leaf not yet measured).
    model, tokenizer = tiny_countdown
    prompt = "4 6 8 9 to 24\n"
    head = encode_prompts(tokenizer, [prompt])[0]
    chains = iter(["1+2=3\n3*8", "4*6\n24"])

    def scripted(model, tokenizer, prompts, *, prompt_token_ids, **sampling):
        texts = [next(chains) if ids == head else "9\n8" for ids in prompt_token_ids]
        tails = [tokenizer.encode(text, add_special_tokens=False) for text in texts]
        return rollout_from_tokens(prompts, texts, list(zip(prompt_token_ids, tails)),
                                   [torch.zeros(len(tail)) for tail in tails], [False] * len(tails), 0)

    rows = []

    def counting(model, input_ids, *args, **kwargs):
        rows.append(input_ids.shape[0])
        return response_logprobs(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(rollout_module, "sample_completions", scripted)
    monkeypatch.setattr(tree_rollout, "response_logprobs", counting)
    tree = sample_tree(model, tokenizer, [prompt], leaves=4, initial=2, branches=1, points=points, split="last_line",
                       max_new_tokens=20)
    assert rows == forwarded
    texts = tree.rollout.completions
    assert texts[:2] == ["1+2=3\n3*8", "4*6\n24"]
    if points == 2:
        assert texts[2:] == ["1+2=3\n9\n8", "4*6\n9\n8"] and tree.prefix_lengths == [0, 0, 6, 4]


# ---------------------------------------------------------------- which lines decide a chain


def test_resolved_variance_adds_squared_value_steps_less_their_sampling_noise():
    # Two exact paths that part on line 1 and stay: line 1 resolves (1/2)^2 on each, line 2 nothing.
    exact = [[(0.5, None), (1.0, None), (1.0, None)], [(0.5, None), (0.0, None), (0.0, None)]]
    assert resolved_variance(exact) == [0.25, 0.0]
    # A value of 3 samples at 1/2 carries 1/2 * 1/2 / 2 of noise; a value of 2 samples at 1, none.
    assert resolved_variance([[(0.5, 3), (1.0, 2), (1.0, None)]]) == [0.125, 0.0]
    # A shorter path counts as resolving nothing on the lines it lacks.
    assert resolved_variance([[(0.5, None), (1.0, None)], exact[1]]) == [0.25, 0.0]
    with pytest.raises(ValueError, match="paths must hold at least one chain"):
        resolved_variance([])


def test_line_value_paths_value_each_line_start_of_each_chain(tiny_countdown):
    model, tokenizer = tiny_countdown
    task = CountdownTask()
    torch.manual_seed(0)
    paths = line_value_paths(model, tokenizer, task, problems=2, chains=3, continuations=2)
    assert len(paths) == 6
    assert paths[0][0] == paths[1][0] == paths[2][0]  # one problem's chains share its root value
    for path in paths:
        assert path[0][1] == 4 and path[-1][1] is None and all(n == 2 for _, n in path[1:-1])
        assert all(0.0 <= value <= 1.0 for value, _ in path)
        assert path[-1][0] in (0.0, 1.0)
    assert any(len(path) > 2 for path in paths)  # some chain has a line start to value
