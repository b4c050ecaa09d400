"""The inference strategies: each search on a stub proposer with known values (BFS keeps
the best b, DFS backtracks and keeps to its budget, the vote breaks ties the same way
every time), the model's self-evaluation against a plain forward, and one smoke run of
every strategy on a tiny random model whose counters must agree with what it did."""

import pytest
import torch

from fastpo.engine.countdown import CountdownTask
from fastpo.engine.reasoning import (
    STRATEGIES,
    LanguageModelReasoner,
    ReasoningOptions,
    State,
    evaluate_strategy,
    format_table,
    majority_vote,
    run_strategy,
    tot_bfs,
    tot_dfs,
)
from fastpo.engine.reasoning import SearchTrace

GAME24_LINES = ["4 * 6 = 24 (left: 8 9 24)", "9 - 8 = 1 (left: 24 1)", "24 * 1 = 24 (left: 24)", "answer: (4*6)*(9-8)"]


class StubReasoner:
    """A known tree: ``children[lines]`` are the lines proposed after ``lines`` (the first
    ``k``); a line starting with "answer" ends a chain. Records what it expanded."""

    def __init__(self, children, prompts=("",), completions=None):
        self.children, self.prompts, self.completions = children, list(prompts), completions or {}
        self.expanded = []

    def is_final(self, state):
        return bool(state.lines) and state.lines[-1].startswith("answer")

    def propose(self, states, k):
        self.expanded += [state.lines for state in states]
        return [self.children.get(state.lines, [])[:k] for state in states]

    def complete(self, states, *, greedy, samples=1):
        return [self.completions[state.lines][:samples] for state in states]


def stub_value(values):
    return lambda states: [values[state.lines] for state in states]


# ---------------------------------------------------------------- breadth first


def test_bfs_keeps_the_best_b_at_every_step():
    children = {
        (): ["a", "b", "c", "d"],
        ("b",): ["b1", "b2"], ("d",): ["d1", "d2"], ("c",): ["c1"], ("a",): ["a1"],
        ("d", "d1"): ["answer: d"], ("b", "b2"): ["answer: b"],
    }
    values = {
        ("a",): 0.2, ("b",): 0.9, ("c",): 0.5, ("d",): 0.7,
        ("b", "b1"): 0.3, ("b", "b2"): 0.6, ("d", "d1"): 0.8, ("d", "d2"): 0.1,
        ("d", "d1", "answer: d"): 0.95, ("b", "b2", "answer: b"): 0.4,
    }
    reasoner = StubReasoner(children)
    best = tot_bfs([State(0)], reasoner, stub_value(values), breadth=2, proposals=4, depth=3)
    # Step 1 keeps b (0.9) and d (0.7); step 2 keeps d1 (0.8) and b2 (0.6) of b1, b2, d1, d2.
    assert reasoner.expanded == [(), ("b",), ("d",), ("d", "d1"), ("b", "b2")]
    assert best == [State(0, ("d", "d1", "answer: d"))]


def test_bfs_ties_keep_the_first_proposed_and_answers_wait_in_the_frontier():
    children = {(): ["x", "y", "answer: early"], ("x",): ["x1"], ("y",): ["y1"]}
    values = {("x",): 0.5, ("y",): 0.5, ("answer: early",): 0.6, ("x", "x1"): 0.55, ("y", "y1"): 0.7}
    reasoner = StubReasoner(children)
    # breadth 2: the answer (0.6) and x (first of the tied 0.5s) survive step 1.
    best = tot_bfs([State(0)], reasoner, stub_value(values), breadth=2, proposals=3, depth=2)
    assert reasoner.expanded == [(), ("x",)]
    assert best == [State(0, ("answer: early",))]  # 0.6 beats x1's 0.55
    # The same search again: the same result (stable order, nothing random).
    assert tot_bfs([State(0)], StubReasoner(children), stub_value(values), breadth=2, proposals=3, depth=2) == best


def test_bfs_values_each_state_once_and_runs_every_root_together():
    calls = []

    def value(states):
        calls.append(list(states))
        return [len(state.lines[-1]) / 10 for state in states]

    children = {(): ["aa", "a"], ("aa",): ["answer: 1"], ("a",): ["answer: 22"]}
    reasoner = StubReasoner(children, prompts=["p0", "p1"])
    best = tot_bfs([State(0), State(1)], reasoner, value, breadth=2, proposals=2, depth=3)
    assert best == [State(0, ("a", "answer: 22")), State(1, ("a", "answer: 22"))]
    assert len(calls) == 2  # one batched call per step with open states, both roots in it
    valued = [state for call in calls for state in call]
    assert len(valued) == len(set(valued)) == 8


