// Shared CUDA building blocks of every eagle3 kernel: the dtype dispatch, the 16-byte
// vector type and its conversions, warp / block reductions, cp.async staging, the
// per-chunk argument table, and launch helpers. Kernels include only this header
// (plus their own); no ATen/cuda/CUDAContext.h (the toolkit here ships no cuBLAS headers).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "launchers.h"

namespace eagle3::cuda {

// ---- dtype dispatch: at::ScalarType -> device type `scalar_t` ------------------------------
#define EAGLE3_DISPATCH_FLOAT_TYPES(DTYPE, NAME, ...)                                              \
  [&] {                                                                                            \
    switch (DTYPE) {                                                                               \
      case at::kFloat: { using scalar_t = float; return __VA_ARGS__(); }                           \
      case at::kHalf: { using scalar_t = __half; return __VA_ARGS__(); }                           \
      case at::kBFloat16: { using scalar_t = __nv_bfloat16; return __VA_ARGS__(); }                \
      default: TORCH_CHECK(false, NAME, ": unsupported dtype ", DTYPE);                            \
    }                                                                                              \
  }()

// ---- scalar conversions ----------------------------------------------------------------------
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// ---- the 16-byte vector ----------------------------------------------------------------------
constexpr int kVecBytes = 16;
template <typename T>
struct alignas(kVecBytes) Vec {
  static constexpr int N = kVecBytes / sizeof(T);
  T v[N];
};

template <typename T>
__device__ __forceinline__ Vec<T> load_vec(const T* p) { return *reinterpret_cast<const Vec<T>*>(p); }
// Read-only path, for data every block reads again (weights).
template <typename T>
__device__ __forceinline__ Vec<T> load_vec_ro(const T* p) {
  Vec<T> out;
  *reinterpret_cast<int4*>(&out) = __ldg(reinterpret_cast<const int4*>(p));
  return out;
}
// A 16-byte store to global memory. Through PTX: assigning the Vec (or an int4 view of it)
// compiled to one 2-byte store per element for bf16 / fp16 (and 4-byte ones for fp32).
template <typename T>
__device__ __forceinline__ void store_vec(T* p, const Vec<T>& v) {
  const uint4 u = *reinterpret_cast<const uint4*>(&v);
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"l"(p), "r"(u.x), "r"(u.y), "r"(u.z), "r"(u.w)
               : "memory");
}
// A 16-byte read-only load that does not allocate in L1, for a weight streamed once (the
// fc kernels): L1 keeps the activations.
__device__ __forceinline__ int4 load_weight_stream(const void* p) {
  int4 v;
  asm("ld.global.nc.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];\n"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}
__device__ __forceinline__ uint4 bit_cast_u4(const int4 v) {
  return make_uint4(static_cast<unsigned>(v.x), static_cast<unsigned>(v.y), static_cast<unsigned>(v.z),
                    static_cast<unsigned>(v.w));
}
// Streaming (evict-first) load and store, for data touched once (activations of the
// register-resident norm kernels), so they do not push the weights out of L1 / L2.
template <typename T>
__device__ __forceinline__ Vec<T> load_vec_stream(const T* p) {
  Vec<T> out;
  *reinterpret_cast<int4*>(&out) = __ldcs(reinterpret_cast<const int4*>(p));
  return out;
}
template <typename T>
__device__ __forceinline__ void store_vec_stream(T* p, const Vec<T>& v) {
  __stcs(reinterpret_cast<int4*>(p), *reinterpret_cast<const int4*>(&v));
}

__host__ __device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & (kVecBytes - 1)) == 0;
}

// ---- reductions ------------------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ---- cp.async (sm_80+): global -> shared without passing through registers ---------------------
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

// ---- the per-chunk argument table (passed by value, no device allocation) --------------------
enum WeightKind : uint8_t { kNoWeight = 0, kWeightSameType = 1, kWeightFp32 = 2 };

struct ChunkDesc {
  const void* x;      // [T, width], row stride x_stride elements, last dim contiguous
  const void* w;      // [width] contiguous, or nullptr
  int64_t x_stride;
  int32_t width;
  int32_t out_off;    // first output column of this chunk
  int32_t smem_off;   // first staged element of this chunk (multiple of the vector width)
  uint8_t vec;        // 1: every access of this chunk can be 16 bytes wide
  uint8_t w_kind;     // WeightKind
};

struct ChunkTable {
  ChunkDesc c[kMaxChunks];
};

