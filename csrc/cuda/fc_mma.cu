// rms_norm_cat_linear on CUDA with tensor cores, for the decode range (T <= 64; T = 1 only
// where the decode kernel declines it): the weight streams once through mma.sync m16n8k16
// (bf16 / fp16 in, fp32 accumulate); the normalised concatenation never exists, and the
// statistics are taken in the same launch.
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
#include "cuda/common.cuh"

#include <ATen/ATen.h>

#include <atomic>
#include <type_traits>

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
    if (stats) {
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        float s = ss[j];
        s += __shfl_xor_sync(0xffffffffu, s, 1);
        s += __shfl_xor_sync(0xffffffffu, s, 2);
        if (tig == 0) atomicAdd(ss_s + c * TOKS + 8 * j + g, s);
        ss[j] = 0.f;
      }
    }
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
  // The scales, in place of the sums of squares: per (chunk, token) for "chunk"; for
  // "shared" the row's one scale in slot 0. Each thread owns whole tokens.
  if (stats) {
    for (int t = threadIdx.x; t < num_tokens; t += blockDim.x) {
      if (per_chunk) {
        for (int c = 0; c < num_chunks; ++c)
          ss_s[c * TOKS + t] = rsqrtf(ss_s[c * TOKS + t] / static_cast<float>(tab.c[c].width) + eps);
      } else {
        float all = 0.f;
        for (int c = 0; c < num_chunks; ++c) all += ss_s[c * TOKS + t];
        ss_s[t] = rsqrtf(all / static_cast<float>(total) + eps);
      }
    }
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
bool launch_typed(const ChunkRows& c, const at::Tensor& weight, float eps, NormMode mode, at::Tensor& out) {
  const int64_t rows = c.num_rows, N = weight.size(0);
  const int num_chunks = static_cast<int>(c.rows.size());
  ChunkTable tab{};
  for (int k = 0; k < num_chunks; ++k) {
    const at::Tensor& x = c.rows[k];
    if (!aligned16(x.data_ptr()) || x.stride(0) % 8 != 0 || c.widths[k] % kKBlock != 0) return false;
    tab.c[k] = ChunkDesc{x.data_ptr(), nullptr, x.stride(0), static_cast<int32_t>(c.widths[k]),
                         static_cast<int32_t>(c.offsets[k]), 0, 1, kNoWeight};
  }
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

}  // namespace

bool launch_fc_mma(const ChunkRows& c, const at::Tensor& weight, float eps, NormMode mode, at::Tensor& out) {
  const int64_t T = c.num_rows, N = weight.size(0);
  if (T < 1 || N < 1 || T > std::min(g_mma_max_tokens.load(std::memory_order_relaxed), kMmaMaxTokens)) return false;
  if (c.rows.size() > static_cast<size_t>(kMaxChunks) || N > INT32_MAX) return false;
  if (weight.stride(1) != 1 || weight.stride(0) != c.total_width || !aligned16(weight.data_ptr())) return false;
  if (!aligned16(out.data_ptr())) return false;
  const at::ScalarType dt = c.rows[0].scalar_type();
  if (dt == at::kBFloat16) return launch_typed<__nv_bfloat16>(c, weight, eps, mode, out);
  if (dt == at::kHalf) return launch_typed<__half>(c, weight, eps, mode, out);
  return false;  // fp32: rms_norm_cat + GEMM
}

int64_t fc_mma_max_tokens(int64_t value) { return query_or_set(g_mma_max_tokens, value); }

int64_t fc_mma_features(int64_t value) { return query_or_set(g_mma_features, value); }

int64_t fc_mma_max_waves(int64_t value) { return query_or_set(g_mma_max_waves, value); }

}  // namespace eagle3::cuda
