"""The loss kernels against eager PyTorch as trainers write them.

    python -m fastpo.bench.losses [--quick] [--device cpu|cuda] [--out DIR]

Cases (forward+backward where there is a gradient):
- policy_loss: fastpo's fused clipped surrogate (loss_type="grpo", per-sequence
  advantages, k3 KL to a reference) against the eager chain of ops TRL's GRPOTrainer
  runs, with the clip-fraction and KL metrics it logs, at (B, T) in {(512, 1024),
  (1024, 4096)};
- policy_loss_types: fastpo's policy_loss for each loss type of ``POLICY_LOSSES``
  (same inputs and KL term as policy_loss) against its own ``grpo``: the cost of each
  objective relative to the default one (``time_vs_grpo``);
- gae: fastpo's gae (torch, Triton on a GPU, native where it is built) against the
  reverse Python loop over time steps that TRL's PPO trainer and OpenRLHF use;
- dpo: summing padded (and packed) token log-probs per sequence plus the DPO sigmoid
  loss, against eager masked sums and ``-logsigmoid``, at B = 64 pairs, T = 4096.

Reported: median time with 20th/80th percentiles, on the CPU also the median CPU time of
the process (``cpu_ms``, ``cpu_vs_grpo``: on a machine shared with other jobs, wall time
includes the time the process waits for a core), ``interleaved_vs_grpo`` (the loss type's
steps alternated with ``grpo``'s in one process, CPU time on the CPU: the steadiest of the
ratios), peak extra memory (in a fresh process on the CPU), and the number of operator
calls (kernel launches on a GPU) counted by the PyTorch profiler.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

from fastpo.bench import harness

KL_COEF = 0.04
EPS = 0.2
BETA = 0.1


def _policy_inputs(b, t, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    lp = (torch.randn(b, t, generator=g) * 0.1 - 1.0).to(device).requires_grad_()
    old = (lp.detach() + torch.randn(b, t, generator=g).to(device) * 0.05)
    ref = (lp.detach() + torch.randn(b, t, generator=g).to(device) * 0.05)
    adv = torch.randn(b, generator=g).to(device)
    lengths = torch.randint(t // 4, t + 1, (b,), generator=g).to(device)
    mask = torch.arange(t, device=device)[None, :] < lengths[:, None]
    return lp, old, ref, adv, mask


def eager_grpo_loss(lp, old, ref, adv, mask):
    """TRL GRPOTrainer's loss_type="grpo" with beta > 0, as eager ops."""
    d = ref - lp
    kl = torch.exp(d) - d - 1
    ratio = torch.exp(lp - old)
    clipped = torch.clamp(ratio, 1 - EPS, 1 + EPS)
    per_token = -torch.min(ratio * adv[:, None], clipped * adv[:, None]) + KL_COEF * kl
    mask = mask.float()
    loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    with torch.no_grad():  # the metrics TRL logs every step (fastpo's policy_loss returns them too)
        n = mask.sum().clamp(min=1.0)
        low = ((ratio < 1 - EPS) & (adv[:, None] < 0)).float()
        high = ((ratio > 1 + EPS) & (adv[:, None] > 0)).float()
        metrics = [(low * mask).sum() / n, (high * mask).sum() / n, (kl * mask).sum() / n]
    return loss, metrics


def fastpo_grpo_loss(lp, old, ref, adv, mask):
    from fastpo.kernels import policy_loss

    return policy_loss(lp, old, adv, mask, loss_type="grpo", clip_eps_low=EPS,
                       ref_logprobs=ref, kl_coef=KL_COEF)


# Options a loss type needs besides its name (the others run with the defaults).
LOSS_TYPE_OPTIONS = {"dro": {"dro_beta": 0.1}}


def fastpo_loss_type(loss_type: str):
    from fastpo.kernels import POLICY_LOSSES, policy_loss

    def loss_fn(lp, old, ref, adv, mask):
        options = dict(LOSS_TYPE_OPTIONS.get(loss_type, {}))
        if POLICY_LOSSES.get(loss_type).params["agg"] == "seq-mean-token-sum-norm":  # dr_grpo's length normalizer
            options["max_len"] = lp.shape[1]
        return policy_loss(lp, old, adv, mask, loss_type=loss_type, clip_eps_low=EPS, ref_logprobs=ref,
                           kl_coef=KL_COEF, **options)

    return loss_fn


