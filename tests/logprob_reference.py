"""Independent float64 references for token_logprobs, shared by the test modules."""

import math

import torch

from fastpo.kernels import token_logprobs

LOW_PRECISION = (torch.bfloat16, torch.float16)


def reference_loop(logits, targets, temperature=1.0, softcap=None, ignore_index=-100):
    """Per-element Python loops in float64, straight from the definitions."""
    rows = logits.reshape(-1, logits.shape[-1]).double().tolist()
    tgts = targets.reshape(-1).tolist()
    temps = torch.as_tensor(temperature, dtype=torch.float64).expand(targets.shape).reshape(-1).tolist()
    lps, ents = [], []
    for row, tgt, temp in zip(rows, tgts, temps):
        if tgt == ignore_index:
            lps.append(0.0)
            ents.append(0.0)
            continue
        z = [(softcap * math.tanh(x / softcap) if softcap else x) / temp for x in row]
        top = max(z)
        lse = top + math.log(sum(math.exp(v - top) for v in z))
        lps.append(z[tgt] - lse)
        ents.append(-sum(math.exp(v - lse) * (v - lse) for v in z))
    shape = targets.shape
    return torch.tensor(lps, dtype=torch.float64).view(shape), torch.tensor(ents, dtype=torch.float64).view(shape)


def reference(logits, targets, temperature=1.0, softcap=None, ignore_index=-100, dtype=torch.float64):
    """log_softmax + gather computed in ``dtype`` (float64: the reference; the logits'
    own dtype: what eager PyTorch users get). Differentiable."""
    z = logits.to(dtype)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    if isinstance(temperature, torch.Tensor):
        z = z / temperature.to(dtype).unsqueeze(-1)
    else:
        z = z / temperature
    log_p = z.log_softmax(-1)
    keep = targets != ignore_index
    lp = log_p.gather(-1, targets.clamp(min=0).long().unsqueeze(-1)).squeeze(-1)
    p = log_p.exp()
    # 0 * log 0 = 0, with a gradient that stays finite where p = 0 (-inf logits)
    ent = -(p * torch.where(p > 0, log_p, 0.0)).sum(-1)
    return torch.where(keep, lp, 0.0), torch.where(keep, ent, 0.0)


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def check_against_reference(logits, targets, backend, temperature=1.0, softcap=None, ignore_index=-100):
    """Forward and gradient of both outputs against the float64 reference.

    fp32 must be within 1e-5 relative; bf16/fp16 may be no further from the reference
    than eager PyTorch in the same dtype, plus a small slack.
    """
    kw = dict(temperature=temperature, softcap=softcap, ignore_index=ignore_index)
    x = logits.detach().requires_grad_()
    lp, ent = token_logprobs(x, targets, return_entropy=True, backend=backend, **kw)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    assert lp.shape == targets.shape and ent.shape == targets.shape
    g_lp = torch.randn(targets.shape, dtype=torch.float64, device=logits.device)
    g_ent = torch.randn(targets.shape, dtype=torch.float64, device=logits.device)
    (grad,) = torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), x)
    assert grad.dtype == logits.dtype and grad.shape == logits.shape

    x64 = logits.detach().double().requires_grad_()
    ref_lp, ref_ent = reference(x64, targets, **kw)
    (ref_grad,) = torch.autograd.grad((ref_lp * g_lp).sum() + (ref_ent * g_ent).sum(), x64)

    if logits.dtype in LOW_PRECISION:
        xe = logits.detach().requires_grad_()
        eager_lp, eager_ent = reference(xe, targets, dtype=logits.dtype, **kw)
        (eager_grad,) = torch.autograd.grad(
            (eager_lp * g_lp.to(logits.dtype)).sum() + (eager_ent * g_ent.to(logits.dtype)).sum(), xe
        )
        slack = 1e-3
        assert max_err(lp, ref_lp) <= max_err(eager_lp, ref_lp) + slack
        assert max_err(ent, ref_ent) <= max_err(eager_ent, ref_ent) + slack
        # our gradient is exact in fp32 and then rounded once to the logits' dtype
        ulp = ref_grad.abs().max().item() * torch.finfo(logits.dtype).eps
        assert max_err(grad, ref_grad) <= max(max_err(eager_grad, ref_grad), 2 * ulp) + slack
    else:
        for ours, ref in ((lp, ref_lp), (ent, ref_ent), (grad, ref_grad)):
            scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
            assert max_err(ours, ref) <= 1e-5 * scale


def reference_statistics(logits, targets, temperature=1.0, softcap=None, ignore_index=-100):
    """The ``statistics=`` of token_logprobs by per-element float64 loops: a dict of
    float64 tensors (``is_top1`` bool) of ``targets.shape``; 0 / False where ignored."""
    rows = logits.reshape(-1, logits.shape[-1]).double().tolist()
    tgts = targets.reshape(-1).tolist()
    temps = torch.as_tensor(temperature, dtype=torch.float64).expand(targets.shape).reshape(-1).tolist()
    out = {"log_sum_sq_probs": [], "mean_logit": [], "is_top1": [], "top1_logprob": []}
    for row, tgt, temp in zip(rows, tgts, temps):
        if tgt == ignore_index:
            for values in out.values():
                values.append(0.0)
            continue
        z = [(softcap * math.tanh(x / softcap) if softcap else x) / temp for x in row]
        top = max(z)
        if top == -math.inf:  # every logit -inf: a uniform distribution, token 0 first
            p = [1.0 / len(z)] * len(z)
        else:
            total = sum(math.exp(v - top) for v in z)
            p = [math.exp(v - top) / total for v in z]
        first_max = next(i for i, v in enumerate(z) if v == top)
        out["log_sum_sq_probs"].append(math.log(sum(q * q for q in p)))
        out["mean_logit"].append(sum(z) / len(z))
        out["is_top1"].append(float(tgt == first_max))
        out["top1_logprob"].append(math.log(max(p)))
    result = {name: torch.tensor(values, dtype=torch.float64).view(targets.shape) for name, values in out.items()}
    result["is_top1"] = result["is_top1"].bool()
    return result
