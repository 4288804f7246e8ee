// rms_norm_cat_linear on Hopper (sm_90a) at prefill sizes: a TMA + wgmma GEMM that reads
// its A operand straight from the K chunk tensors and applies the per-token, per-chunk norm
// scale to its fp32 accumulators, so neither the concatenation nor the normalised input is
// ever written to memory:
//
//   out[t, n] = sum_k s[t, k] * (x_k[t, :] . W[n, off_k : off_k + H_k])   (W: folded weight)
//
// Two launches (one for norm "none"):
//  1. fc_row_scales_kernel: s[t, k] as fp32 [T, K].
//  2. fc_wgmma_kernel: a block owns kBM = 128 tokens x BN features (BN = 128 or 256) and the
//     whole k loop, in 64-wide k-tiles (128 bytes of bf16 / fp16: the swizzle span).
//     - Warpgroup 0 produces: one thread issues, per k-tile, two TMA loads into a ring of
//       STAGES shared-memory stages (128-byte swizzle), both completing on the stage's `full`
//       mbarrier: the tokens' tile, through the tensor map of the chunk that holds this
//       k-tile, and the weight's tile.
//     - Warpgroups 1 and 2 consume, 64 tokens each: per k-tile four wgmma m64nBNk16 with
//       both operands in shared memory, one wgmma group kept in flight; a stage goes back to
//       the producer through its `empty` mbarrier once the group that read it is complete.
//     - A k-tile never straddles two chunks (the launcher requires chunk widths that are
//       multiples of 64). At the first k-tile of chunk k (norm "chunk") the consumer waits
//       for its wgmma and multiplies each accumulator row by s[t, k-1] / s[t, k]; after the
//       last k-tile it multiplies by s[t, K-1]. The accumulators then hold sum_k s[t,k] P_k
//       in one set of registers. Norm "shared": one scale per token, applied at the end;
//       "none": no scale and no pre-pass.
//     - Tiles run in groups of kGroupM token tiles, token tile fastest, so the blocks that
//       run together share their weight tiles in L2.
//     - With _fc_wgmma_cluster(2) (off by default), two blocks on consecutive token
//       tiles form a cluster and each loads half of the weight tile, multicast to both.
//     - With _fc_wgmma_split_k(n) (off by default; for T <= 128, where one token tile
//       leaves a block per 128 features), a cluster of n blocks shares each tile, each
//       taking 1/n of its k-tiles; their partial sums are added through distributed
//       shared memory (details at the kernel).
//
// Numerics: the scale multiplies fp32 partial sums of the raw inputs (the identity of
// DESIGN.md section 2, item 3) instead of rounding x * s to the input dtype first as
// rms_norm_cat + GEMM does; the result is at least as close to the fp64 reference.
//
// Off by default (torch.ops.eagle3._fc_wgmma_min_tokens; the figures at g_wgmma_min_tokens).
#include "cuda/cluster.cuh"
#include "cuda/common.cuh"
#include "cuda/wgmma.cuh"

#include <ATen/ATen.h>
#include <cuda.h>           // CUtensorMap and its enums; the encoder comes through the runtime
#include <cudaTypedefs.h>   // PFN_cuTensorMapEncodeTiled

#include <algorithm>
#include <atomic>
#include <cstring>
#include <utility>

