// CUDA kernels: fused token log-probs / entropy (forward and backward), GAE, and the
// Fisher-vector product of softmax.
//
// One thread block per row. Forward: each thread keeps an online (max, sum exp, sum
// exp * (z - max)) over its share of the row, read with 16-byte vector loads; the states
// are merged with warp shuffles and then across warps through shared memory. Backward:
// the same loads, recomputing softmax from the saved log-sum-exp, and 16-byte stores of
// the gradient. Statistics in fp32 (fp64 for fp64 logits), row offsets in int64.
//
// Plain pointers only (native.h): no torch headers, so `nvcc -c` checks this file on any
// machine with nvcc, GPU or not.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

#include "../native.h"

namespace fastpo {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kVecBytes = 16;

template <typename acc_t>
struct Limits;
template <>
struct Limits<float> {
  __device__ static float lowest() { return -FLT_MAX; }
};
template <>
struct Limits<double> {
  __device__ static double lowest() { return -DBL_MAX; }
};

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename scalar_t>
__device__ __forceinline__ scalar_t from_acc(float x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <typename scalar_t>
__device__ __forceinline__ scalar_t from_acc(double x) { return static_cast<scalar_t>(x); }

__device__ __forceinline__ float acc_exp(float x) { return __expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
__device__ __forceinline__ float acc_tanh(float x) { return tanhf(x); }
__device__ __forceinline__ double acc_tanh(double x) { return tanh(x); }

// z = x / T (or c * tanh(x / c) / T) and dz/dx; -inf becomes the most negative finite
// value, the rule of kernels/logprobs.py, so masked-out entries get probability 0.
template <typename acc_t, bool SOFTCAP>
struct Transform {
  acc_t inv_temp, inv_cap, cap_over_temp;
  // Unclamped: the target's own logit, where -inf must give the log-probability -inf.
  __device__ __forceinline__ acc_t raw_z(acc_t x) const {
    return SOFTCAP ? cap_over_temp * acc_tanh(x * inv_cap) : x * inv_temp;
  }
  __device__ __forceinline__ acc_t z(acc_t x, acc_t* dz = nullptr) const {
    acc_t v;
    if (SOFTCAP) {
      const acc_t t = acc_tanh(x * inv_cap);
      v = cap_over_temp * t;
      if (dz) *dz = (acc_t(1) - t * t) * inv_temp;
    } else {
      v = x * inv_temp;
      if (dz) *dz = inv_temp;
    }
    return v < Limits<acc_t>::lowest() ? Limits<acc_t>::lowest() : v;
  }
};

template <typename acc_t, bool SOFTCAP>
__device__ __forceinline__ Transform<acc_t, SOFTCAP> make_transform(const LogprobsArgs& a, int64_t row) {
  const acc_t inv_temp = acc_t(1) / static_cast<acc_t>(a.temperature[row * a.temp_stride]);
  const acc_t cap = a.has_softcap ? static_cast<acc_t>(a.softcap) : acc_t(1);
  return {inv_temp, acc_t(1) / cap, cap * inv_temp};
}

__device__ __forceinline__ const char* row_start(const LogprobsArgs& a, int64_t row, int64_t elem_size) {
  const int64_t n_inner = a.n_inner > 0 ? a.n_inner : 1;
  const int64_t offset = (row / n_inner) * a.stride_outer + (row % n_inner) * a.stride_inner;
  return static_cast<const char*>(a.logits) + offset * elem_size;
}

// Calls f(i, x) for every element of a row of `n` elements at `x`, thread by thread:
// scalar loads up to the first 16-byte boundary, then 16-byte vector loads, then the
// tail.
template <typename scalar_t, typename F>
__device__ __forceinline__ void for_row(const scalar_t* x, int64_t n, const F& f) {
  constexpr int kVec = kVecBytes / sizeof(scalar_t);
  const int64_t misalign = (reinterpret_cast<uintptr_t>(x) % kVecBytes) / sizeof(scalar_t);
  const int64_t head = misalign ? (n < kVec - misalign ? n : kVec - misalign) : 0;
  for (int64_t i = threadIdx.x; i < head; i += blockDim.x) f(i, x[i]);
  const int64_t n_vec = (n - head) / kVec;
  const uint4* body = reinterpret_cast<const uint4*>(x + head);
  for (int64_t v = threadIdx.x; v < n_vec; v += blockDim.x) {
    union {
      uint4 raw;
      scalar_t elems[kVec];
    } chunk;
    chunk.raw = body[v];
#pragma unroll
    for (int k = 0; k < kVec; ++k) f(head + v * kVec + k, chunk.elems[k]);
  }
  for (int64_t i = head + n_vec * kVec + threadIdx.x; i < n; i += blockDim.x) f(i, x[i]);
}

// Online softmax state of part of a row: m = max z, s = sum exp(z - m), u = sum exp(z - m) * (z - m).
template <typename acc_t>
struct State {
  acc_t m, s, u;
  __device__ __forceinline__ void add(acc_t z) {
    if (z > m) {
      const acc_t shift = m - z;
      const acc_t alpha = acc_exp(shift);
      u = alpha * u + (alpha * shift) * s;  // alpha * shift first: shift * s can overflow
      s *= alpha;
      m = z;
    }
    const acc_t d = z - m;
    const acc_t e = acc_exp(d);
    s += e;
    u += e * d;
  }
  __device__ __forceinline__ void merge(const State& o) {
    const acc_t top = m > o.m ? m : o.m;
    const acc_t d1 = m - top, d2 = o.m - top;
    const acc_t a1 = acc_exp(d1), a2 = acc_exp(d2);
    u = a1 * u + (a1 * d1) * s + a2 * o.u + (a2 * d2) * o.s;  // a * d first, as in add()
    s = a1 * s + a2 * o.s;
    m = top;
  }
};

// StateT: State or FisherState, three acc_t fields (m, s, u) and a merge().
template <typename StateT>
__device__ __forceinline__ StateT block_reduce(StateT st) {
  __shared__ StateT partial[kWarps];
  for (int offset = 16; offset > 0; offset >>= 1) {
    StateT other{__shfl_xor_sync(0xffffffffu, st.m, offset), __shfl_xor_sync(0xffffffffu, st.s, offset),
                 __shfl_xor_sync(0xffffffffu, st.u, offset)};
    st.merge(other);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) partial[warp] = st;
  __syncthreads();
  StateT total = partial[0];
  for (int w = 1; w < kWarps; ++w) total.merge(partial[w]);
  return total;  // every thread reads the same partials, so all agree
}

template <typename scalar_t, typename acc_t, bool SOFTCAP, bool ENTROPY>
__global__ void __launch_bounds__(kThreads) token_logprobs_forward_kernel(LogprobsArgs a) {
  const int64_t row = blockIdx.x;
  const int64_t target = a.targets[row];
  acc_t* logprobs = static_cast<acc_t*>(a.logprobs);
  acc_t* row_max = static_cast<acc_t*>(a.row_max);
  acc_t* log_sum = static_cast<acc_t*>(a.log_sum);
  acc_t* entropy = static_cast<acc_t*>(a.entropy);
  if (target == a.ignore_index) {  // padding: no pass over the row
    if (threadIdx.x == 0) {
      logprobs[row] = 0;
      row_max[row] = Limits<acc_t>::lowest();
      log_sum[row] = 0;
      if (ENTROPY) entropy[row] = 0;
    }
    return;
  }
  const auto* x = reinterpret_cast<const scalar_t*>(row_start(a, row, sizeof(scalar_t)));
  const auto tf = make_transform<acc_t, SOFTCAP>(a, row);
  State<acc_t> st{Limits<acc_t>::lowest(), 0, 0};
  for_row(x, a.vocab, [&](int64_t, scalar_t v) { st.add(tf.z(to_acc(v))); });
  st = block_reduce(st);
  if (threadIdx.x == 0) {
    const acc_t log_s = log(st.s);
    // Out-of-range targets are rejected in Python; here they read nothing and give NaN.
    // (z_t - m) first: both are large for large logits, their difference is exact.
    const bool valid = target >= 0 && target < a.vocab;
    logprobs[row] = valid ? (tf.raw_z(to_acc(x[target])) - st.m) - log_s : acc_t(NAN);
    row_max[row] = st.m;
    log_sum[row] = log_s;
    if (ENTROPY) entropy[row] = log_s - st.u / st.s;
  }
}

// d lp / dz = onehot(target) - p,  d H / dz = -p * (log p + H),  times dz/dx.
template <typename scalar_t, typename acc_t, bool SOFTCAP, bool ENTROPY>
__global__ void __launch_bounds__(kThreads) token_logprobs_backward_kernel(LogprobsArgs a) {
  constexpr int kVec = kVecBytes / sizeof(scalar_t);
  const int64_t row = blockIdx.x;
  const int64_t vocab = a.vocab;
  const int64_t target = a.targets[row];
  scalar_t* out = static_cast<scalar_t*>(a.grad_logits) + row * vocab;
  const auto* x = reinterpret_cast<const scalar_t*>(row_start(a, row, sizeof(scalar_t)));
  const bool ignored = target == a.ignore_index;
  const auto tf = make_transform<acc_t, SOFTCAP>(a, row);
  const acc_t row_max = static_cast<const acc_t*>(a.saved_row_max)[row];
  const acc_t log_sum = static_cast<const acc_t*>(a.saved_log_sum)[row];
  const acc_t g_lp = a.grad_logprobs ? static_cast<const acc_t*>(a.grad_logprobs)[row] : acc_t(0);
  const acc_t g_h = ENTROPY ? static_cast<const acc_t*>(a.grad_entropy)[row] : acc_t(0);
  const acc_t h = ENTROPY ? static_cast<const acc_t*>(a.saved_entropy)[row] : acc_t(0);
  if (ignored) {  // padding: zeros, without reading the row
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) out[i] = from_acc<scalar_t>(acc_t(0));
    return;
  }
  auto grad = [&](int64_t i, scalar_t v) -> scalar_t {
    acc_t dz;
    const acc_t z = tf.z(to_acc(v), &dz);
    const acc_t log_p = (z - row_max) - log_sum;
    const acc_t p = acc_exp(log_p);
    // p * (log p + H) before the product with g_h: where p = 0, log p is about -FLT_MAX
    // and g_h * log p could overflow, and 0 * inf would be NaN.
    acc_t g = ENTROPY ? -(p * g_lp + (p * (log_p + h)) * g_h) : -p * g_lp;
    if (i == target) g += g_lp;
    return from_acc<scalar_t>(g * dz);
  };
  // Vector stores need the input and output rows equally misaligned (always the case for
  // contiguous logits); otherwise every element goes through the scalar path.
  const bool same_misalign =
      (reinterpret_cast<uintptr_t>(x) % kVecBytes) == (reinterpret_cast<uintptr_t>(out) % kVecBytes);
  if (!same_misalign) {
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) out[i] = grad(i, x[i]);
    return;
  }
  const int64_t misalign = (reinterpret_cast<uintptr_t>(x) % kVecBytes) / sizeof(scalar_t);
  const int64_t head = misalign ? (vocab < kVec - misalign ? vocab : kVec - misalign) : 0;
  for (int64_t i = threadIdx.x; i < head; i += blockDim.x) out[i] = grad(i, x[i]);
  const int64_t n_vec = (vocab - head) / kVec;
  const uint4* in_body = reinterpret_cast<const uint4*>(x + head);
  uint4* out_body = reinterpret_cast<uint4*>(out + head);
  for (int64_t v = threadIdx.x; v < n_vec; v += blockDim.x) {
    union {
      uint4 raw;
      scalar_t elems[kVec];
    } in_chunk, out_chunk;
    in_chunk.raw = in_body[v];
#pragma unroll
    for (int k = 0; k < kVec; ++k) out_chunk.elems[k] = grad(head + v * kVec + k, in_chunk.elems[k]);
    out_body[v] = out_chunk.raw;
  }
  for (int64_t i = head + n_vec * kVec + threadIdx.x; i < vocab; i += blockDim.x) out[i] = grad(i, x[i]);
}

// Fisher-vector product, out = p * (u - <p, u>) / T^2 (kernels/kl.py): each thread keeps an
// online (max m, sum exp(z - m), sum exp(z - m) * u) over its share of the row, merged as in
// the log-prob forward; then a second pass writes the product (acc_t output).
template <typename acc_t>
struct FisherState {
  acc_t m, s, u;  // u: sum exp(z - m) * u_v, so <p, u> = u / s
  __device__ __forceinline__ void add(acc_t z, acc_t u_v) {
    if (z > m) {
      const acc_t alpha = acc_exp(m - z);
      s *= alpha;
      u *= alpha;
      m = z;
    }
    const acc_t e = acc_exp(z - m);
    s += e;
    if (e > 0) u += e * u_v;  // p == 0 contributes nothing, even where u is not finite
  }
  __device__ __forceinline__ void merge(const FisherState& o) {
    const acc_t top = m > o.m ? m : o.m;
    const acc_t a1 = acc_exp(m - top), a2 = acc_exp(o.m - top);
    s = a1 * s + a2 * o.s;
    u = a1 * u + a2 * o.u;
    m = top;
  }
};

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) fisher_vector_product_kernel(FisherArgs a) {
  const int64_t row = blockIdx.x;
  const int64_t vocab = a.vocab;
  acc_t* out = static_cast<acc_t*>(a.out) + row * vocab;
  if (a.mask != nullptr && a.mask[row] == 0) {  // masked out: zeros, without reading the row
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) out[i] = acc_t(0);
    return;
  }
  const int64_t n_inner = a.n_inner > 0 ? a.n_inner : 1, u_n_inner = a.u_n_inner > 0 ? a.u_n_inner : 1;
  const auto* x = static_cast<const scalar_t*>(a.logits) + (row / n_inner) * a.stride_outer +
                  (row % n_inner) * a.stride_inner;
  const auto* u = static_cast<const scalar_t*>(a.u) + (row / u_n_inner) * a.u_stride_outer +
                  (row % u_n_inner) * a.u_stride_inner;
  const acc_t inv_temp = acc_t(1) / static_cast<const acc_t*>(a.temperature)[row * a.temp_stride];
  const auto z_of = [inv_temp](scalar_t v) {
    const acc_t z = to_acc(v) * inv_temp;
    return z < Limits<acc_t>::lowest() ? Limits<acc_t>::lowest() : z;
  };
  FisherState<acc_t> st{Limits<acc_t>::lowest(), 0, 0};
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) st.add(z_of(x[i]), to_acc(u[i]));
  st = block_reduce(st);
  const acc_t mean_u = st.u / st.s;
  const acc_t scale = inv_temp * inv_temp / st.s;
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
    const acc_t e = acc_exp(z_of(x[i]) - st.m);
    out[i] = e > 0 ? (e * scale) * (to_acc(u[i]) - mean_u) : acc_t(0);
  }
}

