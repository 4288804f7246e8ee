// Thread-block clusters (sm_90): distributed shared memory and the cluster barrier on the
// device, cluster launches and their occupancy on the host. Used by the kernels that split a
// tile's k range over the blocks of a cluster (fc_wgmma.cu, fc_mma.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace eagle3::cuda {

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// The shared::cluster address of `p`'s offset in the shared memory of CTA `cta` of the
// cluster (this CTA too).
__device__ __forceinline__ uint32_t cluster_addr(const void* p, uint32_t cta) {
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(smem_addr(p)), "r"(cta));
  return remote;
}
// Four floats at `p`'s offset in the shared memory of CTA `cta` of the cluster.
__device__ __forceinline__ float4 ld_cluster_f4(const float* p, uint32_t cta) {
  const uint32_t remote = cluster_addr(p, cta);
  float4 v;
  asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];\n"
               : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
               : "r"(remote)
               : "memory");
  return v;
}
// The float at `p`'s offset in the shared memory of CTA `cta` of the cluster.
__device__ __forceinline__ float ld_cluster_f32(const float* p, uint32_t cta) {
  const uint32_t remote = cluster_addr(p, cta);
  float v;
  asm volatile("ld.shared::cluster.f32 %0, [%1];\n" : "=f"(v) : "r"(remote) : "memory");
  return v;
}
// Every thread of every CTA of the cluster.
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;\n" ::: "memory");
}
#endif  // __CUDA_ARCH_FEAT_SM90_ALL

// Whether `kernel` (a wgmma or cluster kernel whose body only an sm_90a build holds) runs
// that body on `device`: a compute capability 9.x device, and a build whose architecture
// list named 9.0a. A plain 9.0 build reports the same binary and PTX versions but holds
// only the trapping stub, so the register count tells them apart: the bodies take 64 or
// more (the wgmma kernel's accumulators alone 64-128, the split-k kernel 100-128), the stub
// 4. Cached per device and kernel; the caller has made `device` current.
bool sm90a_body_runs(const void* kernel, int device);

// A launch of `grid` blocks of `threads` threads with `smem` bytes each, in clusters of
// `size` blocks along x (a 1-D grid: blockIdx.x % size is the block's rank in its cluster);
// `attr` holds the cluster attribute `cfg` points to.
void cluster_launch_config(cudaLaunchConfig_t& cfg, cudaLaunchAttribute& attr, unsigned grid, unsigned size,
                           int threads, size_t smem, cudaStream_t stream);

// How many clusters of `size` blocks of `kernel` (`threads` threads, `smem` bytes each) the
// device holds at once: clusters stay inside one GPC, so this can be fewer than the blocks
// per multiprocessor x multiprocessors / size. Cached per device, kernel, size, threads and
// smem; the caller has made `device` current and set the kernel's shared-memory limit.
// Where the query fails, multiprocessors / size (not cached: the next call asks again).
int64_t max_active_clusters(const void* kernel, int device, int size, int threads, int smem);

}  // namespace eagle3::cuda