namespace eagle3::cuda {
namespace {

constexpr int kBM = 128;             // tokens per block: two consumer warpgroups x 64
constexpr int kBK = 64;              // k per stage
constexpr int kThreads = 384;        // producer warpgroup + two consumer warpgroups
constexpr int kWgmmaMaxChunks = 8;   // tensor maps passed by value (128 bytes each)
constexpr int kSmemBudget = 192 * 1024;  // pipeline stages per block

constexpr int stages_for(int bn) { return kSmemBudget / ((kBM + bn) * kBK * 2) < 6 ? kSmemBudget / ((kBM + bn) * kBK * 2) : 6; }
constexpr int smem_bytes_for(int bn) {
  // stages, their full / empty barriers, the token rows' sums of squares (tile_stats), and
  // slack to align the stages to 1024 bytes
  return stages_for(bn) * (kBM + bn) * kBK * 2 + 2 * stages_for(bn) * 8 + kBM * 4 + 1024;
}

struct XMaps {
  CUtensorMap m[kWgmmaMaxChunks];
};

struct KTiles {
  int32_t first[kWgmmaMaxChunks + 1];  // first k-tile of each chunk; first[num_chunks] = all k-tiles
  int32_t num_chunks;
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}
__device__ __forceinline__ bool mbar_try_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      "selp.u32 %0, 1, 0, p;\n"
      "}\n"
      : "=r"(done)
      : "r"(smem_addr(bar)), "r"(parity)
      : "memory");
  return done != 0;
}
// A wait that has lasted this many clock cycles (seconds, where a real one lasts
// microseconds, tens of microseconds under compute-sanitizer) can only be a pipeline that
// will never complete: the kernel traps -- an error the caller sees -- instead of hanging.
constexpr long long kWatchdogCycles = 1ll << 33;
// Until the phase of `bar` with this parity has completed.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  if (mbar_try_wait(bar, parity)) return;
  const long long start = clock64();
  while (!mbar_try_wait(bar, parity))
    if (clock64() - start > kWatchdogCycles) __trap();
}
// A 2-D TMA load of the box at (inner, outer) into shared memory, completing on `bar`.
__device__ __forceinline__ void tma_load(void* dst, const CUtensorMap* map, uint64_t* bar, int inner, int outer) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];\n"
      ::"r"(smem_addr(dst)), "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_addr(bar)), "r"(inner), "r"(outer)
      : "memory");
}
// The same load multicast to every CTA of the cluster in `mask` (the same shared-memory
// offset in each, completing on each one's barrier at `bar`'s offset).
__device__ __forceinline__ void tma_load_multicast(void* dst, const CUtensorMap* map, uint64_t* bar, int inner,
                                                   int outer, uint16_t mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.multicast::cluster"
      " [%0], [%1, {%3, %4}], [%2], %5;\n"
      ::"r"(smem_addr(dst)), "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_addr(bar)), "r"(inner), "r"(outer),
      "h"(mask)
      : "memory");
}
// One arrival on the barrier at `bar`'s offset in CTA `cta` of the cluster (this CTA too).
__device__ __forceinline__ void mbar_arrive_cluster(uint64_t* bar, uint32_t cta) {
  const uint32_t remote = cluster_addr(bar, cta);
  // (no .release.cluster: it would fence the whole GPU on every k-tile, and the only thing
  // to order, the wgmma group's shared-memory reads, is complete after wgmma.wait_group)
  asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];\n" ::"r"(remote) : "memory");
}
// Shared-memory matrix descriptor of a K-major operand laid out by a TMA load with 128-byte
// swizzle: rows of 128 bytes, 8-row (1024-byte) swizzle atoms, so the stride between 8-row
// groups is 1024 bytes; the leading offset is unused in this layout. Advancing k by 16
// elements inside the 64-wide tile adds 32 bytes to the start address.
__device__ __forceinline__ uint64_t sw128_desc(const void* p) {
  return (static_cast<uint64_t>(smem_addr(p) & 0x3FFFF) >> 4) | (uint64_t{1} << 16) | (uint64_t{1024 >> 4} << 32) |
         (uint64_t{1} << 62);
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accumulator accesses across a wgmma wait.
template <int R>
__device__ __forceinline__ void fence_acc(float (&d)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
// Accumulator layout of m64nNk16 (fp32): register 4j + q of thread `lane` of warp w holds
// row 16w + lane/4 + 8 (q / 2), column 8j + 2 (lane % 4) + q % 2.
template <int R>
__device__ __forceinline__ void scale_rows(float (&d)[R], float lo, float hi) {
#pragma unroll
  for (int i = 0; i < R; ++i) d[i] *= (i % 4) < 2 ? lo : hi;
}
// Two outputs rounded to T, packed for one 4-byte store.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float v0, float v1) {
  const T v[2] = {from_float<T>(v0), from_float<T>(v1)};
  uint32_t u;
  memcpy(&u, v, sizeof(u));
  return u;
}
// The sum of the squares of the 8 elements in 16 bytes of shared memory at `p` (an explicit
// shared-memory load: the generic pointer would compile to a generic one).
template <typename T>
__device__ __forceinline__ float sum_squares16(const uint8_t* p) {
  Vec<T> v;
  uint32_t* const u = reinterpret_cast<uint32_t*>(&v);
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(u[0]), "=r"(u[1]), "=r"(u[2]), "=r"(u[3])
               : "r"(smem_addr(p))
               : "memory");
  float ss = 0.f;
#pragma unroll
  for (int e = 0; e < Vec<T>::N; ++e) { const float f = to_float(v.v[e]); ss += f * f; }
  return ss;
}
#endif

// Per token: the scale of every chunk, written to scales[t * num_chunks + k].
template <typename T>
__global__ void __launch_bounds__(256)
fc_row_scales_kernel(const __grid_constant__ ChunkTable tab, const int num_chunks, float* __restrict__ scales,
                     const int64_t num_rows, const int total, const float eps, const int mode) {
  constexpr int V = Vec<T>::N;
  __shared__ float warp_sums[kMaxChunks][8];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t t = blockIdx.x; t < num_rows; t += gridDim.x) {
    for (int k = 0; k < num_chunks; ++k) {
      const ChunkDesc& c = tab.c[k];
      const T* src = static_cast<const T*>(c.x) + t * c.x_stride;
      float ss = 0.f;
      for (int i = threadIdx.x * V; i < c.width; i += blockDim.x * V) {  // vec: checked by the launcher
        const Vec<T> v = load_vec(src + i);
#pragma unroll
        for (int e = 0; e < V; ++e) { const float f = to_float(v.v[e]); ss += f * f; }
      }
      ss = warp_sum(ss);
      if (lane == 0) warp_sums[k][warp] = ss;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      float all = 0.f;
      for (int k = 0; k < num_chunks; ++k) {
        float s = 0.f;
        for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) s += warp_sums[k][w];
        all += s;
        if (mode == static_cast<int>(NormMode::kChunk))
          scales[t * num_chunks + k] = rsqrtf(s / static_cast<float>(tab.c[k].width) + eps);
      }
      if (mode == static_cast<int>(NormMode::kShared)) {
        const float r = rsqrtf(all / static_cast<float>(total) + eps);
        for (int k = 0; k < num_chunks; ++k) scales[t * num_chunks + k] = r;
      }
    }
    __syncthreads();
  }
}

