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
// A third strategy keeps the row in registers (rms_norm_cat_regs_kernel, _norm_registers(1)).
// Split rows (_norm_split_chunks; by default in launches of up to 64 rows, and of 4096 or
// more rows with chunks wider than 4096 elements): per-chunk
// ("chunk" / "none") rows give each chunk of each row its own block (T x K blocks, each
// staging one chunk, the shape of the fused add's rows; figures at g_norm_split_chunks).
// With _norm_stage_weights(n) (default 64), a staged launch of at most n rows copies the
// norm weights into shared memory with the row, so they arrive in the row's one round trip
// instead of one dependent load per vector after the reduction (the latency-bound small-T
// case; figures at g_norm_stage_weights).
#include "cuda/common.cuh"

#include <ATen/ATen.h>

#include <atomic>

namespace eagle3::cuda {
namespace {

constexpr int kMaxThreads = 512;

// One block per (row, chunk) for per-chunk norms (set_norm_split_chunks): 0 never, 1 always,
// 2 (the default) by size: launches of up to kSmallLaunchRows rows, and launches of at least
// kLargeLaunchRows rows whose widest chunk passes kWideChunk elements (those with 4 vectors
// per thread).
// - Small: on the H100 (graph replay, K=3 bf16; bench/results/nvidia-h100-80gb-hbm3-db66db7-tune.json)
//   it nearly halved the small launches, with the weights staged and 1 vector per thread:
//   rms_norm_cat H=4096 T=1 2.9 us against 5.0 for one block per row, T=8 3.0 / 5.1, T=64
//   3.9 / 5.4, H=7168 T=1 3.2 / 5.7; midlayer_cat (K=2) H=4096 T=1 2.8 / 3.8.
// - Large and wide: at T=16384 with 2 vectors per thread one block per row or per (row,
//   chunk) was within 2% on the H100 (H=4096 273.3 against 276.7 us, H=8192 552.2 / 543.1).
//   With 4 vectors per thread (smaller blocks, more in flight per SM), per (row, chunk) on
//   the H200 (nvidia-h200-7c333f2ce8d4-tune.json, T=16384): rms_norm_cat K=3 H=7168 373.5 us
//   against 466.4 for the rows rule (2 per thread, one block per row), H=8192 423.5 / 479.3;
//   midlayer_cat H=7168 247.9 / 285.9, H=8192 289.4 / 303.0. On the H100 (ed5c01eeed8c
//   tune) H=8192 with it was as fast as the rows rule (rms_norm_cat 538.9 / 543.7, midlayer
//   361.7 / 363.5). At H=4096 it is left out: rms_norm_cat took 301.9 us against 276.5 on
//   the H100 (233.5 / 232.8 on the H200), although midlayer_cat gained (H200 139.1 / 151.0).
//   The H200 benchmark with it (a4f65c7a69b3, against 7c333f2ce8d4 without; each over
//   torch.compile in its own run): rms_norm_cat T=16384 H=7168 372 us (0.972x compile)
//   against 442 (0.810x), H=8192 421 (0.954x) / 463 (0.868x), T=4096 H=7168 97.7 (1.05x)
//   / 118 (1.01x), H=8192 110 (1.02x) / 122 (0.929x); midlayer_cat T=16384 H=7168 248
//   (0.931x) / 280 (0.819x), H=8192 283 (0.933x) / 291 (0.905x).
constexpr int kSplitAlways = 1, kSplitBySize = 2;  // (0: never)
constexpr int64_t kWideChunk = 4096;
std::atomic<int> g_norm_split_chunks{kSplitBySize};

// Scales V elements in fp32 by `scale` and the chunk's weight (from global memory, or from
// the block's staged copy `w_stage` where that is not null), rounds once to T.
template <typename T>
__device__ __forceinline__ Vec<T> scale_vec(const Vec<T>& x, float scale, const ChunkDesc& c, int64_t i,
                                            const void* w_stage = nullptr) {
  constexpr int V = Vec<T>::N;
  float w[V];
  if (w_stage) load_weight_vec<T, true>(w_stage, c.w_kind, i, w);
  else load_weight_vec<T>(c.w, c.w_kind, i, w);
  Vec<T> y;
#pragma unroll
  for (int j = 0; j < V; ++j) y.v[j] = from_float<T>(to_float(x.v[j]) * scale * w[j]);
  return y;
}

// split: each work item is one chunk of one row (item = row * num_chunks + k; never with
// norm "shared", whose scale needs the whole row), staged at the start of the stage.
// w_stage_off (staged kernel only; 0: off): byte offset of the weight stage, where the
// weights of every 16-byte-access chunk are copied with the row (stage_weight_vec), chunk k
// at w_slot * its stage offset (0 when split); w_slot: 4 bytes per element where a staged
// chunk has fp32 weights, else sizeof(T).
template <typename T, bool kStaged>
__global__ void __launch_bounds__(kMaxThreads)
rms_norm_cat_kernel(const __grid_constant__ ChunkTable tab, const int num_chunks,
                    T* __restrict__ out,  // [T, total] contiguous
                    const int64_t num_rows, const int total, const float eps, const int mode, const bool split,
                    const int w_stage_off, const int w_slot) {
  constexpr int V = Vec<T>::N;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int nwarps = blockDim.x / 32;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* warp_sums = reinterpret_cast<float*>(smem_raw);  // [num_chunks][nwarps]
  T* stage = reinterpret_cast<T*>(smem_raw + ((num_chunks * nwarps * sizeof(float) + 15) / 16) * 16);
  const int64_t num_items = split ? num_rows * num_chunks : num_rows;
  // Chunk k's staged weights, or null where they are read from global memory.
  auto w_stage = [&](const ChunkDesc& c) -> void* {
    if (!kStaged || w_stage_off == 0 || !c.vec || c.w_kind == kNoWeight) return nullptr;
    return smem_raw + w_stage_off + (split ? 0 : w_slot * static_cast<int64_t>(c.smem_off));
  };

  for (int64_t item = blockIdx.x; item < num_items; item += gridDim.x) {
    const int64_t row = split ? item / num_chunks : item;
    const int k_lo = split ? static_cast<int>(item - row * num_chunks) : 0;
    const int k_hi = split ? k_lo + 1 : num_chunks;
    if constexpr (kStaged) {
      for (int k = k_lo; k < k_hi; ++k) {
        const ChunkDesc& c = tab.c[k];
        const T* src = static_cast<const T*>(c.x) + row * c.x_stride;
        T* dst = stage + (split ? 0 : c.smem_off);
        if (c.vec) {
          void* ws = w_stage(c);
          for (int i = threadIdx.x * V; i < c.width; i += blockDim.x * V) {
            cp_async16(dst + i, src + i);
            if (ws) stage_weight_vec<T>(ws, c.w, c.w_kind, i);
          }
        } else {
          for (int i = threadIdx.x; i < c.width; i += blockDim.x) dst[i] = src[i];
        }
      }
      cp_async_wait_all();
    }
    // Per-chunk sums of squares; each thread reads back only what it staged itself.
    if (mode != static_cast<int>(NormMode::kNone)) {
      for (int k = k_lo; k < k_hi; ++k) {
        const ChunkDesc& c = tab.c[k];
        const T* src = kStaged ? stage + (split ? 0 : c.smem_off) : static_cast<const T*>(c.x) + row * c.x_stride;
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
    for (int k = k_lo; k < k_hi; ++k) {
      const ChunkDesc& c = tab.c[k];
      float scale = shared_scale;
      if (mode == static_cast<int>(NormMode::kChunk)) {
        float s = 0.f;
        for (int w = 0; w < nwarps; ++w) s += warp_sums[k * nwarps + w];
        scale = rsqrtf(s / static_cast<float>(c.width) + eps);
      }
      const T* src = kStaged ? stage + (split ? 0 : c.smem_off) : static_cast<const T*>(c.x) + row * c.x_stride;
      T* dst = out_row + c.out_off;
      if (c.vec) {
        const void* ws = w_stage(c);
        for (int i = threadIdx.x * V; i < c.width; i += blockDim.x * V)
          store_vec(dst + i, scale_vec(load_vec(src + i), scale, c, i, ws));
      } else {
        for (int i = threadIdx.x; i < c.width; i += blockDim.x)
          dst[i] = from_float<T>(to_float(src[i]) * scale * weight_at<T>(c.w, c.w_kind, i));
      }
    }
    __syncthreads();  // warp_sums and the stage are reused by the block's next item
  }
}

// The register-resident strategy (norm_registers): one block per row, every thread loads
// its NV vectors (1, 2 or kRegVecs: with_reg_vecs) of each of the (at most KMAX) chunks into
// registers with streaming loads -- all loads of the row in flight at once, as a copy kernel
// has them -- sums their squares, and writes the scaled vectors from registers. The row is
// read from memory once, nothing is staged, and the only barrier is the one around the
// per-warp sums. Every chunk allows 16-byte accesses (reg_threads checks).
template <typename T, int KMAX, int NV>
__global__ void __launch_bounds__(reg_max_threads(KMAX))
rms_norm_cat_regs_kernel(const __grid_constant__ ChunkTable tab, const int num_chunks,
                         T* __restrict__ out,  // [T, total] contiguous
                         const int64_t num_rows, const int total, const float eps, const int mode) {
  constexpr int V = Vec<T>::N;
  __shared__ float warp_sums[KMAX][kRegMaxThreads / 32];
  const int nwarps = blockDim.x / 32;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t row = blockIdx.x; row < num_rows; row += gridDim.x) {
    Vec<T> r[KMAX][NV];
#pragma unroll
    for (int k = 0; k < KMAX; ++k) {
      if (k < num_chunks) {
        const ChunkDesc& c = tab.c[k];
        const T* src = static_cast<const T*>(c.x) + row * c.x_stride;
#pragma unroll
        for (int j = 0; j < NV; ++j) {
          const int i = (threadIdx.x + j * blockDim.x) * V;
          if (i < c.width) r[k][j] = load_vec_stream(src + i);
        }
      }
    }
    float scale[KMAX];
    if (mode != static_cast<int>(NormMode::kNone)) {
#pragma unroll
      for (int k = 0; k < KMAX; ++k) {
        if (k < num_chunks) {
          const int width = tab.c[k].width;
          float ss = 0.f;
#pragma unroll
          for (int j = 0; j < NV; ++j) {
            if ((threadIdx.x + j * blockDim.x) * V < width) {
#pragma unroll
              for (int e = 0; e < V; ++e) { const float f = to_float(r[k][j].v[e]); ss += f * f; }
            }
          }
          ss = warp_sum(ss);
          if (lane == 0) warp_sums[k][warp] = ss;
        }
      }
      __syncthreads();
      float all = 0.f;
#pragma unroll
      for (int k = 0; k < KMAX; ++k) {
        float s = 0.f;
        if (k < num_chunks) {
          for (int w = 0; w < nwarps; ++w) s += warp_sums[k][w];
        }
        all += s;
        scale[k] = k < num_chunks ? rsqrtf(s / static_cast<float>(tab.c[k].width) + eps) : 1.f;
      }
      if (mode == static_cast<int>(NormMode::kShared)) {
        const float shared = rsqrtf(all / static_cast<float>(total) + eps);
#pragma unroll
        for (int k = 0; k < KMAX; ++k) scale[k] = shared;
      }
    } else {
#pragma unroll
      for (int k = 0; k < KMAX; ++k) scale[k] = 1.f;
    }
    T* out_row = out + row * static_cast<int64_t>(total);
#pragma unroll
    for (int k = 0; k < KMAX; ++k) {
      if (k < num_chunks) {
        const ChunkDesc& c = tab.c[k];
#pragma unroll
        for (int j = 0; j < NV; ++j) {
          const int i = (threadIdx.x + j * blockDim.x) * V;
          if (i < c.width) store_vec_stream(out_row + c.out_off + i, scale_vec(r[k][j], scale[k], c, i));
        }
      }
    }
    if (mode != static_cast<int>(NormMode::kNone)) __syncthreads();  // warp_sums reused by the next row
  }
}

}  // namespace

int64_t set_norm_split_chunks(int64_t mode) { return query_or_set(g_norm_split_chunks, mode); }

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
    int64_t max_vecs = 1, stage_elems = 0, max_chunk_elems = 0;
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
      max_chunk_elems = std::max<int64_t>(max_chunk_elems, (c.widths[k] + V - 1) / V * V);
      max_vecs = std::max<int64_t>(max_vecs, d.vec ? d.width / V : d.width);
    }
    const int64_t grid = std::min<int64_t>(c.num_rows, INT32_MAX);
    bool all_vec = true;
    for (int k = 0; k < num_chunks; ++k) all_vec = all_vec && tab.c[k].vec;
    if (const int rthreads = reg_threads(max_vecs, num_chunks, all_vec, c.num_rows); rthreads > 0) {
      // One instance per chunk count and vectors per thread: the register arrays are sized
      // by both (K=3, the aux states, must not pay for a fourth chunk's registers, nor a
      // block of 2 vectors per thread for 4).
      static_assert(kRegMaxChunks == 4, "one instance per chunk count up to kRegMaxChunks");
      with_reg_vecs(max_vecs, rthreads, [&](auto nv) {
        constexpr int NV = decltype(nv)::value;
        auto* kernel = num_chunks == 1   ? rms_norm_cat_regs_kernel<scalar_t, 1, NV>
                       : num_chunks == 2 ? rms_norm_cat_regs_kernel<scalar_t, 2, NV>
                       : num_chunks == 3 ? rms_norm_cat_regs_kernel<scalar_t, 3, NV>
                                         : rms_norm_cat_regs_kernel<scalar_t, 4, NV>;
        kernel<<<static_cast<unsigned>(grid), rthreads, 0, stream>>>(tab, num_chunks,
                                                                    static_cast<scalar_t*>(out.data_ptr()),
                                                                    c.num_rows, static_cast<int>(c.total_width), eps,
                                                                    static_cast<int>(mode));
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      set_norm_last_plan({"registers", false, false, rthreads});
      return;
    }
    const int split_mode = g_norm_split_chunks.load(std::memory_order_relaxed);
    const bool wide_large = c.num_rows >= kLargeLaunchRows && max_chunk_elems > kWideChunk;
    const bool split = (split_mode == kSplitAlways ||
                        (split_mode == kSplitBySize && (c.num_rows <= kSmallLaunchRows || wide_large))) &&
                       mode != NormMode::kShared && num_chunks > 1;
    const int threads = threads_for(max_vecs, c.num_rows, split && wide_large ? 4 : 0);
    const int64_t sums_bytes = (num_chunks * (threads / 32) * 4 + 15) / 16 * 16;
    const int64_t staged_elems = split ? max_chunk_elems : stage_elems;  // one block's stage
    StagePlan plan = plan_stage(sums_bytes, staged_elems * static_cast<int64_t>(sizeof(scalar_t)), device);
    // Weight slots (only if some chunk has weights its 16-byte accesses can stage): 4 bytes
    // per staged element where one of them is fp32, else the elements' own size.
    bool any_w = false;
    int w_slot = static_cast<int>(sizeof(scalar_t));
    for (int k = 0; k < num_chunks; ++k) {
      if (!tab.c[k].vec || tab.c[k].w_kind == kNoWeight) continue;
      any_w = true;
      if (tab.c[k].w_kind == kWeightFp32) w_slot = 4;
    }
    const int64_t w_bytes =
        any_w ? stage_weights_bytes(plan, c.num_rows, staged_elems * w_slot, device) : 0;
    const int w_stage_off = w_bytes > 0 ? static_cast<int>(plan.smem) : 0;
    plan.smem += w_bytes;
    auto* kernel = plan.staged ? rms_norm_cat_kernel<scalar_t, true> : rms_norm_cat_kernel<scalar_t, false>;
    int carveout = -1;
    if (plan.staged) {
      configure_staging_kernel(reinterpret_cast<const void*>(kernel), device);
      // the weights every row reads from global memory (none where they are staged)
      int64_t global_w = 0;
      if (w_bytes == 0) {
        for (int k = 0; k < num_chunks; ++k)
          if (tab.c[k].w_kind != kNoWeight)
            global_w += c.widths[k] * (tab.c[k].w_kind == kWeightFp32 ? 4 : static_cast<int64_t>(sizeof(scalar_t)));
      }
      carveout = norm_carveout(c.num_rows, plan.smem, threads, global_w, device);
    }
    const int64_t items = split ? c.num_rows * num_chunks : c.num_rows;
    carveout = launch_with_carveout(kernel, static_cast<unsigned>(std::min<int64_t>(items, INT32_MAX)), threads,
                                    plan.smem, stream, carveout, tab, num_chunks,
                                    static_cast<scalar_t*>(out.data_ptr()), c.num_rows,
                                    static_cast<int>(c.total_width), eps, static_cast<int>(mode), split, w_stage_off,
                                    w_slot);
    set_norm_last_plan({plan.staged ? "staged" : "two-pass", split, w_bytes > 0, threads, carveout});
  });
}

}  // namespace eagle3::cuda
