"""token_logprobs against independent float64 references, on every CPU-runnable backend
(torch, Triton through its interpreter, and the C++ extension when it builds)."""

import math

import pytest
import torch
from logprob_reference import check_against_reference, reference, reference_loop, reference_statistics

from fastpo.kernels import token_logprobs


# ------------------------------------------------------------------ accuracy


def test_reference_matches_per_element_loops():
    logits = torch.randn(3, 4, 11) * 4
    targets = torch.randint(0, 11, (3, 4))
    targets[1, 2] = -100
    temp = torch.tensor([[0.5], [1.0], [2.0]])
    for softcap in (None, 3.0):
        lp, ent = reference(logits.double(), targets, temperature=temp, softcap=softcap)
        loop_lp, loop_ent = reference_loop(logits, targets, temperature=temp, softcap=softcap)
        torch.testing.assert_close(lp, loop_lp, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ent, loop_ent, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "rows,vocab,dtype",
    [
        (1, 1, torch.float32),
        (3, 7, torch.float32),
        (257, 7, torch.bfloat16),
        (257, 1000, torch.float32),
        (3, 1000, torch.float16),
        (3, 32003, torch.bfloat16),
        (257, 32003, torch.float32),
        (3, 151936, torch.float32),
        (1, 151936, torch.bfloat16),
        (2, 128256, torch.float16),
    ],
)
def test_matches_reference_flat_rows(logprobs_backend, rows, vocab, dtype):
    logits = (torch.randn(rows, vocab) * 3).to(dtype)
    targets = torch.randint(0, vocab, (rows,))
    check_against_reference(logits, targets, logprobs_backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_batch_time_layout_with_per_sequence_temperature(logprobs_backend, dtype):
    logits = (torch.randn(3, 9, 1000) * 4).to(dtype)
    targets = torch.randint(0, 1000, (3, 9))
    targets[0, -3:] = -100  # right padding
    targets[2, 0] = -100
    temp = torch.tensor([[0.7], [1.0], [1.3]])
    check_against_reference(logits, targets, logprobs_backend, temperature=temp)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softcap_and_scalar_temperature(logprobs_backend, dtype):
    logits = (torch.randn(2, 5, 7) * 40).to(dtype)
    targets = torch.randint(0, 7, (2, 5))
    check_against_reference(logits, targets, logprobs_backend, temperature=0.6, softcap=30.0)


def test_per_token_temperature_and_custom_ignore_index(logprobs_backend):
    logits = torch.randn(4, 6, 33)
    targets = torch.randint(0, 33, (4, 6))
    targets[1, 1] = 5
    temp = torch.rand(4, 6) + 0.5
    check_against_reference(logits, targets, logprobs_backend, temperature=temp, ignore_index=5)


def test_non_contiguous_rows_are_read_in_place(logprobs_backend):
    # logits[:, :-1] of a (B, T+1, V) tensor, the shift every trainer does, and a
    # vocabulary slice whose rows are longer than V: neither may be copied.
    full = torch.randn(3, 8, 1003)
    shifted = full[:, :-1, :1000]
    assert not shifted.is_contiguous()
    targets = torch.randint(0, 1000, (3, 7))
    check_against_reference(shifted, targets, logprobs_backend, temperature=torch.tensor([[0.9], [1.1], [1.0]]))
    every_other = full[::2, ::3, :7]  # two outer strides, tiny vocabulary
    check_against_reference(every_other, torch.randint(0, 7, (2, 3)), logprobs_backend)
    three_groups = torch.randn(2, 3, 4, 9)[:, :, :3]  # cannot collapse to two strides
    check_against_reference(three_groups, torch.randint(0, 9, (2, 3, 3)), logprobs_backend)


def test_forward_without_entropy_matches_with_entropy(logprobs_backend):
    logits = torch.randn(5, 301)
    targets = torch.randint(0, 301, (5,))
    x = logits.clone().requires_grad_()
    lp = token_logprobs(x, targets, backend=logprobs_backend)
    (grad,) = torch.autograd.grad(lp.sum(), x)
    lp2, _ = token_logprobs(logits, targets, return_entropy=True, backend=logprobs_backend)
    torch.testing.assert_close(lp, lp2)
    ref_lp, _ = reference(logits.double().requires_grad_(), targets)
    torch.testing.assert_close(grad, torch.softmax(logits.double(), -1).neg().scatter_add(
        -1, targets[:, None], torch.ones(5, 1, dtype=torch.float64)).float(), rtol=1e-5, atol=1e-6)


def test_entropy_only_gradient(logprobs_backend):
    logits = torch.randn(4, 50, dtype=torch.float64)
    targets = torch.randint(0, 50, (4,))
    x = logits.clone().requires_grad_()
    _, ent = token_logprobs(x, targets, return_entropy=True, backend=logprobs_backend)
    (grad,) = torch.autograd.grad(ent.sum(), x)
    x64 = logits.clone().requires_grad_()
    (ref_grad,) = torch.autograd.grad(reference(x64, targets)[1].sum(), x64)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ extremes


@pytest.mark.parametrize(
    "case",
    ["huge_positive", "huge_negative", "masked_vocab", "all_equal", "one_huge", "all_negative"],
)
def test_extreme_values(logprobs_backend, case):
    vocab = 37
    logits = torch.randn(6, vocab)
    targets = torch.randint(0, vocab, (6,))
    if case == "huge_positive":
        logits = logits.sign() * 1e4
    elif case == "huge_negative":
        logits = -1e4 + logits
    elif case == "masked_vocab":
        logits[:, 5:20] = float("-inf")
        targets[:3] = 25
        targets[3] = 7  # a masked-out target: log-prob -inf, gradient finite
        targets[4:] = torch.tensor([30, 2])
    elif case == "all_equal":
        logits = torch.full((6, vocab), 3.25)
    elif case == "one_huge":
        logits[:, 4] = 1e4
        targets[:2] = 4
    elif case == "all_negative":
        logits = -logits.abs() - 50.0
    x = logits.clone().requires_grad_()
    lp, ent = token_logprobs(x, targets, return_entropy=True, backend=logprobs_backend)
    (grad,) = torch.autograd.grad(lp.sum() + 3.0 * ent.sum(), x)
    ref_lp, ref_ent = reference(logits.double(), targets)
    finite = torch.isfinite(ref_lp)
    torch.testing.assert_close(lp[finite].double(), ref_lp[finite], rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.isneginf(lp), torch.isneginf(ref_lp))
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=1e-5)
    assert (lp <= 0).all(), "a log-probability can never be positive"
    assert (ent >= -1e-6).all()
    assert torch.isfinite(grad).all()
    if case == "all_equal":
        torch.testing.assert_close(lp, torch.full((6,), -math.log(vocab)))
        torch.testing.assert_close(ent, torch.full((6,), math.log(vocab)))
    if case == "masked_vocab":
        masked_grad = grad[:, 5:20].clone()
        assert masked_grad[3, 7 - 5] == 1.0  # d lp / d z_target = 1 - p_target = 1
        masked_grad[3, 7 - 5] = 0.0
        assert (masked_grad == 0).all()