def eager_gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """The reverse loop over time steps of TRL's PPO trainer (right-padded masks)."""
    rewards, values = rewards * mask, values * mask
    last = torch.zeros_like(rewards[:, 0])
    advantages = []
    t_len = rewards.shape[1]
    for t in reversed(range(t_len)):
        next_value = values[:, t + 1] if t < t_len - 1 else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages.append(last)
    advantages = torch.stack(advantages[::-1], dim=1) * mask
    return advantages, advantages + values


def _dpo_inputs(b, t, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    token_lp = (torch.randn(2 * b, t, generator=g) * 0.1 - 2.0).to(device).requires_grad_()
    ref = (torch.randn(2 * b, generator=g) - 2.0 * t / 2).to(device)
    lengths = torch.randint(1, t + 1, (2 * b,), generator=g).to(device)
    mask = torch.arange(t, device=device)[None, :] < lengths[:, None]
    return token_lp, ref, mask, lengths


def case_step(name: str, impl: str, shape: tuple, device: str):
    """The function one timing repetition calls."""
    if name in ("policy_loss", "policy_loss_types"):
        lp, old, ref, adv, mask = _policy_inputs(*shape, device)
        if name == "policy_loss_types":
            fn = fastpo_loss_type(impl)
        else:
            fn = eager_grpo_loss if impl == "eager" else fastpo_grpo_loss

        def step():
            loss, _ = fn(lp, old, ref, adv, mask)
            loss.backward()
            lp.grad = None

        return step
    if name == "gae":
        b, t = shape
        g = torch.Generator(device="cpu").manual_seed(0)
        rewards, values = torch.randn(b, t, generator=g).to(device), torch.randn(b, t, generator=g).to(device)
        lengths = torch.randint(1, t + 1, (b,), generator=g).to(device)
        mask = (torch.arange(t, device=device)[None, :] < lengths[:, None]).float()
        if impl == "eager":
            return lambda: eager_gae(rewards, values, mask)
        from fastpo.kernels import gae

        backend = {"fastpo_torch": "torch", "fastpo_triton": "triton",
                   "fastpo_native": "cuda" if device == "cuda" else "cpp"}[impl]
        return lambda: gae(rewards, values, mask, gamma=1.0, lam=0.95, backend=backend)
    if name == "dpo":
        from fastpo.kernels import dpo_loss, sequence_logprobs

        b, t = shape
        token_lp, ref, mask, lengths = _dpo_inputs(b, t, device)
        if impl == "eager":
            def losses():
                seq = (token_lp * mask).sum(-1)
                h = (seq[:b] - ref[:b]) - (seq[b:] - ref[b:])
                return -F.logsigmoid(BETA * h)
        else:
            packed_mode = impl == "fastpo_packed"
            if packed_mode:
                cu = torch.zeros(2 * b + 1, dtype=torch.int32, device=device)
                cu[1:] = lengths.cumsum(0)
                packed = token_lp.detach()[mask].requires_grad_()

            def losses():
                if packed_mode:
                    seq = sequence_logprobs(packed, cu_seqlens=cu)
                else:
                    seq = sequence_logprobs(token_lp, mask)
                out, _, _ = dpo_loss(seq[:b], seq[b:], ref[:b], ref[b:], beta=BETA)
                return out

        def step():
            losses().mean().backward()
            token_lp.grad = None
            if impl == "fastpo_packed":
                packed.grad = None

        return step
    raise ValueError(f"unknown case {name!r}")


def _loss_types() -> list[str]:
    from fastpo.kernels import POLICY_LOSSES

    return list(POLICY_LOSSES.names())


CASES = {
    "policy_loss": ([(512, 1024), (1024, 4096)], ["eager", "fastpo"]),
    "policy_loss_types": ([(512, 1024)], _loss_types()),
    "gae": ([(512, 1024), (1024, 4096)], ["eager", "fastpo_torch", "fastpo_triton", "fastpo_native"]),
    "dpo": ([(64, 4096)], ["eager", "fastpo", "fastpo_packed"]),
}
# The implementation each case's others are compared with (default "eager": speedup_vs_eager).
BASELINE = {"policy_loss_types": "grpo"}
QUICK = {"policy_loss": [(64, 256)], "policy_loss_types": [(64, 1024)], "gae": [(64, 256)], "dpo": [(8, 512)]}


def runs_on(impl: str, device: str) -> bool:
    """Whether ``impl`` has a backend on ``device``: fastpo's Triton and native rows only
    where ``harness.fastpo_backends`` lists that backend."""
    backend = {"fastpo_triton": "triton", "fastpo_native": "cuda" if device == "cuda" else "cpp"}.get(impl)
    return backend is None or backend in harness.fastpo_backends(device)


def count_ops(step, device: str) -> int:
    """Operator calls on the CPU, kernel launches on a GPU, in one call of ``step``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if device == "cuda":
            torch.cuda.synchronize()
    events = prof.events()
    if device == "cuda":
        return sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)

    def top_level_op(event) -> bool:  # an aten op not called from inside another one
        parent = event.cpu_parent
        return event.name.startswith("aten::") and (parent is None or not parent.name.startswith("aten::"))

    return sum(1 for e in events if top_level_op(e))


def child(args: dict) -> dict:
    step = case_step(args["case"], args["impl"], tuple(args["shape"]), args["device"])
    step()  # pages in code and thread pools
    timing = harness.time_fn(step, args["device"], warmup=0, reps=10, max_seconds=20)
    result = {"median_ms": timing.median_ms, "p20_ms": timing.p20_ms, "p80_ms": timing.p80_ms}
    if args["device"] == "cpu":  # CPU time: steadier than wall time on a shared machine
        result["cpu_ms"] = harness.time_fn(step, "cpu", warmup=0, reps=10, max_seconds=20,
                                           clock=time.process_time).median_ms
    baseline = BASELINE.get(args["case"])
    if baseline is not None and args["impl"] != baseline:
        base_step = case_step(args["case"], baseline, tuple(args["shape"]), args["device"])
        base_step()
        result["interleaved_ratio"] = harness.interleaved_ratio(step, base_step, args["device"])
    result["ops"] = count_ops(step, args["device"])
    result["extra_bytes"] = harness.measure_peak_extra(lambda: step, args["device"])  # last: it changes the allocator
    return result


def run(device: str, quick: bool, only: str | None, out_dir: str | None) -> list[dict]:
    rows = []
    for name, (shapes, impls) in CASES.items():
        if only and name != only:
            continue
        baseline = BASELINE.get(name, "eager")
        for shape in (QUICK[name] if quick else shapes):
            base = None
            for impl in [impl for impl in impls if runs_on(impl, device)]:
                result = harness.run_child("fastpo.bench.losses",
                                           {"case": name, "impl": impl, "shape": list(shape), "device": device})
                row = {"case": name, "impl": impl, "shape": "x".join(map(str, shape)),
                       "median_ms": result["median_ms"], "p20_ms": result["p20_ms"],
                       "p80_ms": result["p80_ms"], "extra_mem_MiB": result["extra_bytes"] / 2**20,
                       "ops": result["ops"]}
                if "cpu_ms" in result:
                    row["cpu_ms"] = result["cpu_ms"]
                if impl == baseline:
                    base = result
                elif base and baseline == "eager":
                    row["speedup_vs_eager"] = base["median_ms"] / result["median_ms"]
                elif base:
                    row[f"time_vs_{baseline}"] = result["median_ms"] / base["median_ms"]
                    if "cpu_ms" in result:
                        row[f"cpu_vs_{baseline}"] = result["cpu_ms"] / base["cpu_ms"]
                if "interleaved_ratio" in result:
                    row[f"interleaved_vs_{baseline}"] = result["interleaved_ratio"]
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
    env = harness.environment(device)
    columns = ["case", "impl", "shape", "median_ms", "p20_ms", "p80_ms", "cpu_ms", "speedup_vs_eager",
               "time_vs_grpo", "cpu_vs_grpo", "interleaved_vs_grpo", "extra_mem_MiB", "ops"]
    harness.report("loss kernels, forward+backward", rows, columns, env, out_dir, "losses")
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes (CI)")
    parser.add_argument("--only", choices=sorted(CASES), default=None)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="directory for the CSV and Markdown table")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    run(args.device, args.quick, args.only, args.out)


if __name__ == "__main__":
    main()