// ---- norm weights (none, x's dtype, or fp32) as fp32 ---------------------------------------
// The V weights [i, i + V) of a contiguous, 16-byte aligned weight (i a multiple of V): from
// global memory through the read-only path, or (kStaged) from the block's shared-memory copy
// made by stage_weight_vec.
template <typename T, bool kStaged = false>
__device__ __forceinline__ void load_weight_vec(const void* w, int w_kind, int64_t i, float (&out)[Vec<T>::N]) {
  constexpr int V = Vec<T>::N;
  if (w_kind == kWeightSameType) {
    const T* p = static_cast<const T*>(w) + i;
    const Vec<T> wv = kStaged ? *reinterpret_cast<const Vec<T>*>(p) : load_vec_ro(p);
#pragma unroll
    for (int j = 0; j < V; ++j) out[j] = to_float(wv.v[j]);
  } else if (w_kind == kWeightFp32) {
    const float4* wp = reinterpret_cast<const float4*>(static_cast<const float*>(w) + i);
#pragma unroll
    for (int q = 0; q < V / 4; ++q) {
      const float4 f = kStaged ? wp[q] : __ldg(wp + q);
      out[4 * q] = f.x; out[4 * q + 1] = f.y; out[4 * q + 2] = f.z; out[4 * q + 3] = f.w;
    }
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) out[j] = 1.f;
  }
}

// The norm kernels' weight staging (set_norm_stage_weights): the weights of vector i of a
// 16-byte-access chunk, copied with cp.async (V x 2 or 4 bytes: one or two 16-byte copies)
// to the same index of the block's shared-memory copy `dst` (4 bytes per element for fp32
// weights, sizeof(T) for same-type ones). Issued with the row's own copies, so the
// weights arrive in the row's one round trip instead of one dependent load per vector after
// the reduction; the thread that copies them is the one that reads them back.
template <typename T>
__device__ __forceinline__ void stage_weight_vec(void* dst, const void* w, int w_kind, int64_t i) {
  const int64_t off = w_kind == kWeightFp32 ? i * 4 : i * static_cast<int64_t>(sizeof(T));
  char* d = static_cast<char*>(dst) + off;
  const char* s = static_cast<const char*>(w) + off;
  cp_async16(d, s);
  if (sizeof(T) == 2 && w_kind == kWeightFp32) cp_async16(d + 16, s + 16);  // 8 fp32 weights: 32 bytes
}

// The raw bytes of the V norm weights [i, i + V) of a contiguous, 16-byte aligned weight,
// loaded into registers ahead of their use (the register kernels' weights with the row):
// one 16-byte load for weights of x's type, V x 4 bytes for fp32 ones. weights_of converts
// them where they are used.
struct WeightRaw {
  uint4 u[2];
};
template <typename T>
__device__ __forceinline__ WeightRaw prefetch_weight_vec(const void* w, int w_kind, int64_t i) {
  WeightRaw r{};
  if (w_kind == kWeightSameType) {
    r.u[0] = __ldg(reinterpret_cast<const uint4*>(static_cast<const T*>(w) + i));
  } else if (w_kind == kWeightFp32) {
    const uint4* p = reinterpret_cast<const uint4*>(static_cast<const float*>(w) + i);
    r.u[0] = __ldg(p);
    if (Vec<T>::N == 8) r.u[1] = __ldg(p + 1);
  }
  return r;
}
template <typename T>
__device__ __forceinline__ void weights_of(const WeightRaw& r, int w_kind, float (&out)[Vec<T>::N]) {
  constexpr int V = Vec<T>::N;
  if (w_kind == kWeightSameType) {
    Vec<T> wv;
    memcpy(&wv, &r.u[0], sizeof(wv));
#pragma unroll
    for (int j = 0; j < V; ++j) out[j] = to_float(wv.v[j]);
  } else if (w_kind == kWeightFp32) {
#pragma unroll
    for (int q = 0; q < V / 4; ++q) {
      float4 f;
      memcpy(&f, &r.u[q], sizeof(f));
      out[4 * q] = f.x; out[4 * q + 1] = f.y; out[4 * q + 2] = f.z; out[4 * q + 3] = f.w;
    }
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) out[j] = 1.f;
  }
}

template <typename T>
__device__ __forceinline__ float weight_at(const void* w, int w_kind, int64_t i) {
  if (w_kind == kWeightSameType) return to_float(static_cast<const T*>(w)[i]);
  if (w_kind == kWeightFp32) return static_cast<const float*>(w)[i];
  return 1.f;
}

