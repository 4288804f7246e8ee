// CPU launchers: fill the row kernels' arguments and call the best kernel table.
#include "cpu/norm_kernels.h"
#include "launchers.h"

#include <ATen/ATen.h>

#include <cstdlib>
#include <string>

namespace eagle3::cpu {

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

void norm_cat(const ChunkRows& c, const std::vector<at::Tensor>& weights_1d, float eps, NormMode mode,
              at::Tensor& out) {
  std::vector<Chunk> chunks(c.rows.size());
  for (size_t k = 0; k < c.rows.size(); ++k) {
    const at::Tensor* w = weights_1d.empty() || !weights_1d[k].defined() ? nullptr : &weights_1d[k];
    chunks[k] = {c.rows[k].data_ptr(), c.rows[k].stride(0), c.widths[k], w ? w->data_ptr() : nullptr,
                 w ? w->scalar_type() == at::kFloat : false, c.offsets[k]};
  }
  best_kernels().rms_norm_cat(NormCatArgs{chunks.data(), static_cast<int>(chunks.size()), c.num_rows,
                                          out.data_ptr(), c.total_width, eps, static_cast<int>(mode),
                                          out.scalar_type()});
}

void fused_add(const at::Tensor& x2, const at::Tensor& r2, const at::Tensor& w, float eps, at::Tensor& normed,
               at::Tensor& sum) {
  best_kernels().fused_add_rms_norm(FusedAddArgs{
      x2.data_ptr(), x2.stride(0), r2.data_ptr(), r2.stride(0), w.defined() ? w.data_ptr() : nullptr,
      w.defined() && w.scalar_type() == at::kFloat, x2.size(0), x2.size(1), normed.data_ptr(), sum.data_ptr(), eps,
      x2.scalar_type()});
}

}  // namespace eagle3::cpu
