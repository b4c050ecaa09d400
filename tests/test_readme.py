"""README.md runs as written: its kernel snippet is executed as it stands, and the
numbers it states agree with what the code says."""

import inspect
import re
from pathlib import Path

import torch

from fastpo.kernels import _native

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_block_after(heading: str) -> str:
    """The first ```python block after the line ``heading`` in README.md."""
    text = README.read_text()
    start = text.index(f"\n{heading}\n")
    match = re.compile(r"^```python\n(.*?)^```$", re.S | re.M).search(text, start)
    return match.group(1)


def test_the_kernel_snippet_runs_as_written():
    namespace = {}
    exec(compile(_python_block_after("## Using the kernels"), "README.md", "exec"), namespace)
    loss, lp, logits, input_ids = namespace["loss"], namespace["lp"], namespace["logits"], namespace["input_ids"]
    assert namespace["B"] % 8 == 0  # a whole number of GRPO groups
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    # The snippet's log-probs against a float64 reference of the same shift and temperature.
    z = logits.detach()[:, :-1].double() / 0.7
    want = z.log_softmax(-1).gather(-1, input_ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(lp.double(), want, rtol=0, atol=1e-4)


def test_the_native_build_time_is_stated_alike_in_the_readme_and_at_run_time():
    readme = re.search(r"built once, about (\d+) s", README.read_text())
    message = re.search(r"first use only, ~(\d+) s", inspect.getsource(_native._jit_build))
    assert readme and message and readme.group(1) == message.group(1)
