"""Preference and reward-model losses against per-element float64 references written
from docs/conventions.md, on every CPU-runnable backend."""

import math

import pytest
import torch

from fastpo.kernels import (
    PREFERENCE_LOSSES,
    bradley_terry_loss,
    dpo_loss,
    ipo_loss,
    kto_loss,
    kto_mismatched_pairs,
    plackett_luce_loss,
    ranking_loss,
    sequence_logprobs,
)

# ------------------------------------------------------------------ references
# Scalar float64 arithmetic, one example (and one response pair) at a time, on 0-dim
# tensors so that autograd of the reference gives the expected gradients.


def log_sigmoid(u):
    # log sigmoid(u) = -log1p(exp(-u)), rewritten for u < 0 so that exp never overflows
    if u.item() >= 0:
        return -torch.log1p(torch.exp(-u))
    return u - torch.log1p(torch.exp(u))


def sigmoid(u):
    return torch.exp(log_sigmoid(u))


def log_sum_exp(values):
    top = max(v.item() for v in values)  # a constant shift: no gradient needed
    return top + torch.log(sum(torch.exp(v - top) for v in values))


def ref_dpo(pc, pr, rc, rr, beta, loss_type, eps):
    losses = []
    for i in range(pc.shape[0]):
        h = (pc[i] - (rc[i] if rc is not None else 0.0)) - (pr[i] - (rr[i] if rr is not None else 0.0))
        u = beta * h
        if loss_type == "sigmoid":
            loss = -(1 - eps) * log_sigmoid(u) - eps * log_sigmoid(-u)
        elif loss_type == "hinge":
            loss = torch.clamp(1 - u, min=0.0)
        elif loss_type == "ipo":
            loss = (h - 1 / (2 * beta)) ** 2
        else:
            assert loss_type == "robust", f"write an independent reference of {loss_type!r} here"
            loss = (-(1 - eps) * log_sigmoid(u) + eps * log_sigmoid(-u)) / (1 - 2 * eps)
        losses.append(loss)
    return torch.stack(losses)


def ref_plackett_luce(policy, ref, beta):
    losses = []
    for i in range(policy.shape[0]):
        n = policy.shape[1]
        u = [beta * (policy[i, k] - (ref[i, k] if ref is not None else 0.0)) for k in range(n)]
        losses.append(sum(log_sum_exp(u[k:]) - u[k] for k in range(n - 1)))
    return torch.stack(losses)


def ref_kto(policy, ref, desirable, policy_kl, ref_kl, beta, w_d, w_u):
    z0 = max(0.0, sum((policy_kl[j] - ref_kl[j]).item() for j in range(policy_kl.shape[0])) / policy_kl.shape[0])
    losses = []
    for i in range(policy.shape[0]):
        rw = policy[i] - ref[i]
        if bool(desirable[i]):
            losses.append(w_d * (1 - sigmoid(beta * (rw - z0))))
        else:
            losses.append(w_u * (1 - sigmoid(beta * (z0 - rw))))
    return torch.stack(losses), z0


def ref_bradley_terry(chosen, rejected, margin, center_coef):
    losses = []
    for i in range(chosen.shape[0]):
        m = margin[i] if isinstance(margin, torch.Tensor) else (margin or 0.0)
        loss = -log_sigmoid(chosen[i] - rejected[i] - m) + center_coef * (chosen[i] + rejected[i]) ** 2
        losses.append(loss)
    return torch.stack(losses)


def ref_ranking(scores):
    n = scores.shape[1]
    losses = []
    for b in range(scores.shape[0]):
        pairs = [-log_sigmoid(scores[b, i] - scores[b, j]) for i in range(n) for j in range(i + 1, n)]
        losses.append(sum(pairs) / math.comb(n, 2))
    return torch.stack(losses)


# --------------------------------------------------------------------- helpers


def logps(*shape, scale=10.0):
    """Plausible summed log-probs: negative, spread over tens of nats."""
    return torch.randn(*shape) * scale - 30.0


