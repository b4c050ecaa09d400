"""Advantage estimators against per-element float64 Python-loop references, on every
CPU-runnable backend, and the estimators of verl's registry against verl's own functions
(imported through tests/peer_modules.py)."""

import math

import pytest
import torch

from fastpo.kernels import (
    ADVANTAGE_ESTIMATORS,
    gae,
    gdpo_advantages,
    group_advantages,
    grpo_passk_advantages,
    opo_advantages,
    optimal_token_baseline_advantages,
    reinforce_pp_advantages,
    remax_advantages,
    rloo_advantages,
    whiten,
)

# ------------------------------------------------------------------ references


def ref_group_advantages(rewards, group_size, scale="group", unbiased=True, eps=1e-6):
    values = rewards.double().tolist()
    n = len(values)

    def std(xs):
        mean = sum(xs) / len(xs)
        dof = len(xs) - 1 if unbiased else len(xs)
        return math.sqrt(sum((x - mean) ** 2 for x in xs) / dof) if dof > 0 else 0.0

    batch_std = std(values) if n else 0.0
    out = []
    for start in range(0, n, group_size):
        group = values[start : start + group_size]
        mean = sum(group) / group_size
        for r in group:
            if max(group) == min(group):  # all equal, or a group of one: 0 by convention
                out.append(0.0)
            elif scale == "group":
                out.append((r - mean) / (std(group) + eps))
            elif scale == "batch":
                out.append((r - mean) / (batch_std + eps))
            else:
                out.append(r - mean)
    return torch.tensor(out, dtype=torch.float64)


def ref_rloo(rewards, group_size):
    """Leave-one-out written literally: each reward minus the mean of the others."""
    values = rewards.double().tolist()
    out = []
    for start in range(0, len(values), group_size):
        group = values[start : start + group_size]
        for i, r in enumerate(group):
            others = group[:i] + group[i + 1 :]
            out.append(r - sum(others) / len(others))
    return torch.tensor(out, dtype=torch.float64)


def ref_whiten(x, mask, shift_mean=True, unbiased=True, eps=1e-8):
    flat = x.double().reshape(-1).tolist()
    keep = [bool(m) for m in mask.reshape(-1).tolist()]
    chosen = [v for v, k in zip(flat, keep) if k]
    n = len(chosen)
    mean = sum(chosen) / n if n else 0.0
    dof = n - 1 if unbiased else n
    var = sum((v - mean) ** 2 for v in chosen) / dof if dof > 0 else 0.0
    out = []
    for v, k in zip(flat, keep):
        if not k:
            out.append(0.0)
            continue
        w = (v - mean) / math.sqrt(var + eps)
        out.append(w if shift_mean else w + mean)
    return torch.tensor(out, dtype=torch.float64).view(x.shape)


def ref_reinforce_pp(rewards, group_size, mask, unbiased=True, eps=1e-8):
    values = rewards.double().tolist()
    rows, steps = mask.shape
    tokens = torch.zeros(rows, steps, dtype=torch.float64)
    for b in range(rows):
        start = b - b % group_size
        group = values[start : start + group_size]
        advantage = 0.0 if max(group) == min(group) else values[b] - sum(group) / group_size
        for t in range(steps):
            if mask[b, t]:
                tokens[b, t] = advantage
    return ref_whiten(tokens, mask, True, unbiased, eps)


def ref_gae(rewards, values, mask, gamma, lam):
    """Backward recursion over each row's valid positions only."""
    rows, steps = rewards.shape
    r, v, m = rewards.double().tolist(), values.double().tolist(), mask.tolist()
    adv = [[0.0] * steps for _ in range(rows)]
    ret = [[0.0] * steps for _ in range(rows)]
    for b in range(rows):
        next_value, next_adv = 0.0, 0.0
        for t in reversed([t for t in range(steps) if m[b][t]]):
            delta = r[b][t] + gamma * next_value - v[b][t]
            adv[b][t] = delta + gamma * lam * next_adv
            ret[b][t] = adv[b][t] + v[b][t]
            next_value, next_adv = v[b][t], adv[b][t]
    return torch.tensor(adv, dtype=torch.float64), torch.tensor(ret, dtype=torch.float64)


