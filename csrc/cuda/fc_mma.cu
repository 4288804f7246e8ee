// rms_norm_cat_linear on CUDA with tensor cores, for the decode range (T <= 64; T = 1 only
// where the decode kernel declines it): the weight streams once through mma.sync m16n8k16
// (bf16 / fp16 in, fp32 accumulate); the normalised concatenation never exists, and the
// statistics are taken in the same launch. Two kernels: fc_mma_kernel (below; one block per
// 16-32 features) and, on Hopper, fc_splitk_kernel (further down; 128 features per block,
// the k range split over a cluster; off by default).
//
// One launch, fc_mma_kernel. A block of kWarps warps owns 16 x MT output features (rows of
// the folded weight) and every token. The weight is the mma's A operand, the tokens' raw x
// its B operand (8 tokens per n-tile, NT tiles). Warp w takes the 32-wide k-blocks w,
// w + kWarps, ... of the concatenated input (a k-block never straddles a chunk: every
// chunk width is a multiple of 32), so the block's warps stream disjoint parts of the same
// weight rows and together see every element of x once; U k-blocks of loads are issued
// before any is used. Beside the mma, each thread sums the squares of the x it loaded, per
// token and chunk. When a warp's next k-block enters another chunk, it adds its fp32
// partial products and sums of squares into shared memory (per chunk for norm "chunk",
// one slot for "shared" / "none") and starts again from zero. After the block's barrier
// the per-token scales r (DESIGN.md section 2, item 3: rsqrt(mean(x_k^2) + eps) per chunk,
// or one over the row) are formed from those sums and applied to the partial products:
// out = sum_k r_k * (W_k x_k), the identity the decode kernel uses. No pre-pass, no
// workspace, no rounding of the normalised input.
//
// The H100 run of the first version (a scale pre-pass launch, then x * scale rounded to the
// input dtype as the B operand) lost to rms_norm_cat + cuBLAS at every T (see
// g_mma_max_tokens); this version removes the pre-pass launch and the per-element scaling.
//
// Register layout trick: within a k-block each thread loads 16 contiguous bytes per weight
// row (and per token): physical k = 8 * tig + 0..7 (tig = lane % 4). The mma's fragments
// hold logical k = 2 * tig + {0, 1} and 2 * tig + {8, 9} of each 16-wide step; mapping
// logical -> physical as 8 * tig + 4 * step + {0, 1} and 8 * tig + 4 * step + {2, 3} is a
// bijection of the k-block applied identically to A and B, so the dot products are those of
// the unpermuted matrices, and every global load stays 16 bytes wide.
#include "cuda/cluster.cuh"
#include "cuda/common.cuh"

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <utility>

namespace eagle3::cuda {
namespace {

constexpr int kWarps = 8;     // warps per block (split over k)
constexpr int kKBlock = 32;   // k per block step (two m16n8k16 steps)

// One mma.sync m16n8k16 (fp32 accumulators c += a * b) for PTX input type TY.
#define EAGLE3_MMA_M16N8K16(TY)                                                                     \
  asm("mma.sync.aligned.m16n8k16.row.col.f32." TY "." TY ".f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, " \
      "{%8, %9}, {%0, %1, %2, %3};\n"                                                               \
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                             \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))

template <typename T>
struct MmaType;
template <>
struct MmaType<__nv_bfloat16> {
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    EAGLE3_MMA_M16N8K16("bf16");
  }
};
template <>
struct MmaType<__half> {
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    EAGLE3_MMA_M16N8K16("f16");
  }
};
#undef EAGLE3_MMA_M16N8K16

// The sum of squares of 8 values of x (one 16-byte load).
template <typename T>
__device__ __forceinline__ float sum_squares8(const uint4 raw) {
  const Vec<T>& x = *reinterpret_cast<const Vec<T>*>(&raw);
  float s = 0.f;
#pragma unroll
  for (int e = 0; e < 8; ++e) { const float f = to_float(x.v[e]); s += f * f; }
  return s;
}

// A warp's sums of squares of its tokens' x (lane (g, tig) holds token 8 j + g's over its
// columns, ss[j]) added into sums[8 j + g] in shared memory, its registers back to zero.
template <int NT>
__device__ __forceinline__ void flush_sums(float (&ss)[NT], float* sums, int g, int tig) {
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    float v = ss[j];
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    v += __shfl_xor_sync(0xffffffffu, v, 2);
    if (tig == 0) atomicAdd(sums + 8 * j + g, v);
    ss[j] = 0.f;
  }
}