def leaves(tensors, dtype):
    return [None if t is None else t.detach().to(dtype).requires_grad_() for t in tensors]


def grads(output, inputs, weights):
    wanted = [t for t in inputs if t is not None]
    found = torch.autograd.grad((output.double() * weights).sum(), wanted, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(wanted, found)]


def assert_close(actual, expected, tol):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol)


def check_losses(fast_fn, ref_fn, inputs, tol=2e-5, dtype=torch.float32):
    """Losses and gradients with respect to every input, fast (in ``dtype``) against the
    float64 reference; the incoming gradient is random so that every row's scaling
    is exercised. Returns the fast function's full output."""
    fast_inputs = leaves(inputs, dtype)
    out = fast_fn(*fast_inputs)
    losses = out[0] if isinstance(out, tuple) else out
    assert losses.dtype == torch.float32 and torch.isfinite(losses).all()
    weights = torch.randn(losses.shape, dtype=torch.float64)
    fast_grads = grads(losses, fast_inputs, weights)

    ref_inputs = leaves(inputs, torch.float64)
    ref_losses = ref_fn(*ref_inputs)
    ref_grads = grads(ref_losses, ref_inputs, weights)
    assert_close(losses, ref_losses, tol)
    for got, want in zip(fast_grads, ref_grads):
        assert got.dtype == dtype and torch.isfinite(got).all()
        assert_close(got, want, tol)
    return out


# ------------------------------------------------------------------------- DPO

# Every registered loss type, and with label smoothing those that take it.
DPO_CASES = [(name, 0.0) for name in PREFERENCE_LOSSES.names()] + [
    (variant.name, 0.1) for variant in PREFERENCE_LOSSES if variant.params["label_smoothing"] is not None
]


@pytest.mark.parametrize("loss_type,eps", DPO_CASES)
@pytest.mark.parametrize("with_ref", [True, False])
def test_dpo_matches_reference(backend, loss_type, eps, with_ref):
    batch = 13
    inputs = [logps(batch), logps(batch), logps(batch), logps(batch)]
    if not with_ref:
        inputs[2:] = [None, None]
    beta = 0.1 if loss_type != "ipo" else 0.5

    def fast(pc, pr, rc, rr):
        return dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps, backend=backend)

    def ref(pc, pr, rc, rr):
        return ref_dpo(pc, pr, rc, rr, beta, loss_type, eps)

    losses, chosen_rewards, rejected_rewards = check_losses(fast, ref, inputs)
    ref_c = inputs[2] if with_ref else torch.zeros(batch)
    ref_r = inputs[3] if with_ref else torch.zeros(batch)
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad
    assert_close(chosen_rewards, beta * (inputs[0].double() - ref_c.double()), 1e-5)
    assert_close(rejected_rewards, beta * (inputs[1].double() - ref_r.double()), 1e-5)


def test_hinge_is_zero_beyond_the_margin(backend):
    # beta*h = 0.1 * 20 = 2 > 1: loss 0 and gradient 0; beta*h = 0.1 * 5 = 0.5: loss 0.5.
    pc = torch.tensor([0.0, 0.0], requires_grad=True)
    pr = torch.tensor([-20.0, -5.0])
    losses, _, _ = dpo_loss(pc, pr, beta=0.1, loss_type="hinge", backend=backend)
    assert_close(losses, torch.tensor([0.0, 0.5]), 1e-6)
    (grad,) = torch.autograd.grad(losses.sum(), pc)
    assert_close(grad, torch.tensor([0.0, -0.1]), 1e-6)