// ---- launch helpers --------------------------------------------------------------------------
inline int round_up(int v, int m) { return (v + m - 1) / m * m; }
int max_smem_optin(int device);  // cudaDevAttrMaxSharedMemoryPerBlockOptin, cached per device
int sm_count(int device);        // multiprocessors, cached per device

// Whether a norm kernel stages its row in shared memory: a row needing `stage_bytes` (on top
// of `scratch_bytes` of reduction scratch) is staged when the total fits the stage limit
// (set_norm_stage_limit) and the device; otherwise it is read twice from global memory (the
// second read hits L2). `smem` is the dynamic shared memory the launch needs either way.
struct StagePlan {
  bool staged;
  int64_t smem;
};
StagePlan plan_stage(int64_t scratch_bytes, int64_t stage_bytes, int device);
// The shared memory a staged launch of `rows` rows adds to stage its norm weights too
// (weight_bytes, or 0): weights are staged when the launch has at most
// set_norm_stage_weights rows (small T, where the weights' dependent loads after the
// reduction lengthen every row's critical path) and the total still fits the stage limit.
int64_t stage_weights_bytes(const StagePlan& plan, int64_t rows, int64_t weight_bytes, int device);

// The register-resident strategy of the norm kernels (set_norm_registers): every thread
// keeps its vectors (up to kRegVecs) of each chunk in registers between the sum of squares
// and the scaled write (the row is read once, nothing is staged). Used, when switched on,
// for rows whose chunks all allow 16-byte accesses, at most kRegMaxChunks chunks, and at most
// kRegVecs x reg_max_threads(K) vectors per chunk; reg_threads gives the block size, 0 when a
// row does not qualify.
constexpr int kRegVecs = 4;
constexpr int kRegMaxThreads = 512;
constexpr int kRegMaxChunks = 4;
// Four chunks' vectors do not fit the 128 registers a 512-thread block leaves each thread
// (the 4-chunk instance spilled on sm_90a): that instance is bounded at 256 threads.
constexpr int reg_max_threads(int num_chunks) { return num_chunks >= 4 ? 256 : kRegMaxThreads; }
bool norm_registers();
// Launches of at most this many rows are "small" (latency-bound: fewer blocks than SMs or
// about as many): the default norm launch stages their weights and gives each thread one
// vector (norm_vecs_per_thread, the stage-weights switch's default).
constexpr int64_t kSmallLaunchRows = 64;
// Vectors per thread the norm kernels size a launch of `rows` rows for: the value of
// set_norm_vecs_per_thread, or by default (0) 1 for small launches and 2 for larger ones.
// On the H100 (graph replay, bf16, ed5c01eeed8c-tune.json) 2 beat the earlier 4 at
// T=16384 in every case measured (rms_norm_cat K=3 H=4096 312.9 -> 276.5 us, 85.2 -> 96.5% of
// the copy bandwidth; H=8192 86.2 -> 98.1%; fused_add_rms_norm H=4096 96.1 -> 97.0%), and 1
// with the weights staged was the fastest block size measured at T = 1, 8, 64 (e.g.
// fused_add_rms_norm H=4096 T=1: 3.2 us at 4, 2.7 at 2, 2.4 at 1 with weights staged).
// by_shape (> 0): the op's own default for this launch's shape, in place of the rows rule
// (rms_norm_cat's wide chunks in large launches, fused_add_rms_norm below kLargeLaunchRows).
int norm_vecs_per_thread(int64_t rows, int by_shape = 0);
// Launches of at least this many rows are "large" (bandwidth-bound, many rows per SM).
constexpr int64_t kLargeLaunchRows = 4096;
inline int reg_threads(int64_t max_vecs, int num_chunks, bool all_vec, int64_t rows) {
  if (!norm_registers() || !all_vec || num_chunks > kRegMaxChunks ||
      max_vecs > int64_t{kRegVecs} * reg_max_threads(num_chunks))
    return 0;
  // norm_vecs_per_thread(rows) vectors per thread where the block stays within the bound,
  // else the kRegVecs each thread can hold.
  const int v = std::min(norm_vecs_per_thread(rows), kRegVecs);
  int t = round_up(static_cast<int>((max_vecs + v - 1) / v), 32);
  if (t > reg_max_threads(num_chunks)) t = round_up(static_cast<int>((max_vecs + kRegVecs - 1) / kRegVecs), 32);
  return std::max(32, t);
}

