"""logits_kl against independent float64 references, on every CPU-runnable backend."""

import math

import pytest
import torch

from fastpo.kernels import logits_kl

# The most negative float32: docs/conventions.md and logprobs.py treat a -inf logit as this value.
FMAX32 = 3.4028234663852886e38


# ------------------------------------------------------------------ references


def reference_loop(logits, ref_logits, temperature=1.0, mask=None):
    """KL(p || q) per row with Python loops in float64, straight from the definition."""
    vocab = logits.shape[-1]
    shape = logits.shape[:-1]
    rows = logits.reshape(-1, vocab).double().tolist()
    ref_rows = ref_logits.reshape(-1, vocab).double().tolist()
    temps = torch.as_tensor(temperature, dtype=torch.float64).expand(shape).reshape(-1).tolist()
    keep = [True] * len(rows) if mask is None else [bool(v) for v in mask.reshape(-1).tolist()]
    out = []
    for row, ref_row, temp, valid in zip(rows, ref_rows, temps, keep):
        if not valid:
            out.append(0.0)
            continue

        def log_softmax(xs):
            z = [max(x / temp, -FMAX32) for x in xs]
            top = max(z)
            log_sum = math.log(sum(math.exp(v - top) for v in z))
            # (v - top) first: top + log_sum would round to top when top is -FMAX32.
            return [(v - top) - log_sum for v in z]

        log_p, log_q = log_softmax(row), log_softmax(ref_row)
        out.append(sum(math.exp(a) * (a - b) for a, b in zip(log_p, log_q) if math.exp(a) > 0))
    return torch.tensor(out, dtype=torch.float64).view(shape)


def reference(logits, ref_logits, temperature=1.0, mask=None):
    """Explicit float64 log_softmax of both; differentiable with respect to ``logits``.

    z = max(x / T, -FMAX32) with dz/dx = 1/T everywhere: a -inf logit *is* the most
    negative finite float (as in token_logprobs), so the gradient is the one at that
    value, not the zero gradient of a clamp (the clamp is applied straight-through)."""
    x = logits.double().clamp(min=-FMAX32)
    t = temperature.double().unsqueeze(-1) if isinstance(temperature, torch.Tensor) else temperature
    z = x / t
    z = z + (z.clamp(min=-FMAX32) - z).detach()
    log_p = z.log_softmax(-1)
    log_q = (ref_logits.double() / t).clamp(min=-FMAX32).log_softmax(-1)
    p = log_p.exp()
    kl = torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)
    if mask is not None:
        kl = torch.where(mask.bool(), kl, 0.0)
    return kl


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def check(logits, ref_logits, backend, temperature=1.0, mask=None, loop=True):
    """Forward against both references and the gradient against autograd of the
    explicit one. fp32/fp64 accumulate in fp32/fp64: tight bounds; a bf16/fp16 gradient
    is rounded once to its dtype (relative 2**-8 / 2**-11)."""
    logits = logits.detach().requires_grad_(True)
    kl = logits_kl(logits, ref_logits, temperature=temperature, mask=mask, backend=backend)
    assert kl.shape == logits.shape[:-1]
    assert kl.dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32)
    expected = reference(logits, ref_logits, temperature, mask)
    if loop:
        assert max_err(expected, reference_loop(logits, ref_logits, temperature, mask)) < 1e-10
    assert max_err(kl, expected) <= 1e-5 * (1 + expected.abs().max().item())

    upstream = torch.randn(kl.shape, dtype=torch.float64, device=kl.device)
    (grad,) = torch.autograd.grad(kl, logits, upstream.to(kl.dtype))
    # The gradient at a -inf logit is the one at -FMAX32 (see reference()).
    leaf = logits.detach().double().clamp(min=-FMAX32).requires_grad_(True)
    (expected_grad,) = torch.autograd.grad(reference(leaf, ref_logits, temperature, mask), leaf, upstream)
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    assert torch.isfinite(grad).all()
    scale = expected_grad.abs().max().item() if expected_grad.numel() else 0.0
    rel = {torch.bfloat16: 2**-7, torch.float16: 2**-10}.get(logits.dtype, 1e-5)
    assert max_err(grad, expected_grad) <= rel * scale + 1e-7
    return kl, grad


