"""The native backends (csrc/): what is particular to them. The accuracy matrix of
token_logprobs runs on "cpp" in test_logprobs.py with every other backend; here: errors
identical to the torch backend's, backend selection, the fallback when no compiler
works, GAE, the CUDA sources compiled with nvcc, and the CUDA backend on a GPU.

The C++ extension is JIT-built on first use (about 30 s, cached by
torch.utils.cpp_extension); the tests skip, with the reason, when it cannot be built.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from logprob_reference import max_err, reference

from fastpo.kernels import _native, token_logprobs
from fastpo.kernels._backend import resolve_backend

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def native_module():
    module = _native.module()
    if module is None:
        pytest.skip(f"fastpo's native extension cannot be built here: {_native.unavailable_reason()}")
    return module


# ------------------------------------------------------------------ bad input


def _error(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - compared as a pair below
        return type(exc), str(exc)
    return None


@pytest.mark.parametrize(
    "call",
    [
        lambda b: token_logprobs(torch.randn(2, 3, 10), torch.tensor([[0, 1, 2], [3, 4, 10]]), backend=b),
        lambda b: token_logprobs(torch.randn(2, 3, 10), torch.tensor([[0, 1, 2], [3, 4, -1]]), backend=b),
        lambda b: token_logprobs(torch.randn(2, 3, 10), torch.zeros(2, 4, dtype=torch.long), backend=b),
        lambda b: token_logprobs(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, dtype=torch.long), backend=b),
        lambda b: token_logprobs(torch.randn(2, 5), torch.zeros(2), backend=b),
        lambda b: token_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), temperature=0.0, backend=b),
        lambda b: token_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long),
                                 temperature=torch.tensor([1.0, -1.0]), backend=b),
        lambda b: token_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), softcap=-2.0, backend=b),
        lambda b: token_logprobs(torch.randn(5, 2).t(), torch.zeros(2, dtype=torch.long), backend=b),
    ],
)
def test_bad_input_errors_identical_to_torch_backend(call):
    expected = _error(lambda: call("torch"))
    assert expected is not None, "the case must be bad input"
    assert _error(lambda: call("cpp")) == expected


# ------------------------------------------------------------------ backend selection


def test_backend_choice():
    cpu = torch.device("cpu")
    assert resolve_backend("cpp", cpu, "token_logprobs") == "cpp"
    assert resolve_backend(None, cpu, "token_logprobs") == "cpp"  # measured faster: docs/native.md
    with pytest.raises(ValueError, match="backend='cpp' is not implemented for this op"):
        resolve_backend("cpp", cpu, "policy_loss")
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        resolve_backend("cuda", cpu, "token_logprobs")
    with pytest.raises(ValueError, match="backend='cpp' needs CPU tensors"):
        resolve_backend("cpp", torch.device("cuda"), "gae")


def test_environment_native_choice_leaves_other_ops_automatic(monkeypatch):
    monkeypatch.setenv("FASTPO_BACKEND", "cpp")
    cpu = torch.device("cpu")
    assert resolve_backend(None, cpu, "gae") == "cpp"
    assert resolve_backend(None, cpu, "policy_loss") == "torch"


def test_missing_compiler_degrades_to_torch_with_one_warning(tmp_path):
    # A fresh extension cache and a compiler that does not exist: the JIT build fails,
    # one warning is printed, and token_logprobs runs on the torch backend.
    script = (
        "import warnings, torch\n"
        "warnings.simplefilter('always')\n"
        "from fastpo.kernels import token_logprobs\n"
        "from fastpo.kernels._backend import resolve_backend\n"
        "x = torch.randn(3, 5)\n"
        "t = torch.tensor([0, 1, 2])\n"
        "token_logprobs(x, t); token_logprobs(x, t)\n"
        "print(resolve_backend(None, x.device, 'token_logprobs'))\n"
    )
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path), CXX=str(tmp_path / "no-such-c++"),
               FASTPO_NATIVE_FORCE_JIT="1", TRITON_INTERPRET="0")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "torch"
    assert done.stderr.count("native extension unavailable") == 1, done.stderr


# ------------------------------------------------------------------ GAE


def loop_gae(rewards, values, mask, gamma, lam):
    """docs/conventions.md's recursion over the valid positions of each row, in float64 loops."""
    adv = torch.zeros(rewards.shape, dtype=torch.float64)
    for b in range(rewards.shape[0]):
        next_value = next_adv = 0.0
        for t in reversed(range(rewards.shape[1])):
            if not mask[b, t]:
                continue
            delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
            next_adv = delta + gamma * lam * next_adv
            next_value = float(values[b, t])
            adv[b, t] = next_adv
    returns = torch.where(mask, adv + values.double(), 0.0)
    return adv, returns


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gae_matches_loops(dtype):
    from fastpo.kernels.advantages import gae

    rewards = torch.randn(5, 23, dtype=dtype)
    values = torch.randn(5, 23, dtype=dtype)
    mask = torch.rand(5, 23) > 0.3  # holes anywhere
    mask[1] = False  # an empty row
    mask[2, -4:] = False  # right padding
    rewards[~mask] = float("nan")  # masked entries must never be read
    for gamma, lam in ((1.0, 1.0), (0.99, 0.95), (0.0, 0.5)):
        adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam, backend="cpp")
        want_adv, want_ret = loop_gae(rewards, values, mask, gamma, lam)
        assert adv.dtype == dtype
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(adv.double(), want_adv, **tol)
        torch.testing.assert_close(ret.double(), want_ret, **tol)
        torch_adv, _ = gae(rewards, values, mask, gamma=gamma, lam=lam, backend="torch")
        torch.testing.assert_close(adv, torch_adv, **tol)