// f(std::integral_constant<int, nv>{}) with nv the vectors per thread of the register
// kernels' instance for a block of `threads` threads over rows of `max_vecs` vectors
// (reg_threads): 1, 2 or kRegVecs. Each instance sizes its register arrays by it: with
// arrays for 4 the bf16 fused_add_rms_norm kernel took 98 registers (25% occupancy, Nsight
// Compute, H200) also in its blocks of 2 vectors per thread.
template <typename F>
void with_reg_vecs(int64_t max_vecs, int threads, F&& f) {
  const int64_t n = (max_vecs + threads - 1) / threads;
  TORCH_CHECK(n <= kRegVecs, "eagle3 register norm kernel: ", max_vecs, " vectors over ", threads,
              " threads exceed ", kRegVecs, " per thread");
  if (n <= 1) f(std::integral_constant<int, 1>{});
  else if (n <= 2) f(std::integral_constant<int, 2>{});
  else f(std::integral_constant<int, kRegVecs>{});
}

// The WeightKind of an optional norm weight for inputs of dtype x.
inline WeightKind weight_kind(const at::Tensor* w, at::ScalarType x) {
  return !w || !w->defined() ? kNoWeight : (w->scalar_type() == x ? kWeightSameType : kWeightFp32);
}
// Before a launch of a staging kernel: raise its dynamic shared-memory limit to the opt-in
// maximum (less its static shared memory) and ask for the largest shared-memory carveout
// (once per device and kernel), so the rows in flight per SM are bounded by the stage size,
// not by the L1 / shared split (a launch may ask for less: norm_carveout,
// launch_with_carveout). largest_carveout false: the limit only, the carveout left to the
// driver (which sizes shared memory for the resident blocks and leaves the rest to L1: the
// split-k fc kernel's warps share their x fragments through L1).
void configure_staging_kernel(const void* kernel, int device, bool largest_carveout = true);

// The shared-memory carveout (percent) for a staged norm launch of `rows` rows, blocks of
// `threads` threads and `block_smem` bytes of dynamic shared memory, reading `weight_bytes`
// of norm weights from global memory for every row (0 when none or staged): the value of
// set_norm_carveout, or by size (common.cu) the smallest configuration that keeps the
// launch's occupancy and leaves the L1 cache room for the weights; -1: the kernel's own
// (the largest, configure_staging_kernel).
int norm_carveout(int64_t rows, int64_t block_smem, int threads, int64_t weight_bytes, int device);

// kernel<<<grid, threads, smem, stream>>>(args...), with the shared-memory carveout
// `carveout` (percent) as a launch attribute where it is >= 0 and the stream is not being
// captured (the attribute is documented for launches, not for graph nodes). Returns the
// carveout applied, -1 for none.
template <typename... Params, typename... Args>
int launch_with_carveout(void (*kernel)(Params...), unsigned grid, int threads, int64_t smem, cudaStream_t stream,
                         int carveout, Args&&... args) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  if (carveout >= 0) C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (carveout < 0 || capture != cudaStreamCaptureStatusNone) {
    kernel<<<grid, threads, static_cast<size_t>(smem), stream>>>(std::forward<Args>(args)...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return -1;
  }
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(grid);
  cfg.blockDim = dim3(static_cast<unsigned>(threads));
  cfg.dynamicSmemBytes = static_cast<size_t>(smem);
  cfg.stream = stream;
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributePreferredSharedMemoryCarveout;
  attr.val.sharedMemCarveout = static_cast<unsigned>(carveout);
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...));
  return carveout;
}

// Threads for a launch of `rows` rows whose largest chunk has `max_vecs` vectors: about
// norm_vecs_per_thread(rows, by_shape) vectors per thread (a multiple of 32 threads, at most 512).
// Smaller blocks keep more rows in flight per multiprocessor (each block stages one row, and
// 512-thread blocks left a Hopper SM with 2-4 rows: about 40% of the copy bandwidth on an
// H200, bench run of 6e31654), but at 4 vectors per thread each thread's chain of loads and
// stores held the kernels at 85-86% of the copy bandwidth on the H100 for K=3; 2 reached
// 96-98% there. Small launches have few rows to overlap: 1 vector per thread spreads each
// row over the most threads.
inline int threads_for(int64_t max_vecs, int64_t rows, int by_shape = 0) {
  const int v = norm_vecs_per_thread(rows, by_shape);
  const int64_t t = (max_vecs + v - 1) / v;
  return static_cast<int>(std::min<int64_t>(512, std::max<int64_t>(32, round_up(static_cast<int>(t), 32))));
}

}  // namespace eagle3::cuda

