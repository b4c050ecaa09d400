// Python bindings of fastpo's native kernels: module fastpo.kernels._C when built by
// setup.py, fastpo_native when JIT-built by kernels/_native.py.
//
// Plain pybind11, no torch headers (they would make the build minutes long): tensors
// arrive as data pointers (Python ints) with their sizes and strides, allocated and
// validated by kernels/_native.py. The GIL is released while a kernel runs.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "native.h"

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

fastpo::LogprobsArgs logprobs_args(uintptr_t logits, int dtype, int64_t n_rows, int64_t vocab, int64_t n_inner,
                                   int64_t stride_outer, int64_t stride_inner, uintptr_t targets,
                                   uintptr_t temperature, int64_t temp_stride, bool has_softcap, double softcap,
                                   int64_t ignore_index) {
  if (dtype < fastpo::kFloat32 || dtype > fastpo::kFloat64) throw std::invalid_argument("unknown dtype code");
  fastpo::LogprobsArgs a{};
  a.logits = ptr<const void>(logits);
  a.dtype = dtype;
  a.n_rows = n_rows;
  a.vocab = vocab;
  a.n_inner = n_inner;
  a.stride_outer = stride_outer;
  a.stride_inner = stride_inner;
  a.targets = ptr<const int64_t>(targets);
  a.temperature = ptr<const float>(temperature);
  a.temp_stride = temp_stride;
  a.has_softcap = has_softcap;
  a.softcap = softcap;
  a.ignore_index = ignore_index;
  return a;
}

fastpo::GaeArgs gae_args(uintptr_t rewards, uintptr_t values, uintptr_t mask, uintptr_t advantages,
                         uintptr_t returns, int dtype, int64_t n_seq, int64_t length, double gamma, double lam) {
  if (dtype != fastpo::kFloat32 && dtype != fastpo::kFloat64) throw std::invalid_argument("gae: float32 or float64");
  return {ptr<const void>(rewards), ptr<const void>(values), ptr<const bool>(mask), ptr<void>(advantages),
          ptr<void>(returns), dtype, n_seq, length, gamma, lam};
}

#ifdef FASTPO_WITH_CUDA
void check_cuda(const char* error) {
  if (error != nullptr) throw std::runtime_error(std::string("fastpo CUDA kernel launch failed: ") + error);
}
#endif

// One Python signature per op, shared by the CPU entry (last argument: thread count)
// and the CUDA entry (last argument: the cudaStream_t as an int).
template <typename Run>
auto forward_entry(Run run) {
  return [run](uintptr_t logits, int dtype, int64_t n_rows, int64_t vocab, int64_t n_inner, int64_t stride_outer,
               int64_t stride_inner, uintptr_t targets, uintptr_t temperature, int64_t temp_stride,
               bool has_softcap, double softcap, int64_t ignore_index, uintptr_t logprobs, uintptr_t entropy,
               uintptr_t row_max, uintptr_t log_sum, uintptr_t device_arg) {
    auto a = logprobs_args(logits, dtype, n_rows, vocab, n_inner, stride_outer, stride_inner, targets, temperature,
                           temp_stride, has_softcap, softcap, ignore_index);
    a.logprobs = ptr<void>(logprobs);
    a.entropy = ptr<void>(entropy);
    a.row_max = ptr<void>(row_max);
    a.log_sum = ptr<void>(log_sum);
    py::gil_scoped_release no_gil;
    run(a, device_arg);
  };
}

template <typename Run>
auto backward_entry(Run run) {
  return [run](uintptr_t logits, int dtype, int64_t n_rows, int64_t vocab, int64_t n_inner, int64_t stride_outer,
               int64_t stride_inner, uintptr_t targets, uintptr_t temperature, int64_t temp_stride,
               bool has_softcap, double softcap, int64_t ignore_index, uintptr_t saved_row_max,
               uintptr_t saved_log_sum, uintptr_t saved_entropy, uintptr_t grad_logprobs, uintptr_t grad_entropy, uintptr_t grad_logits,
               uintptr_t device_arg) {
    auto a = logprobs_args(logits, dtype, n_rows, vocab, n_inner, stride_outer, stride_inner, targets, temperature,
                           temp_stride, has_softcap, softcap, ignore_index);
    a.saved_row_max = ptr<const void>(saved_row_max);
    a.saved_log_sum = ptr<const void>(saved_log_sum);
    a.saved_entropy = ptr<const void>(saved_entropy);
    a.grad_logprobs = ptr<const void>(grad_logprobs);
    a.grad_entropy = ptr<const void>(grad_entropy);
    a.grad_logits = ptr<void>(grad_logits);
    py::gil_scoped_release no_gil;
    run(a, device_arg);
  };
}

