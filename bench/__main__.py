"""python -m fastpo.bench: the benchmark suite (see fastpo.bench.suite and docs/benchmarks.md)."""

from __future__ import annotations

import argparse
import json

import torch

from fastpo.bench import suite


# Plain text for the terminal (the module docstrings are reST, for the source's readers).
DESCRIPTION = (
    "The benchmark suite: every fastpo kernel against eager PyTorch, torch.compile of the same eager code and "
    "the peer libraries that are installed (TRL and Liger-Kernel with the [bench] extra; flash-attn, "
    "cut-cross-entropy and quack on GPUs). Each case runs in a fresh process: it first checks the outputs against "
    "a float64 reference (a mismatch or a failure becomes a note instead of a time), then times forward, "
    "backward and forward+backward (median, 20th and 80th percentiles) and measures the peak memory beyond the "
    "inputs and their gradients. The e2e suite times whole GRPO and DPO training steps of fastpo's engine against "
    "TRL's trainers; it runs in a full run and with --only e2e, not in a plain --quick run."
)
EPILOG = "With --out: a CSV, a Markdown table and plots. Every case and column is described in docs/benchmarks.md."


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastpo.bench", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--quick", action="store_true", help="small CPU shapes, fp32 only (CI: about 2 minutes)")
    parser.add_argument("--only", default=None, metavar="SUITE[,SUITE]",
                        help=f"comma-separated suites, of: {', '.join(suite.NAMES)}")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu",
                        help="default: cuda when a GPU is present, else cpu")
    parser.add_argument("--out", default=None, metavar="DIR", help="directory for the CSV, the Markdown table and the plots")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="measure torch.compile of the eager code too (default: yes, except with --quick: "
                             "compiling takes 10 to 30 seconds per case on a small CPU)")
    parser.add_argument("--reps", type=int, default=None,
                        help="timed repetitions per pass (default 5 on CPU, 20 on GPU); for e2e, timed training steps "
                             "after the warm-up step (default 5)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per case (torch.set_num_threads); 1 keeps timings steady on a shared machine")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(suite.child(json.loads(args.child))))
        return
    only = args.only.split(",") if args.only else None
    unknown = sorted(set(only or ()) - set(suite.NAMES))
    if unknown:
        parser.error(f"--only: unknown suite(s) {', '.join(unknown)}; choose from {', '.join(suite.NAMES)}")
    compile_rows = not args.quick if args.compile is None else args.compile
    suite.run(args.device, args.quick, only, args.out, compile=compile_rows, reps=args.reps, threads=args.threads)


if __name__ == "__main__":
    main()
