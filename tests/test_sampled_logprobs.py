"""Sampling-aware log-probs (``top_k=`` / ``top_p=`` of token_logprobs and
linear_token_logprobs) against float64 references whose kept sets are built by the
installed transformers' own TemperatureLogitsWarper, TopKLogitsWarper and
TopPLogitsWarper, applied in generate()'s order."""

import pytest
import torch
from logprob_reference import max_err
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from fastpo.kernels import linear_token_logprobs, token_logprobs
from fastpo.kernels import logprobs as logprobs_module

# (top_k, top_p) pairs; None disables either
CASES = [(1, None), (5, None), (None, 0.5), (None, 0.9), (3, 0.8), (2000, 0.95), (None, 1.0), (2000, None)]


def hf_kept(z: torch.Tensor, top_k, top_p) -> torch.Tensor:
    """The kept set (bool, z's shape) of Hugging Face's warpers on the tempered logits z,
    applied as generate() does: top-k, then top-p, each only when enabled."""
    scores = z.reshape(-1, z.shape[-1])
    if top_k is not None:
        scores = TopKLogitsWarper(top_k=top_k)(None, scores)
    if top_p is not None and top_p < 1.0:
        scores = TopPLogitsWarper(top_p=top_p)(None, scores)
    return (scores != float("-inf")).view(z.shape)


def tempered(logits, temperature):
    z = logits.double()
    t = temperature if isinstance(temperature, torch.Tensor) else torch.tensor(temperature)
    return z / t.double().unsqueeze(-1) if t.dim() else z / t.double()


def reference(logits, targets, kept, temperature=1.0, ignore_index=-100):
    """float64 log-prob and entropy of the renormalized kept set, differentiable; -inf
    for a target outside it (0 where ignored)."""
    z = tempered(logits, temperature).masked_fill(~kept, float("-inf"))
    log_p = z.log_softmax(-1)
    lp = log_p.gather(-1, targets.clamp(min=0).long().unsqueeze(-1)).squeeze(-1)
    p = log_p.exp()
    ent = -(p * torch.where(kept, log_p, 0.0)).sum(-1)
    keep = targets != ignore_index
    return torch.where(keep, lp, 0.0), torch.where(keep, ent, 0.0)


def check(logits, targets, backend, top_k, top_p, temperature=1.0, kept=None):
    """Forward and gradient (through both outputs) against the reference; targets drawn
    outside the kept set must give -inf and no gradient of their own."""
    if kept is None:
        z = tempered(logits, temperature).to(logits.dtype if logits.dtype == torch.float64 else torch.float32)
        kept = hf_kept(z, top_k, top_p)
    x = logits.detach().requires_grad_()
    lp, ent = token_logprobs(x, targets, temperature=temperature, top_k=top_k, top_p=top_p,
                             return_entropy=True, backend=backend)
    ref_lp, ref_ent = reference(logits, targets, kept, temperature)
    assert torch.equal(torch.isneginf(lp), torch.isneginf(ref_lp))
    finite = ~torch.isneginf(ref_lp)
    tol = 1e-12 if logits.dtype == torch.float64 else 2e-5
    assert max_err(lp[finite], ref_lp[finite]) <= tol * max(1.0, ref_lp[finite].abs().max().item())
    assert max_err(ent, ref_ent) <= tol * max(1.0, ref_ent.abs().max().item())
    g_lp = torch.randn(targets.shape, dtype=torch.float64).masked_fill(~finite, 0.0)
    g_ent = torch.randn(targets.shape, dtype=torch.float64)
    # a -inf log-prob times a zero upstream gradient: its row gets only the entropy's
    (grad,) = torch.autograd.grad(
        (lp.masked_fill(~finite, 0.0) * g_lp).sum() + (ent * g_ent).sum(), x, retain_graph=True
    )
    (grad_inf_rows,) = torch.autograd.grad(lp.sum() + 0.0 * ent.sum(), x) if not finite.all() else (None,)
    x64 = logits.detach().double().requires_grad_()
    r_lp, r_ent = reference(x64, targets, kept, temperature)
    (ref_grad,) = torch.autograd.grad((r_lp.masked_fill(~finite, 0.0) * g_lp).sum() + (r_ent * g_ent).sum(), x64)
    assert max_err(grad, ref_grad) <= tol * max(1.0, ref_grad.abs().max().item())
    if grad_inf_rows is not None:
        # the log-prob of a target the sampler could not draw is a constant: no gradient
        assert torch.all(grad_inf_rows.reshape(-1, logits.shape[-1])[~finite.reshape(-1)] == 0)
    return lp, ent


