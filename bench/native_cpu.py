"""token_logprobs forward+backward on the CPU: the C++ backend against the pure-PyTorch
backend and eager PyTorch; prints a Markdown table.

    python -m fastpo.bench.native_cpu [--quick] [--dtypes fp32,bf16]

Each case runs in a fresh process (the resident-set peak is per process). "Extra
memory" is the peak beyond the logits and their gradient. The C++ extension is built
(or loaded from the cache) before timing. The numbers decide whether "cpp" is the
automatic CPU backend (kernels/_backend.py, CPP_DEFAULT_OPS).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from fastpo.bench import harness

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHAPES = [(2048, 32000), (2048, 151936)]
QUICK_SHAPES = [(256, 32000)]


def implementations() -> dict:
    """name -> fn(logits, targets) returning per-token log-probs (differentiable)."""
    from fastpo.kernels import token_logprobs

    return {
        "eager": lambda x, t: x.log_softmax(-1).gather(-1, t[:, None]).squeeze(-1),
        "eager_fp32": lambda x, t: x.float().log_softmax(-1).gather(-1, t[:, None]).squeeze(-1),
        "fastpo_torch": lambda x, t: token_logprobs(x, t, backend="torch"),
        "fastpo_cpp": lambda x, t: token_logprobs(x, t, backend="cpp"),
    }


def child(args: dict) -> dict:
    n, v, dtype = args["n"], args["v"], DTYPES[args["dtype"]]
    fn = implementations()[args["impl"]]
    torch.manual_seed(0)
    logits = (torch.randn(n, v) * 2).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,))
    with torch.no_grad():  # correctness guard on a few rows
        rows = slice(0, min(n, 8))
        ref = logits[rows].double().log_softmax(-1).gather(-1, targets[rows, None]).squeeze(-1)
        err = (fn(logits[rows].detach(), targets[rows]).double() - ref).abs().max().item()
    if not err <= (1e-4 if dtype == torch.float32 else 0.1):
        return {"error": f"max |log-prob error| {err:.3g}"}

    def step():
        fn(logits, targets).sum().backward()
        logits.grad = None

    warm = logits[:4].detach().clone().requires_grad_()  # page in code and thread pools
    fn(warm, targets[:4]).sum().backward()
    peak = harness.measure_peak_extra(lambda: step, "cpu")
    timing = harness.time_fn(step, "cpu", warmup=0, reps=5, max_seconds=30.0)
    return {"extra_bytes": max(0, peak - logits.numel() * logits.element_size()),
            "median_ms": timing.median_ms, "p20_ms": timing.p20_ms}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one small shape")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    from fastpo.kernels import _native

    if _native.module() is None:
        sys.exit(f"the native extension is unavailable: {_native.unavailable_reason()}")
    rows = []
    for n, v in QUICK_SHAPES if args.quick else SHAPES:
        for dtype in args.dtypes.split(","):
            times = {}
            for impl in implementations():
                result = harness.run_child("fastpo.bench.native_cpu", {"impl": impl, "n": n, "v": v, "dtype": dtype})
                row = {"impl": impl, "tokens": n, "vocab": v, "dtype": dtype}
                if "error" in result:
                    row["note"] = "not timed: " + result["error"]
                else:
                    # speedups from the 20th percentile: the least disturbed runs on a shared machine
                    times[impl] = result["p20_ms"]
                    row.update(median_ms=result["median_ms"], p20_ms=result["p20_ms"])
                    row["extra_mem_MiB"] = result["extra_bytes"] / 2**20
                    row["extra_mem_%logits"] = 100.0 * result["extra_bytes"] / (n * v * DTYPES[dtype].itemsize)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
            for row in rows[-len(times):]:
                if row["impl"] in times:
                    for base in ("eager", "fastpo_torch"):
                        if base in times:
                            row[f"speedup_vs_{base}"] = times[base] / times[row["impl"]]
    env = harness.environment("cpu")
    columns = ["impl", "tokens", "vocab", "dtype", "median_ms", "p20_ms", "speedup_vs_eager", "speedup_vs_fastpo_torch",
               "extra_mem_MiB", "extra_mem_%logits", "note"]
    print("token_logprobs forward+backward on the CPU; " + ", ".join(f"{k}: {v}" for k, v in env.items()))
    print()
    print(harness.markdown_table(rows, columns))


if __name__ == "__main__":
    main()