# ------------------------------------------------------------------ forward + grad


@pytest.mark.parametrize("vocab", [1, 7, 1000])
def test_matches_reference(backend, vocab):
    logits = torch.randn(2, 3, vocab) * 2
    ref_logits = torch.randn(2, 3, vocab) * 2
    check(logits, ref_logits, backend)


def test_large_odd_vocabulary(backend):
    # More than one interpreter/GPU block per row, and a ragged last block.
    logits = torch.randn(2, 32003) * 3
    ref_logits = logits + 0.5 * torch.randn(2, 32003)
    check(logits, ref_logits, backend, loop=False)


def test_float64_gradcheck(backend):
    logits = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    ref_logits = torch.randn(2, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: logits_kl(x, ref_logits, temperature=0.8, backend=backend), (logits,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(backend, dtype):
    logits = (torch.randn(3, 4, 257) * 2).to(dtype)
    ref_logits = (torch.randn(3, 4, 257) * 2).to(dtype)
    check(logits, ref_logits, backend, loop=False)


def test_mixed_dtypes(backend):
    # bf16 policy logits against an fp32 reference model.
    logits = torch.randn(3, 50).to(torch.bfloat16)
    ref_logits = torch.randn(3, 50)
    check(logits, ref_logits, backend)


def test_non_contiguous_rows(backend):
    # logits[:, :-1] (two row groups, used in place) against a reference whose rows
    # come from a transposed (T, B, V) buffer, and a three-group layout that is copied.
    base = torch.randn(3, 6, 33)
    logits = base[:, :-1]
    ref_logits = torch.randn(5, 3, 33).transpose(0, 1)
    assert not logits.is_contiguous() and not ref_logits.is_contiguous()
    check(logits, ref_logits, backend)
    weird = torch.randn(4, 3, 2, 9).permute(2, 1, 0, 3)
    check(weird, torch.randn(2, 3, 4, 9), backend)


@pytest.mark.parametrize("kind", ["scalar", "per_sequence", "per_token"])
def test_temperature(backend, kind):
    logits = torch.randn(3, 4, 40) * 2
    ref_logits = torch.randn(3, 4, 40) * 2
    temperature = {
        "scalar": 0.7,
        "per_sequence": torch.tensor([[0.5], [1.0], [2.0]]),
        "per_token": torch.rand(3, 4) + 0.3,
    }[kind]
    check(logits, ref_logits, backend, temperature=temperature)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32, torch.int64])
def test_mask(backend, mask_dtype):
    logits = torch.randn(3, 5, 20)
    ref_logits = torch.randn(3, 5, 20)
    mask = torch.rand(3, 5) > 0.4
    mask[0] = False  # a sequence with no valid position
    kl, grad = check(logits, ref_logits, backend, mask=mask.to(mask_dtype))
    assert (kl[~mask] == 0).all() and (kl[mask] > 0).all()
    assert (grad[~mask] == 0).all()

    # Masked-out positions may hold garbage: it must not leak into the result.
    def kl_and_grad(x, x_ref):
        x = x.clone().requires_grad_(True)
        out = logits_kl(x, x_ref, mask=mask.to(mask_dtype), backend=backend)
        return out, torch.autograd.grad(out.sum(), x)[0]

    kl_clean, grad_clean = kl_and_grad(logits, ref_logits)
    logits[~mask] = float("nan")
    ref_logits[~mask] = float("inf")
    kl_garbage, grad_garbage = kl_and_grad(logits, ref_logits)
    assert torch.equal(kl_garbage, kl_clean)
    assert torch.equal(grad_garbage, grad_clean)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_negative_infinity_logits(backend, temperature):
    logits = torch.randn(5, 30)
    ref_logits = torch.randn(5, 30)
    logits[0, :5] = -math.inf  # policy excludes tokens the reference allows: finite KL
    logits[1, 3:9] = -math.inf  # both exclude the same tokens
    ref_logits[1, 3:9] = -math.inf
    logits[2] = -math.inf  # both rows fully excluded: two uniform distributions, KL 0
    ref_logits[2] = -math.inf
    logits[3, -3:] = -math.inf  # -inf in the last positions only
    logits[4] = -math.inf  # a uniform policy against a finite reference: log(V) must survive
    kl, grad = check(logits, ref_logits, backend, temperature=temperature)
    assert kl[2].item() == 0.0
    assert (grad[0, :5] == 0).all()


