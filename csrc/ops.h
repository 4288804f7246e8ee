// Declarations of every eagle3 operator implementation (CPU and CUDA).
// The schemas live in torch_bindings.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/util/Optional.h>

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
// The _fc_decode_max_tokens op: checks value, then cuda::fc_decode_max_tokens (launchers.h).
int64_t fc_decode_max_tokens(int64_t value);
// The _fc_mma_max_tokens op: checks value, then cuda::fc_mma_max_tokens (launchers.h).
int64_t fc_mma_max_tokens(int64_t value);
// The _fc_wgmma_min_tokens / _fc_wgmma_tile_n ops: check value, then the launchers.h setter.
int64_t fc_wgmma_min_tokens(int64_t value);
int64_t fc_wgmma_tile_n(int64_t value);
#endif
// The _fc_last_path op: "decode", "mma", "wgmma" or "pair" (normalised copy + GEMM), the
// path of this thread's last rms_norm_cat_linear call ("none" when it had no rows).
std::string fc_last_path();

}  // namespace eagle3