template <typename Run>
auto gae_entry(Run run) {
  return [run](uintptr_t rewards, uintptr_t values, uintptr_t mask, uintptr_t advantages, uintptr_t returns,
               int dtype, int64_t n_seq, int64_t length, double gamma, double lam, uintptr_t device_arg) {
    const auto a = gae_args(rewards, values, mask, advantages, returns, dtype, n_seq, length, gamma, lam);
    py::gil_scoped_release no_gil;
    run(a, device_arg);
  };
}

template <typename Run>
auto fisher_entry(Run run) {
  return [run](uintptr_t logits, uintptr_t u, int dtype, int64_t n_rows, int64_t vocab, int64_t n_inner,
               int64_t stride_outer, int64_t stride_inner, int64_t u_n_inner, int64_t u_stride_outer,
               int64_t u_stride_inner, uintptr_t temperature, int64_t temp_stride, uintptr_t mask, uintptr_t out,
               uintptr_t device_arg) {
    if (dtype < fastpo::kFloat32 || dtype > fastpo::kFloat64) throw std::invalid_argument("unknown dtype code");
    const fastpo::FisherArgs a{ptr<const void>(logits), ptr<const void>(u), dtype, n_rows, vocab, n_inner,
                               stride_outer, stride_inner, u_n_inner, u_stride_outer, u_stride_inner,
                               ptr<const void>(temperature), temp_stride, ptr<const uint8_t>(mask), ptr<void>(out)};
    py::gil_scoped_release no_gil;
    run(a, device_arg);
  };
}

auto top_p_cut_entry() {
  return [](uintptr_t shifted, uintptr_t e, int dtype, int64_t n_rows, int64_t vocab, double top_p, uintptr_t cut,
            uintptr_t kept_mass, uintptr_t threads) {
    if (dtype != fastpo::kFloat32 && dtype != fastpo::kFloat64) {
      throw std::invalid_argument("top_p_cut: float32 or float64");
    }
    const fastpo::TopPCutArgs a{ptr<const void>(shifted), ptr<const void>(e), dtype, n_rows, vocab, top_p,
                                ptr<void>(cut), ptr<void>(kept_mass)};
    py::gil_scoped_release no_gil;
    fastpo::top_p_cut_cpu(a, static_cast<int>(threads));
  };
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastpo native kernels (C++ with OpenMP, and CUDA C++ when built with CUDA)";
  m.def("token_logprobs_forward_cpu", forward_entry([](const fastpo::LogprobsArgs& a, uintptr_t threads) {
          fastpo::token_logprobs_forward_cpu(a, static_cast<int>(threads));
        }));
  m.def("token_logprobs_backward_cpu", backward_entry([](const fastpo::LogprobsArgs& a, uintptr_t threads) {
          fastpo::token_logprobs_backward_cpu(a, static_cast<int>(threads));
        }));
  m.def("gae_cpu", gae_entry([](const fastpo::GaeArgs& a, uintptr_t threads) {
          fastpo::gae_cpu(a, static_cast<int>(threads));
        }));
  m.def("fisher_vector_product_cpu", fisher_entry([](const fastpo::FisherArgs& a, uintptr_t threads) {
          fastpo::fisher_vector_product_cpu(a, static_cast<int>(threads));
        }));
  m.def("top_p_cut_cpu", top_p_cut_entry());
#ifdef FASTPO_WITH_CUDA
  m.attr("has_cuda") = true;
  m.def("token_logprobs_forward_cuda", forward_entry([](const fastpo::LogprobsArgs& a, uintptr_t stream) {
          check_cuda(fastpo::token_logprobs_forward_cuda(a, ptr<void>(stream)));
        }));
  m.def("token_logprobs_backward_cuda", backward_entry([](const fastpo::LogprobsArgs& a, uintptr_t stream) {
          check_cuda(fastpo::token_logprobs_backward_cuda(a, ptr<void>(stream)));
        }));
  m.def("gae_cuda", gae_entry([](const fastpo::GaeArgs& a, uintptr_t stream) {
          check_cuda(fastpo::gae_cuda(a, ptr<void>(stream)));
        }));
  m.def("fisher_vector_product_cuda", fisher_entry([](const fastpo::FisherArgs& a, uintptr_t stream) {
          check_cuda(fastpo::fisher_vector_product_cuda(a, ptr<void>(stream)));
        }));
#else
  m.attr("has_cuda") = false;
#endif
}