// __launch_bounds__(kThreads, 1) caps the registers at entry at 168 = 65536 / 384, which
// setmaxnreg redistributes (producer 40, consumers 232: 128 x 40 + 256 x 232 = 384 x 168);
// a different cap would leave setmaxnreg.inc waiting for registers that never free up.
//
// CM = 2 (_fc_wgmma_cluster(2)): clusters of two blocks on consecutive token tiles of the same
// features. Each block loads its own token tile and half of the weight tile, multicast to
// both blocks, so the weight's L2 -> SM traffic halves (at BN = 256 it is two thirds of a
// block's bytes per k-tile). A stage then goes back to a producer only when the consumers
// of both blocks are done with it: one thread per consumer warpgroup arrives on the
// `empty` barrier of each block of the cluster. A token tile past the last one (an odd
// count) loads the last tile again and writes nothing.
//
// split_k > 1 (_fc_wgmma_split_k; CM = 1): clusters of split_k blocks on the same tile, block
// r of the cluster taking the k-tiles [r num_kt / split_k, (r + 1) num_kt / split_k). Each
// block's accumulators then hold the scaled partial sum of its k-tiles (the chunk rescaling
// starts at the chunk of its first k-tile and ends with the scale of its last one); they go
// to its shared memory (the stages are free by then), and after the cluster's barrier
// block r adds up rows [r kBM / split_k, (r + 1) kBM / split_k) of every block's partial
// sums through distributed shared memory and writes them. A block whose range is empty
// (fewer k-tiles than blocks) contributes zeros.
//
// tile_stats (_fc_wgmma_tile_stats): the norm statistics from the tiles the blocks stream,
// no pre-pass and no `scales`; for norm "shared" (and "chunk" over one chunk), and with
// split_k > 1 for "chunk". While the wgmma of a k-tile runs, the consumer threads add up the
// squares of its token rows from the stage (two threads per row, 64 bytes each; the 128-byte
// swizzle permutes 16-byte pieces within a row, so which piece is which does not matter for
// the sum), and after the k loop the accumulators are scaled by rsqrt(mean + eps) of their
// rows:
//  - split_k == 1 (norm "shared", or "chunk" with K = 1): the block streams every k-tile of
//    its rows, so its own sums are the statistic.
//  - split_k > 1: norm "chunk" takes split_k = K m and gives chunk k to blocks
//    [k m, (k + 1) m), each taking 1/m of its k-tiles, so every block's k range lies in one
//    chunk ("shared": the even split). Each block puts its per-row sums in shared memory;
//    after a cluster barrier it reads those of the blocks of its chunk (all blocks:
//    "shared") through distributed shared memory, and scales its partial sums before the
//    reduction above.
template <typename T, int BN, int CM>
__global__ void __launch_bounds__(kThreads, 1)
fc_wgmma_kernel(const __grid_constant__ CUtensorMap wmap, const __grid_constant__ XMaps xmaps,
                const __grid_constant__ KTiles kt_of,
                const float* __restrict__ scales,  // [T, num_chunks]; null for norm "none"
                T* __restrict__ out,               // [T, N] contiguous
                const int num_tokens, const int n_out, const int mode, const int split_k, const float eps,
                const int tile_stats) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int STAGES = stages_for(BN);
  constexpr int A_BYTES = kBM * kBK * 2, STAGE_BYTES = (kBM + BN) * kBK * 2;
  constexpr int kConsumerThreads = 256;
  constexpr int kGroupM = 8;  // token tiles per group of the tile order
  // row stride (floats) of the split-k partial sums in shared memory: 8 mod 32, so a half
  // warp's 8-byte stores (4 rows x 4 column pairs) fall on 32 different banks
  constexpr int kPartLd = BN + 8;
  static_assert(kBM * kPartLd * 4 <= STAGES * STAGE_BYTES, "the partial sums fit over the stages");
  extern __shared__ uint8_t smem_raw[];
  uint8_t* const smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t{1023});
  uint64_t* const full = reinterpret_cast<uint64_t*>(smem + STAGES * STAGE_BYTES);
  uint64_t* const empty = full + STAGES;
  float* const row_ss = reinterpret_cast<float*>(empty + STAGES);  // [kBM]: tile_stats' sums of squares

  static_assert(CM == 1 || CM == 2, "clusters of one or two blocks");
  // This block's tile: groups of kGroupM token tiles, token tile fastest, in units of
  // clusters (the CM blocks of a cluster take consecutive token tiles of the same features;
  // a 1-D grid with cluster dims (CM, 1, 1) makes blockIdx.x % CM the rank in the cluster).
  constexpr int kGroupC = kGroupM / CM;
  const int num_m = (num_tokens + kBM - 1) / kBM, num_n = (n_out + BN - 1) / BN;
  const int num_mc = (num_m + CM - 1) / CM;
  // split_k > 1: consecutive blocks (one cluster) share a tile and split its k-tiles
  const int tile_block = blockIdx.x / split_k, k_rank = blockIdx.x % split_k;
  const int cid = tile_block / CM, rank = tile_block % CM;
  const int group = cid / (kGroupC * num_n), in_group = cid % (kGroupC * num_n);
  const int first_c = group * kGroupC, group_c = min(kGroupC, num_mc - first_c);
  const int m0 = ((first_c + in_group % group_c) * CM + rank) * kBM, n0 = (in_group / group_c) * BN;
  const int m0_load = min(m0, (num_m - 1) * kBM);
  const int num_kt = kt_of.first[kt_of.num_chunks];
  // tile_stats with norm "chunk": m = split_k / K blocks per chunk, each range inside one
  const bool by_chunk = tile_stats && mode == static_cast<int>(NormMode::kChunk);
  const int per_chunk = by_chunk ? split_k / kt_of.num_chunks : 1;
  const int my_chunk = by_chunk ? k_rank / per_chunk : 0;
  const int range_first = by_chunk ? kt_of.first[my_chunk] : 0;
  const int range_len = by_chunk ? kt_of.first[my_chunk + 1] - range_first : num_kt;
  const int range_parts = by_chunk ? per_chunk : split_k, range_rank = by_chunk ? k_rank % per_chunk : k_rank;
  const int kt_begin = range_first + static_cast<int>(int64_t{range_rank} * range_len / range_parts);
  const int kt_end = range_first + static_cast<int>(int64_t{range_rank + 1} * range_len / range_parts);

  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(&full[s], 1);  // the producer's arrive (+ the TMA bytes)
      // CM = 1: every consumer thread; else one thread per consumer warpgroup of each block
      mbar_init(&empty[s], CM == 1 ? kConsumerThreads : 2 * CM);
    }
    // the initialised barriers visible to the TMA unit (async proxy) before any copy
    asm volatile("fence.mbarrier_init.release.cluster;\nfence.proxy.async.shared::cta;\n" ::: "memory");
  }
  __syncthreads();
  if constexpr (CM > 1) cluster_sync();  // both blocks' barriers initialised before any multicast

  const int wg = threadIdx.x / 128;
  if (wg == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
    if (threadIdx.x == 0) {
      int c = 0;
      for (int kt = kt_begin; kt < kt_end; ++kt) {
        const int i = kt - kt_begin, s = i % STAGES;
        mbar_wait(&empty[s], ((i / STAGES) & 1) ^ 1);  // round 0 passes at once
        while (kt >= kt_of.first[c + 1]) ++c;
        uint8_t* const a = smem + s * STAGE_BYTES;
        mbar_arrive_expect_tx(&full[s], STAGE_BYTES);  // out-of-bounds rows are zero-filled and still counted
        tma_load(a, &xmaps.m[c], &full[s], (kt - kt_of.first[c]) * kBK, m0_load);
        if constexpr (CM == 1) {
          tma_load(a + A_BYTES, &wmap, &full[s], kt * kBK, n0);
        } else {  // this block's half of the weight tile, into both blocks
          tma_load_multicast(a + A_BYTES + rank * (BN / CM) * kBK * 2, &wmap, &full[s], kt * kBK,
                             n0 + rank * (BN / CM), static_cast<uint16_t>((1u << CM) - 1));
        }
      }
    }
    if (tile_stats && split_k > 1) cluster_sync();  // the consumers' barrier after their row sums
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
    const int cw = wg - 1, tid = threadIdx.x % 128, warp = tid / 32, lane = tid % 32;
    const int r_lo = 64 * cw + 16 * warp + lane / 4;  // this thread's accumulator rows in the tile: r_lo, + 8
    const int row_lo = m0 + r_lo, row_hi = row_lo + 8;  // its tokens
    const bool lo_ok = row_lo < num_tokens, hi_ok = row_hi < num_tokens;
    const int K = kt_of.num_chunks;
    float acc[BN / 2];
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) acc[i] = 0.f;

    float ss = 0.f;  // tile_stats: over this thread's half of token row 64 cw + tid / 2 of the tile
    const int ss_row = tid / 2, ss_half = tid % 2;
    int c = 0;  // the chunk of the k-tile being multiplied
    while (c + 1 < K && kt_begin >= kt_of.first[c + 1]) ++c;
    for (int kt = kt_begin; kt < kt_end; ++kt) {
      const int i = kt - kt_begin, s = i % STAGES;
      if (kt == kt_of.first[c + 1]) {  // chunk c + 1 begins (never with tile_stats's "chunk" ranges)
        ++c;
        if (mode == static_cast<int>(NormMode::kChunk) && !tile_stats) {
          wgmma_wait<0>();
          fence_acc(acc);
          const float lo = lo_ok ? scales[int64_t{row_lo} * K + c - 1] / scales[int64_t{row_lo} * K + c] : 1.f;
          const float hi = hi_ok ? scales[int64_t{row_hi} * K + c - 1] / scales[int64_t{row_hi} * K + c] : 1.f;
          scale_rows(acc, lo, hi);
        }
      }
      mbar_wait(&full[s], (i / STAGES) & 1);
      const uint8_t* const a = smem + s * STAGE_BYTES + cw * 64 * (kBK * 2);
      const uint8_t* const b = smem + s * STAGE_BYTES + A_BYTES;
      wgmma_fence();
#pragma unroll
      for (int k16 = 0; k16 < kBK / 16; ++k16)
        Wgmma<T, BN>::mma(acc, sw128_desc(a + 32 * k16), sw128_desc(b + 32 * k16));
      wgmma_commit();
      if (tile_stats) {  // while the group runs: 16-byte pieces 4 ss_half .. + 3, staggered
        const uint8_t* const arow = a + ss_row * (kBK * 2);  // by row so a warp's loads spread over
#pragma unroll                                                // the banks
        for (int u = 0; u < 4; ++u) ss += sum_squares16<T>(arow + 16 * (4 * ss_half + ((u + ss_row) & 3)));
      }
      wgmma_wait<1>();  // the group of k-tile kt - 1 is complete: its stage can be refilled
      fence_acc(acc);
      // CM > 1 releases a stage through one thread per warpgroup (below): with tile_stats the
      // warpgroup's other warps read the stage too, so they all finish reading first
      if (CM > 1 && tile_stats && i > 0) asm volatile("bar.sync %0, 128;\n" ::"r"(2 + cw) : "memory");
      if (i > 0) {
        if constexpr (CM == 1) {
          mbar_arrive(&empty[(i - 1) % STAGES]);
        } else if (tid % 32 == 0 && warp < CM) {  // warp r's first thread: block r of the cluster
          mbar_arrive_cluster(&empty[(i - 1) % STAGES], static_cast<uint32_t>(warp));
        }
      }
    }
    wgmma_wait<0>();
    fence_acc(acc);

    // split_k > 1: the block's partial sums go to its shared memory, over the stages: first
    // both consumer warpgroups' last wgmma groups (which read them) complete.
    if (split_k > 1) asm volatile("bar.sync 1, %0;\n" ::"n"(kConsumerThreads) : "memory");
    if (tile_stats) {
      ss += __shfl_xor_sync(0xffffffffu, ss, 1);
      if (ss_half == 0) row_ss[64 * cw + ss_row] = ss;
      float ss_lo = 0.f, ss_hi = 0.f;
      if (split_k > 1) {
        cluster_sync();  // (the producer warpgroup's matching arrival follows its loop)
        // the blocks that hold this block's chunk ("shared": all of them)
        const int p0 = by_chunk ? my_chunk * per_chunk : 0, p1 = by_chunk ? p0 + per_chunk : split_k;
        for (int p = p0; p < p1; ++p) {
          ss_lo += ld_cluster_f32(row_ss + r_lo, static_cast<uint32_t>(p));
          ss_hi += ld_cluster_f32(row_ss + r_lo + 8, static_cast<uint32_t>(p));
        }
      } else {  // this warpgroup's rows, summed by its own threads
        asm volatile("bar.sync %0, 128;\n" ::"r"(2 + cw) : "memory");
        ss_lo = row_ss[r_lo];
        ss_hi = row_ss[r_lo + 8];
      }
      const float width = static_cast<float>(  // of the chunk ("shared": the row)
          by_chunk ? (kt_of.first[my_chunk + 1] - kt_of.first[my_chunk]) * kBK : num_kt * kBK);
      scale_rows(acc, rsqrtf(ss_lo / width + eps), rsqrtf(ss_hi / width + eps));
    } else if (mode != static_cast<int>(NormMode::kNone)) {
      const int last = mode == static_cast<int>(NormMode::kChunk) ? c : 0;  // (the last k-tile's chunk)
      scale_rows(acc, lo_ok ? scales[int64_t{row_lo} * K + last] : 0.f, hi_ok ? scales[int64_t{row_hi} * K + last] : 0.f);
    }
    if (split_k > 1) {
      float* const part = reinterpret_cast<float*>(smem);  // [kBM][kPartLd]
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) {
        const int col = 8 * j + 2 * (lane % 4);
        *reinterpret_cast<float2*>(part + r_lo * kPartLd + col) = make_float2(acc[4 * j], acc[4 * j + 1]);
        *reinterpret_cast<float2*>(part + (r_lo + 8) * kPartLd + col) = make_float2(acc[4 * j + 2], acc[4 * j + 3]);
      }
    } else {
      const int col0 = n0 + 2 * (lane % 4);
      const bool pairs = n_out % 2 == 0;  // 4-byte aligned pairs of outputs
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = h ? row_hi : row_lo;
        if (!(h ? hi_ok : lo_ok)) continue;
        T* const orow = out + int64_t{row} * n_out;
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
          const int col = col0 + 8 * j;
          const float v0 = acc[4 * j + 2 * h], v1 = acc[4 * j + 2 * h + 1];
          if (pairs && col + 1 < n_out) {
            *reinterpret_cast<uint32_t*>(orow + col) = pack2<T>(v0, v1);
          } else {
            if (col < n_out) orow[col] = from_float<T>(v0);
            if (col + 1 < n_out) orow[col + 1] = from_float<T>(v1);
          }
        }
      }
    }
  }
  if (split_k > 1) {
    cluster_sync();  // every block's partial sums are in its shared memory
    if (wg > 0) {    // the consumer threads add up this block's rows of every block's sums
      const float* const part = reinterpret_cast<const float*>(smem);
      const int r0 = k_rank * kBM / split_k, r1 = (k_rank + 1) * kBM / split_k;
      const bool quads = n_out % 4 == 0;  // 8-byte aligned groups of four outputs
      for (int idx = threadIdx.x - 128; idx < (r1 - r0) * (BN / 4); idx += kConsumerThreads) {
        const int row = r0 + idx / (BN / 4), col = 4 * (idx % (BN / 4));
        const int g_row = m0 + row, g_col = n0 + col;
        if (g_row >= num_tokens || g_col >= n_out) continue;
        float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int p = 0; p < split_k; ++p) {
          const float4 v = ld_cluster_f4(part + row * kPartLd + col, static_cast<uint32_t>(p));
          sum.x += v.x; sum.y += v.y; sum.z += v.z; sum.w += v.w;
        }
        T* const o = out + int64_t{g_row} * n_out + g_col;
        if (quads && g_col + 3 < n_out) {
          *reinterpret_cast<uint2*>(o) = make_uint2(pack2<T>(sum.x, sum.y), pack2<T>(sum.z, sum.w));
        } else {
          const float v[4] = {sum.x, sum.y, sum.z, sum.w};
          for (int e = 0; e < 4 && g_col + e < n_out; ++e) o[e] = from_float<T>(v[e]);
        }
      }
    }
    cluster_sync();  // no block leaves while the others read its shared memory
  }
  // No block leaves while the other may still multicast into it or arrive on its barriers.
  if constexpr (CM > 1) cluster_sync();
