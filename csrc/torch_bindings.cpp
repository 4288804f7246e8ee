// Every eagle3 operator schema, and the CPU / CUDA implementations behind them.
#include "ops.h"
#ifdef EAGLE3_WITH_CUDA
#include "launchers.h"
#endif

#include <torch/library.h>

namespace {

// One of the kernels' strategy switches: value -1 queries; any other value must be `valid`
// (the error names the op and what it takes: "-1 (query)" + expected). A CUDA build sets it
// through `set` and returns the previous value; a CPU-only build has no kernels to switch
// and returns `cpu_value`, a value the switch accepts (so that restoring it succeeds).
int64_t strategy_switch(const char* name, int64_t value, bool valid, const char* expected,
                        int64_t (*set)(int64_t), int64_t cpu_value = 0) {
  TORCH_CHECK_VALUE(value == -1 || valid, name, ": value must be -1 (query)", expected, ", got ", value);
  return set ? set(value) : cpu_value;
}

}  // namespace

#ifdef EAGLE3_WITH_CUDA
#define EAGLE3_CUDA_SETTER(fn) (&eagle3::cuda::fn)
#else
#define EAGLE3_CUDA_SETTER(fn) nullptr
#endif

TORCH_LIBRARY(eagle3, m) {
  // K >= 1 inputs [..., H_k] (views with any row stride) -> [..., sum H_k]; chunk k is the
  // RMSNorm of xs[k] with weights[k] (None, x's dtype or float32). shared_stats: one RMS
  // statistic over the whole concatenated row, the weights still applied per chunk.
  m.def("rms_norm_cat(Tensor[] xs, Tensor?[] weights, float eps, bool shared_stats=False) -> Tensor");
  // (normed, residual_sum): residual_sum = x + residual in x's dtype, normed = RMSNorm of the fp32 sum.
  m.def("fused_add_rms_norm(Tensor x, Tensor residual, Tensor? weight, float eps) -> (Tensor, Tensor)");
  // fc(norm_cat(xs)) with the norm weights already folded into weight [N, sum H_k];
  // norm is "none", "chunk" (one statistic per chunk) or "shared" (one over the row).
  m.def("rms_norm_cat_linear(Tensor[] xs, Tensor weight, float eps, str norm) -> Tensor");
  // The kernels' strategy switches (for the benchmarks that compare the CUDA paths, and the
  // tests of each): each sets its value and returns the previous one; -1 only queries.
  // Largest T served by the fc's CUDA decode kernel (0: always norm_cat + cuBLAS).
  m.def("_fc_decode_max_tokens(int value=-1) -> int", [](int64_t value) {
    return strategy_switch("_fc_decode_max_tokens", value, value >= 0 && value <= 8, " or 0..8",
                           EAGLE3_CUDA_SETTER(fc_decode_max_tokens));
  });
  // Largest T served by the tensor-core fc kernel (default 8; 0 disables it).
  m.def("_fc_mma_max_tokens(int value=-1) -> int", [](int64_t value) {
    return strategy_switch("_fc_mma_max_tokens", value, value >= 0 && value <= 64, " or 0..64",
                           EAGLE3_CUDA_SETTER(fc_mma_max_tokens));
  });
  // The most waves of blocks that kernel may take (default 1: all resident at once; 0: no
  // bound); a call that needs more goes to the pair.
  m.def("_fc_mma_max_waves(int value=-1) -> int", [](int64_t value) {
    return strategy_switch("_fc_mma_max_waves", value, value >= 0, " or a wave count >= 0",
                           EAGLE3_CUDA_SETTER(fc_mma_max_waves));
  });
  // Features (weight rows) per block of that kernel: 16, 32, 64, or 0 to choose by T (the
  // default).
  m.def("_fc_mma_features(int value=-1) -> int", [](int64_t value) {
    return strategy_switch("_fc_mma_features", value, value == 0 || value == 16 || value == 32 || value == 64,
                           ", 0 (by T), 16, 32 or 64", EAGLE3_CUDA_SETTER(fc_mma_features));
  });
  // Largest T served by the fc's split-k tensor-core kernel (Hopper; 0, the default, disables
  // it).
  m.def("_fc_splitk_max_tokens(int value=-1) -> int", [](int64_t value) {
    return strategy_switch("_fc_splitk_max_tokens", value, value >= 0 && value <= 64, " or 0..64",
                           EAGLE3_CUDA_SETTER(fc_splitk_max_tokens));
  });
  // Blocks per cluster of that kernel (the split of the k range): 2, 4, 8, or 0 to choose by
  // size (the default).
  m.def("_fc_splitk_cluster(int value=-1) -> int", [](int64_t value) {
    return strategy_switch("_fc_splitk_cluster", value, value == 0 || value == 2 || value == 4 || value == 8,
                           ", 0 (by size), 2, 4 or 8", EAGLE3_CUDA_SETTER(fc_splitk_cluster));
  });
  // Smallest T served by the fc's Hopper tensor-core kernel (TMA + wgmma; 0, the default,
  // disables it).
  m.def("_fc_wgmma_min_tokens(int value=-1) -> int", [](int64_t value) {
    return strategy_switch("_fc_wgmma_min_tokens", value, value >= 0, " or a token count >= 0",
                           EAGLE3_CUDA_SETTER(fc_wgmma_min_tokens));
  });
  // Largest T served by that kernel (0, the default: no limit), so that it can take a range
  // of T (the split kernel's decode sizes) and leave larger T to the pair.
  m.def("_fc_wgmma_max_tokens(int value=-1) -> int", [](int64_t value) {
    return strategy_switch("_fc_wgmma_max_tokens", value, value >= 0, " or a token count >= 0 (0: no limit)",
                           EAGLE3_CUDA_SETTER(fc_wgmma_max_tokens));
  });
  // Features per block of that kernel: 128, 256, or 0 to choose by size (the default).
  m.def("_fc_wgmma_tile_n(int value=-1) -> int", [](int64_t value) {
    return strategy_switch("_fc_wgmma_tile_n", value, value == 0 || value == 128 || value == 256,
                           ", 0 (by size), 128 or 256", EAGLE3_CUDA_SETTER(fc_wgmma_tile_n));
  });
  // Blocks per cluster of that kernel, sharing their weight tiles by TMA multicast: 1 (the
  // default) or 2.
  m.def("_fc_wgmma_cluster(int value=-1) -> int", [](int64_t value) {
    return strategy_switch("_fc_wgmma_cluster", value, value == 1 || value == 2, ", 1 or 2",
                           EAGLE3_CUDA_SETTER(fc_wgmma_cluster), 1);
  });
  // Blocks per cluster of that kernel splitting each tile's k range (their partial sums added
  // through distributed shared memory): 1 (the default: no split), 2..8, or 0 to choose by
  // size; it takes precedence over _fc_wgmma_cluster.
  m.def("_fc_wgmma_split_k(int value=-1) -> int", [](int64_t value) {
    return strategy_switch("_fc_wgmma_split_k", value, value >= 0 && value <= 8, ", 0 (by size) or 1..8",
                           EAGLE3_CUDA_SETTER(fc_wgmma_split_k), 1);
  });
  // Where that kernel takes the norm statistics from: the tiles it streams, where that
  // applies (norm "shared" and one-chunk "chunk"; with the k range split, added up over the
  // cluster, also "chunk" with the split a multiple of the chunk count) -- 2 (the default)
  // only with the k range split, 1 split or not -- or 0 a pre-pass kernel.
  m.def("_fc_wgmma_tile_stats(int value=-1) -> int", [](int64_t value) {
    return strategy_switch("_fc_wgmma_tile_stats", value, value >= 0 && value <= 2, ", 0, 1 or 2",
                           EAGLE3_CUDA_SETTER(fc_wgmma_tile_stats), 2);
  });
  // rms_norm_cat_linear with norm "none" over chunks that are consecutive column ranges of
  // one row-major matrix: 1 (the default) runs one GEMM on that matrix (CPU and CUDA
  // builds), 0 leaves such calls to the fc kernels and the pair.
  m.def("_fc_adjacent_gemm(int value=-1) -> int", [](int64_t value) {
    return strategy_switch("_fc_adjacent_gemm", value, value == 0 || value == 1, ", 0 or 1",
                           &eagle3::fc_adjacent_gemm);
  });
  // The path that served this thread's last rms_norm_cat_linear call: "decode", "mma",
  // "wgmma" (CUDA kernels that never write the normalised input), "gemm" (norm "none" over
  // adjacent chunks: one GEMM on the matrix they tile), "pair" (normalised copy, then one
  // GEMM; the CPU path otherwise), or "none" (no rows). For tests and benchmarks.
  m.def("_fc_last_path() -> str", []() -> std::string { return eagle3::fc_last_path(); });
  // This thread's last rms_norm_cat / fused_add_rms_norm launch (also the fc pair's norm):
  // "<strategy>[+split][+w] <threads>" on CUDA (strategy "staged", "two-pass" or
  // "registers"; +split: one block per (row, chunk); +w: the norm weights staged with the
  // row), "cpu", or "none" (no rows). For tests and benchmarks.
  m.def("_norm_last_plan() -> str", []() -> std::string { return eagle3::norm_last_plan(); });
  // Largest shared-memory stage per block of the CUDA norm kernels, in bytes (0: never
  // stage; rows are then read twice from global memory).
  m.def("_norm_stage_limit(int value=-1) -> int", [](int64_t value) {
    return strategy_switch("_norm_stage_limit", value, value >= 0, " or a byte count >= 0",
                           EAGLE3_CUDA_SETTER(set_norm_stage_limit));
  });
  // The register-resident strategy of the CUDA norm kernels (1: on where a row qualifies,
  // 0: off).
  m.def("_norm_registers(int value=-1) -> int", [](int64_t value) {
    return strategy_switch("_norm_registers", value, value == 0 || value == 1, ", 0 or 1",
                           EAGLE3_CUDA_SETTER(set_norm_registers));
  });
  // Largest T for which the staged CUDA norm kernels copy the norm weights into shared
  // memory with the row, and fused_add_rms_norm's register kernel loads them into registers
  // with it (default 64; 0: weights are read after the reduction).
  m.def("_norm_stage_weights(int value=-1) -> int", [](int64_t value) {
    return strategy_switch("_norm_stage_weights", value, value >= 0, " or a row count >= 0",
                           EAGLE3_CUDA_SETTER(set_norm_stage_weights));
  });
  // Vectors per thread the CUDA norm kernels size their blocks for (4: a row of 4096 bf16
  // gets 128 threads; 0, the default: 1 for launches of up to 64 rows, else 2; except
  // fused_add_rms_norm takes 1 up to 4095 rows, and rms_norm_cat 4 where it splits a launch
  // of 4096 or more rows with chunks wider than 4096 elements by (row, chunk)).
  m.def("_norm_vecs_per_thread(int value=-1) -> int", [](int64_t value) {
    return strategy_switch("_norm_vecs_per_thread", value, value >= 0 && value <= 8, ", 0 (by rows) or 1..8",
                           EAGLE3_CUDA_SETTER(set_norm_vecs_per_thread));
  });
  // rms_norm_cat on CUDA with one block per (row, chunk) where the norm is per chunk: 0 never
  // (one block per row), 1 always, 2 (the default) by size: in launches of up to 64 rows,
  // and of 4096 or more rows whose widest chunk passes 4096 elements.
  m.def("_norm_split_chunks(int value=-1) -> int", [](int64_t value) {
    return strategy_switch("_norm_split_chunks", value, value >= 0 && value <= 2, ", 0, 1 or 2 (by size)",
                           EAGLE3_CUDA_SETTER(set_norm_split_chunks));
  });
  // The staged CUDA norm kernels' shared-memory carveout per launch: 0 (the default) by
  // size (launches of 4096 or more rows that read norm weights from global memory leave the
  // L1 cache room for them), 1..100 that percentage for every staged launch (100: the
  // largest shared memory, as before).
  m.def("_norm_carveout(int value=-1) -> int", [](int64_t value) {
    return strategy_switch("_norm_carveout", value, value >= 0 && value <= 100, ", 0 (by size) or 1..100 (percent)",
                           EAGLE3_CUDA_SETTER(set_norm_carveout));
  });
  // "cuda" when this build holds the CUDA kernels, else "cpu" (eagle3_ops.has_cuda_kernels()).
  m.def("_build_info() -> str", []() -> std::string {
#ifdef EAGLE3_WITH_CUDA
    return "cuda";
#else
    return "cpu";
#endif
  });
}

TORCH_LIBRARY_IMPL(eagle3, Autograd, m) {
  m.impl("rms_norm_cat", &eagle3::rms_norm_cat_autograd);
  m.impl("fused_add_rms_norm", &eagle3::fused_add_rms_norm_autograd);
  m.impl("rms_norm_cat_linear", &eagle3::rms_norm_cat_linear_autograd);
}

TORCH_LIBRARY_IMPL(eagle3, CPU, m) {
  m.impl("rms_norm_cat", &eagle3::rms_norm_cat_cpu);
  m.impl("fused_add_rms_norm", &eagle3::fused_add_rms_norm_cpu);
  m.impl("rms_norm_cat_linear", &eagle3::rms_norm_cat_linear_cpu);
}

#ifdef EAGLE3_WITH_CUDA
TORCH_LIBRARY_IMPL(eagle3, CUDA, m) {
  m.impl("rms_norm_cat", &eagle3::rms_norm_cat_cuda);
  m.impl("fused_add_rms_norm", &eagle3::fused_add_rms_norm_cuda);
  m.impl("rms_norm_cat_linear", &eagle3::rms_norm_cat_linear_cuda);
}
#endif
