"""Small CUDA cases for compute-sanitizer (memcheck / racecheck), run by bench/gpu_check.sh.

Odd widths and offset views (scalar paths), aligned views (16-byte paths), the staged,
two-pass and register-resident norm kernels, the fc's decode, mma.sync and (on Hopper)
wgmma kernels, fp32 weights, shared
statistics, T = 0, 1, 5. Each result is compared with the reference, so a wrong answer
fails here as well as a bad access.

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 bench/sanitize_cases.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python3 bench/sanitize_cases.py --one
"""

import argparse
import sys

import torch

import eagle3_ops
from eagle3_ops import reference as ref
from eagle3_ops.ops import kernel_switches


def _close(out, expect, what):
    err = ((out.double() - expect.double()).norm() / expect.double().norm().clamp_min(1e-30)).item()
    tol = 1e-5 if out.dtype == torch.float32 else 2e-2
    if not (err <= tol):
        raise AssertionError(f"{what}: relative error {err:.3g} > {tol}")


def run_cases(one: bool, g: torch.Generator, aligned: bool) -> int:
    dev = "cuda"
    cases = 0
    widths_sets = [[64, 64, 64], [769, 100, 8], [7, 1029], [1024, 512], [2048]] if not one else [[769, 64, 100], [256, 512]]
    dtypes = [torch.bfloat16, torch.float16, torch.float32] if not one else [torch.bfloat16]
    for dtype in dtypes:
        for widths in widths_sets:
            for T in ([0, 1, 5] if not one else [5]):
                total = sum(widths)
                # chunks as views of one buffer: at an odd element offset and row stride (the
                # scalar paths), or aligned (the 16-byte paths wherever the widths allow)
                pad, off = (0, 0) if aligned else (3, 1)
                big = torch.randn(T, total + pad, device=dev, dtype=dtype, generator=g)
                xs = list(torch.split(big[:, off:off + total], widths, dim=-1))
                ws = [torch.randn(w, device=dev, dtype=dtype if i % 2 == 0 else torch.float32, generator=g)
                      for i, w in enumerate(widths)]
                for shared in (False, True):
                    out = eagle3_ops.rms_norm_cat(xs, ws, 1e-6, shared)
                    if T:
                        _close(out, ref.rms_norm_cat_fp64(xs, ws, 1e-6, shared), f"rms_norm_cat {dtype} {widths} T={T}")
                    cases += 1
                r = torch.randn(T, widths[0], device=dev, dtype=dtype, generator=g)
                n, s = eagle3_ops.fused_add_rms_norm(xs[0], r, ws[0], 1e-6)
                if T:
                    rn, rs = ref.fused_add_rms_norm_fp64(xs[0], r, ws[0], 1e-6)
                    _close(n, rn, "fused_add_rms_norm normed")
                    _close(s, rs, "fused_add_rms_norm sum")
                cases += 1
                W = torch.randn(33, total, device=dev, dtype=dtype, generator=g) / total ** 0.5
                for norm in ("none", "chunk", "shared"):
                    y = eagle3_ops.rms_norm_cat_linear(xs, W, 1e-6, norm)
                    if T:
                        _close(y, ref.rms_norm_cat_linear_fp64(xs, W, 1e-6, norm), f"linear {norm}")
                    cases += 1
    return cases


def run(one: bool) -> int:
    g = torch.Generator(device="cuda").manual_seed(0)
    cases = 0
    # Every kernel path, each pass its switches on top of the defaults: the staged, two-pass and
    # register-resident norms (fused_add_rms_norm's with its weights loaded with the row; blocks
    # of 1, 2 and 4 vectors per thread), the fc's decode kernel up to T=8, its mma.sync kernel
    # (T = 5 here; 32 and 64 features per block), its wgmma kernel (every T, Hopper only;
    # aligned views, the only ones it takes), also with its k range split over clusters of three
    # and in clusters of two, the fc's split-k mma.sync kernel (by size and in clusters of 8),
    # rms_norm_cat with one block per (row, chunk), the staged norms launched with a
    # shared-memory carveout, and the norm weights staged with the rows (blocks of one and two
    # vectors per thread). The wgmma kernel takes the norm statistics from its tiles where they
    # apply (its default): norm "shared" and one-chunk "chunk" in every pass, and with the k
    # range split over three blocks, K=3 "chunk".
    passes = (
        (dict(fc_decode_max_tokens=8), (False, True)),
        (dict(norm_stage_limit=0), (False, True)),
        (dict(norm_registers=1, fc_mma_max_tokens=64, fc_mma_features=32), (False, True)),
        # the register kernels' instances for 2 and 4 vectors per thread (1 above)
        (dict(norm_registers=1, norm_vecs_per_thread=2), (True,)),
        (dict(norm_registers=1, norm_vecs_per_thread=4), (True,)),
        (dict(fc_mma_max_tokens=64, fc_mma_max_waves=0, fc_mma_features=64), (True,)),
        (dict(fc_decode_max_tokens=0, fc_wgmma_min_tokens=1, fc_wgmma_tile_stats=1), (True,)),
        (dict(norm_split_chunks=1), (False, True)),
        (dict(norm_carveout=30), (False, True)),  # the staged launches with a carveout attribute
        (dict(norm_stage_weights=64, norm_vecs_per_thread=1), (False, True)),
        (dict(norm_split_chunks=1, norm_stage_weights=64, norm_vecs_per_thread=2), (True,)),
        (dict(fc_decode_max_tokens=0, fc_wgmma_min_tokens=1, fc_wgmma_cluster=2, fc_wgmma_tile_stats=1), (True,)),
        # last: the newest kernel paths, and a trap would end the process: the split k range
        # with the statistics pre-pass, then with the statistics added up over the cluster
        (dict(fc_decode_max_tokens=0, fc_mma_max_tokens=0, fc_wgmma_min_tokens=1, fc_wgmma_split_k=3,
              fc_wgmma_tile_stats=0), (True,)),
        (dict(fc_decode_max_tokens=0, fc_mma_max_tokens=0, fc_wgmma_min_tokens=1, fc_wgmma_split_k=3), (True,)),
        # the split-k mma.sync kernel (clusters of 8: more blocks than k-blocks at 64 x 3)
        (dict(fc_decode_max_tokens=0, fc_mma_max_tokens=0, fc_splitk_max_tokens=64), (True,)),
        (dict(fc_decode_max_tokens=0, fc_mma_max_tokens=0, fc_splitk_max_tokens=64, fc_splitk_cluster=8), (True,)),
    )
    for switches, layouts in passes:
        with kernel_switches(**switches):
            for aligned in layouts:
                cases += run_cases(one, g, aligned)
    torch.cuda.synchronize()
    print(f"sanitize_cases: {cases} cases passed")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--one", action="store_true", help="one small case per op (for racecheck)")
    sys.exit(run(p.parse_args().one))
