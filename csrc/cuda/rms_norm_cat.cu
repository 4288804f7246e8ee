// rms_norm_cat on CUDA: K chunks (each its own base pointer and row stride), one launch,
// written straight into the concatenated output.
//
// One block per row (the grid is T blocks; the row loop only matters past 2^31 - 1 rows).
// The block stages every chunk of its row in shared memory with 16-byte cp.async copies
// (all in flight at once), takes one sum of squares per chunk, and writes the scaled row
// from shared memory. Each thread reads back only the elements it staged itself, so the
// only barriers are the one around the per-warp partial sums and the one before the next
// row reuses the stage. Rows wider than the stage limit (or all rows, with
// _norm_stage_limit(0)) are read twice from global memory instead (the second read hits L2).
#include "cuda/common.cuh"

#include <ATen/ATen.h>

namespace eagle3::cuda {
namespace {

constexpr int kMaxThreads = 512;

// Scales V elements in fp32 by `scale` and the chunk's weight, rounds once to T.
template <typename T>
__device__ __forceinline__ Vec<T> scale_vec(const Vec<T>& x, float scale, const ChunkDesc& c, int64_t i) {
  constexpr int V = Vec<T>::N;
  float w[V];
  load_weight_vec<T>(c.w, c.w_kind, i, w);
  Vec<T> y;
#pragma unroll
  for (int j = 0; j < V; ++j) y.v[j] = from_float<T>(to_float(x.v[j]) * scale * w[j]);
  return y;
}

template <typename T, bool kStaged>
__global__ void __launch_bounds__(kMaxThreads)
rms_norm_cat_kernel(const __grid_constant__ ChunkTable tab, const int num_chunks,
                    T* __restrict__ out,  // [T, total] contiguous
                    const int64_t num_rows, const int total, const float eps, const int mode) {
  constexpr int V = Vec<T>::N;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int nwarps = blockDim.x / 32;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* warp_sums = reinterpret_cast<float*>(smem_raw);  // [num_chunks][nwarps]
  T* stage = reinterpret_cast<T*>(smem_raw + ((num_chunks * nwarps * sizeof(float) + 15) / 16) * 16);

  for (int64_t row = blockIdx.x; row < num_rows; row += gridDim.x) {
    if constexpr (kStaged) {
      for (int k = 0; k < num_chunks; ++k) {
        const ChunkDesc& c = tab.c[k];
        const T* src = static_cast<const T*>(c.x) + row * c.x_stride;
        T* dst = stage + c.smem_off;
        if (c.vec) {
          for (int i = threadIdx.x * V; i < c.width; i += blockDim.x * V) cp_async16(dst + i, src + i);
        } else {
          for (int i = threadIdx.x; i < c.width; i += blockDim.x) dst[i] = src[i];
        }
      }
      cp_async_wait_all();
    }
    // Per-chunk sums of squares; each thread reads back only what it staged itself.
    if (mode != static_cast<int>(NormMode::kNone)) {
      for (int k = 0; k < num_chunks; ++k) {
        const ChunkDesc& c = tab.c[k];
        const T* src = kStaged ? stage + c.smem_off : static_cast<const T*>(c.x) + row * c.x_stride;
        float ss = 0.f;
        if (c.vec) {
          for (int i = threadIdx.x * V; i < c.width; i += blockDim.x * V) {
            const Vec<T> v = load_vec(src + i);
#pragma unroll
            for (int j = 0; j < V; ++j) { const float f = to_float(v.v[j]); ss += f * f; }
          }
        } else {
          for (int i = threadIdx.x; i < c.width; i += blockDim.x) { const float f = to_float(src[i]); ss += f * f; }
        }
        ss = warp_sum(ss);
        if (lane == 0) warp_sums[k * nwarps + warp] = ss;
      }
      __syncthreads();
    }
    float shared_scale = 1.f;
    if (mode == static_cast<int>(NormMode::kShared)) {
      float s = 0.f;
      for (int i = 0; i < num_chunks * nwarps; ++i) s += warp_sums[i];
      shared_scale = rsqrtf(s / static_cast<float>(total) + eps);
    }
    T* out_row = out + row * static_cast<int64_t>(total);
    for (int k = 0; k < num_chunks; ++k) {
      const ChunkDesc& c = tab.c[k];
      float scale = shared_scale;
      if (mode == static_cast<int>(NormMode::kChunk)) {
        float s = 0.f;
        for (int w = 0; w < nwarps; ++w) s += warp_sums[k * nwarps + w];
        scale = rsqrtf(s / static_cast<float>(c.width) + eps);
      }
      const T* src = kStaged ? stage + c.smem_off : static_cast<const T*>(c.x) + row * c.x_stride;
      T* dst = out_row + c.out_off;
      if (c.vec) {
        for (int i = threadIdx.x * V; i < c.width; i += blockDim.x * V)
          store_vec(dst + i, scale_vec(load_vec(src + i), scale, c, i));
      } else {
        for (int i = threadIdx.x; i < c.width; i += blockDim.x)
          dst[i] = from_float<T>(to_float(src[i]) * scale * weight_at<T>(c.w, c.w_kind, i));
      }
    }
    __syncthreads();  // warp_sums and the stage are reused by the block's next row
  }
}

}  // namespace

void launch_norm_cat(const ChunkRows& c, const std::vector<at::Tensor>& weights_1d, float eps, NormMode mode,
                     at::Tensor& out) {
  const int num_chunks = static_cast<int>(c.rows.size());  // <= kMaxChunks (checked by check_chunks)
  if (c.num_rows == 0) return;
  const at::Tensor& x0 = c.rows[0];
  const c10::cuda::CUDAGuard guard(x0.device());
  const int device = x0.get_device();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device);

