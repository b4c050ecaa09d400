"""The quickstart demo: per-token log-probs over a real 151,936-token vocabulary, with
the peak memory and time of fastpo's fused op against eager PyTorch.

    python -m fastpo.bench.demo [--tokens N] [--device cpu|cuda]

Each implementation runs forward+backward in its own process so that its peak memory
is measured alone.
"""

from __future__ import annotations

import argparse

import torch

from fastpo.bench import harness
from fastpo.bench.token_logprobs import implementations

VOCAB = 151936  # Qwen2 / Qwen2.5
# What each row of the table runs (fastpo.bench.token_logprobs's implementations).
LABELS = {
    "eager": "PyTorch log_softmax + gather on the bf16 logits",
    "eager_fp32": "the same on the logits cast to fp32 first (fp32 log-probs from bf16 logits)",
    "fastpo_torch": "fastpo token_logprobs, backend='torch' (pure PyTorch, chunked over rows)",
    "fastpo_cpp": "fastpo token_logprobs, backend='cpp' (native C++/OpenMP; the CPU default)",
    "fastpo_triton": "fastpo token_logprobs, backend='triton' (the Triton kernel; the GPU default)",
    "fastpo_cuda": "fastpo token_logprobs, backend='cuda' (native CUDA C++)",
}


def _amount(value: float) -> str:
    """A time or a size for the table: whole numbers with thousands separators from
    100 on, one decimal below (never an exponent)."""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.1f}"


def results_table(results: dict[str, dict], logits_mib: float) -> str:
    """The Markdown table of ``{implementation: child result}`` (``median_ms``,
    ``extra_bytes``), with the legend of its labels."""
    rows = [
        {
            "implementation": impl,
            "median time (ms)": _amount(result["median_ms"]),
            "extra memory (MiB)": _amount(result["extra_bytes"] / 2**20),
            "extra memory / logits": f"{100 * result['extra_bytes'] / 2**20 / logits_mib:.1f}%",
        }
        for impl, result in results.items()
    ]
    legend = "\n".join(f"  {impl}: {LABELS[impl]}" for impl in results)
    return harness.markdown_table(rows, list(rows[0])) + "\n\n" + legend


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastpo.bench.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu",
                        help="default: cuda when a GPU is present, else cpu")
    parser.add_argument("--tokens", type=int, default=None, help="default: 16384 on a GPU, 1024 on the CPU")
    args = parser.parse_args(argv)
    device = args.device
    tokens = args.tokens or (16384 if device == "cuda" else 1024)
    from fastpo.kernels import token_logprobs

    torch.manual_seed(0)
    logits = torch.randn(4, VOCAB, device=device).to(torch.bfloat16) * 4
    targets = torch.randint(0, VOCAB, (4,), device=device)
    fused = token_logprobs(logits, targets)
    eager = logits.float().log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    exact = logits.double().log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    print(f"log p(target) for 4 rows of bf16 logits, vocabulary {VOCAB:,}:")
    print(f"  fastpo.kernels.token_logprobs:    {fused.tolist()}")
    print(f"  eager log_softmax + gather, fp32: {eager.tolist()}")
    print(f"  float64 reference:                {exact.tolist()}")

    logits_mib = tokens * VOCAB * 2 / 2**20
    print(f"\nforward+backward on {tokens:,} tokens x {VOCAB:,} vocabulary in bf16 on {device} "
          f"(logits: {logits_mib:,.0f} MiB); extra memory = peak beyond the logits and their gradient")
    results = {
        impl: harness.run_child("fastpo.bench.token_logprobs",
                                {"impl": impl, "n": tokens, "v": VOCAB, "dtype": "bf16", "device": device})
        for impl in implementations(device)
    }
    print(results_table(results, logits_mib))


if __name__ == "__main__":
    main()
