// rms_norm_cat_linear on CUDA: fc(norm_cat(xs)) with the norm weights folded into `weight`.
//
// The paths, chosen per call by the number of tokens T (before them, from T = 2, norm "none"
// over chunks that tile one matrix is one GEMM on that matrix: ops.cpp, adjacent_chunks):
//  * decode (T <= fc_decode_max_tokens, every access 16-byte aligned): one launch of
//    fc_decode_kernel. Each warp streams R rows of the weight once and, for every token,
//    accumulates per chunk both the raw dot product with the chunk and the chunk's sum of
//    squares; at the chunk's end it applies r_k = rsqrt(mean(x_k^2) + eps) to the fp32
//    partial (the identity of DESIGN.md section 2, item 3). The normalised concatenation
//    never exists in memory.
//  * T <= fc_splitk_max_tokens (off by default, not yet measured) on Hopper: the split-k
//    tensor-core kernel of fc_mma.cu (one launch: 128 features per block, the k range split
//    over a cluster, partial sums and statistics added up through distributed shared memory).
//  * T <= fc_mma_max_tokens (default 8) when its blocks fit one wave (fc_mma_max_waves): the
//    tensor-core kernel of fc_mma.cu (one launch: mma.sync over the streamed weight, the
//    chunk statistics taken beside it and applied to the partial products).
//  * T >= fc_wgmma_min_tokens on Hopper (off by default: behind the pair where measured):
//    the TMA + wgmma GEMM of fc_wgmma.cu, the chunk scales applied to its accumulators.
//  * otherwise: the rms_norm_cat kernel writes the normalised concatenation once and one
//    cuBLAS GEMM (through ATen) applies the fc — the pair a tensor-core kernel must beat
//    before it takes over at prefill sizes.
#include "cuda/common.cuh"

#include <ATen/ATen.h>

#include <atomic>

namespace eagle3::cuda {
namespace {

constexpr int kDecodeWarps = 8;  // warps per block
constexpr int kDecodeRows = 2;   // weight rows per warp
constexpr int kUnroll = 4;       // weight slices in flight per warp


template <typename T, int TT>
__global__ void __launch_bounds__(kDecodeWarps * 32)
fc_decode_kernel(const __grid_constant__ ChunkTable tab, const int num_chunks,
                 const T* __restrict__ weight,  // [N, total], rows contiguous
                 const int64_t n_out, const int total,
                 T* __restrict__ out,           // [T, N] contiguous
                 const int num_tokens, const float eps, const int mode) {
  constexpr int V = Vec<T>::N;
  constexpr int R = kDecodeRows;
  static_assert(R * TT <= 32, "each (row, token) result is written by its own lane");
  const int lane = threadIdx.x % 32;
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * kDecodeWarps + threadIdx.x / 32) * R;
  if (n0 >= n_out) return;
  const T* wrow[R];
#pragma unroll
  for (int r = 0; r < R; ++r) wrow[r] = weight + std::min<int64_t>(n0 + r, n_out - 1) * total;

  float acc[R][TT] = {};
  float shared_ss[TT] = {};
  for (int k = 0; k < num_chunks; ++k) {
    const ChunkDesc& c = tab.c[k];
    const T* xk = static_cast<const T*>(c.x);
    float dot[R][TT] = {};
    float ss[TT] = {};
    // kUnroll slices of the weight rows are loaded before any is used, so each warp keeps
    // R * kUnroll * 512 bytes of the weight stream in flight.
    for (int j0 = lane * V; j0 < c.width; j0 += kUnroll * 32 * V) {
      int4 raw[kUnroll][R];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int j = j0 + u * 32 * V;
#pragma unroll
        for (int r = 0; r < R; ++r) raw[u][r] = j < c.width ? load_weight_stream(wrow[r] + c.out_off + j) : int4{0, 0, 0, 0};
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int j = j0 + u * 32 * V;
        if (j >= c.width) break;
#pragma unroll
        for (int t = 0; t < TT; ++t) {
          if (t < num_tokens) {
            const Vec<T> xv = load_vec_ro(xk + t * c.x_stride + j);
#pragma unroll
            for (int e = 0; e < V; ++e) {
              const float xf = to_float(xv.v[e]);
              ss[t] += xf * xf;
#pragma unroll
              for (int r = 0; r < R; ++r)
                dot[r][t] += xf * to_float(reinterpret_cast<const Vec<T>*>(&raw[u][r])->v[e]);
            }
          }
        }
      }
    }
#pragma unroll
    for (int t = 0; t < TT; ++t) {
      const float s = warp_sum(ss[t]);
      const float scale = mode == static_cast<int>(NormMode::kChunk) ? rsqrtf(s / static_cast<float>(c.width) + eps)
                                                                      : 1.f;
      shared_ss[t] += s;
#pragma unroll
      for (int r = 0; r < R; ++r) acc[r][t] += warp_sum(dot[r][t]) * scale;
    }
  }
#pragma unroll
  for (int t = 0; t < TT; ++t) {
    const float scale = mode == static_cast<int>(NormMode::kShared)
                            ? rsqrtf(shared_ss[t] / static_cast<float>(total) + eps) : 1.f;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (lane == r * TT + t && t < num_tokens && n0 + r < n_out)
        out[static_cast<int64_t>(t) * n_out + n0 + r] = from_float<T>(acc[r][t] * scale);
    }
  }
}

