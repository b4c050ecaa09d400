"""The benchmark suite: every fastpo kernel against eager PyTorch, ``torch.compile`` of
the same eager code, and the peer libraries that are installed.

    python -m fastpo.bench [--quick] [--only NAME[,NAME]] [--device cpu|cuda] [--out DIR] [--[no-]compile]

Besides the op suites below, ``e2e`` (fastpo.bench.e2e) times whole GRPO and DPO
training steps of fastpo's engine against TRL's trainers; it runs in a full run and with
``--only e2e``, not in a plain ``--quick`` run.

Each case (suite, implementation, shape, dtype) runs in a fresh process, which first
checks the implementation's outputs against a float64 reference on the benchmarked
inputs (the first rows for the big row-wise ops) and reports a mismatch or a failure
(a peer that raises, a ``torch.compile`` that does not compile here) as a note instead
of a time. It then times forward, backward and forward+backward separately (median,
20th and 80th percentiles) and measures the peak memory of one forward+backward beyond
the inputs and their gradients. On a GPU the run also measures the copy bandwidth and
the bf16 matmul throughput, and reports each time as a fraction of that limit
(bench/models.py holds the work each op cannot avoid).

bench/bench_suite.py runs the same op cases under pytest-benchmark, from the pieces of
this module. docs/benchmarks.md describes the cases and every column of the outputs.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.metadata
import json
import os
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

from fastpo.bench import e2e, harness, losses, models
from fastpo.bench.peers import discover_peers

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (atol, rtol) of the correctness guard against the float64 reference: fp32 leaves only
# accumulation error; the 16-bit rows include eager code that computes in bf16 itself.
TOLERANCE = {"fp32": (1e-4, 1e-4), "bf16": (0.1, 0.02), "fp16": (0.05, 0.01)}
CHECK_ROWS = 8  # rows checked for the row-wise ops, whose reference on a full GPU shape is huge
PASSES = ("fwd", "bwd", "fwdbwd")
COLUMNS = ["suite", "impl", "kind", "dtype", "shape", "tokens", "pass", "median_ms", "p20_ms", "p80_ms",
           "speedup_vs_eager", "extra_mem_MiB", "pct_of_limit", "note"]

# Vocabularies of real models: Llama-3 8B, Qwen2.5 7B, Gemma-2.
LLAMA3_V, QWEN25_V, GEMMA2_V = 128256, 152064, 256000
LLAMA3_H, QWEN25_H = 4096, 3584
GPU_TOKENS = (4096, 8192, 16384, 32768)


@dataclasses.dataclass(frozen=True)
class Suite:
    """One op family. ``impls(device, peers)`` maps implementation names to factories
    (called only in the child that measures that implementation, so that a peer is
    imported only where it runs); each implementation takes the inputs by keyword and
    returns a tuple of tensors, compared one by one with ``reference`` on float64 copies
    of the inputs."""

    name: str
    shapes: Callable[[str, bool], list[dict]]  # (device, quick) -> shapes, each with "tokens"
    make_inputs: Callable[[dict, torch.dtype, str], dict]
    reference: Callable[..., tuple]
    impls: Callable[[str, set], dict]
    work: Callable[[dict, int], tuple[str, dict]]  # (shape, itemsize) -> ("bytes" | "flops", per pass)
    dtypes: Callable[[str, bool], list[str]] = lambda device, quick: ["fp32"]
    backward: bool = True
    check_rows: tuple[str, ...] = ()  # inputs indexed by row: the guard checks their first rows
    series: tuple[str, ...] = ()  # shape keys other than tokens that tell plot lines apart
    compile: tuple[str, ...] = ("eager",)  # eager implementations also measured under torch.compile

    @property
    def passes(self) -> tuple[str, ...]:
        return PASSES if self.backward else ("fwd",)


def _logit_dtypes(device: str, quick: bool) -> list[str]:
    return ["fp32"] if quick else ["fp32", "bf16"]


def _leaf(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.requires_grad_()


# ------------------------------------------------------------------ token log-probs


def _vocab_shapes(device: str, quick: bool, cpu_tokens=(256, 512, 1024), gpu_tokens=GPU_TOKENS) -> list[dict]:
    if quick:
        return [{"tokens": n, "vocab": 32000} for n in (64, 128)]
    if device == "cuda":
        return [{"tokens": n, "vocab": v} for v in (LLAMA3_V, QWEN25_V, GEMMA2_V) for n in gpu_tokens]
    return [{"tokens": n, "vocab": QWEN25_V} for n in cpu_tokens]


def _logits_inputs(shape: dict, dtype: torch.dtype, device: str) -> dict:
    n, v = shape["tokens"], shape["vocab"]
    logits = (torch.randn(n, v, device=device) * 2).to(dtype)
    return {"logits": _leaf(logits), "targets": torch.randint(0, v, (n,), device=device)}


def _gather(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return logp.gather(-1, targets[:, None]).squeeze(-1)


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    return -(logp.exp() * logp).sum(-1)


def _token_reference(logits, targets):
    return (_gather(logits.log_softmax(-1), targets),)


def _token_entropy_reference(logits, targets):
    logp = logits.log_softmax(-1)
    return _gather(logp, targets), _entropy(logp)


def _token_impls(device: str, peers: set) -> dict:
    from fastpo.kernels import token_logprobs

    impls = {
        # TRL's naive selective_log_softmax, in the logits' dtype, and verl's fp32 upcast
        "eager": lambda: lambda logits, targets: (_gather(logits.log_softmax(-1), targets),),
        "eager_fp32": lambda: lambda logits, targets: (_gather(logits.float().log_softmax(-1), targets),),
    }
    for backend in harness.fastpo_backends(device):
        impls[f"fastpo_{backend}"] = (
            lambda b=backend: lambda logits, targets: (token_logprobs(logits, targets, backend=b),))
    if "trl" in peers:
        def trl():
            from trl.trainer.utils import selective_log_softmax

            return lambda logits, targets: (selective_log_softmax(logits, targets),)

        impls["trl"] = trl
    if "liger" in peers:
        def liger():
            # Liger writes the gradient into the logits during the forward pass.
            from liger_kernel.transformers.functional import liger_cross_entropy

            return lambda logits, targets: (-liger_cross_entropy(logits, targets, reduction="none"),)

        impls["liger"] = liger
    if "flash_attn" in peers:
        def flash_attn():
            from flash_attn.ops.triton.cross_entropy import cross_entropy_loss

            return lambda logits, targets: (-cross_entropy_loss(logits, targets)[0],)

        impls["flash_attn"] = flash_attn
    if "quack" in peers:
        def quack():
            from quack.cross_entropy import cross_entropy

            return lambda logits, targets: (-cross_entropy(logits, targets, reduction="none"),)

        impls["quack"] = quack
    return impls


def _token_entropy_impls(device: str, peers: set) -> dict:
    from fastpo.kernels import token_logprobs

    def eager(logits, targets):  # verl's and TRL's formulation: fp32 log_softmax, then both outputs
        logp = logits.float().log_softmax(-1)
        return _gather(logp, targets), _entropy(logp)

    impls = {"eager": lambda: eager}
    for backend in harness.fastpo_backends(device):
        impls[f"fastpo_{backend}"] = (
            lambda b=backend: lambda logits, targets: token_logprobs(logits, targets, return_entropy=True, backend=b))
    if "trl" in peers:
        def trl():
            from trl.trainer import utils

            if hasattr(utils, "selective_log_softmax_and_entropy"):  # one pass over the logits (newer TRL)
                return lambda logits, targets: utils.selective_log_softmax_and_entropy(logits, targets)
            return lambda logits, targets: (utils.selective_log_softmax(logits, targets),
                                            utils.entropy_from_logits(logits))

        impls["trl"] = trl
    return impls


def _token_work(entropy: bool):
    def work(shape: dict, itemsize: int):
        return "bytes", models.token_logprobs_bytes(shape["tokens"], shape["vocab"], itemsize, entropy)

    return work


# ------------------------------------------------------------ hidden-state log-probs


def _linear_shapes(device: str, quick: bool) -> list[dict]:
    if quick:
        return [{"tokens": n, "hidden": 64, "vocab": 32000} for n in (64, 128)]
    if device == "cuda":
        return [{"tokens": n, "hidden": h, "vocab": v}
                for h, v in ((LLAMA3_H, LLAMA3_V), (QWEN25_H, QWEN25_V)) for n in GPU_TOKENS[:3]]
    return [{"tokens": n, "hidden": 256, "vocab": QWEN25_V} for n in (256, 512, 1024)]


def _linear_inputs(shape: dict, dtype: torch.dtype, device: str) -> dict:
    n, h, v = shape["tokens"], shape["hidden"], shape["vocab"]
    return {
        "hidden": _leaf((torch.randn(n, h, device=device) / h**0.5).to(dtype)),
        "weight": _leaf(torch.randn(v, h, device=device).to(dtype)),
        "targets": torch.randint(0, v, (n,), device=device),
    }


def _linear_reference(hidden, weight, targets):
    return (_gather((hidden @ weight.T).log_softmax(-1), targets),)


def _eager_head_logprobs(hidden, weight, targets):
    """The lm_head matmul, then the fp32 log_softmax at the targets, as trainers run
    them; hidden states (..., H), targets (...)."""
    return (hidden @ weight.T).float().log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)


def _linear_impls(device: str, peers: set) -> dict:
    from fastpo.kernels import linear_token_logprobs

    impls = {
        "eager": lambda: lambda hidden, weight, targets: (_eager_head_logprobs(hidden, weight, targets),),
        "fastpo": lambda: lambda hidden, weight, targets: (linear_token_logprobs(hidden, weight, targets),),
    }
    if "liger" in peers:
        def liger():
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

            return lambda hidden, weight, targets: (
                -liger_fused_linear_cross_entropy(hidden, weight, targets, reduction="none"),)

        impls["liger"] = liger
    if "cut_cross_entropy" in peers:
        def cce():
            from cut_cross_entropy import linear_cross_entropy

            return lambda hidden, weight, targets: (-linear_cross_entropy(hidden, weight, targets, reduction="none"),)

        impls["cut_cross_entropy"] = cce
    return impls


# ---------------------------------------------------------------------- policy loss


def _batch_shapes(device: str, quick: bool, quick_shapes, cpu_shapes, gpu_shapes, first: str = "batch"):
    chosen = quick_shapes if quick else (gpu_shapes if device == "cuda" else cpu_shapes)
    rows = 2 if first == "pairs" else 1  # a pair is two sequences
    return [{first: b, "seq": t, "tokens": rows * b * t} for b, t in chosen]


def _policy_inputs(shape: dict, dtype: torch.dtype, device: str) -> dict:
    lp, old, ref, adv, mask = losses._policy_inputs(shape["batch"], shape["seq"], device)
    return {"lp": lp, "old": old, "ref": ref, "adv": adv, "mask": mask}


def _policy_reference(lp, old, ref, adv, mask):
    loss, metrics = losses.eager_grpo_loss(lp, old, ref, adv, mask)
    return (loss, *metrics)


def _policy_impls(device: str, peers: set) -> dict:
    def eager(lp, old, ref, adv, mask):  # TRL GRPOTrainer's loss and the metrics it logs
        loss, metrics = losses.eager_grpo_loss(lp, old, ref, adv, mask)
        return (loss, *metrics)

    impls = {"eager": lambda: eager}
    for backend in [b for b in harness.fastpo_backends(device) if b in ("torch", "triton")]:
        def fused(b=backend):
            from fastpo.kernels import policy_loss

            def run(lp, old, ref, adv, mask):
                loss, m = policy_loss(lp, old, adv, mask, loss_type="grpo", clip_eps_low=losses.EPS,
                                      ref_logprobs=ref, kl_coef=losses.KL_COEF, backend=b)
                return loss, m["clip_frac_low"], m["clip_frac_high"], m["ref_kl"]

            return run

        impls[f"fastpo_{backend}"] = fused
    return impls


# ------------------------------------------------------------------ KL estimators


def _kl_shapes(device: str, quick: bool) -> list[dict]:
    sizes = (2**14, 2**16) if quick else ((2**20, 2**22, 2**24) if device == "cuda" else (2**18, 2**20, 2**22))
    return [{"tokens": n} for n in sizes]


def _kl_inputs(shape: dict, dtype: torch.dtype, device: str) -> dict:
    n = shape["tokens"]
    lp = torch.randn(n, device=device) * 0.5 - 2.0
    return {"lp": _leaf(lp), "ref": lp.detach() + torch.randn(n, device=device) * 0.1}


def _k3(lp, ref):  # TRL GRPO's estimator of KL(pi || pi_ref)
    return (torch.exp(ref - lp) - (ref - lp) - 1,)


def _kl_impls(device: str, peers: set) -> dict:
    from fastpo.kernels import kl_penalty

    impls = {"eager": lambda: _k3}
    for backend in [b for b in harness.fastpo_backends(device) if b in ("torch", "triton")]:
        impls[f"fastpo_{backend}"] = lambda b=backend: lambda lp, ref: (kl_penalty(lp, ref, "k3", backend=b),)
    return impls


def _logits_kl_inputs(shape: dict, dtype: torch.dtype, device: str) -> dict:
    n, v = shape["tokens"], shape["vocab"]
    logits = torch.randn(n, v, device=device) * 2
    ref = logits + torch.randn(n, v, device=device) * 0.5
    return {"logits": _leaf(logits.to(dtype)), "ref_logits": ref.to(dtype)}


def _full_kl(logits, ref_logits):
    logp, logq = logits.float().log_softmax(-1), ref_logits.float().log_softmax(-1)
    return ((logp.exp() * (logp - logq)).sum(-1),)


def _logits_kl_impls(device: str, peers: set) -> dict:
    from fastpo.kernels import logits_kl

    impls = {"eager": lambda: _full_kl}
    for backend in [b for b in harness.fastpo_backends(device) if b in ("torch", "triton")]:
        impls[f"fastpo_{backend}"] = lambda b=backend: lambda logits, ref_logits: (
            logits_kl(logits, ref_logits, backend=b),)
    return impls


# ----------------------------------------------------------------------- advantages

GROUP_SIZE = 16
TRL_EPS = 1e-4


def _group_shapes(device: str, quick: bool) -> list[dict]:
    sizes = (2**10, 2**12) if quick else ((2**16, 2**20, 2**22) if device == "cuda" else (2**12, 2**16, 2**20))
    return [{"tokens": n, "group_size": GROUP_SIZE} for n in sizes]


def _group_inputs(shape: dict, dtype: torch.dtype, device: str) -> dict:
    return {"rewards": torch.randn(shape["tokens"], device=device)}


def _eager_group(rewards):  # TRL GRPOTrainer, scale_rewards="group"
    grouped = rewards.view(-1, GROUP_SIZE)
    mean = grouped.mean(dim=1).repeat_interleave(GROUP_SIZE)
    std = grouped.std(dim=1).repeat_interleave(GROUP_SIZE)
    return ((rewards - mean) / (std + TRL_EPS),)


def _group_impls(device: str, peers: set) -> dict:
    from fastpo.kernels import group_advantages

    impls = {"eager": lambda: _eager_group}
    for backend in [b for b in harness.fastpo_backends(device) if b in ("torch", "triton")]:
        impls[f"fastpo_{backend}"] = lambda b=backend: lambda rewards: (
            group_advantages(rewards, GROUP_SIZE, eps=TRL_EPS, backend=b),)
    return impls


def _gae_inputs(shape: dict, dtype: torch.dtype, device: str) -> dict:
    b, t = shape["batch"], shape["seq"]
    g = torch.Generator(device="cpu").manual_seed(0)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    return {
        "rewards": torch.randn(b, t, generator=g).to(device),
        "values": torch.randn(b, t, generator=g).to(device),
        "mask": (torch.arange(t)[None, :] < lengths[:, None]).float().to(device),  # right-padded
    }


GAE_GAMMA, GAE_LAM = 1.0, 0.95


def _eager_gae(rewards, values, mask):
    return losses.eager_gae(rewards, values, mask, gamma=GAE_GAMMA, lam=GAE_LAM)


def _gae_impls(device: str, peers: set) -> dict:
    from fastpo.kernels import gae

    impls = {"eager": lambda: _eager_gae}
    for backend in harness.fastpo_backends(device):
        impls[f"fastpo_{backend}"] = lambda b=backend: lambda rewards, values, mask: gae(
            rewards, values, mask, gamma=GAE_GAMMA, lam=GAE_LAM, backend=b)
    return impls


# ----------------------------------------------------------------------- preference


def _preference_inputs(shape: dict, dtype: torch.dtype, device: str) -> dict:
    token_lp, ref, mask, _ = losses._dpo_inputs(shape["pairs"], shape["seq"], device)
    return {"token_lp": token_lp, "ref": ref, "mask": mask}


def _eager_dpo(token_lp, ref, mask):  # masked sums, then TRL's sigmoid DPO loss
    pairs = ref.shape[0] // 2
    seq = (token_lp * mask).sum(-1)
    margin = (seq[:pairs] - ref[:pairs]) - (seq[pairs:] - ref[pairs:])
    return (-F.logsigmoid(losses.BETA * margin),)


def _preference_impls(device: str, peers: set) -> dict:
    from fastpo.kernels import dpo_loss, sequence_logprobs

    impls = {"eager": lambda: _eager_dpo}
    for backend in [b for b in harness.fastpo_backends(device) if b in ("torch", "triton")]:
        def fused(b=backend):
            def run(token_lp, ref, mask):
                pairs = ref.shape[0] // 2
                seq = sequence_logprobs(token_lp, mask, backend=b)
                out, _, _ = dpo_loss(seq[:pairs], seq[pairs:], ref[:pairs], ref[pairs:],
                                     beta=losses.BETA, backend=b)
                return (out,)

            return run

        impls[f"fastpo_{backend}"] = fused
    return impls


# ------------------------------- losses from hidden states (Liger's chunked losses)
# The whole loss from the last hidden states and the LM head: fastpo's linear_* ops,
# the logits then the loss as trainers write it, and Liger-Kernel's chunked losses.


def _head_shapes(device: str, quick: bool) -> list[dict]:
    if quick:
        chosen, (h, v) = [(2, 32), (4, 32)], (64, 32000)
    elif device == "cuda":
        chosen, (h, v) = [(8, 1024), (16, 1024)], (LLAMA3_H, LLAMA3_V)
    else:
        chosen, (h, v) = [(4, 64), (8, 64)], (256, QWEN25_V)
    return [{"seqs": s, "seq": t, "hidden": h, "vocab": v, "tokens": s * t} for s, t in chosen]


@torch.no_grad()
def _head_logprobs(hidden, weight, targets, rows: int = 1024):
    """log_softmax(hidden @ weight.T) at ``targets``, in the inputs' dtype (float64 for
    the references), ``rows`` tokens at a time so that a GPU shape's logits never exist
    whole."""
    flat, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    out = torch.empty(flat_targets.shape, dtype=hidden.dtype, device=hidden.device)
    for start in range(0, flat.shape[0], rows):
        stop = start + rows
        out[start:stop] = _gather((flat[start:stop] @ weight.T).log_softmax(-1), flat_targets[start:stop])
    return out.view(targets.shape)


def _completion_mask(seqs: int, seq: int, device: str) -> torch.Tensor:
    lengths = torch.randint(seq // 4, seq + 1, (seqs,))
    return (torch.arange(seq)[None, :] < lengths[:, None]).to(device)


def _head_inputs(shape: dict, dtype: torch.dtype, device: str) -> dict:
    s, t, h, v = shape["seqs"], shape["seq"], shape["hidden"], shape["vocab"]
    return {
        "hidden": _leaf((torch.randn(s, t, h, device=device) / h**0.5).to(dtype)),
        "weight": _leaf(torch.randn(v, h, device=device).to(dtype)),
        "targets": torch.randint(0, v, (s, t), device=device),
        "mask": _completion_mask(s, t, device),
    }


def _head_work(reference_head: bool):
    def work(shape: dict, itemsize: int):
        return "flops", models.linear_loss_flops(shape["tokens"], shape["hidden"], shape["vocab"], reference_head)

    return work


def _linear_policy_inputs(shape: dict, dtype: torch.dtype, device: str) -> dict:
    inputs = _head_inputs(shape, dtype, device)
    # old and reference log-probs near the current ones; about a third of the ratios
    # leave [0.8, 1.2], so both sides of the clip are exercised
    now = _head_logprobs(inputs["hidden"].float(), inputs["weight"].float(), inputs["targets"])
    return {**inputs, "old": now + 0.2 * torch.randn_like(now), "ref": now + 0.2 * torch.randn_like(now),
            "adv": torch.randn(shape["seqs"], device=device)}


def _linear_policy_reference(hidden, weight, targets, mask, old, ref, adv):
    loss, _ = losses.eager_grpo_loss(_head_logprobs(hidden, weight, targets), old, ref, adv, mask)
    return (loss,)


def _linear_policy_impls(device: str, peers: set) -> dict:
    from fastpo.kernels import linear_policy_loss

    def eager(hidden, weight, targets, mask, old, ref, adv):
        loss, _ = losses.eager_grpo_loss(_eager_head_logprobs(hidden, weight, targets), old, ref, adv, mask)
        return (loss,)

    def fastpo(hidden, weight, targets, mask, old, ref, adv):
        loss, _ = linear_policy_loss(hidden, weight, targets, old, adv, mask, loss_type="grpo",
                                     clip_eps_low=losses.EPS, ref_logprobs=ref, kl_coef=losses.KL_COEF)
        return (loss,)

    impls = {"eager": lambda: eager, "fastpo": lambda: fastpo}
    if "liger_chunked" in peers:
        def liger():
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

            grpo = LigerFusedLinearGRPOLoss(beta=losses.KL_COEF, epsilon_low=losses.EPS, epsilon_high=losses.EPS,
                                            loss_type="grpo", use_ref_model=True)
            return lambda hidden, weight, targets, mask, old, ref, adv: (
                grpo(hidden, weight, targets, mask, adv, ref_per_token_logps=ref, old_per_token_logps=old)[0],)

        impls["liger_chunked"] = liger
    return impls


def _linear_reference_model_inputs(shape: dict, dtype: torch.dtype, device: str) -> dict:
    """A policy head and a frozen reference model's (hidden states near the policy's, a
    perturbed copy of its head), read by a loss that runs both heads every step."""
    inputs = _head_inputs(shape, dtype, device)
    hidden, weight = inputs["hidden"].detach(), inputs["weight"].detach()
    noise = 0.1 * torch.randn(hidden.shape, device=device) / shape["hidden"] ** 0.5
    return {**inputs, "ref_hidden": hidden + noise.to(dtype),
            "ref_weight": weight + (0.1 * torch.randn(weight.shape, device=device)).to(dtype)}


def _masked_sums(token_lp, mask):
    return (token_lp * mask).sum(-1)


def _reference_sums(hidden, weight, targets, mask, ref_hidden, ref_weight):
    """Per-sequence log-probs under the policy and the reference model (float64 inputs)."""
    return (_masked_sums(_head_logprobs(hidden, weight, targets), mask),
            _masked_sums(_head_logprobs(ref_hidden, ref_weight, targets), mask))


def _eager_sums(hidden, weight, targets, mask, ref_hidden, ref_weight):
    """The same through both models' logits, the reference without gradient, as TRL."""
    seq = _masked_sums(_eager_head_logprobs(hidden, weight, targets), mask)
    with torch.no_grad():
        return seq, _masked_sums(_eager_head_logprobs(ref_hidden, ref_weight, targets), mask)


