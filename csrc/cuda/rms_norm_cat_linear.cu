// rms_norm_cat_linear on CUDA.
//
// Present implementation: the normalised concatenation is written once by the
// rms_norm_cat kernel (no norm weights: they are folded into `weight`), then one cuBLAS
// GEMM through ATen. This is the "rms_norm_cat + cuBLAS" pair that the fused kernels
// must beat size by size before they take over (see the fc issue).
#include "cuda/common.cuh"

#include <ATen/ATen.h>

namespace eagle3 {

at::Tensor rms_norm_cat_linear_cuda(const std::vector<at::Tensor>& xs, const at::Tensor& weight, double eps,
                                    const std::string& norm) {
  const char* op = "rms_norm_cat_linear";
  ChunkRows c = check_chunks(op, xs);
  check_linear_weight(c, weight);
  check_eps(op, eps);
  const NormMode mode = parse_norm_mode(op, norm);
  std::vector<int64_t> out_shape = c.out_shape;
  out_shape.back() = weight.size(0);
  at::Tensor xn = at::empty({c.num_rows, c.total_width}, c.rows[0].options());
  cuda::launch_norm_cat(c, {}, static_cast<float>(eps), mode, xn);
  return at::mm(xn, weight.t()).view(out_shape);
}

}  // namespace eagle3
