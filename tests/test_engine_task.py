"""The built-in addition task: determinism, the held-out split, the verifier, the generators."""

import json

import pytest

from fastpo.engine.data import ALGORITHM_SCHEMAS, SCHEMAS, load_dataset
from fastpo.engine.task import AdditionTask


def _operands(prompt):
    a, b = prompt.rstrip("=").split("+")
    return int(a), int(b)


def _answer(prompt):
    a, b = _operands(prompt)
    return a + b


def test_generators_are_deterministic_per_seed():
    task, same, other = AdditionTask(seed=1), AdditionTask(seed=1), AdditionTask(seed=2)
    for generate in ("sft_examples", "preference_pairs", "unary_examples"):
        rows = getattr(task, generate)(50)
        assert rows == getattr(same, generate)(50) and rows != getattr(other, generate)(50), generate
        assert getattr(task, generate)(20, "heldout") == getattr(same, generate)(20, "heldout")
    assert task.rankings(30, k=3) == same.rankings(30, k=3) != other.rankings(30, k=3)
    # A stream's first rows do not depend on how many are asked for.
    assert task.sft_examples(80)[:50] == task.sft_examples(50)


def test_heldout_split_is_disjoint_and_seed_independent():
    task = AdditionTask(digits=2, seed=0)
    heldout = {(a, b) for a in range(100) for b in range(100) if task.is_heldout(a, b)}
    assert 0.07 < len(heldout) / 10_000 < 0.13  # close to heldout_fraction = 0.1
    assert heldout == {(a, b) for a in range(100) for b in range(100) if AdditionTask(seed=9).is_heldout(a, b)}
    for seed in range(3):
        seeded = AdditionTask(digits=2, seed=seed)
        train = seeded.problems(3000)
        assert not set(train) & heldout
        assert all(0 <= a < 100 and 0 <= b < 100 for a, b in train)
        for rows in (seeded.sft_examples(500), seeded.preference_pairs(500), seeded.unary_examples(500),
                     seeded.rankings(500)):
            assert not {_operands(row["prompt"]) for row in rows} & heldout
        drawn = seeded.problems(len(heldout), "heldout")
        assert len(set(drawn)) == len(drawn) and set(drawn) == heldout
    with pytest.raises(ValueError, match=f"exceeds the {len(heldout)} held-out problems"):
        task.problems(len(heldout) + 1, "heldout")
    big = AdditionTask(digits=4, seed=0)  # drawn, not enumerated
    drawn = big.problems(300, "heldout")
    assert len(set(drawn)) == 300 and all(big.is_heldout(a, b) for a, b in drawn)
    assert not any(big.is_heldout(a, b) for a, b in big.problems(300))


@pytest.mark.parametrize(
    "prompt, completion, expected",
    [("12+34=", "46", 1.0), ("12+34=", " 46 ", 1.0), ("12+34=", "46\nmore text", 1.0), ("0+0=", "0", 1.0),
     ("99+1=", "100", 1.0), ("12+34=", "45", 0.0), ("12+34=", "046", 0.0), ("12+34=", "", 0.0),
     ("12+34=", "4 6", 0.0), ("12+34=", "+46", 0.0), ("12+34=", "\n46", 0.0)],
)
def test_verifier(prompt, completion, expected):
    assert AdditionTask.verify(prompt, completion) == expected


def test_verifier_rejects_other_prompts_and_batches():
    for prompt in ("12-34=", "12+34", "a+b=", "Q: 1+2="):
        with pytest.raises(ValueError, match="not an addition prompt"):
            AdditionTask.verify(prompt, "3")
    task = AdditionTask()
    assert task.reward(["1+2=", "5+5="], ["3", "11"], answer=["3", "10"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        task.reward(["1+2=", "5+5="], ["3"])


def test_sft_and_unary_rows():
    task = AdditionTask(seed=5)
    for row in task.sft_examples(200) + task.sft_examples(50, "heldout"):
        assert row["completion"] == str(_answer(row["prompt"]))
    rows = task.unary_examples(200)
    assert [row["label"] for row in rows] == [i % 2 == 0 for i in range(200)]
    for row in rows:
        correct = row["completion"] == str(_answer(row["prompt"]))
        assert correct == row["label"] == (task.verify(row["prompt"], row["completion"]) == 1.0)
        assert 0 < abs(int(row["completion"]) - _answer(row["prompt"])) <= task.max_distance or correct


def test_preference_pairs_prefer_the_correct_answer():
    task = AdditionTask(seed=3, max_distance=7)
    distances = set()
    for row in task.preference_pairs(400):
        answer = _answer(row["prompt"])
        assert row["chosen"] == str(answer)
        rejected = int(row["rejected"])
        assert rejected >= 0 and row["rejected"] == str(rejected)
        distances.add(abs(rejected - answer))
    assert distances == set(range(1, 8))  # every distance 1..max_distance occurs, never 0


@pytest.mark.parametrize("k", [2, 4, 6])
def test_rankings_are_ordered_by_distance(k):
    task = AdditionTask(seed=4, max_distance=10)
    for row in task.rankings(200, k=k):
        answer = _answer(row["prompt"])
        responses = row["responses"]
        assert len(responses) == k and responses[0] == str(answer)
        distances = [abs(int(r) - answer) for r in responses]
        assert distances[0] == 0 and all(x < y for x, y in zip(distances, distances[1:]))
        assert all(int(r) >= 0 for r in responses)
    with pytest.raises(ValueError, match="k must be in"):
        task.rankings(1, k=12)


def test_bad_task_arguments():
    with pytest.raises(ValueError, match="digits"):
        AdditionTask(digits=0)
    with pytest.raises(ValueError, match="heldout_fraction"):
        AdditionTask(heldout_fraction=1.0)
    with pytest.raises(ValueError, match="max_distance"):
        AdditionTask(max_distance=0)
    with pytest.raises(ValueError, match="split must be one of train, heldout"):
        AdditionTask().sft_examples(1, "test")
    with pytest.raises(ValueError, match="schema 'pairs'"):
        AdditionTask().rows("pairs", 1)


@pytest.mark.parametrize("algorithm", list(ALGORITHM_SCHEMAS))
def test_task_rows_load_back_as_each_algorithms_data(algorithm, tmp_path):
    task = AdditionTask(seed=0)
    for schema in ALGORITHM_SCHEMAS[algorithm]:
        rows = task.rows(schema, 20)
        # Prompt rows carry the answer as an extra field, for reward functions.
        extra = {"completion"} if schema == "prompt" else set()
        assert all(set(row) == set(SCHEMAS[schema]) | extra for row in rows)
        path = tmp_path / f"{schema}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        assert load_dataset(path, algorithm) == (schema, rows)