// The scales in place of the sums of squares s[chunk * toks + t] of tokens t < n: per
// (chunk, token) for norm "chunk" (DESIGN.md section 2, item 3: rsqrt(mean(x_k^2) + eps));
// for "shared" the row's one scale in s[t]. Each thread owns whole tokens.
__device__ __forceinline__ void sums_to_scales(float* s, int toks, int n, const ChunkTable& tab, int num_chunks,
                                               int total, float eps, bool per_chunk) {
  for (int t = threadIdx.x; t < n; t += blockDim.x) {
    if (per_chunk) {
      for (int c = 0; c < num_chunks; ++c)
        s[c * toks + t] = rsqrtf(s[c * toks + t] / static_cast<float>(tab.c[c].width) + eps);
    } else {
      float all = 0.f;
      for (int c = 0; c < num_chunks; ++c) all += s[c * toks + t];
      s[t] = rsqrtf(all / static_cast<float>(total) + eps);
    }
  }
}

// Shared memory of fc_mma_kernel, in floats: the partial products [slots][16 MT][8 NT + 1]
// (slots: one per chunk for norm "chunk", else one) and the sums of squares [K][8 NT].
inline int64_t mma_smem_floats(int mt, int nt, int num_chunks, NormMode mode) {
  const int64_t slots = mode == NormMode::kChunk ? num_chunks : 1;
  return slots * 16 * mt * (8 * nt + 1) + static_cast<int64_t>(num_chunks) * 8 * nt;
}

// MT m-tiles (16 features each) per block, NT n-tiles (8 tokens each), U k-blocks of loads
// in flight per warp.
template <typename T, int MT, int NT, int U>
__global__ void __launch_bounds__(kWarps * 32)
fc_mma_kernel(const __grid_constant__ ChunkTable tab, const int num_chunks,
              const T* __restrict__ weight,  // [N, total], rows contiguous
              const int64_t n_out, const int total,
              T* __restrict__ out,           // [T, N] contiguous
              const int num_tokens, const float eps, const int mode) {
  static_assert(sizeof(T) == 2, "bf16 / fp16 only");
  constexpr int ROWS = 16 * MT, TOKS = 8 * NT, LD = TOKS + 1;
  extern __shared__ float smem_f[];
  const bool per_chunk = mode == static_cast<int>(NormMode::kChunk);
  const bool stats = mode != static_cast<int>(NormMode::kNone);
  const int slots = per_chunk ? num_chunks : 1;
  float* acc_s = smem_f;                        // [slots][ROWS][LD]
  float* ss_s = smem_f + slots * ROWS * LD;     // [num_chunks][TOKS]; later the scales
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, tig = lane % 4;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * ROWS;

  for (int i = threadIdx.x; i < slots * ROWS * LD + num_chunks * TOKS; i += blockDim.x) smem_f[i] = 0.f;
  __syncthreads();

  // This thread's weight rows (clamped: rows past N are computed and never written).
  const T* wrow[MT][2];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int h = 0; h < 2; ++h) wrow[m][h] = weight + std::min<int64_t>(n0 + 16 * m + g + 8 * h, n_out - 1) * total;

  float acc[MT][NT][4];
  float ss[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    ss[j] = 0.f;
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[m][j][q] = 0.f;
  }
  // The warp's partial products and sums of squares of chunk c into shared memory, and
  // its registers back to zero. Warp-uniform (every lane's k-blocks are the warp's).
  auto flush = [&](const int c) {
    float* a = acc_s + (per_chunk ? c : 0) * ROWS * LD;
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int row = 16 * m + g + 8 * (q / 2), tok = 8 * j + 2 * tig + (q % 2);
          atomicAdd(a + row * LD + tok, acc[m][j][q]);
          acc[m][j][q] = 0.f;
        }
    if (stats) flush_sums(ss, ss_s + c * TOKS, g, tig);
  };

  const int num_kb = total / kKBlock;
  int ck = 0;    // chunk of the k-block being loaded (the warp's k-blocks only move forward)
  int cur = -1;  // chunk the registers accumulate, -1 before the first k-block
  for (int kb0 = warp; kb0 < num_kb; kb0 += kWarps * U) {
    uint4 wv[U][MT][2];
    uint4 xv[U][NT];
    int chunk_of[U];
    // Loads of U k-blocks first: the weight (the stream), then the tokens' x.
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int kb = kb0 + u * kWarps;
      if (kb < num_kb) {
        const int kcol = kb * kKBlock + 8 * tig;
#pragma unroll
        for (int m = 0; m < MT; ++m)
#pragma unroll
          for (int h = 0; h < 2; ++h) wv[u][m][h] = bit_cast_u4(load_weight_stream(wrow[m][h] + kcol));
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int kb = kb0 + u * kWarps;
      chunk_of[u] = ck;
      if (kb < num_kb) {
        const int k0 = kb * kKBlock;
        while (ck + 1 < num_chunks && k0 >= tab.c[ck + 1].out_off) ++ck;
        chunk_of[u] = ck;
        const ChunkDesc& c = tab.c[ck];
        const T* xk = static_cast<const T*>(c.x) + (k0 - c.out_off) + 8 * tig;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          const int t = 8 * j + g;
          // read-only path (as the decode kernel's x): every block of the SM reads the same x
          xv[u][j] = t < num_tokens ? __ldg(reinterpret_cast<const uint4*>(xk + static_cast<int64_t>(t) * c.x_stride))
                                    : make_uint4(0u, 0u, 0u, 0u);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (kb0 + u * kWarps < num_kb) {
        if (chunk_of[u] != cur) {
          if (cur >= 0) flush(cur);
          cur = chunk_of[u];
        }
        if (stats) {
#pragma unroll
          for (int j = 0; j < NT; ++j) ss[j] += sum_squares8<T>(xv[u][j]);
        }
#pragma unroll
        for (int s = 0; s < 2; ++s) {
#pragma unroll
          for (int m = 0; m < MT; ++m) {
            const uint32_t* w0 = reinterpret_cast<const uint32_t*>(&wv[u][m][0]);
            const uint32_t* w8 = reinterpret_cast<const uint32_t*>(&wv[u][m][1]);
            const uint32_t a[4] = {w0[2 * s], w8[2 * s], w0[2 * s + 1], w8[2 * s + 1]};
#pragma unroll
            for (int j = 0; j < NT; ++j) {
              const uint32_t* b = reinterpret_cast<const uint32_t*>(&xv[u][j]);
              MmaType<T>::mma(acc[m][j], a, b[2 * s], b[2 * s + 1]);
            }
          }
        }
      }
    }
  }
  if (cur >= 0) flush(cur);
  __syncthreads();  // every warp's partial products and sums of squares are in
  if (stats) {
    sums_to_scales(ss_s, TOKS, num_tokens, tab, num_chunks, total, eps, per_chunk);
    __syncthreads();
  }
  for (int i = threadIdx.x; i < ROWS * num_tokens; i += blockDim.x) {
    const int tok = i / ROWS, row = i % ROWS;  // consecutive threads: consecutive features
    if (n0 + row < n_out) {
      float v = 0.f;
      for (int sl = 0; sl < slots; ++sl)
        v += acc_s[(sl * ROWS + row) * LD + tok] * (stats ? ss_s[sl * TOKS + tok] : 1.f);
      out[static_cast<int64_t>(tok) * n_out + n0 + row] = from_float<T>(v);
    }
  }
}

