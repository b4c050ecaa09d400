"""sequence_logprobs (padded and packed) against per-element float64 references."""

import pytest
import torch

from fastpo.kernels import sequence_logprobs

# ------------------------------------------------------------------ references


def reference_padded(token_logprobs, mask, average):
    """Python loop over rows and positions, float64; differentiable through indexing."""
    out = []
    for b in range(token_logprobs.shape[0]):
        total = torch.zeros((), dtype=torch.float64)
        count = 0
        for t in range(token_logprobs.shape[1]):
            if bool(mask[b, t]):
                total = total + token_logprobs[b, t].double()
                count += 1
        out.append(total / count if (average and count) else total)
    return torch.stack(out) if out else torch.zeros(0, dtype=torch.float64)


def reference_packed(stream, lengths, average):
    out, start = [], 0
    for length in lengths:
        total = torch.zeros((), dtype=torch.float64)
        for t in range(start, start + length):
            total = total + stream[t].double()
        out.append(total / length if (average and length) else total)
        start += length
    return torch.stack(out)


def ragged_mask(batch, width):
    """A left-aligned mask of random lengths, plus one empty row and one full row."""
    lengths = torch.randint(0, width + 1, (batch,))
    lengths[0] = 0
    lengths[-1] = width
    return torch.arange(width)[None, :] < lengths[:, None]


def check(actual, expected, tol):
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol)


# ---------------------------------------------------------------------- padded


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_matches_reference(backend, average, dtype):
    x = (torch.randn(6, 37) - 2.0).to(dtype)
    # A scattered mask with holes, not only right padding.
    mask = ragged_mask(6, 37) & (torch.rand(6, 37) > 0.2)
    mask[-1] = True
    xg = x.detach().requires_grad_()
    out = sequence_logprobs(xg, mask, average=average, backend=backend)
    assert out.dtype == torch.float32
    weights = torch.randn(6, dtype=torch.float64)
    (grad,) = torch.autograd.grad((out * weights).sum(), xg)
    assert grad.dtype == dtype

    x64 = x.detach().double().requires_grad_()
    ref = reference_padded(x64, mask, average)
    (ref_grad,) = torch.autograd.grad((ref * weights).sum(), x64)
    check(out, ref, 1e-5)
    check(grad, ref_grad, 1e-2 if dtype == torch.bfloat16 else 1e-6)
    assert out[0] == 0.0 and bool((grad[0] == 0).all()), "an empty row is 0 with no gradient"


def test_padded_mask_dtypes_and_strides(backend):
    base = torch.randn(4, 50)
    x = base[:, ::2]  # non-contiguous view: strides are used as they are
    mask = torch.rand(4, 25) > 0.5
    expected = reference_padded(x, mask, average=True)
    for m in (mask, mask.to(torch.int64), mask.to(torch.float32), mask.t().contiguous().t()):
        check(sequence_logprobs(x, m, average=True, backend=backend), expected, 1e-5)


def test_padding_with_nan_does_not_leak(backend):
    x = torch.randn(3, 11)
    mask = ragged_mask(3, 11)
    x = x.masked_fill(~mask, float("nan")).requires_grad_()
    out = sequence_logprobs(x, mask, average=True, backend=backend)
    assert torch.isfinite(out).all()
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.isfinite(grad).all() and bool((grad[~mask] == 0).all())


def test_float64_stays_float64(backend):
    x = torch.randn(2, 9, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 9, dtype=torch.bool)
    out = sequence_logprobs(x, mask, backend=backend)
    assert out.dtype == torch.float64
    check(out, x.detach().sum(-1), 1e-12)


def test_empty_batch(backend):
    x = torch.randn(0, 5, requires_grad=True)
    out = sequence_logprobs(x, torch.zeros(0, 5, dtype=torch.bool), backend=backend)
    assert out.shape == (0,)
    out.sum().backward()
    assert x.grad.shape == (0, 5)


# ---------------------------------------------------------------------- packed


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_packed_matches_padded_and_reference(backend, average, index_dtype):
    lengths = [3, 0, 17, 1, 0, 9, 0]  # empty sequences in the middle and at the end
    width = max(lengths)
    padded = torch.randn(len(lengths), width) - 1.0
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    stream = padded[mask]  # row-major: the sequences back to back
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=index_dtype)

    sg = stream.clone().requires_grad_()
    pg = padded.clone().requires_grad_()
    packed_out = sequence_logprobs(sg, cu_seqlens=cu_seqlens, average=average, backend=backend)
    padded_out = sequence_logprobs(pg, mask, average=average, backend=backend)
    weights = torch.randn(len(lengths), dtype=torch.float64)
    (packed_grad,) = torch.autograd.grad((packed_out * weights).sum(), sg)
    (padded_grad,) = torch.autograd.grad((padded_out * weights).sum(), pg)

    s64 = stream.double().requires_grad_()
    ref = reference_packed(s64, lengths, average)
    (ref_grad,) = torch.autograd.grad((ref * weights).sum(), s64)

    check(packed_out, ref, 1e-5)
    check(packed_grad, ref_grad, 1e-6)
    check(padded_out, packed_out, 1e-6)
    check(padded_grad[mask], packed_grad, 1e-6)
    assert packed_out[1] == 0.0 and packed_out[-1] == 0.0