def _fastpo_sums(hidden, weight, targets, mask, ref_hidden, ref_weight):
    """The same with ``linear_preference_logprobs``: neither model's logits exist whole."""
    from fastpo.kernels import linear_preference_logprobs

    seq = linear_preference_logprobs(hidden, weight, targets, mask)
    with torch.no_grad():
        return seq, linear_preference_logprobs(ref_hidden, ref_weight, targets, mask)


def _dpo_of_sums(seq, ref_seq):
    """TRL's sigmoid DPO, mean over pairs; chosen sequences first, then rejected."""
    pairs = seq.shape[0] // 2
    margin = (seq[:pairs] - ref_seq[:pairs]) - (seq[pairs:] - ref_seq[pairs:])
    return -F.logsigmoid(losses.BETA * margin).mean()


def _linear_dpo_reference(**inputs):
    return (_dpo_of_sums(*_reference_sums(**inputs)),)


def _linear_dpo_impls(device: str, peers: set) -> dict:
    from fastpo.kernels import dpo_loss

    def eager(**inputs):
        return (_dpo_of_sums(*_eager_sums(**inputs)),)

    def fastpo(**inputs):
        seq, ref_seq = _fastpo_sums(**inputs)
        pairs = seq.shape[0] // 2
        out, _, _ = dpo_loss(seq[:pairs], seq[pairs:], ref_seq[:pairs], ref_seq[pairs:], beta=losses.BETA)
        return (out.mean(),)

    impls = {"eager": lambda: eager, "fastpo": lambda: fastpo}
    if "liger_chunked" in peers:
        def liger():
            from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

            dpo = LigerFusedLinearDPOLoss(beta=losses.BETA, use_ref_model=True)
            return lambda hidden, weight, targets, mask, ref_hidden, ref_weight: (
                dpo(weight, hidden, targets.masked_fill(~mask, -100), ref_input=ref_hidden, ref_weight=ref_weight)[0],)

        impls["liger_chunked"] = liger
    return impls


