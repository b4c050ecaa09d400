"""linear_token_logprobs forward+backward against eager matmul + log_softmax + gather
and, when TRL 1.16+ is installed, TRL's fused LM head (``trl`` rows: its
``ChunkedLogProbFunction``, what its trainers' ``fused_lm_head=True`` forward calls).

    python -m fastpo.bench.linear_logprobs [--quick] [--device cpu|cuda] [--out DIR]

Extra memory is the peak beyond hidden, weight and their gradients. On a GPU the three
plain matmuls every implementation must do (x W^T, dlogits W, dlogits^T x) are timed
with cuBLAS in the same run, and each time is reported as a multiple of theirs.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from fastpo.bench import harness

GPU_SHAPES = [(8192, 4096, 128256), (16384, 4096, 151936)]
CPU_SHAPES = [(1024, 512, 32000), (1024, 256, 151936)]
QUICK_SHAPES = [(128, 64, 32000)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def implementations() -> dict:
    from fastpo.kernels import linear_token_logprobs

    def eager(h, w, t, entropy):
        logp = (h @ w.T).float().log_softmax(-1)
        lp = logp.gather(-1, t[:, None]).squeeze(-1)
        return lp, (-(logp.exp() * logp).sum(-1) if entropy else None)

    def fused(h, w, t, entropy):
        out = linear_token_logprobs(h, w, t, return_entropy=entropy)
        return out if entropy else (out, None)

    impls = {"eager": eager, "fastpo": fused}
    try:  # TRL 1.16's fused LM head (trl.trainer.utils.add_fused_lm_head), when installed
        from trl.kernels import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE
    except ImportError:
        return impls

    def trl_head(h, w, t, entropy):
        # the arguments TRL's fused forward passes: no bias, T = 1, no softcap, scale 1
        outputs = ("log_probs", "entropy") if entropy else ("log_probs",)
        lp, ent, *_ = ChunkedLogProbFunction.apply(h, w, None, t, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0,
                                                   outputs)
        return lp, ent

    return {**impls, "trl": trl_head}


def child(args: dict) -> dict:
    device, (n, h, v), dtype = args["device"], args["shape"], DTYPES[args["dtype"]]
    torch.manual_seed(0)
    hidden = (torch.randn(n, h, device=device) / h**0.5).to(dtype).requires_grad_()
    weight = torch.randn(v, h, device=device).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), device=device)
    if args["impl"] == "matmuls":
        dlogits = torch.empty(n, v, device=device, dtype=dtype)

        def step():
            hidden.detach() @ weight.detach().T
            dlogits @ weight.detach()
            dlogits.T @ hidden.detach()
    else:
        fn = implementations()[args["impl"]]

        def step():
            lp, ent = fn(hidden, weight, targets, args["entropy"])
            (lp.sum() + (ent.sum() if ent is not None else 0)).backward()
            hidden.grad = weight.grad = None

    step()  # pages in code and thread pools
    timing = harness.time_fn(step, device, warmup=0, reps=5 if device == "cpu" else 10)
    grads = (hidden.numel() + weight.numel()) * hidden.element_size()
    peak = harness.measure_peak_extra(lambda: step, device)  # last: it changes the allocator
    return {"extra_bytes": max(0, peak - grads), "median_ms": timing.median_ms,
            "p20_ms": timing.p20_ms, "p80_ms": timing.p80_ms}


def run(device: str, shapes, dtypes, out_dir: str | None) -> list[dict]:
    rows = []
    impls = (["matmuls"] if device == "cuda" else []) + list(implementations())
    for shape in shapes:
        logits_bytes = shape[0] * shape[2] * 4
        for dtype in dtypes:
            matmul_ms = None
            for impl in impls:
                for entropy in ([False] if impl == "matmuls" else [False, True]):
                    result = harness.run_child("fastpo.bench.linear_logprobs", {
                        "impl": impl, "shape": list(shape), "dtype": dtype, "device": device, "entropy": entropy})
                    row = {"impl": impl + (" +entropy" if entropy else ""), "N,H,V": ",".join(map(str, shape)),
                           "dtype": dtype, "median_ms": result["median_ms"], "p20_ms": result["p20_ms"],
                           "p80_ms": result["p80_ms"], "extra_mem_MiB": result["extra_bytes"] / 2**20,
                           "extra_mem_%fp32_logits": 100.0 * result["extra_bytes"] / logits_bytes}
                    if impl == "matmuls":
                        matmul_ms = result["median_ms"]
                    elif matmul_ms:
                        row["x_3_matmuls"] = result["median_ms"] / matmul_ms
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr)
    env = harness.environment(device)
    columns = ["impl", "N,H,V", "dtype", "median_ms", "p20_ms", "p80_ms", "x_3_matmuls",
               "extra_mem_MiB", "extra_mem_%fp32_logits"]
    harness.report("linear_token_logprobs forward+backward", rows, columns, env, out_dir, "linear_logprobs")
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    shapes = QUICK_SHAPES if args.quick else (GPU_SHAPES if args.device == "cuda" else CPU_SHAPES)
    run(args.device, shapes, args.dtypes.split(","), args.out)


if __name__ == "__main__":
    main()
