"""token_logprobs forward+backward: fastpo's backends against eager PyTorch.

    python -m fastpo.bench.token_logprobs [--quick] [--device cpu|cuda] [--out DIR]

Eager PyTorch is measured as users write it: ``log_softmax(-1).gather(...)`` in the
logits' dtype, and the fp32-upcast variant ``logits.float().log_softmax(-1)...``.
"Extra memory" is the peak beyond the logits and their gradient. On a GPU the
effective bandwidth (the bytes that must move: the logits read forward, read again
backward, the gradient written) is reported as a fraction of the device's copy
bandwidth measured in the same run. ``input_check_ms`` is the time of the op's one host
synchronization, the check that every target is in range (included in median_ms).

The ``*_top_k*`` / ``*_top_p*`` rows are the sampling-aware log-probs (``top_k=``,
``top_p=``: the truncated, renormalized distribution the sampler drew from), with the
row's argmax as target (a sampled token is always in the kept set); their ratio to the
plain row of the same backend (``time_vs_plain``, measured in the same run) is the cost
of the truncation (``cpu_vs_plain``: the same from the process's CPU time, ``cpu_ms``,
steadier than wall time on a machine shared with other jobs; ``interleaved_vs_plain``:
the same from steps alternated with the plain ones in one process, the steadiest). The
random logits here are flat (top-p 0.9 keeps thousands of tokens).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from fastpo.bench import harness

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# name suffix -> token_logprobs options of the sampling-aware rows
SAMPLING = {"top_k50": dict(top_k=50), "top_p0.9": dict(top_p=0.9), "top_k50_top_p0.9": dict(top_k=50, top_p=0.9)}
GPU_SHAPES = [(4096, 32000), (8192, 128256), (16384, 151936)]
CPU_SHAPES = [(2048, 32000), (2048, 151936)]
QUICK_SHAPES = [(256, 32000)]


def implementations(device: str) -> dict:
    """name -> fn(logits, targets) returning per-token log-probs (differentiable)."""
    from fastpo.kernels import _native, token_logprobs

    impls = {
        "eager": lambda x, t: x.log_softmax(-1).gather(-1, t[:, None]).squeeze(-1),
        "eager_fp32": lambda x, t: x.float().log_softmax(-1).gather(-1, t[:, None]).squeeze(-1),
        "fastpo_torch": lambda x, t: token_logprobs(x, t, backend="torch"),
    }
    if device == "cuda":
        impls["fastpo_triton"] = lambda x, t: token_logprobs(x, t, backend="triton")
    native = "cuda" if device == "cuda" else "cpp"
    if _native.available(torch.device(device)):
        impls[f"fastpo_{native}"] = lambda x, t: token_logprobs(x, t, backend=native)
    return impls


def _truncated(z: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """float64 log-probs of the top-k then top-p truncated distribution, by a full sort
    (the correctness guard of the sampling-aware rows)."""
    ordered = z.sort(-1, descending=True).values
    cut = ordered[:, top_k - 1 : top_k] if top_k else ordered[:, -1:]
    z = z.masked_fill(z < cut, float("-inf"))
    if top_p is not None:
        ordered = ordered.masked_fill(ordered < cut, float("-inf"))
        mass_above = ordered.softmax(-1).cumsum(-1) - ordered.softmax(-1)
        last_kept = ordered.masked_fill(mass_above >= top_p, float("inf")).amin(-1, keepdim=True)
        z = z.masked_fill(z < last_kept, float("-inf"))
    return z.log_softmax(-1)


def sampling_implementations(device: str) -> dict:
    """name -> fn(logits, targets): the sampling-aware log-probs (``top_k=``/``top_p=``)."""
    from fastpo.kernels import token_logprobs

    return {
        f"fastpo_{backend}_{suffix}": (
            lambda x, t, backend=backend, options=options: token_logprobs(x, t, backend=backend, **options)
        )
        for backend in (("torch", "triton") if device == "cuda" else ("torch",))
        for suffix, options in SAMPLING.items()
    }


def child(args: dict) -> dict:
    """One case in a fresh process: correctness guard, peak extra memory, then time."""
    device, n, v = args["device"], args["n"], args["v"]
    dtype = DTYPES[args["dtype"]]
    fn = {**implementations(device), **sampling_implementations(device)}[args["impl"]]
    torch.manual_seed(0)
    logits = (torch.randn(n, v, device=device) * 2).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), device=device)
    sampling = SAMPLING.get(args["impl"].split("_", 2)[-1])  # "fastpo_<backend>_<suffix>"
    if sampling is not None:
        targets = logits.detach().argmax(-1)

    with torch.no_grad():
        rows = slice(0, min(n, 8))
        ref = _truncated(logits[rows].double(), **(sampling or {})).gather(-1, targets[rows, None]).squeeze(-1)
        got = fn(logits[rows].detach(), targets[rows]).double()
        err = (got - ref).abs().max().item()
    tolerance = 1e-4 if dtype == torch.float32 else 0.1
    if not err <= tolerance:
        return {"error": f"max |log-prob error| {err:.3g} > {tolerance}"}

    def step():
        fn(logits, targets).sum().backward()
        logits.grad = None

    # The first call pages in code and thread pools, so that the resident-set peak
    # measured last counts only data.
    step()
    result = {}
    if args.get("time", True) and sampling is not None:
        plain = implementations(device)["_".join(args["impl"].split("_")[:2])]  # "fastpo_<backend>_<suffix>"

        def plain_step():
            plain(logits, targets).sum().backward()
            logits.grad = None

        result["interleaved_ratio"] = harness.interleaved_ratio(step, plain_step, device)
    if args.get("time", True):
        timing = harness.time_fn(step, device, warmup=0, reps=5 if device == "cpu" else 20)
        result.update(median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms)
        if device == "cpu":  # CPU time: steadier than wall time on a shared machine
            result["cpu_ms"] = harness.time_fn(step, device, warmup=0, reps=5, clock=time.process_time).median_ms
    if args.get("time", True) and args["impl"].startswith("fastpo"):
        # The one host synchronization of the op: reading back the bad-target flag.
        from fastpo.kernels._validate import check_targets

        checks = harness.time_fn(lambda: check_targets(targets, v, -100), device, reps=20)
        result["input_check_ms"] = checks.median_ms
    grad_bytes = logits.numel() * logits.element_size()
    result["extra_bytes"] = max(0, harness.measure_peak_extra(lambda: step, device) - grad_bytes)
    return result


def run(device: str, shapes, dtypes, out_dir: str | None) -> list[dict]:
    copy_bw = harness.copy_bandwidth(device) if device == "cuda" else None
    rows = []
    for n, v in shapes:
        for dtype in dtypes:
            logits_bytes = n * v * DTYPES[dtype].itemsize
            eager_ms = None
            plain = {}  # fastpo backend -> its plain row's result in this run
            for impl in {**implementations(device), **sampling_implementations(device)}:
                result = harness.run_child("fastpo.bench.token_logprobs",
                                           {"impl": impl, "n": n, "v": v, "dtype": dtype, "device": device})
                row = {"impl": impl, "tokens": n, "vocab": v, "dtype": dtype}
                if "error" in result:
                    row["note"] = "not timed: " + result["error"]
                    rows.append(row)
                    continue
                row.update(median_ms=result["median_ms"], p20_ms=result["p20_ms"], p80_ms=result["p80_ms"])
                if "cpu_ms" in result:
                    row["cpu_ms"] = result["cpu_ms"]
                if "input_check_ms" in result:
                    row["input_check_ms"] = result["input_check_ms"]
                row["extra_mem_MiB"] = result["extra_bytes"] / 2**20
                row["extra_mem_%logits"] = 100.0 * result["extra_bytes"] / logits_bytes
                if impl == "eager":
                    eager_ms = result["median_ms"]
                if eager_ms:
                    row["speedup_vs_eager"] = eager_ms / result["median_ms"]
                backend = impl.split("_")[1] if impl.startswith("fastpo_") else None
                if impl in sampling_implementations(device) and backend in plain:
                    row["time_vs_plain"] = result["median_ms"] / plain[backend]["median_ms"]
                    if "cpu_ms" in result:
                        row["cpu_vs_plain"] = result["cpu_ms"] / plain[backend]["cpu_ms"]
                    row["interleaved_vs_plain"] = result["interleaved_ratio"]
                elif backend:
                    plain[backend] = result
                if copy_bw:
                    moved = 3 * logits_bytes  # read forward, read backward, write the gradient
                    row["%copy_bw"] = 100.0 * moved / (result["median_ms"] / 1e3) / copy_bw
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
    env = harness.environment(device)
    if copy_bw:
        env["copy_bandwidth_GBps"] = round(copy_bw / 1e9, 1)
    columns = ["impl", "tokens", "vocab", "dtype", "median_ms", "p20_ms", "p80_ms", "cpu_ms", "input_check_ms",
               "speedup_vs_eager", "time_vs_plain", "cpu_vs_plain", "interleaved_vs_plain", "extra_mem_MiB",
               "extra_mem_%logits", "%copy_bw", "note"]
    harness.report("token_logprobs forward+backward", rows, columns, env, out_dir, "token_logprobs")
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one small shape (CI)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16")
    parser.add_argument("--out", default=None, help="directory for the CSV and Markdown table")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    shapes = QUICK_SHAPES if args.quick else (GPU_SHAPES if args.device == "cuda" else CPU_SHAPES)
    run(args.device, shapes, args.dtypes.split(","), args.out)


if __name__ == "__main__":
    main()