def test_ipo_loss_is_dpo_ipo(backend):
    pc, pr, rc, rr = (logps(7) for _ in range(4))
    a = ipo_loss(pc, pr, rc, rr, beta=0.3, backend=backend)
    b = dpo_loss(pc, pr, rc, rr, beta=0.3, loss_type="ipo", backend=backend)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_ipo_on_averaged_token_logprobs(backend):
    """TRL's convention: IPO on per-token means, checked end to end from token log-probs."""
    tokens = [torch.randn(4, 9) - 2.0 for _ in range(4)]
    masks = [torch.rand(4, 9) > 0.3 for _ in range(4)]
    for m in masks:
        m[:, 0] = True
    beta = 0.5

    def fast(*toks):
        seq = [sequence_logprobs(t, m, average=True, backend=backend) for t, m in zip(toks, masks)]
        return ipo_loss(*seq, beta=beta, backend=backend)

    def ref(*toks):
        means = [
            torch.stack([sum(t[b, j] for j in range(9) if m[b, j]) / int(m[b].sum()) for b in range(4)])
            for t, m in zip(toks, masks)
        ]
        return ref_dpo(*means, beta, "ipo", 0.0)

    check_losses(fast, ref, tokens)


def test_low_precision_inputs(backend):
    pc, pr, rc, rr = (logps(6).to(torch.bfloat16) for _ in range(4))
    check_losses(
        lambda a, b, c, d: dpo_loss(a, b, c, d, beta=0.1, backend=backend),
        lambda a, b, c, d: ref_dpo(a, b, c, d, 0.1, "sigmoid", 0.0),
        [pc, pr, rc, rr],
        dtype=torch.bfloat16,
        tol=2e-2,
    )


def test_float64_inputs_give_float64(backend):
    pc, pr = logps(5).double(), logps(5).double()
    losses, chosen, _ = dpo_loss(pc, pr, beta=0.1, backend=backend)
    assert losses.dtype == torch.float64 and chosen.dtype == torch.float64


def test_empty_batch(backend):
    pc = torch.zeros(0, requires_grad=True)
    losses, chosen, rejected = dpo_loss(pc, torch.zeros(0), beta=0.1, backend=backend)
    assert losses.shape == chosen.shape == rejected.shape == (0,)
    losses.sum().backward()
    assert pc.grad.shape == (0,)


# ------------------------------------------------------------- Plackett-Luce


@pytest.mark.parametrize("n_responses", [3, 5])
@pytest.mark.parametrize("with_ref", [True, False])
def test_plackett_luce_matches_reference(backend, n_responses, with_ref):
    policy = logps(9, n_responses)
    ref = logps(9, n_responses) if with_ref else None
    check_losses(
        lambda p, r: plackett_luce_loss(p, r, beta=0.2, backend=backend),
        lambda p, r: ref_plackett_luce(p, r, 0.2),
        [policy, ref],
    )


def test_plackett_luce_with_two_responses_is_dpo_sigmoid(backend):
    policy, ref = logps(11, 2), logps(11, 2)
    p1, r1 = leaves([policy, ref], torch.float32)
    pl = plackett_luce_loss(p1, r1, beta=0.3, backend=backend)
    p2, r2 = leaves([policy, ref], torch.float32)
    dpo, _, _ = dpo_loss(p2[:, 0], p2[:, 1], r2[:, 0], r2[:, 1], beta=0.3, backend=backend)
    weights = torch.randn(11, dtype=torch.float64)
    assert_close(pl, dpo, 1e-6)
    for a, b in zip(grads(pl, [p1, r1], weights), grads(dpo, [p2, r2], weights)):
        assert_close(a, b, 1e-6)


# ------------------------------------------------------------------------- KTO


