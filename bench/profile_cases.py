"""The cases still unexplained by the benchmark, one call each, for Nsight Compute.

    ncu --profile-from-start off --nvtx --section SpeedOfLight ... python3 bench/profile_cases.py

Every case is called twice first (warm-up, the fc weight's first use, torch.compile's
compilation), then once more between cudaProfilerStart / Stop inside an NVTX range named
after it, so ``--profile-from-start off`` profiles only those calls and ``--nvtx`` tells
them apart.

* fused_add_rms_norm, H=4096, bf16, beside torch.compile of the eager composition: at
  T=16384 the staged kernel ran at 95% of the copy bandwidth against torch.compile's 99%, and
  the register kernel (the row in registers, the shape of torch.compile's kernel) 1.4x slower
  than the staged one (H200, 7c333f2; 98 registers per thread, its arrays sized for 4 vectors
  per thread at 2: since then one instance per vectors per thread, 62 registers at 2 in the
  sm_90a build); at T=1 (graph replay) 2.2 us against torch.compile's
  1.9 and Liger's 1.7, with the weight staged or in registers alike.
* rms_norm_cat, K=3, T=16384, H=4096 and 8192, bf16: 83% and 90% of the copy bandwidth on the
  H200 (7c333f2 / a4f65c7; 96.6% and 98.5% on the H100): occupancy, DRAM throughput, stall
  reasons; beside them the same rows with the other block layout (one block per (row, chunk)
  at H=4096, one per row at H=8192), and as three separate tensors instead of views of one
  [T, 3H] tensor. The c357b83 profile showed 13% L1 hits (the norm weights re-read from L2
  every row under the largest shared-memory carveout); since acffad4 such launches take a
  smaller carveout (``_norm_carveout``), profiled beside the largest ("c100").
* The fc's mma.sync kernel at T=8 beside the pair and F.linear alone (0.93x of F.linear on
  the H200), and at T=64 (x re-read per block) with 16 and 32 features per block (64 at T=32).
* On Hopper, the wgmma kernel beside F.linear at T=16384, H=4096, and the split-k mma.sync
  kernel at T = 8, 16, 64 (H=4096).
* The fc at T=16384, H=7168, norm "chunk": the op (rms_norm_cat + the cuBLAS GEMM) and
  F.linear alone on the normalised input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import eagle3_ops
from eagle3_ops import reference
from eagle3_ops.ops import kernel_switches

EPS = 1e-6


def cases():
    dev, bf = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    out = []
    # fused_add_rms_norm: the default, the register kernel and torch.compile's kernel (of the
    # eager composition, as in the benchmark)
    compiled = torch.compile(lambda x, r, w: reference.fused_add_rms_norm(x, r, w, EPS), dynamic=False, fullgraph=True)
    for T in (16384, 1):
        x = torch.randn(T, 4096, device=dev, dtype=bf, generator=g)
        r = torch.randn(T, 4096, device=dev, dtype=bf, generator=g)
        w = 1 + 0.1 * torch.randn(4096, device=dev, dtype=bf, generator=g)

        def registers(x=x, r=r, w=w):
            with kernel_switches(norm_registers=1):
                return eagle3_ops.fused_add_rms_norm(x, r, w, EPS)

        out.append((f"fused_add_rms_norm T={T} H=4096", lambda x=x, r=r, w=w: eagle3_ops.fused_add_rms_norm(x, r, w, EPS)))
        out.append((f"fused_add_rms_norm T={T} H=4096 registers", registers))
        out.append((f"fused_add_rms_norm T={T} H=4096 torch.compile", lambda x=x, r=r, w=w: compiled(x, r, w)))
    for H in (4096, 8192):
        xs = list(torch.randn(16384, 3 * H, device=dev, dtype=bf, generator=g).chunk(3, -1))
        ws = [1 + 0.1 * torch.randn(H, device=dev, dtype=bf, generator=g) for _ in range(3)]
        out.append((f"rms_norm_cat K=3 T=16384 H={H}", lambda xs=xs, ws=ws: eagle3_ops.rms_norm_cat(xs, ws, EPS)))

        def other(xs=xs, ws=ws, H=H):  # the layout the default does not take at this width
            with kernel_switches(norm_split_chunks=1 if H <= 4096 else 0):
                return eagle3_ops.rms_norm_cat(xs, ws, EPS)

        layout = "one block per (row, chunk)" if H <= 4096 else "one block per row"
        out.append((f"rms_norm_cat K=3 T=16384 H={H} {layout}", other))

        def largest_carveout(xs=xs, ws=ws):  # the launches before acffad4
            with kernel_switches(norm_carveout=100):
                return eagle3_ops.rms_norm_cat(xs, ws, EPS)

        out.append((f"rms_norm_cat K=3 T=16384 H={H} c100", largest_carveout))
    # The same rows as three separate tensors (the benchmark's are views of one [T, 3H]
    # tensor; its K=2 and K=1 cases, at 95-98%, read separate tensors).
    xs3 = [torch.randn(16384, 4096, device=dev, dtype=bf, generator=g) for _ in range(3)]
    ws3 = [1 + 0.1 * torch.randn(4096, device=dev, dtype=bf, generator=g) for _ in range(3)]
    out.append(("rms_norm_cat K=3 T=16384 H=4096 separate tensors", lambda: eagle3_ops.rms_norm_cat(xs3, ws3, EPS)))
    H = 7168
    xs = list(torch.randn(16384, 3 * H, device=dev, dtype=bf, generator=g).chunk(3, -1))
    w = torch.randn(H, 3 * H, device=dev, dtype=bf, generator=g) / (3 * H) ** 0.5
    xn = eagle3_ops.rms_norm_cat(xs)
    out.append(("rms_norm_cat_linear chunk T=16384 H=7168",
                lambda: eagle3_ops.rms_norm_cat_linear(xs, w, EPS, "chunk")))
    out.append(("F.linear alone T=16384 H=7168", lambda: F.linear(xn, w)))
    # The wgmma kernel (off by default: 1-10% behind the pair at T >= 2048, about 8% behind
    # F.linear's own GEMM at H=4096) beside F.linear at T=16384, H=4096: tensor-pipe
    # utilisation, stall reasons and L2 traffic of both GEMMs.
    if torch.cuda.get_device_capability()[0] == 9:
        H = 4096
        xs16 = list(torch.randn(16384, 3 * H, device=dev, dtype=bf, generator=g).chunk(3, -1))
        w16 = torch.randn(H, 3 * H, device=dev, dtype=bf, generator=g) / (3 * H) ** 0.5
        xn16 = eagle3_ops.rms_norm_cat(xs16)

        def wgmma():
            with kernel_switches(fc_wgmma_min_tokens=1, fc_wgmma_tile_n=256):
                return eagle3_ops.rms_norm_cat_linear(xs16, w16, EPS, "chunk")

        out.append(("rms_norm_cat_linear chunk T=16384 H=4096 wgmma-256", wgmma))
        out.append(("F.linear alone T=16384 H=4096", lambda: F.linear(xn16, w16)))
    # Decode sizes: the mma.sync kernel (the default at T = 2..8 in one wave; its first
    # version, with a scale pre-pass launch, reached 65% of the copy bandwidth at T=8 on the
    # H100) beside the pair, and at T=64 with 16, 32 and 64 features per block.
    H = 4096
    xs8 = list(torch.randn(8, 3 * H, device=dev, dtype=bf, generator=g).chunk(3, -1))
    w8 = torch.randn(H, 3 * H, device=dev, dtype=bf, generator=g) / (3 * H) ** 0.5

    def mma(xs, features=0):
        with kernel_switches(fc_mma_max_tokens=64, fc_mma_max_waves=0, fc_mma_features=features):
            return eagle3_ops.rms_norm_cat_linear(xs, w8, EPS, "chunk")

    def pair(xs):
        with kernel_switches(fc_decode_max_tokens=0, fc_mma_max_tokens=0):
            return eagle3_ops.rms_norm_cat_linear(xs, w8, EPS, "chunk")

    out.append(("rms_norm_cat_linear chunk T=8 H=4096 mma", lambda: mma(xs8)))
    out.append(("rms_norm_cat_linear chunk T=8 H=4096 pair", lambda: pair(xs8)))
    xn8 = eagle3_ops.rms_norm_cat(xs8)
    out.append(("F.linear alone T=8 H=4096", lambda: F.linear(xn8, w8)))
    # T=64: every block of the mma kernel reads all of x (1.5 MB) from L2 -- how much of
    # its time that costs beside the weight stream, at each block width.
    xs64 = list(torch.randn(64, 3 * H, device=dev, dtype=bf, generator=g).chunk(3, -1))
    for f in (16, 32):
        out.append((f"rms_norm_cat_linear chunk T=64 H=4096 mma f{f}", lambda f=f: mma(xs64, f)))
    xs32 = list(torch.randn(32, 3 * H, device=dev, dtype=bf, generator=g).chunk(3, -1))
    out.append(("rms_norm_cat_linear chunk T=32 H=4096 mma f64", lambda: mma(xs32, 64)))
    # The split-k mma kernel (Hopper; off by default) at T = 8 / 16 / 64: DRAM throughput of
    # its weight stream, L2 traffic of x, and the cost of the cluster's reduction.
    if torch.cuda.get_device_capability()[0] == 9:
        xs_t16 = list(torch.randn(16, 3 * H, device=dev, dtype=bf, generator=g).chunk(3, -1))

        def splitk(xs):
            with kernel_switches(fc_decode_max_tokens=0, fc_mma_max_tokens=0, fc_splitk_max_tokens=64):
                return eagle3_ops.rms_norm_cat_linear(xs, w8, EPS, "chunk")

        for T, xs in ((8, xs8), (16, xs_t16), (64, xs64)):
            out.append((f"rms_norm_cat_linear chunk T={T} H=4096 mma-sk", lambda xs=xs: splitk(xs)))
    return out


def main() -> None:
    todo = cases()
    with torch.inference_mode():
        for _, fn in todo:
            fn()
            fn()
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        for name, fn in todo:
            torch.cuda.nvtx.range_push(name)
            fn()
            torch.cuda.nvtx.range_pop()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    print("profile_cases: " + "; ".join(name for name, _ in todo))


if __name__ == "__main__":
    main()