// ---- fc_splitk_kernel: the k range split over a cluster (T <= 64) ------------------------
//
// fc_mma_kernel's x traffic grows with the blocks: every block reads all of x from L2 for
// its 16-32 features, so at T = 16..64 (x 0.4-1.5 MB at K=3, H=4096) the 128-256 blocks
// read 100-200 MB of x beside the 100 MB weight, and it lost to the pair there. Here a block
// owns kSkFeatures = 128 features (each of its kSkWarps warps 16 of them, one m-tile) and
// 1/S of the k range; the S blocks of a cluster share the feature tile, so x is read
// N / 128 times in all (12.6 MB at T=16, 50 MB at T=64), and the grid still has
// N / 128 x S blocks. The warps of a block read the same x fragments (L1 hits after the
// first) and disjoint weight rows, U k-blocks of loads in flight per warp.
//
// Statistics: warp w sums the squares of the x it loaded in the k-blocks kb with
// kb % kSkWarps == w, so every element of the block's x range counts once. When a warp's
// next k-block enters another chunk it adds its partial products into the chunk's slot in
// shared memory (slots: the chunks the block's k range touches, for norm "chunk"; else one)
// and its sums of squares into ss_s[chunk][token]. After the first cluster barrier every
// block adds up the S blocks' sums of squares (distributed shared memory), forms the
// scales, and folds its slots into one: sum_k r_k P_k over its k range. After the second,
// block r adds up the S blocks' folded partials for rows [r 128 / S, (r + 1) 128 / S) of
// the tile and writes them; a third barrier keeps every block's shared memory alive until
// the others have read it. One launch, no workspace, no pre-pass.
constexpr int kSkWarps = 8;
constexpr int kSkFeatures = 16 * kSkWarps;
constexpr int kSkMaxSlots = 4;
// Row stride (floats) of the partial products [slot][kSkFeatures][8 NT + 4] in shared
// memory.
constexpr int sk_ld(int nt) { return 8 * nt + 4; }
// Shared memory of fc_splitk_kernel, in floats: the slots, then ss_s and scale_s
// [num_chunks][8 NT] each.
inline int64_t sk_smem_floats(int nt, int slots, int num_chunks) {
  return static_cast<int64_t>(slots) * kSkFeatures * sk_ld(nt) + 2 * static_cast<int64_t>(num_chunks) * 8 * nt;
}