# ------------------------------------------------------------------ CUDA sources


NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_cuda_sources_compile_for_sm80_and_sm90(tmp_path):
    """nvcc -c of csrc/cuda/kernels.cu for sm_80 and sm_90, and the bindings with
    FASTPO_WITH_CUDA: a syntax or type error in the CUDA path cannot land unnoticed."""
    nvcc = subprocess.run(
        [NVCC, "-std=c++17", "-O1", "-c", str(ROOT / "csrc/cuda/kernels.cu"), "-o", str(tmp_path / "kernels.o"),
         "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"],
        capture_output=True, text=True, timeout=180,
    )
    assert nvcc.returncode == 0, nvcc.stderr
    from torch.utils.cpp_extension import include_paths  # torch ships the pybind11 headers

    cxx = subprocess.run(
        ["c++", "-std=c++17", "-fsyntax-only", "-DFASTPO_WITH_CUDA", "-DTORCH_EXTENSION_NAME=fastpo_check",
         *(f"-I{path}" for path in include_paths()), f"-I{sysconfig.get_paths()['include']}",
         str(ROOT / "csrc/bindings.cpp")],
        capture_output=True, text=True, timeout=120,
    )
    assert cxx.returncode == 0, cxx.stderr


# ------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_backend_matches_reference(dtype):
    if not _native.available(torch.device("cuda")):
        pytest.skip(f"native extension without CUDA: {_native.unavailable_reason()}")
    logits = (torch.randn(2, 33, 32003, device="cuda") * 3).to(dtype)
    targets = torch.randint(0, 32003, (2, 33), device="cuda")
    targets[0, :3] = -100
    x = logits.detach().requires_grad_()
    lp, ent = token_logprobs(x, targets, return_entropy=True, temperature=0.7, backend="cuda")
    (grad,) = torch.autograd.grad(lp.sum() + ent.sum(), x)
    x64 = logits.detach().double().requires_grad_()
    ref_lp, ref_ent = reference(x64, targets, temperature=0.7)
    (ref_grad,) = torch.autograd.grad(ref_lp.sum() + ref_ent.sum(), x64)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert max_err(lp, ref_lp) < tol and max_err(ent, ref_ent) < tol
    assert max_err(grad, ref_grad) < tol
    rewards, values = torch.randn(4, 50, device="cuda"), torch.randn(4, 50, device="cuda")
    mask = torch.rand(4, 50, device="cuda") > 0.2
    from fastpo.kernels.advantages import gae

    got = gae(rewards, values, mask, gamma=0.99, lam=0.95, backend="cuda")
    want = loop_gae(rewards.cpu(), values.cpu(), mask.cpu(), 0.99, 0.95)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu().double(), b, rtol=1e-5, atol=1e-5)
