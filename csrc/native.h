// Interface between the Python bindings (bindings.cpp) and the CPU / CUDA kernels.
//
// Nothing here depends on torch: tensors cross as raw pointers plus sizes and strides,
// allocated and validated by kernels/_native.py and kernels/logprobs.py. Keeping torch
// headers out of the kernels keeps the JIT build short, and lets the CUDA file compile
// with nvcc alone (the CI compile check) on a machine whose torch is a CPU build.
//
// Rows follow kernels/logprobs.py's `_row_layout`: row r starts at element
// (r / n_inner) * stride_outer + (r % n_inner) * stride_inner of `logits`.
#pragma once

#include <cstdint>

namespace fastpo {

enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kFloat64 = 3 };

// Statistics, log-probs, entropies and incoming gradients are float64 for float64
// logits and float32 otherwise ("acc" below).
struct LogprobsArgs {
  const void* logits;
  int dtype;
  int64_t n_rows, vocab, n_inner, stride_outer, stride_inner;
  const int64_t* targets;     // (n_rows,)
  const float* temperature;   // row r at temperature[r * temp_stride]; stride 0 for a scalar
  int64_t temp_stride;
  bool has_softcap;
  double softcap;
  int64_t ignore_index;
  // forward outputs (acc, n_rows): log-probs, entropy (null when not requested), and
  // the statistics the backward needs, row max m of z and log(sum exp(z - m)); with
  // them lp = (z_t - m) - log_sum, exact even where z_t and m are both large
  void* logprobs;
  void* entropy;
  void* row_max;
  void* log_sum;
  // backward: saved statistics and incoming gradients (acc, n_rows; a null gradient is
  // zero), and the (n_rows, vocab) contiguous gradient in the logits' dtype
  const void* saved_row_max;
  const void* saved_log_sum;
  const void* saved_entropy;
  const void* grad_logprobs;
  const void* grad_entropy;
  void* grad_logits;
};

// GAE over n_seq contiguous sequences of `length` steps; float32 or float64 (dtype).
struct GaeArgs {
  const void* rewards;
  const void* values;
  const bool* mask;
  void* advantages;
  void* returns;
  int dtype;
  int64_t n_seq, length;
  double gamma, lam;
};

// Fisher-vector product of softmax(logits / T) per row (kernels/kl.py):
// out = p * (u - <p, u>) / T^2. `u` has the logits' dtype and its own row layout;
// temperatures and `out` are "acc" (float64 for float64 logits, float32 otherwise).
struct FisherArgs {
  const void* logits;
  const void* u;
  int dtype;
  int64_t n_rows, vocab, n_inner, stride_outer, stride_inner;
  int64_t u_n_inner, u_stride_outer, u_stride_inner;
  const void* temperature;  // acc; row r at temperature[r * temp_stride]
  int64_t temp_stride;
  const uint8_t* mask;  // (n_rows,), nonzero = valid; null: every row valid
  void* out;            // (n_rows, vocab) contiguous, acc
};

// Top-p cut per row (kernels/logprobs.py `_top_p_cut`): over contiguous (n_rows, vocab)
// rows of `shifted` = z - max(z) and `e` = exp(shifted), float32 or float64 (dtype), the
// cut c such that the kept set is {v : shifted_v >= c} (-inf where nothing is cut) and
// the kept mass sum_{kept} e, both (n_rows,) in that dtype.
struct TopPCutArgs {
  const void* shifted;
  const void* e;
  int dtype;
  int64_t n_rows, vocab;
  double top_p;
  void* cut;
  void* kept_mass;
};

void token_logprobs_forward_cpu(const LogprobsArgs& args, int num_threads);
void token_logprobs_backward_cpu(const LogprobsArgs& args, int num_threads);
void gae_cpu(const GaeArgs& args, int num_threads);
void fisher_vector_product_cpu(const FisherArgs& args, int num_threads);
void top_p_cut_cpu(const TopPCutArgs& args, int num_threads);

// CUDA launchers (csrc/cuda/kernels.cu): enqueue on `stream` (a cudaStream_t) and return
// nullptr, or the CUDA error string of a failed launch.
const char* token_logprobs_forward_cuda(const LogprobsArgs& args, void* stream);
const char* token_logprobs_backward_cuda(const LogprobsArgs& args, void* stream);
const char* gae_cuda(const GaeArgs& args, void* stream);
const char* fisher_vector_product_cuda(const FisherArgs& args, void* stream);

}  // namespace fastpo