def _linear_kto_inputs(shape: dict, dtype: torch.dtype, device: str) -> dict:
    inputs = _linear_reference_model_inputs(shape, dtype, device)
    desirable = torch.arange(shape["seqs"], device=device) % 2 == 0
    # z0, the batch's KL estimate, is computed before the step (from mismatched pairs)
    return {**inputs, "desirable": desirable, "z0": torch.tensor(0.5, device=device)}


def _kto_of_sums(seq, ref_seq, desirable, z0):
    """TRL's KTO with both weights 1, mean over examples."""
    logratio = seq - ref_seq
    return torch.where(desirable, 1 - torch.sigmoid(losses.BETA * (logratio - z0)),
                       1 - torch.sigmoid(losses.BETA * (z0 - logratio))).mean()


def _linear_kto_reference(desirable, z0, **inputs):
    return (_kto_of_sums(*_reference_sums(**inputs), desirable, z0),)


def _linear_kto_impls(device: str, peers: set) -> dict:
    from fastpo.kernels import kto_loss

    def eager(desirable, z0, **inputs):
        return (_kto_of_sums(*_eager_sums(**inputs), desirable, z0),)

    def fastpo(desirable, z0, **inputs):
        seq, ref_seq = _fastpo_sums(**inputs)
        # one mismatched pair whose log-ratio is z0 sets kto_loss's KL estimate to z0
        out, _, _ = kto_loss(seq, ref_seq, desirable, z0[None], torch.zeros_like(z0)[None], beta=losses.BETA)
        return (out.mean(),)

    impls = {"eager": lambda: eager, "fastpo": lambda: fastpo}
    if "liger_chunked" in peers:
        def liger():
            from liger_kernel.chunked_loss import LigerFusedLinearKTOLoss

            kto = LigerFusedLinearKTOLoss(beta=losses.BETA, use_ref_model=True)
            return lambda hidden, weight, targets, mask, ref_hidden, ref_weight, desirable, z0: (
                kto(hidden, weight, targets.masked_fill(~mask, -100), preference_labels=desirable,
                    ref_input=ref_hidden, ref_weight=ref_weight, kl=z0)[0],)

        impls["liger_chunked"] = liger
    return impls