def _reward_to_go(token_rewards, mask):
    rows, steps = token_rewards.shape
    out = [[0.0] * steps for _ in range(rows)]
    for b in range(rows):
        running = 0.0
        for t in reversed(range(steps)):
            running += float(token_rewards[b, t]) if mask[b, t] else 0.0
            out[b][t] = running
    return out


def ref_passk(rewards, group_size, eps=1e-6):
    """Only each group's best reward gets an advantage: its gap to the second best over
    the group's unbiased std plus eps."""
    values = rewards.double().tolist()
    out = [0.0] * len(values)
    for start in range(0, len(values), group_size):
        group = values[start : start + group_size]
        first, second = sorted(group, reverse=True)[:2]
        mean = sum(group) / group_size
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / (group_size - 1))
        out[start + group.index(first)] = (first - second) / (std + eps) if first != second else 0.0
    return torch.tensor(out, dtype=torch.float64)


def ref_opo(rewards, group_size, mask):
    """Each reward minus its group's mean reward weighted by the responses' lengths."""
    values, lengths = rewards.double().tolist(), mask.sum(-1).tolist()
    out = []
    for b, r in enumerate(values):
        start = b - b % group_size
        total = sum(lengths[start : start + group_size])
        weighted = sum(n * x for n, x in zip(lengths[start : start + group_size], values[start : start + group_size]))
        out.append(r - (weighted / total if total else 0.0))
    return torch.tensor(out, dtype=torch.float64)


def ref_remax(token_rewards, baselines, mask):
    returns = _reward_to_go(token_rewards, mask)
    advantages = [[g - (float(baselines[b]) if mask[b, t] else 0.0) for t, g in enumerate(row)]
                  for b, row in enumerate(returns)]
    return torch.tensor(advantages, dtype=torch.float64), torch.tensor(returns, dtype=torch.float64)


def ref_optimal_token_baseline(token_rewards, mask, group_size, old_logprobs, log_sum_sq_probs, eps=1e-8):
    """Per group and position: the returns of the valid responses weighted by their
    cumulative path variance; a group's single longest response has baseline 0 past the
    second longest's length."""
    rows, steps = token_rewards.shape
    returns = _reward_to_go(token_rewards, mask)
    path = [[0.0] * steps for _ in range(rows)]
    for b in range(rows):
        running = 0.0
        for t in range(steps):
            if mask[b, t]:
                p = math.exp(float(old_logprobs[b, t]))
                running += 1 - 2 * p + math.exp(float(log_sum_sq_probs[b, t]))
            path[b][t] = running
    lengths = mask.sum(-1).tolist()
    advantages = [[0.0] * steps for _ in range(rows)]
    for start in range(0, rows, group_size):
        members = range(start, start + group_size)
        ordered = sorted((lengths[j] for j in members), reverse=True)
        for t in range(steps):
            valid = [j for j in members if mask[j, t]]
            baseline = sum(returns[j][t] * path[j][t] for j in valid) / (sum(path[j][t] for j in valid) + eps)
            for j in valid:
                zero_tail = lengths[j] == ordered[0] > ordered[1] and t >= ordered[1]
                advantages[j][t] = returns[j][t] - (0.0 if zero_tail else baseline)
    return torch.tensor(advantages, dtype=torch.float64), torch.tensor(returns, dtype=torch.float64)


def close(actual, expected, tol=1e-5):
    assert actual.shape == expected.shape
    assert torch.isfinite(actual).all()
    err = (actual.double() - expected).abs().max().item() if actual.numel() else 0.0
    assert err <= tol * (1 + expected.abs().max().item()), err


def ragged_mask(rows, steps, holes=True):
    """Right-padded rows of random lengths (one empty), optionally with holes inside."""
    lengths = torch.randint(1, steps + 1, (rows,))
    lengths[0] = 0
    lengths[-1] = steps
    mask = torch.arange(steps)[None, :] < lengths[:, None]
    if holes:
        mask &= torch.rand(rows, steps) > 0.25
    return mask


