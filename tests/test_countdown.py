"""The built-in countdown task: solver and verifier on hand-worked cases, the expression
parser, the generators (determinism, split, difficulty knob), the rewards, the rows as
loader data, and the character tokenizer's cover of the format."""

import itertools
import json
import random

import pytest

from fastpo.engine.countdown import CountdownTask, Step, min_steps, moves, parse_expression
from fastpo.engine.data import ALGORITHM_SCHEMAS, SCHEMAS, load_dataset
from fastpo.engine.tokenizer import CHARACTERS, SPECIAL_TOKENS, build_char_tokenizer

GAME24 = "4 6 8 9 to 24\n"
GAME24_CHAIN = "4 * 6 = 24 (left: 8 9 24)\n9 - 8 = 1 (left: 24 1)\n24 * 1 = 24 (left: 24)\nanswer: (4*6)*(9-8)"


# ---------------------------------------------------------------- solver


def test_moves_from_hand_worked_states():
    # 3 - 3 = 0 is not positive: only three moves; each pair once, larger number first.
    assert moves((3, 3)) == [Step(3, "+", 3, 6, (6,)), Step(3, "*", 3, 9, (9,)), Step(3, "/", 3, 1, (1,))]
    assert [(s.a, s.op, s.b, s.c) for s in moves((2, 6))] == [
        (6, "+", 2, 8), (6, "-", 2, 4), (6, "*", 2, 12), (6, "/", 2, 3)]
    # 7 / 2 is not an integer: no division move; the numbers not used stay, in order.
    assert [s.line() for s in moves((2, 7, 5)) if s.a == 7 and s.b == 2] == [
        "7 + 2 = 9 (left: 5 9)", "7 - 2 = 5 (left: 5 5)", "7 * 2 = 14 (left: 5 14)"]


@pytest.mark.parametrize(
    "numbers, target, use_all, expected",
    [((4, 6, 8, 9), 24, True, 3), ((2, 12), 24, True, 1), ((24,), 24, True, 0), ((1, 1, 1, 1), 24, True, None),
     ((3, 3, 8, 8), 24, True, None),  # 8 / (3 - 8/3) needs a fraction
     ((1, 2, 3, 4), 24, True, 3), ((5, 5, 5, 1), 24, True, None),  # (5 - 1/5) * 5 needs a fraction
     ((24, 5), 24, False, 0), ((4, 6, 100), 24, False, 1), ((4, 6, 100), 24, True, None),
     ((12, 3, 1, 6), 24, True, 3)],
)
def test_min_steps(numbers, target, use_all, expected):
    assert min_steps(numbers, target, use_all) == expected


