"""Quick GPU comparison of the kernels' alternative strategies, in one process (~1-2 min).

    python -m bench.tune [--out FILE.json] [--parts norm,carveout,registers,fc,splitk,prefill,wgmma]

For the norm kernels (T = 1..16384, ``--parts norm``): the defaults beside one block per row
("row", ``_norm_split_chunks(0)``; for rms_norm_cat "split": one block per (row, chunk),
``_norm_split_chunks(1)``) with blocks of 4 vectors per thread ("v4", the first runs' size),
1 or 2 ("v1", "v2"; ``_norm_vecs_per_thread``; 3 at T=16384, H=7168), "+w" where the norm
weights are staged with the row (``_norm_stage_weights``), and the register kernel
(``_norm_registers(1)``; for fused_add_rms_norm also "registers+w", the weights loaded with
the row, and "registers v2" at T=16384). ``--parts carveout``: the staged norm kernels'
shared-memory carveout in large launches (``_norm_carveout``: by size, 100, 71);
``--parts registers``: the register kernels at T = 4096 / 16384 with 1, 2 or 4 vectors per
thread against the defaults. For the fc (``--parts fc``, T = 1..64, H = 4096, 5120, 7168): the
defaults, the mma.sync kernel at any grid with 16, 32 or 64 features per block ("mma f16"
...: ``_fc_mma_max_tokens``, ``_fc_mma_max_waves(0)``, ``_fc_mma_features``), on Hopper from
T=8 the wgmma kernel with its k range split over clusters ("wgmma-128 sk", "wgmma-256 sk":
``_fc_wgmma_split_k(0)``, the norm statistics added up over the cluster; "wgmma-128 sk pre":
from a pre-pass, ``_fc_wgmma_tile_stats(0)``), and rms_norm_cat + cuBLAS. On Hopper,
``--parts splitk``: the split-k mma.sync kernel (T = 1..64, H = 4096 / 7168; clusters by
size and of 2, 4, 8 blocks: ``_fc_splitk_max_tokens``, ``_fc_splitk_cluster``) against the
defaults and the pair; ``--parts prefill``: the wgmma kernel's norm statistics at T = 2048 /
16384, H = 4096 / 7168, norm "shared" (from the pre-pass, in multicast pairs too, or from
each block's tiles) and "chunk" (the pre-pass, or one block per chunk of a cluster of three,
"sk3"); ``--parts wgmma``: the wgmma kernel (128 or 256 features per block; "c2": clusters
of two blocks multicasting the weight tiles; "sk" and "sk pre" at T=128) against
rms_norm_cat + cuBLAS over T = 128..16384 x H = 4096..8192 (``_fc_wgmma_min_tokens`` /
``_fc_wgmma_tile_n`` / ``_fc_wgmma_cluster`` / ``_fc_wgmma_split_k``). Each row names the
path that served it (``_fc_last_path``; for the norm kernels the launch's plan,
``_norm_last_plan``: strategy, weights staged, threads per block), so a kernel that declined
shows as such. Each figure is a median on rotated inputs (CUDA-graph replay for T <= 64,
events above), the variants of a case timed together in interleaved turns (bench/timing.py),
beside the copy bandwidth measured in the same run and the variant's error against float64.
The defaults in csrc/ are chosen from these tables.
"""

from __future__ import annotations

import argparse
import json
import os
import signal

import torch

import eagle3_ops  # noqa: F401  (loads the ops)
from eagle3_ops.ops import kernel_switches
from bench import cases as C
from bench import timing

OPS = torch.ops.eagle3
PARTS = ("norm", "carveout", "registers", "fc", "splitk", "prefill", "wgmma")  # --parts