def test_long_masked_prefix_then_finite_logits(logprobs_backend):
    # A masked-out run longer than any kernel's block, before the first finite logit:
    # the online entropy update must not compute 0 * -inf there.
    logits = torch.randn(3, 40000)
    logits[:, :20000] = float("-inf")
    targets = torch.randint(20000, 40000, (3,))
    check_against_reference(logits, targets, logprobs_backend)


def test_fully_masked_row_has_no_nan(logprobs_backend):
    # Documented: a target whose logit is -inf has log-probability -inf; a row whose
    # logits are all -inf is otherwise treated as uniform, so entropy and gradient stay finite.
    x = torch.full((2, 9), float("-inf"), requires_grad=True)
    lp, ent = token_logprobs(x, torch.tensor([0, 8]), return_entropy=True, backend=logprobs_backend)
    assert torch.isneginf(lp).all()
    torch.testing.assert_close(ent, torch.full((2,), math.log(9)))
    (grad,) = torch.autograd.grad(ent.sum(), x)
    assert torch.isfinite(grad).all()


def test_nan_logit_makes_its_row_nan_and_no_other(logprobs_backend):
    # A NaN in the logits is a bug upstream: it must show, not be read as probability 0.
    logits = torch.randn(3, 50)
    logits[1, 7] = float("nan")
    x = logits.clone().requires_grad_()
    lp, ent = token_logprobs(x, torch.tensor([0, 3, 9]), return_entropy=True, backend=logprobs_backend)
    (grad,) = torch.autograd.grad(lp.sum() + ent.sum(), x)
    assert torch.isnan(lp[1]) and torch.isnan(ent[1]) and torch.isnan(grad[1]).all()
    rows = torch.tensor([0, 2])
    assert torch.isfinite(lp[rows]).all() and torch.isfinite(ent[rows]).all() and torch.isfinite(grad[rows]).all()