@pytest.mark.parametrize("vocab", [1, 7, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_hf_warpers_with_per_row_temperature(backend, vocab, dtype):
    rows = 6
    logits = (torch.randn(rows, vocab, dtype=torch.float64) * 3).to(dtype)
    temperature = torch.tensor([0.6, 1.0, 1.7, 0.9, 1.2, 0.8])
    for top_k, top_p in CASES:
        # half the targets drawn from the kept set, as the sampler would
        z = tempered(logits, temperature).to(dtype if dtype == torch.float64 else torch.float32)
        kept = hf_kept(z, top_k, top_p)
        targets = torch.randint(0, vocab, (rows,))
        targets[::2] = torch.multinomial(kept[::2].double(), 1).squeeze(1)
        targets[-1] = -100
        check(logits, targets, backend, top_k, top_p, temperature)


def test_k_at_least_vocab_and_p_one_equal_the_full_distribution(backend):
    logits = torch.randn(4, 7, 9) * 2
    targets = torch.randint(0, 9, (4, 7))
    full = token_logprobs(logits, targets, return_entropy=True, backend=backend)
    for top_k, top_p in ((9, None), (50, 1.0), (None, 1.0)):
        ours = token_logprobs(logits, targets, return_entropy=True, top_k=top_k, top_p=top_p, backend=backend)
        torch.testing.assert_close(ours, full, rtol=0, atol=1e-6)


def test_ties_at_the_top_k_boundary_are_all_kept(backend):
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 2.0, 0.0, -1.0]] * 3, dtype=torch.float64)
    targets = torch.tensor([4, 5, 3])
    lp, _ = check(logits, targets, backend, top_k=2, top_p=None)
    assert torch.isfinite(lp[0]) and torch.isneginf(lp[1])  # kept: 3.0 and the three tied 2.0


def test_top_p_boundary_convention(backend):
    # probabilities 0.5, 0.25, 0.125, 0.125: a token is kept when the mass above it is
    # < top_p, so top_p = 0.7 keeps 2 tokens (0.75 above the third); at 0.8 the tie
    # straddles the boundary and is kept whole, a superset of HF's choice of one of them
    # (which one depends on its sort order)
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]], dtype=torch.float64)).expand(3, 4)
    targets = torch.tensor([1, 2, 3])
    lp = token_logprobs(logits, targets, top_p=0.7, backend=backend)
    assert torch.isfinite(lp[0]) and torch.isneginf(lp[1:]).all()
    check(logits, targets, backend, None, 0.7)
    lp = token_logprobs(logits, targets, top_p=0.8, backend=backend)
    hf = hf_kept(logits.clone(), None, 0.8)
    assert hf[:, :2].all() and hf[:, 2:].sum(-1).eq(1).all()
    torch.testing.assert_close(lp, torch.log(torch.tensor([0.25, 0.125, 0.125], dtype=torch.float64)))