template <typename T, int NT, int U>
__global__ void __launch_bounds__(kSkWarps * 32, 2)  // two blocks per SM: at most 128 registers
fc_splitk_kernel(const __grid_constant__ ChunkTable tab, const int num_chunks,
                 const T* __restrict__ weight,  // [N, total], rows contiguous
                 const int64_t n_out, const int total,
                 T* __restrict__ out,           // [T, N] contiguous
                 const int num_tokens, const float eps, const int mode, const int split, const int slots) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  static_assert(sizeof(T) == 2, "bf16 / fp16 only");
  constexpr int TOKS = 8 * NT, LD = sk_ld(NT);
  extern __shared__ __align__(16) float smem_f[];
  const bool per_chunk = mode == static_cast<int>(NormMode::kChunk);
  const bool stats = mode != static_cast<int>(NormMode::kNone);
  float* acc_s = smem_f;                                  // [slots][kSkFeatures][LD]
  float* ss_s = smem_f + slots * kSkFeatures * LD;        // [num_chunks][TOKS]
  float* scale_s = ss_s + num_chunks * TOKS;              // [num_chunks][TOKS]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, tig = lane % 4;
  const int rank = static_cast<int>(blockIdx.x % static_cast<unsigned>(split));
  const int64_t n0 = static_cast<int64_t>(blockIdx.x / static_cast<unsigned>(split)) * kSkFeatures;
  const int num_kb = total / kKBlock;
  const int kb_begin = static_cast<int>(static_cast<int64_t>(rank) * num_kb / split);
  const int kb_end = static_cast<int>(static_cast<int64_t>(rank + 1) * num_kb / split);
  int c_first = 0;  // the chunk of the block's first k-block
  while (c_first + 1 < num_chunks && kb_begin * kKBlock >= tab.c[c_first + 1].out_off) ++c_first;

  for (int i = threadIdx.x; i < slots * kSkFeatures * LD + num_chunks * TOKS; i += blockDim.x) smem_f[i] = 0.f;
  __syncthreads();

  // This warp's two weight rows (clamped: rows past N are computed and never written).
  const T* wrow[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) wrow[h] = weight + std::min<int64_t>(n0 + 16 * warp + g + 8 * h, n_out - 1) * total;

  float acc[NT][4];
  float ss[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    ss[j] = 0.f;
#pragma unroll
    for (int q = 0; q < 4; ++q) acc[j][q] = 0.f;
  }
  // The warp's partial products of chunk c into its slot (the warp's own rows: no other warp
  // writes them) and its sums of squares into ss_s, its registers back to zero.
  auto flush = [&](const int c) {
    float* a = acc_s + (per_chunk ? c - c_first : 0) * kSkFeatures * LD;
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int row = 16 * warp + g + 8 * (q / 2), tok = 8 * j + 2 * tig + (q % 2);
        a[row * LD + tok] += acc[j][q];
        acc[j][q] = 0.f;
      }
    if (stats) flush_sums(ss, ss_s + c * TOKS, g, tig);
  };

  int ck = c_first;   // chunk of the k-block being loaded
  int cur = c_first;  // chunk the registers accumulate
  for (int kb0 = kb_begin; kb0 < kb_end; kb0 += U) {
    // The weight's U k-blocks first (the stream, all in flight), then per k-block the
    // tokens' x (L1 / L2 hits: every warp of the block reads the same) and its mma steps.
    uint4 wv[U][2];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int kb = kb0 + u;
      if (kb < kb_end) {
        const int kcol = kb * kKBlock + 8 * tig;
#pragma unroll
        for (int h = 0; h < 2; ++h) wv[u][h] = bit_cast_u4(load_weight_stream(wrow[h] + kcol));
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int kb = kb0 + u;
      if (kb >= kb_end) break;
      const int k0 = kb * kKBlock;
      while (ck + 1 < num_chunks && k0 >= tab.c[ck + 1].out_off) ++ck;
      if (ck != cur) {
        flush(cur);
        cur = ck;
      }
      const ChunkDesc& c = tab.c[ck];
      const T* xk = static_cast<const T*>(c.x) + (k0 - c.out_off) + 8 * tig;
      uint4 xv[NT];
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const int t = 8 * j + g;
        xv[j] = t < num_tokens ? __ldg(reinterpret_cast<const uint4*>(xk + static_cast<int64_t>(t) * c.x_stride))
                               : make_uint4(0u, 0u, 0u, 0u);
      }
      if (stats && kb % kSkWarps == warp) {
#pragma unroll
        for (int j = 0; j < NT; ++j) ss[j] += sum_squares8<T>(xv[j]);
      }
#pragma unroll
      for (int s = 0; s < 2; ++s) {
        const uint32_t* w0 = reinterpret_cast<const uint32_t*>(&wv[u][0]);
        const uint32_t* w8 = reinterpret_cast<const uint32_t*>(&wv[u][1]);
        const uint32_t a[4] = {w0[2 * s], w8[2 * s], w0[2 * s + 1], w8[2 * s + 1]};
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          const uint32_t* b = reinterpret_cast<const uint32_t*>(&xv[j]);
          MmaType<T>::mma(acc[j], a, b[2 * s], b[2 * s + 1]);
        }
      }
    }
  }
  flush(cur);
  __syncthreads();
  cluster_sync();  // 1: every block's slots and sums of squares are complete
  if (stats) {
    // The cluster's sums of squares per (chunk, token), then the scales in their place.
    for (int i = threadIdx.x; i < num_chunks * TOKS; i += blockDim.x) {
      float v = 0.f;
      for (int p = 0; p < split; ++p) v += ld_cluster_f32(ss_s + i, static_cast<uint32_t>(p));
      scale_s[i] = v;
    }
    __syncthreads();
    sums_to_scales(scale_s, TOKS, TOKS, tab, num_chunks, total, eps, per_chunk);
    __syncthreads();
  }
  // The block's slots folded into slot 0 with their scales (each element by one thread).
  const int used = per_chunk ? min(slots, num_chunks - c_first) : 1;
  for (int i = threadIdx.x; i < kSkFeatures * TOKS; i += blockDim.x) {
    const int row = i / TOKS, tok = i % TOKS;
    float v = 0.f;
    for (int sl = 0; sl < used; ++sl) {
      const float scale = stats ? scale_s[(per_chunk ? c_first + sl : 0) * TOKS + tok] : 1.f;
      v += acc_s[(sl * kSkFeatures + row) * LD + tok] * scale;
    }
    acc_s[row * LD + tok] = v;
  }
  cluster_sync();  // 2: every block's folded partials are complete
  const int r0 = rank * kSkFeatures / split, r1 = (rank + 1) * kSkFeatures / split, rows = r1 - r0;
  for (int i = threadIdx.x; i < rows * num_tokens; i += blockDim.x) {
    const int tok = i / rows, row = r0 + i % rows;  // consecutive threads: consecutive features
    if (n0 + row < n_out) {
      float v = 0.f;
      for (int p = 0; p < split; ++p) v += ld_cluster_f32(acc_s + row * LD + tok, static_cast<uint32_t>(p));
      out[static_cast<int64_t>(tok) * n_out + n0 + row] = from_float<T>(v);
    }
  }
  cluster_sync();  // 3: no block leaves while another reads its shared memory