def test_ignored_positions_give_zero_and_no_gradient(logprobs_backend):
    logits = torch.randn(2, 4, 13)
    targets = torch.full((2, 4), -100)
    targets[0, 1] = 3
    x = logits.clone().requires_grad_()
    lp, ent = token_logprobs(x, targets, return_entropy=True, backend=logprobs_backend)
    (grad,) = torch.autograd.grad(lp.sum() + ent.sum(), x)
    mask = targets != -100
    assert (lp[~mask] == 0).all() and (ent[~mask] == 0).all()
    assert (grad[~mask] == 0).all() and (grad[mask] != 0).any()


def test_empty_inputs_give_empty_outputs(logprobs_backend):
    for shape in [(0, 11), (2, 0, 11)]:
        x = torch.randn(shape, requires_grad=True)
        targets = torch.zeros(shape[:-1], dtype=torch.long)
        lp, ent = token_logprobs(x, targets, return_entropy=True, backend=logprobs_backend)
        assert lp.shape == shape[:-1] and ent.shape == shape[:-1]
        (lp.sum() + ent.sum()).backward()
        assert x.grad.shape == x.shape


def test_gradcheck_float64(logprobs_backend):
    logits = torch.randn(3, 2, 6, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([[0, 5], [-100, 2], [3, 3]])
    temp = torch.tensor([[0.8], [1.0], [1.7]], dtype=torch.float64)

    def both(x):
        return token_logprobs(x, targets, temperature=temp, softcap=2.5, return_entropy=True,
                              backend=logprobs_backend)

    assert torch.autograd.gradcheck(both, (logits,))


def test_unaligned_rows_in_low_precision(logprobs_backend):
    # rows starting at odd element offsets: vectorized loads may assume no alignment
    logits = torch.randn(5, 2 * 1001 + 1).to(torch.bfloat16)[:, 1:1002]
    check_against_reference(logits, torch.randint(0, 1001, (5,)), logprobs_backend)


def test_int32_targets_match_int64(logprobs_backend):
    logits = torch.randn(5, 301)
    targets = torch.randint(0, 301, (5,))
    a = token_logprobs(logits, targets.int(), backend=logprobs_backend)
    b = token_logprobs(logits, targets, backend=logprobs_backend)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------ extra statistics

ALL_STATISTICS = ("log_sum_sq_probs", "mean_logit", "is_top1", "top1_logprob")


def check_statistics_against_reference(logits, targets, backend, **kw):
    lp, ent, stats = token_logprobs(logits, targets, statistics=ALL_STATISTICS, backend=backend, **kw)
    assert ent is None and set(stats) == set(ALL_STATISTICS)
    ref = reference_statistics(logits, targets, **kw)
    for name, value in stats.items():
        assert value.shape == targets.shape and not value.requires_grad
        if name == "is_top1":
            assert value.dtype == torch.bool
            assert torch.equal(value, ref[name]), name
        else:
            assert value.dtype == lp.dtype
            tol = 1e-12 if logits.dtype == torch.float64 else 2e-5
            torch.testing.assert_close(value.double(), ref[name], rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("vocab", [1, 7, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_statistics_match_float64_loops(backend, vocab, dtype):
    logits = (torch.randn(3, 5, vocab) * 4).to(dtype)
    targets = torch.randint(0, vocab, (3, 5))
    targets[0, 1] = -100
    targets[2, 4] = logits[2, 4].argmax()  # at least one top-1 hit
    temp = torch.tensor([[0.7], [1.0], [1.3]], dtype=dtype)
    check_statistics_against_reference(logits, targets, backend, temperature=temp)
    check_statistics_against_reference(logits, targets, backend, temperature=0.6, softcap=3.0)


def test_statistics_with_inf_logits_and_ties(backend):
    logits = torch.randn(6, 7)
    logits[0, 2] = float("-inf")  # one masked-out token: mean -inf, the rest finite
    logits[1] = float("-inf")  # all masked out: uniform, token 0 is the argmax
    logits[2] = 1.5  # all tied: only token 0 is top-1
    logits[3, [1, 4]] = 9.0  # a tie for the max: the first one wins
    targets = torch.tensor([2, 0, 3, 4, -100, 1])
    targets[5] = logits[5].argmax()
    lp, _, stats = token_logprobs(logits, targets, statistics=ALL_STATISTICS, backend=backend)
    ref = reference_statistics(logits, targets)
    assert stats["mean_logit"][0] == float("-inf") and torch.isfinite(stats["mean_logit"][1:]).sum() == 4
    assert stats["is_top1"].tolist() == [False, True, False, False, False, True]
    assert torch.equal(stats["is_top1"], ref["is_top1"])
    finite = torch.isfinite(ref["mean_logit"])
    for name in ("log_sum_sq_probs", "top1_logprob"):
        torch.testing.assert_close(stats[name].double(), ref[name], rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(stats["mean_logit"].double()[finite], ref["mean_logit"][finite])
    assert torch.isfinite(lp[2:]).all()


def test_statistics_leave_logprobs_entropy_and_gradients_unchanged(backend):
    logits = torch.randn(4, 9, 101)
    targets = torch.randint(0, 101, (4, 9))
    targets[1, :3] = -100
    g_lp, g_ent = torch.randn(2, 4, 9).unbind(0)
    outs = []
    for statistics in ((), ALL_STATISTICS):
        x = logits.clone().requires_grad_()
        out = token_logprobs(x, targets, temperature=0.8, return_entropy=True, statistics=statistics,
                             backend=backend)
        lp, ent = out[:2]
        (grad,) = torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), x)
        outs.append((lp, ent, grad))
    for plain, with_stats in zip(*outs):
        torch.testing.assert_close(with_stats, plain, rtol=0, atol=0)


def test_statistics_on_the_native_backend():
    logits, targets = torch.randn(2, 5), torch.tensor([1, 3])
    with pytest.raises(ValueError, match="token_logprobs with statistics: backend='cpp' is not implemented"):
        token_logprobs(logits, targets, statistics=("is_top1",), backend="cpp")


def test_statistics_fall_back_from_an_environment_native_backend(monkeypatch):
    monkeypatch.setenv("FASTPO_BACKEND", "cpp")
    logits, targets = torch.randn(2, 5), torch.tensor([1, 3])
    _, _, stats = token_logprobs(logits, targets, statistics=("top1_logprob",))
    torch.testing.assert_close(stats["top1_logprob"], logits.log_softmax(-1).amax(-1))


def test_bad_statistics_raise():
    logits, targets = torch.randn(2, 5), torch.tensor([1, 3])
    with pytest.raises(ValueError, match="unknown statistic 'mean_logits'"):
        token_logprobs(logits, targets, statistics=("mean_logits",))
    with pytest.raises(TypeError, match="statistics must be a tuple"):
        token_logprobs(logits, targets, statistics="is_top1")


# ------------------------------------------------------------------ temperature precision


@pytest.mark.parametrize("temperature", [0.7, "tensor"])
def test_float64_temperature_keeps_float64_precision(backend, temperature):
    # |logits| ~ 40 at T = 0.7: rounding T to float32 would move the log-probs by ~4e-6
    logits = torch.randn(4, 6, 50, dtype=torch.float64) * 40
    targets = torch.randint(0, 50, (4, 6))
    temp = 0.7 if temperature == 0.7 else torch.full((4, 1), 0.7, dtype=torch.float64)
    lp, ent = token_logprobs(logits, targets, temperature=temp, return_entropy=True, backend=backend)
    log_p = torch.log_softmax(logits / 0.7, dim=-1)
    torch.testing.assert_close(lp, log_p.gather(-1, targets[..., None]).squeeze(-1), rtol=0, atol=1e-12)
    torch.testing.assert_close(ent, -(log_p.exp() * log_p).sum(-1), rtol=0, atol=1e-12)


# ------------------------------------------------------------------ bad input


def test_target_out_of_range_raises_index_error_naming_value(logprobs_backend):
    logits = torch.randn(2, 3, 10)
    targets = torch.randint(0, 10, (2, 3))
    targets[1, 2] = 10
    with pytest.raises(IndexError, match=r"targets\[1, 2\] = 10 is outside \[0, 10\)"):
        token_logprobs(logits, targets, backend=logprobs_backend)
    targets[1, 2] = -1
    with pytest.raises(IndexError, match="= -1"):
        token_logprobs(logits, targets, backend=logprobs_backend)


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3, 10\).*\(2, 4\)"):
        token_logprobs(torch.randn(2, 3, 10), torch.zeros(2, 4, dtype=torch.long))


def test_wrong_dtypes_raise_type_error():
    with pytest.raises(TypeError, match="logits has dtype torch.int64"):
        token_logprobs(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match="targets has dtype torch.float32"):
        token_logprobs(torch.randn(2, 5), torch.zeros(2))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature_raises_value_error(bad):
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), temperature=bad)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), temperature=torch.tensor([1.0, bad]))