#else
  __trap();  // launched only where the sm_90a code was built and selected (sm90a_body_runs)
#endif
}

// ---- host side --------------------------------------------------------------------------------

// The statistics pre-pass: per token, the scale of each chunk (norm "chunk":
// rsqrt(mean(x_k^2) + eps); "shared": the row's one scale, repeated per chunk) as fp32
// [T, K] on `like`'s device; undefined for norm "none". bf16 / fp16 chunks whose every
// access is 16 bytes wide (the launcher checks), described by `tab`.
at::Tensor fc_row_scales(const ChunkTable& tab, const ChunkRows& c, float eps, NormMode mode, const at::Tensor& like,
                         cudaStream_t stream) {
  if (mode == NormMode::kNone) return {};
  const int64_t rows = c.num_rows;
  const int num_chunks = static_cast<int>(c.rows.size());
  at::Tensor scales = at::empty({rows, num_chunks}, like.options().dtype(at::kFloat));
  auto launch = [&](auto kernel) {
    kernel<<<static_cast<unsigned>(rows), 256, 0, stream>>>(tab, num_chunks, scales.data_ptr<float>(), rows,
                                                             static_cast<int>(c.total_width), eps,
                                                             static_cast<int>(mode));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (c.rows[0].scalar_type() == at::kBFloat16) launch(fc_row_scales_kernel<__nv_bfloat16>);
  else launch(fc_row_scales_kernel<__half>);
  return scales;
}


// Smallest T served (0: off, the default). On the H100 (K=3, bf16, N=H;
// bench/results/nvidia-h100-80gb-hbm3-80ab0d87a9d7-tune.json) BN=256 beat rms_norm_cat + cuBLAS only at H=4096 for T=2048 (338 against 366 us) and
// T=16384 (2630 / 2783); it lost at H=7168 (T=2048 1069 / 1002, T=16384 8256 / 7473) and at
// T=128 (124 / 49, BN=128 77 / 49). The wider grid of the next run (ed5c01eeed8c-tune.json,
// T = 128..16384 x H = 4096..8192, clusters of two too) had the best variant 0.8-10% behind
// the pair at every T >= 2048 (H=4096 T=2048 338.7 / 333.1, T=16384 2650 / 2627): no
// threshold.
std::atomic<int64_t> g_wgmma_min_tokens{0};
// Largest T served (0: no limit, the default): with the split kernel (g_wgmma_split_k 0, by
// size) the kernel can take the decode sizes alone and leave the prefill sizes to the pair.
std::atomic<int64_t> g_wgmma_max_tokens{0};
// Features per block: 0 chooses (256 when that fills every multiprocessor, else 128).
std::atomic<int64_t> g_wgmma_tile_n{0};
// Blocks per cluster sharing (multicasting) their weight tiles: 1 (the default), or 2 (the
// first H100 run's kernel was CM = 1 at an estimated 7 TB/s of L2 -> SM traffic at T=16384,
// H=7168: 48 KB per k-tile per block at 611 TFLOP/s). Measured in ed5c01eeed8c-tune.json:
// 2 cut that case from 8143 to 7677 us (the pair: 7563); at T >= 2048 it was 0.94-1.06x
// of 1's time, at T=128 1.04-1.30x.
std::atomic<int64_t> g_wgmma_cluster{1};

// Blocks per cluster splitting each tile's k-tiles (fc_wgmma_kernel's split_k): 1 (the
// default: no split), 2..8, or 0 to choose by size (as many as keep the blocks within one
// per multiprocessor, and their clusters within what the GPCs hold at once: at T <= 128 and
// BN = 128 on 132 multiprocessors, at most 4 for N=4096, 3 for 5120, 2 for 7168). For
// the decode sizes, where a 128-token tile leaves too few tiles to stream the weight from
// every multiprocessor (T=128, H=4096: 32 tiles of 128 features; 76.9 us against 49.3 for
// the pair in 80ab0d87a9d7-tune.json). Measured on the H200 (nvidia-h200-7c333f2ce8d4-tune.json,
// by size, statistics from the cluster; graph replay): with BN = 256, T = 8 / 16 / 32 / 64 at
// H=4096 35.9 / 36.6 / 37.7 / 37.6 us against 33.8 / 32.9 / 34.1 / 35.9 for the pair (and
// 32.8 for the mma kernel at T=8); H=7168 96.4-102.2 against 86.7-91.6; BN = 128 slower
// still (46.7-56.9 at H=4096). So off by default.
std::atomic<int64_t> g_wgmma_split_k{1};
constexpr int64_t kMaxSplitK = 8;  // the portable cluster size
// Where the kernel takes the norm statistics from the tiles it streams (fc_wgmma_kernel's
// tile_stats: one launch, x read once) instead of a pre-pass: 2 (the default) with the k
// range split only, 1 wherever that applies, 0 never (the pre-pass). It applies to norm
// "shared", and with the k range split to norm "chunk" with split_k a multiple of K (the
// by-size choice takes one when it keeps one block per multiprocessor). H200, tune of
// 7c333f2 (bench/results/nvidia-h200-7c333f2ce8d4-tune.json): split (T = 8..64, H = 4096, 128
// features, 4 blocks per tile) 54.3 / 52.0 / 56.9 us against 55.7 / 53.6 / 58.9 with the
// pre-pass; unsplit (norm "shared", 256 features) 13-19% slower than with the pre-pass:
// T=2048 H=4096 364.7 against 323.9 us, T=16384 3087 / 2639, H=7168 1261 / 1056 and
// 9244 / 7766 (the consumers' extra shared-memory reads of the x tiles delay the wgmma
// where it is compute-bound; the pre-pass's read of x costs less).
std::atomic<int64_t> g_wgmma_tile_stats{2};

using EncodeTiled = PFN_cuTensorMapEncodeTiled_v12000;

// The driver's tensor-map encoder, through the runtime (no link to libcuda); null when the
// driver has none.
EncodeTiled encoder() {
  static const EncodeTiled fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();
      return EncodeTiled{nullptr};
    }
    return reinterpret_cast<EncodeTiled>(p);
  }();
  return fn;
}