#else
  __trap();  // a build without sm_90a; launch_fc_splitk does not launch it (sm90a_body_runs)
#endif
}

// Largest T served by the tensor-core kernel (0: off; the op's setter takes 0..64): 8. On
// the H100 (graph replay, K=3, bf16, norm "chunk"; bench/results/
// nvidia-h100-80gb-hbm3-ed5c01eeed8c-tune.json) this one-launch version beat rms_norm_cat +
// cuBLAS at H=4096 for T=2 (39.8 against 44.3 us) and T=8 (41.7 / 44.9), and lost at T=16
// (47.9 / 45.5) and T=64 (111.2 / 47.9). At H=7168 it lost at T=2, 8, 16 (141.2 / 119.4,
// 148.5 / 121.6, 133.8 / 128.7): its 448 blocks of 16 features are more than the 396 an H100
// holds at once (3 per SM at 80 registers), and the last 52 ran as a second wave; the 256 of
// H=4096 fit one. Hence g_mma_max_waves. The next run (db66db7-tune.json) confirmed it at
// H=5120 (320 blocks, one wave): T = 2 / 4 / 8 60.7 / 61.7 / 64.0 against 64.4 / 65.1 / 65.4
// us for the pair, T=16 94.0 / 65.8. (The first version, with a scale pre-pass launch and a
// scaled B operand, lost at every T: 80ab0d87a9d7-tune.json.)
std::atomic<int64_t> g_mma_max_tokens{8};
// The most waves of blocks a launch may take (blocks over the device's resident capacity for
// the instance, rounded up; 0: no bound): 1, the case measured to win (above).
std::atomic<int64_t> g_mma_max_waves{1};
constexpr int64_t kMmaMaxTokens = 64;
// Features (weight rows) per block: 16, 32 or 64, or 0 to choose by T (16 up to T = 16, else
// 32: the measured configurations above). A block re-reads all of x from L2 for its
// features, so wider blocks cut that traffic (x is T x the weight's columns per block), and
// at H=7168 32 features take 224 blocks, one wave where 16 take 448; narrower blocks put
// more blocks on the card. Not yet measured on a GPU: bench.tune times 16, 32 and 64.
std::atomic<int64_t> g_mma_features{0};
// Shared memory of one block at most (the default limit, no opt-in): K=3 with norm "chunk"
// at T=64 takes 26 KB. Past the limit the call goes to the pair: with norm "chunk", more
// than 5 chunks at T = 33..64, 11 at T = 17..32, 42 at T = 9..16 (T <= 8: every K fits).
constexpr int64_t kMmaMaxSmem = 48 * 1024;

