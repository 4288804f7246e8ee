#include "checks.h"

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <sstream>

namespace eagle3 {

namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

std::string shape_str(at::IntArrayRef s) {
  std::ostringstream os;
  os << s;
  return os.str();
}

}  // namespace

at::Tensor as_rows(const at::Tensor& x) {
  const int64_t h = x.size(-1);
  at::Tensor t = x.stride(-1) == 1 || h == 1 ? x : x.contiguous();
  // reshape returns a view whenever the leading dimensions can be merged (the usual
  // [T, K*H].chunk(K, -1) views included), and copies only when they cannot.
  return t.reshape({-1, h});
}

at::Tensor weight_1d(const at::Tensor& w) { return w.is_contiguous() ? w : w.contiguous(); }

std::vector<at::Tensor> weights_as_1d(const std::vector<OptTensor>& weights) {
  std::vector<at::Tensor> out;
  out.reserve(weights.size());
  for (const auto& w : weights) out.push_back(w.has_value() ? weight_1d(*w) : at::Tensor());
  return out;
}

void check_eps(const char* op, double eps) {
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0.0, op, ": eps must be a finite number > 0, got ", eps);
}

NormMode parse_norm_mode(const char* op, const std::string& norm) {
  if (norm == "chunk") return NormMode::kChunk;
  if (norm == "shared") return NormMode::kShared;
  if (norm == "none") return NormMode::kNone;
  TORCH_CHECK_VALUE(false, op, ": norm must be one of \"none\", \"chunk\", \"shared\", got \"", norm, "\"");
  return NormMode::kNone;  // not reached
}

ChunkRows check_chunks(const char* op, const std::vector<at::Tensor>& xs) {
  TORCH_CHECK_VALUE(!xs.empty(), op, ": xs must hold at least one tensor, got an empty list");
  const at::Tensor& x0 = xs[0];
  TORCH_CHECK_VALUE(x0.dim() >= 1, op, ": xs[0] must have at least one dimension [..., H], got a 0-d tensor");
  TORCH_CHECK_TYPE(is_supported_float(x0.scalar_type()), op,
                   ": xs must be float32, float16 or bfloat16, got xs[0] of dtype ", x0.scalar_type());
  const auto lead = x0.sizes().slice(0, x0.dim() - 1);
  ChunkRows c;
  for (size_t k = 0; k < xs.size(); ++k) {
    const at::Tensor& x = xs[k];
    TORCH_CHECK_VALUE(x.dim() >= 1, op, ": xs[", k, "] must have at least one dimension, got a 0-d tensor");
    TORCH_CHECK_TYPE(x.scalar_type() == x0.scalar_type(), op, ": all xs must share one dtype; xs[0] is ",
                     x0.scalar_type(), " but xs[", k, "] is ", x.scalar_type());
    TORCH_CHECK_VALUE(x.device() == x0.device(), op, ": all xs must be on one device; xs[0] is on ", x0.device(),
                      " but xs[", k, "] is on ", x.device());
    TORCH_CHECK_VALUE(x.sizes().slice(0, x.dim() - 1) == lead, op,
                      ": all xs must have the same leading shape; xs[0] is ", shape_str(x0.sizes()), " but xs[", k,
                      "] is ", shape_str(x.sizes()));
    TORCH_CHECK_VALUE(x.size(-1) >= 1, op, ": xs[", k, "] has an empty last dimension; expected width >= 1");
    c.widths.push_back(x.size(-1));
    c.offsets.push_back(c.total_width);
    c.total_width += x.size(-1);
  }
  TORCH_CHECK_VALUE(xs.size() <= static_cast<size_t>(kMaxChunks), op, ": xs may hold at most ", kMaxChunks,
                    " tensors, got ", xs.size());
  TORCH_CHECK_VALUE(c.total_width <= kMaxWidth, op, ": the widths of xs add up to ", c.total_width,
                    "; expected at most ", kMaxWidth);
  c.num_rows = 1;
  for (int64_t s : lead) c.num_rows *= s;
  c.out_shape.assign(lead.begin(), lead.end());
  c.out_shape.push_back(c.total_width);
  c.rows.reserve(xs.size());
  for (const at::Tensor& x : xs) c.rows.push_back(as_rows(x));
  return c;
}

