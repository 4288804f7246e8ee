// One implementation of each op, shared by CPU and CUDA: validate (errors name the
// argument), allocate the outputs, call the backend's launchers.
#include "launchers.h"

#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <atomic>

namespace eagle3 {
namespace {

// The path that served this thread's last rms_norm_cat_linear call (fc_last_path).
thread_local const char* t_last_fc_path = "";
// This thread's last norm launch (norm_last_plan); the CUDA launchers record theirs.
thread_local NormPlan t_last_norm_plan{"none", false, false, 0, -1};

extern const Backend kCpu;
void start_norm_plan(const Backend& b, int64_t rows) {
  t_last_norm_plan = NormPlan{rows == 0 ? "none" : (&b == &kCpu ? "cpu" : "unrecorded"), false, false, 0, -1};
}

at::Tensor rms_norm_cat_impl(const Backend& b, const std::vector<at::Tensor>& xs,
                             const std::vector<OptTensor>& weights, double eps, bool shared_stats) {
  const char* op = "rms_norm_cat";
  const ChunkRows c = check_chunks(op, xs);
  check_norm_weights(op, c, weights);
  check_eps(op, eps);
  at::Tensor out = at::empty({c.num_rows, c.total_width}, c.rows[0].options());
  start_norm_plan(b, c.num_rows);
  if (c.num_rows > 0)
    b.norm_cat(c, weights_as_1d(weights), static_cast<float>(eps),
               shared_stats ? NormMode::kShared : NormMode::kChunk, out);
  return out.view(c.out_shape);
}

std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm_impl(const Backend& b, const at::Tensor& x,
                                                           const at::Tensor& residual, const OptTensor& weight,
                                                           double eps) {
  auto [x2, r2] = check_fused_add(x, residual, weight, eps);
  at::Tensor normed = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor sum = at::empty_like(normed);
  start_norm_plan(b, x2.size(0));
  if (x2.size(0) > 0) {
    at::Tensor n2 = normed.view({-1, x2.size(1)}), s2 = sum.view({-1, x2.size(1)});
    b.fused_add(x2, r2, weight.has_value() ? weight_1d(*weight) : at::Tensor(), static_cast<float>(eps), n2, s2);
  }
  return {normed, sum};
}

std::atomic<bool> g_fc_adjacent_gemm{true};

// The matrix that chunks of consecutive columns of one row-major matrix tile (the serving
// layout: list(aux.chunk(K, -1)) of a [T, K*H] tensor) as a [T, sum H_k] view of their
// storage, or an undefined tensor when they do not: each chunk must be a view of the first
// one's storage starting at its column offset from the first, all with one row stride of
// at least the total width (rows that do not overlap).
at::Tensor adjacent_chunks(const ChunkRows& c) {
  const at::Tensor& x0 = c.rows[0];
  const int64_t stride = x0.stride(0), item = static_cast<int64_t>(x0.element_size());
  const bool one_row = c.num_rows == 1;
  if (!one_row && stride < c.total_width) return {};
  const char* const base = static_cast<const char*>(x0.data_ptr());
  for (size_t k = 0; k < c.rows.size(); ++k) {
    const at::Tensor& x = c.rows[k];
    if (!x.is_alias_of(x0) || (!one_row && x.stride(0) != stride)) return {};
    if (static_cast<const char*>(x.data_ptr()) != base + c.offsets[k] * item) return {};
  }
  return x0.as_strided({c.num_rows, c.total_width}, {one_row ? c.total_width : stride, 1});
}

at::Tensor rms_norm_cat_linear_impl(const Backend& b, const std::vector<at::Tensor>& xs, const at::Tensor& weight,
                                    double eps, const std::string& norm) {
  const char* op = "rms_norm_cat_linear";
  const ChunkRows c = check_chunks(op, xs);
  check_linear_weight(c, weight);
  check_eps(op, eps);
  const NormMode mode = parse_norm_mode(op, norm);
  std::vector<int64_t> out_shape = c.out_shape;
  out_shape.back() = weight.size(0);
  at::Tensor out = at::empty({c.num_rows, weight.size(0)}, c.rows[0].options());
  t_last_fc_path = "none";
  if (c.num_rows == 0) return out.view(out_shape);
  // Below autograd: this op has no derivative formula; the view of the chunks' matrix and
  // the GEMM must not record one (nor refuse out= because an argument requires grad).
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  // Norm "none" over chunks that tile one matrix: the concatenation already exists, and the
  // op is that matrix times weight^T, the GEMM F.linear runs, with nothing to copy. From
  // T = 2 it takes precedence over the CUDA kernels (the mma kernel ran at 0.97-0.99x of
  // F.linear at T = 2..8 in the db66db7 benchmark); at T = 1 the decode kernel goes first
  // (1.02-1.06x of F.linear there).
  const at::Tensor whole = mode == NormMode::kNone && g_fc_adjacent_gemm.load(std::memory_order_relaxed)
                               ? adjacent_chunks(c) : at::Tensor();
  const char* path = nullptr;
  if (!whole.defined() || c.num_rows == 1)
    path = b.fc_direct ? b.fc_direct(c, weight, static_cast<float>(eps), mode, out) : nullptr;
  if (path) {
    t_last_fc_path = path;
    return out.view(out_shape);
  }
  if (whole.defined()) {
    t_last_fc_path = "gemm";
    at::mm_out(out, whole, weight.t());
    return out.view(out_shape);
  }
  t_last_fc_path = "pair";
  // The norm weights are folded into `weight`: normalise without weights, then one GEMM.
  at::Tensor xn = at::empty({c.num_rows, c.total_width}, c.rows[0].options());
  start_norm_plan(b, c.num_rows);
  b.norm_cat(c, {}, static_cast<float>(eps), mode, xn);
  at::mm_out(out, xn, weight.t());
  return out.view(out_shape);
}

const Backend kCpu{&cpu::norm_cat, &cpu::fused_add, nullptr};
#ifdef EAGLE3_WITH_CUDA
const Backend kCuda{&cuda::launch_norm_cat, &cuda::launch_fused_add, &cuda::launch_fc_direct};
#endif

}  // namespace

at::Tensor rms_norm_cat_cpu(const std::vector<at::Tensor>& xs, const std::vector<OptTensor>& weights, double eps,
                            bool shared_stats) {
  return rms_norm_cat_impl(kCpu, xs, weights, eps, shared_stats);
}
std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm_cpu(const at::Tensor& x, const at::Tensor& residual,
                                                          const OptTensor& weight, double eps) {
  return fused_add_rms_norm_impl(kCpu, x, residual, weight, eps);
}
at::Tensor rms_norm_cat_linear_cpu(const std::vector<at::Tensor>& xs, const at::Tensor& weight, double eps,
                                   const std::string& norm) {
  return rms_norm_cat_linear_impl(kCpu, xs, weight, eps, norm);
}

#ifdef EAGLE3_WITH_CUDA
at::Tensor rms_norm_cat_cuda(const std::vector<at::Tensor>& xs, const std::vector<OptTensor>& weights, double eps,
                             bool shared_stats) {
  return rms_norm_cat_impl(kCuda, xs, weights, eps, shared_stats);
}
std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm_cuda(const at::Tensor& x, const at::Tensor& residual,
                                                           const OptTensor& weight, double eps) {
  return fused_add_rms_norm_impl(kCuda, x, residual, weight, eps);
}
at::Tensor rms_norm_cat_linear_cuda(const std::vector<at::Tensor>& xs, const at::Tensor& weight, double eps,
                                    const std::string& norm) {
  return rms_norm_cat_linear_impl(kCuda, xs, weight, eps, norm);
}
#endif

std::string fc_last_path() { return t_last_fc_path; }

int64_t fc_adjacent_gemm(int64_t value) { return query_or_set(g_fc_adjacent_gemm, value); }

void set_norm_last_plan(const NormPlan& plan) { t_last_norm_plan = plan; }

std::string norm_last_plan() {
  const NormPlan& p = t_last_norm_plan;
  std::string s = p.strategy;
  if (p.split) s += "+split";
  if (p.staged_weights) s += "+w";
  if (p.threads > 0) s += " " + std::to_string(p.threads);
  if (p.carveout >= 0) {
    s += " c";
    s += std::to_string(p.carveout);
  }
  return s;
}

// ---- Autograd: the ops have no backward. Rather than return outputs whose gradients would
// silently be missing, a call that autograd would have to differentiate is an error.
namespace {

void check_no_grad(const char* op, bool any_requires_grad) {
  TORCH_CHECK(!(any_requires_grad && at::GradMode::is_enabled()), op,
              ": has no backward, and an input requires grad with grad mode on; call it under "
              "torch.no_grad() / torch.inference_mode(), or use eagle3_ops.reference (differentiable) to train");
}

bool any_requires_grad(const std::vector<at::Tensor>& ts) {
  for (const auto& t : ts)
    if (t.requires_grad()) return true;
  return false;
}

bool any_requires_grad(const std::vector<OptTensor>& ts) {
  for (const auto& t : ts)
    if (t.has_value() && t->requires_grad()) return true;
  return false;
}

template <typename Fn>
c10::TypedOperatorHandle<Fn> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

}  // namespace

// Each kernel redispatches to the keys below autograd of the same call.
at::Tensor rms_norm_cat_autograd(c10::DispatchKeySet ks, const std::vector<at::Tensor>& xs,
                                 const std::vector<OptTensor>& weights, double eps, bool shared_stats) {
  check_no_grad("rms_norm_cat", any_requires_grad(xs) || any_requires_grad(weights));
  static const auto op = op_handle<decltype(rms_norm_cat_cpu)>("eagle3::rms_norm_cat");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.redispatch(ks & c10::after_autograd_keyset, xs, weights, eps, shared_stats);
}

std::tuple<at::Tensor, at::Tensor> fused_add_rms_norm_autograd(c10::DispatchKeySet ks, const at::Tensor& x,
                                                               const at::Tensor& residual, const OptTensor& weight,
                                                               double eps) {
  check_no_grad("fused_add_rms_norm",
                x.requires_grad() || residual.requires_grad() || (weight.has_value() && weight->requires_grad()));
  static const auto op = op_handle<decltype(fused_add_rms_norm_cpu)>("eagle3::fused_add_rms_norm");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.redispatch(ks & c10::after_autograd_keyset, x, residual, weight, eps);
}

at::Tensor rms_norm_cat_linear_autograd(c10::DispatchKeySet ks, const std::vector<at::Tensor>& xs,
                                        const at::Tensor& weight, double eps, const std::string& norm) {
  check_no_grad("rms_norm_cat_linear", any_requires_grad(xs) || weight.requires_grad());
  static const auto op = op_handle<decltype(rms_norm_cat_linear_cpu)>("eagle3::rms_norm_cat_linear");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.redispatch(ks & c10::after_autograd_keyset, xs, weight, eps, norm);
}

}  // namespace eagle3
