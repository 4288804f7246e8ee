// CPU launchers: validate, allocate, fill the kernel arguments, call the row kernels.
#include "checks.h"
#include "cpu/norm_kernels.h"

#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>

namespace eagle3 {
namespace cpu {

const KernelTable& best_kernels() {
  static const KernelTable table = [] {
    const char* want = std::getenv("EAGLE3_CPU_ISA");
    const std::string w = want ? want : "";
#if defined(EAGLE3_HAVE_AVX512)
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    if (avx512 && (w.empty() || w == "avx512")) return cpu_avx512::kernels();
#endif
#if defined(EAGLE3_HAVE_AVX2)
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c");
    if (avx2 && (w.empty() || w == "avx2" || w == "avx512")) return cpu_avx2::kernels();
#endif
    return cpu_default::kernels();
  }();
  return table;
}

}  // namespace cpu

namespace {

std::vector<cpu::Chunk> make_chunks(const ChunkRows& c, const std::vector<at::Tensor>& weights_1d) {
  std::vector<cpu::Chunk> chunks(c.rows.size());
  for (size_t k = 0; k < c.rows.size(); ++k) {
    const at::Tensor* w = weights_1d.empty() || !weights_1d[k].defined() ? nullptr : &weights_1d[k];
    chunks[k] = {c.rows[k].data_ptr(), c.rows[k].stride(0), c.widths[k], w ? w->data_ptr() : nullptr,
                 w ? w->scalar_type() == at::kFloat : false, c.offsets[k]};
  }
  return chunks;
}

// Normalises (or, for kNone, just concatenates) the chunks into a new [T, sum H_k] tensor.
at::Tensor norm_cat_rows(const ChunkRows& c, const std::vector<at::Tensor>& weights_1d, double eps, NormMode mode) {
  TORCH_CHECK_VALUE(c.rows.size() <= static_cast<size_t>(kMaxChunks), "eagle3: at most ", kMaxChunks,
                    " inputs are supported, got ", c.rows.size());
  at::Tensor out = at::empty({c.num_rows, c.total_width}, c.rows[0].options());
  if (c.num_rows == 0) return out;
  const std::vector<cpu::Chunk> chunks = make_chunks(c, weights_1d);
  cpu::NormCatArgs args{chunks.data(), static_cast<int>(chunks.size()), c.num_rows, out.data_ptr(),
                        c.total_width, static_cast<float>(eps), static_cast<int>(mode), out.scalar_type()};
  cpu::best_kernels().rms_norm_cat(args);
  return out;
}

}  // namespace

at::Tensor rms_norm_cat_cpu(const std::vector<at::Tensor>& xs, const std::vector<OptTensor>& weights, double eps,
                            bool shared_stats) {
  const char* op = "rms_norm_cat";
  ChunkRows c = check_chunks(op, xs);
  check_norm_weights(op, c, weights);
  check_eps(op, eps);
  at::Tensor out = norm_cat_rows(c, weights_as_1d(weights), eps, shared_stats ? NormMode::kShared : NormMode::kChunk);
  return out.view(c.out_shape);
}

std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm_cpu(const at::Tensor& x, const at::Tensor& residual,
                                                          const OptTensor& weight, double eps) {
  auto [x2, r2] = check_fused_add(x, residual, weight, eps);
  at::Tensor normed = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor sum = at::empty_like(normed);
  if (x2.size(0) == 0) return {normed, sum};
  at::Tensor w = weight.has_value() ? weight_1d(*weight) : at::Tensor();
  cpu::FusedAddArgs args{x2.data_ptr(),   x2.stride(0),      r2.data_ptr(),    r2.stride(0),
                         w.defined() ? w.data_ptr() : nullptr, w.defined() && w.scalar_type() == at::kFloat,
                         x2.size(0),      x2.size(1),        normed.data_ptr(), sum.data_ptr(),
                         static_cast<float>(eps), x.scalar_type()};
  cpu::best_kernels().fused_add_rms_norm(args);
  return {normed, sum};
}

at::Tensor rms_norm_cat_linear_cpu(const std::vector<at::Tensor>& xs, const at::Tensor& weight, double eps,
                                   const std::string& norm) {
  const char* op = "rms_norm_cat_linear";
  ChunkRows c = check_chunks(op, xs);
  check_linear_weight(c, weight);
  check_eps(op, eps);
  const NormMode mode = parse_norm_mode(op, norm);
  std::vector<int64_t> out_shape = c.out_shape;
  out_shape.back() = weight.size(0);
  // The norm weights are folded into `weight`, so the rows are normalised without weights,
  // then one GEMM (ATen's matmul) applies the folded fc.
  at::Tensor xn = norm_cat_rows(c, {}, eps, mode);
  return at::mm(xn, weight.t()).view(out_shape);
}

}  // namespace eagle3
