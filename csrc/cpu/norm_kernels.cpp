// CPU row kernels, compiled once per instruction set (see CMakeLists.txt): one pass over
// each row from memory (the second sweep of a row hits the cache), fp32 accumulation,
// at::vec vectors, rows spread over threads with at::parallel_for.
#include "cpu/norm_kernels.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <utility>

namespace eagle3::cpu::EAGLE3_CPU_NS {
namespace {

using fVec = at::vec::Vectorized<float>;
constexpr int64_t kStep = 2 * fVec::size();  // elements per step: two float vectors

// Loads kStep elements of T (or the first n, zero-filled) as two float vectors.
template <typename T>
inline std::pair<fVec, fVec> load2(const T* p, int64_t n = kStep) {
  if constexpr (std::is_same_v<T, float>) {
    if (n >= kStep) return {fVec::loadu(p), fVec::loadu(p + fVec::size())};
    const int64_t n0 = std::min<int64_t>(n, fVec::size());
    fVec a = fVec::loadu(p, n0);
    fVec b = n > fVec::size() ? fVec::loadu(p + fVec::size(), n - fVec::size()) : fVec(0.f);
    return {a, b};
  } else {
    using tVec = at::vec::Vectorized<T>;
    static_assert(tVec::size() == kStep, "one reduced-precision vector holds two float vectors");
    tVec v = n >= kStep ? tVec::loadu(p) : tVec::loadu(p, n);
    auto [a, b] = at::vec::convert_to_float<T>(v);
    return {a, b};
  }
}

template <typename T>
inline void store2(T* p, const fVec& a, const fVec& b, int64_t n = kStep) {
  if constexpr (std::is_same_v<T, float>) {
    if (n >= kStep) {
      a.store(p);
      b.store(p + fVec::size());
    } else {
      a.store(p, std::min<int64_t>(n, fVec::size()));
      if (n > fVec::size()) b.store(p + fVec::size(), n - fVec::size());
    }
  } else {
    auto v = at::vec::convert_from_float<T>(a, b);
    if (n >= kStep) v.store(p); else v.store(p, n);
  }
}

// Loads weight elements [i, i + n) as float vectors; a null weight is all ones.
template <typename T>
inline std::pair<fVec, fVec> load_weight(const void* w, bool w_fp32, int64_t i, int64_t n) {
  if (w == nullptr) return {fVec(1.f), fVec(1.f)};
  return w_fp32 ? load2(static_cast<const float*>(w) + i, n) : load2(static_cast<const T*>(w) + i, n);
}

template <typename T>
float sum_squares(const T* x, int64_t n) {
  fVec acc0(0.f), acc1(0.f);
  int64_t i = 0;
  for (; i + kStep <= n; i += kStep) {
    auto [a, b] = load2(x + i);
    acc0 = at::vec::fmadd(a, a, acc0);
    acc1 = at::vec::fmadd(b, b, acc1);
  }
  if (i < n) {
    auto [a, b] = load2(x + i, n - i);
    acc0 = at::vec::fmadd(a, a, acc0);
    acc1 = at::vec::fmadd(b, b, acc1);
  }
  return at::vec::vec_reduce_all<float>([](fVec& p, fVec& q) { return p + q; }, acc0 + acc1);
}

// y[i] = x[i] * scale * w[i], rounded once to T.
template <typename T>
void scale_row(const T* x, int64_t n, float scale, const void* w, bool w_fp32, T* y) {
  const fVec s(scale);
  for (int64_t i = 0; i < n; i += kStep) {
    const int64_t m = std::min<int64_t>(kStep, n - i);
    auto [a, b] = load2(x + i, m);
    auto [wa, wb] = load_weight<T>(w, w_fp32, i, m);
    store2(y + i, a * s * wa, b * s * wb, m);
  }
}

inline int64_t grain_rows(int64_t width) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(width, 1)); }