  EAGLE3_DISPATCH_FLOAT_TYPES(x0.scalar_type(), "rms_norm_cat", [&] {
    constexpr int V = Vec<scalar_t>::N;
    ChunkTable tab{};
    int64_t max_vecs = 1, stage_elems = 0;
    for (int k = 0; k < num_chunks; ++k) {
      const at::Tensor& x = c.rows[k];
      const at::Tensor* w = weights_1d.empty() || !weights_1d[k].defined() ? nullptr : &weights_1d[k];
      ChunkDesc& d = tab.c[k];
      d.x = x.data_ptr();
      d.w = w ? w->data_ptr() : nullptr;
      d.x_stride = x.stride(0);
      d.width = static_cast<int32_t>(c.widths[k]);
      d.out_off = static_cast<int32_t>(c.offsets[k]);
      d.smem_off = static_cast<int32_t>(stage_elems);
      d.w_kind = weight_kind(w, x.scalar_type());
      d.vec = aligned16(d.x) && aligned16(out.data_ptr()) && d.x_stride % V == 0 && d.width % V == 0 && d.out_off % V == 0 &&
              c.total_width % V == 0 && (d.w == nullptr || aligned16(d.w));
      stage_elems += (c.widths[k] + V - 1) / V * V;
      max_vecs = std::max<int64_t>(max_vecs, d.vec ? d.width / V : d.width);
    }
    const int threads = threads_for(max_vecs);
    const int64_t sums_bytes = (num_chunks * (threads / 32) * 4 + 15) / 16 * 16;
    const StagePlan plan = plan_stage(sums_bytes, stage_elems * static_cast<int64_t>(sizeof(scalar_t)), device);
    const int64_t grid = std::min<int64_t>(c.num_rows, INT32_MAX);
    auto* kernel = plan.staged ? rms_norm_cat_kernel<scalar_t, true> : rms_norm_cat_kernel<scalar_t, false>;
    if (plan.staged) configure_staging_kernel(reinterpret_cast<const void*>(kernel), device);
    kernel<<<static_cast<unsigned>(grid), threads, plan.smem, stream>>>(tab, num_chunks,
                                                                   static_cast<scalar_t*>(out.data_ptr()), c.num_rows,
                                                                   static_cast<int>(c.total_width), eps,
                                                                   static_cast<int>(mode));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace eagle3::cuda