@pytest.mark.parametrize("kl_shift", [5.0, -5.0])  # z0 > 0, and z0 clamped to 0
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.33, 0.5)])
def test_kto_matches_reference(backend, kl_shift, weights):
    batch = 10
    desirable = torch.rand(batch) > 0.5
    desirable[:2] = torch.tensor([True, False])
    policy, ref = logps(batch), logps(batch)
    ref_kl = logps(batch)
    policy_kl = ref_kl + kl_shift + torch.randn(batch)
    w_d, w_u = weights
    z0_ref = ref_kto(policy, ref, desirable, policy_kl.double(), ref_kl.double(), 0.1, w_d, w_u)[1]

    def fast(p, r, pkl, rkl):
        return kto_loss(p, r, desirable, pkl, rkl, beta=0.1, desirable_weight=w_d,
                        undesirable_weight=w_u, backend=backend)

    def ref_fn(p, r, pkl, rkl):
        return ref_kto(p, r, desirable, pkl, rkl, 0.1, w_d, w_u)[0]

    losses, rewards, z0 = check_losses(fast, ref_fn, [policy, ref, policy_kl, ref_kl])
    assert z0.dim() == 0 and not z0.requires_grad
    assert math.isclose(z0.item(), z0_ref, rel_tol=1e-5, abs_tol=1e-5)
    assert (z0_ref > 0) == (kl_shift > 0)
    assert not rewards.requires_grad
    assert_close(rewards, 0.1 * (policy.double() - ref.double()), 1e-5)


def test_kto_mismatched_pairs_rotates_completions():
    batch = {
        "prompt": ["p0", "p1", "p2"],
        "completion": ("c0", "c1", "c2"),
        "completion_mask": torch.tensor([[1, 0], [1, 1], [0, 1]]),
        "label": torch.tensor([True, False, True]),
    }
    pairs = kto_mismatched_pairs(batch)
    assert pairs["prompt"] == ["p0", "p1", "p2"]
    assert pairs["completion"] == ("c2", "c0", "c1")
    assert torch.equal(pairs["completion_mask"], torch.tensor([[0, 1], [1, 0], [1, 1]]))
    assert torch.equal(pairs["label"], batch["label"])
    assert batch["completion"] == ("c0", "c1", "c2"), "the input is not modified"


def test_kto_mismatched_pairs_bad_batches():
    with pytest.raises(ValueError, match="at least 2"):
        kto_mismatched_pairs({"prompt": ["p"], "completion": ["c"]})
    with pytest.raises(ValueError, match="one length"):
        kto_mismatched_pairs({"prompt": ["p", "q"], "completion": ["c", "d", "e"]})
    with pytest.raises(ValueError, match="'completion'"):
        kto_mismatched_pairs({"prompt": ["p", "q"]})


# ----------------------------------------------------------- reward models


@pytest.mark.parametrize("margin_kind", ["none", "float", "tensor"])
@pytest.mark.parametrize("center_coef", [0.0, 0.01])
def test_bradley_terry_matches_reference(backend, margin_kind, center_coef):
    batch = 12
    chosen, rejected = torch.randn(batch) * 3, torch.randn(batch) * 3
    inputs = [chosen, rejected]
    if margin_kind == "tensor":
        inputs.append(torch.rand(batch))  # its gradient is checked too

        def fast(c, r, m):
            return bradley_terry_loss(c, r, margin=m, center_coef=center_coef, backend=backend)

        def ref(c, r, m):
            return ref_bradley_terry(c, r, m, center_coef)

    else:
        margin = 0.5 if margin_kind == "float" else None

        def fast(c, r):
            return bradley_terry_loss(c, r, margin=margin, center_coef=center_coef, backend=backend)

        def ref(c, r):
            return ref_bradley_terry(c, r, margin, center_coef)

    check_losses(fast, ref, inputs)


@pytest.mark.parametrize("n_responses", [3, 6])
def test_ranking_matches_reference(backend, n_responses):
    check_losses(
        lambda s: ranking_loss(s, backend=backend), ref_ranking, [torch.randn(7, n_responses) * 3]
    )


def test_ranking_with_two_responses_is_bradley_terry(backend):
    scores = torch.randn(9, 2) * 3
    s1, s2 = leaves([scores, scores], torch.float32)
    rank = ranking_loss(s1, backend=backend)
    bt = bradley_terry_loss(s2[:, 0], s2[:, 1], backend=backend)
    weights = torch.randn(9, dtype=torch.float64)
    assert_close(rank, bt, 1e-6)
    assert_close(grads(rank, [s1], weights)[0], grads(bt, [s2], weights)[0], 1e-6)