def test_min_steps_against_brute_force_search():
    # Independent of the solver's memo: every ordered sequence of pairs and operators.
    def reachable(numbers, target):
        if len(numbers) == 1:
            return numbers[0] == target
        for i, j in itertools.permutations(range(len(numbers)), 2):
            rest = [n for k, n in enumerate(numbers) if k not in (i, j)]
            a, b = numbers[i], numbers[j]
            for c in (a + b, a * b, a - b if a > b else None, a // b if a % b == 0 else None):
                if c is not None and reachable(rest + [c], target):
                    return True
        return False

    rng = random.Random(0)
    for _ in range(60):
        numbers = [rng.randint(1, 9) for _ in range(rng.randint(2, 4))]
        target = rng.randint(1, 30)
        assert (min_steps(numbers, target) is not None) == reachable(numbers, target), (numbers, target)


def test_solutions_and_labels():
    task = CountdownTask()
    assert task.label((4, 6), 24) == "sure" and task.label((24,), 24) == "sure"
    assert task.label((4, 6, 8, 9), 24) == "likely" and task.label((1, 1), 24) == "impossible"
    rng = random.Random(0)
    for numbers, target in task.problems(100):
        steps = task.solution(numbers, target, rng)
        assert len(steps) == len(numbers) - 1 and steps[-1].left == (target,)
        assert task.verify(task.prompt(numbers, target), task.chain(numbers, target, steps)) == 1.0
    assert task.solution((3, 3, 8, 8), 24) is None


# ---------------------------------------------------------------- expressions


def test_parse_expression():
    e = parse_expression("(4*6)*(9-8)")
    assert e.value == 24 and sorted(e.numbers) == [4, 6, 8, 9]
    # + and * are commutative and associative in the canonical form; - and / are not.
    assert e.canonical == parse_expression("(9-8)*(6*4)").canonical == parse_expression("4*6*(9-8)").canonical
    assert parse_expression("9-8").canonical != parse_expression("8-9").canonical
    assert parse_expression("2+3*4").value == 14 and parse_expression("(2+3)*4").value == 20
    assert parse_expression("12/3/2").value == 2  # left to right
    assert parse_expression(" 12 / ( 3 + 1 ) ").value == 3
    assert parse_expression("8/(3-8/3)").value is None  # 8/3 is not an integer
    assert parse_expression("8-9+5").value is None  # 8 - 9 is negative
    for bad in ("", "4*", "(4+6", "4+6)", "4 6", "4+x", "-4+28", "4**6"):
        assert parse_expression(bad) is None, bad


# ---------------------------------------------------------------- verifier


def _chain(*lines):
    return "\n".join(lines)


@pytest.mark.parametrize(
    "prompt, completion, correct, valid_steps",
    [
        (GAME24, GAME24_CHAIN, True, 3),
        # Division, exact.
        ("1 3 6 12 to 24\n", _chain("12 / 3 = 4 (left: 1 6 4)", "6 * 4 = 24 (left: 1 24)", "24 * 1 = 24 (left: 24)",
                                    "answer: (6*(12/3))*1"), True, 3),
        # Division that is not exact is not allowed (12 / 5 is not an integer).
        ("1 5 12 12 to 24\n", _chain("12 / 5 = 2 (left: 1 12 2)", "12 * 2 = 24 (left: 1 24)", "24 * 1 = 24 (left: 24)",
                                     "answer: (12*(12/5))*1"), False, 0),
        # Wrong arithmetic in the second step.
        (GAME24, _chain("4 * 6 = 24 (left: 8 9 24)", "9 - 8 = 2 (left: 24 2)", "24 * 1 = 24 (left: 24)",
                        "answer: (4*6)*(9-8)"), False, 1),
        # A number used twice: 6 is gone after the first step.
        (GAME24, _chain("4 * 6 = 24 (left: 8 9 24)", "24 / 6 = 4 (left: 8 9 4)", "9 - 8 = 1 (left: 4 1)",
                        "answer: (4*6)*(9-8)"), False, 1),
        # The numbers left are wrong (8 is dropped).
        (GAME24, _chain("4 * 6 = 24 (left: 9 24)", "9 - 8 = 1 (left: 24 1)", "24 * 1 = 24 (left: 24)",
                        "answer: (4*6)*(9-8)"), False, 0),
        # A negative intermediate result.
        (GAME24, _chain("8 - 9 = 1 (left: 4 6 1)", "answer: (4*6)*(9-8)"), False, 0),
        # Valid steps, answer that reuses 6 (and misses 8 and 9).
        (GAME24, _chain("4 * 6 = 24 (left: 8 9 24)", "9 - 8 = 1 (left: 24 1)", "24 * 1 = 24 (left: 24)",
                        "answer: (6*4)*(6/6)"), False, 3),
        # Valid steps, answer that does not reach the target.
        (GAME24, _chain("4 * 6 = 24 (left: 8 9 24)", "9 - 8 = 1 (left: 24 1)", "24 * 1 = 24 (left: 24)",
                        "answer: (4*6)+(9-8)"), False, 3),
        # No answer line.
        (GAME24, _chain("4 * 6 = 24 (left: 8 9 24)", "9 - 8 = 1 (left: 24 1)", "24 * 1 = 24 (left: 24)"), False, 3),
        # Direct answers: the direct prompt's "answer: " is the answer line.
        (GAME24 + "answer: ", "(9-8)*(6*4)", True, 0),
        (GAME24 + "answer: ", "4*6", False, 0),  # uses only two of the four numbers
        (GAME24 + "answer: ", "4*6*(9-8) ", True, 0),
        # Text after the answer line is ignored: the chain has ended.
        (GAME24, GAME24_CHAIN + "\nmore text", True, 3),
    ],
)
def test_verifier(prompt, completion, correct, valid_steps):
    verdict = CountdownTask().check(prompt, completion)
    assert verdict.correct == correct and verdict.valid_steps == valid_steps
    assert CountdownTask().verify(prompt, completion) == float(correct)


def test_verifier_at_most_once_and_prompt_errors():
    loose = CountdownTask(use_all=False)
    assert loose.verify(GAME24 + "answer: ", "4*6") == 1.0
    assert loose.verify("4 6 100 to 24\n", "4 * 6 = 24 (left: 100 24)\nanswer: 4*6") == 1.0
    assert CountdownTask().verify("4 6 100 to 24\n", "4 * 6 = 24 (left: 100 24)\nanswer: 4*6") == 0.0
    for prompt in ("4 6 8 9 =24\n", "to 24\n", "12+34="):
        with pytest.raises(ValueError, match="not a countdown prompt"):
            CountdownTask().verify(prompt, "answer: 24")


def test_rewards_format_and_partial_credit():
    task = CountdownTask(format_reward=0.1, progress_reward=0.6)
    wrong_answer = _chain("4 * 6 = 24 (left: 8 9 24)", "9 - 8 = 1 (left: 24 1)", "24 * 1 = 24 (left: 24)",
                          "answer: (4*6)+(9-8)")
    # First step valid and still solvable (8 9 24 -> 24 via 9 - 8 = 1, 24 * 1), second step
    # valid but 8 * 9 = 72 leaves 24 72 -> no way to 24; third step invalid.
    off_track = _chain("4 * 6 = 24 (left: 8 9 24)", "9 * 8 = 72 (left: 24 72)", "72 - 24 = 24 (left: 24)",
                       "answer: 24")
    missing_answer = _chain("4 * 6 = 24 (left: 8 9 24)")
    rewards = task.reward([GAME24] * 5, [GAME24_CHAIN, wrong_answer, off_track, missing_answer, "nonsense"])
    assert rewards == pytest.approx([1.0, 0.1 + 0.6, 0.1 + 0.6 * 1 / 3, 0.6 * 1 / 3, 0.0])
    # 72 - 24 = 48, not 24: two steps replay, but the format is right.
    verdict = task.check(GAME24, off_track)
    assert (verdict.steps, verdict.valid_steps, verdict.well_formed, verdict.correct) == (3, 2, True, False)
    # The rows' numbers and target, when given, define the problem (prompt wording free).
    assert task.reward(["Reach 24 with 4 6 8 9."], [GAME24_CHAIN], numbers=[[4, 6, 8, 9]], target=[24]) == [1.0]
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        task.reward([GAME24, GAME24], [GAME24_CHAIN])
    with pytest.raises(ValueError, match="stay below"):
        CountdownTask(format_reward=0.5, progress_reward=0.5)


# ---------------------------------------------------------------- generators and split


def test_generators_are_deterministic_per_seed():
    task, same, other = CountdownTask(seed=1), CountdownTask(seed=1), CountdownTask(seed=2)
    for generate in ("sft_examples", "preference_pairs", "unary_examples", "prompt_rows", "value_examples"):
        rows = getattr(task, generate)(40)
        assert rows == getattr(same, generate)(40) and rows != getattr(other, generate)(40), generate
    assert task.cot_examples(60)[:30] == task.cot_examples(30)


def test_heldout_split_is_disjoint_complete_and_seed_independent():
    task = CountdownTask()
    solvable = [(n, 24) for n in itertools.combinations_with_replacement(range(1, 14), 4) if task.is_solvable(n, 24)]
    heldout = {p for p in solvable if task.is_heldout(*p)}
    assert 0.15 < len(heldout) / len(solvable) < 0.25  # heldout_fraction = 0.2
    for seed in range(2):
        seeded = CountdownTask(seed=seed)
        assert set(seeded.problems(len(heldout), "heldout")) == heldout
        train = seeded.problems(2000)
        assert not set(train) & heldout and set(train) <= set(solvable)
        for rows in (seeded.sft_examples(300), seeded.prompt_rows(200), seeded.preference_pairs(200)):
            assert not {CountdownTask.parse_prompt(r["prompt"]) for r in rows if "value:" not in r["prompt"]} & heldout
    with pytest.raises(ValueError, match=f"exceeds the {len(heldout)} held-out problems"):
        task.problems(len(heldout) + 1, "heldout")


def test_difficulty_knob():
    task = CountdownTask(count=3, max_number=20, min_target=10, max_target=30, use_all=False)
    for numbers, target in task.problems(200) + task.problems(50, "heldout"):
        assert len(numbers) == 3 and all(1 <= n <= 20 for n in numbers) and 10 <= target <= 30
        assert target not in numbers and min_steps(numbers, target, False) >= 1
    big = CountdownTask(count=5, max_number=25, min_target=100, max_target=150)  # drawn, not enumerated
    drawn = big.problems(12, "heldout")
    assert len(set(drawn)) == 12 and all(big.is_heldout(*p) and min_steps(*p) == 4 for p in drawn)
    for row in big.cot_examples(5):
        assert big.verify(row["prompt"], row["completion"]) == 1.0 and row["completion"].count("\n") == 4


def test_rows_of_each_kind():
    task = CountdownTask(seed=3)
    rows = task.sft_examples(400)
    kinds = {"cot": 0, "direct": 0, "value": 0}
    for row in rows:
        if row["prompt"].endswith("value:"):
            kinds["value"] += 1
            numbers, target = CountdownTask.parse_prompt(row["prompt"][: -len(" value:")])
            assert row["completion"] == " " + task.label(numbers, target)
        else:
            kinds["direct" if row["prompt"].endswith("answer: ") else "cot"] += 1
            assert task.verify(row["prompt"], row["completion"]) == 1.0
    assert 150 < kinds["cot"] < 250 and 60 < kinds["direct"] < 140 and 60 < kinds["value"] < 140
    labels = {row["completion"] for row in rows if row["prompt"].endswith("value:")}
    assert labels == {" sure", " likely", " impossible"}
    for row in task.preference_pairs(50):
        assert task.verify(row["prompt"], row["chosen"]) == 1.0 and task.verify(row["prompt"], row["rejected"]) == 0.0
        assert task.check(row["prompt"], row["rejected"]).valid_steps == 3  # valid steps, missed target
    loose = CountdownTask(use_all=False, count=3, max_number=9, min_target=10, max_target=20)
    for row in loose.preference_pairs(50):
        assert loose.verify(row["prompt"], row["chosen"]) == 1.0 and loose.verify(row["prompt"], row["rejected"]) == 0.0
    unary = task.unary_examples(40)
    assert [r["label"] for r in unary] == [task.verify(r["prompt"], r["completion"]) == 1.0 for r in unary]
    for row in task.prompt_rows(30):
        assert CountdownTask.parse_prompt(row["prompt"]) == (tuple(row["numbers"]), row["target"])
        assert task.verify(row["prompt"], row["completion"]) == 1.0
    with pytest.raises(ValueError, match="schema 'ranked' is not one of builtin:countdown's"):
        task.rows("ranked", 1)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"count": 1}, "count"), ({"count": 7}, "count"), ({"max_number": 0}, "max_number"),
     ({"min_target": 0}, "min_target"), ({"min_target": 30, "max_target": 20}, "max_target"),
     ({"heldout_fraction": 0.0}, "heldout_fraction"), ({"format_reward": 1.0}, "format_reward"),
     ({"progress_reward": -0.1}, "progress_reward")],
)
def test_bad_task_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CountdownTask(**kwargs)