void check_norm_weights(const char* op, const ChunkRows& c, const std::vector<OptTensor>& weights) {
  const size_t k_count = c.widths.size();
  TORCH_CHECK_VALUE(weights.size() == k_count, op, ": weights must have one entry (a tensor or None) per input; got ",
                    weights.size(), " weights for ", k_count, " inputs");
  const at::Tensor& x0 = c.rows[0];
  for (size_t k = 0; k < k_count; ++k) {
    if (!weights[k].has_value()) continue;
    const at::Tensor& w = *weights[k];
    TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == c.widths[k], op, ": weights[", k, "] must be 1-D of length ",
                      c.widths[k], " (the width of xs[", k, "]), got shape ", shape_str(w.sizes()));
    TORCH_CHECK_TYPE(w.scalar_type() == x0.scalar_type() || w.scalar_type() == at::kFloat, op, ": weights[", k,
                     "] must be of x's dtype (", x0.scalar_type(), ") or float32, got ", w.scalar_type());
    TORCH_CHECK_VALUE(w.device() == x0.device(), op, ": weights[", k, "] is on ", w.device(),
                      " but xs are on ", x0.device());
  }
}

std::pair<at::Tensor, at::Tensor> check_fused_add(const at::Tensor& x, const at::Tensor& residual,
                                                  const OptTensor& weight, double eps) {
  const char* op = "fused_add_rms_norm";
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least one dimension [..., H], got a 0-d tensor");
  TORCH_CHECK_TYPE(is_supported_float(x.scalar_type()), op,
                   ": x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_TYPE(residual.scalar_type() == x.scalar_type(), op, ": residual must have x's dtype (",
                   x.scalar_type(), "), got ", residual.scalar_type());
  TORCH_CHECK_VALUE(residual.device() == x.device(), op, ": residual is on ", residual.device(), " but x is on ",
                    x.device());
  TORCH_CHECK_VALUE(residual.sizes() == x.sizes(), op, ": residual must have x's shape ", shape_str(x.sizes()),
                    ", got ", shape_str(residual.sizes()));
  TORCH_CHECK_VALUE(x.size(-1) >= 1, op, ": x has an empty last dimension; expected H >= 1");
  TORCH_CHECK_VALUE(x.size(-1) <= kMaxWidth, op, ": x's last dimension H = ", x.size(-1), " exceeds ",
                    kMaxWidth);
  if (weight.has_value()) {
    const at::Tensor& w = *weight;
    TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == x.size(-1), op, ": weight must be 1-D of length ", x.size(-1),
                      ", got shape ", shape_str(w.sizes()));
    TORCH_CHECK_TYPE(w.scalar_type() == x.scalar_type() || w.scalar_type() == at::kFloat, op,
                     ": weight must be of x's dtype (", x.scalar_type(), ") or float32, got ", w.scalar_type());
    TORCH_CHECK_VALUE(w.device() == x.device(), op, ": weight is on ", w.device(), " but x is on ", x.device());
  }
  check_eps(op, eps);
  return {as_rows(x), as_rows(residual)};
}

void check_linear_weight(const ChunkRows& c, const at::Tensor& weight) {
  const char* op = "rms_norm_cat_linear";
  const at::Tensor& x0 = c.rows[0];
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be 2-D [N, sum H_k] = [N, ", c.total_width,
                    "], got shape ", shape_str(weight.sizes()));
  TORCH_CHECK_VALUE(weight.size(1) == c.total_width, op, ": weight must have sum H_k = ", c.total_width,
                    " columns (the widths of xs added up), got shape ", shape_str(weight.sizes()));
  TORCH_CHECK_TYPE(weight.scalar_type() == x0.scalar_type(), op, ": weight must have x's dtype (",
                   x0.scalar_type(), "), got ", weight.scalar_type(),
                   " (fold the norm weights with eagle3_ops.fold_norm_weights and cast once)");
  TORCH_CHECK_VALUE(weight.device() == x0.device(), op, ": weight is on ", weight.device(), " but xs are on ",
                    x0.device());
}

}  // namespace eagle3
