#include "cuda/common.cuh"
#include "cuda/cluster.cuh"

#include <array>
#include <atomic>
#include <map>
#include <mutex>
#include <set>
#include <tuple>
#include <utility>

namespace eagle3::cuda {

namespace {
constexpr int kMaxDevices = 64;

// Device attribute kAttr of `device`, queried once per device (0 counts as not yet queried;
// every writer stores the same value).
template <cudaDeviceAttr kAttr>
int device_attribute(int device) {
  static std::array<std::atomic<int>, kMaxDevices> cache{};
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "eagle3: device index ", device, " out of range");
  int v = cache[device].load(std::memory_order_relaxed);
  if (v == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, kAttr, device));
    cache[device].store(v, std::memory_order_relaxed);
  }
  return v;
}
}  // namespace

int max_smem_optin(int device) { return device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(device); }

int sm_count(int device) { return device_attribute<cudaDevAttrMultiProcessorCount>(device); }

bool sm90a_body_runs(const void* kernel, int device) {
  static std::mutex mu;
  static std::map<std::pair<int, const void*>, bool> known;
  const std::lock_guard<std::mutex> lock(mu);
  const auto it = known.find({device, kernel});
  if (it != known.end()) return it->second;
  bool ok = false;
  if (device_attribute<cudaDevAttrComputeCapabilityMajor>(device) == 9) {
    cudaFuncAttributes attr{};
    if (cudaFuncGetAttributes(&attr, kernel) == cudaSuccess)
      ok = attr.binaryVersion == 90 && attr.ptxVersion >= 90 && attr.numRegs >= 64;
    else
      (void)cudaGetLastError();
  }
  known[{device, kernel}] = ok;
  return ok;
}

void cluster_launch_config(cudaLaunchConfig_t& cfg, cudaLaunchAttribute& attr, unsigned grid, unsigned size,
                           int threads, size_t smem, cudaStream_t stream) {
  cfg = cudaLaunchConfig_t{};
  cfg.gridDim = dim3(grid);
  cfg.blockDim = dim3(static_cast<unsigned>(threads));
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = size;
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
}

int64_t max_active_clusters(const void* kernel, int device, int size, int threads, int smem) {
  static std::mutex mu;
  static std::map<std::tuple<int, const void*, int, int, int>, int64_t> known;
  const std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(device, kernel, size, threads, smem);
  if (const auto it = known.find(key); it != known.end()) return it->second;
  cudaLaunchConfig_t cfg;
  cudaLaunchAttribute attr;
  cluster_launch_config(cfg, attr, static_cast<unsigned>(size), static_cast<unsigned>(size), threads,
                        static_cast<size_t>(smem), nullptr);
  int clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg) != cudaSuccess) {
    (void)cudaGetLastError();
    return sm_count(device) / size;
  }
  known[key] = clusters;
  return clusters;
}

// The norm kernels' strategy defaults: stage rows of up to 100 KB in shared memory, no
// register-resident kernel. On the H100 (T=16384, bf16; bench/results/
// nvidia-h100-80gb-hbm3-80ab0d87a9d7-tune.json) the staged kernel reached 81-98% of the copy
// bandwidth and was fastest in 5 of 6 cases (the register kernel: 82-86%, ahead only for
// rms_norm_cat K=3, H=8192, 83.4 against 81.0%; two-pass: 65-67%), and fastest at T=64.
namespace {
std::atomic<int64_t> g_norm_stage_limit{100 * 1024};
}  // namespace

namespace {
// Shared memory a staged launch may take: the stage limit, within what the device allows.
int64_t stage_budget(int device) {
  return std::min<int64_t>(g_norm_stage_limit.load(std::memory_order_relaxed), max_smem_optin(device));
}
}  // namespace

StagePlan plan_stage(int64_t scratch_bytes, int64_t stage_bytes, int device) {
  const int64_t staged = scratch_bytes + stage_bytes;
  if (staged <= stage_budget(device)) return {true, staged};
  return {false, scratch_bytes};
}