def test_flat_rows_take_the_full_sort(backend):
    # near-uniform rows keep far more than the 256 candidate tokens of the first selection
    logits = torch.randn(5, 1000, dtype=torch.float64) * 0.05
    targets = torch.randint(0, 1000, (5,))
    for top_k, top_p in ((None, 0.9), (700, 0.99), (None, 0.999999)):
        check(logits, targets, backend, top_k, top_p)
    # in float32, p * S rounds to S: the sorted cumulative sum may fall short of it by
    # rounding, and then the whole (top-k) set is kept, as HF keeps it
    logits = logits.float()
    for top_k in (None, 600):
        check(logits, targets, backend, top_k, 1 - 1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tied_row", [False, True])
def test_log_probs_alone_take_the_kept_mass_from_the_selection(dtype, tied_row, top_p_cut_path, monkeypatch):
    # without entropy the CPU torch backend sums the kept mass from the values it selected
    # (no masked pass over the chunk) when they hold every kept token; a row with ties at
    # the top-k boundary, or a top-p bin of 500 equal values (but for the native cut, which
    # sorts the whole bin), sends its chunk to the masked sum; -inf logits are never kept
    scale = torch.tensor([0.05, 0.5, 1.0, 2.0, 4.0, 8.0, 0.0])[:, None]
    logits = (torch.randn(7, 1000, dtype=torch.float64) * scale).to(dtype)
    logits[-1, :500] = 1.0
    logits[1, 990:] = float("-inf")  # a masked part of the vocabulary
    if not tied_row:
        logits = logits[:-1]
    targets = logits.argmax(-1)
    targets[::2] = torch.randint(0, 1000, targets[::2].shape)
    masked_passes = []
    keep_step = logprobs_module._keep_step
    monkeypatch.setattr(logprobs_module, "_keep_step", lambda *a: masked_passes.append(1) or keep_step(*a))
    for top_k, top_p in CASES[:-2]:  # the last two cut nothing
        masked_passes.clear()
        with torch.no_grad():
            token_logprobs(logits, targets, top_k=top_k, top_p=top_p, backend="torch")
        if top_k is None or top_k >= logits.shape[-1]:  # top-p alone
            masked = {"native": False, "torch": tied_row, "torch_second_round": True}[top_p_cut_path]
        else:
            masked = tied_row
        assert bool(masked_passes) == masked, (top_k, top_p)
    for top_k, top_p in CASES:
        kept = hf_kept(logits.clone(), top_k, top_p)
        kept = logits >= logits.masked_fill(~kept, float("inf")).amin(-1, keepdim=True)  # ties kept whole
        x = logits.detach().requires_grad_()
        lp = token_logprobs(x, targets, top_k=top_k, top_p=top_p, backend="torch")
        ref_lp, _ = reference(logits.double().requires_grad_(), targets, kept)
        assert torch.equal(torch.isneginf(lp), torch.isneginf(ref_lp)), (top_k, top_p)
        finite = ~torch.isneginf(ref_lp)
        tol = 1e-12 if dtype == torch.float64 else 2e-5
        assert max_err(lp[finite], ref_lp[finite]) <= tol * max(1.0, ref_lp[finite].abs().max().item())
        g = torch.randn(targets.shape, dtype=torch.float64).masked_fill(~finite, 0.0)
        (grad,) = torch.autograd.grad((lp.masked_fill(~finite, 0.0) * g).sum(), x)
        x64 = logits.detach().double().requires_grad_()
        r_lp, _ = reference(x64, targets, kept)
        (ref_grad,) = torch.autograd.grad((r_lp.masked_fill(~finite, 0.0) * g).sum(), x64)
        assert max_err(grad, ref_grad) <= tol * max(1.0, ref_grad.abs().max().item())


def test_low_precision_logits_match_float32(backend):
    logits = (torch.randn(3, 5, 301) * 4).to(torch.bfloat16)
    targets = torch.randint(0, 301, (3, 5))
    a = token_logprobs(logits, targets, top_k=40, top_p=0.9, return_entropy=True, backend=backend)
    b = token_logprobs(logits.float(), targets, top_k=40, top_p=0.9, return_entropy=True, backend=backend)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_gradcheck_float64(backend):
    logits = (torch.randn(3, 11, dtype=torch.float64) * 2).requires_grad_()
    with torch.no_grad():
        kept = hf_kept(logits / 0.7, 6, 0.8)
    targets = torch.multinomial(kept.double(), 1).squeeze(1)
    torch.autograd.gradcheck(
        lambda x: token_logprobs(x, targets, top_k=6, top_p=0.8, temperature=0.7, return_entropy=True,
                                 backend=backend),
        (logits,),
    )


@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_token_logprobs_of_the_logits(backend, bias):
    n, h, v = 13, 8, 301
    hidden = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64, requires_grad=True)
    b = torch.randn(v, dtype=torch.float64, requires_grad=True) if bias else None
    temperature = torch.rand(n, dtype=torch.float64) + 0.5
    with torch.no_grad():
        logits = hidden @ weight.T + (b if bias else 0)
        kept = hf_kept(tempered(logits, temperature), 20, 0.9)
    targets = torch.multinomial(kept.double(), 1).squeeze(1)
    kw = dict(temperature=temperature, top_k=20, top_p=0.9, return_entropy=True, backend=backend)
    lp, ent = linear_token_logprobs(hidden, weight, targets, bias=b, chunk_size=4, **kw)
    ref_lp, ref_ent = token_logprobs(hidden @ weight.T + (b if bias else 0), targets, **kw)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-12, atol=1e-12)
    params = [hidden, weight] + ([b] if bias else [])
    g = torch.randn(n, dtype=torch.float64)
    ours = torch.autograd.grad((lp * g).sum() + ent.sum(), params)
    refs = torch.autograd.grad((ref_lp * g).sum() + ref_ent.sum(), params)
    for a, r in zip(ours, refs):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)


def test_bad_arguments_raise_naming_the_value():
    logits, targets = torch.randn(2, 5), torch.tensor([0, 1])
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match=f"top_k must be an int >= 1 or None .*got {bad!r}"):
            token_logprobs(logits, targets, top_k=bad)
    for bad in (0.0, -0.5, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="top_p must be a float in \\(0, 1\\]"):
            token_logprobs(logits, targets, top_p=bad)
    with pytest.raises(ValueError, match="cannot be combined with top_k/top_p"):
        token_logprobs(logits, targets, top_k=2, statistics=("mean_logit",))
    with pytest.raises(ValueError, match="top_k"):
        linear_token_logprobs(torch.randn(2, 3), torch.randn(5, 3), targets, top_k=0)


def test_native_backend_is_skipped_or_refused(monkeypatch):
    logits, targets = torch.randn(2, 5), torch.tensor([0, 1])
    expected = token_logprobs(logits, targets, top_k=2, backend="torch")
    monkeypatch.setenv("FASTPO_BACKEND", "cpp")
    torch.testing.assert_close(token_logprobs(logits, targets, top_k=2), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="with top_k/top_p: backend='cpp' is not implemented"):
        token_logprobs(logits, targets, top_k=2, backend="cpp")