def test_bad_split_and_unsolvable_settings():
    with pytest.raises(ValueError, match="split must be one of train, heldout"):
        CountdownTask().problems(1, "test")
    with pytest.raises(ValueError, match="no solvable training problem"):
        CountdownTask(count=2, max_number=1, min_target=50, max_target=50).problems(1)


@pytest.mark.parametrize("algorithm", [a for a, schemas in ALGORITHM_SCHEMAS.items() if set(schemas) - {"ranked"}])
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_rows_load_back_as_each_algorithms_data(algorithm, suffix, tmp_path):
    task = CountdownTask(seed=0)
    schema = next(s for s in ALGORITHM_SCHEMAS[algorithm] if s != "ranked")
    rows = task.rows(schema, 12)
    extra = {"completion", "numbers", "target"} if schema == "prompt" else set()
    assert all(set(row) == set(SCHEMAS[schema]) | extra for row in rows)
    path = tmp_path / f"{schema}{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    assert load_dataset(path, algorithm) == (schema, rows)
    if schema == "prompt":  # the reward reads the loaded rows' fields
        loaded = load_dataset(path, algorithm)[1]
        fields = {k: [r[k] for r in loaded] for k in ("numbers", "target")}
        assert task.reward([r["prompt"] for r in loaded], [r["completion"] for r in loaded], **fields) == [1.0] * 12