template <typename T>
void rms_norm_cat_impl(const NormCatArgs& a) {
  constexpr int kMaxLocal = 64;  // per-chunk scales kept on the stack (K is checked <= 64 by the launcher)
  const int64_t total = a.out_stride;
  at::parallel_for(0, a.num_rows, grain_rows(total), [&](int64_t begin, int64_t end) {
    float scales[kMaxLocal];
    for (int64_t t = begin; t < end; ++t) {
      float shared_sum = 0.f;
      for (int k = 0; k < a.num_chunks; ++k) {
        const Chunk& c = a.chunks[k];
        const T* x = static_cast<const T*>(c.x) + t * c.x_stride;
        if (a.mode == 2) {
          scales[k] = 1.f;
        } else {
          const float ss = sum_squares(x, c.width);
          shared_sum += ss;
          scales[k] = 1.f / std::sqrt(ss / static_cast<float>(c.width) + a.eps);
        }
      }
      if (a.mode == 1) {
        const float r = 1.f / std::sqrt(shared_sum / static_cast<float>(total) + a.eps);
        std::fill(scales, scales + a.num_chunks, r);
      }
      T* out_row = static_cast<T*>(a.out) + t * a.out_stride;
      for (int k = 0; k < a.num_chunks; ++k) {
        const Chunk& c = a.chunks[k];
        scale_row(static_cast<const T*>(c.x) + t * c.x_stride, c.width, scales[k], c.w, c.w_fp32,
                  out_row + c.out_off);
      }
    }
  });
}

template <typename T>
void fused_add_rms_norm_impl(const FusedAddArgs& a) {
  const int64_t n = a.width;
  at::parallel_for(0, a.num_rows, grain_rows(n), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* x = static_cast<const T*>(a.x) + t * a.x_stride;
      const T* r = static_cast<const T*>(a.r) + t * a.r_stride;
      T* sum = static_cast<T*>(a.sum) + t * n;
      T* normed = static_cast<T*>(a.normed) + t * n;
      // Sweep 1: s = x + r in fp32, written rounded; the statistic comes from the fp32 sum.
      fVec acc0(0.f), acc1(0.f);
      for (int64_t i = 0; i < n; i += kStep) {
        const int64_t m = std::min<int64_t>(kStep, n - i);
        auto [xa, xb] = load2(x + i, m);
        auto [ra, rb] = load2(r + i, m);
        const fVec sa = xa + ra, sb = xb + rb;
        store2(sum + i, sa, sb, m);
        acc0 = at::vec::fmadd(sa, sa, acc0);
        acc1 = at::vec::fmadd(sb, sb, acc1);
      }
      const float ss = at::vec::vec_reduce_all<float>([](fVec& p, fVec& q) { return p + q; }, acc0 + acc1);
      const fVec scale(1.f / std::sqrt(ss / static_cast<float>(n) + a.eps));
      // Sweep 2 (x and r are in cache): normed = s * scale * w from the same fp32 sum.
      for (int64_t i = 0; i < n; i += kStep) {
        const int64_t m = std::min<int64_t>(kStep, n - i);
        auto [xa, xb] = load2(x + i, m);
        auto [ra, rb] = load2(r + i, m);
        auto [wa, wb] = load_weight<T>(a.w, a.w_fp32, i, m);
        store2(normed + i, (xa + ra) * scale * wa, (xb + rb) * scale * wb, m);
      }
    }
  });
}

template <template <typename> class Fn, typename Args>
void dispatch(const Args& a) {
  switch (a.dtype) {
    case c10::ScalarType::Float: return Fn<float>::run(a);
    case c10::ScalarType::Half: return Fn<c10::Half>::run(a);
    case c10::ScalarType::BFloat16: return Fn<c10::BFloat16>::run(a);
    default: TORCH_CHECK(false, "eagle3 CPU kernels: unsupported dtype ", a.dtype);
  }
}
template <typename T> struct RmsNormCat { static void run(const NormCatArgs& a) { rms_norm_cat_impl<T>(a); } };
template <typename T> struct FusedAdd { static void run(const FusedAddArgs& a) { fused_add_rms_norm_impl<T>(a); } };

void rms_norm_cat_entry(const NormCatArgs& a) { dispatch<RmsNormCat>(a); }
void fused_add_rms_norm_entry(const FusedAddArgs& a) { dispatch<FusedAdd>(a); }

#define EAGLE3_STR2(x) #x
#define EAGLE3_STR(x) EAGLE3_STR2(x)

}  // namespace

KernelTable kernels() { return {&rms_norm_cat_entry, &fused_add_rms_norm_entry, EAGLE3_STR(CPU_CAPABILITY)}; }

}  // namespace eagle3::cpu::EAGLE3_CPU_NS
