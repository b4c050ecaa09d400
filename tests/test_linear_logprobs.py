"""linear_token_logprobs (log-probs from hidden states and the LM head) against
independent float64 references, on every CPU-runnable backend."""

import json
import math
import subprocess
import sys

import pytest
import torch
from logprob_reference import max_err, reference_statistics
from logprob_reference import reference as token_reference
from logprob_reference import reference_loop as token_reference_loop

from fastpo.kernels import (
    linear_policy_loss,
    linear_preference_logprobs,
    linear_token_logprobs,
    policy_loss,
    sequence_logprobs,
    token_logprobs,
)

# ------------------------------------------------------------------ references


def reference_loop(hidden, weight, bias, targets, **kw):
    """Per-element Python loops in float64: each logit as a sum of products, then the
    token log-prob loops of logprob_reference."""
    rows = hidden.reshape(-1, hidden.shape[-1]).double().tolist()
    w = weight.double().tolist()
    b = bias.double().tolist() if bias is not None else [0.0] * len(w)
    logits = [[sum(hk * wk for hk, wk in zip(h, w_v)) + b_v for w_v, b_v in zip(w, b)] for h in rows]
    logits = torch.tensor(logits, dtype=torch.float64).view(*targets.shape, len(w))
    return token_reference_loop(logits, targets, **kw)


def reference(hidden, weight, bias, targets, dtype=torch.float64, **kw):
    """Explicit logits (matmul + bias) in ``dtype`` (float64: the reference; the inputs'
    own dtype: what eager PyTorch gives), then logprob_reference's log_softmax + gather.
    Differentiable."""
    logits = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    return token_reference(logits, targets, dtype=dtype, **kw)


def make_inputs(shape, width, vocab, dtype, with_bias=True, ignore_index=-100, n_ignored=2):
    hidden = torch.randn(*shape, width).to(dtype)
    # scaled so that logits are O(3): peaked but not one-hot distributions
    weight = (torch.randn(vocab, width) * (3.0 / math.sqrt(width))).to(dtype)
    bias = torch.randn(vocab).to(dtype) if with_bias else None
    targets = torch.randint(0, vocab, shape)
    flat = targets.view(-1)
    flat[torch.randperm(flat.numel())[:n_ignored]] = ignore_index
    return hidden, weight, bias, targets


def run_ours(hidden, weight, bias, targets, g_lp, g_ent, backend, **kw):
    leaves = [t.detach().requires_grad_() for t in (hidden, weight, bias) if t is not None]
    h, w = leaves[0], leaves[1]
    b = leaves[2] if bias is not None else None
    lp, ent = linear_token_logprobs(h, w, targets, bias=b, return_entropy=True, backend=backend, **kw)
    grads = torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), leaves)
    return lp, ent, grads


def run_reference(hidden, weight, bias, targets, g_lp, g_ent, dtype, **kw):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (hidden, weight, bias) if t is not None]
    b = leaves[2] if bias is not None else None
    lp, ent = reference(leaves[0], leaves[1], b, targets, dtype=dtype, **kw)
    loss = (lp * g_lp.to(dtype)).sum() + (ent * g_ent.to(dtype)).sum()
    return lp, ent, torch.autograd.grad(loss, leaves)


def check_against_reference(hidden, weight, bias, targets, backend, chunk_size=None, **kw):
    """Forward, entropy and the gradients of hidden, weight and bias through both
    outputs against the float64 reference.

    fp32 must be within 1e-5 of the reference relative to its scale; bf16 may be no
    further from it than eager PyTorch in bf16 (bf16 matmul, bf16 log_softmax), plus a
    small slack.
    """
    g_lp = torch.randn(targets.shape, dtype=torch.float64, device=targets.device)
    g_ent = torch.randn(targets.shape, dtype=torch.float64, device=targets.device)
    lp, ent, grads = run_ours(hidden, weight, bias, targets, g_lp, g_ent, backend, chunk_size=chunk_size, **kw)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    assert lp.shape == targets.shape and ent.shape == targets.shape
    for grad, leaf in zip(grads, (hidden, weight, bias)):
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape

    ref_lp, ref_ent, ref_grads = run_reference(hidden, weight, bias, targets, g_lp, g_ent, torch.float64, **kw)
    pairs = [(lp, ref_lp), (ent, ref_ent), *zip(grads, ref_grads)]
    if hidden.dtype == torch.float32:
        for ours, ref in pairs:
            scale = max(1.0, ref.abs().max().item())
            assert max_err(ours, ref) <= 1e-5 * scale
        return
    eager = run_reference(hidden, weight, bias, targets, g_lp, g_ent, hidden.dtype, **kw)
    eager_pairs = [eager[0], eager[1], *eager[2]]
    eps = torch.finfo(hidden.dtype).eps
    for (ours, ref), eager_value in zip(pairs, eager_pairs):
        scale = max(1.0, ref.abs().max().item())
        # ours rounds once per output (and once per chunk for the weight gradient)
        allowed = max(max_err(eager_value, ref), 2 * eps * scale) + 1e-3 * scale
        assert max_err(ours, ref) <= allowed


