"""Local datasets: JSONL (one JSON object per line) or Parquet (needs pyarrow).

One schema per kind of data; a row may carry other fields too, which are kept (online
reward functions receive them).

=============  ==============================================  ==========================
schema         fields                                          algorithms
=============  ==============================================  ==========================
completion     prompt: str, completion: str                    sft
pairwise       prompt: str, chosen: str, rejected: str         dpo, ipo, reward
ranked         prompt: str, responses: list[str] (>= 2),       dpo (Plackett-Luce),
               best first                                      reward (K-wise ranking)
unary          prompt: str, completion: str, label: bool       kto
               (true: desirable)
prompt         prompt: str (other fields go to the reward      grpo, ppo, trpo, rlaif
               functions)
text           text: str                                       ppo's ptx_data (PPO-ptx)
=============  ==============================================  ==========================

A malformed row is a ``DataError`` (a ValueError) naming the file, the line (JSONL) or
row (Parquet), counted from 1, and the field; the command line prints it as one line.
``check_file`` reads only a file's first rows: a run checks its data files with it
before it loads a model.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["ALGORITHM_SCHEMAS", "CHECKED_ROWS", "SCHEMAS", "DataError", "check_file", "load_dataset", "load_rows",
           "schema_of"]

SCHEMAS: dict[str, tuple[str, ...]] = {
    "completion": ("prompt", "completion"),
    "pairwise": ("prompt", "chosen", "rejected"),
    "ranked": ("prompt", "responses"),
    "unary": ("prompt", "completion", "label"),
    "prompt": ("prompt",),
    "text": ("text",),
}

# The schemas each algorithm trains on, in the order a file's first row is matched.
ALGORITHM_SCHEMAS: dict[str, tuple[str, ...]] = {
    "sft": ("completion",),
    "reward": ("pairwise", "ranked"),
    "dpo": ("pairwise", "ranked"),
    "ipo": ("pairwise",),
    "kto": ("unary",),
    "grpo": ("prompt",),
    "ppo": ("prompt",),
    "trpo": ("prompt",),
    "rlaif": ("prompt",),
}


CHECKED_ROWS = 100  # rows that check_file reads


class DataError(ValueError):
    """A data file that cannot be read as the rows a run needs; the message names the
    file, the line or row and the field."""


def _read_records(path: Path):
    """Yield ``(location, record)``; location is "line N" (JSONL) or "row N" (Parquet)."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}: line {number}: not valid JSON ({error.msg})") from None
                yield f"line {number}", record
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
        for number, record in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield f"row {number}", record
    else:
        raise DataError(f"{path}: unsupported data file type {suffix!r}; use .jsonl or .parquet")


def _check_row(record, schema: str, where: str) -> dict:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for name in SCHEMAS[schema]:
        if name not in record:
            raise DataError(f"{where}: field {name!r} is missing (schema {schema!r}: {', '.join(SCHEMAS[schema])})")
        value = record[name]
        if name == "responses":
            if not (isinstance(value, list) and len(value) >= 2 and all(isinstance(r, str) for r in value)):
                raise DataError(f"{where}: field 'responses' must be a list of at least 2 strings, got {value!r}")
        elif name == "label":
            # Parquet and hand-written JSONL often store labels as 0/1.
            if not isinstance(value, bool) and value not in (0, 1):
                raise DataError(f"{where}: field 'label' must be true or false, got {value!r}")
            record = {**record, "label": bool(value)}
        elif not isinstance(value, str):
            raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__} {value!r}")
    return record


def load_rows(path: str | Path, schema: str) -> list[dict]:
    """Every row of ``path`` checked against ``schema`` (one of ``SCHEMAS``)."""
    if schema not in SCHEMAS:
        raise ValueError(f"schema {schema!r} is not one of {', '.join(SCHEMAS)}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    rows = [_check_row(record, schema, f"{path}: {where}") for where, record in _read_records(path)]
    if not rows:
        raise DataError(f"{path}: holds no rows")
    return rows


def _first_fit(record, schemas: tuple[str, ...]) -> str | None:
    """The first of ``schemas`` whose fields ``record`` carries, or None."""
    for schema in schemas:
        if isinstance(record, dict) and all(name in record for name in SCHEMAS[schema]):
            return schema
    return None


def _wanted(schemas: tuple[str, ...]) -> str:
    """``schemas``' fields for a message: ``(a, b) or (c)``."""
    return " or ".join(f"({', '.join(SCHEMAS[s])})" for s in schemas)


def schema_of(record, algorithm: str) -> str:
    """The schema of ``algorithm`` whose fields ``record`` carries (the first that fits)."""
    if algorithm not in ALGORITHM_SCHEMAS:
        raise ValueError(f"algorithm {algorithm!r} is not one of {', '.join(ALGORITHM_SCHEMAS)}")
    schema = _first_fit(record, ALGORITHM_SCHEMAS[algorithm])
    if schema is None:
        raise DataError(f"algorithm {algorithm!r} needs rows with " + _wanted(ALGORITHM_SCHEMAS[algorithm]))
    return schema


def check_file(path: str | Path, schemas: tuple[str, ...], option: str = "data") -> str:
    """The schema of ``path``'s rows among ``schemas`` (the first that its first row
    fits), after checking its first ``CHECKED_ROWS`` rows against it: a cheap check
    before a run loads its model. DataError naming ``option`` for a missing file, else
    the file, the line and the field."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"option {option!r}: data file {str(path)!r} does not exist")
    schema = None
    for number, (where, record) in enumerate(_read_records(path)):
        if schema is None:
            schema = _first_fit(record, schemas)
            if schema is None and len(schemas) == 1:
                schema = schemas[0]  # _check_row names the missing field
            if schema is None:
                got = f"fields ({', '.join(record)})" if isinstance(record, dict) else type(record).__name__
                raise DataError(f"{path}: {where}: option {option!r} needs rows with {_wanted(schemas)}, got {got}")
        _check_row(record, schema, f"{path}: {where}")
        if number + 1 == CHECKED_ROWS:
            break
    if schema is None:
        raise DataError(f"option {option!r}: {path} holds no rows")
    return schema


def load_dataset(path: str | Path, algorithm: str) -> tuple[str, list[dict]]:
    """The rows of ``path`` for ``algorithm``, as ``(schema, rows)``.

    The first row picks the schema among the algorithm's (``ALGORITHM_SCHEMAS``); every
    row must then follow it.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    for where, record in _read_records(path):
        try:
            schema = schema_of(record, algorithm)
        except ValueError as error:
            raise DataError(f"{path}: {where}: {error}") from None
        return schema, load_rows(path, schema)
    raise DataError(f"{path}: holds no rows")