# ---------------------------------------------------------------- depth first


def test_dfs_backtracks_and_prunes():
    children = {
        (): ["A", "B", "C"],
        ("A",): ["A1", "A2"],  # both below the threshold: A is a dead end
        ("B",): ["answer: wrong", "answer: right"],
        ("C",): ["answer: never"],
    }
    values = {
        ("A",): 0.9, ("B",): 0.6, ("C",): 0.1,
        ("A", "A1"): 0.2, ("A", "A2"): 0.1,
        ("B", "answer: wrong"): 0.0, ("B", "answer: right"): 1.0,
    }
    reasoner, trace = StubReasoner(children), SearchTrace()
    found = tot_dfs(State(0), reasoner, stub_value(values), proposals=3, threshold=0.25, budget=10, depth=3,
                    trace=trace)
    assert found == State(0, ("B", "answer: right"))
    assert [s.lines for s in trace.expanded] == [(), ("A",), ("B",)]  # C (0.1) pruned, never expanded


def test_dfs_respects_its_node_budget_and_returns_the_best_state_seen():
    # An endless chain of states all above the threshold, no answer anywhere.
    children = {tuple("s" * n): ["s", "t"] for n in range(20)}
    values = {tuple("s" * n) + (last,): (0.5 if last == "s" else 0.4) for n in range(20) for last in "st"}
    reasoner, trace = StubReasoner(children), SearchTrace()
    best = tot_dfs(State(0), reasoner, stub_value(values), proposals=2, threshold=0.25, budget=4, depth=50, trace=trace)
    assert len(trace.expanded) == 4 == len(reasoner.expanded)
    assert [len(s.lines) for s in trace.expanded] == [0, 1, 2, 3]  # always the best child first
    assert best == State(0, tuple("ssss"))  # the deepest of the equally valued states seen
    # The depth limit stops expansion too: depth 2 leaves only states of up to 2 lines to expand.
    trace = SearchTrace()
    tot_dfs(State(0), StubReasoner(children), stub_value(values), proposals=2, threshold=0.25, budget=50, depth=2,
            trace=trace)
    assert max(len(s.lines) for s in trace.expanded) == 1 and len(trace.expanded) == 3  # root, s, t


# ---------------------------------------------------------------- voting


def test_majority_vote_breaks_ties_by_first_occurrence():
    assert majority_vote(["b", "a", "b", "a", None]) == 0  # b and a tie at 2: b's vote came first
    assert majority_vote(["a", "b", "b", "a"]) == 0
    assert majority_vote([None, "c", "d", "d"]) == 2
    assert majority_vote([None, None]) == 0
    assert majority_vote(["x", None, "y"]) == 0


def test_self_consistency_votes_on_the_canonical_answer():
    task = CountdownTask()
    prompt = task.prompt((4, 6, 8, 9), 24)
    chains = [
        "answer: (4*6)+(9-8)",  # 25, the first chain
        "4 * 6 = 24 (left: 8 9 24)\nanswer: (9-8)*(6*4)",
        "answer: 4*6*(9-8)",  # the same canonical answer as the chain above
        "answer: (4*6)+(9-8)",
        "not an answer",
    ]
    reasoner = StubReasoner({}, prompts=[prompt], completions={(): chains})
    options = ReasoningOptions(samples=5)
    # Two votes each for 25's expression and for (9-8)*(6*4): the first vote decides.
    assert run_strategy("self_consistency", reasoner, task, 1, options) == [chains[0]]
    reasoner.completions[()] = chains[1:]
    assert run_strategy("self_consistency", reasoner, task, 1, ReasoningOptions(samples=4)) == [chains[1]]


# ---------------------------------------------------------------- options


