// CPU kernels: fused token log-probs / entropy (forward and backward), GAE, the
// Fisher-vector product of softmax (kernels/kl.py), and the top-p cut of the sampling-aware
// log-probs (kernels/logprobs.py).
//
// One pass over each row's logits forward and one backward, rows spread over torch's
// OpenMP threads. The inner loops are written so that the compiler vectorizes them
// (fixed-width lane accumulators instead of serial reductions, a branch-free exp), and
// on x86-64 GCC builds them several times (target_clones) so AVX2 / AVX-512 are used
// where the CPU has them while the binary still runs on any x86-64. No torch headers:
// the threads are OpenMP's, the same libgomp torch itself loads.
#include "../native.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTPO_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTPO_CLONES
#endif
#define FASTPO_INLINE inline __attribute__((always_inline))

namespace fastpo {
namespace {

// Rows are processed in blocks of this many elements: the block's transformed logits
// live in a stack buffer that stays in L1 between the max pass and the exp pass.
constexpr int64_t kBlock = 2048;
// Independent accumulators per reduction, so the adds vectorize without reassociation flags.
constexpr int kLanes = 16;

// ----------------------------------------------------------------- element conversion

// 16-bit floats are carried as their bits; the conversions below are branch-free
// integer/float arithmetic so that loops over them vectorize.
struct BFloat16 { uint16_t bits; };
struct Float16 { uint16_t bits; };

FASTPO_INLINE float bits_to_float(uint32_t bits) {
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}
FASTPO_INLINE uint32_t float_to_bits(float x) {
  uint32_t out;
  std::memcpy(&out, &x, sizeof(out));
  return out;
}

FASTPO_INLINE float to_acc(float x) { return x; }
FASTPO_INLINE double to_acc(double x) { return x; }
FASTPO_INLINE float to_acc(BFloat16 x) { return bits_to_float(static_cast<uint32_t>(x.bits) << 16); }
FASTPO_INLINE float to_acc(Float16 x) {
  const uint32_t sign = static_cast<uint32_t>(x.bits & 0x8000u) << 16;
  const uint32_t magnitude = x.bits & 0x7fffu;
  // Exponent and mantissa moved to their fp32 positions read as a float are the value
  // times 2^-112 (the bias difference 127 - 15), subnormal halves included; inf / NaN
  // (exponent all ones) get the fp32 all-ones exponent instead.
  const float finite = bits_to_float(magnitude << 13) * 0x1.0p112f;
  const uint32_t special = (magnitude << 13) | 0x7f800000u;
  return bits_to_float((magnitude >= 0x7c00u ? special : float_to_bits(finite)) | sign);
}

template <typename scalar_t>
FASTPO_INLINE scalar_t from_acc(float x);
template <>
FASTPO_INLINE float from_acc<float>(float x) { return x; }
template <>
FASTPO_INLINE BFloat16 from_acc<BFloat16>(float x) {
  // Round to nearest even on the 16 dropped bits; NaN stays a (quiet) NaN.
  const uint32_t bits = float_to_bits(x);
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  return {static_cast<uint16_t>(x != x ? 0x7fc0u : rounded)};
}
template <>
FASTPO_INLINE Float16 from_acc<Float16>(float x) {
  // Round to nearest even by letting the fp32 adder do it: adding 2^(e+13) (e = x's
  // exponent, at least fp16's smallest normal exponent -14) to |x| leaves exactly the
  // bits that fit fp16's 10-bit mantissa, rounded. Values too large for fp16 are pushed
  // to inf first by scaling up by 2^112 and back down by 2^-110.
  const uint32_t bits = float_to_bits(x);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t doubled = bits + bits;  // exponent in the top 8 bits, sign dropped
  const float scaled = (std::fabs(x) * 0x1.0p112f) * 0x1.0p-110f;
  uint32_t exponent = doubled & 0xff000000u;
  exponent = exponent < 0x71000000u ? 0x71000000u : exponent;  // 0x71 = 127 - 14
  const uint32_t sum = float_to_bits(bits_to_float((exponent >> 1) + 0x07800000u) + scaled);
  const uint32_t finite = ((sum >> 13) & 0x7c00u) + (sum & 0x0fffu);
  return {static_cast<uint16_t>(sign | (doubled > 0xff000000u ? 0x7e00u : finite))};
}
template <>
FASTPO_INLINE double from_acc<double>(float x) { return x; }
template <typename scalar_t>
FASTPO_INLINE scalar_t from_acc(double x) { return static_cast<scalar_t>(x); }

// ------------------------------------------------------------------------- math

// exp for fp32 without a libm call so that loops over it vectorize: round x*log2(e) to
// an integer n, a degree-6 polynomial for exp(r) on r = x - n*ln2 in [-ln2/2, ln2/2]
// (Cephes' coefficients, about 1 ulp), then scale by 2^n through the exponent bits.
// Inputs below ln(FLT_MIN) give 0, as do -inf and -FLT_MAX.
FASTPO_INLINE float fast_exp(float x) {
  x = x < -88.0f ? -88.0f : (x > 88.0f ? 88.0f : x);
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t biased = static_cast<int32_t>(n) + 127;  // 0 for n = -127: the result flushes to 0
  const uint32_t bits = static_cast<uint32_t>(biased < 0 ? 0 : biased) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
FASTPO_INLINE double fast_exp(double x) { return std::exp(x); }

// tanh through exp(-2|y|): no cancellation for large |y|, absolute error ~1e-7 near 0.
template <typename acc_t>
FASTPO_INLINE acc_t fast_tanh(acc_t y) {
  const acc_t e = fast_exp(static_cast<acc_t>(-2) * std::fabs(y));
  return std::copysign((static_cast<acc_t>(1) - e) / (static_cast<acc_t>(1) + e), y);
}

// -inf logits (a masked-out vocabulary) become the most negative finite value, so they get
// probability 0 and no inf - inf appears; the same rule as kernels/logprobs.py.
template <typename acc_t>
constexpr acc_t kLowest = std::numeric_limits<acc_t>::lowest();

// z = x / T, or with a softcap c: z = c * tanh(x / c) / T; also dz/dx.
template <typename acc_t, bool SOFTCAP>
struct Transform {
  acc_t inv_temp, inv_cap, cap_over_temp;
  // Unclamped: the target's own logit, where -inf must give the log-probability -inf.
  FASTPO_INLINE acc_t raw_z(acc_t x) const {
    return SOFTCAP ? cap_over_temp * fast_tanh(x * inv_cap) : x * inv_temp;
  }
  FASTPO_INLINE acc_t z(acc_t x) const {
    const acc_t v = raw_z(x);
    return v < kLowest<acc_t> ? kLowest<acc_t> : v;
  }
  FASTPO_INLINE acc_t z_and_dz(acc_t x, acc_t& dz) const {
    acc_t v;
    if (SOFTCAP) {
      const acc_t t = fast_tanh(x * inv_cap);
      v = cap_over_temp * t;
      dz = (static_cast<acc_t>(1) - t * t) * inv_temp;
    } else {
      v = x * inv_temp;
      dz = inv_temp;
    }
    return v < kLowest<acc_t> ? kLowest<acc_t> : v;
  }
};

// -------------------------------------------------------------------- parameters

template <typename scalar_t, typename acc_t>
struct Params {
  const scalar_t* logits;
  int64_t n_inner, stride_outer, stride_inner, vocab;
  const int64_t* targets;
  const float* temperature;
  int64_t temp_stride;
  bool has_softcap;
  acc_t softcap;
  int64_t ignore_index;
  // forward outputs
  acc_t* logprobs;
  acc_t* entropy;  // null when not requested
  acc_t* row_max;
  acc_t* log_sum;
  // backward inputs / output
  const acc_t* saved_row_max;
  const acc_t* saved_log_sum;
  const acc_t* saved_entropy;
  const acc_t* grad_logprobs;  // null: no gradient flows into the log-probs
  const acc_t* grad_entropy;   // null: none into the entropy
  scalar_t* grad_logits;

  FASTPO_INLINE const scalar_t* row(int64_t r) const {
    return logits + (r / n_inner) * stride_outer + (r % n_inner) * stride_inner;
  }
  template <bool SOFTCAP>
  FASTPO_INLINE Transform<acc_t, SOFTCAP> transform(int64_t r) const {
    const acc_t inv_temp = static_cast<acc_t>(1) / static_cast<acc_t>(temperature[r * temp_stride]);
    const acc_t cap = has_softcap ? softcap : static_cast<acc_t>(1);
    return {inv_temp, static_cast<acc_t>(1) / cap, cap * inv_temp};
  }
};

// ------------------------------------------------------------------------ forward

// Online pass over one row: running max m, s = sum exp(z - m), u = sum exp(z - m) * (z - m).
template <typename scalar_t, typename acc_t, bool SOFTCAP, bool ENTROPY>
FASTPO_INLINE void forward_row(const Params<scalar_t, acc_t>& p, int64_t r) {
  const int64_t target = p.targets[r];
  if (target == p.ignore_index) {
    p.logprobs[r] = 0;
    p.row_max[r] = kLowest<acc_t>;
    p.log_sum[r] = 0;
    if (ENTROPY) p.entropy[r] = 0;
    return;
  }
  const scalar_t* x = p.row(r);
  const auto tf = p.template transform<SOFTCAP>(r);
  alignas(64) acc_t z[kBlock];
  acc_t m = kLowest<acc_t>, s = 0, u = 0;
  for (int64_t start = 0; start < p.vocab; start += kBlock) {
    const int64_t n = std::min(kBlock, p.vocab - start);
    const int64_t n_lanes = n - n % kLanes;
    acc_t lane_max[kLanes];
    for (int l = 0; l < kLanes; ++l) lane_max[l] = kLowest<acc_t>;
    for (int64_t i = 0; i < n_lanes; i += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const acc_t v = tf.z(to_acc(x[start + i + l]));
        z[i + l] = v;
        lane_max[l] = v > lane_max[l] ? v : lane_max[l];
      }
    }
    acc_t block_max = kLowest<acc_t>;
    for (int64_t i = n_lanes; i < n; ++i) {
      z[i] = tf.z(to_acc(x[start + i]));
      block_max = z[i] > block_max ? z[i] : block_max;
    }
    for (int l = 0; l < kLanes; ++l) block_max = lane_max[l] > block_max ? lane_max[l] : block_max;

    if (block_max > m) {  // rescale what was summed against the old max
      const acc_t shift = m - block_max;
      const acc_t alpha = std::exp(shift);
      // alpha * shift first: after a run of -inf logits shift * s can overflow to -inf
      if (ENTROPY) u = alpha * u + (alpha * shift) * s;
      s *= alpha;
      m = block_max;
    }
    acc_t lane_s[kLanes] = {}, lane_u[kLanes] = {};
    for (int64_t i = 0; i < n_lanes; i += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const acc_t d = z[i + l] - m;
        const acc_t e = fast_exp(d);
        lane_s[l] += e;
        if (ENTROPY) lane_u[l] += e * d;
      }
    }
    for (int64_t i = n_lanes; i < n; ++i) {
      const acc_t d = z[i] - m;
      const acc_t e = fast_exp(d);
      s += e;
      if (ENTROPY) u += e * d;
    }
    for (int l = 0; l < kLanes; ++l) {
      s += lane_s[l];
      if (ENTROPY) u += lane_u[l];
    }
  }
  const acc_t log_s = std::log(s);
  // A target outside [0, V) cannot reach here through the Python entry point (it raises
  // IndexError first); should it, the row reads nothing out of bounds and gives NaN.
  // (z_t - m) first: both are large for large logits, their difference is exact.
  const bool valid = target >= 0 && target < p.vocab;
  p.logprobs[r] = valid ? (tf.raw_z(to_acc(x[target])) - m) - log_s : std::numeric_limits<acc_t>::quiet_NaN();
  p.row_max[r] = m;
  p.log_sum[r] = log_s;
  if (ENTROPY) p.entropy[r] = log_s - u / s;
}

template <typename scalar_t, typename acc_t>
FASTPO_INLINE void forward_rows(const Params<scalar_t, acc_t>& p, int64_t begin, int64_t end) {
  const bool entropy = p.entropy != nullptr;
  for (int64_t r = begin; r < end; ++r) {
    if (p.has_softcap) {
      entropy ? forward_row<scalar_t, acc_t, true, true>(p, r) : forward_row<scalar_t, acc_t, true, false>(p, r);
    } else {
      entropy ? forward_row<scalar_t, acc_t, false, true>(p, r) : forward_row<scalar_t, acc_t, false, false>(p, r);
    }
  }
}

// ----------------------------------------------------------------------- backward

// d lp / dz = onehot(target) - p,  d H / dz = -p * (log p + H),  times dz/dx.
template <typename scalar_t, typename acc_t, bool SOFTCAP, bool ENTROPY>
FASTPO_INLINE void backward_row(const Params<scalar_t, acc_t>& p, int64_t r) {
  scalar_t* out = p.grad_logits + r * p.vocab;
  const int64_t target = p.targets[r];
  if (target == p.ignore_index) {
    std::memset(static_cast<void*>(out), 0, sizeof(scalar_t) * p.vocab);
    return;
  }
  const scalar_t* x = p.row(r);
  const auto tf = p.template transform<SOFTCAP>(r);
  const acc_t row_max = p.saved_row_max[r];
  const acc_t log_sum = p.saved_log_sum[r];
  const acc_t g_lp = p.grad_logprobs ? p.grad_logprobs[r] : static_cast<acc_t>(0);
  const acc_t g_h = ENTROPY ? p.grad_entropy[r] : static_cast<acc_t>(0);
  const acc_t h = ENTROPY ? p.saved_entropy[r] : static_cast<acc_t>(0);
  auto grad_z = [&](acc_t z) {
    const acc_t log_p = (z - row_max) - log_sum;
    const acc_t prob = fast_exp(log_p);
    if (!ENTROPY) return -prob * g_lp;
    // p * (log p + H) before the product with g_h: where p = 0, log p is about -FLT_MAX
    // and g_h * log p could overflow, and 0 * inf would be NaN.
    return -(prob * g_lp + (prob * (log_p + h)) * g_h);
  };
  for (int64_t i = 0; i < p.vocab; ++i) {
    acc_t dz;
    const acc_t z = tf.z_and_dz(to_acc(x[i]), dz);
    out[i] = from_acc<scalar_t>(grad_z(z) * dz);
  }
  if (target >= 0 && target < p.vocab) {  // the one-hot term, added before rounding to scalar_t
    acc_t dz;
    const acc_t z = tf.z_and_dz(to_acc(x[target]), dz);
    out[target] = from_acc<scalar_t>((grad_z(z) + g_lp) * dz);
  }
}

template <typename scalar_t, typename acc_t>
FASTPO_INLINE void backward_rows(const Params<scalar_t, acc_t>& p, int64_t begin, int64_t end) {
  const bool entropy = p.grad_entropy != nullptr;
  for (int64_t r = begin; r < end; ++r) {
    if (p.has_softcap) {
      entropy ? backward_row<scalar_t, acc_t, true, true>(p, r) : backward_row<scalar_t, acc_t, true, false>(p, r);
    } else {
      entropy ? backward_row<scalar_t, acc_t, false, true>(p, r) : backward_row<scalar_t, acc_t, false, false>(p, r);
    }
  }
}

}  // namespace

