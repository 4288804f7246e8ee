// Input validation shared by the CPU and CUDA launchers of every op.
// Each check names the argument and what was expected; nothing here reads tensor data.
#pragma once

#include "ops.h"

#include <cstdint>

namespace eagle3 {

// How the statistic of rms_norm_cat / rms_norm_cat_linear is taken.
enum class NormMode : int {
  kChunk = 0,   // one RMS statistic per chunk
  kShared = 1,  // one RMS statistic over the whole concatenated row
  kNone = 2,    // no normalisation: a plain concatenation
};

// The K inputs of a concatenating op seen as rows: rows[k] is a 2-D view [T, H_k]
// of xs[k] whose last dimension is contiguous (a view of the caller's storage
// whenever the leading dimensions can be merged; otherwise a copy).
struct ChunkRows {
  std::vector<at::Tensor> rows;      // [T, H_k], stride(1) == 1
  std::vector<int64_t> widths;       // H_k
  std::vector<int64_t> offsets;      // column of chunk k in the concatenated output
  std::vector<int64_t> out_shape;    // leading shape of xs[0] + [sum H_k]
  int64_t num_rows = 0;              // T (product of the leading dimensions)
  int64_t total_width = 0;           // sum H_k
};

// Largest K the ops accept (the CUDA kernels take their chunk table as a kernel argument).
constexpr int kMaxChunks = 64;
// Largest row width (a chunk's, their sum, or H) the kernels index with 32-bit counters,
// with room for a counter to step one 512-thread x 16-byte stride past the end.
constexpr int64_t kMaxWidth = (int64_t{1} << 31) - (int64_t{1} << 16);

ChunkRows check_chunks(const char* op, const std::vector<at::Tensor>& xs);
void check_norm_weights(const char* op, const ChunkRows& c, const std::vector<OptTensor>& weights);
void check_eps(const char* op, double eps);
NormMode parse_norm_mode(const char* op, const std::string& norm);

// fused_add_rms_norm: x and residual of one shape, dtype and device; returns their 2-D row views.
std::pair<at::Tensor, at::Tensor> check_fused_add(const at::Tensor& x, const at::Tensor& residual,
                                                  const OptTensor& weight, double eps);
// rms_norm_cat_linear: weight [N, sum H_k] of x's dtype and device.
void check_linear_weight(const ChunkRows& c, const at::Tensor& weight);

// A 2-D row view [T, H] of x (x's last dimension made contiguous if it was not).
at::Tensor as_rows(const at::Tensor& x);
// A weight as a contiguous 1-D tensor (weights are tiny; a strided one is copied).
at::Tensor weight_1d(const at::Tensor& w);
// weight_1d of each present weight; an undefined tensor where the entry is None.
std::vector<at::Tensor> weights_as_1d(const std::vector<OptTensor>& weights);

}  // namespace eagle3
