"""Run under ``torchrun --nproc-per-node 2`` (gloo, CPU) by tests/test_vocab_parallel_logprobs.py:
each rank holds half of the vocabulary; the sharded log-probs, entropy and gradients
must equal the unsharded op's on the same inputs (the gradient: this rank's columns)."""

import torch
import torch.distributed as dist

from fastpo.kernels import linear_token_logprobs, token_logprobs


def check(name, got, want, tol):
    err = (got.double() - want.double()).abs().max().item() if want.numel() else 0.0
    assert err <= tol, f"rank {dist.get_rank()} {name}: max error {err:.3g} > {tol}"


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    for backend in ("torch", "triton"):
        for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-6)):
            for softcap in (None, 5.0):
                torch.manual_seed(0)  # the same full inputs on every rank
                shard = 7
                logits = (torch.randn(3, 5, world * shard, dtype=torch.float64) * 3).to(dtype)
                logits[0, 1, :shard] = float("-inf")  # a shard whose row is all -inf
                targets = torch.randint(0, world * shard, (3, 5))
                targets[1, 2] = -100
                temp = torch.rand(3, 1, dtype=dtype) + 0.5
                g_lp, g_h = torch.randn(2, 3, 5, dtype=torch.float64)
                g_lp[0, 1] = 0.0  # its target may be on the -inf shard: log-prob -inf
                full = logits.clone().requires_grad_()
                lp, ent = token_logprobs(full, targets, temperature=temp, softcap=softcap, return_entropy=True,
                                         backend=backend)
                finite = torch.isfinite(lp)
                (want_grad,) = torch.autograd.grad((lp.where(finite, 0.0) * g_lp).sum() + (ent * g_h).sum(), full)
                mine = logits[..., rank * shard : (rank + 1) * shard].clone().requires_grad_()
                got_lp, got_ent = token_logprobs(mine, targets, temperature=temp, softcap=softcap,
                                                 return_entropy=True, process_group=group, backend=backend)
                (got_grad,) = torch.autograd.grad((got_lp.where(finite, 0.0) * g_lp).sum() + (got_ent * g_h).sum(),
                                                  mine)
                label = f"{backend} {dtype} softcap={softcap}"
                assert torch.equal(torch.isfinite(got_lp), finite), label
                check(f"{label} logprobs", got_lp[finite], lp[finite], tol)
                check(f"{label} entropy", got_ent, ent, tol)
                check(f"{label} grad", got_grad, want_grad[..., rank * shard : (rank + 1) * shard], tol)
                got_only = token_logprobs(mine, targets, temperature=temp, softcap=softcap, process_group=group,
                                          backend=backend)
                check(f"{label} logprobs without entropy", got_only[finite], lp[finite], tol)
        for bias in (False, True):
            torch.manual_seed(1)
            n, h, shard = 11, 6, 9
            hidden = torch.randn(n, h, dtype=torch.float64)
            weight = torch.randn(world * shard, h, dtype=torch.float64)
            b = torch.randn(world * shard, dtype=torch.float64) if bias else None
            targets = torch.randint(0, world * shard, (n,))
            targets[3] = -100
            g_lp, g_h = torch.randn(2, n, dtype=torch.float64)
            params = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
            params += [b.clone().requires_grad_()] if bias else []
            lp, ent = linear_token_logprobs(params[0], params[1], targets, bias=params[2] if bias else None,
                                            temperature=0.8, return_entropy=True, chunk_size=4, backend=backend)
            want = torch.autograd.grad((lp * g_lp).sum() + (ent * g_h).sum(), params)
            cols = slice(rank * shard, (rank + 1) * shard)
            mine = [hidden.clone().requires_grad_(), weight[cols].clone().requires_grad_()]
            mine += [b[cols].clone().requires_grad_()] if bias else []
            got_lp, got_ent = linear_token_logprobs(mine[0], mine[1], targets, bias=mine[2] if bias else None,
                                                    temperature=0.8, return_entropy=True, chunk_size=4,
                                                    process_group=group, backend=backend)
            got = torch.autograd.grad((got_lp * g_lp).sum() + (got_ent * g_h).sum(), mine)
            label = f"linear {backend} bias={bias}"
            check(f"{label} logprobs", got_lp, lp, 1e-12)
            check(f"{label} entropy", got_ent, ent, 1e-12)
            check(f"{label} grad hidden", got[0], want[0], 1e-12)
            check(f"{label} grad weight", got[1], want[1][cols], 1e-12)
            if bias:
                check(f"{label} grad bias", got[2], want[2][cols], 1e-12)
    logits, targets = torch.randn(2, 5), torch.tensor([0, 9])
    for options, message in ((dict(statistics=("mean_logit",)), "cannot be combined"),
                             (dict(top_k=2), "cannot be combined"),
                             (dict(backend="cpp"), "with process_group: backend='cpp' is not implemented")):
        try:
            token_logprobs(logits, targets, process_group=group, **options)
        except ValueError as error:
            assert message in str(error), str(error)
        else:
            raise AssertionError(f"process_group with {options} did not raise")
    try:  # a target beyond the whole vocabulary (world * 5) names itself
        token_logprobs(logits, torch.tensor([0, world * 5]), process_group=group)
    except IndexError as error:
        assert str(world * 5) in str(error), str(error)
    else:
        raise AssertionError("a target outside the sharded vocabulary did not raise")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