// A [outer, inner] row-major matrix of 2-byte elements with rows `row_bytes` apart, read in
// boxes of kBK x box_outer with 128-byte swizzle; out-of-bounds elements read as zeros.
bool encode_map(CUtensorMap* map, at::ScalarType dt, const void* base, int64_t inner, int64_t outer,
                int64_t row_bytes, int box_outer) {
  const EncodeTiled encode = encoder();
  if (!encode) return false;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(inner), static_cast<cuuint64_t>(outer)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(row_bytes)};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(kBK), static_cast<cuuint32_t>(box_outer)};
  const cuuint32_t elem[2] = {1, 1};
  const CUtensorMapDataType type =
      dt == at::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  return encode(map, type, 2, const_cast<void*>(base), dims, strides, box, elem, CU_TENSOR_MAP_INTERLEAVE_NONE,
                CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

template <typename T, int BN, int CM>
bool launch_tile(const ChunkRows& c, const at::Tensor& weight, float eps, NormMode mode, at::Tensor& out,
                 int64_t split_k) {
  static_assert(CM == 1 || CM == 2, "clusters of one or two blocks along the tokens");
  if (CM > 1 && split_k > 1) return false;  // one kind of cluster at a time (the caller picks)
  const auto kernel = fc_wgmma_kernel<T, BN, CM>;
  const int device = weight.get_device();
  const c10::cuda::CUDAGuard guard(weight.device());
  if (!sm90a_body_runs(reinterpret_cast<const void*>(kernel), device)) return false;
  if (max_smem_optin(device) < smem_bytes_for(BN)) return false;
  const int64_t T_ = c.num_rows, N = weight.size(0);
  const int num_chunks = static_cast<int>(c.rows.size());
  const at::ScalarType dt = c.rows[0].scalar_type();

  XMaps xmaps{};
  KTiles tiles{};
  ChunkTable tab{};  // for the statistics pre-pass
  tiles.num_chunks = num_chunks;
  for (int k = 0; k < num_chunks; ++k) {
    const at::Tensor& x = c.rows[k];
    if (!encode_map(&xmaps.m[k], dt, x.data_ptr(), c.widths[k], T_, x.stride(0) * 2, kBM)) return false;
    tiles.first[k] = static_cast<int32_t>(c.offsets[k] / kBK);
    tab.c[k] = ChunkDesc{x.data_ptr(), nullptr, x.stride(0), static_cast<int32_t>(c.widths[k]),
                         static_cast<int32_t>(c.offsets[k]), 0, 1, kNoWeight};
  }
  tiles.first[num_chunks] = static_cast<int32_t>(c.total_width / kBK);
  CUtensorMap wmap{};
  if (!encode_map(&wmap, dt, weight.data_ptr(), c.total_width, N, weight.stride(0) * 2, BN / CM)) return false;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device);
  configure_staging_kernel(reinterpret_cast<const void*>(kernel), device);
  const int64_t token_tiles = ((T_ + kBM - 1) / kBM + CM - 1) / CM * CM;  // whole clusters
  const int64_t tiles_mn = token_tiles * ((N + BN - 1) / BN);
  const int64_t stats_switch = g_wgmma_tile_stats.load(std::memory_order_relaxed);
  if (split_k == 0) {
    // By size: the most blocks per tile whose clusters all fit on the device at once (one
    // block per multiprocessor); for norm "chunk" with the statistics from the cluster, the
    // most that are a multiple of K, if one fits.
    int64_t fit = 1, fit_k = 0;
    for (int64_t s = std::min<int64_t>(kMaxSplitK, sm_count(device) / tiles_mn); s >= 2; --s) {
      if (tiles_mn > max_active_clusters(reinterpret_cast<const void*>(kernel), device, static_cast<int>(s),
                                         kThreads, smem_bytes_for(BN)))
        continue;
      if (fit == 1) fit = s;
      if (fit_k == 0 && s % num_chunks == 0) fit_k = s;
    }
    split_k = stats_switch != 0 && mode == NormMode::kChunk && fit_k > 0 ? fit_k : fit;
  }
  // (norm "chunk" over one chunk is norm "shared")
  const bool tile_stats =
      (stats_switch == 1 || (stats_switch == 2 && split_k > 1)) &&
      (mode == NormMode::kShared ||
       (mode == NormMode::kChunk && (num_chunks == 1 || (split_k > 1 && split_k % num_chunks == 0))));
  const at::Tensor scales = tile_stats ? at::Tensor() : fc_row_scales(tab, c, eps, mode, weight, stream);
  const int64_t blocks = tiles_mn * split_k;
  const float* scales_ptr = scales.defined() ? scales.data_ptr<float>() : nullptr;
  if (CM == 1 && split_k == 1) {
    kernel<<<static_cast<unsigned>(blocks), kThreads, smem_bytes_for(BN), stream>>>(
        wmap, xmaps, tiles, scales_ptr, static_cast<T*>(out.data_ptr()), static_cast<int>(T_), static_cast<int>(N),
        static_cast<int>(mode), 1, eps, static_cast<int>(tile_stats));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    cudaLaunchConfig_t cfg;
    cudaLaunchAttribute attr;
    cluster_launch_config(cfg, attr, static_cast<unsigned>(blocks), static_cast<unsigned>(CM * split_k),  // one is 1
                          kThreads, smem_bytes_for(BN), stream);
    C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, wmap, xmaps, tiles, scales_ptr, static_cast<T*>(out.data_ptr()),
                                      static_cast<int>(T_), static_cast<int>(N), static_cast<int>(mode),
                                      static_cast<int>(split_k), eps, static_cast<int>(tile_stats)));
  }
  return true;
}

