"""Compile every Triton kernel of fastpo.kernels to GPU machine code, without a GPU.

    python tests/compile_triton_kernels.py [ARCH ...]      (default: 90 80)

The test suite runs the kernels on the CPU through Triton's interpreter, which accepts
code that the real compiler rejects. This script takes each kernel through Triton's
whole pipeline (TTIR, TTGIR, LLVM IR, PTX, cubin) for the given CUDA architectures,
with representative argument types and each constexpr variant that changes the code,
and prints one line per kernel: ``OK name`` or ``FAIL name: error``. It must run with
TRITON_INTERPRET unset (run by tests/test_triton_compile.py in a subprocess).
"""

import os
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastpo.kernels import advantages, kl, logprobs, policy, preference, sequence

# Float scalar arguments (hyperparameters); every other non-pointer argument is an int.
FLOAT_ARGS = {
    "softcap", "lo", "hi", "delta", "dual_clip", "cispo_cap", "tau_pos", "tau_neg", "kl_coef",
    "entropy_coef", "log_tis_cap", "clip_eps", "eps", "gamma", "gamma_lam", "beta", "param_a", "param_b",
}
F32, F64 = tl.float32, tl.float64


def compile_kernel(fn, constexprs, pointer_types, num_warps, arch):
    signature, constants = {}, {}
    for param in fn.params:
        name = param.name
        if param.is_constexpr:
            signature[name], constants[name] = "constexpr", constexprs[name]
        elif name.endswith("_ptr"):
            signature[name] = pointer_types.get(name, "*fp32")
        else:
            signature[name] = "fp32" if name in FLOAT_ARGS else "i32"
    source = ASTSource(fn, signature, constants)
    triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def cases():
    """(kernel, constexprs, pointer types, num_warps): the variants the ops launch."""
    for acc, logits, stats in ((F32, "*bf16", "*fp32"), (F64, "*fp64", "*fp64")):
        yield logprobs._token_logprobs_fwd_kernel, dict(
            HAS_SOFTCAP=True, COMPUTE_ENTROPY=True, ACC_DTYPE=acc, BLOCK_V=4096), {
            "logits_ptr": logits, "targets_ptr": "*i64", "logprobs_ptr": stats, "entropy_ptr": stats,
            "row_max_ptr": stats, "log_sum_ptr": stats}, 8
        yield logprobs._token_logprobs_bwd_kernel, dict(
            HAS_SOFTCAP=True, HAS_GRAD_LOGPROBS=True, HAS_GRAD_ENTROPY=True, ACC_DTYPE=acc, BLOCK_V=4096), {
            "logits_ptr": logits, "targets_ptr": "*i32", "row_max_ptr": stats, "log_sum_ptr": stats,
            "entropy_ptr": stats, "grad_logprobs_ptr": stats, "grad_entropy_ptr": stats,
            "grad_logits_ptr": logits}, 8
    kl_pointers = {"logits_ptr": "*bf16", "ref_ptr": "*fp16", "mask_ptr": "*u8"}
    yield kl._logits_kl_fwd_kernel, dict(HAS_MASK=True, ACC_DTYPE=F32, BLOCK_V=4096), kl_pointers, 8
    yield kl._logits_kl_bwd_kernel, dict(HAS_MASK=True, ACC_DTYPE=F32, BLOCK_V=4096), dict(
        kl_pointers, grad_logits_ptr="*bf16"), 8
    for kind in range(1, 6):
        yield policy._kl_penalty_kernel, dict(KL_KIND=kind, NEED_GRAD=True, ACC_DTYPE=F32, BLOCK=1024), {
            "lp_ptr": "*bf16"}, 4
    ppo = dict(LOSS_KIND=0, SEQ_RATIO=False, HAS_DELTA=True, HAS_DUAL=True, KL_KIND=3, KL_IN_LOSS=True,
               HAS_ENTROPY=True, ENTROPY_MASK=True, TIS_KIND=1, NEED_GRAD=True, ACC_DTYPE=F32, N_STAT=10,
               BLOCK_T=2048)
    loss_pointers = {"mask_ptr": "*u8", "lp_ptr": "*bf16"}
    yield policy._policy_loss_fwd_kernel, ppo, loss_pointers, 8
    yield policy._policy_loss_fwd_kernel, dict(
        ppo, LOSS_KIND=1, SEQ_RATIO=True, TIS_KIND=2, HAS_DELTA=False, HAS_DUAL=False), loss_pointers, 8
    yield policy._policy_loss_fwd_kernel, dict(
        ppo, LOSS_KIND=2, SEQ_RATIO=True, KL_KIND=5, TIS_KIND=0, HAS_DELTA=False, HAS_DUAL=False,
        ACC_DTYPE=F64, BLOCK_T=128), dict(loss_pointers, grad_ptr="*fp64", stats_ptr="*fp64"), 4
    yield policy._value_loss_fwd_kernel, dict(HAS_CLIP=True, NEED_GRAD=True, ACC_DTYPE=F32, BLOCK_T=2048), {
        "mask_ptr": "*i1"}, 8
    for mode in range(4):
        yield advantages._group_advantages_kernel, dict(MODE=mode, UNBIASED=True, ACC_DTYPE=F32, BLOCK=16), {}, 4
    yield advantages._gae_kernel, dict(ACC_DTYPE=F32), {"mask_ptr": "*u8", "rewards_ptr": "*bf16"}, 1
    for packed in (True, False):
        flags = dict(PACKED=packed, AVERAGE=True, ACC_DTYPE=F32, BLOCK_T=1024)
        yield sequence._sequence_logprobs_fwd_kernel, flags, {
            "mask_ptr": "*u8", "cu_ptr": "*i32", "x_ptr": "*bf16"}, 4
        yield sequence._sequence_logprobs_bwd_kernel, flags, {
            "mask_ptr": "*u8", "cu_ptr": "*i64", "grad_x_ptr": "*bf16"}, 4
    for loss, block_k in ((0, 2), (1, 2), (2, 2), (3, 2), (4, 8), (5, 2), (6, 8), (7, 1)):
        yield preference._preference_fwd_kernel, dict(
            LOSS=loss, HAS_REF=True, STORE_REWARDS=True, ACC_DTYPE=F32, BLOCK_B=128, BLOCK_K=block_k), {
            "aux_ptr": "*u8" if loss == 7 else "*fp32"}, 4


def main(archs):
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run with TRITON_INTERPRET unset: the interpreter does not compile")
    failures = 0
    for arch in archs:
        for fn, constexprs, pointers, num_warps in cases():
            label = f"sm_{arch} {fn.__name__} {sorted(constexprs.items(), key=str)}"
            try:
                compile_kernel(fn, constexprs, pointers, num_warps, arch)
                print(f"OK {label}", flush=True)
            except Exception as exc:  # report every kernel, then fail
                failures += 1
                print(f"FAIL {label}: {type(exc).__name__}: {str(exc)[-2000:]}", flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [90, 80])