// One non-template entry per dtype, so that target_clones (which GCC applies to plain
// functions) builds each for every instruction set and picks one at load time.
#define FASTPO_ROW_ENTRIES(suffix, scalar_t, acc_t)                                                   \
  FASTPO_CLONES void forward_rows_##suffix(const Params<scalar_t, acc_t>& p, int64_t b, int64_t e) {  \
    forward_rows(p, b, e);                                                                          \
  }                                                                                                 \
  FASTPO_CLONES void backward_rows_##suffix(const Params<scalar_t, acc_t>& p, int64_t b, int64_t e) { \
    backward_rows(p, b, e);                                                                         \
  }                                                                                                 \
  void run_forward(const Params<scalar_t, acc_t>& p, int64_t b, int64_t e) { forward_rows_##suffix(p, b, e); } \
  void run_backward(const Params<scalar_t, acc_t>& p, int64_t b, int64_t e) { backward_rows_##suffix(p, b, e); }

FASTPO_ROW_ENTRIES(f32, float, float)
FASTPO_ROW_ENTRIES(bf16, BFloat16, float)
FASTPO_ROW_ENTRIES(f16, Float16, float)
FASTPO_ROW_ENTRIES(f64, double, double)
#undef FASTPO_ROW_ENTRIES

namespace {

template <typename scalar_t, typename acc_t>
Params<scalar_t, acc_t> make_params(const LogprobsArgs& a) {
  Params<scalar_t, acc_t> p{};
  p.logits = static_cast<const scalar_t*>(a.logits);
  p.n_inner = a.n_inner > 0 ? a.n_inner : 1;
  p.stride_outer = a.stride_outer;
  p.stride_inner = a.stride_inner;
  p.vocab = a.vocab;
  p.targets = a.targets;
  p.temperature = a.temperature;
  p.temp_stride = a.temp_stride;
  p.has_softcap = a.has_softcap;
  p.softcap = static_cast<acc_t>(a.has_softcap ? a.softcap : 1.0);
  p.ignore_index = a.ignore_index;
  p.logprobs = static_cast<acc_t*>(a.logprobs);
  p.entropy = static_cast<acc_t*>(a.entropy);
  p.row_max = static_cast<acc_t*>(a.row_max);
  p.log_sum = static_cast<acc_t*>(a.log_sum);
  p.saved_row_max = static_cast<const acc_t*>(a.saved_row_max);
  p.saved_log_sum = static_cast<const acc_t*>(a.saved_log_sum);
  p.saved_entropy = static_cast<const acc_t*>(a.saved_entropy);
  p.grad_logprobs = static_cast<const acc_t*>(a.grad_logprobs);
  p.grad_entropy = static_cast<const acc_t*>(a.grad_entropy);
  p.grad_logits = static_cast<scalar_t*>(a.grad_logits);
  return p;
}

// Rows are handed out in chunks that read at least ~64k elements each.
template <typename F>
void parallel_rows(int64_t n_rows, int64_t vocab, int num_threads, const F& body) {
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(vocab, 1));
  const int64_t n_chunks = (n_rows + grain - 1) / grain;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads) if (n_chunks > 1 && num_threads > 1)
  for (int64_t chunk = 0; chunk < n_chunks; ++chunk) {
    body(chunk * grain, std::min(n_rows, (chunk + 1) * grain));
  }
}

template <typename F>
void dispatch_dtype(int dtype, const F& f) {
  switch (dtype) {
    case kFloat32: f(float{}, float{}); break;
    case kBFloat16: f(BFloat16{}, float{}); break;
    case kFloat16: f(Float16{}, float{}); break;
    case kFloat64: f(double{}, double{}); break;
    default: break;  // kernels/_native.py only passes the four codes above
  }
}

}  // namespace