# ------------------------------------------------------------------ accuracy


def test_reference_matches_per_element_loops():
    hidden, weight, bias, targets = make_inputs((3, 4), 5, 11, torch.float64)
    temp = torch.tensor([[0.5], [1.0], [2.0]])
    for softcap in (None, 3.0):
        lp, ent = reference(hidden, weight, bias, targets, temperature=temp, softcap=softcap)
        loop_lp, loop_ent = reference_loop(hidden, weight, bias, targets, temperature=temp, softcap=softcap)
        torch.testing.assert_close(lp, loop_lp, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ent, loop_ent, rtol=1e-12, atol=1e-12)


CASES = {
    # name: (leading shape, H, V, dtype, bias, softcap, temperature, ignore_index, chunk_size)
    "flat-bias-many-chunks": ((37,), 19, 1001, torch.float32, True, None, 1.0, -100, 8),
    "bt-softcap-per-seq-temp": ((3, 13), 33, 517, torch.float32, True, 7.5, "per-seq", -100, 5),
    "tiny-vocab-scalar-temp": ((5,), 7, 3, torch.float32, False, None, 0.7, -1, None),
    "one-row-per-chunk": ((2, 3), 9, 65, torch.float32, True, 2.0, "per-token", -100, 1),
    "bf16-bt-softcap-per-seq": ((2, 9), 17, 2003, torch.bfloat16, True, 30.0, "per-seq", -100, 4),
    "bf16-flat-no-bias": ((41,), 64, 999, torch.bfloat16, False, None, 1.3, 5, 16),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(logprobs_backend, case):
    shape, width, vocab, dtype, with_bias, softcap, temperature, ignore_index, chunk = CASES[case]
    hidden, weight, bias, targets = make_inputs(shape, width, vocab, dtype, with_bias, ignore_index)
    if temperature == "per-seq":
        temperature = torch.rand(shape[0], 1) + 0.5
    elif temperature == "per-token":
        temperature = torch.rand(shape) + 0.5
    check_against_reference(
        hidden, weight, bias, targets, logprobs_backend, chunk_size=chunk,
        temperature=temperature, softcap=softcap, ignore_index=ignore_index,
    )


def test_chunk_size_does_not_change_results(logprobs_backend):
    hidden, weight, bias, targets = make_inputs((23,), 11, 301, torch.float32)
    g_lp, g_ent = torch.randn(23, dtype=torch.float64), torch.randn(23, dtype=torch.float64)
    lp1, ent1, grads1 = run_ours(hidden, weight, bias, targets, g_lp, g_ent, logprobs_backend, chunk_size=23)
    for chunk in (1, 6, 1000):
        lp, ent, grads = run_ours(hidden, weight, bias, targets, g_lp, g_ent, logprobs_backend, chunk_size=chunk)
        torch.testing.assert_close(lp, lp1, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ent, ent1, rtol=1e-6, atol=1e-6)
        for a, b in zip(grads, grads1):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_single_output_gradients(logprobs_backend):
    """Gradients through only the log-probs, and through only the entropy."""
    hidden, weight, bias, targets = make_inputs((3, 5), 8, 97, torch.float32)
    temp = torch.tensor([[0.6], [1.0], [1.9]])
    for use_lp, use_ent in ((True, False), (False, True)):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        lp, ent = linear_token_logprobs(
            leaves[0], leaves[1], targets, bias=leaves[2], temperature=temp,
            return_entropy=True, chunk_size=4, backend=logprobs_backend,
        )
        out = lp if use_lp else ent
        grads = torch.autograd.grad(out.sum(), leaves)
        ref_leaves = [t.double().requires_grad_() for t in (hidden, weight, bias)]
        ref = reference(*ref_leaves, targets, temperature=temp)
        ref_grads = torch.autograd.grad(ref[0 if use_lp else 1].sum(), ref_leaves)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


def test_weight_and_bias_gradients_accumulate_in_fp32_across_chunks():
    """bf16 with one token per chunk and same-sign contributions: a bf16 running sum
    would stall once it is large (at 512 a bf16 step is 4, each chunk adds about 1),
    an fp32 sum cast once at the end is within bf16 rounding of the exact value."""
    n_tokens, width, vocab = 640, 8, 16
    hidden = torch.randn(n_tokens, width).abs().bfloat16()
    weight = (torch.randn(vocab, width) * 0.1).bfloat16()
    bias = torch.zeros(vocab).bfloat16()
    targets = torch.full((n_tokens,), 3)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    lp = linear_token_logprobs(leaves[0], leaves[1], targets, bias=leaves[2], chunk_size=1, backend="torch")
    grads = torch.autograd.grad(lp.sum(), leaves[1:])
    ref_leaves = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    ref_grads = torch.autograd.grad(reference(*ref_leaves, targets)[0].sum(), ref_leaves[1:])
    assert ref_grads[1][3] > 560  # the sum that a bf16 accumulator could not hold
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad.double(), ref, rtol=1e-2, atol=1e-2)


