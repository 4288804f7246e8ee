// fused_add_rms_norm on CUDA: (normed, residual_sum) in one launch.
//
// One block per row (the grid is T blocks; the row loop only matters past 2^31 - 1 rows).
// x and residual rows are staged in shared memory with 16-byte cp.async copies; sweep 1
// forms s = x + residual in fp32, writes it rounded and sums its squares; after the barrier
// around the per-warp sums, sweep 2 forms s again from the staged rows and writes the
// normalised row. Each thread touches only the elements it staged itself. Rows past the
// stage limit are read twice from global memory; with _norm_registers(1) qualifying rows
// are kept in registers instead (fused_add_rms_norm_regs_kernel). With _norm_stage_weights(n),
// a launch of at most n rows loads the norm weight with the rows: the staged kernel into
// shared memory (as rms_norm_cat), the register kernel into registers.
#include "cuda/common.cuh"

#include <ATen/ATen.h>

namespace eagle3::cuda {
namespace {

constexpr int kMaxThreads = 512;

// s = a + b in fp32: accumulates its squares into ss, returns it rounded to T.
template <typename T>
__device__ __forceinline__ Vec<T> sum_vec(const Vec<T>& a, const Vec<T>& b, float& ss) {
  Vec<T> s;
#pragma unroll
  for (int j = 0; j < Vec<T>::N; ++j) {
    const float f = to_float(a.v[j]) + to_float(b.v[j]);
    ss += f * f;
    s.v[j] = from_float<T>(f);
  }
  return s;
}

// (a + b) * scale * weight, formed in fp32 from the unrounded sum, rounded once to T.
template <typename T>
__device__ __forceinline__ Vec<T> normed_of(const Vec<T>& a, const Vec<T>& b, float scale,
                                            const float (&wv)[Vec<T>::N]) {
  Vec<T> y;
#pragma unroll
  for (int j = 0; j < Vec<T>::N; ++j) y.v[j] = from_float<T>((to_float(a.v[j]) + to_float(b.v[j])) * scale * wv[j]);
  return y;
}
// The same with the weight from global memory, or (kStagedW) from the block's shared-memory
// copy.
template <typename T, bool kStagedW = false>
__device__ __forceinline__ Vec<T> normed_vec(const Vec<T>& a, const Vec<T>& b, float scale, const void* w,
                                             int w_kind, int64_t i) {
  float wv[Vec<T>::N];
  load_weight_vec<T, kStagedW>(w, w_kind, i, wv);
  return normed_of(a, b, scale, wv);
}

// rsqrt(mean of the row's squares + eps) from each thread's partial sum ss; warp_sums holds
// one float per warp. The caller syncs before warp_sums is written again.
__device__ __forceinline__ float row_scale(float ss, float* warp_sums, int width, float eps) {
  ss = warp_sum(ss);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = ss;
  __syncthreads();
  float total = 0.f;
  for (int i = 0; i < static_cast<int>(blockDim.x / 32); ++i) total += warp_sums[i];
  return rsqrtf(total / static_cast<float>(width) + eps);
}

// stage_w (staged kernel, vec rows, a weight; set_norm_stage_weights): the weight is copied
// into shared memory after the two rows with their copies (stage_weight_vec).
template <typename T, bool kStaged>
__global__ void __launch_bounds__(kMaxThreads)
fused_add_rms_norm_kernel(const T* __restrict__ x, const int64_t x_stride,        // [T, H]
                          const T* __restrict__ res, const int64_t res_stride,    // [T, H]
                          const void* __restrict__ w, const int w_kind,           // [H] or null
                          T* __restrict__ normed, T* __restrict__ sum,            // [T, H] contiguous
                          const int64_t num_rows, const int width, const float eps, const bool vec,
                          const bool stage_w) {
  constexpr int V = Vec<T>::N;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* warp_sums = reinterpret_cast<float*>(smem_raw);  // [nwarps], 32 floats reserved
  const int width_pad = (width + V - 1) / V * V;
  T* stage_x = reinterpret_cast<T*>(smem_raw + 32 * sizeof(float));
  T* stage_r = stage_x + width_pad;
  void* stage_wt = stage_r + width_pad;  // the weight's own size per element

  for (int64_t row = blockIdx.x; row < num_rows; row += gridDim.x) {
    const T* xr = x + row * x_stride;
    const T* rr = res + row * res_stride;
    if constexpr (kStaged) {
      if (vec) {
        for (int i = threadIdx.x * V; i < width; i += blockDim.x * V) {
          cp_async16(stage_x + i, xr + i);
          cp_async16(stage_r + i, rr + i);
          if (stage_w) stage_weight_vec<T>(stage_wt, w, w_kind, i);
        }
      } else {
        for (int i = threadIdx.x; i < width; i += blockDim.x) { stage_x[i] = xr[i]; stage_r[i] = rr[i]; }
      }
      cp_async_wait_all();
      xr = stage_x;
      rr = stage_r;
    }
    T* sum_row = sum + row * static_cast<int64_t>(width);
    T* out_row = normed + row * static_cast<int64_t>(width);
    float ss = 0.f;
    if (vec) {
      for (int i = threadIdx.x * V; i < width; i += blockDim.x * V)
        store_vec(sum_row + i, sum_vec(load_vec(xr + i), load_vec(rr + i), ss));
    } else {
      for (int i = threadIdx.x; i < width; i += blockDim.x) {
        const float f = to_float(xr[i]) + to_float(rr[i]);
        ss += f * f;
        sum_row[i] = from_float<T>(f);
      }
    }
    const float scale = row_scale(ss, warp_sums, width, eps);
    if (kStaged && stage_w) {  // vec: the launcher stages weights only for 16-byte rows
      for (int i = threadIdx.x * V; i < width; i += blockDim.x * V)
        store_vec(out_row + i, normed_vec<T, true>(load_vec(xr + i), load_vec(rr + i), scale, stage_wt, w_kind, i));
    } else if (vec) {
      for (int i = threadIdx.x * V; i < width; i += blockDim.x * V)
        store_vec(out_row + i, normed_vec(load_vec(xr + i), load_vec(rr + i), scale, w, w_kind, i));
    } else {
      for (int i = threadIdx.x; i < width; i += blockDim.x) {
        out_row[i] = from_float<T>((to_float(xr[i]) + to_float(rr[i])) * scale * weight_at<T>(w, w_kind, i));
      }
    }
    __syncthreads();  // warp_sums and the stage are reused by the block's next row
  }
}

// The register-resident strategy (norm_registers): every thread streams its NV vectors of
// x and of residual into registers (all loads of the row in flight at once), writes
// s = x + residual and sums its squares, then writes the normalised row from the same
// registers. Nothing is staged; the row is read from memory once. kPreW (launches of up to
// _norm_stage_weights rows, with a weight): each thread also loads its vectors' norm
// weights with the row, so they arrive in the row's one round trip rather than as a
// dependent load after the reduction (the staged kernel's weight staging, in registers).
// One instance per NV (1, 2 or kRegVecs: with_reg_vecs), which sizes the register arrays.
template <typename T, bool kPreW, int NV>
__global__ void __launch_bounds__(kRegMaxThreads)
fused_add_rms_norm_regs_kernel(const T* __restrict__ x, const int64_t x_stride, const T* __restrict__ res,
                               const int64_t res_stride, const void* __restrict__ w, const int w_kind,
                               T* __restrict__ normed, T* __restrict__ sum, const int64_t num_rows, const int width,
                               const float eps) {
  constexpr int V = Vec<T>::N;
  __shared__ float warp_sums[kRegMaxThreads / 32];
  for (int64_t row = blockIdx.x; row < num_rows; row += gridDim.x) {
    const T* xr = x + row * x_stride;
    const T* rr = res + row * res_stride;
    Vec<T> a[NV], b[NV];
    WeightRaw wr[kPreW ? NV : 1];
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int i = (threadIdx.x + j * blockDim.x) * V;
      if (i < width) {
        a[j] = load_vec_stream(xr + i);
        b[j] = load_vec_stream(rr + i);
        if constexpr (kPreW) wr[j] = prefetch_weight_vec<T>(w, w_kind, i);
      }
    }
    T* sum_row = sum + row * static_cast<int64_t>(width);
    T* out_row = normed + row * static_cast<int64_t>(width);
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int i = (threadIdx.x + j * blockDim.x) * V;
      if (i < width) store_vec_stream(sum_row + i, sum_vec(a[j], b[j], ss));
    }
    const float scale = row_scale(ss, warp_sums, width, eps);
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int i = (threadIdx.x + j * blockDim.x) * V;
      if (i >= width) continue;
      if constexpr (kPreW) {
        float wv[V];
        weights_of<T>(wr[j], w_kind, wv);
        store_vec_stream(out_row + i, normed_of(a[j], b[j], scale, wv));
      } else {
        store_vec_stream(out_row + i, normed_vec(a[j], b[j], scale, w, w_kind, i));
      }
    }
    __syncthreads();  // warp_sums are reused by the block's next row
  }
}

}  // namespace