@pytest.mark.parametrize(
    "kwargs, match",
    [({"samples": 0}, "'samples'"), ({"breadth": 1.5}, "'breadth'"), ({"value": "oracle"}, "'value'"),
     ({"threshold": 1.5}, "'threshold'"), ({"temperature": 0}, "'temperature'"),
     ({"chain_temperature": -0.5}, "'chain_temperature'"),
     ({"node_budget": True}, "'node_budget'")],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ReasoningOptions(**kwargs)


def test_unknown_strategy():
    with pytest.raises(ValueError, match="strategy 'beam' is not one of direct, cot"):
        run_strategy("beam", StubReasoner({}), CountdownTask(), 1, ReasoningOptions())


# ---------------------------------------------------------------- on a tiny model


def test_self_values_match_a_plain_forward(tiny_countdown):
    model, tokenizer = tiny_countdown
    task = CountdownTask()
    prompt = task.prompt((4, 6, 8, 9), 24)
    states = [State(0), State(0, ("4 * 6 = 24 (left: 8 9 24)",)), State(0, ("garbage",))]
    reasoner = LanguageModelReasoner(model, tokenizer, task, [prompt], ReasoningOptions())
    values = reasoner.self_values(states)
    assert values[2] == 0.0  # a step that does not parse: no model call for it
    assert reasoner.calls == [1] and reasoner.evaluations == [2] and reasoner.tokens == [0]
    # Reference: the full logits of each label, log-softmax, summed over the label and eos.
    for state, value, numbers in zip(states, values, [(4, 6, 8, 9), (8, 9, 24)]):
        text = f"{' '.join(map(str, numbers))} to 24 value:"
        scores = []
        for label in (" sure", " likely", " impossible"):
            head = [tokenizer.bos_token_id] + tokenizer.encode(text)
            tail = tokenizer.encode(label) + [tokenizer.eos_token_id]
            with torch.no_grad():
                logits = model(torch.tensor([head + tail])).logits[0].double()
            logprobs = logits.log_softmax(-1)
            scores.append(sum(float(logprobs[len(head) - 1 + k, t]) for k, t in enumerate(tail)))
        weights = torch.tensor(scores, dtype=torch.float64).softmax(0)
        assert value == pytest.approx(float(weights @ torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)), abs=1e-5)


def test_head_values_are_the_value_models_sigmoid_score_of_the_value_prompt(tiny_countdown, tiny_value_model):
    model, tokenizer = tiny_countdown
    value_model, value_tokenizer = tiny_value_model
    task = CountdownTask()
    prompt = task.prompt((4, 6, 8, 9), 24)
    states = [State(0), State(0, ("4 * 6 = 24 (left: 8 9 24)",)), State(0, ("garbage",))]
    reasoner = LanguageModelReasoner(model, tokenizer, task, [prompt], ReasoningOptions(value="head"),
                                     (value_model, value_tokenizer))
    values = reasoner.values("head")(states)
    assert values[2] == 0.0  # a step that does not parse: not valued
    assert reasoner.calls == [1] and reasoner.evaluations == [2] and reasoner.tokens == [0]
    # Reference: the score head on the last hidden state of bos + value prompt + eos, alone.
    for value, numbers in zip(values, [(4, 6, 8, 9), (8, 9, 24)]):
        text = f"{' '.join(map(str, numbers))} to 24 value:"
        ids = [value_tokenizer.bos_token_id] + value_tokenizer.encode(text) + [value_tokenizer.eos_token_id]
        with torch.no_grad():
            hidden = value_model.base_model(torch.tensor([ids])).last_hidden_state[0, -1].double()
        score = hidden @ value_model.score.weight[0].double()
        assert value == pytest.approx(float(torch.sigmoid(score)), abs=1e-5)
    assert len(set(values[:2])) == 2  # the two states are told apart
    # head_checked: the head where the verifier finds every step valid, 0 elsewhere.
    wrong = State(0, ("4 * 6 = 25 (left: 8 9 25)",))
    assert reasoner.values("head_checked")([states[1], wrong]) == [pytest.approx(values[1]), 0.0]
    with pytest.raises(ValueError, match="value 'head' needs the reasoner's value_model"):
        LanguageModelReasoner(model, tokenizer, task, [prompt], ReasoningOptions()).head_values(states)


@pytest.mark.parametrize(
    "strategy, value",
    [(s, "self") for s in STRATEGIES]
    + [(s, v) for s in ("tot_bfs", "tot_dfs") for v in ("verifier", "self_checked", "head", "head_checked")],
)
def test_each_strategy_on_a_tiny_model_counts_what_it_did(tiny_countdown, tiny_value_model, strategy, value):
    model, tokenizer = tiny_countdown
    task = CountdownTask()
    problems = [((4, 6, 8, 9), 24), ((1, 2, 3, 4), 24), ((2, 3, 4, 12), 24)]
    options = ReasoningOptions(samples=3, breadth=2, proposals=2, node_budget=3, value=value,
                               max_line_tokens=10, max_chain_tokens=20)
    torch.manual_seed(1)
    report = evaluate_strategy(model, tokenizer, task, problems, strategy, options, tiny_value_model)
    assert report["strategy"] == strategy and report["problems"] == 3 and 0.0 <= report["accuracy"] <= 1.0
    assert report["generated_tokens"] > 0 and report["wall_seconds"] > 0
    depth = 4  # 3 steps and the answer
    if strategy in ("direct", "cot"):
        assert report["model_calls"] == 1 and report["generated_tokens"] <= options.max_chain_tokens
    elif strategy == "self_consistency":
        assert report["model_calls"] == 1 and report["generated_tokens"] <= 3 * options.max_chain_tokens
    elif strategy == "tot_bfs":
        # At most: a proposal call and an evaluation call per step, then one greedy finish.
        assert 1 <= report["model_calls"] <= 2 * depth + 1
        assert report["generated_tokens"] <= depth * 2 * 2 * options.max_line_tokens + options.max_chain_tokens
    else:
        assert 1 <= report["model_calls"] <= 2 * options.node_budget + 1
        budget = options.node_budget * 2 * options.max_line_tokens + options.max_chain_tokens
        assert report["generated_tokens"] <= budget
    if value != "self" and strategy.startswith("tot_"):
        assert report["evaluations"] <= report["model_calls"] * options.batch_size
    if value == "verifier" or strategy in ("direct", "cot", "self_consistency"):
        assert report["evaluations"] == 0  # the verifier costs no model call
    assert format_table([report]).count("\n") == 2