def test_weight_gradient_slices_start_at_aligned_columns(monkeypatch):
    # A bf16 weight gradient is formed a vocabulary slice at a time; a slice at an
    # unaligned column offset sent cuBLAS to slow kernels on an H200 (V = 151,936).
    from fastpo.kernels.linear_logprobs import _add_weight_grad

    grad_logits = torch.randn(4, 5003).bfloat16()
    hidden = torch.randn(4, 64).bfloat16()
    acc = torch.zeros(5003, 64)
    offsets = []
    mm = torch.mm

    def recording_mm(a, b, *args, **kwargs):
        offsets.append(a.storage_offset())
        return mm(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "mm", recording_mm)
    _add_weight_grad(acc, grad_logits, hidden)
    monkeypatch.undo()
    assert len(offsets) > 1 and all(offset % 128 == 0 for offset in offsets), offsets
    expected = grad_logits.double().t() @ hidden.double()
    torch.testing.assert_close(acc.double(), expected, rtol=1e-2, atol=1e-2)


def test_only_some_inputs_require_grad(logprobs_backend):
    hidden, weight, _, targets = make_inputs((9,), 6, 40, torch.float32)
    h = hidden.clone().requires_grad_()
    lp = linear_token_logprobs(h, weight, targets, chunk_size=4, backend=logprobs_backend)
    (grad,) = torch.autograd.grad(lp.sum(), h)
    h64 = hidden.double().requires_grad_()
    (ref_grad,) = torch.autograd.grad(reference(h64, weight, None, targets)[0].sum(), h64)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)
    assert weight.grad is None


def test_ignored_positions_give_zero_and_do_not_touch_gradients(logprobs_backend):
    hidden, weight, bias, targets = make_inputs((4, 5), 7, 33, torch.float32, n_ignored=0)
    targets[1, :] = -100
    targets[3, 2] = -100
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    lp, ent = linear_token_logprobs(
        leaves[0], leaves[1], targets, bias=leaves[2], return_entropy=True, chunk_size=3, backend=logprobs_backend
    )
    ignored = targets == -100
    assert (lp[ignored] == 0).all() and (ent[ignored] == 0).all()
    grads = torch.autograd.grad(lp.sum() + ent.sum(), leaves)
    assert (grads[0][ignored] == 0).all()
    # the hidden states of ignored positions do not reach the weight's gradient
    changed = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    with torch.no_grad():
        changed[0][ignored] = 1e3
    lp2, ent2 = linear_token_logprobs(
        changed[0], changed[1], targets, bias=changed[2], return_entropy=True, chunk_size=3, backend=logprobs_backend
    )
    grads2 = torch.autograd.grad(lp2.sum() + ent2.sum(), changed)
    torch.testing.assert_close(grads2[1], grads[1])
    torch.testing.assert_close(grads2[2], grads[2])


def test_no_grad_pass_matches_and_keeps_nothing(logprobs_backend):
    """The reference model's pass: same function under no_grad."""
    hidden, weight, bias, targets = make_inputs((11,), 5, 50, torch.float32)
    with torch.no_grad():
        lp = linear_token_logprobs(hidden, weight, targets, bias=bias, backend=logprobs_backend, chunk_size=4)
    assert lp.grad_fn is None
    ref_lp, _ = reference(hidden, weight, bias, targets)
    torch.testing.assert_close(lp.double(), ref_lp, rtol=1e-5, atol=1e-5)


