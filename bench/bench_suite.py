"""The op cases of ``python -m fastpo.bench`` (bench/suite.py) under pytest-benchmark.

    pytest bench/bench_suite.py --benchmark-enable [-k "token_logprobs and fp32"]

One test per suite, implementation, dtype, shape and pass (``fwd``, and ``bwd`` and
``fwdbwd`` for the ops with a gradient), built from the suite's own shapes, inputs,
implementations and correctness guard: each test first checks the implementation's
outputs against the suite's float64 reference, then times its pass. The end-to-end
``e2e`` cases are not here (tests/test_bench_e2e.py runs them).

On a CPU the tests use the suite's ``--quick`` shapes, every dtype the suite measures,
and no ``torch.compile`` rows (compiling takes 10 to 30 seconds per case); on a GPU the
suite's real shapes and the ``compile:`` rows. A peer that is not available on the
device is skipped with the reason. The suite's default options disable timing, so CI
runs each test once, as a check that every case still runs and still agrees with the
reference.
"""

import contextlib
import functools

import pytest
import torch

from fastpo.bench import peers, suite

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_CPU = DEVICE == "cpu"


def _shape_id(shape: dict) -> str:
    return "-".join(f"{key}{value}" for key, value in shape.items())


def _cases():
    every_peer = {spec.name for spec in peers.PEERS}  # listed whether present or not: absent ones skip
    for case in suite.SUITES.values():
        impls = suite.implementation_names(case, DEVICE, every_peer, compile=not ON_CPU)
        # every dtype of a full run, not --quick's fp32 alone: CI then checks the bf16 paths too
        for dtype in case.dtypes(DEVICE, False):
            for shape in case.shapes(DEVICE, ON_CPU):  # --quick's shapes on a CPU, the real ones on a GPU
                for impl in impls:
                    for pass_name in case.passes:
                        yield pytest.param(case.name, impl, dtype, shape, pass_name,
                                           id=f"{case.name}-{impl}-{dtype}-{_shape_id(shape)}-{pass_name}")


@functools.cache
def _available_peers() -> dict[str, dict]:
    return peers.discover_peers(DEVICE)


def _synchronized(fn):
    """``fn``, then a wait for the GPU, so that the clock stops when its kernels end,
    not when they are launched."""
    if ON_CPU:
        return fn

    def run(*args):
        result = fn(*args)
        torch.cuda.synchronize()
        return result

    return run


@contextlib.contextmanager
def _skipped_if_out_of_device_memory():
    """A real GPU shape that does not fit (eager fp32 logits at 32k x 256k, say) is a
    skip, as it is a note in ``python -m fastpo.bench``, not a failure."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as error:
        message = str(error).splitlines()[0]
    else:
        return
    # out of the except block: the error's frames, which hold the inputs, are gone, so
    # the cache can give their memory back to the next test
    torch.cuda.empty_cache()
    pytest.skip(f"out of device memory: {message}")


@pytest.mark.parametrize("suite_name, impl, dtype, shape, pass_name", list(_cases()))
def test_suite_case(benchmark, request, suite_name, impl, dtype, shape, pass_name):
    case = suite.SUITES[suite_name]
    needed_peers = set()
    if suite.kind_of(impl) == "peer":  # the suite names a peer's implementation after the peer
        status = _available_peers()[impl]
        if not status["available"]:
            pytest.skip(f"peer {impl}: {status['note']}")
        needed_peers = {impl}
    # pytest-benchmark's table compares the implementations of one case side by side
    benchmark.group = f"{suite_name} {dtype} {_shape_id(shape)} {pass_name}"
    benchmark.extra_info.update(suite=suite_name, impl=impl, kind=suite.kind_of(impl), tokens=shape["tokens"])

    with _skipped_if_out_of_device_memory():
        inputs = suite.make_case_inputs(case, shape, dtype, DEVICE)
        fn = suite.make_implementation(case, impl, DEVICE, needed_peers)
        outputs = tuple(fn(**inputs))  # checked against fresh inputs: Liger writes into its logits
        mismatch = suite.check_outputs(case, suite.make_case_inputs(case, shape, dtype, DEVICE), outputs, dtype)
        assert mismatch is None, f"{impl} disagrees with the float64 reference: {mismatch}"

        passes = suite.case_passes(fn, inputs, suite.differentiable_inputs(case, inputs))
        if pass_name == "bwd":
            forward_loss = _synchronized(passes.forward_loss)

            def untimed_forward():
                return (forward_loss(),), {}

            # only pedantic mode runs an untimed setup (the forward) before each timed call;
            # it takes a fixed number of rounds, so --benchmark-min-rounds sets it
            benchmark.pedantic(_synchronized(passes.backward), setup=untimed_forward,
                               rounds=request.config.getoption("benchmark_min_rounds"), warmup_rounds=1)
        else:
            benchmark(_synchronized(passes.forward if pass_name == "fwd" else passes.step))
