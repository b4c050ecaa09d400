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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
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
    rows = []
    for impl in implementations(device):
        result = harness.run_child("fastpo.bench.token_logprobs",
                                   {"impl": impl, "n": tokens, "v": VOCAB, "dtype": "bf16", "device": device})
        rows.append({
            "implementation": impl,
            "median time (ms)": result["median_ms"],
            "extra memory (MiB)": result["extra_bytes"] / 2**20,
            "extra memory / logits": f"{100 * result['extra_bytes'] / 2**20 / logits_mib:.1f}%",
        })
    print(harness.markdown_table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