// Largest number of rows for which the staged norm kernels stage the norm weights with the
// row (0: never): 64. On the H100 (graph replay, bf16; bench/results/
// nvidia-h100-80gb-hbm3-ed5c01eeed8c-tune.json) staging them cut every launch of 1, 8 and
// 64 rows measured, e.g. fused_add_rms_norm H=4096 T=1 3.2 -> 2.7 us, rms_norm_cat K=3
// H=4096 T=64 8.3 -> 6.5 us (4 vectors per thread), and 2.4 / 5.4 us with 1 vector per
// thread (kSmallLaunchRows). Larger launches were not measured with it.
namespace {
std::atomic<int64_t> g_norm_stage_weights{kSmallLaunchRows};
}  // namespace

int64_t stage_weights_bytes(const StagePlan& plan, int64_t rows, int64_t weight_bytes, int device) {
  if (!plan.staged || rows > g_norm_stage_weights.load(std::memory_order_relaxed)) return 0;
  return plan.smem + weight_bytes <= stage_budget(device) ? weight_bytes : 0;
}

int64_t set_norm_stage_weights(int64_t rows) { return query_or_set(g_norm_stage_weights, rows); }

namespace {
std::atomic<bool> g_norm_registers{false};
// Vectors per thread of the norm kernels' blocks (threads_for, reg_threads); 0: by rows
// (norm_vecs_per_thread).
std::atomic<int> g_norm_vecs_per_thread{0};
}  // namespace

int norm_vecs_per_thread(int64_t rows, int by_shape) {
  const int v = g_norm_vecs_per_thread.load(std::memory_order_relaxed);
  if (v > 0) return v;
  if (by_shape > 0) return by_shape;
  return rows <= kSmallLaunchRows ? 1 : 2;
}

int64_t set_norm_vecs_per_thread(int64_t v) { return query_or_set(g_norm_vecs_per_thread, v); }

bool norm_registers() { return g_norm_registers.load(std::memory_order_relaxed); }

int64_t set_norm_registers(int64_t on) { return query_or_set(g_norm_registers, on); }

int64_t set_norm_stage_limit(int64_t bytes) { return query_or_set(g_norm_stage_limit, bytes); }

// The staged norm kernels' shared-memory carveout per launch (set_norm_carveout): 0 (the
// default) by size, 1..100 a fixed percentage.
//
// configure_staging_kernel asks for the largest carveout (228 KB of shared memory on Hopper),
// which leaves the L1 cache its minimum of 28 KB. In large launches the norm weights are
// read from global memory for every row, and they did not stay in that L1: Nsight Compute
// on the H200 (c357b83, bench/profile_cases.py, T=16384, bf16) showed an L1 hit rate of 13%
// for rms_norm_cat K=3 H=4096 (24 KB of weights per row) at 3.48 TB/s, and 7% at H=8192,
// against 4.14 TB/s for the same kernel without weights (the fc's pair, H=7168) and 42% L1
// hits for torch.compile's fused_add_rms_norm (16 KB shared-memory configuration).
// By size: a launch of at least kLargeLaunchRows rows that reads weights from global memory
// takes the smallest configuration that still holds the blocks its threads allow per
// multiprocessor, and a smaller one where that would leave the L1 cache less than the
// weights plus kL1Slack (rms_norm_cat K=3 H=4096: 164 KB, 6 blocks of 8).
// H200 (acffad4 tune, bench/results/nvidia-h200-acffad433212-tune.json; T=16384, bf16,
// interleaved; the largest carveout / 164 KB / the rule of acffad4, whose slack was 16 KB):
// rms_norm_cat K=3 H=4096 226.8 / 205.0 / 226.4 us (196 KB: 60 KB of L1 for 24 KB of
// weights did not help; 164 KB: 92.9% of the copy bandwidth), H=7168 372.1 / 356.8 / 356.5,
// H=8192 424.2 / 412.0 / 413.8; midlayer_cat (K=2) H=4096 151.2 / 142.7 / 142.7, H=8192
// 284.1 / 275.6 / 274.7; T=4096 rms_norm_cat H=4096 62.4 / 60.6 / 62.3;
// fused_add_rms_norm within 0.2% (H=4096 134.5 / 134.8 / 134.7). With 40 KB of slack each of
// these launches takes 164 KB.
namespace {
std::atomic<int> g_norm_carveout{0};
constexpr int64_t kMinL1Bytes = 28 * 1024;  // L1 left by the largest carveout (sm_80, sm_86, sm_89, sm_90)
constexpr int64_t kL1Slack = 40 * 1024;
// The shared-memory capacities an SM can be configured to (CUDA C++ Programming Guide,
// compute capabilities 8.x and 9.x), up to the device's maximum.
constexpr int kCarveoutKB[] = {0, 8, 16, 32, 64, 100, 132, 164, 196, 228};
}  // namespace