@pytest.mark.parametrize("average", [False, True])
def test_sequences_longer_than_one_block(backend, average):
    """Sequences of several kernel blocks (the interpreter's block is 256 tokens)."""
    lengths = [700, 0, 513, 256, 1]
    width = max(lengths)
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    padded = torch.randn(len(lengths), width, dtype=torch.float64)
    stream = padded[mask]
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    # An exact float64 reference: sums of float64 values, differences at rounding level.
    expected = torch.stack([padded[b, :n].sum() / (max(n, 1) if average else 1) for b, n in enumerate(lengths)])
    sg = stream.clone().requires_grad_()
    packed_out = sequence_logprobs(sg, cu_seqlens=cu_seqlens, average=average, backend=backend)
    padded_out = sequence_logprobs(padded, mask, average=average, backend=backend)
    check(packed_out, expected, 1e-10)
    check(padded_out, expected, 1e-10)
    weights = torch.randn(len(lengths), dtype=torch.float64)
    (grad,) = torch.autograd.grad((packed_out * weights).sum(), sg)
    per_token = weights / torch.tensor([max(n, 1) if average else 1 for n in lengths], dtype=torch.float64)
    check(grad, torch.repeat_interleave(per_token, torch.tensor(lengths)), 1e-12)


def test_packed_without_any_sequence(backend):
    out = sequence_logprobs(
        torch.zeros(0, requires_grad=True), cu_seqlens=torch.zeros(1, dtype=torch.int32), backend=backend
    )
    assert out.shape == (0,)


# ------------------------------------------------------------------ bad input


def test_bad_cu_seqlens(backend):
    x = torch.randn(10)
    cases = [
        (torch.tensor([0, 6, 4, 10], dtype=torch.int32), "non-decreasing"),
        (torch.tensor([1, 4, 10], dtype=torch.int32), "start at 0"),
        (torch.tensor([0, 4, 9], dtype=torch.int32), "cu_seqlens\\[-1\\] = 9"),
        (torch.tensor([[0, 10]], dtype=torch.int32), "1-D"),
    ]
    for cu, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            sequence_logprobs(x, cu_seqlens=cu, backend=backend)
        assert "cu_seqlens" in str(info.value)
    with pytest.raises(TypeError, match="cu_seqlens"):
        sequence_logprobs(x, cu_seqlens=torch.tensor([0.0, 10.0]), backend=backend)


def test_bad_layout_arguments(backend):
    x = torch.randn(3, 4)
    mask = torch.ones(3, 4, dtype=torch.bool)
    cu = torch.tensor([0, 12], dtype=torch.int32)
    with pytest.raises(ValueError, match="exactly one of mask"):
        sequence_logprobs(x, backend=backend)
    with pytest.raises(ValueError, match="exactly one of mask"):
        sequence_logprobs(x.reshape(-1), mask.reshape(-1), cu_seqlens=cu, backend=backend)
    with pytest.raises(ValueError, match="mask.shape"):
        sequence_logprobs(x, mask[:, :3], backend=backend)
    with pytest.raises(ValueError, match="token_logprobs must be \\(B, T\\)"):
        sequence_logprobs(x.reshape(-1), mask.reshape(-1), backend=backend)
    with pytest.raises(ValueError, match="1-D packed"):
        sequence_logprobs(x, cu_seqlens=cu, backend=backend)
    with pytest.raises(TypeError, match="token_logprobs"):
        sequence_logprobs(x.long(), mask, backend=backend)


# ------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.parametrize("average", [False, True])
def test_triton_matches_torch_on_cuda(average):
    lengths = torch.randint(0, 4097, (64,))
    lengths[:3] = torch.tensor([0, 1, 4096])
    mask = torch.arange(4096)[None, :] < lengths[:, None]
    x = torch.randn(64, 4096).cuda()
    mask = mask.cuda()
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32).cuda()
    outs = {}
    for be in ("torch", "triton"):
        xg = x.clone().requires_grad_()
        padded = sequence_logprobs(xg, mask, average=average, backend=be)
        (grad,) = torch.autograd.grad(padded.sum(), xg)
        sg = x[mask].clone().requires_grad_()
        packed = sequence_logprobs(sg, cu_seqlens=cu, average=average, backend=be)
        (pgrad,) = torch.autograd.grad(packed.sum(), sg)
        outs[be] = (padded, grad, packed, pgrad)
    for a, b in zip(outs["torch"], outs["triton"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-3)