SUITES = {suite.name: suite for suite in (
    Suite("token_logprobs", _vocab_shapes, _logits_inputs, _token_reference, _token_impls, _token_work(False),
          dtypes=_logit_dtypes, check_rows=("logits", "targets"), series=("vocab",)),
    Suite("token_logprobs_entropy", _vocab_shapes, _logits_inputs, _token_entropy_reference,
          _token_entropy_impls, _token_work(True), dtypes=_logit_dtypes, check_rows=("logits", "targets"),
          series=("vocab",)),
    Suite("linear_logprobs", _linear_shapes, _linear_inputs, _linear_reference, _linear_impls,
          lambda s, _: ("flops", models.linear_logprobs_flops(s["tokens"], s["hidden"], s["vocab"])),
          dtypes=_logit_dtypes, check_rows=("hidden", "targets"), series=("hidden", "vocab")),
    Suite("policy_loss",
          lambda d, q: _batch_shapes(d, q, [(16, 256), (32, 256)], [(64, 1024), (256, 1024), (512, 1024)],
                                     [(128, 1024), (512, 1024), (1024, 4096)]),
          _policy_inputs, _policy_reference, _policy_impls,
          lambda s, _: ("bytes", models.policy_loss_bytes(s["batch"], s["seq"]))),
    Suite("kl_penalty", _kl_shapes, _kl_inputs, _k3, _kl_impls,
          lambda s, _: ("bytes", models.kl_penalty_bytes(s["tokens"]))),
    Suite("logits_kl", lambda d, q: _vocab_shapes(d, q, cpu_tokens=(128, 256, 512), gpu_tokens=GPU_TOKENS[:3]),
          _logits_kl_inputs, _full_kl, _logits_kl_impls,
          lambda s, itemsize: ("bytes", models.logits_kl_bytes(s["tokens"], s["vocab"], itemsize)),
          dtypes=_logit_dtypes, check_rows=("logits", "ref_logits"), series=("vocab",)),
    Suite("group_advantages", _group_shapes, _group_inputs, _eager_group, _group_impls,
          lambda s, _: ("bytes", models.group_advantages_bytes(s["tokens"])), backward=False),
    Suite("gae",
          lambda d, q: _batch_shapes(d, q, [(16, 128), (32, 128)], [(64, 512), (256, 1024)],
                                     [(512, 1024), (1024, 4096)]),
          _gae_inputs, _eager_gae, _gae_impls,
          lambda s, _: ("bytes", models.gae_bytes(s["batch"], s["seq"])), backward=False,
          compile=()),  # torch.compile unrolls the loop over time steps: minutes of compilation
    Suite("preference",
          lambda d, q: _batch_shapes(d, q, [(4, 256), (8, 256)], [(16, 1024), (64, 1024), (64, 4096)],
                                     [(64, 4096), (128, 4096), (256, 4096)], first="pairs"),
          _preference_inputs, _eager_dpo, _preference_impls,
          lambda s, _: ("bytes", models.preference_bytes(s["pairs"], s["seq"]))),
    Suite("linear_policy_loss", _head_shapes, _linear_policy_inputs, _linear_policy_reference,
          _linear_policy_impls, _head_work(False), dtypes=_logit_dtypes, series=("hidden", "vocab")),
    Suite("linear_dpo", _head_shapes, _linear_reference_model_inputs, _linear_dpo_reference, _linear_dpo_impls,
          _head_work(True), dtypes=_logit_dtypes, series=("hidden", "vocab")),
    Suite("linear_kto", _head_shapes, _linear_kto_inputs, _linear_kto_reference, _linear_kto_impls,
          _head_work(True), dtypes=_logit_dtypes, series=("hidden", "vocab")),
)}
# every name --only accepts: the op suites, then the end-to-end training steps
NAMES = (*SUITES, e2e.NAME)