// One thread per sequence; the recursion and its masking rule are those of the CPU
// version (csrc/cpu/kernels.cpp, gae_row).
template <typename acc_t>
__global__ void gae_kernel(GaeArgs a) {
  const int64_t seq = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (seq >= a.n_seq) return;
  const int64_t off = seq * a.length;
  const auto* rewards = static_cast<const acc_t*>(a.rewards) + off;
  const auto* values = static_cast<const acc_t*>(a.values) + off;
  const bool* mask = a.mask + off;
  auto* adv = static_cast<acc_t*>(a.advantages) + off;
  auto* ret = static_cast<acc_t*>(a.returns) + off;
  const acc_t gamma = static_cast<acc_t>(a.gamma), gamma_lam = static_cast<acc_t>(a.gamma * a.lam);
  acc_t next_value = 0, next_adv = 0;
  for (int64_t t = a.length - 1; t >= 0; --t) {
    if (!mask[t]) {
      adv[t] = 0;
      ret[t] = 0;
      continue;
    }
    const acc_t v = values[t];
    const acc_t delta = rewards[t] + gamma * next_value - v;
    next_adv = delta + gamma_lam * next_adv;
    next_value = v;
    adv[t] = next_adv;
    ret[t] = next_adv + v;
  }
}

template <typename scalar_t, typename acc_t>
void launch_forward(const LogprobsArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.n_rows));
  const bool entropy = a.entropy != nullptr;
  if (a.has_softcap) {
    if (entropy) token_logprobs_forward_kernel<scalar_t, acc_t, true, true><<<grid, kThreads, 0, stream>>>(a);
    else token_logprobs_forward_kernel<scalar_t, acc_t, true, false><<<grid, kThreads, 0, stream>>>(a);
  } else {
    if (entropy) token_logprobs_forward_kernel<scalar_t, acc_t, false, true><<<grid, kThreads, 0, stream>>>(a);
    else token_logprobs_forward_kernel<scalar_t, acc_t, false, false><<<grid, kThreads, 0, stream>>>(a);
  }
}

