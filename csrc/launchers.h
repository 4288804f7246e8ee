// The device-specific half of each op: launchers that take validated inputs and
// allocated outputs. ops.cpp validates, allocates and calls these through a Backend, so
// the CPU and CUDA entry points share one implementation and every input error is
// raised before any device code runs.
#pragma once

#include "checks.h"

namespace eagle3 {

// What this thread's last rms_norm_cat / fused_add_rms_norm launch did, for the tests and
// the tune table (torch.ops.eagle3._norm_last_plan): the strategy ("cpu", "staged",
// "two-pass", "registers"; "none" for no rows), one block per (row, chunk), the norm weights
// staged with the row, threads per block (0 on the CPU), the shared-memory carveout in
// percent the launch asked for (-1: the kernel's own, also under stream capture).
struct NormPlan {
  const char* strategy;
  bool split;
  bool staged_weights;
  int threads;
  int carveout = -1;
};
void set_norm_last_plan(const NormPlan& plan);

struct Backend {
  // out [T, sum H_k] contiguous <- per-chunk / shared / no normalisation of c's chunks.
  void (*norm_cat)(const ChunkRows& c, const std::vector<at::Tensor>& weights_1d, float eps, NormMode mode,
                   at::Tensor& out);
  // normed, sum [T, H] contiguous <- x2, r2 row views [T, H]; w contiguous 1-D or undefined.
  void (*fused_add)(const at::Tensor& x2, const at::Tensor& r2, const at::Tensor& w, float eps, at::Tensor& normed,
                    at::Tensor& sum);
  // out [T, N] <- the whole fc by a direct path (no normalised copy of the input) when one
  // serves this call: returns the path's name ("decode", "mma", "wgmma"), nullptr if none.
  const char* (*fc_direct)(const ChunkRows& c, const at::Tensor& weight, float eps, NormMode mode, at::Tensor& out);
};

namespace cpu {
void norm_cat(const ChunkRows& c, const std::vector<at::Tensor>& weights_1d, float eps, NormMode mode, at::Tensor& out);
void fused_add(const at::Tensor& x2, const at::Tensor& r2, const at::Tensor& w, float eps, at::Tensor& normed,
               at::Tensor& sum);
}  // namespace cpu

#ifdef EAGLE3_WITH_CUDA
namespace cuda {
void launch_norm_cat(const ChunkRows& c, const std::vector<at::Tensor>& weights_1d, float eps, NormMode mode,
                     at::Tensor& out);
void launch_fused_add(const at::Tensor& x2, const at::Tensor& r2, const at::Tensor& w, float eps, at::Tensor& normed,
                      at::Tensor& sum);
bool launch_fc_decode(const ChunkRows& c, const at::Tensor& weight, float eps, NormMode mode, at::Tensor& out);
// Largest T served by launch_fc_decode (0 disables it); sets it and returns the previous
// value, -1 only queries.
int64_t fc_decode_max_tokens(int64_t value);
// The tensor-core fc for 1 <= T <= fc_mma_max_tokens (T = 1 where the decode kernel declines
// it; bf16 / fp16; one launch: mma.sync over the streamed weight, the chunk statistics taken
// beside it and applied to the partial products); false where it does not apply.
bool launch_fc_mma(const ChunkRows& c, const at::Tensor& weight, float eps, NormMode mode, at::Tensor& out);
// Largest T served by launch_fc_mma (0 disables it; default 8); sets it and returns the
// previous value, -1 only queries.
int64_t fc_mma_max_tokens(int64_t value);
// The most waves of blocks launch_fc_mma may launch (0: no bound; default 1: every block
// resident at once), else the call goes to the pair; sets it and returns the previous value,
// -1 only queries.
int64_t fc_mma_max_waves(int64_t value);
// Features (weight rows) per block of launch_fc_mma: 16, 32, 64, or 0 to choose by T (the
// default); sets it and returns the previous value, -1 only queries.
int64_t fc_mma_features(int64_t value);
// The tensor-core fc with the k range split over a cluster, for 1 <= T <= fc_splitk_max_tokens
// (bf16 / fp16, sm_90a build on a compute capability 9.x device; mma.sync over the streamed
// weight, 128 features per block, the partial sums and the chunk statistics added up through
// distributed shared memory; one launch); false where it does not apply.
bool launch_fc_splitk(const ChunkRows& c, const at::Tensor& weight, float eps, NormMode mode, at::Tensor& out);
// Largest T served by launch_fc_splitk (0 disables it, the default; at most 64); sets it and
// returns the previous value, -1 only queries.
int64_t fc_splitk_max_tokens(int64_t value);
// Blocks per cluster of launch_fc_splitk: 2, 4, 8, or 0 to choose by size (the default);
// sets it and returns the previous value, -1 only queries.
int64_t fc_splitk_cluster(int64_t value);
// The Hopper tensor-core fc for fc_wgmma_min_tokens <= T <= fc_wgmma_max_tokens (bf16 / fp16,
// sm_90a build on a compute capability 9.x device; TMA + wgmma: per-token chunk scales from
// a pre-pass or from the tiles it streams (fc_wgmma_tile_stats), applied to its
// accumulators); false where it does not apply.
bool launch_fc_wgmma(const ChunkRows& c, const at::Tensor& weight, float eps, NormMode mode, at::Tensor& out);
// Smallest T served by launch_fc_wgmma (0 disables it, the default); sets it and returns
// the previous value, -1 only queries.
int64_t fc_wgmma_min_tokens(int64_t value);
// Largest T served by launch_fc_wgmma (0: no limit, the default); sets it and returns the
// previous value, -1 only queries.
int64_t fc_wgmma_max_tokens(int64_t value);
// Features per block of launch_fc_wgmma: 128, 256, or 0 to choose by size (the default);
// sets it and returns the previous value, -1 only queries.
int64_t fc_wgmma_tile_n(int64_t value);
// Blocks per cluster of launch_fc_wgmma, multicasting their weight tiles: 1 (the default) or
// 2; sets it and returns the previous value, -1 only queries.
int64_t fc_wgmma_cluster(int64_t value);
// Blocks per cluster of launch_fc_wgmma splitting each tile's k range, their partial sums
// added through distributed shared memory: 1 (the default: no split), 2..8, or 0 to choose
// by size; sets it and returns the previous value, -1 only queries.
int64_t fc_wgmma_split_k(int64_t value);
// Where launch_fc_wgmma takes the norm statistics from, where that applies: the streamed
// tiles -- 2 (the default) only with the k range split (added up over the cluster), 1 split
// or not -- or 0 the pre-pass; sets it and returns the previous value, -1 only queries.
int64_t fc_wgmma_tile_stats(int64_t value);
// The direct fc paths in order: the decode kernel, the split-k mma.sync kernel, the mma.sync
// kernel, the wgmma kernel;
// returns the name of the one that served the call, nullptr if none did.
const char* launch_fc_direct(const ChunkRows& c, const at::Tensor& weight, float eps, NormMode mode, at::Tensor& out);
// Largest shared-memory stage per block of the norm kernels (0: never stage, rows are read
// twice from global memory); sets it and returns the previous value, -1 only queries.
int64_t set_norm_stage_limit(int64_t bytes);
// The register-resident norm kernels (1: used where a row qualifies, 0: never); sets it and
// returns the previous value, -1 only queries.
int64_t set_norm_registers(int64_t on);
// Largest T (rows) for which the staged norm kernels copy the norm weights into shared
// memory with the row, and fused_add_rms_norm's register kernel loads them into registers
// with it (0: never; default 64); sets it and returns the previous value, -1 only queries.
int64_t set_norm_stage_weights(int64_t rows);
// Vectors per thread the norm kernels size their blocks for (1..8; 0, the default: 1 for
// launches of up to 64 rows, else 2); sets it and returns the previous value, -1 only
// queries.
int64_t set_norm_vecs_per_thread(int64_t v);
// rms_norm_cat with one block per (row, chunk) for per-chunk norms: 0 never (one block per
// row), 1 always, 2 (the default) in launches of up to 64 rows; sets it and returns the
// previous value, -1 only queries.
int64_t set_norm_split_chunks(int64_t mode);
// The staged norm kernels' shared-memory carveout per launch: 0 (the default) by size --
// launches of 4096 or more rows reading norm weights from global memory take the smallest
// configuration that keeps their occupancy and leaves the L1 cache room for the weights
// (norm_carveout in common.cu) -- or 1..100, that percentage for every staged launch; sets
// it and returns the previous value, -1 only queries.
int64_t set_norm_carveout(int64_t value);
}  // namespace cuda
#endif

}  // namespace eagle3