def _time_variants(case: C.Case, variants, budget: timing.Budget, cache_bytes: int) -> tuple:
    """The variants of one case, (name, kernel switches) each, on the same inputs, timed
    together: their samples are taken in interleaved turns, each under its switches, so the
    card's clock drift reaches them alike (timing.time_graphs_interleaved for T <= 64: GPU
    time, as the defaults were chosen; timing.time_interleaved with events above). Returns
    (results, failed): per variant timed, in order, (name, path or plan, median us, relative
    error against float64 of the first input set); and the first exception a variant raised
    while timed, or None."""
    n = C.rotation_copies(case, cache_bytes, cap=64, mem_cap_bytes=8 << 30)
    impl = next(i for i in C.implementations(case, with_compile=False).impls if i.name == "eagle3")
    inputs = [C.make_inputs(case, seed=i) for i in range(n)]
    reference = C.reference_fp64(case, inputs[0])
    call_sets, contexts, info = {}, {}, {}
    for name, switches in variants:
        def ctx(sw=switches):
            return kernel_switches(**sw)
        with ctx():
            calls = [impl.prepare(inp) for inp in inputs]
            out = calls[0]()
            # the fc's path, or the norm launch's plan (strategy, weights staged, threads)
            path = OPS._fc_last_path() if case.op == C.FC_OP else OPS._norm_last_plan()
        info[name] = (path, C.rel_err(out, reference))
        del out
        call_sets[name], contexts[name] = calls, ctx
    del reference
    timed = (timing.time_graphs_interleaved(call_sets, 20, budget, contexts=contexts)
             if case.device == "cuda" and case.T <= 64 else
             timing.time_interleaved(call_sets, budget, case.device, contexts=contexts))
    results, failed = [], None
    for name, _ in variants:
        st = timed[name]
        if isinstance(st, Exception):
            failed = failed or st
            continue
        results.append((name, info[name][0], st.median_us, info[name][1]))
    call_sets.clear()
    return results, failed


def summary(rows: list) -> list:
    """Markdown lines: per case (op, norm, T, H), its fastest variant beside the default
    (the first variant) and rms_norm_cat + cuBLAS where timed, with their times over the
    fastest one's -- the figures the defaults are chosen from."""
    cases = {}
    for r in rows:
        cases.setdefault((r["op"], r.get("norm"), r["T"], r["H"]), []).append(r)
    lines = ["| op | T | H | fastest | us | first variant | x fastest | pair x fastest |",
             "|---|---|---|---|---|---|---|---|"]
    for (op, norm, T, H), rs in cases.items():
        best = min(rs, key=lambda r: r["us"])
        pair = next((r for r in rs if r["variant"] == "norm_cat+cuBLAS"), None)
        name = op + (f" ({norm})" if norm else "")
        pair_x = f"{pair['us'] / best['us']:.3f}" if pair else "-"
        lines.append(f"| {name} | {T} | {H} | {best['variant']} ({best['path']}) | {best['us']:.1f} | "
                     f"{rs[0]['variant']} | {rs[0]['us'] / best['us']:.3f} | {pair_x} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="write the rows as JSON here")
    p.add_argument("--parts", default=",".join(PARTS),
                   help="comma-separated: norm (the norm kernels), carveout (their shared-memory carveout at "
                        "large T), registers (their register kernels at large T), fc (T <= 64), splitk (the "
                        "split-k mma kernel, T <= 64), prefill (the wgmma kernel's "
                        "norm statistics at T = 2048 / 16384), wgmma (the Hopper grid, the longest)")
    args = p.parse_args()
    parts = set(args.parts.split(","))
    if unknown := sorted(parts - set(PARTS)):
        p.error(f"--parts: unknown {unknown}; choose from {', '.join(PARTS)}")
    cache, _ = timing.cuda_l2_bytes()
    copy = timing.copy_gbps("cuda", 2 << 30)
    budget = timing.Budget(seconds=0.3, min_reps=10, max_reps=200, min_sample_s=1e-3)
    rows = []
    card = torch.cuda.get_device_name()
    print(f"{card}: copy {copy:.0f} GB/s")
    print("| op | T | H | variant | path | us | GB/s | % copy | rel err |")
    print("|---|---|---|---|---|---|---|---|---|")

    def measure(case, variants):
        results, failed = _time_variants(case, variants, budget, cache)
        for name, path, us, err in results:
            gbps = case.bytes_moved() / us / 1e3
            rows.append(dict(op=case.op, T=case.T, H=case.H, norm=case.norm, variant=name, path=path, us=us,
                             gbps=gbps, pct_copy=100 * gbps / copy, rel_err=err))
            op = case.op + (f" ({case.norm})" if case.norm else "")
            print(f"| {op} | {case.T} | {case.H} | {name} | {path} | {us:.1f} | {gbps:.0f} "
                  f"| {100 * gbps / copy:.1f} | {err:.2g} |")
        if failed is not None:
            raise failed

    def stop(signum, frame):  # `timeout`'s SIGTERM: end through the finally below
        raise SystemExit(f"tune: stopped by signal {signum} after {len(rows)} rows")

    signal.signal(signal.SIGTERM, stop)
    try:
        _sweep(measure, parts)
        print("\n" + "\n".join(summary(rows)))
    finally:
        # the rows measured so far are written even when a kernel fails (the CUDA context
        # may be unusable by then, so nothing below touches the device)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"card": card, "torch": torch.__version__, "copy_gbps": copy,
                           "rows": rows}, f, indent=1)


