// Declarations of every eagle3 operator implementation (CPU and CUDA).
// The schemas live in torch_bindings.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/util/Optional.h>

#include <atomic>
#include <string>
#include <tuple>
#include <vector>

namespace eagle3 {

using OptTensor = std::optional<at::Tensor>;

at::Tensor rms_norm_cat_cpu(const std::vector<at::Tensor>& xs, const std::vector<OptTensor>& weights,
                            double eps, bool shared_stats);
std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm_cpu(const at::Tensor& x, const at::Tensor& residual,
                                                          const OptTensor& weight, double eps);
at::Tensor rms_norm_cat_linear_cpu(const std::vector<at::Tensor>& xs, const at::Tensor& weight, double eps,
                                   const std::string& norm);

// Autograd: an error when autograd would have to differentiate the call, else the op below autograd.
at::Tensor rms_norm_cat_autograd(c10::DispatchKeySet ks, const std::vector<at::Tensor>& xs,
                                 const std::vector<OptTensor>& weights, double eps, bool shared_stats);
std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm_autograd(c10::DispatchKeySet ks, const at::Tensor& x,
                                                               const at::Tensor& residual, const OptTensor& weight,
                                                               double eps);
at::Tensor rms_norm_cat_linear_autograd(c10::DispatchKeySet ks, const std::vector<at::Tensor>& xs,
                                        const at::Tensor& weight, double eps, const std::string& norm);

#ifdef EAGLE3_WITH_CUDA
at::Tensor rms_norm_cat_cuda(const std::vector<at::Tensor>& xs, const std::vector<OptTensor>& weights,
                             double eps, bool shared_stats);
std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm_cuda(const at::Tensor& x, const at::Tensor& residual,
                                                           const OptTensor& weight, double eps);
at::Tensor rms_norm_cat_linear_cuda(const std::vector<at::Tensor>& xs, const at::Tensor& weight, double eps,
                                    const std::string& norm);
#endif
// A strategy switch's setter (the _norm_* / _fc_* ops): a negative value queries `state`,
// any other value sets it (a bool: nonzero is true); returns the previous value (a bool as
// 0 / 1). The ops validate the value first (torch_bindings.cpp).
template <typename V>
int64_t query_or_set(std::atomic<V>& state, int64_t value) {
  if (value < 0) return static_cast<int64_t>(state.load());
  return static_cast<int64_t>(state.exchange(static_cast<V>(value)));
}

// The _fc_last_path op: "decode", "mma", "wgmma", "gemm" (norm "none" over adjacent chunks:
// one GEMM on the matrix they tile) or "pair" (normalised copy + GEMM), the path of this
// thread's last rms_norm_cat_linear call ("none" when it had no rows).
std::string fc_last_path();
// The _fc_adjacent_gemm switch (1, the default: rms_norm_cat_linear with norm "none" over
// chunks that are consecutive column ranges of one row-major matrix runs one GEMM on that
// matrix; 0: the CUDA fc kernels or the pair serve it); sets it and returns the previous
// value, -1 only queries.
int64_t fc_adjacent_gemm(int64_t value);
// The _norm_last_plan op: this thread's last norm launch as "<strategy>[+split][+w] <threads>"
// (e.g. "staged+w 128"), "cpu", or "none" when it had no rows.
std::string norm_last_plan();

}  // namespace eagle3