template <typename T>
bool launch_typed(const ChunkRows& c, const at::Tensor& weight, float eps, NormMode mode, at::Tensor& out) {
  int64_t bn = g_wgmma_tile_n.load(std::memory_order_relaxed);
  if (bn == 0) {
    const int64_t tiles256 = ((c.num_rows + kBM - 1) / kBM) * ((weight.size(0) + 255) / 256);
    bn = tiles256 >= sm_count(weight.get_device()) ? 256 : 128;
  }
  // Split k (the switch's 0: by size, 1: no split) takes precedence over the multicast pairs.
  const int64_t split = g_wgmma_split_k.load(std::memory_order_relaxed);
  if (split != 1)
    return bn == 256 ? launch_tile<T, 256, 1>(c, weight, eps, mode, out, split)
                     : launch_tile<T, 128, 1>(c, weight, eps, mode, out, split);
  if (g_wgmma_cluster.load(std::memory_order_relaxed) == 2)
    return bn == 256 ? launch_tile<T, 256, 2>(c, weight, eps, mode, out, 1)
                     : launch_tile<T, 128, 2>(c, weight, eps, mode, out, 1);
  return bn == 256 ? launch_tile<T, 256, 1>(c, weight, eps, mode, out, 1)
                   : launch_tile<T, 128, 1>(c, weight, eps, mode, out, 1);
}

}  // namespace