# ------------------------------------------------------------------ GRPO


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("group_size", [1, 2, 3, 7])
def test_group_advantages(backend, scale, unbiased, group_size):
    rewards = torch.randn(5 * group_size)
    rewards[:group_size] = 0.1  # an all-equal group whose mean is not exactly 0.1
    binary = torch.randint(0, 2, (5 * group_size,)).float()  # many all-equal groups
    for r in (rewards, binary):
        out = group_advantages(r, group_size, scale=scale, unbiased=unbiased, backend=backend)
        assert out.dtype == torch.float32
        close(out, ref_group_advantages(r, group_size, scale, unbiased))
    assert (group_advantages(rewards, group_size, scale=scale, backend=backend)[:group_size] == 0).all()


@pytest.mark.parametrize("eps", [0.0, 1e-9, 1e-6, 1e-4, 0.5])
def test_group_advantages_eps(backend, eps):
    rewards = torch.randn(24)
    rewards[8:12] = 2.5
    for scale in ("group", "batch"):
        out = group_advantages(rewards, 4, scale=scale, eps=eps, backend=backend)
        close(out, ref_group_advantages(rewards, 4, scale, True, eps))
        assert (out[8:12] == 0).all()


def test_group_of_two_with_rewards_zero_and_one(backend):
    rewards = torch.tensor([0.0, 1.0, 1.0, 0.0])
    # By hand: mean 0.5; unbiased std sqrt((0.25 + 0.25) / 1) = 0.70711, so
    # A = -+0.5 / (0.70711 + 1e-6) = -+0.70711 (0.7071058 to 7 digits).
    out = group_advantages(rewards, 2, backend=backend)
    torch.testing.assert_close(out, torch.tensor([-0.7071058, 0.7071058, 0.7071058, -0.7071058]))
    # Biased std 0.5: A = -+0.5 / (0.5 + 1e-6) = -+0.999998.
    out = group_advantages(rewards, 2, unbiased=False, backend=backend)
    torch.testing.assert_close(out, torch.tensor([-0.999998, 0.999998, 0.999998, -0.999998]))
    # scale="none": -+0.5.
    out = group_advantages(rewards, 2, scale="none", backend=backend)
    torch.testing.assert_close(out, torch.tensor([-0.5, 0.5, 0.5, -0.5]))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_degenerate_groups_give_exact_zero(backend, scale):
    # Groups of one, and groups of equal rewards, even with eps=0: 0, never NaN.
    singles = torch.randn(6)
    assert (group_advantages(singles, 1, scale=scale, eps=0.0, backend=backend) == 0).all()
    equal = torch.full((12,), 0.1)
    assert (group_advantages(equal, 4, scale=scale, eps=0.0, backend=backend) == 0).all()
    one = torch.tensor([3.0])
    assert (group_advantages(one, 1, scale=scale, eps=0.0, backend=backend) == 0).all()


def test_group_advantages_low_precision_and_float64(backend):
    rewards = torch.randn(12)
    close(group_advantages(rewards.bfloat16(), 3, backend=backend), ref_group_advantages(rewards.bfloat16(), 3))
    out = group_advantages(rewards.double(), 3, backend=backend)
    assert out.dtype == torch.float64
    close(out, ref_group_advantages(rewards, 3), tol=1e-12)


def test_large_group(backend):
    # More than one block of the Triton group kernel.
    rewards = torch.randn(2 * 1500)
    close(group_advantages(rewards, 1500, backend=backend), ref_group_advantages(rewards, 1500))


def test_empty_rewards(backend):
    assert group_advantages(torch.zeros(0), 4, backend=backend).shape == (0,)
    assert rloo_advantages(torch.zeros(0), 4, backend=backend).shape == (0,)


# ------------------------------------------------------------------ RLOO


@pytest.mark.parametrize("group_size", [2, 3, 8])
def test_rloo(backend, group_size):
    rewards = torch.randn(4 * group_size)
    rewards[:group_size] = 0.1
    out = rloo_advantages(rewards, group_size, backend=backend)
    close(out, ref_rloo(rewards, group_size))
    assert (out[:group_size] == 0).all()
    # The identity of docs/conventions.md: G / (G - 1) * (R - group mean).
    groups = rewards.double().view(-1, group_size)
    identity = group_size / (group_size - 1) * (groups - groups.mean(1, keepdim=True))
    close(out[group_size:], identity.reshape(-1)[group_size:])


