"""Local datasets: the schema of each algorithm, and errors naming file, line and field."""

import json

import pytest

from fastpo.engine.data import load_dataset, load_rows, schema_of


def _write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_each_schema_loads_and_keeps_extra_fields(tmp_path):
    sft = _write(tmp_path / "sft.jsonl", [{"prompt": "1+1=", "completion": "2", "source": "hand"}, "",
                                          {"prompt": "", "completion": "x"}])
    assert load_rows(sft, "completion") == [{"prompt": "1+1=", "completion": "2", "source": "hand"},
                                            {"prompt": "", "completion": "x"}]
    kto = _write(tmp_path / "kto.jsonl", [{"prompt": "p", "completion": "c", "label": True},
                                          {"prompt": "p", "completion": "d", "label": 0}])
    assert [row["label"] for row in load_rows(kto, "unary")] == [True, False]
    assert load_dataset(kto, "kto")[0] == "unary"


def test_algorithms_pick_their_schema_from_the_first_row(tmp_path):
    pairs = _write(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    ranked = _write(tmp_path / "ranked.jsonl", [{"prompt": "p", "responses": ["a", "b", "c"]}])
    assert load_dataset(pairs, "dpo")[0] == "pairwise" and load_dataset(pairs, "reward")[0] == "pairwise"
    assert load_dataset(ranked, "dpo") == ("ranked", [{"prompt": "p", "responses": ["a", "b", "c"]}])
    assert load_dataset(ranked, "reward")[0] == "ranked"
    needs_pairs = r"ranked.jsonl: line 1: algorithm 'ipo' needs rows with \(prompt, chosen, rejected\)"
    with pytest.raises(ValueError, match=needs_pairs):
        load_dataset(ranked, "ipo")
    with pytest.raises(ValueError, match=r"'kto' needs rows with \(prompt, completion, label\)"):
        load_dataset(pairs, "kto")
    # The online algorithms read prompts; every other field rides along to the rewards.
    assert load_dataset(pairs, "grpo")[0] == "prompt"
    with pytest.raises(ValueError, match=r"algorithm 'ppo' needs rows with \(prompt\)"):
        schema_of({"text": "t"}, "ppo")
    with pytest.raises(ValueError, match="algorithm 'sfx' is not one of"):
        schema_of({}, "sfx")


@pytest.mark.parametrize(
    "schema, bad_row, field, message",
    [("completion", {"prompt": "p"}, "completion", "is missing"),
     ("completion", {"prompt": 3, "completion": "c"}, "prompt", "must be a string"),
     ("pairwise", {"prompt": "p", "chosen": "a", "rejected": None}, "rejected", "must be a string"),
     ("pairwise", {"prompt": "p", "chosen": ["a"], "rejected": "b"}, "chosen", "must be a string"),
     ("ranked", {"prompt": "p", "responses": ["only"]}, "responses", "must be a list of at least 2 strings"),
     ("ranked", {"prompt": "p", "responses": "ab"}, "responses", "must be a list of at least 2 strings"),
     ("ranked", {"prompt": "p", "responses": ["a", 2]}, "responses", "must be a list of at least 2 strings"),
     ("unary", {"prompt": "p", "completion": "c", "label": "yes"}, "label", "must be true or false"),
     ("unary", {"prompt": "p", "completion": "c", "label": 2}, "label", "must be true or false"),
     ("unary", {"prompt": "p", "completion": "c"}, "label", "is missing")],
)
def test_malformed_row_names_file_line_and_field(tmp_path, schema, bad_row, field, message):
    good = {"completion": {"prompt": "p", "completion": "c"},
            "pairwise": {"prompt": "p", "chosen": "a", "rejected": "b"},
            "ranked": {"prompt": "p", "responses": ["a", "b"]},
            "unary": {"prompt": "p", "completion": "c", "label": False}}[schema]
    # Line 3 (a blank line counts) holds the bad row.
    path = _write(tmp_path / "rows.jsonl", [good, "", bad_row, good])
    with pytest.raises(ValueError, match=rf"rows\.jsonl: line 3: field '{field}' {message}"):
        load_rows(path, schema)


def test_unreadable_files(tmp_path):
    broken = _write(tmp_path / "broken.jsonl", [{"prompt": "p", "completion": "c"}, '{"prompt": "p",'])
    with pytest.raises(ValueError, match=r"broken\.jsonl: line 2: not valid JSON"):
        load_rows(broken, "completion")
    scalar = _write(tmp_path / "scalar.jsonl", ["[1, 2]"])
    with pytest.raises(ValueError, match=r"scalar\.jsonl: line 1: expected a JSON object, got list"):
        load_rows(scalar, "completion")
    empty = _write(tmp_path / "empty.jsonl", [""])
    with pytest.raises(ValueError, match="holds no rows"):
        load_rows(empty, "completion")
    with pytest.raises(ValueError, match="holds no rows"):
        load_dataset(empty, "sft")
    with pytest.raises(ValueError, match="does not exist"):
        load_dataset(tmp_path / "missing.jsonl", "sft")
    csv = tmp_path / "rows.csv"
    csv.write_text("prompt,completion\n")
    with pytest.raises(ValueError, match="unsupported data file type '.csv'"):
        load_rows(csv, "completion")
    with pytest.raises(ValueError, match="schema 'pairs' is not one of"):
        load_rows(broken, "pairs")


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"prompt": ["p", "q"], "completion": ["a", "b"], "label": [True, False]}), good)
    assert load_dataset(good, "kto") == ("unary", [{"prompt": "p", "completion": "a", "label": True},
                                                   {"prompt": "q", "completion": "b", "label": False}])
    path = tmp_path / "kto.parquet"
    pq.write_table(pa.table({"prompt": ["p", "q"], "completion": ["a", "b"], "label": [1, 3]}), path)
    with pytest.raises(ValueError, match=r"kto\.parquet: row 2: field 'label' must be true or false"):
        load_dataset(path, "kto")
