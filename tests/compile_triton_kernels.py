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
    "softcap", "lo", "hi", "delta", "dual_clip", "cispo_min", "cispo_cap", "tau_pos", "tau_neg", "kl_coef",
    "kl_clamp", "entropy_coef", "log_ratio_clamp", "seq_log_ratio_cap", "is_min", "is_cap", "eps_low", "eps_high",
    "dppo_cap", "dro_beta", "kl_cov_coef", "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg",
    "opsm_threshold", "clip_eps", "eps", "gamma", "gamma_lam", "beta", "param_a", "param_b",
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
        # HAS_THRESHOLD (top-k/top-p) without statistics, as the op launches it
        for threshold in (False, True):
            yield logprobs._token_logprobs_fwd_kernel, dict(
                HAS_SOFTCAP=True, COMPUTE_ENTROPY=True, HAS_THRESHOLD=threshold, HAS_LOG_SUM_SQ=not threshold,
                HAS_MEAN_LOGIT=not threshold, HAS_IS_TOP1=not threshold, HAS_TOP1_LOGPROB=not threshold,
                ACC_DTYPE=acc, BLOCK_V=4096), {
                "logits_ptr": logits, "targets_ptr": "*i64", "temp_ptr": stats, "logprobs_ptr": stats,
                "entropy_ptr": stats, "row_max_ptr": stats, "log_sum_ptr": stats, "log_sum_sq_ptr": stats,
                "mean_logit_ptr": stats, "is_top1_ptr": "*i8", "top1_logprob_ptr": stats,
                "threshold_ptr": stats}, 8
            yield logprobs._token_logprobs_bwd_kernel, dict(
                HAS_SOFTCAP=True, HAS_THRESHOLD=threshold, HAS_GRAD_LOGPROBS=True, HAS_GRAD_ENTROPY=True,
                ACC_DTYPE=acc, BLOCK_V=4096), {
                "logits_ptr": logits, "targets_ptr": "*i32", "row_max_ptr": stats, "log_sum_ptr": stats,
                "entropy_ptr": stats, "grad_logprobs_ptr": stats, "grad_entropy_ptr": stats,
                "grad_logits_ptr": logits, "threshold_ptr": stats}, 8
    kl_pointers = {"logits_ptr": "*bf16", "ref_ptr": "*fp16", "mask_ptr": "*u8"}
    yield kl._logits_kl_fwd_kernel, dict(HAS_MASK=True, ACC_DTYPE=F32, BLOCK_V=4096), kl_pointers, 8
    yield kl._logits_kl_bwd_kernel, dict(HAS_MASK=True, ACC_DTYPE=F32, BLOCK_V=4096), dict(
        kl_pointers, grad_logits_ptr="*bf16"), 8
    yield kl._fisher_vector_product_kernel, dict(HAS_MASK=True, ACC_DTYPE=F32, BLOCK_V=4096), {
        "logits_ptr": "*bf16", "u_ptr": "*bf16", "mask_ptr": "*u8"}, 8
    for variant in policy.KL_ESTIMATORS:
        yield policy._kl_penalty_kernel, dict(
            KL_KIND=variant.kernel_id, KL_CLAMP=variant.name == "k3", NEED_GRAD=True, ACC_DTYPE=F32, BLOCK=1024), {
            "lp_ptr": "*bf16"}, 4
    ppo = dict(LOSS_KIND=0, SEQ_RATIO=False, HAS_DELTA=True, HAS_DUAL=True, HAS_CISPO_MIN=False, LOG_RATIO_CLAMP=True,
               SEQ_CAP=False, KL_KIND=3, KL_IN_LOSS=True, KL_CLAMP=False, KL_RATIO_WEIGHTED=False, HAS_ENTROPY=True,
               ENTROPY_MASK=True, ENTROPY_IN_ROWS=True, TIS_LEVEL=1, TIS_MASK=False, TIS_GATING=0, TIS_SEQ_MEAN=False,
               TIS_WEIGHT=0, OPSM=True, NEED_GRAD=True, ACC_DTYPE=F32, N_STAT=policy.N_STATS, BLOCK_T=2048)
    loss_pointers = {"mask_ptr": "*u8", "selected_ptr": "*u8", "lp_ptr": "*bf16"}
    yield policy._policy_loss_fwd_kernel, ppo, loss_pointers, 8
    yield policy._policy_loss_fwd_kernel, dict(
        ppo, LOSS_KIND=1, SEQ_RATIO=True, HAS_DELTA=False, HAS_DUAL=False, HAS_CISPO_MIN=True, SEQ_CAP=True,
        KL_CLAMP=True, KL_RATIO_WEIGHTED=True, ENTROPY_IN_ROWS=False, TIS_LEVEL=2, TIS_MASK=True, TIS_GATING=1,
        TIS_SEQ_MEAN=True, TIS_WEIGHT=1), loss_pointers, 8
    sapo = dict(ppo, LOSS_KIND=2, SEQ_RATIO=True, KL_KIND=5, HAS_DELTA=False, HAS_DUAL=False, LOG_RATIO_CLAMP=False,
                TIS_MASK=True, TIS_GATING=2, TIS_WEIGHT=2, ACC_DTYPE=F64, BLOCK_T=128)
    yield policy._policy_loss_fwd_kernel, sapo, dict(loss_pointers, grad_ptr="*fp64", stats_ptr="*fp64"), 4
    # verl's registry loss types: GPG, GMPO (sequence ratio, last pass), DPPO TV / binary KL, DRO,
    # Clip-Cov, KL-Cov; TRL's VESPO
    for kind, seq_ratio in ((3, False), (4, True), (5, True), (6, False), (7, False), (8, False), (9, True),
                            (10, False)):
        yield policy._policy_loss_fwd_kernel, dict(
            ppo, LOSS_KIND=kind, SEQ_RATIO=seq_ratio, HAS_DELTA=False, HAS_DUAL=False), loss_pointers, 8
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