def test_rloo_group_of_one_is_an_error(backend):
    with pytest.raises(ValueError, match="group_size >= 2.*got 1"):
        rloo_advantages(torch.randn(4), 1, backend=backend)


# ------------------------------------------------------------------ whiten


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten(backend, unbiased, shift_mean):
    x = torch.randn(5, 9) * 3 + 1
    mask = ragged_mask(5, 9)
    out = whiten(x, mask, shift_mean=shift_mean, unbiased=unbiased, backend=backend)
    close(out, ref_whiten(x, mask, shift_mean, unbiased))
    garbage = x.masked_fill(~mask, float("nan"))  # masked entries are never used
    close(whiten(garbage, mask.float(), shift_mean=shift_mean, unbiased=unbiased, backend=backend), out.double())


def test_whiten_degenerate_masks(backend):
    x = torch.randn(3, 4)
    empty = torch.zeros(3, 4, dtype=torch.bool)
    assert (whiten(x, empty, backend=backend) == 0).all()
    one = empty.clone()
    one[1, 2] = True  # one valid entry: variance taken as 0, the centered value is 0
    assert (whiten(x, one, backend=backend) == 0).all()
    close(whiten(x, one, shift_mean=False, backend=backend), ref_whiten(x, one, shift_mean=False))
    # eps = 0 with zero variance: 0, not NaN.
    assert (whiten(torch.ones(3, 4), torch.ones(3, 4), eps=0.0, backend=backend) == 0).all()


# ------------------------------------------------------------------ REINFORCE++


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("group_size", [1, 2, 4])
def test_reinforce_pp(backend, unbiased, group_size):
    rewards = torch.randn(8)
    rewards[:group_size] = 1.0
    mask = ragged_mask(8, 11)
    out = reinforce_pp_advantages(rewards, group_size, mask, unbiased=unbiased, backend=backend)
    assert out.shape == (8, 11) and (out[~mask] == 0).all()
    close(out, ref_reinforce_pp(rewards, group_size, mask, unbiased))


# ------------------------------------------------------------------ GAE


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.9, 0.95), (0.99, 0.0), (0.0, 0.5)])
@pytest.mark.parametrize("holes", [False, True])
def test_gae(backend, gamma, lam, holes):
    rewards = torch.randn(6, 13)
    values = torch.randn(6, 13)
    mask = ragged_mask(6, 13, holes)
    advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam, backend=backend)
    ref_adv, ref_ret = ref_gae(rewards, values, mask, gamma, lam)
    close(advantages, ref_adv)
    close(returns, ref_ret)


def test_gae_ignores_masked_positions(backend):
    # Rewards and values at masked positions are never used: garbage there changes nothing.
    rewards = torch.randn(5, 10)
    values = torch.randn(5, 10)
    mask = ragged_mask(5, 10)
    clean = gae(rewards, values, mask, gamma=0.9, lam=0.8, backend=backend)
    dirty = gae(
        rewards.masked_fill(~mask, float("nan")),
        values.masked_fill(~mask, float("inf")),
        mask.to(torch.int32),
        gamma=0.9,
        lam=0.8,
        backend=backend,
    )
    assert torch.equal(clean[0], dirty[0]) and torch.equal(clean[1], dirty[1])
    assert (clean[0][~mask] == 0).all() and (clean[1][~mask] == 0).all()


def test_gae_hole_is_skipped_not_zeroed(backend):
    # One row [r0, hole, r2], V = [v0, *, v2], gamma = lam = 1, computed by hand:
    # A2 = r2 - v2, A0 = r0 + v2 - v0 + A2 = r0 + r2 - v0 (the hole is jumped over).
    rewards = torch.tensor([[1.0, 50.0, 2.0]])
    values = torch.tensor([[0.5, 70.0, 0.25]])
    mask = torch.tensor([[True, False, True]])
    advantages, returns = gae(rewards, values, mask, backend=backend)
    torch.testing.assert_close(advantages, torch.tensor([[2.5, 0.0, 1.75]]))
    torch.testing.assert_close(returns, torch.tensor([[3.0, 0.0, 2.0]]))