def test_reference_excludes_supported_token(backend):
    # KL(p || q) is infinite when q_v = 0 < p_v: documented as +inf or a huge number.
    logits = torch.randn(2, 10)
    ref_logits = torch.randn(2, 10)
    ref_logits[0, 4] = -math.inf
    kl = logits_kl(logits, ref_logits, backend=backend)
    assert not torch.isnan(kl).any()
    assert kl[0].item() > 1e30
    assert math.isfinite(kl[1].item())


def test_nonnegative(backend):
    logits = torch.randn(4, 6, 64) * 5
    same = logits_kl(logits, logits.clone(), backend=backend)
    shifted = logits_kl(logits, logits + 123.0, backend=backend)  # softmax is shift invariant
    random = logits_kl(logits, torch.randn(4, 6, 64) * 5, backend=backend)
    assert (same == 0).all()
    assert (shifted >= 0).all() and shifted.max().item() < 1e-4
    assert (random > 0).all()


def test_reference_logits_get_no_gradient(backend):
    logits = torch.randn(2, 3, 11, requires_grad=True)
    ref_logits = torch.randn(2, 3, 11, requires_grad=True)
    logits_kl(logits, ref_logits, backend=backend).sum().backward()
    assert logits.grad is not None and ref_logits.grad is None


def test_empty(backend):
    logits = torch.randn(0, 4, 9, requires_grad=True)
    kl = logits_kl(logits, torch.randn(0, 4, 9), backend=backend)
    assert kl.shape == (0, 4)
    kl.sum().backward()
    assert logits.grad.shape == logits.shape


# ------------------------------------------------------------------ CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend_name", ["triton", "torch"])
def test_cuda_matches_reference(backend_name, dtype):
    # The compiled kernels (the interpreter is off on a GPU machine): several blocks per
    # row, a sliced layout, per-sequence temperature, a mask and -inf logits.
    logits = (torch.randn(2, 17, 32003, device="cuda") * 3).to(dtype)
    ref_logits = (logits.float() + torch.randn(2, 17, 32003, device="cuda")).to(dtype)
    logits[1, 3, :5000] = -math.inf
    ref_logits[1, 3, :5000] = -math.inf
    logits[0, 5] = -math.inf
    mask = torch.rand(2, 16, device="cuda") > 0.2
    temperature = torch.tensor([[0.7], [1.3]], device="cuda")
    check(logits[:, :-1], ref_logits[:, :-1], backend_name, temperature=temperature, mask=mask, loop=False)


# ------------------------------------------------------------------ bad input


def test_bad_input():
    logits = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match=r"ref_logits.shape \(2, 3, 6\)"):
        logits_kl(logits, torch.randn(2, 3, 6))
    with pytest.raises(TypeError, match="ref_logits has dtype torch.int64"):
        logits_kl(logits, torch.zeros(2, 3, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        logits_kl([1.0], logits)
    with pytest.raises(ValueError, match=r"mask.shape \(2, 4\)"):
        logits_kl(logits, logits, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="temperature must be a finite number > 0, got -1.0"):
        logits_kl(logits, logits, temperature=-1.0)
    with pytest.raises(ValueError, match="unit stride"):
        logits_kl(torch.randn(2, 5, 3).transpose(1, 2), logits)
    with pytest.raises(ValueError, match="0-dim"):
        logits_kl(torch.tensor(1.0), torch.tensor(1.0))
    with pytest.raises(ValueError, match="backend='cuda'"):
        logits_kl(logits, logits, backend="cuda")
