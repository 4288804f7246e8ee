// CPU row kernels of rms_norm_cat and fused_add_rms_norm. norm_kernels.cpp is compiled
// once per instruction set (namespaces cpu_default, cpu_avx2, cpu_avx512); ops_cpu.cpp
// picks the best one the processor supports at load time.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace eagle3::cpu {

struct Chunk {
  const void* x;       // [T, width], row stride x_stride (elements), last dim contiguous
  int64_t x_stride;
  int64_t width;
  const void* w;       // [width] contiguous, or nullptr
  bool w_fp32;         // w is float32 (else x's dtype)
  int64_t out_off;     // first column of this chunk in the output row
};

struct NormCatArgs {
  const Chunk* chunks;
  int num_chunks;
  int64_t num_rows;
  void* out;           // [T, out_stride] contiguous
  int64_t out_stride;
  float eps;
  int mode;            // NormMode: 0 per chunk, 1 shared, 2 none (plain concatenation)
  c10::ScalarType dtype;
};

struct FusedAddArgs {
  const void* x;       // [T, H], row stride x_stride
  int64_t x_stride;
  const void* r;       // [T, H], row stride r_stride
  int64_t r_stride;
  const void* w;       // [H] or nullptr
  bool w_fp32;
  int64_t num_rows;
  int64_t width;
  void* normed;        // [T, H] contiguous
  void* sum;           // [T, H] contiguous
  float eps;
  c10::ScalarType dtype;
};

struct KernelTable {
  void (*rms_norm_cat)(const NormCatArgs&);
  void (*fused_add_rms_norm)(const FusedAddArgs&);
  const char* isa;
};

namespace cpu_default { KernelTable kernels(); }
namespace cpu_avx2 { KernelTable kernels(); }
namespace cpu_avx512 { KernelTable kernels(); }

// The table for the best instruction set this processor supports (EAGLE3_CPU_ISA=default|avx2|avx512 overrides).
const KernelTable& best_kernels();

}  // namespace eagle3::cpu