// Largest T served by the decode kernel (0 disables it; the op's setter takes 0..8).
// Default 1, from the H200 runs (graph replay, K=3, bf16, H=4096 / 7168, against F.linear
// alone on the pre-normalised input): at T=1 the decode kernel was 0.96 / 0.96x of F.linear
// (bench/results/nvidia-h200-9270c2ab7fde.json, T=1 only); at 6e31654 it was 0.63 / 0.85x
// at T=2 and 0.23 / 0.18x at T=8 (its CUDA-core FMAs grow with T), while norm_cat + cuBLAS
// held 0.83 / 0.91x at T=2..64 (9270c2a). The H100 run of 80ab0d8 agrees: T=1 39.0 / 106.9
// us against 44.1 / 118.3 for the pair, T=2 49.2 / 158.4 against 43.8 / 118.8
// (bench/results/nvidia-h100-80gb-hbm3-80ab0d87a9d7-tune.json).
std::atomic<int64_t> g_decode_max_tokens{1};

}  // namespace

bool launch_fc_decode(const ChunkRows& c, const at::Tensor& weight, float eps, NormMode mode, at::Tensor& out) {
  const int64_t T = c.num_rows, N = weight.size(0);
  if (T < 1 || N < 1 || T > g_decode_max_tokens.load(std::memory_order_relaxed) || T > 8) return false;
  if (weight.stride(1) != 1 || weight.stride(0) != c.total_width || !aligned16(weight.data_ptr())) return false;
  if (N > INT32_MAX) return false;
  bool ok = true;
  EAGLE3_DISPATCH_FLOAT_TYPES(c.rows[0].scalar_type(), "rms_norm_cat_linear", [&] {
    constexpr int V = Vec<scalar_t>::N;
    ChunkTable tab{};
    for (size_t k = 0; k < c.rows.size(); ++k) {
      const at::Tensor& x = c.rows[k];
      ok = ok && aligned16(x.data_ptr()) && x.stride(0) % V == 0 && c.widths[k] % V == 0;
      tab.c[k] = ChunkDesc{x.data_ptr(), nullptr, x.stride(0), static_cast<int32_t>(c.widths[k]),
                           static_cast<int32_t>(c.offsets[k]), 0, 1, kNoWeight};
    }
    if (!ok) return;
    const c10::cuda::CUDAGuard guard(weight.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(weight.get_device());
    const int64_t rows_per_block = kDecodeWarps * kDecodeRows;
    const unsigned grid = static_cast<unsigned>((N + rows_per_block - 1) / rows_per_block);
    auto launch = [&](auto kernel) {
      kernel<<<grid, kDecodeWarps * 32, 0, stream>>>(tab, static_cast<int>(c.rows.size()),
                                                      static_cast<const scalar_t*>(weight.data_ptr()), N,
                                                      static_cast<int>(c.total_width),
                                                      static_cast<scalar_t*>(out.data_ptr()), static_cast<int>(T),
                                                      eps, static_cast<int>(mode));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (T == 1) launch(fc_decode_kernel<scalar_t, 1>);
    else if (T == 2) launch(fc_decode_kernel<scalar_t, 2>);
    else if (T <= 4) launch(fc_decode_kernel<scalar_t, 4>);
    else launch(fc_decode_kernel<scalar_t, 8>);
  });
  return ok;
}

const char* launch_fc_direct(const ChunkRows& c, const at::Tensor& weight, float eps, NormMode mode, at::Tensor& out) {
  if (launch_fc_decode(c, weight, eps, mode, out)) return "decode";
  if (launch_fc_splitk(c, weight, eps, mode, out)) return "mma-sk";
  if (launch_fc_mma(c, weight, eps, mode, out)) return "mma";
  if (launch_fc_wgmma(c, weight, eps, mode, out)) return "wgmma";
  return nullptr;
}

int64_t fc_decode_max_tokens(int64_t value) { return query_or_set(g_decode_max_tokens, value); }

}  // namespace eagle3::cuda