void launch_fused_add(const at::Tensor& x2, const at::Tensor& r2, const at::Tensor& w, float eps, at::Tensor& normed,
                      at::Tensor& sum) {
  const int64_t rows = x2.size(0), width = x2.size(1);  // width <= INT32_MAX (checked by check_fused_add)
  if (rows == 0) return;
  const c10::cuda::CUDAGuard guard(x2.device());
  const int device = x2.get_device();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device);

  EAGLE3_DISPATCH_FLOAT_TYPES(x2.scalar_type(), "fused_add_rms_norm", [&] {
    constexpr int V = Vec<scalar_t>::N;
    const void* wp = w.defined() ? w.data_ptr() : nullptr;
    const int w_kind = weight_kind(&w, x2.scalar_type());
    const bool vec = aligned16(x2.data_ptr()) && aligned16(r2.data_ptr()) && aligned16(normed.data_ptr()) &&
                     aligned16(sum.data_ptr()) && x2.stride(0) % V == 0 &&
                     r2.stride(0) % V == 0 && width % V == 0 && (wp == nullptr || aligned16(wp));
    const int64_t grid = std::min<int64_t>(rows, INT32_MAX);
    if (const int rthreads = reg_threads(vec ? width / V : width, 1, vec, rows); rthreads > 0) {
      // (reg_threads takes only 16-byte rows, so the weight, if any, is 16-byte aligned)
      const bool pre_w = wp != nullptr && rows <= set_norm_stage_weights(-1);
      with_reg_vecs(width / V, rthreads, [&](auto nv) {
        constexpr int NV = decltype(nv)::value;
        auto* kernel = pre_w ? fused_add_rms_norm_regs_kernel<scalar_t, true, NV>
                             : fused_add_rms_norm_regs_kernel<scalar_t, false, NV>;
        kernel<<<static_cast<unsigned>(grid), rthreads, 0, stream>>>(
            static_cast<const scalar_t*>(x2.data_ptr()), x2.stride(0), static_cast<const scalar_t*>(r2.data_ptr()),
            r2.stride(0), wp, w_kind, static_cast<scalar_t*>(normed.data_ptr()),
            static_cast<scalar_t*>(sum.data_ptr()), rows, static_cast<int>(width), eps);
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      set_norm_last_plan({"registers", false, pre_w, rthreads});
      return;
    }
    // Below kLargeLaunchRows 1 vector per thread (the widest blocks): H200 (7c333f2ce8d4
    // tune, H=4096) T=512 12.7 us against 17.1 with 2, H100 (db66db7 tune) 11.1 / 12.2; at
    // T=4096 within 1% either way on both (H200 37.8 / 37.5, H100 49.8 / 49.4).
    const int threads = threads_for(vec ? width / V : width, rows, rows < kLargeLaunchRows ? 1 : 0);
    const int64_t width_pad = (width + V - 1) / V * V;
    StagePlan plan = plan_stage(32 * sizeof(float), 2 * width_pad * static_cast<int64_t>(sizeof(scalar_t)), device);
    const int64_t w_size = w_kind == kWeightFp32 ? 4 : static_cast<int64_t>(sizeof(scalar_t));
    const int64_t w_bytes = vec && wp ? stage_weights_bytes(plan, rows, width_pad * w_size, device) : 0;
    plan.smem += w_bytes;
    auto* kernel = plan.staged ? fused_add_rms_norm_kernel<scalar_t, true> : fused_add_rms_norm_kernel<scalar_t, false>;
    int carveout = -1;
    if (plan.staged) {
      configure_staging_kernel(reinterpret_cast<const void*>(kernel), device);
      carveout = norm_carveout(rows, plan.smem, threads, wp && w_bytes == 0 ? width * w_size : 0, device);
    }
    carveout = launch_with_carveout(kernel, static_cast<unsigned>(grid), threads, plan.smem, stream, carveout,
                                    static_cast<const scalar_t*>(x2.data_ptr()), x2.stride(0),
                                    static_cast<const scalar_t*>(r2.data_ptr()), r2.stride(0), wp, w_kind,
                                    static_cast<scalar_t*>(normed.data_ptr()),
                                    static_cast<scalar_t*>(sum.data_ptr()), rows, static_cast<int>(width), eps, vec,
                                    w_bytes > 0);
    set_norm_last_plan({plan.staged ? "staged" : "two-pass", false, w_bytes > 0, threads, carveout});
  });
}

}  // namespace eagle3::cuda