template <typename T>
bool launch_typed(const ChunkRows& c, const ChunkTable& tab, const at::Tensor& weight, float eps, NormMode mode,
                  at::Tensor& out) {
  const int64_t rows = c.num_rows, N = weight.size(0);
  const int num_chunks = static_cast<int>(c.rows.size());
  // The configuration: MT m-tiles from the features per block (g_mma_features), NT from T,
  // U from both: registers per thread ~ U (4 MT + 4 NT) + 4 MT NT, so the larger tiles trade
  // loads in flight for accumulators. sm_90a build (registers -> blocks of 256 threads per
  // SM): (MT, NT) = (1, 1) 80 -> 3; (1, 2) 115, (1, 4) 95, (2, 1) 128, (2, 2) 90, (2, 4) 125,
  // (4, 1) 112 -> 2; (1, 8) 158, (2, 8) 204, (4, 2) 142, (4, 4) 146 -> 1. (2, 2) takes U = 2:
  // at U = 4 it held 160 registers, one block per SM, so H=7168's 224 blocks of 32 features
  // would run in two waves.
  const int64_t features = g_mma_features.load(std::memory_order_relaxed);
  const int mt = features > 0 ? static_cast<int>(features / 16) : rows <= 16 ? 1 : 2;
  const int nt = rows <= 8 ? 1 : rows <= 16 ? 2 : rows <= 32 ? 4 : 8;
  // 64 features x 64 tokens would hold 128 accumulators per thread: the pair serves it.
  if (mt == 4 && nt == 8) return false;
  const int64_t smem = mma_smem_floats(mt, nt, num_chunks, mode) * static_cast<int64_t>(sizeof(float));
  if (smem > kMmaMaxSmem) return false;  // many chunks with norm "chunk": the pair serves them
  const c10::cuda::CUDAGuard guard(weight.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(weight.get_device());
  auto launch = [&](auto kernel) {
    const int features = 16 * mt;
    const int64_t grid = (N + features - 1) / features;
    if (const int64_t waves = g_mma_max_waves.load(std::memory_order_relaxed); waves > 0) {
      int per_sm = 0;
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kWarps * 32, smem));
      if (grid > waves * per_sm * static_cast<int64_t>(sm_count(weight.get_device()))) return false;
    }
    kernel<<<static_cast<unsigned>(grid), kWarps * 32, smem, stream>>>(
        tab, num_chunks, static_cast<const T*>(weight.data_ptr()), N, static_cast<int>(c.total_width),
        static_cast<T*>(out.data_ptr()), static_cast<int>(rows), eps, static_cast<int>(mode));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return true;
  };
  switch (mt * 10 + nt) {
    case 11: return launch(fc_mma_kernel<T, 1, 1, 4>);
    case 12: return launch(fc_mma_kernel<T, 1, 2, 4>);
    case 14: return launch(fc_mma_kernel<T, 1, 4, 2>);
    case 18: return launch(fc_mma_kernel<T, 1, 8, 2>);
    case 21: return launch(fc_mma_kernel<T, 2, 1, 4>);
    case 22: return launch(fc_mma_kernel<T, 2, 2, 2>);  // U=4: 160 registers, one block per SM
    case 24: return launch(fc_mma_kernel<T, 2, 4, 2>);
    case 28: return launch(fc_mma_kernel<T, 2, 8, 2>);
    case 41: return launch(fc_mma_kernel<T, 4, 1, 2>);
    case 42: return launch(fc_mma_kernel<T, 4, 2, 2>);
    case 44: return launch(fc_mma_kernel<T, 4, 4, 1>);
    default: return false;  // (48 was declined above; the features switch takes 16 / 32 / 64 only)
  }
}