void token_logprobs_forward_cpu(const LogprobsArgs& args, int num_threads) {
  dispatch_dtype(args.dtype, [&](auto scalar, auto acc) {
    const auto p = make_params<decltype(scalar), decltype(acc)>(args);
    parallel_rows(args.n_rows, args.vocab, num_threads, [&](int64_t b, int64_t e) { run_forward(p, b, e); });
  });
}

void token_logprobs_backward_cpu(const LogprobsArgs& args, int num_threads) {
  dispatch_dtype(args.dtype, [&](auto scalar, auto acc) {
    const auto p = make_params<decltype(scalar), decltype(acc)>(args);
    parallel_rows(args.n_rows, args.vocab, num_threads, [&](int64_t b, int64_t e) { run_backward(p, b, e); });
  });
}

// ---------------------------------------------------------------------------- GAE

namespace {

// Backward recursion over one sequence (CONVENTIONS.md): delta_t = r_t + gamma*V_next - V_t,
// A_t = delta_t + gamma*lam*A_next, returns = A + V. Masked positions carry no reward
// and are skipped: they get advantage 0 and return 0, and each valid token links to the
// next valid one. V after the last valid token is 0.
template <typename acc_t>
void gae_row(const acc_t* rewards, const acc_t* values, const bool* mask, acc_t* adv, acc_t* ret, int64_t length,
             acc_t gamma, acc_t gamma_lam) {
  acc_t next_value = 0, next_adv = 0;
  for (int64_t t = length - 1; t >= 0; --t) {
    if (!mask[t]) {
      adv[t] = 0;
      ret[t] = 0;
      continue;
    }
    const acc_t delta = rewards[t] + gamma * next_value - values[t];
    next_adv = delta + gamma_lam * next_adv;
    next_value = values[t];
    adv[t] = next_adv;
    ret[t] = next_adv + values[t];
  }
}

template <typename acc_t>
void gae_all(const GaeArgs& a, int num_threads) {
  const auto* r = static_cast<const acc_t*>(a.rewards);
  const auto* v = static_cast<const acc_t*>(a.values);
  auto* adv = static_cast<acc_t*>(a.advantages);
  auto* ret = static_cast<acc_t*>(a.returns);
  parallel_rows(a.n_seq, a.length, num_threads, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t off = i * a.length;
      gae_row<acc_t>(r + off, v + off, a.mask + off, adv + off, ret + off, a.length, static_cast<acc_t>(a.gamma),
                     static_cast<acc_t>(a.gamma * a.lam));
    }
  });
}

}  // namespace