def test_batches_over_several_programs(backend):
    """Enough rows for several kernel programs (the interpreter's tile is 256 entries),
    against float64 formulas vectorized over the rows."""
    policy, ref = logps(301, 5), logps(301, 5)
    beta = 0.25

    def ref_pl(p, r):
        u = beta * (p - r)
        return sum(torch.logsumexp(u[:, k:], dim=-1) - u[:, k] for k in range(4))

    def ref_rank(s):
        pairs = [-torch.nn.functional.logsigmoid(s[:, i] - s[:, j]) for i in range(5) for j in range(i + 1, 5)]
        return sum(pairs) / 10

    check_losses(lambda p, r: plackett_luce_loss(p, r, beta=beta, backend=backend), ref_pl, [policy, ref])
    check_losses(lambda s: ranking_loss(s, backend=backend), ref_rank, [policy * 0.1])
    check_losses(
        lambda pc, pr: dpo_loss(pc, pr, beta=beta, backend=backend),
        lambda pc, pr: -torch.nn.functional.logsigmoid(beta * (pc - pr)),
        [policy[:, 0], policy[:, 1]],
    )


# ------------------------------------------------------------------ extremes

EXTREME_H = torch.tensor([1e5, -1e5, 1e4, -1e4, 30.0, -30.0, 0.0])  # beta = 0.1: |beta*h| up to 1e4


def test_extremes_dpo(backend):
    batch = EXTREME_H.shape[0]
    for loss_type, eps in DPO_CASES:
        beta = 0.1
        check_losses(
            lambda pc, pr: dpo_loss(pc, pr, beta=beta, loss_type=loss_type, label_smoothing=eps, backend=backend),
            lambda pc, pr: ref_dpo(pc, pr, None, None, beta, loss_type, eps),
            [EXTREME_H, torch.zeros(batch)],
            tol=1e-5,
        )


def test_extremes_other_losses(backend):
    policy = torch.stack([EXTREME_H, -EXTREME_H, EXTREME_H.flip(0)], dim=1)
    check_losses(
        lambda p: plackett_luce_loss(p, beta=0.1, backend=backend),
        lambda p: ref_plackett_luce(p, None, 0.1),
        [policy],
        tol=1e-5,
    )
    scores = policy * 0.1  # score gaps up to 2e4
    check_losses(lambda s: ranking_loss(s, backend=backend), ref_ranking, [scores], tol=1e-5)
    check_losses(
        lambda c, r: bradley_terry_loss(c, r, backend=backend),
        lambda c, r: ref_bradley_terry(c, r, None, 0.0),
        [scores[:, 0], scores[:, 1]],
        tol=1e-5,
    )
    desirable = torch.arange(EXTREME_H.shape[0]) % 2 == 0
    kl = torch.zeros(3)
    check_losses(
        lambda p, r: kto_loss(p, r, desirable, kl, kl, beta=0.1, backend=backend),
        lambda p, r: ref_kto(p, r, desirable, kl, kl, 0.1, 1.0, 1.0)[0],
        [EXTREME_H, torch.zeros_like(EXTREME_H)],
        tol=1e-5,
    )


# ------------------------------------------------------------------ bad input


