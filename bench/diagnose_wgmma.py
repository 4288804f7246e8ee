"""Where the fc's wgmma kernel goes wrong, in one short run (Hopper only).

    python3 bench/diagnose_wgmma.py

bench/gpu_check.sh runs this when the wgmma tests fail. It feeds the kernel inputs made of
small integers (every product and sum exact in fp32 and bf16) and one-hot rows, so each
wrong output says which element it read instead:

* x one-hot (token t holds a 1 at k = t mod 64): out[t, :] is the weight's column k, so
  the column each token actually read gives the k order of the A operand (tokens);
* the weight one-hot (feature n holds a 1 at k = n mod 64): the k order of B (features);
* random integers: which reference row / column each output row / column equals gives
  the token and feature order (accumulator layout, tile origins, stores).

Each mapping prints "identity" or its first entries; then norm "chunk" and "shared" on a
correct GEMM isolate the scale logic (two chunks, and three, one per block of a split of
three). BN = 128 and 256, then BN = 128 with each tile's k range split over clusters of three
blocks (whose partial sums, exact for these integers, are added through distributed shared
memory), the norm statistics from a pre-pass and then from the cluster (where that
applies: three chunks for "chunk", any for "shared"; unsplit, "shared" takes them from
the block's tiles). Exit status 1 when anything is wrong.
"""

from __future__ import annotations

import sys

import torch

import eagle3_ops
from eagle3_ops import reference
from eagle3_ops.ops import kernel_switches

OPS = torch.ops.eagle3
DEV = "cuda"
BF = torch.bfloat16


def _run(xs, w, norm):
    out = eagle3_ops.rms_norm_cat_linear(xs, w, 1e-6, norm)
    torch.cuda.synchronize()
    path = OPS._fc_last_path()
    if path != "wgmma":
        raise SystemExit(f"diagnose_wgmma: the call took the {path!r} path, not the wgmma kernel")
    return out.float()


def _match(rows_out: torch.Tensor, rows_ref: torch.Tensor) -> list:
    """For each row of rows_out, the index of the equal row of rows_ref (-1: none)."""
    eq = (rows_out[:, None, :] == rows_ref[None, :, :]).all(-1)
    return [int(r.nonzero()[0]) if r.any() else -1 for r in eq]


def _report(name: str, mapping: list) -> bool:
    ok = mapping == list(range(len(mapping)))
    print(f"{name}: {'identity' if ok else mapping[:32]}")
    return ok


def diagnose(bn: int, split_k: int = 1, tile_stats: int = 1) -> bool:
    with kernel_switches(fc_wgmma_tile_n=bn, fc_wgmma_split_k=split_k, fc_wgmma_tile_stats=tile_stats):
        return _diagnose(bn, split_k, tile_stats)


def _diagnose(bn: int, split_k: int, tile_stats: int) -> bool:
    g = torch.Generator(device=DEV).manual_seed(0)
    ints = lambda *shape: torch.randint(-3, 4, shape, device=DEV, generator=g).to(BF)  # noqa: E731
    ok = True
    stats = "from the tiles where that applies" if tile_stats else "pre-pass"
    print(f"== BN = {bn}, k range split over {split_k} block(s) per tile, norm statistics {stats}")
    # A's k order: x one-hot
    T = N = 64
    x = torch.zeros(T, 64, device=DEV, dtype=BF)
    x[torch.arange(T), torch.arange(T) % 64] = 1
    w = ints(N, 64)
    out = _run([x], w, "none")
    ok &= _report("A (tokens) k order, token -> k read", _match(out, w.float().t()))
    # B's k order: weight one-hot
    xr = ints(T, 64)
    wo = torch.zeros(N, 64, device=DEV, dtype=BF)
    wo[torch.arange(N), torch.arange(N) % 64] = 1
    out = _run([xr], wo, "none")
    ok &= _report("B (features) k order, feature -> k read", _match(out.t(), xr.float().t()))
    # token / feature order over several tiles, two chunks, ragged edges
    T, N, widths = 300, 2 * bn + 8, [128, 64]
    xs = [ints(T, h) for h in widths]
    w = ints(N, sum(widths))
    ref = (torch.cat([x.float() for x in xs], -1) @ w.float().t()).to(BF).float()  # exact, then rounded once
    out = _run(xs, w, "none")
    exact = bool((out == ref).all())
    print(f"none, T={T} N={N} K=2: {'exact' if exact else f'{int((out != ref).sum())} of {out.numel()} wrong'}")
    if not exact:
        ok = False
        _report("token order, output row -> reference row", _match(out, ref))
        _report("feature order, output column -> reference column", _match(out.t(), ref.t()))
        bad = (out != ref).nonzero()
        print(f"first wrong (token, feature): {bad[:8].tolist()}; tokens mod 128 hit: "
              f"{sorted(set((bad[:, 0] % 128).tolist()))[:32]}; features mod {bn} hit: "
              f"{sorted(set((bad[:, 1] % bn).tolist()))[:32]}")
        return ok
    # the scales, on a GEMM known to be right
    for chunk_widths in (widths, [64] * 3):
        w = ints(N, sum(chunk_widths))
        for norm in ("chunk", "shared"):
            xs = [torch.randn(T, h, device=DEV, generator=g).to(BF) for h in chunk_widths]
            out = _run(xs, w, norm)
            ref64 = reference.rms_norm_cat_linear_fp64(xs, w, 1e-6, norm)
            err = ((out.double() - ref64).norm() / ref64.norm()).item()
            good = err < 2e-2
            ok &= good
            print(f"{norm}, widths {chunk_widths}: relative error {err:.3g} {'ok' if good else 'WRONG'}")
    return ok


def main() -> int:
    if torch.cuda.get_device_capability()[0] != 9:
        print("diagnose_wgmma: not a Hopper card")
        return 0
    with kernel_switches(fc_wgmma_min_tokens=1, fc_decode_max_tokens=0, fc_mma_max_tokens=0):
        # (a list: every configuration runs and prints, whatever the first ones found)
        ok = all([diagnose(128), diagnose(256), diagnose(128, 3, 0), diagnose(128, 3, 1)])
    print("diagnose_wgmma:", "all correct" if ok else "WRONG")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