@pytest.mark.parametrize("top_k,top_p", [(5, None), (None, 0.8), (8, 0.9)])
def test_engine_rollouts_record_the_sampling_distribution(top_k, top_p):
    """The rollouts' log-probs are those of the truncated distribution generate() drew
    from: equal to the training forward given the same top_k/top_p, and to float64
    log-probs of the full forward's logits under HF's warpers' kept sets."""
    from fastpo.engine.forward import response_logprobs
    from fastpo.engine.models import load_causal_lm
    from fastpo.engine.rollout import sample_completions

    model, tokenizer = load_causal_lm("builtin:tiny", seed=3)
    temperature = 0.9
    engine_k, engine_p = top_k or 0, top_p or 1.0
    rollout = sample_completions(model, tokenizer, ["12+34=", "5+6=", "99+1="] * 2, temperature=temperature,
                                 top_k=engine_k, top_p=engine_p, max_new_tokens=6)
    mask = rollout.mask
    assert mask.sum() > 6
    recorded = rollout.rollout_logprobs[mask]
    assert torch.isfinite(recorded).all()  # every sampled token is in its kept set
    with torch.no_grad():
        trained = response_logprobs(model, rollout.input_ids, rollout.attention_mask, rollout.labels,
                                    temperature=temperature, top_k=engine_k, top_p=engine_p)
        full = response_logprobs(model, rollout.input_ids, rollout.attention_mask, rollout.labels,
                                 temperature=temperature)
        logits = model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask).logits.float()
    torch.testing.assert_close(trained[mask], recorded, rtol=0, atol=2e-5)
    z = logits[mask] / temperature
    kept = hf_kept(z, top_k, top_p)
    ref = z.double().masked_fill(~kept, float("-inf")).log_softmax(-1)
    ref = ref.gather(-1, rollout.labels[mask][:, None]).squeeze(-1)
    torch.testing.assert_close(recorded.double(), ref, rtol=0, atol=2e-5)
    # truncation raises each kept token's log-prob by minus the log of the kept mass
    assert (recorded >= full[mask] - 1e-6).all() and (recorded > full[mask] + 1e-4).any()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend_name", ["triton", "torch"])
def test_cuda_matches_the_cpu_backend(backend_name, dtype):
    # the CPU torch backend is checked against HF's warpers above; peaked and flat rows
    logits = (torch.randn(64, 32003) * torch.linspace(0.05, 8.0, 64)[:, None]).to(dtype)
    targets = logits.float().argmax(-1)
    targets[::3] = torch.randint(0, 32003, (22,))
    temperature = torch.rand(64) + 0.5
    for top_k, top_p in ((50, None), (None, 0.9), (50, 0.9), (2000, 0.95)):
        kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, return_entropy=True)
        cpu = logits.clone().requires_grad_()
        want = token_logprobs(cpu, targets, backend="torch", **kw)
        (want_grad,) = torch.autograd.grad(want[0].where(torch.isfinite(want[0]), 0.0).sum() + want[1].sum(), cpu)
        want = [w.detach() for w in want]
        x = logits.cuda().requires_grad_()
        got = token_logprobs(x, targets.cuda(), backend=backend_name, **{**kw, "temperature": temperature.cuda()})
        for g, w in zip(got, want):
            assert torch.equal(torch.isneginf(g.cpu()), torch.isneginf(w))
            finite = torch.isfinite(w)
            torch.testing.assert_close(g.cpu()[finite], w[finite], rtol=1e-5, atol=1e-5)
        (grad,) = torch.autograd.grad(got[0].where(torch.isfinite(got[0]), 0.0).sum() + got[1].sum(), x)
        atol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(grad.cpu().float(), want_grad.float(), rtol=1e-4, atol=atol)


def test_distinct_logits_that_temper_to_one_value_are_one_tie(backend):
    # two adjacent float32 logits whose quotients by T round to the same float: HF's
    # warpers see one tied value and keep both at the top-k boundary
    temperature = 3.0
    a = torch.tensor(1.0)
    b = torch.nextafter(a, torch.tensor(2.0))
    while (a / temperature) != (b / temperature):
        a, b = b, torch.nextafter(b, torch.tensor(2.0))
    logits = torch.stack([torch.tensor(4.0), b, a, torch.tensor(0.5), torch.tensor(-1.0)])[None].expand(2, 5)
    targets = torch.tensor([1, 2])
    for order in (logits, logits.flip(-1)):
        t = targets if order is logits else 4 - targets
        lp = check(order.contiguous(), t, backend, 2, None, temperature)[0]
        assert torch.isfinite(lp).all()