# ------------------------------------------------------------------ one case, in a child


def kind_of(impl: str) -> str:
    if impl.startswith("compile:"):
        return "compile"
    for kind in ("eager", "fastpo"):
        if impl.startswith(kind):
            return kind
    return "peer"


def make_implementation(suite: Suite, impl: str, device: str, peers: set):
    """The function ``impl`` names (``compile:NAME``: ``torch.compile`` of NAME's)."""
    name = impl.removeprefix("compile:")
    fn = suite.impls(device, peers)[name]()
    return torch.compile(fn) if impl.startswith("compile:") else fn


def make_case_inputs(suite: Suite, shape: dict, dtype: str, device: str) -> dict:
    """The inputs of one case, the same in every process that measures it."""
    torch.manual_seed(0)
    return suite.make_inputs(shape, DTYPES[dtype], device)


def differentiable_inputs(suite: Suite, inputs: dict) -> list[torch.Tensor]:
    """The inputs the backward pass computes gradients of; none for ops without one."""
    return [v for v in inputs.values() if v.requires_grad] if suite.backward else []


@dataclasses.dataclass(frozen=True)
class CasePasses:
    """What each timed pass of a case runs, over the same inputs every call."""

    forward: Callable[[], tuple]  # fwd, with autograd recording, as in training
    forward_loss: Callable[[], torch.Tensor]  # the untimed forward before each timed backward
    backward: Callable[[torch.Tensor], None]  # bwd, from forward_loss's scalar
    step: Callable[[], None]  # fwdbwd