template <typename scalar_t, typename acc_t>
void launch_backward(const LogprobsArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.n_rows));
  const bool entropy = a.grad_entropy != nullptr;
  if (a.has_softcap) {
    if (entropy) token_logprobs_backward_kernel<scalar_t, acc_t, true, true><<<grid, kThreads, 0, stream>>>(a);
    else token_logprobs_backward_kernel<scalar_t, acc_t, true, false><<<grid, kThreads, 0, stream>>>(a);
  } else {
    if (entropy) token_logprobs_backward_kernel<scalar_t, acc_t, false, true><<<grid, kThreads, 0, stream>>>(a);
    else token_logprobs_backward_kernel<scalar_t, acc_t, false, false><<<grid, kThreads, 0, stream>>>(a);
  }
}

template <template <typename, typename> class Launch>
const char* dispatch(const LogprobsArgs& a, void* stream) {
  if (a.n_rows == 0) return nullptr;
  const auto s = static_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case kFloat32: Launch<float, float>::run(a, s); break;
    case kBFloat16: Launch<__nv_bfloat16, float>::run(a, s); break;
    case kFloat16: Launch<__half, float>::run(a, s); break;
    case kFloat64: Launch<double, double>::run(a, s); break;
    default: return "unknown dtype code";
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <typename scalar_t, typename acc_t>
struct Forward {
  static void run(const LogprobsArgs& a, cudaStream_t s) { launch_forward<scalar_t, acc_t>(a, s); }
};
template <typename scalar_t, typename acc_t>
struct Backward {
  static void run(const LogprobsArgs& a, cudaStream_t s) {
    if (a.vocab > 0) launch_backward<scalar_t, acc_t>(a, s);
  }
};

}  // namespace