def test_other_bad_arguments():
    logits, targets = torch.randn(2, 5), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"temperature of shape \(3,\)"):
        token_logprobs(logits, targets, temperature=torch.ones(3))
    with pytest.raises(ValueError, match="softcap"):
        token_logprobs(logits, targets, softcap=-2.0)
    with pytest.raises(ValueError, match="unit stride"):
        token_logprobs(torch.randn(5, 2).t(), targets)
    with pytest.raises(ValueError, match="backend='nope'"):
        token_logprobs(logits, targets, backend="nope")


def test_backend_environment_variable(monkeypatch):
    monkeypatch.setenv("FASTPO_BACKEND", "nope")
    with pytest.raises(ValueError, match="backend='nope'"):
        token_logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long))


# ------------------------------------------------------------------ GPU


CUDA_BACKENDS = ["triton", "torch", "cuda"]


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["flat", "batch_time", "softcap", "shifted", "masked_prefix", "ignored"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend_name", CUDA_BACKENDS)
def test_cuda_matrix_matches_reference(backend_name, dtype, case):
    # The CPU matrix's cases on CUDA tensors, with the GPU block sizes (4096) in play.
    from fastpo.kernels import _native

    if backend_name == "cuda" and not _native.available(torch.device("cuda")):
        pytest.skip(f"native extension without CUDA: {_native.unavailable_reason()}")
    kw = {}
    if case == "flat":
        logits, targets = torch.randn(257, 32003) * 3, torch.randint(0, 32003, (257,))
    elif case == "batch_time":
        logits, targets = torch.randn(3, 9, 151936) * 4, torch.randint(0, 151936, (3, 9))
        targets[0, -3:] = -100
        kw["temperature"] = torch.tensor([[0.7], [1.0], [1.3]], device="cuda")
    elif case == "softcap":
        logits, targets = torch.randn(4, 5000) * 40, torch.randint(0, 5000, (4,))
        kw.update(temperature=0.6, softcap=30.0)
    elif case == "shifted":  # sliced after the move, so that the rows stay strided on the GPU
        full = torch.randn(3, 8, 1003, device="cuda").to(dtype)
        check_against_reference(full[:, :-1, :1000], torch.randint(0, 1000, (3, 7), device="cuda"), backend_name)
        return
    elif case == "masked_prefix":
        logits, targets = torch.randn(3, 40000), torch.randint(20000, 40000, (3,))
        logits[:, :20000] = float("-inf")
    else:
        logits, targets = torch.randn(6, 777), torch.full((6,), -100)
        targets[2] = 5
    check_against_reference(logits.to(dtype).cuda(), targets.cuda(), backend_name, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend_name", ["triton", "torch"])
def test_cuda_statistics_match_float64_loops(backend_name, dtype):
    logits = (torch.randn(3, 5, 1001) * 4).to(dtype)
    logits[1, 1, 7] = float("-inf")
    logits[2, 2] = 0.5  # ties: the first token is the argmax
    targets = torch.randint(0, 1001, (3, 5))
    targets[0, 1] = -100
    targets[2, 2] = 0
    targets[1, 3] = logits[1, 3].argmax()
    _, _, stats = token_logprobs(logits.cuda(), targets.cuda(), temperature=0.7, statistics=ALL_STATISTICS,
                                 backend=backend_name)
    ref = reference_statistics(logits, targets, temperature=0.7)
    assert stats["is_top1"].dtype == torch.bool and torch.equal(stats["is_top1"].cpu(), ref["is_top1"])
    finite = torch.isfinite(ref["mean_logit"])
    assert (stats["mean_logit"].cpu()[~finite] == float("-inf")).all()
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for name in ("log_sum_sq_probs", "top1_logprob"):
        torch.testing.assert_close(stats[name].cpu().double(), ref[name], rtol=tol, atol=tol)
    torch.testing.assert_close(stats["mean_logit"].cpu().double()[finite], ref["mean_logit"][finite],
                               rtol=tol, atol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend_name", ["triton", "torch"])
def test_cuda_matches_reference(backend_name, dtype):
    logits = (torch.randn(2, 33, 32003, device="cuda") * 3).to(dtype)
    targets = torch.randint(0, 32003, (2, 33), device="cuda")
    targets[0, -4:] = -100
    temp = torch.tensor([[0.7], [1.2]], device="cuda")
    x = logits.clone().requires_grad_()
    lp, ent = token_logprobs(x[:, :-1], targets[:, :-1], temperature=temp, softcap=30.0,
                             return_entropy=True, backend=backend_name)
    (grad,) = torch.autograd.grad(lp.sum() + ent.sum(), x)
    x64 = logits.double().requires_grad_()
    ref_lp, ref_ent = reference(x64[:, :-1], targets[:, :-1], temperature=temp, softcap=30.0)
    (ref_grad,) = torch.autograd.grad(ref_lp.sum() + ref_ent.sum(), x64)
    torch.testing.assert_close(lp.double(), ref_lp, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=1e-4)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(grad.double(), ref_grad, rtol=tol, atol=tol)


@pytest.mark.gpu
def test_cuda_more_than_2_31_elements():
    rows, vocab = 14200, 151936  # 2.16e9 elements: row offsets need int64
    logits = torch.empty(rows, vocab, device="cuda", dtype=torch.bfloat16).normal_()
    targets = torch.randint(0, vocab, (rows,), device="cuda")
    logits[-1, targets[-1]] = 30.0  # the last row's target dominates
    x = logits.requires_grad_()
    lp = token_logprobs(x, targets, backend="triton")
    lp[-1:].sum().backward()
    assert lp[-1].item() > -1e-3
    ref = torch.log_softmax(logits[-3:].detach().double(), -1).gather(-1, targets[-3:, None]).squeeze(-1)
    torch.testing.assert_close(lp[-3:].double(), ref, rtol=1e-5, atol=1e-4)
    assert x.grad[-1].float().abs().sum().item() > 0 and x.grad[0].abs().sum().item() == 0


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cuda_tensors_on_a_device_that_is_not_current():
    logits = torch.randn(4, 1000, device="cuda:1", requires_grad=True)
    targets = torch.randint(0, 1000, (4,), device="cuda:1")
    with torch.cuda.device(0):
        lp = token_logprobs(logits, targets, backend="triton")
        lp.sum().backward()
    ref = logits.detach().double().log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(lp.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(logits.grad).all()