def test_gae_non_contiguous_and_dtypes(backend):
    base = torch.randn(4, 12)
    rewards = base[:, 1:]  # row stride 12, not 11
    values = torch.randn(11, 4).t()  # transposed: step stride 4
    mask = ragged_mask(4, 11)
    advantages, returns = gae(rewards, values.bfloat16(), mask, gamma=0.95, lam=0.9, backend=backend)
    ref_adv, ref_ret = ref_gae(rewards, values.bfloat16(), mask, 0.95, 0.9)
    close(advantages, ref_adv)
    close(returns, ref_ret)
    advantages, _ = gae(rewards.double(), values.double(), mask, gamma=0.95, lam=0.9, backend=backend)
    assert advantages.dtype == torch.float64
    close(advantages, ref_gae(rewards, values, mask, 0.95, 0.9)[0], tol=1e-12)


def test_gae_empty(backend):
    advantages, returns = gae(torch.zeros(3, 0), torch.zeros(3, 0), torch.zeros(3, 0), backend=backend)
    assert advantages.shape == returns.shape == (3, 0)


# ------------------------------------------------------------------ registry

# For each registered estimator: its public function's arguments and its independent
# reference, on inputs of 4 groups of 3 (a registration without an entry here fails).
ESTIMATOR_CASES = {
    "group": (lambda r, tr, v, m: (r, 3), lambda r, tr, v, m: ref_group_advantages(r, 3)),
    "rloo": (lambda r, tr, v, m: (r, 3), lambda r, tr, v, m: ref_rloo(r, 3)),
    "reinforce_pp": (lambda r, tr, v, m: (r, 3, m), lambda r, tr, v, m: ref_reinforce_pp(r, 3, m)),
    "gae": (lambda r, tr, v, m: (tr, v, m), lambda r, tr, v, m: ref_gae(tr, v, m, 1.0, 1.0)),
    "grpo_passk": (lambda r, tr, v, m: (r, 3), lambda r, tr, v, m: ref_passk(r, 3)),
    "opo": (lambda r, tr, v, m: (r, 3, m), lambda r, tr, v, m: ref_opo(r, 3, m)),
    "remax": (lambda r, tr, v, m: (tr, r, m), lambda r, tr, v, m: ref_remax(tr, r, m)),
    "gdpo": (lambda r, tr, v, m: (r, 3, m),  # one reward component: its group z-score, spread and whitened
             lambda r, tr, v, m: ref_whiten(ref_group_advantages(r, 3)[:, None] * m, m)),
    "optimal_token_baseline": (lambda r, tr, v, m: (tr, m, 3, -v.abs(), -tr.abs()),
                               lambda r, tr, v, m: ref_optimal_token_baseline(tr, m, 3, -v.abs(), -tr.abs())),
}


@pytest.mark.parametrize("name", ADVANTAGE_ESTIMATORS.names())
def test_every_estimator_is_registered_with_its_function(name, backend):
    variant = ADVANTAGE_ESTIMATORS.get(name)
    assert name in ESTIMATOR_CASES, f"add {name!r} to ESTIMATOR_CASES"
    arguments, reference = ESTIMATOR_CASES[name]
    inputs = torch.randn(12), torch.randn(12, 5), torch.randn(12, 5), ragged_mask(12, 5)
    out = variant.params["function"](*arguments(*inputs), backend=backend)
    expected = reference(*inputs)
    for actual, wanted in zip(out, expected) if isinstance(out, tuple) else [(out, expected)]:
        close(actual, wanted)
    assert variant.params["needs_values"] == (name == "gae")


# ------------------------------------------------------------------ autograd