int norm_carveout(int64_t rows, int64_t block_smem, int threads, int64_t weight_bytes, int device) {
  const int fixed = g_norm_carveout.load(std::memory_order_relaxed);
  if (fixed > 0) return fixed;
  if (rows < kLargeLaunchRows || weight_bytes <= 0 || threads <= 0) return -1;
  const int64_t max_sm = device_attribute<cudaDevAttrMaxSharedMemoryPerMultiprocessor>(device);
  const int64_t per_block = block_smem + device_attribute<cudaDevAttrReservedSharedMemoryPerBlock>(device);
  const int64_t blocks =
      std::max(1, std::min(device_attribute<cudaDevAttrMaxThreadsPerMultiProcessor>(device) / threads, 32));
  const int64_t l1_cap = max_sm + kMinL1Bytes - (weight_bytes + kL1Slack);  // largest carveout leaving that L1
  int64_t full = max_sm, fits_l1 = -1, one_block = max_sm;
  for (const int kb : kCarveoutKB) {
    const int64_t bytes = int64_t{kb} * 1024;
    if (bytes > max_sm) break;
    if (bytes >= blocks * per_block) full = std::min(full, bytes);
    if (bytes >= per_block) one_block = std::min(one_block, bytes);
    if (bytes <= l1_cap) fits_l1 = bytes;
  }
  int64_t chosen = full;
  if (fits_l1 >= 0 && fits_l1 < chosen) chosen = std::max(fits_l1, one_block);
  if (chosen >= max_sm) return -1;  // the kernel's own (largest) carveout
  // The driver rounds a percentage up to the next capacity; the configurations are more
  // than 1% of the maximum apart, so the floor maps back onto `chosen`.
  return static_cast<int>(std::max<int64_t>(1, chosen * 100 / max_sm));
}

int64_t set_norm_carveout(int64_t value) { return query_or_set(g_norm_carveout, value); }

void configure_staging_kernel(const void* kernel, int device, bool largest_carveout) {
  // Once per device and kernel, under a lock (another host thread may launch the same
  // kernel): the largest dynamic shared memory a launch may ask for (the opt-in maximum
  // less the kernel's static shared memory -- the runtime refuses a sum above it -- so no
  // launch lowers it under another's feet) and, where asked, the largest shared-memory
  // carveout. The kernel counts as configured only once that succeeded. (A kernel is
  // always configured with the same largest_carveout.)
  static std::mutex mu;
  static std::set<std::pair<int, const void*>> done;
  const std::lock_guard<std::mutex> lock(mu);
  if (done.count({device, kernel})) return;
  cudaFuncAttributes attr{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      max_smem_optin(device) - static_cast<int>(attr.sharedSizeBytes)));
  if (largest_carveout)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                        cudaSharedmemCarveoutMaxShared));
  done.insert({device, kernel});
}

}  // namespace eagle3::cuda