def test_empty_inputs_give_empty_outputs(logprobs_backend):
    hidden = torch.randn(0, 4, requires_grad=True)
    weight = torch.randn(9, 4, requires_grad=True)
    lp, ent = linear_token_logprobs(
        hidden, weight, torch.zeros(0, dtype=torch.long), return_entropy=True, backend=logprobs_backend
    )
    assert lp.shape == (0,) and ent.shape == (0,)
    (lp.sum() + ent.sum()).backward()
    assert weight.grad is None or not weight.grad.any()


@pytest.mark.parametrize("vocab", [1, 7, 97])
def test_statistics_match_float64_loops_across_chunks(backend, vocab):
    statistics = ("log_sum_sq_probs", "mean_logit", "is_top1", "top1_logprob")
    hidden, weight, bias, targets = make_inputs((3, 5), 8, vocab, torch.float64)
    targets[1, 2] = (hidden[1, 2] @ weight.T + bias).argmax()  # a top-1 hit
    kw = dict(temperature=0.7, softcap=4.0)
    x = hidden.clone().requires_grad_()
    lp, ent, stats = linear_token_logprobs(
        x, weight, targets, bias=bias, return_entropy=True, statistics=statistics, chunk_size=4,
        backend=backend, **kw,
    )
    ref = reference_statistics(hidden @ weight.T + bias, targets, **kw)
    assert set(stats) == set(statistics)
    for name in statistics:
        assert stats[name].shape == targets.shape and not stats[name].requires_grad
        if name == "is_top1":
            assert stats[name].dtype == torch.bool and torch.equal(stats[name], ref[name])
        else:
            torch.testing.assert_close(stats[name], ref[name], rtol=1e-12, atol=1e-12, msg=name)
    # the log-probs, the entropy and their gradient are those computed without statistics
    # (the same chunks: another chunk size rounds the matmuls differently on some CPUs)
    ref_lp, ref_ent = linear_token_logprobs(hidden, weight, targets, bias=bias, return_entropy=True, chunk_size=4,
                                            backend=backend, **kw)
    torch.testing.assert_close(lp, ref_lp, rtol=0, atol=0)
    torch.testing.assert_close(ent, ref_ent, rtol=0, atol=0)
    (grad,) = torch.autograd.grad(lp.sum() + ent.sum(), x)
    x2 = hidden.clone().requires_grad_()
    lp2, ent2 = linear_token_logprobs(x2, weight, targets, bias=bias, return_entropy=True, chunk_size=4,
                                      backend=backend, **kw)
    (grad2,) = torch.autograd.grad(lp2.sum() + ent2.sum(), x2)
    torch.testing.assert_close(grad, grad2, rtol=0, atol=0)


def test_statistics_without_entropy_and_on_the_native_backend():
    hidden, weight, _, targets = make_inputs((6,), 4, 11, torch.float32, with_bias=False)
    lp, ent, stats = linear_token_logprobs(hidden, weight, targets, statistics=("is_top1",))
    assert ent is None and list(stats) == ["is_top1"]
    torch.testing.assert_close(lp, linear_token_logprobs(hidden, weight, targets))
    with pytest.raises(ValueError, match="linear_token_logprobs with statistics: backend='cpp'"):
        linear_token_logprobs(hidden, weight, targets, statistics=("is_top1",), backend="cpp")


def test_float64_temperature_keeps_float64_precision(backend):
    hidden, weight, bias, targets = make_inputs((4, 6), 8, 50, torch.float64, n_ignored=0)
    weight = weight * 12  # logits ~ 40
    lp = linear_token_logprobs(hidden, weight, targets, bias=bias, temperature=0.7, backend=backend)
    log_p = torch.log_softmax((hidden @ weight.T + bias) / 0.7, dim=-1)
    torch.testing.assert_close(lp, log_p.gather(-1, targets[..., None]).squeeze(-1), rtol=0, atol=1e-12)


def test_gradcheck_float64():
    hidden = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([[0, 5, -100], [2, 3, 3]])
    temp = torch.tensor([[0.8], [1.7]], dtype=torch.float64)

    def both(h, w, b):
        return linear_token_logprobs(
            h, w, targets, bias=b, temperature=temp, softcap=2.5, return_entropy=True,
            chunk_size=4, backend="torch",
        )

    assert torch.autograd.gradcheck(both, (hidden, weight, bias))


# ------------------------------------------------------------------ composed losses