def test_autograd_is_not_cut(backend):
    # With inputs that require grad, the differentiable composition runs on every backend.
    rewards = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda r: group_advantages(r, 4, backend=backend), (rewards,))
    assert torch.autograd.gradcheck(lambda r: rloo_advantages(r, 4, backend=backend), (rewards,))
    values = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    step_rewards = torch.randn(3, 5, dtype=torch.float64)
    mask = ragged_mask(3, 5)
    assert torch.autograd.gradcheck(
        lambda v: gae(step_rewards, v, mask, gamma=0.9, lam=0.7, backend=backend), (values,)
    )
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: whiten(t, mask, backend=backend), (x,))
    # Constant groups: the gradient is 0, not NaN.
    equal = torch.ones(4, requires_grad=True)
    group_advantages(equal, 2, backend=backend).sum().backward()
    assert (equal.grad == 0).all()


# ------------------------------------------------------------------ CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("backend_name", ["triton", "torch"])
def test_cuda_matches_reference(backend_name):
    # The compiled kernels (the interpreter is off on a GPU machine).
    rewards = torch.randint(0, 3, (64 * 8,), device="cuda").float()
    for scale in ("group", "batch", "none"):
        out = group_advantages(rewards, 8, scale=scale, backend=backend_name)
        close(out.cpu(), ref_group_advantages(rewards.cpu(), 8, scale))
    close(group_advantages(rewards, 1, backend=backend_name).cpu(), ref_group_advantages(rewards.cpu(), 1))
    close(rloo_advantages(rewards, 8, backend=backend_name).cpu(), ref_rloo(rewards.cpu(), 8))
    mask = ragged_mask(16, 300).cuda()
    step_rewards = torch.randn(16, 300, device="cuda")
    values = torch.randn(16, 300, device="cuda")
    advantages, returns = gae(step_rewards, values, mask, gamma=0.99, lam=0.95, backend=backend_name)
    ref_adv, ref_ret = ref_gae(step_rewards.cpu(), values.cpu(), mask.cpu(), 0.99, 0.95)
    close(advantages.cpu(), ref_adv)
    close(returns.cpu(), ref_ret)
    token_mask = ragged_mask(64 * 8, 20).cuda()
    out = reinforce_pp_advantages(rewards, 8, token_mask, backend=backend_name)
    close(out.cpu(), ref_reinforce_pp(rewards.cpu(), 8, token_mask.cpu()))


# ------------------------------------------------------------------ bad input


