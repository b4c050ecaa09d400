"""What the benchmark commands print for a user: plain --help text, and the demo's table
in plain numbers with its labels explained."""

import re

import pytest

from fastpo.bench import __main__ as bench_main
from fastpo.bench import demo
from fastpo.bench.token_logprobs import implementations


@pytest.mark.parametrize("command", [bench_main.main, demo.main])
def test_help_is_plain_text(command, capsys):
    with pytest.raises(SystemExit) as exited:
        command(["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: python -m fastpo.bench")
    for markup in ("``", ":func:", ":class:", ".. "):  # reST, for the source's readers
        assert markup not in text, markup


def test_the_demo_table_has_plain_numbers_and_explains_its_labels():
    names = list(implementations("cpu")) + ["fastpo_triton", "fastpo_cuda"]
    results = {name: {"median_ms": 1234.5 / (i + 1), "extra_bytes": 1_552_000_000 / 10**i}
               for i, name in enumerate(names)}
    table = demo.results_table(results, logits_mib=593.5)
    assert not re.search(r"\de[+-]\d", table)  # no 1.48e+03
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith(f"| {names[0]} ")]
    assert rows == [["| eager", "1,234", "1,480", "249.4% |"]]
    tiny = [line for line in table.splitlines() if line.startswith(f"| {names[-1]} ")]
    assert tiny and " | 0.0 | " in tiny[0]  # 1.5 kB: 0.0 MiB, not 1.42e-03
    for name in names:  # each label in the table has its line of legend
        assert re.search(rf"^  {name}: \S", table, re.M), name