const char* token_logprobs_forward_cuda(const LogprobsArgs& args, void* stream) {
  return dispatch<Forward>(args, stream);
}

const char* token_logprobs_backward_cuda(const LogprobsArgs& args, void* stream) {
  return dispatch<Backward>(args, stream);
}

const char* fisher_vector_product_cuda(const FisherArgs& args, void* stream) {
  if (args.n_rows == 0 || args.vocab == 0) return nullptr;
  const dim3 grid(static_cast<unsigned>(args.n_rows));
  const auto s = static_cast<cudaStream_t>(stream);
  switch (args.dtype) {
    case kFloat32: fisher_vector_product_kernel<float, float><<<grid, kThreads, 0, s>>>(args); break;
    case kBFloat16: fisher_vector_product_kernel<__nv_bfloat16, float><<<grid, kThreads, 0, s>>>(args); break;
    case kFloat16: fisher_vector_product_kernel<__half, float><<<grid, kThreads, 0, s>>>(args); break;
    case kFloat64: fisher_vector_product_kernel<double, double><<<grid, kThreads, 0, s>>>(args); break;
    default: return "unknown dtype code";
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

const char* gae_cuda(const GaeArgs& args, void* stream) {
  if (args.n_seq == 0) return nullptr;
  constexpr int kGaeThreads = 128;
  const dim3 grid(static_cast<unsigned>((args.n_seq + kGaeThreads - 1) / kGaeThreads));
  const auto s = static_cast<cudaStream_t>(stream);
  if (args.dtype == kFloat64) {
    gae_kernel<double><<<grid, kGaeThreads, 0, s>>>(args);
  } else {
    gae_kernel<float><<<grid, kGaeThreads, 0, s>>>(args);
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace fastpo