def explicit_logits(hidden, weight, bias):
    logits = hidden @ weight.T
    return logits if bias is None else logits + bias


POLICY_OPTIONS = {
    "grpo-entropy-bonus-and-quantile": dict(loss_type="grpo", entropy_coef=0.05, entropy_quantile=0.4),
    "dapo-kl-dual-clip": dict(loss_type="dapo", kl_coef=0.1, dual_clip=3.0, clip_eps_high=0.28),
    "gspo-entropy-bonus": dict(loss_type="gspo", entropy_coef=0.01),
}


@pytest.mark.parametrize("options", list(POLICY_OPTIONS))
def test_linear_policy_loss_matches_explicit_logits(backend, options):
    """Loss, metrics and gradients equal those of policy_loss on log-probs (and
    entropy) computed through explicit logits; float64 so they agree to rounding."""
    opts = dict(POLICY_OPTIONS[options])
    B, T, H, V = 3, 7, 6, 53
    hidden, weight, bias, targets = make_inputs((B, T), H, V, torch.float64, n_ignored=0)
    mask = torch.rand(B, T) > 0.25
    mask[:, 0] = True
    targets[~mask] = -100  # padding as a collator leaves it
    old = torch.randn(B, T, dtype=torch.float64) * 0.1 - 2.0
    adv = torch.randn(B, dtype=torch.float64)
    if "kl_coef" in opts:
        opts["ref_logprobs"] = torch.randn(B, T, dtype=torch.float64) * 0.1 - 2.0
    temp = torch.tensor([[0.7], [1.0], [1.3]], dtype=torch.float64)
    kw = dict(temperature=temp, softcap=4.0)

    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    loss, metrics = linear_policy_loss(
        leaves[0], leaves[1], targets, old, adv, mask, bias=leaves[2], chunk_size=5, backend=backend, **kw, **opts
    )
    grads = torch.autograd.grad(loss, leaves)

    ref_leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    need_entropy = "entropy_coef" in opts or "entropy_quantile" in opts
    out = token_logprobs(
        explicit_logits(*ref_leaves), targets, return_entropy=need_entropy, backend=backend, **kw
    )
    lp, ent = out if need_entropy else (out, None)
    ref_loss, ref_metrics = policy_loss(lp, old, adv, mask, entropy=ent, backend=backend, **opts)
    ref_grads = torch.autograd.grad(ref_loss, ref_leaves)

    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    assert metrics.keys() == ref_metrics.keys()
    for key in metrics:
        torch.testing.assert_close(metrics[key], ref_metrics[key], rtol=1e-10, atol=1e-12)
    for a, b in zip(grads, ref_grads):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_linear_policy_loss_rejects_an_entropy_argument():
    hidden, weight, _, targets = make_inputs((2, 3), 4, 9, torch.float32, n_ignored=0)
    zeros = torch.zeros(2, 3)
    with pytest.raises(TypeError, match="entropy"):
        linear_policy_loss(hidden, weight, targets, zeros, zeros, zeros > -1, entropy=zeros)
    with pytest.raises(ValueError, match=r"mask.shape \(2, 4\)"):
        linear_policy_loss(hidden, weight, targets, zeros, zeros, torch.ones(2, 4, dtype=torch.bool))