void gae_cpu(const GaeArgs& args, int num_threads) {
  if (args.dtype == kFloat64) {
    gae_all<double>(args, num_threads);
  } else {
    gae_all<float>(args, num_threads);
  }
}

// ------------------------------------------------------------ Fisher-vector product

namespace {

template <typename scalar_t, typename acc_t>
struct FisherParams {
  const scalar_t* logits;
  const scalar_t* u;
  int64_t vocab, n_inner, stride_outer, stride_inner, u_n_inner, u_stride_outer, u_stride_inner;
  const acc_t* temperature;
  int64_t temp_stride;
  const uint8_t* mask;  // null: every row valid
  acc_t* out;
};

// out = p * (u - <p, u>) / T^2 for one row, p = softmax(z), z = x / T. Pass 1 is online over
// blocks: max m, s = sum exp(z - m) and w = sum exp(z - m) * u, so that <p, u> = w / s;
// pass 2 recomputes exp(z - m) and writes the product.
template <typename scalar_t, typename acc_t>
FASTPO_INLINE void fisher_row(const FisherParams<scalar_t, acc_t>& p, int64_t r) {
  acc_t* out = p.out + r * p.vocab;
  if (p.mask != nullptr && p.mask[r] == 0) {  // masked out: zeros, the row is not read
    std::fill(out, out + p.vocab, static_cast<acc_t>(0));
    return;
  }
  const scalar_t* x = p.logits + (r / p.n_inner) * p.stride_outer + (r % p.n_inner) * p.stride_inner;
  const scalar_t* u = p.u + (r / p.u_n_inner) * p.u_stride_outer + (r % p.u_n_inner) * p.u_stride_inner;
  const acc_t inv_temp = static_cast<acc_t>(1) / p.temperature[r * p.temp_stride];
  const auto clamped_z = [inv_temp](acc_t v) {
    const acc_t z = v * inv_temp;
    return z < kLowest<acc_t> ? kLowest<acc_t> : z;
  };
  alignas(64) acc_t z[kBlock];
  acc_t m = kLowest<acc_t>, s = 0, w = 0;
  for (int64_t start = 0; start < p.vocab; start += kBlock) {
    const int64_t n = std::min(kBlock, p.vocab - start);
    const int64_t n_lanes = n - n % kLanes;
    acc_t lane_max[kLanes];
    for (int l = 0; l < kLanes; ++l) lane_max[l] = kLowest<acc_t>;
    for (int64_t i = 0; i < n_lanes; i += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const acc_t v = clamped_z(to_acc(x[start + i + l]));
        z[i + l] = v;
        lane_max[l] = v > lane_max[l] ? v : lane_max[l];
      }
    }
    acc_t block_max = kLowest<acc_t>;
    for (int64_t i = n_lanes; i < n; ++i) {
      z[i] = clamped_z(to_acc(x[start + i]));
      block_max = z[i] > block_max ? z[i] : block_max;
    }
    for (int l = 0; l < kLanes; ++l) block_max = lane_max[l] > block_max ? lane_max[l] : block_max;
    if (block_max > m) {  // rescale what was summed against the old max
      const acc_t alpha = std::exp(m - block_max);
      s *= alpha;
      w *= alpha;
      m = block_max;
    }
    // p == 0 contributes nothing, even where u is not finite.
    acc_t lane_s[kLanes] = {}, lane_w[kLanes] = {};
    for (int64_t i = 0; i < n_lanes; i += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const acc_t e = fast_exp(z[i + l] - m);
        lane_s[l] += e;
        lane_w[l] += e > 0 ? e * to_acc(u[start + i + l]) : static_cast<acc_t>(0);
      }
    }
    for (int64_t i = n_lanes; i < n; ++i) {
      const acc_t e = fast_exp(z[i] - m);
      s += e;
      w += e > 0 ? e * to_acc(u[start + i]) : static_cast<acc_t>(0);
    }
    for (int l = 0; l < kLanes; ++l) {
      s += lane_s[l];
      w += lane_w[l];
    }
  }
  const acc_t mean_u = w / s;
  const acc_t scale = inv_temp * inv_temp / s;
  for (int64_t i = 0; i < p.vocab; ++i) {
    const acc_t e = fast_exp(clamped_z(to_acc(x[i])) - m);
    out[i] = e > 0 ? (e * scale) * (to_acc(u[i]) - mean_u) : static_cast<acc_t>(0);
  }
}

}  // namespace

