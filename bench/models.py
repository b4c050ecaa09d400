"""How much work each benchmarked op cannot avoid: bytes that must move for the
memory-bound ops, floating-point operations for the hidden-state op.

A kernel's time is compared with the device's limit measured in the same run: the
fraction of the limit reached is ``bytes / time / copy_bandwidth`` (copy bandwidth
counts reads plus writes, as these models do) or ``flops / time / matmul_throughput``.

Every model returns ``{"fwd": ..., "bwd": ..., "fwdbwd": ...}``. Conventions, the same
for every op, so that a kernel that does the minimum reaches 100%:

- each input is read once per pass and each output written once; a pass that needs
  per-row statistics of the other pass (a log-sum-exp saved forward, say) gets them
  for free: they are a few bytes per row against a vocabulary of them;
- token ids are int64 (8 bytes), masks bool (1 byte), log-probs, losses, rewards,
  values and advantages float32 (4 bytes), logits ``itemsize`` bytes;
- the backward pass reads the gradient of each output (4 bytes per element) and
  writes the gradient of each differentiable input in the input's dtype.
"""

from __future__ import annotations

INDEX_BYTES = 8
MASK_BYTES = 1
FLOAT_BYTES = 4


def _passes(fwd: int, bwd: int) -> dict:
    return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd}


def token_logprobs_bytes(n: int, v: int, itemsize: int, entropy: bool = False) -> dict:
    """Log-probs (and entropy) of ``n`` rows of ``v`` logits of ``itemsize`` bytes.

    Forward: the logits and targets read, one (two with entropy) float per row written.
    Backward: the logits and targets read again, one (two) output gradients per row
    read, the logits' gradient written.
    """
    outputs = 2 if entropy else 1
    logits = n * v * itemsize
    fwd = logits + n * INDEX_BYTES + outputs * n * FLOAT_BYTES
    bwd = logits + n * INDEX_BYTES + outputs * n * FLOAT_BYTES + logits
    return _passes(fwd, bwd)


def logits_kl_bytes(n: int, v: int, itemsize: int) -> dict:
    """Full-vocabulary KL of ``n`` rows: both logits tensors read each pass, one float per
    row written forward and read backward, the policy logits' gradient written."""
    logits = n * v * itemsize
    fwd = 2 * logits + n * FLOAT_BYTES
    bwd = 2 * logits + n * FLOAT_BYTES + logits
    return _passes(fwd, bwd)


def linear_logprobs_flops(n: int, h: int, v: int) -> dict:
    """Matmul FLOPs of log-probs from hidden states: ``2 n h v`` forward for the logits,
    twice that backward (the hidden states' and the weight's gradient). Recomputing the
    logits backward, as chunked kernels do, is extra work this model does not count."""
    matmul = 2 * n * h * v
    return _passes(matmul, 2 * matmul)


def linear_loss_flops(n: int, h: int, v: int, reference_head: bool = False) -> dict:
    """Matmul FLOPs of a loss over ``n`` tokens computed from hidden states and the LM
    head: ``linear_logprobs_flops``, plus ``2 n h v`` forward when the loss also runs a
    frozen reference model's head over its own hidden states (no gradient)."""
    flops = linear_logprobs_flops(n, h, v)
    if reference_head:
        return _passes(flops["fwd"] + 2 * n * h * v, flops["bwd"])
    return flops


def policy_loss_bytes(b: int, t: int) -> dict:
    """Clipped surrogate with a KL term over (b, t) tokens: log-probs, old and reference
    log-probs and the mask read, one advantage per sequence; backward reads them again
    and writes the log-probs' gradient. The scalar loss is not counted."""
    tokens = b * t
    reads = tokens * (3 * FLOAT_BYTES + MASK_BYTES) + b * FLOAT_BYTES
    return _passes(reads, reads + tokens * FLOAT_BYTES)


def kl_penalty_bytes(n: int) -> dict:
    """Per-token KL estimate of ``n`` tokens: two inputs read and one output written
    forward; backward reads both inputs and the output gradient and writes the policy
    log-probs' gradient."""
    fwd = 3 * n * FLOAT_BYTES
    bwd = 4 * n * FLOAT_BYTES
    return _passes(fwd, bwd)


def group_advantages_bytes(n: int) -> dict:
    """Group-normalized advantages of ``n`` rewards: read once, written once; no backward."""
    return _passes(2 * n * FLOAT_BYTES, 0)


def gae_bytes(b: int, t: int) -> dict:
    """GAE over (b, t): rewards, values and mask read, advantages and returns written;
    no backward."""
    tokens = b * t
    return _passes(tokens * (2 * FLOAT_BYTES + MASK_BYTES + 2 * FLOAT_BYTES), 0)


def preference_bytes(pairs: int, t: int) -> dict:
    """Sequence log-probs of ``2 * pairs`` padded rows of ``t`` tokens plus the DPO loss:
    forward reads the token log-probs, the mask and one reference log-prob per row and
    writes one loss per pair; backward reads the mask and the loss gradients and writes
    the token log-probs' gradient."""
    rows = 2 * pairs
    tokens = rows * t
    fwd = tokens * (FLOAT_BYTES + MASK_BYTES) + rows * FLOAT_BYTES + pairs * FLOAT_BYTES
    bwd = tokens * (MASK_BYTES + FLOAT_BYTES) + pairs * FLOAT_BYTES
    return _passes(fwd, bwd)


def percent_of_limit(work: float, median_ms: float, limit_per_s: float | None) -> float | None:
    """``work`` (bytes or FLOPs) done in ``median_ms``, as a percentage of ``limit_per_s``
    (bytes/s or FLOP/s); None when there is no limit or no work to compare."""
    if not limit_per_s or not work or median_ms <= 0:
        return None
    return 100.0 * work / (median_ms / 1e3) / limit_per_s