def case_passes(fn, inputs: dict, leaves: list[torch.Tensor]) -> CasePasses:
    def forward():
        return fn(**inputs)

    def forward_loss():
        return sum(o.float().sum() for o in forward() if o.requires_grad)

    def backward(loss):
        loss.backward()
        for leaf in leaves:  # dropped, not accumulated: every call allocates them as training does
            leaf.grad = None

    def step():
        backward(forward_loss())

    return CasePasses(forward, forward_loss, backward, step)


def check_outputs(suite: Suite, inputs: dict, outputs: tuple, dtype: str) -> str | None:
    """Why ``outputs`` disagree with the float64 reference on ``inputs``, or None."""
    def as_reference(name, value):
        if name in suite.check_rows:
            value = value[:CHECK_ROWS]
        return value.detach().double() if value.is_floating_point() else value

    with torch.no_grad():
        expected = suite.reference(**{k: as_reference(k, v) for k, v in inputs.items()})
    if len(outputs) != len(expected):
        return f"{len(outputs)} outputs, the reference has {len(expected)}"
    atol, rtol = TOLERANCE[dtype]
    for i, (got, want) in enumerate(zip(outputs, expected)):
        got = got.detach()[:CHECK_ROWS] if suite.check_rows else got.detach()
        if got.shape != want.shape:
            return f"output {i} has shape {tuple(got.shape)}, the reference {tuple(want.shape)}"
        error = (got.double() - want).abs()
        if not bool(((error - rtol * want.abs()) <= atol).all()):  # NaN fails too
            return f"output {i}: max |error| {error.max().item():.3g} vs float64 (atol {atol}, rtol {rtol})"
    return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}"