# ---------------------------------------------------------------- tokenizer


def test_char_tokenizer_covers_the_format_and_keeps_old_ids():
    task = CountdownTask()
    tokenizer = build_char_tokenizer(task.characters)
    pairs = task.preference_pairs(20)
    text = "".join(r["prompt"] + r["completion"] for r in task.sft_examples(200))
    text += "".join(r["rejected"] for r in pairs)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == text
    # The built-in vocabulary (and so builtin:tiny's checkpoints) is unchanged; the task's
    # characters come after it.
    old = "0123456789" + "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ" + " \n+-=?:.,!'()"
    assert CHARACTERS == old and len(build_char_tokenizer()) == len(SPECIAL_TOKENS) + len(old)
    first = len(SPECIAL_TOKENS)
    assert [tokenizer.convert_tokens_to_ids(c) for c in old] == list(range(first, first + len(old)))
    assert [tokenizer.convert_tokens_to_ids(c) for c in "*/"] == [first + len(old), first + len(old) + 1]


# ---------------------------------------------------------------- the task registry


def test_builtin_tasks_by_name_share_the_task_interface():
    from fastpo.engine.tasks import BUILTIN_TASKS, builtin_task

    assert builtin_task("builtin:countdown", seed=1, count=3) == CountdownTask(seed=1, count=3)
    for name in BUILTIN_TASKS:
        task = builtin_task(name, seed=2)
        for row in task.rows("prompt", 5) + task.sft_examples(5, "heldout"):
            if "value:" not in row["prompt"]:
                assert task.verify(row["prompt"], row["completion"]) == 1.0
        rows = task.rows("prompt", 4)
        assert task.reward([r["prompt"] for r in rows], [r["completion"] for r in rows]) == [1.0] * 4
    with pytest.raises(ValueError, match="task 'builtin:chess' is not a built-in task; choose one of builtin:addition"):
        builtin_task("builtin:chess")
