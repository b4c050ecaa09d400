"""token_logprobs forward+backward under pytest-benchmark.

    pytest bench/bench_token_logprobs.py --benchmark-enable

The suite's default options disable timing, so CI runs each case once as a check
that the benchmark still works. Shapes are small enough for the CPU; on a GPU the
same cases run at a real vocabulary.
"""

import pytest
import torch

from fastpo.bench.token_logprobs import implementations

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(4096, 151936)] if DEVICE == "cuda" else [(64, 32000)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", list(implementations(DEVICE)))
def test_token_logprobs_forward_backward(benchmark, impl, dtype, shape):
    fn = implementations(DEVICE)[impl]
    n, v = shape
    logits = torch.randn(n, v, device=DEVICE).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), device=DEVICE)

    def step():
        lp = fn(logits, targets)
        lp.sum().backward()
        logits.grad = None
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return lp

    lp = benchmark(step)
    ref = logits.detach().double().log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    tol = 1e-4 if dtype == torch.float32 else 0.1
    assert (lp.double() - ref).abs().max().item() <= tol