def test_bad_input():
    with pytest.raises(ValueError, match=r"group_size=4 does not divide the number of rewards \(10\)"):
        group_advantages(torch.randn(10), 4)
    with pytest.raises(ValueError, match=r"group_size=3 does not divide the number of rewards \(8\)"):
        rloo_advantages(torch.randn(8), 3)
    with pytest.raises(ValueError, match=r"group_size=3 does not divide the number of rewards \(4\)"):
        reinforce_pp_advantages(torch.randn(4), 3, torch.ones(4, 2))
    with pytest.raises(ValueError, match=r"scale='std' is not one of \('group', 'batch', 'none'\)"):
        group_advantages(torch.randn(4), 2, scale="std")
    with pytest.raises(ValueError, match="group_size must be >= 1, got 0"):
        group_advantages(torch.randn(4), 0)
    with pytest.raises(TypeError, match="group_size must be an int"):
        group_advantages(torch.randn(4), True)
    with pytest.raises(ValueError, match=r"rewards must be 1-D.*\(2, 2\)"):
        group_advantages(torch.randn(2, 2), 2)
    with pytest.raises(TypeError, match="rewards has dtype torch.int64"):
        group_advantages(torch.ones(4, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0, got -1"):
        group_advantages(torch.randn(4), 2, eps=-1e-6)
    with pytest.raises(ValueError, match=r"mask must be \(B, T\) with B = rewards.numel\(\) = 4, got \(3, 2\)"):
        reinforce_pp_advantages(torch.randn(4), 2, torch.ones(3, 2))
    with pytest.raises(ValueError, match=r"values.shape \(2, 4\) does not match rewards.shape \(2, 3\)"):
        gae(torch.randn(2, 3), torch.randn(2, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"mask.shape \(2, 4\)"):
        gae(torch.randn(2, 3), torch.randn(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"rewards must be \(B, T\)"):
        gae(torch.randn(3), torch.randn(3), torch.ones(3))
    with pytest.raises(ValueError, match="gamma must be in \\[0, 1\\], got 1.5"):
        gae(torch.randn(2, 3), torch.randn(2, 3), torch.ones(2, 3), gamma=1.5)
    with pytest.raises(ValueError, match="lam must be a finite number >= 0"):
        gae(torch.randn(2, 3), torch.randn(2, 3), torch.ones(2, 3), lam=float("nan"))
    with pytest.raises(ValueError, match=r"mask.shape \(3,\)"):
        whiten(torch.randn(2, 3), torch.ones(3))
    with pytest.raises(ValueError, match="backend='cuda'"):
        whiten(torch.randn(2, 3), torch.ones(2, 3), backend="cuda")


# ------------------------------------------------------------------ verl's registry estimators

B_GROUPS, G = 4, 5


def _verl_inputs(seed, steps=6, holes=True):
    """Float64 rewards of 4 groups of 5 (ties and a constant group included), a ragged
    mask without empty rows and the (B, T) token rewards with each outcome reward on its
    row's last valid token (verl's token_level_rewards)."""
    generator = torch.Generator().manual_seed(seed)
    rewards = torch.randint(0, 4, (B_GROUPS * G,), generator=generator).double() / 4
    rewards[5:10] = 0.5  # a constant group
    lengths = torch.randint(1, steps + 1, (B_GROUPS * G,), generator=generator)
    mask = torch.arange(steps)[None, :] < lengths[:, None]
    if holes:
        mask &= (torch.rand(B_GROUPS * G, steps, generator=generator) > 0.2) | (torch.arange(steps) == 0)
    last = torch.where(mask, torch.arange(steps), -1).amax(-1)
    token_rewards = torch.zeros(B_GROUPS * G, steps, dtype=torch.float64)
    token_rewards[torch.arange(B_GROUPS * G), last] = rewards
    index = torch.arange(B_GROUPS * G).numpy() // G
    return rewards, mask, token_rewards, index


@pytest.fixture(scope="module")
def verl():
    import peer_modules

    return peer_modules.verl_core_algos()


@pytest.mark.parametrize("scale", ["group", "none"])
def test_grpo_passk_matches_verl(verl, scale, backend):
    rewards, mask, token_rewards, index = _verl_inputs(0)
    expected, _ = verl.compute_grpo_passk_outcome_advantage(
        token_rewards, mask.double(), index, epsilon=1e-6, config={"norm_adv_by_std_in_grpo": scale == "group"}
    )
    out = grpo_passk_advantages(rewards, G, scale=scale, backend=backend)
    assert out.dtype == torch.float64 and (out != 0).sum() <= B_GROUPS and (out != 0).any()
    close(out[:, None] * mask, expected, tol=1e-12)


def test_opo_matches_verl(verl, backend):
    rewards, mask, token_rewards, index = _verl_inputs(1)
    expected, _ = verl.compute_opo_outcome_advantage(token_rewards, mask.double(), index)
    close(opo_advantages(rewards, G, mask, backend=backend)[:, None] * mask, expected, tol=1e-12)
    # a group of one: baseline 0
    single, _ = verl.compute_opo_outcome_advantage(token_rewards[:3], mask[:3].double(), torch.arange(3).numpy())
    close(opo_advantages(rewards[:3], 1, mask[:3], backend=backend)[:, None] * mask[:3], single, tol=1e-12)


def test_remax_matches_verl(verl, backend):
    rewards, mask, token_rewards, _ = _verl_inputs(2)
    token_rewards = token_rewards + 0.1 * torch.randn_like(token_rewards) * mask  # dense rewards too
    baselines = torch.randn(rewards.numel(), dtype=torch.float64)
    expected_adv, expected_ret = verl.compute_remax_outcome_advantage(token_rewards, baselines, mask.double())
    advantages, returns = remax_advantages(token_rewards, baselines, mask, backend=backend)
    close(advantages, expected_adv, tol=1e-12)
    close(returns, expected_ret, tol=1e-12)


@pytest.mark.parametrize("weights", [None, (0.5, 2.0)])
def test_gdpo_matches_verl(verl, weights, backend):
    """verl reads the components from its batch: each on the row's last response token
    (right-padded rows), in float32."""
    _, mask, _, index = _verl_inputs(3, holes=False)
    generator = torch.Generator().manual_seed(4)
    components = torch.randint(0, 5, (B_GROUPS * G, 2), generator=generator).double() / 4
    prompt = 3
    batch = {"prompts": torch.zeros(B_GROUPS * G, prompt, dtype=torch.long),
             "attention_mask": torch.cat([torch.ones(B_GROUPS * G, prompt, dtype=torch.long), mask.long()], 1)}
    non_tensor = {"format": components[:, 0].numpy(), "accuracy": components[:, 1].numpy()}
    config = {"gdpo_reward_keys": ["format", "accuracy"], "gdpo_reward_weights": weights}
    expected, _ = verl.compute_gdpo_outcome_advantage(
        torch.zeros(mask.shape), mask.float(), index, epsilon=1e-6, config=config, non_tensor_batch=non_tensor,
        batch=batch,
    )
    out = gdpo_advantages(components, G, mask, weights=weights, backend=backend)
    assert out.shape == mask.shape and out.dtype == torch.float64
    close(out, expected.double(), tol=2e-6)  # verl computes in float32


@pytest.mark.parametrize("handle_zero_tail", [True, False])
@pytest.mark.parametrize("with_is_weights", [False, True])
def test_optimal_token_baseline_matches_verl(verl, handle_zero_tail, with_is_weights, backend):
    rewards, mask, token_rewards, index = _verl_inputs(5, steps=8)
    generator = torch.Generator().manual_seed(6)
    old = torch.rand(mask.shape, generator=generator, dtype=torch.float64).clamp(min=0.05).log()
    p = old.exp()
    sum_sq = p * p + (1 - p * p) * torch.rand(mask.shape, generator=generator, dtype=torch.float64) * 0.5
    is_weights = 0.5 + torch.rand(mask.shape, generator=generator, dtype=torch.float64) if with_is_weights else None
    expected_adv, expected_ret = verl.compute_optimal_token_baseline_advantage(
        token_rewards, mask.double(), index, old, sum_sq, rollout_is_weights=is_weights,
        handle_zero_tail=handle_zero_tail,
    )
    advantages, returns = optimal_token_baseline_advantages(
        token_rewards, mask, G, old, sum_sq.log(), rollout_is_weights=is_weights, handle_zero_tail=handle_zero_tail,
        backend=backend,
    )
    close(advantages, expected_adv, tol=1e-12)
    close(returns, expected_ret, tol=1e-12)
    lengths = mask.sum(-1).view(B_GROUPS, G)
    top = lengths.topk(2, dim=1).values
    assert ((top[:, 0] > top[:, 1]).any()), "no group exercises the zero tail"


def test_verl_registry_estimators_bad_input():
    with pytest.raises(ValueError, match="grpo_passk_advantages needs group_size >= 2"):
        grpo_passk_advantages(torch.randn(4), 1)
    with pytest.raises(ValueError, match=r"scale='batch' is not one of \('group', 'none'\)"):
        grpo_passk_advantages(torch.randn(4), 2, scale="batch")
    with pytest.raises(ValueError, match=r"mask must be \(B, T\) with B = rewards.shape\[0\] = 4, got \(3, 2\)"):
        opo_advantages(torch.randn(4), 2, torch.ones(3, 2))
    with pytest.raises(ValueError, match=r"baseline_rewards.shape \(3,\) must be \(B,\) = \(2,\)"):
        remax_advantages(torch.randn(2, 3), torch.randn(3), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"weights must be 2 finite floats"):
        gdpo_advantages(torch.randn(4, 2), 2, torch.ones(4, 3), weights=(1.0,))
    with pytest.raises(ValueError, match=r"log_sum_sq_probs.shape \(4, 2\) does not match mask.shape \(4, 3\)"):
        optimal_token_baseline_advantages(torch.randn(4, 3), torch.ones(4, 3), 2, torch.randn(4, 3),
                                          torch.randn(4, 2))
    with pytest.raises(ValueError, match=r"group_size=3 does not divide the number of rows \(4\)"):
        optimal_token_baseline_advantages(torch.randn(4, 3), torch.ones(4, 3), 3, torch.randn(4, 3),
                                          torch.randn(4, 3))