// Largest T served by fc_splitk_kernel (0: off, the default, until a GPU run has measured it
// against the pair and the mma kernel; the op's setter takes 0..64).
std::atomic<int64_t> g_splitk_max_tokens{0};
// Blocks per cluster (the split of the k range): 2, 4 or 8, or 0 by size: the largest whose
// clusters the device holds at once (one wave), else 2.
std::atomic<int64_t> g_splitk_cluster{0};
// Shared memory of one block at most, so that two blocks share a multiprocessor: K=3 with
// norm "chunk" at T = 33..64 takes 70 KB (two slots). Past it the call goes to the next path.
constexpr int64_t kSkMaxSmem = 100 * 1024;

// The slots of partial products a block needs: the most chunks one of the `split` k ranges
// of fc_splitk_kernel touches (num_kb k-blocks of kKBlock, chunk k starting at offsets[k]).
int splitk_slots(const ChunkRows& c, int num_kb, int split) {
  const int num_chunks = static_cast<int>(c.rows.size());
  auto chunk_of = [&](int64_t col) {
    int k = 0;
    while (k + 1 < num_chunks && col >= c.offsets[k + 1]) ++k;
    return k;
  };
  int most = 1;
  for (int r = 0; r < split; ++r) {
    const int64_t b = static_cast<int64_t>(r) * num_kb / split, e = static_cast<int64_t>(r + 1) * num_kb / split;
    if (e > b) most = std::max(most, chunk_of((e - 1) * kKBlock) - chunk_of(b * kKBlock) + 1);
  }
  return most;
}

template <typename T, int NT, int U>
bool launch_splitk(const ChunkRows& c, const ChunkTable& tab, const at::Tensor& weight, float eps, NormMode mode,
                   at::Tensor& out) {
  const auto kernel = fc_splitk_kernel<T, NT, U>;
  const void* kp = reinterpret_cast<const void*>(kernel);
  const int device = weight.get_device();
  if (!sm90a_body_runs(kp, device)) return false;
  const int num_chunks = static_cast<int>(c.rows.size());
  const int num_kb = static_cast<int>(c.total_width / kKBlock);
  const int64_t N = weight.size(0), tiles = (N + kSkFeatures - 1) / kSkFeatures;
  auto slots_for = [&](int split) { return mode == NormMode::kChunk ? splitk_slots(c, num_kb, split) : 1; };
  auto smem_for = [&](int split) {
    return sk_smem_floats(NT, slots_for(split), num_chunks) * static_cast<int64_t>(sizeof(float));
  };
  // the opt-in shared-memory limit (more than 48 KB at T > 32); the carveout left to the
  // driver, so L1 keeps what two blocks' shared memory leaves: the x fragments the 8 warps of
  // a block share take 12 KB per step at T = 33..64, and the largest carveout leaves 28 KB
  configure_staging_kernel(kp, device, false);
  int split = static_cast<int>(g_splitk_cluster.load(std::memory_order_relaxed));
  if (split == 0) {
    split = 2;
    for (const int s : {8, 4}) {
      const int64_t smem = smem_for(s);
      if (slots_for(s) <= kSkMaxSlots && smem <= kSkMaxSmem &&
          tiles <= max_active_clusters(kp, device, s, kSkWarps * 32, static_cast<int>(smem))) {
        split = s;
        break;
      }
    }
  }
  const int slots = slots_for(split);
  const int64_t smem = smem_for(split);
  if (slots > kSkMaxSlots || smem > kSkMaxSmem || tiles * split > INT32_MAX) return false;
  // (a card that cannot place one such cluster, e.g. a small partition, declines)
  if (max_active_clusters(kp, device, split, kSkWarps * 32, static_cast<int>(smem)) < 1) return false;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device);
  cudaLaunchConfig_t cfg;
  cudaLaunchAttribute attr;
  cluster_launch_config(cfg, attr, static_cast<unsigned>(tiles * split), static_cast<unsigned>(split), kSkWarps * 32,
                        static_cast<size_t>(smem), stream);
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, tab, num_chunks, static_cast<const T*>(weight.data_ptr()), N,
                                    static_cast<int>(c.total_width), static_cast<T*>(out.data_ptr()),
                                    static_cast<int>(c.num_rows), eps, static_cast<int>(mode), split, slots));
  return true;
}

