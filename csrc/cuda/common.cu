#include "cuda/common.cuh"

#include <array>

namespace eagle3::cuda {

namespace {
constexpr int kMaxDevices = 64;

int cached_attribute(cudaDeviceAttr attr, int device, std::array<int, kMaxDevices>& cache) {
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "eagle3: device index ", device, " out of range");
  int v = cache[device];
  if (v == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, attr, device));
    cache[device] = v;  // benign race: every writer stores the same value
  }
  return v;
}
}  // namespace

int max_smem_optin(int device) {
  static std::array<int, kMaxDevices> cache{};
  return cached_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device, cache);
}

int sm_count(int device) {
  static std::array<int, kMaxDevices> cache{};
  return cached_attribute(cudaDevAttrMultiProcessorCount, device, cache);
}

}  // namespace eagle3::cuda