def _sweep(measure, parts) -> None:
    """measure(case, [(variant name, kernel switches), ...]) for every case: its variants are
    timed together, each under its switches (kernel_switches restores them after)."""
    default_stage = OPS._norm_stage_limit(-1)
    default_w = OPS._norm_stage_weights(-1)
    default_split = OPS._norm_split_chunks(-1)
    for op in ("rms_norm_cat", "midlayer_cat", "fused_add_rms_norm") if "norm" in parts else ():
        for T, H in ((1, 4096), (8, 4096), (64, 4096), (1, 7168), (512, 4096), (4096, 4096), (16384, 4096),
                     (16384, 7168), (16384, 8192)):
            case = C.make_case(op, T, H, torch.bfloat16, "cuda")
            cat = op != "fused_add_rms_norm"
            # (name, stage limit, registers, split rows (0 never, 1 always, 2 by rows), weights
            # staged up to T rows, vectors per thread (0: by rows)); "row": one block per row
            variants = [("default", default_stage, 0, default_split, default_w, 0),
                        ("row v4", default_stage, 0, 0, 0, 4)]  # the first runs' setting
            if T <= 64:  # latency-bound
                variants += [("row+w v1", default_stage, 0, 0, default_w, 1), ("row+w v2", default_stage, 0, 0, default_w, 2),
                             ("registers v1", default_stage, 1, 0, 0, 1)]
                variants += [("split+w v2", default_stage, 0, 1, default_w, 2)] if cat else \
                    [("registers+w v1", default_stage, 1, 0, default_w, 1), ("registers+w v2", default_stage, 1, 0, default_w, 2)]
            else:
                variants += [("row v1", default_stage, 0, 0, 0, 1)]
                # H=7168 at v2: 448 threads, 4 blocks per SM where its 43 KB stage allows 5
                variants += [("row v3", default_stage, 0, 0, 0, 3)] if (T, H) == (16384, 7168) else []
                # fused_add_rms_norm trails torch.compile by 1-2% here (97-99% of the copy
                # bandwidth on both sides): the register kernel, Inductor's shape
                variants += [("registers v2", default_stage, 1, 0, 0, 2)] if not cat and T == 16384 else []
                variants += [("split v2", default_stage, 0, 1, 0, 2), ("split v4", default_stage, 0, 1, 0, 4)] \
                    if cat and T == 16384 else []
            measure(case, [(name, dict(norm_stage_limit=limit, norm_registers=regs, norm_split_chunks=split,
                                       norm_stage_weights=stage_w, norm_vecs_per_thread=vecs))
                           for name, limit, regs, split, stage_w, vecs in variants])
    # The staged norms' shared-memory carveout in large launches (_norm_carveout): by size
    # (the default: room in L1 for the norm weights) against the largest shared memory
    # ("c100", the launches before it) and a fixed 164 KB ("c71").
    for op, T, H in (("rms_norm_cat", 16384, 4096), ("rms_norm_cat", 16384, 7168), ("rms_norm_cat", 16384, 8192),
                     ("rms_norm_cat", 4096, 4096), ("midlayer_cat", 16384, 4096), ("midlayer_cat", 16384, 8192),
                     ("fused_add_rms_norm", 16384, 4096), ("fused_add_rms_norm", 16384, 8192),
                     ("fused_add_rms_norm", 4096, 4096)) if "carveout" in parts else ():
        measure(C.make_case(op, T, H, torch.bfloat16, "cuda"),
                [("default", {}), ("c100", dict(norm_carveout=100)), ("c71", dict(norm_carveout=71))])
    # The register kernels at large T (_norm_registers(1)), one instance per vectors per
    # thread since their arrays are sized by it (the bf16 fused_add_rms_norm kernel held 98
    # registers before, at 2 vectors per thread as at 4: 25% occupancy): 1, 2 and 4 vectors
    # per thread against the default (staged) kernels.
    for op, T, H in (("fused_add_rms_norm", 16384, 4096), ("fused_add_rms_norm", 16384, 8192),
                     ("fused_add_rms_norm", 4096, 4096), ("rms_norm_cat", 16384, 4096),
                     ("rms_norm_cat", 16384, 8192), ("midlayer_cat", 16384, 4096)) if "registers" in parts else ():
        measure(C.make_case(op, T, H, torch.bfloat16, "cuda"),
                [("default", {})] + [(f"registers v{v}", dict(norm_registers=1, norm_vecs_per_thread=v))
                                     for v in (1, 2, 4)])
    hopper = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
    # the wgmma kernel's newest paths -- its k range split over clusters, its statistics from
    # the tiles (the "prefill" part) -- unless gpu_check.sh's tests of the kernel failed (a
    # trap would end this process)
    split_k = hopper and not os.environ.get("EAGLE3_TUNE_NO_SPLIT_K")
    for H in (4096, 5120, 7168) if "fc" in parts else ():
        for T in (1, 2, 4, 8, 16, 32, 64):
            case = C.make_case(C.FC_OP, T, H, torch.bfloat16, "cuda", norm="chunk")
            # the defaults, the mma kernel at any grid with 16, 32 and 64 features per block
            # (64 declines T > 32), from T=8 the wgmma kernel with its k range split, and the pair
            variants = [("default", {})]
            if T >= 2:
                variants += [(f"mma f{f}", dict(fc_decode_max_tokens=0, fc_mma_max_tokens=64, fc_mma_max_waves=0,
                                                fc_mma_features=f)) for f in (16, 32, 64) if f < 64 or T <= 32]
            if T >= 8 and split_k:  # "sk": the statistics from the cluster, "sk pre": the pre-pass
                variants += [(f"wgmma-{bn} sk{' pre' if pre else ''}",
                              dict(fc_decode_max_tokens=0, fc_mma_max_tokens=0, fc_wgmma_min_tokens=1,
                                   fc_wgmma_tile_n=bn, fc_wgmma_split_k=0, fc_wgmma_tile_stats=0 if pre else 1))
                             for bn, pre in ((128, False), (256, False), (128, True))]
            measure(case, variants + [("norm_cat+cuBLAS", dict(fc_decode_max_tokens=0, fc_mma_max_tokens=0))])
    # The split-k mma.sync kernel (off by default, _fc_splitk_max_tokens): clusters by size,
    # of 2, 4 and 8 blocks, against the defaults and the pair (unless gpu_check.sh's tests
    # of the kernel failed: a trap would end this process).
    splitk = hopper and not os.environ.get("EAGLE3_TUNE_NO_MMA_SK")
    for H in (4096, 7168) if "splitk" in parts and splitk else ():
        for T in (1, 2, 8, 16, 32, 64):
            case = C.make_case(C.FC_OP, T, H, torch.bfloat16, "cuda", norm="chunk")
            sk = dict(fc_decode_max_tokens=0, fc_mma_max_tokens=0, fc_splitk_max_tokens=64)
            measure(case, [("default", {})] +
                    [(f"mma-sk {f'c{c}' if c else 'by size'}", dict(sk, fc_splitk_cluster=c)) for c in (0, 2, 4, 8)] +
                    [("norm_cat+cuBLAS", dict(fc_decode_max_tokens=0, fc_mma_max_tokens=0))])
    # The wgmma kernel's norm statistics at prefill sizes: the default (unsplit: the
    # pre-pass, "wgmma-256", "c2") against norm "shared" from the blocks' own tiles
    # ("tiles", _fc_wgmma_tile_stats(1)); norm "chunk" from a cluster of K = 3 blocks per
    # tile, one chunk each ("sk3").
    for H in (4096, 7168) if "prefill" in parts and split_k else ():
        for T in (2048, 16384):
            for norm in ("shared", "chunk"):
                case = C.make_case(C.FC_OP, T, H, torch.bfloat16, "cuda", norm=norm)
                wg = dict(fc_wgmma_min_tokens=1, fc_wgmma_tile_n=256)
                variants = [("wgmma-256", wg), ("wgmma-256 tiles", dict(wg, fc_wgmma_tile_stats=1))]
                if not os.environ.get("EAGLE3_TUNE_NO_CLUSTER"):
                    variants += [("wgmma-256 c2", dict(wg, fc_wgmma_cluster=2))]
                if norm == "chunk" and split_k:
                    variants += [("wgmma-256 sk3", dict(wg, fc_wgmma_split_k=3))]
                measure(case, variants + [("norm_cat+cuBLAS", {})])
    if "wgmma" not in parts or not hopper:
        return
    # The grid a threshold needs (the first H100 run had the kernel ahead only at H=4096,
    # T >= 2048): BN=128 up to T=1024 (BN=256 leaves SMs idle there), BN=256 above.
    for H in (4096, 5120, 7168, 8192):
        for T in (128, 1024, 2048, 4096, 8192, 16384):
            case = C.make_case(C.FC_OP, T, H, torch.bfloat16, "cuda", norm="chunk")
            # (name, min tokens, tile, blocks per cluster: 2 multicasts the weight tiles)
            tiles = (("wgmma-128", 1, 128, 1),) if T <= 1024 else (("wgmma-256", 1, 256, 1),)
            if T in (128, 2048, 16384) and H in (4096, 7168):
                tiles = (("wgmma-128", 1, 128, 1), ("wgmma-256", 1, 256, 1))  # both, as in the first run
            if not os.environ.get("EAGLE3_TUNE_NO_CLUSTER"):  # set by gpu_check.sh when its tests failed
                tiles += (("wgmma-128 c2", 1, 128, 2),) if T <= 1024 else (("wgmma-256 c2", 1, 256, 2),)
            variants = [(name, dict(fc_wgmma_min_tokens=min_tokens, fc_wgmma_tile_n=tile, fc_wgmma_cluster=cluster))
                        for name, min_tokens, tile, cluster in tiles + (("norm_cat+cuBLAS", 0, 0, 1),)]
            if T == 128 and split_k:  # the split k range: 2..4 blocks per tile at T=128
                variants[-1:-1] = [(f"wgmma-128 sk{' pre' if pre else ''}",
                                    dict(fc_wgmma_min_tokens=1, fc_wgmma_tile_n=128, fc_wgmma_split_k=0,
                                         fc_wgmma_tile_stats=0 if pre else 1)) for pre in (False, True)]
            measure(case, variants)

if __name__ == "__main__":
    main()