bool launch_fc_wgmma(const ChunkRows& c, const at::Tensor& weight, float eps, NormMode mode, at::Tensor& out) {
  const int64_t T = c.num_rows, N = weight.size(0), min_tokens = g_wgmma_min_tokens.load(std::memory_order_relaxed);
  const int64_t max_tokens = g_wgmma_max_tokens.load(std::memory_order_relaxed);
  if (min_tokens == 0 || T < min_tokens || (max_tokens > 0 && T > max_tokens)) return false;
  // (T and N bounded so that the kernel's int tile origins and rows cannot overflow)
  if (T < 1 || N < 1 || T > (1 << 30) || N > (1 << 30)) return false;
  const at::ScalarType dt = c.rows[0].scalar_type();
  if (dt != at::kBFloat16 && dt != at::kHalf) return false;  // fp32: rms_norm_cat + GEMM
  if (c.rows.size() > static_cast<size_t>(kWgmmaMaxChunks)) return false;
  // TMA: 16-byte aligned bases and row strides; a k-tile inside one chunk.
  if (weight.stride(1) != 1 || weight.stride(0) != c.total_width || !aligned16(weight.data_ptr())) return false;
  if (!aligned16(out.data_ptr())) return false;  // the epilogue's 4-byte pair stores
  for (size_t k = 0; k < c.rows.size(); ++k) {
    const at::Tensor& x = c.rows[k];
    if (!aligned16(x.data_ptr()) || x.stride(0) % 8 != 0 || x.stride(0) < c.widths[k] || c.widths[k] < kBK ||
        c.widths[k] % kBK != 0)
      return false;
  }
  if (dt == at::kBFloat16) return launch_typed<__nv_bfloat16>(c, weight, eps, mode, out);
  return launch_typed<__half>(c, weight, eps, mode, out);
}

int64_t fc_wgmma_min_tokens(int64_t value) { return query_or_set(g_wgmma_min_tokens, value); }

int64_t fc_wgmma_max_tokens(int64_t value) { return query_or_set(g_wgmma_max_tokens, value); }

int64_t fc_wgmma_cluster(int64_t value) { return query_or_set(g_wgmma_cluster, value); }

int64_t fc_wgmma_split_k(int64_t value) { return query_or_set(g_wgmma_split_k, value); }

int64_t fc_wgmma_tile_stats(int64_t value) { return query_or_set(g_wgmma_tile_stats, value); }

int64_t fc_wgmma_tile_n(int64_t value) { return query_or_set(g_wgmma_tile_n, value); }

}  // namespace eagle3::cuda