def test_bad_input_names_the_argument(backend):
    b = torch.randn(4)
    yes = torch.ones(4, dtype=torch.bool)
    cases = [
        (lambda: dpo_loss(b, b, beta=-0.1, backend=backend), "beta"),
        (lambda: dpo_loss(b, b, beta=0.0, backend=backend), "beta"),
        (lambda: dpo_loss(b, torch.randn(5), backend=backend), "policy_rejected"),
        (lambda: dpo_loss(b, b, b, torch.randn(3), backend=backend), "ref_rejected"),
        (lambda: dpo_loss(b, b, b, None, backend=backend), "ref_chosen"),
        (lambda: dpo_loss(b[:, None], b[:, None], backend=backend), "policy_chosen"),
        (lambda: dpo_loss(b, b, loss_type="sppo", backend=backend), "loss_type"),
        (lambda: dpo_loss(b, b, label_smoothing=1.5, backend=backend), "label_smoothing"),
        (lambda: dpo_loss(b, b, loss_type="robust", label_smoothing=0.5, backend=backend), "label_smoothing"),
        (lambda: dpo_loss(b, b, loss_type="hinge", label_smoothing=0.1, backend=backend), "label_smoothing"),
        (lambda: ipo_loss(b, b, beta=-1.0, backend=backend), "beta"),
        (lambda: plackett_luce_loss(torch.randn(4, 1), backend=backend), "K >= 2"),
        (lambda: plackett_luce_loss(torch.randn(4, 3), torch.randn(4, 2), backend=backend), "ref_logps"),
        (lambda: plackett_luce_loss(b, backend=backend), "policy_logps"),
        (lambda: plackett_luce_loss(torch.randn(4, 3), beta=-0.5, backend=backend), "beta"),
        (lambda: ranking_loss(torch.randn(4, 1), backend=backend), "K >= 2"),
        (lambda: ranking_loss(b, backend=backend), "scores"),
        (lambda: bradley_terry_loss(b, torch.randn(3), backend=backend), "rejected_scores"),
        (lambda: bradley_terry_loss(b, b, margin=torch.randn(3), backend=backend), "margin"),
        (lambda: bradley_terry_loss(b, b, center_coef=-1.0, backend=backend), "center_coef"),
        (lambda: kto_loss(b, b, yes[:3], b, b, backend=backend), "desirable"),
        (lambda: kto_loss(b, b, yes, b, b, beta=-0.1, backend=backend), "beta"),
        (lambda: kto_loss(b, torch.randn(5), yes, b, b, backend=backend), "ref_logps"),
        (lambda: kto_loss(b, b, yes, b, torch.randn(2), backend=backend), "ref_kl_logps"),
        (lambda: kto_loss(b, b, yes, b, b, undesirable_weight=-1.0, backend=backend), "undesirable_weight"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=name.replace("(", "\\(")):
            call()
    with pytest.raises(TypeError, match="desirable"):
        kto_loss(b, b, torch.ones(4), b, b, backend=backend)
    with pytest.raises(TypeError, match="policy_chosen"):
        dpo_loss(b.long(), b, backend=backend)


# ------------------------------------------------------------------------ GPU


@pytest.mark.gpu
def test_triton_matches_torch_on_cuda():
    batch = 64
    pc, pr, rc, rr = (logps(batch).cuda() for _ in range(4))
    desirable = (torch.rand(batch) > 0.5).cuda()
    ranked = logps(batch, 4).cuda()
    calls = {
        **{
            f"dpo-{t}-{e}": (
                lambda be, t=t, e=e: dpo_loss(pc, pr, rc, rr, loss_type=t, label_smoothing=e, backend=be)[0]
            )
            for t, e in DPO_CASES
        },
        "kto": lambda be: kto_loss(pc, rc, desirable, pr, rr, backend=be)[0],
        "pl": lambda be: plackett_luce_loss(ranked, ranked * 0.9, backend=be),
        "bt": lambda be: bradley_terry_loss(pc * 0.1, pr * 0.1, margin=0.3, center_coef=0.01, backend=be),
        "rank": lambda be: ranking_loss(ranked * 0.1, backend=be),
    }
    for name, call in calls.items():
        for tensor in (pc, pr, rc, rr, ranked):
            tensor.requires_grad_(True)
        results = []
        for be in ("torch", "triton"):
            losses = call(be)
            found = torch.autograd.grad(losses.sum(), [pc, pr, rc, rr, ranked], allow_unused=True)
            results.append([losses, *found])
        for a, b in zip(*results):
            if a is None or b is None:
                assert a is None and b is None, name
            else:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