def child(args: dict) -> dict:
    """One case in a fresh process: guard, then times per pass, then peak extra memory."""
    suite, impl, device, dtype = SUITES[args["suite"]], args["impl"], args["device"], args["dtype"]
    reps = args.get("reps", 5 if device == "cpu" else 20)
    if args.get("threads"):
        torch.set_num_threads(args["threads"])
    inputs = make_case_inputs(suite, args["shape"], dtype, device)
    leaves = differentiable_inputs(suite, inputs)
    try:
        fn = make_implementation(suite, impl, device, set(args.get("peers", ())))
        outputs = tuple(fn(**inputs))  # the first call compiles, for torch.compile
    except Exception as error:  # a peer or a compiler that fails here is a note, not a crash
        what = "torch.compile failed" if impl.startswith("compile:") else "failed"
        return {"error": f"{what}: {_first_line(error)}"}
    # checked against inputs made afresh: Liger's cross entropy writes its gradient into the logits
    mismatch = check_outputs(suite, make_case_inputs(suite, args["shape"], dtype, device), outputs, dtype)
    if mismatch:
        return {"error": "not timed: " + mismatch}
    del outputs

    passes = case_passes(fn, inputs, leaves)
    timings = {}
    if leaves:
        try:
            passes.step()  # compiles the backward graph; pages in code and thread pools
        except Exception as error:
            return {"error": f"backward failed: {_first_line(error)}"}
        timings["fwd"] = harness.time_fn(passes.forward, device, reps=reps)
        timings["bwd"] = harness.time_after_setup(passes.forward_loss, passes.backward, device, reps=reps)
        timings["fwdbwd"] = harness.time_fn(passes.step, device, reps=reps)
        measured = passes.step
    else:
        timings["fwd"] = harness.time_fn(passes.forward, device, reps=reps)
        measured = passes.forward
    grad_bytes = sum(leaf.numel() * leaf.element_size() for leaf in leaves)
    extra = harness.measure_peak_extra(lambda: measured, device)  # last: it changes the allocator
    return {"timings": {k: dataclasses.asdict(t) for k, t in timings.items()},
            "extra_bytes": max(0, extra - grad_bytes)}


# ------------------------------------------------------------------------ the run


def implementation_names(suite: Suite, device: str, peers: set, compile: bool) -> list[str]:
    names = list(suite.impls(device, peers))
    if compile:
        names += [f"compile:{name}" for name in suite.compile if name in names]
    return names


def shape_text(shape: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in shape.items() if k != "tokens")


def case_rows(suite: Suite, impl: str, shape: dict, dtype: str, result: dict, limits: dict) -> list[dict]:
    """The table rows of one measured case: one per pass, or one note row."""
    base = {"suite": suite.name, "impl": impl, "kind": kind_of(impl), "dtype": dtype,
            "shape": shape_text(shape), "tokens": shape["tokens"],
            "series": ",".join(f"{k}={shape[k]}" for k in suite.series)}  # plot lines, not a column
    if "error" in result:
        return [{**base, "note": result["error"]}]
    unit, work = suite.work(shape, DTYPES[dtype].itemsize)
    limit = limits.get("copy_bandwidth" if unit == "bytes" else "matmul_flops")
    main_pass = "fwdbwd" if "fwdbwd" in result["timings"] else "fwd"
    rows = []
    for pass_name, timing in result["timings"].items():
        row = {**base, "pass": pass_name, **timing}
        percent = models.percent_of_limit(work[pass_name], timing["median_ms"], limit)
        if percent is not None:
            row["pct_of_limit"] = percent
        if pass_name == main_pass:
            row["extra_mem_MiB"] = result["extra_bytes"] / 2**20
        rows.append(row)
    return rows


def add_speedups(rows: list[dict]) -> None:
    """speedup_vs_eager = eager's median / this median, for the same case and pass."""
    eager = {(r["suite"], r["dtype"], r["shape"], r["tokens"], r["pass"]): r["median_ms"]
             for r in rows if r.get("impl") == "eager" and "median_ms" in r}
    for row in rows:
        key = (row.get("suite"), row.get("dtype"), row.get("shape"), row.get("tokens"), row.get("pass"))
        if key in eager and row.get("median_ms"):
            row["speedup_vs_eager"] = eager[key] / row["median_ms"]


def environment(device: str, limits: dict, peers: dict) -> dict:
    env = harness.environment(device)
    try:
        env["fastpo"] = importlib.metadata.version("fastpo")
    except importlib.metadata.PackageNotFoundError:
        env["fastpo"] = "not installed"
    env["time"] = time.strftime("%H:%M:%S %Z")
    if "copy_bandwidth" in limits:
        env["copy_bandwidth_GBps"] = round(limits["copy_bandwidth"] / 1e9, 1)
    if "matmul_flops" in limits:
        env["bf16_matmul_TFLOPs"] = round(limits["matmul_flops"] / 1e12, 1)
    env["peers"] = " ".join(name for name, status in peers.items() if status["available"]) or "none"
    return env