def test_chains_and_proposed_lines_are_sampled_at_their_own_temperatures(tiny_countdown, monkeypatch):
    from fastpo.engine import reasoning

    model, tokenizer = tiny_countdown
    task = CountdownTask()
    seen = []
    sample = reasoning.sample_completions

    def recording_sample(*args, **kwargs):
        seen.append((kwargs["temperature"], kwargs["top_k"], tuple(kwargs["stop_strings"])))
        return sample(*args, **kwargs)

    monkeypatch.setattr(reasoning, "sample_completions", recording_sample)
    options = ReasoningOptions(samples=2, proposals=2, breadth=1, temperature=0.9, chain_temperature=0.3,
                               value="verifier", max_line_tokens=4, max_chain_tokens=6)
    evaluate_strategy(model, tokenizer, task, [((4, 6, 8, 9), 24)], "self_consistency", options)
    assert seen == [(0.3, 0, ())]
    seen.clear()
    evaluate_strategy(model, tokenizer, task, [((4, 6, 8, 9), 24)], "tot_bfs", options)
    proposals = [call for call in seen if call[2] == ("\n",)]
    assert proposals and all(call[:2] == (0.9, 0) for call in proposals)
    assert all(call[:2] == (1.0, 1) for call in seen if call[2] != ("\n",))  # the greedy finish


def test_checked_values_combine_the_verifier_and_the_model(tiny_countdown):
    model, tokenizer = tiny_countdown
    task = CountdownTask()
    prompt = task.prompt((4, 6, 8, 9), 24)
    states = [
        State(0, ("4 * 6 = 24 (left: 8 9 24)",)),  # valid: the model judges it
        State(0, ("4 * 6 = 25 (left: 8 9 25)",)),  # wrong arithmetic: 0 without asking the model
        State(0, tuple(GAME24_LINES)),  # a correct answered chain: 1
        State(0, tuple(GAME24_LINES[:-1]) + ("answer: (4*6)+(9-8)",)),  # a wrong answer: 0
    ]
    reasoner = LanguageModelReasoner(model, tokenizer, task, [prompt], ReasoningOptions())
    checked = reasoner.checked_values(states)
    assert reasoner.evaluations == [1]  # only the valid open state reached the model
    assert checked[1:] == [0.0, 1.0, 0.0]
    assert checked[0] == pytest.approx(reasoner.self_values(states[:1])[0])


def test_searches_count_proposals_and_evaluations_exactly(tiny_countdown):
    model, tokenizer = tiny_countdown
    task = CountdownTask()
    prompts = [task.prompt((4, 6, 8, 9), 24), task.prompt((1, 2, 3, 4), 24)]
    options = ReasoningOptions(breadth=2, proposals=2, max_line_tokens=6, max_chain_tokens=8)
    reasoner = LanguageModelReasoner(model, tokenizer, task, prompts, options)
    # One step of BFS by hand: one proposal call for both roots, then one self-evaluation.
    torch.manual_seed(2)
    lines = reasoner.propose([State(0), State(1)], 2)
    assert [len(x) for x in lines] == [2, 2] and reasoner.calls == [1, 1]
    assert 2 <= reasoner.tokens[0] <= 2 * 6 and 2 <= reasoner.tokens[1] <= 2 * 6
    children = [State(0, (line,)) for line in lines[0]] + [State(1, (line,)) for line in lines[1]]
    reasoner.self_values(children)
    parsed = [task.state_numbers(prompts[s.problem], s.lines) is not None for s in children]
    assert reasoner.evaluations == [sum(parsed[:2]), sum(parsed[2:])]
    assert reasoner.calls == [1 + any(parsed[:2]), 1 + any(parsed[2:])]
