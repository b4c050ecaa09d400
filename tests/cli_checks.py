"""The command line's one-line failure on bad input, checked alike by the engine's and the
reasoning commands' tests."""

import time

from fastpo.engine import cli


def fails_in_one_line(args, capsys, within_s=2.0, run_dir=None) -> str:
    """Run ``fastpo args`` (with ``output_dir=run_dir`` when given). It must exit with
    status 2 within ``within_s`` seconds, print one line on stderr and make no run folder
    (it stopped before the model and the warm start); that line."""
    if run_dir is not None:
        args = [*args, f"output_dir={run_dir}"]
    started = time.perf_counter()
    status = cli.main(args)
    elapsed = time.perf_counter() - started
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert status == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("fastpo: error: "), lines
    assert elapsed < within_s, elapsed
    assert run_dir is None or not run_dir.exists()
    return lines[0]