def write_csv(rows: list[dict], env: dict, path: str) -> None:
    """Every row with every column of COLUMNS, then the environment stamp on each row."""
    stamp = {key: env[key] for key in env}
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS + list(stamp), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**{k: ("" if row.get(k) is None else row[k]) for k in COLUMNS}, **stamp})


def markdown_report(rows: list[dict], env: dict, peers: dict, notes: list[str]) -> str:
    """The stamp, one table per suite (the peers' status last) and the run's notes."""
    lines = ["# fastpo benchmark suite", "", ", ".join(f"{k}: {v}" for k, v in env.items()), ""]
    suites = list(dict.fromkeys(row["suite"] for row in rows))
    for name in suites:
        lines += [f"## {name}", "", harness.markdown_table([r for r in rows if r["suite"] == name], COLUMNS[1:]), ""]
    peer_rows = [{"peer": name, "available": status["available"], "module": status["module"],
                  "note": status["note"]} for name, status in peers.items()]
    if peer_rows:
        lines += ["## peers", "", harness.markdown_table(peer_rows, ["peer", "available", "module", "note"]), ""]
    if notes:
        lines += ["## notes", ""] + [f"- {note}" for note in notes] + [""]
    return "\n".join(lines)


def write_plots(rows: list[dict], out_dir: str, stem: str) -> tuple[list[str], str | None]:
    """Time and peak extra memory against tokens, one line per implementation, one PNG
    per suite, dtype and series; returns (paths, note): the note says why there are none."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "plots skipped: matplotlib is not installed (pip install matplotlib, or .[bench])"
    # the main pass of each case; not the e2e rows (one point per implementation)
    measured = [r for r in rows if "median_ms" in r and "extra_mem_MiB" in r and r.get("plot", True)]
    groups: dict[tuple, list[dict]] = {}
    for row in measured:
        groups.setdefault((row["suite"], row["dtype"], row.get("series", "")), []).append(row)
    paths = []
    for (suite, dtype, series), group in groups.items():
        fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4))
        for impl in dict.fromkeys(r["impl"] for r in group):
            points = sorted((r["tokens"], r["median_ms"], r["extra_mem_MiB"]) for r in group if r["impl"] == impl)
            tokens = [p[0] for p in points]
            ax_time.plot(tokens, [p[1] for p in points], marker="o", label=impl)
            ax_mem.plot(tokens, [p[2] for p in points], marker="o", label=impl)
        pass_name = group[0]["pass"]
        ax_time.set(xlabel="tokens", ylabel=f"{pass_name} median time (ms)", xscale="log", yscale="log")
        ax_mem.set(xlabel="tokens", ylabel="peak extra memory (MiB)", xscale="log")
        ax_time.legend(fontsize="small")
        fig.suptitle(f"{suite} {dtype} {series}".strip())
        fig.tight_layout()
        suffix = "-" + series.replace(",", "-").replace("=", "") if series else ""
        path = os.path.join(out_dir, f"{stem}-{suite}-{dtype}{suffix}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths, None


def run(device: str, quick: bool, only: list[str] | None, out_dir: str | None, compile: bool = True,
        reps: int | None = None, threads: int | None = None) -> list[dict]:
    peers = discover_peers(device)
    available = sorted(name for name, status in peers.items() if status["available"])
    limits = {}
    if device == "cuda":
        limits = {"copy_bandwidth": harness.copy_bandwidth(device), "matmul_flops": harness.matmul_throughput(device)}
    rows: list[dict] = []
    for suite in SUITES.values():
        if only and suite.name not in only:
            continue
        for dtype in suite.dtypes(device, quick):
            for shape in suite.shapes(device, quick):
                for impl in implementation_names(suite, device, set(available), compile):
                    args = {"suite": suite.name, "impl": impl, "shape": shape, "dtype": dtype,
                            "device": device, "peers": available}
                    if reps:
                        args["reps"] = reps
                    if threads:
                        args["threads"] = threads
                    try:
                        result = harness.run_child("fastpo.bench", args)
                    except (RuntimeError, ValueError) as error:  # a crashed child: a note row
                        last = str(error).strip().splitlines()[-1:] or [""]
                        result = {"error": f"child process failed: {last[0][:200]}"}
                    new_rows = case_rows(suite, impl, shape, dtype, result, limits)
                    for row in new_rows:
                        print(json.dumps(row), file=sys.stderr)
                    rows += new_rows
    e2e_notes = []
    if e2e.selected(only, quick):
        e2e_rows, e2e_notes = e2e.run(device, peers, reps=reps, threads=threads, quick=quick)
        rows += e2e_rows
    add_speedups(rows)
    env = environment(device, limits, peers)
    if threads:
        env["threads"] = threads  # the children's, not this process's
    notes = [f"peer {name} skipped: {status['note']}" for name, status in peers.items() if not status["available"]]
    notes += e2e_notes
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        stem = f"fastpo-bench-{device}-{time.strftime('%Y%m%d-%H%M%S')}"
        write_csv(rows, env, os.path.join(out_dir, stem + ".csv"))
        plots, plot_note = write_plots(rows, out_dir, stem)
        if plot_note:
            notes.append(plot_note)
        report = markdown_report(rows, env, peers, notes)
        with open(os.path.join(out_dir, stem + ".md"), "w") as f:
            f.write(report)
        print(f"wrote {stem}.csv, {stem}.md and {len(plots)} plot(s) to {out_dir}", file=sys.stderr)
    else:
        report = markdown_report(rows, env, peers, notes)
    print(report)
    return rows