// NT by T, and U (the weight's k-blocks in flight per warp: U KB) as many as the 128
// registers of two blocks per SM allow. sm_90a build, registers: (NT, U) = (1, 8) 100,
// (2, 8) 123, (4, 4) 110, (8, 3) 124-128; (8, 4) spilled.
template <typename T>
bool launch_splitk_typed(const ChunkRows& c, const ChunkTable& tab, const at::Tensor& weight, float eps,
                         NormMode mode, at::Tensor& out) {
  const int64_t rows = c.num_rows;
  if (rows <= 8) return launch_splitk<T, 1, 8>(c, tab, weight, eps, mode, out);
  if (rows <= 16) return launch_splitk<T, 2, 8>(c, tab, weight, eps, mode, out);
  if (rows <= 32) return launch_splitk<T, 4, 4>(c, tab, weight, eps, mode, out);
  return launch_splitk<T, 8, 3>(c, tab, weight, eps, mode, out);
}

// Whether the mma.sync kernels take a call (T <= max_tokens, a switch's value): bf16 / fp16,
// at most kMaxChunks chunks, N within an int, the weight [N, total] with contiguous 16-byte
// aligned rows, a 16-byte aligned output, and every chunk 16-byte aligned with a row stride
// of whole 8-element vectors and a width of whole k-blocks; fills the chunk table `tab`.
bool mma_takes(const ChunkRows& c, const at::Tensor& weight, const at::Tensor& out, int64_t max_tokens,
               ChunkTable& tab) {
  const int64_t T = c.num_rows, N = weight.size(0);
  if (T < 1 || N < 1 || T > std::min(max_tokens, kMmaMaxTokens)) return false;
  if (c.rows.size() > static_cast<size_t>(kMaxChunks) || N > INT32_MAX) return false;
  if (weight.stride(1) != 1 || weight.stride(0) != c.total_width || !aligned16(weight.data_ptr())) return false;
  if (!aligned16(out.data_ptr())) return false;
  const at::ScalarType dt = c.rows[0].scalar_type();
  if (dt != at::kBFloat16 && dt != at::kHalf) return false;  // fp32: rms_norm_cat + GEMM
  for (size_t k = 0; k < c.rows.size(); ++k) {
    const at::Tensor& x = c.rows[k];
    if (!aligned16(x.data_ptr()) || x.stride(0) % 8 != 0 || c.widths[k] % kKBlock != 0) return false;
    tab.c[k] = ChunkDesc{x.data_ptr(), nullptr, x.stride(0), static_cast<int32_t>(c.widths[k]),
                         static_cast<int32_t>(c.offsets[k]), 0, 1, kNoWeight};
  }
  return true;
}

}  // namespace

bool launch_fc_mma(const ChunkRows& c, const at::Tensor& weight, float eps, NormMode mode, at::Tensor& out) {
  ChunkTable tab{};
  if (!mma_takes(c, weight, out, g_mma_max_tokens.load(std::memory_order_relaxed), tab)) return false;
  if (c.rows[0].scalar_type() == at::kBFloat16) return launch_typed<__nv_bfloat16>(c, tab, weight, eps, mode, out);
  return launch_typed<__half>(c, tab, weight, eps, mode, out);
}

bool launch_fc_splitk(const ChunkRows& c, const at::Tensor& weight, float eps, NormMode mode, at::Tensor& out) {
  ChunkTable tab{};
  if (!mma_takes(c, weight, out, g_splitk_max_tokens.load(std::memory_order_relaxed), tab)) return false;
  const c10::cuda::CUDAGuard guard(weight.device());
  if (c.rows[0].scalar_type() == at::kBFloat16)
    return launch_splitk_typed<__nv_bfloat16>(c, tab, weight, eps, mode, out);
  return launch_splitk_typed<__half>(c, tab, weight, eps, mode, out);
}

int64_t fc_splitk_max_tokens(int64_t value) { return query_or_set(g_splitk_max_tokens, value); }

int64_t fc_splitk_cluster(int64_t value) { return query_or_set(g_splitk_cluster, value); }

int64_t fc_mma_max_tokens(int64_t value) { return query_or_set(g_mma_max_tokens, value); }

int64_t fc_mma_features(int64_t value) { return query_or_set(g_mma_features, value); }

int64_t fc_mma_max_waves(int64_t value) { return query_or_set(g_mma_max_waves, value); }

}  // namespace eagle3::cuda