// One non-template entry per dtype, for target_clones (see FASTPO_ROW_ENTRIES).
#define FASTPO_FISHER_ENTRY(suffix, scalar_t, acc_t)                                                  \
  FASTPO_CLONES void fisher_rows_##suffix(const FisherParams<scalar_t, acc_t>& p, int64_t b, int64_t e) { \
    for (int64_t r = b; r < e; ++r) fisher_row(p, r);                                                 \
  }                                                                                                   \
  void run_fisher(const FisherParams<scalar_t, acc_t>& p, int64_t b, int64_t e) { fisher_rows_##suffix(p, b, e); }

FASTPO_FISHER_ENTRY(f32, float, float)
FASTPO_FISHER_ENTRY(bf16, BFloat16, float)
FASTPO_FISHER_ENTRY(f16, Float16, float)
FASTPO_FISHER_ENTRY(f64, double, double)
#undef FASTPO_FISHER_ENTRY

void fisher_vector_product_cpu(const FisherArgs& a, int num_threads) {
  dispatch_dtype(a.dtype, [&](auto scalar, auto acc) {
    using scalar_t = decltype(scalar);
    using acc_t = decltype(acc);
    const FisherParams<scalar_t, acc_t> p{
        static_cast<const scalar_t*>(a.logits), static_cast<const scalar_t*>(a.u), a.vocab,
        a.n_inner > 0 ? a.n_inner : 1, a.stride_outer, a.stride_inner, a.u_n_inner > 0 ? a.u_n_inner : 1,
        a.u_stride_outer, a.u_stride_inner, static_cast<const acc_t*>(a.temperature), a.temp_stride, a.mask,
        static_cast<acc_t*>(a.out)};
    parallel_rows(a.n_rows, a.vocab, num_threads, [&](int64_t b, int64_t e) { run_fisher(p, b, e); });
  });
}

// -------------------------------------------------------------------------- top-p cut

namespace {

// Bins of the mass histogram: at least kTopPBins, one per kTopPTokensPerBin tokens (the
// torch backend's TOP_P_BINS and TOP_P_TOKENS_PER_BIN), so that the bin holding the cut
// has a few tokens and sorting them is cheap.
constexpr int64_t kTopPBins = 4096;
constexpr int64_t kTopPTokensPerBin = 8;

// One row, as logprobs.py's `_top_p_cut` describes it: the cut lies above
// lower = log((1 - p) / V) - 1, so the histogram of the mass by depth below the max over
// [lower, 0] (deeper tokens in the last bin) locates the bin where the cumulative mass,
// from the top, reaches p * S; that bin's tokens, sorted, give the cut exactly, and the
// kept mass is the bins above plus that bin's tokens from the cut up (ties kept whole:
// equal values share a bin). Bins in the rows' dtype, sums over them in double. When
// p * S exceeds the whole sum by rounding, or the cut falls in the last bin (only by
// rounding), nothing is cut. Two passes over the row; any number of tokens in the bin.
template <typename acc_t>
void top_p_cut_row(const acc_t* shifted, const acc_t* e, int64_t vocab, double top_p, std::vector<int32_t>& bins_of,
                   std::vector<acc_t>& mass, std::vector<std::pair<acc_t, acc_t>>& in_bin, acc_t* cut,
                   acc_t* kept_mass) {
  const int64_t bins = std::max(kTopPBins, vocab / kTopPTokensPerBin);
  const double lower = std::log((1.0 - top_p) / static_cast<double>(vocab)) - 1.0;
  const acc_t to_bin = static_cast<acc_t>(static_cast<double>(bins) / -lower);  // 1 / bin width
  const acc_t last = static_cast<acc_t>(bins - 1);
  // each token's bin (a loop that vectorizes), kept for the second pass; shifted <= 0, so
  // -shifted * to_bin >= 0, and the clamp sends deep tokens (-inf too) to the last bin
  bins_of.resize(static_cast<size_t>(vocab));
  int32_t* bin = bins_of.data();
  for (int64_t v = 0; v < vocab; ++v) bin[v] = static_cast<int32_t>(std::min(last, -shifted[v] * to_bin));
  mass.assign(static_cast<size_t>(bins), acc_t(0));
  for (int64_t v = 0; v < vocab; ++v) mass[bin[v]] += e[v];
  // summed over the bins, in double: the row's mass and, from the top, the bin reaching p * S
  double total = 0.0;
  for (const acc_t m : mass) total += m;
  const double goal = top_p * total;
  double above = 0.0;
  int32_t b = 0;
  while (b < bins && above + mass[b] < goal) above += mass[b++];
  if (b >= bins - 1) {
    *cut = -std::numeric_limits<acc_t>::infinity();
    *kept_mass = static_cast<acc_t>(total);
    return;
  }
  // that bin's tokens, looked for only in the spans of 64 that hold one (a vectorized test)
  in_bin.clear();
  for (int64_t start = 0; start < vocab; start += 64) {
    const int64_t stop = std::min<int64_t>(start + 64, vocab);
    bool any = false;
    for (int64_t v = start; v < stop; ++v) any |= bin[v] == b;
    if (!any) continue;
    for (int64_t v = start; v < stop; ++v) {
      if (bin[v] == b) in_bin.emplace_back(shifted[v], e[v]);
    }
  }
  std::sort(in_bin.begin(), in_bin.end(), [](const auto& x, const auto& y) { return x.first > y.first; });
  // the first token, in descending order, at which the mass reaches p * S; the bin's
  // smallest value when rounding leaves the goal just out of reach
  double reached = above;
  acc_t c = in_bin.back().first;
  for (const auto& [value, weight] : in_bin) {
    reached += weight;
    if (reached >= goal) {
      c = value;
      break;
    }
  }
  double kept = above;
  for (const auto& [value, weight] : in_bin) {
    if (value < c) break;
    kept += weight;
  }
  *cut = c;
  *kept_mass = static_cast<acc_t>(kept);
}

template <typename acc_t>
void top_p_cut_all(const TopPCutArgs& a, int num_threads) {
  const auto* shifted = static_cast<const acc_t*>(a.shifted);
  const auto* e = static_cast<const acc_t*>(a.e);
  auto* cut = static_cast<acc_t*>(a.cut);
  auto* kept = static_cast<acc_t*>(a.kept_mass);
  parallel_rows(a.n_rows, a.vocab, num_threads, [&](int64_t b, int64_t end) {
    std::vector<int32_t> bins_of;
    std::vector<acc_t> mass;
    std::vector<std::pair<acc_t, acc_t>> in_bin;
    for (int64_t r = b; r < end; ++r) {
      const int64_t off = r * a.vocab;
      top_p_cut_row<acc_t>(shifted + off, e + off, a.vocab, a.top_p, bins_of, mass, in_bin, cut + r, kept + r);
    }
  });
}

}  // namespace

void top_p_cut_cpu(const TopPCutArgs& args, int num_threads) {
  if (args.dtype == kFloat64) {
    top_p_cut_all<double>(args, num_threads);
  } else {
    top_p_cut_all<float>(args, num_threads);
  }
}

}  // namespace fastpo