@pytest.mark.parametrize("layout", ["padded-sum", "padded-average", "packed-sum", "packed-average"])
def test_linear_preference_logprobs_matches_explicit_logits(backend, layout):
    H, V = 5, 41
    average = layout.endswith("average")
    if layout.startswith("padded"):
        hidden, weight, bias, targets = make_inputs((4, 6), H, V, torch.float64, n_ignored=0)
        mask = torch.rand(4, 6) > 0.3
        mask[2] = False  # an empty sequence
        targets[~mask] = V + 7  # garbage outside the mask is never read
        seq_kw = dict(mask=mask)
    else:
        hidden, weight, bias, targets = make_inputs((17,), H, V, torch.float64, n_ignored=0)
        seq_kw = dict(cu_seqlens=torch.tensor([0, 5, 5, 12, 17]))
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    seq = linear_preference_logprobs(
        leaves[0], leaves[1], targets, bias=leaves[2], average=average, softcap=3.0,
        chunk_size=4, backend=backend, **seq_kw,
    )
    g = torch.randn(seq.shape, dtype=torch.float64)
    grads = torch.autograd.grad((seq * g).sum(), leaves)

    ref_leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    ref_targets = targets.masked_fill(~mask, 0) if "mask" in seq_kw else targets
    lp = token_logprobs(explicit_logits(*ref_leaves), ref_targets, softcap=3.0, backend=backend)
    mask_arg = seq_kw.pop("mask", None)
    ref = sequence_logprobs(lp, mask_arg, average=average, backend=backend, **seq_kw)
    ref_grads = torch.autograd.grad((ref * g).sum(), ref_leaves)
    torch.testing.assert_close(seq, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------ memory

MEMORY_SCRIPT = """
import json, resource, torch
from fastpo.kernels import linear_token_logprobs
# One thread: this test measures memory, and on a busy machine OpenMP's waits are slow.
torch.set_num_threads(1)
N, H, V = 4096, 256, 151936
hidden = torch.randn(N, H, requires_grad=True)
# in place, so that no temporary inflates the peak measured before the call
weight = torch.randn(V, H).mul_(0.06).requires_grad_()
targets = torch.randint(0, V, (N,))
g_lp = torch.randn(N)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
lp = linear_token_logprobs(hidden, weight, targets, backend="torch")
(lp * g_lp).sum().backward()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"extra_bytes": (after - before) * 1024, "logits_bytes": N * V * 4,
                  "finite": bool(torch.isfinite(weight.grad).all() and torch.isfinite(hidden.grad).all())}))
"""


@pytest.mark.slow
def test_peak_extra_memory_is_a_fraction_of_the_logits():
    """N=4096, H=256, V=151936 fp32 forward+backward, in a fresh process: the peak
    resident memory beyond the inputs (weight gradient included) stays under 25% of
    what the (N, V) fp32 logits alone would take (2.5 GB). Log-probs only, to keep
    the run short: the entropy adds O(N) memory and no (C, V) temporaries."""
    result = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["finite"]
    assert report["extra_bytes"] <= 0.25 * report["logits_bytes"], report


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_reference(dtype):
    """The GPU path (cuBLAS matmuls + Triton row kernels) on a realistic vocabulary."""
    hidden, weight, bias, targets = make_inputs((2, 257), 128, 32003, dtype, n_ignored=5)
    hidden, weight, bias, targets = (t.cuda() for t in (hidden, weight, bias, targets))
    temperature = torch.tensor([[0.7], [1.2]], device="cuda")
    check_against_reference(
        hidden, weight, bias, targets, "triton", chunk_size=100, temperature=temperature, softcap=30.0
    )


# ------------------------------------------------------------------ bad input


def test_hidden_size_mismatch_names_both_sizes():
    with pytest.raises(ValueError, match=r"H = 8.*H = 9"):
        linear_token_logprobs(torch.randn(3, 8), torch.randn(5, 9), torch.zeros(3, dtype=torch.long))


def test_bias_of_wrong_length_names_the_shapes():
    with pytest.raises(ValueError, match=r"bias.shape \(4,\).*\(5,\)"):
        linear_token_logprobs(
            torch.randn(3, 8), torch.randn(5, 8), torch.zeros(3, dtype=torch.long), bias=torch.randn(4)
        )


def test_dtype_mismatches_raise_value_error_naming_both():
    targets = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"hidden is torch.bfloat16 but weight is torch.float32"):
        linear_token_logprobs(torch.randn(3, 8).bfloat16(), torch.randn(5, 8), targets)
    with pytest.raises(ValueError, match=r"hidden is torch.float32 but bias is torch.bfloat16"):
        linear_token_logprobs(torch.randn(3, 8), torch.randn(5, 8), targets, bias=torch.randn(5).bfloat16())


def test_other_bad_arguments():
    hidden, weight = torch.randn(2, 3, 8), torch.randn(5, 8)
    targets = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"\(2, 3, 8\).*\(2, 4\)"):
        linear_token_logprobs(hidden, weight, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"weight must be \(V, H\), got shape \(5, 8, 1\)"):
        linear_token_logprobs(hidden, weight[..., None], targets)
    with pytest.raises(TypeError, match="hidden has dtype torch.int64"):
        linear_token_logprobs(hidden.long(), weight, targets)
    with pytest.raises(TypeError, match="targets has dtype torch.float32"):
        linear_token_logprobs(hidden, weight, targets.float())
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        linear_token_logprobs(hidden, weight, targets, chunk_size=0)
    with pytest.raises(ValueError, match="temperature"):
        linear_token_logprobs(hidden, weight, targets, temperature=0.0)
    with pytest.raises(IndexError, match="= 5 is outside"):
        linear_token_logprobs(hidden, weight, targets.fill_(5))
