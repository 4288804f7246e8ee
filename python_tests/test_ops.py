"""Every op against its float64 truth (DESIGN.md section 4), on every device present.

Grids (STYLE.md point 7): dtype x T x widths x K x layouts (split views, padded views,
3-D, transposed) x shared_stats x norm-weight kinds. Small shapes take a full product;
the big shapes (T=2048, K*H=12288, the real fc) are targeted cases. Every call also
checks the output's shape / dtype / device / contiguity, that the inputs (and the
padding around views) are untouched, and that every output element was written (on
CUDA the op runs after the caching allocator was filled with NaN).
"""

from __future__ import annotations

import contextlib
import math
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import eagle3_ops
from eagle3_ops import reference
from eagle3_ops.ops import kernel_switches
from conftest import devices
from numerics import (
    DTYPE_IDS,
    LAYOUTS,
    PAIR_LAYOUTS,
    Rng,
    assert_all_written,
    assert_close_to_fp64,
    assert_no_alias,
    assert_output,
    assert_unchanged,
    lead_shape,
    make_chunks,
    make_pair,
    make_weights,
    nbytes,
    rel_err,
    run_poisoned,
    snapshot,
)

DTYPES = [pytest.param(d, id=i) for d, i in DTYPE_IDS.items()]
SMALL_T = [0, 1, 7, 83]
EPS = 1e-6

# Widths lists (K = their length): odd widths, 5120 + 8, non-multiples of 8, width 1.
WIDTHS = {
    "64": [64],
    "100x2": [100, 100],
    "769-64-100": [769, 64, 100],
    "5128-769": [5128, 769],
    "4096x3": [4096] * 3,
    "1-3-8-17-33": [1, 3, 8, 17, 33],
}
WIDTH_PARAMS = [pytest.param(w, id=k) for k, w in WIDTHS.items()]


# ---- runners --------------------------------------------------------------------------------


def check_rms_norm_cat(device, xs, bases, weights, eps, shared, lead, what=""):
    widths = [x.shape[-1] for x in xs]
    dtype = xs[0].dtype
    shape = (*lead, sum(widths))
    snap = snapshot(list(bases) + list(weights or []))
    out = run_poisoned(device, lambda: eagle3_ops.rms_norm_cat(xs, weights, eps, shared), [nbytes(shape, dtype)])
    assert_output(out, shape, dtype, device, what)
    assert_no_alias([out], bases)
    assert_unchanged(snap, "xs/weights")
    assert_all_written(out, what=what)
    ref64 = reference.rms_norm_cat_fp64(xs, weights, eps, shared)
    eager = reference.rms_norm_cat(xs, weights, eps, shared)
    assert_close_to_fp64(out, ref64, eager, what or "rms_norm_cat")
    return out


def check_fused_add(device, x, r, bases, weight, eps, what=""):
    dtype = x.dtype
    snap = snapshot(list(bases) + [weight])
    normed, summed = run_poisoned(device, lambda: eagle3_ops.fused_add_rms_norm(x, r, weight, eps),
                                  [nbytes(x.shape, dtype)] * 2)
    assert_output(normed, x.shape, dtype, device, "normed")
    assert_output(summed, x.shape, dtype, device, "residual_sum")
    assert_no_alias([normed, summed], bases)
    assert_unchanged(snap, "x/residual/weight")
    assert_all_written(normed, summed, what=what)
    n64, s64 = reference.fused_add_rms_norm_fp64(x, r, weight, eps)
    ne, se = reference.fused_add_rms_norm(x, r, weight, eps)
    assert_close_to_fp64(summed, s64, se, f"{what} residual_sum")
    assert_close_to_fp64(normed, n64, ne, f"{what} normed")
    return normed, summed


def tiles_one_matrix(xs) -> bool:
    """Whether the op sees xs (leading dimensions merged) as consecutive column ranges of one
    row-major matrix: views of one storage, each starting where the previous one's columns
    end, with one row stride of at least the total width (ops.cpp, adjacent_chunks)."""
    rows = []
    for x in xs:
        if x.shape[-1] > 1 and x.stride(-1) != 1:
            return False  # the op copies it
        try:
            rows.append(x.view(-1, x.shape[-1]))
        except RuntimeError:
            return False  # leading dimensions that do not merge: copied
    r0 = rows[0]
    n, total = r0.shape[0], sum(r.shape[1] for r in rows)
    if n > 1 and r0.stride(0) < total:
        return False
    off = 0
    for r in rows:
        if r.untyped_storage().data_ptr() != r0.untyped_storage().data_ptr():
            return False
        if (n > 1 and r.stride(0) != r0.stride(0)) or r.data_ptr() != r0.data_ptr() + off * r.element_size():
            return False
        off += r.shape[1]
    return True


def expected_fc_path(device, xs, norm, path) -> str:
    """The path a call asked to take `path` ("decode", "mma", "wgmma", "pair") takes: norm
    "none" over chunks that tile one matrix runs one GEMM on it ("gemm", with
    _fc_adjacent_gemm on) from two rows on, and at one row where no CUDA kernel takes it;
    otherwise `path` on CUDA, "pair" on the CPU."""
    cuda = torch.device(device).type == "cuda"
    rows = xs[0].numel() // max(xs[0].shape[-1], 1)
    if norm == "none" and torch.ops.eagle3._fc_adjacent_gemm(-1) == 1 and tiles_one_matrix(xs):
        if rows > 1 or not cuda or path == "pair":
            return "gemm"
    return path if cuda else "pair"


def check_linear(device, xs, bases, weight, eps, norm, lead, what="", path=None):
    """path: the CUDA path this call must take ("decode", "mma", "wgmma", "pair"), asserted
    through _fc_last_path, so a kernel under test cannot silently hand over to another
    path; the CPU kernels take "pair"; norm "none" over chunks that tile one matrix takes
    "gemm" (expected_fc_path)."""
    dtype = xs[0].dtype
    shape = (*lead, weight.shape[0])
    snap = snapshot(list(bases) + [weight])
    out = run_poisoned(device, lambda: eagle3_ops.rms_norm_cat_linear(xs, weight, eps, norm), [nbytes(shape, dtype)])
    if path is not None:
        expected = expected_fc_path(device, xs, norm, path)
        assert torch.ops.eagle3._fc_last_path() == expected, (torch.ops.eagle3._fc_last_path(), expected)
    assert_output(out, shape, dtype, device, what)
    assert_no_alias([out], bases)
    assert_unchanged(snap, "xs/weight")
    assert_all_written(out, what=what)
    ref64 = reference.rms_norm_cat_linear_fp64(xs, weight, eps, norm)
    eager = reference.rms_norm_cat_linear(xs, weight, eps, norm)
    assert_close_to_fp64(out, ref64, eager, what or f"rms_norm_cat_linear[{norm}]")
    return out


def check_real_fc(device, seed, T, H, norm, path, N=None):
    """The real fc: K = 3 chunks of width H (split views of one [T, 3H] bf16 tensor) into
    N features (default H), through the given CUDA path."""
    rng = Rng(seed, device)
    xs, bases = make_chunks(rng, "split", T, [H] * 3, torch.bfloat16)
    w = rng.linear_weight(N or H, 3 * H, torch.bfloat16)
    check_linear(device, xs, bases, w, EPS, norm, (T,), path=path)


# ---- rms_norm_cat ---------------------------------------------------------------------------


def _grid_params():
    """dtype x T x widths x layout x shared_stats, all of it except the slowest corner
    (T = 83 with K*H > 5000 in the copied / 3-D layouts: 2T rows of up to 12288 columns,
    covered by the split and mixed layouts here and by the T = 2048 cases below)."""
    out = []
    for dt, dt_id in DTYPE_IDS.items():
        for T in SMALL_T:
            for wid, w in WIDTHS.items():
                for layout in LAYOUTS:
                    if T == 83 and sum(w) > 5000 and layout not in ("split", "mixed"):
                        continue
                    for shared in (False, True):
                        out.append(pytest.param(dt, T, w, layout, shared,
                                                id=f"{dt_id}-T{T}-{wid}-{layout}-{'shared' if shared else 'chunk'}"))
    return out


@pytest.mark.parametrize("dtype,T,widths,layout,shared", _grid_params())
def test_rms_norm_cat_grid(device, seed, dtype, T, widths, layout, shared):
    rng = Rng(seed, device)
    xs, bases = make_chunks(rng, layout, T, widths, dtype)
    weights = make_weights(rng, "same", widths, dtype)
    check_rms_norm_cat(device, xs, bases, weights, EPS, shared, lead_shape(layout, T))


@pytest.mark.parametrize("shared", [False, True], ids=["chunk", "shared"])
@pytest.mark.parametrize("wkind", ["none", "nones", "same", "fp32", "strided", "mixed"])
@pytest.mark.parametrize("widths", WIDTH_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_cat_weight_kinds(device, seed, dtype, widths, wkind, shared):
    rng = Rng(seed, device)
    xs, bases = make_chunks(rng, "split", 7, widths, dtype)
    weights = make_weights(rng, wkind, widths, dtype)
    check_rms_norm_cat(device, xs, bases, weights, EPS, shared, (7,))


@pytest.mark.parametrize(
    "dtype,widths,shared,wkind",
    [
        pytest.param(torch.bfloat16, [4096] * 3, False, "same", id="bf16-4096x3-chunk-same"),
        pytest.param(torch.float16, [4096] * 3, True, "fp32", id="fp16-4096x3-shared-fp32"),
        pytest.param(torch.float32, [4096] * 3, False, "none", id="fp32-4096x3-chunk-none"),
        pytest.param(torch.bfloat16, [5128, 769], True, "mixed", id="bf16-5128-769-shared-mixed"),
        pytest.param(torch.float16, [5128, 769], False, "same", id="fp16-5128-769-chunk-same"),
        pytest.param(torch.float32, [5128, 769], True, "fp32", id="fp32-5128-769-shared-fp32"),
        # the midlayer's [T, 2H] qkv input
        pytest.param(torch.bfloat16, [4096, 4096], False, "same", id="bf16-4096x2-chunk-same"),
    ],
)
def test_rms_norm_cat_large(device, seed, dtype, widths, shared, wkind):
    T = 2048
    rng = Rng(seed, device)
    xs, bases = make_chunks(rng, "split", T, widths, dtype)
    weights = make_weights(rng, wkind, widths, dtype)
    check_rms_norm_cat(device, xs, bases, weights, EPS, shared, (T,))


@pytest.mark.parametrize("eps", [1e-6, 1e-5, 0.1, 1.0])
@pytest.mark.parametrize("shared", [False, True], ids=["chunk", "shared"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_cat_eps(device, seed, dtype, shared, eps):
    # Inputs of small magnitude so that a large eps changes the result a lot: a kernel
    # that ignores or misplaces eps fails.
    rng = Rng(seed, device)
    widths = [769, 100]
    xs, bases = make_chunks(rng, "split", 9, widths, dtype)
    xs = [(x.float() * 0.05).to(dtype) for x in xs]
    weights = make_weights(rng, "same", widths, dtype)
    out = check_rms_norm_cat(device, xs, xs, weights, eps, shared, (9,))
    if eps >= 0.1:
        no_eps = reference.rms_norm_cat_fp64(xs, weights, 1e-12, shared)
        assert rel_err(out, no_eps) > 0.1, "eps appears to have no effect"


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_cat_matches_separate_norms(device, seed, dtype):
    # shared_stats=False must equal K independent RMSNorms; shared_stats=True one norm of the cat.
    rng = Rng(seed, device)
    widths = [64, 100, 769]
    xs, _ = make_chunks(rng, "contig", 5, widths, dtype)
    ws = make_weights(rng, "same", widths, dtype)
    per = eagle3_ops.rms_norm_cat(xs, ws, EPS, False)
    sh = eagle3_ops.rms_norm_cat(xs, ws, EPS, True)
    for k, (a, b) in enumerate(zip(per.split(widths, -1), sh.split(widths, -1))):
        one = eagle3_ops.rms_norm_cat([xs[k]], [ws[k]], EPS, False)
        tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
        torch.testing.assert_close(a, one, rtol=tol, atol=tol,
                                   msg=lambda m: f"chunk {k} of the K-input op differs from the 1-input op: {m}")
    whole = torch.cat(xs, -1)
    one_shared = eagle3_ops.rms_norm_cat([whole], [torch.cat(ws)], EPS, False)
    assert rel_err(sh, one_shared.double()) < (1e-6 if dtype == torch.float32 else 1e-2)
    # and shared really differs from per-chunk on these inputs (own row scales per chunk)
    assert rel_err(per, sh.double()) > 0.05


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_cat_t0_shapes(device, dtype):
    for lead in [(0,), (0, 3), (3, 0), (2, 0, 4)]:
        xs = [torch.randn((*lead, h), device=device).to(dtype) for h in (5, 7)]
        out = eagle3_ops.rms_norm_cat(xs, None, EPS)
        assert_output(out, (*lead, 12), dtype, device)
        out = eagle3_ops.rms_norm_cat_linear(xs, torch.randn(3, 12, device=device).to(dtype), EPS, "chunk")
        assert_output(out, (*lead, 3), dtype, device)
        n, s = eagle3_ops.fused_add_rms_norm(xs[0], xs[0].clone(), None, EPS)
        assert_output(n, (*lead, 5), dtype, device)
        assert_output(s, (*lead, 5), dtype, device)


def test_rms_norm_cat_accepts_tuple_and_1d(device, seed):
    rng = Rng(seed, device)
    a, b = rng.randn((64,)), rng.randn((100,))
    out = eagle3_ops.rms_norm_cat((a, b), (None, None), EPS)
    assert_output(out, (164,), torch.float32, device)
    assert_close_to_fp64(out, reference.rms_norm_cat_fp64([a, b], None, EPS), None)


def test_rms_norm_cat_expanded_rows(device, seed):
    # a stride-0 leading dimension (one row broadcast to T rows) is a legal view
    rng = Rng(seed, device)
    xs = [rng.randn((1, h)).expand(6, h) for h in (64, 100)]
    check_rms_norm_cat(device, xs, xs, None, EPS, False, (6,))


# ---- fused_add_rms_norm ---------------------------------------------------------------------

H_LIST = [1, 64, 100, 769, 4096, 5128]


@pytest.mark.parametrize("layout", PAIR_LAYOUTS)
@pytest.mark.parametrize("H", [1, 100, 769, 5128])
@pytest.mark.parametrize("T", SMALL_T)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm_grid(device, seed, dtype, T, H, layout):
    rng = Rng(seed, device)
    x, r, bases = make_pair(rng, layout, T, H, dtype)
    w = rng.norm_weight(H, dtype)
    check_fused_add(device, x, r, bases, w, EPS)


@pytest.mark.parametrize("wkind", ["none", "same", "fp32", "strided"])
@pytest.mark.parametrize("H", H_LIST)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm_weight_kinds(device, seed, dtype, H, wkind):
    rng = Rng(seed, device)
    x, r, bases = make_pair(rng, "contig", 7, H, dtype)
    w = {
        "none": None,
        "same": lambda: rng.norm_weight(H, dtype),
        "fp32": lambda: rng.norm_weight(H, torch.float32),
        "strided": lambda: rng.norm_weight(2 * H, torch.float32)[::2],
    }[wkind]
    w = w() if callable(w) else w
    check_fused_add(device, x, r, bases, w, EPS)


@pytest.mark.parametrize("H", [4096, 5128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm_large(device, seed, dtype, H):
    rng = Rng(seed, device)
    x, r, bases = make_pair(rng, "contig", 2048, H, dtype)
    check_fused_add(device, x, r, bases, rng.norm_weight(H, dtype), EPS)


@pytest.mark.parametrize("eps", [1e-5, 0.5])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm_eps(device, seed, dtype, eps):
    rng = Rng(seed, device)
    x, r, _ = make_pair(rng, "contig", 5, 769, dtype)
    x, r = (x.float() * 0.05).to(dtype), (r.float() * 0.05).to(dtype)
    normed, _ = check_fused_add(device, x, r, [x, r], None, eps)
    if eps >= 0.1:
        assert rel_err(normed, reference.fused_add_rms_norm_fp64(x, r, None, 1e-12)[0]) > 0.1


# ---- rms_norm_cat_linear --------------------------------------------------------------------

LIN_WIDTHS = {
    "K1-64": [64],
    "K2-100-769": [100, 769],
    "K3-769-64-100": [769, 64, 100],
    "K5-1-3-8-17-33": [1, 3, 8, 17, 33],
}
NORMS = ["none", "chunk", "shared"]


@pytest.mark.parametrize("N", [1, 17, 256])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("widths", [pytest.param(w, id=k) for k, w in LIN_WIDTHS.items()])
@pytest.mark.parametrize("T", SMALL_T)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_cat_linear_grid(device, seed, dtype, T, widths, norm, N):
    rng = Rng(seed, device)
    xs, bases = make_chunks(rng, "split", T, widths, dtype)
    w = rng.linear_weight(N, sum(widths), dtype)
    check_linear(device, xs, bases, w, EPS, norm, (T,))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_cat_linear_layouts(device, seed, dtype, norm, layout):
    rng = Rng(seed, device)
    widths = [769, 100, 64]
    xs, bases = make_chunks(rng, layout, 7, widths, dtype)
    w = rng.linear_weight(17, sum(widths), dtype)
    check_linear(device, xs, bases, w, EPS, norm, lead_shape(layout, 7))


def test_rms_norm_cat_linear_strided_weight(device, seed):
    # a transposed (column-major) fc weight is legal
    rng = Rng(seed, device)
    xs, bases = make_chunks(rng, "split", 9, [100, 64], torch.bfloat16)
    w = rng.linear_weight(33, 164, torch.bfloat16).t().contiguous().t()
    check_linear(device, xs, bases, w, EPS, "chunk", (9,))


@pytest.mark.parametrize(
    "dtype,T,N,norm",
    [
        (torch.bfloat16, 2048, 17, "chunk"),
        (torch.float16, 2048, 17, "shared"),
        (torch.float32, 2048, 17, "none"),
        (torch.bfloat16, 4, 4096, "chunk"),   # decode: the real K=3, H=4096 fc, a weight stream
        (torch.bfloat16, 4, 4096, "shared"),
        (torch.float16, 64, 4096, "chunk"),
        (torch.bfloat16, 256, 256, "chunk"),
    ],
    ids=lambda v: DTYPE_IDS.get(v) if isinstance(v, torch.dtype) else None,
)
def test_rms_norm_cat_linear_large(device, seed, dtype, T, N, norm):
    rng = Rng(seed, device)
    widths = [4096] * 3
    xs, bases = make_chunks(rng, "split", T, widths, dtype)
    w = rng.linear_weight(N, sum(widths), dtype)
    check_linear(device, xs, bases, w, EPS, norm, (T,))


# Chunks for the norm-"none" GEMM shortcut: (layout, whether they tile one matrix).
ADJACENT_CASES = {"split": True, "3d": True, "padded-base": True, "reversed": False, "gap": False,
                  "separate": False, "overlapping-rows": False}


def adjacent_case(rng, case, T, widths, dtype):
    """(xs, bases, lead) for ADJACENT_CASES."""
    total = sum(widths)
    if case in ("split", "separate"):
        xs, bases = make_chunks(rng, "split" if case == "split" else "contig", T, widths, dtype)
        return xs, bases, (T,)
    if case == "3d":
        xs, bases = make_chunks(rng, "3d", T, widths, dtype)
        return xs, bases, (2, T)
    if case == "padded-base":  # a column slice of a wider tensor: row stride total + 24
        big = rng.randn((T, total + 40), dtype)
        return list(torch.split(big[:, 16:16 + total], widths, dim=-1)), [big], (T,)
    if case == "reversed":  # the chunks of one tensor, passed in the other order
        big = rng.randn((T, total), dtype)
        parts = list(torch.split(big, widths[::-1], dim=-1))
        return parts[::-1], [big], (T,)
    if case == "gap":  # 8 unused columns between the chunks
        big = rng.randn((T, total + 8 * len(widths)), dtype)
        xs, off = [], 0
        for h in widths:
            xs.append(big[:, off:off + h])
            off += h + 8
        return xs, [big], (T,)
    # overlapping-rows: a row stride smaller than the total width (rows share columns)
    flat = rng.randn((T * 64 + total,), dtype)
    base = flat.as_strided((T, total), (64, 1))
    return list(torch.split(base, widths, dim=-1)), [flat], (T,)


@pytest.mark.parametrize("switch", [1, 0], ids=["on", "off"])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("case", list(ADJACENT_CASES))
@pytest.mark.parametrize("T", [1, 2, 65])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_cat_linear_adjacent_gemm(device, seed, dtype, T, case, norm, switch):
    """Norm "none" over chunks that are consecutive column ranges of one row-major matrix is
    one GEMM on that matrix ("gemm": F.linear's own call, nothing copied), also under a
    padded row stride and mergeable leading dimensions; from two rows on ahead of the CUDA
    kernels, at one row after them (the decode kernel takes it where it can). Chunks out of
    order, with gaps, in separate tensors or with overlapping rows, the per-chunk and shared
    norms, and the switch at 0 take the other paths; every result matches the reference."""
    rng = Rng(seed, device)
    widths = [64, 128, 64]
    xs, bases, lead = adjacent_case(rng, case, T, widths, dtype)
    adjacent = ADJACENT_CASES[case] or (case == "overlapping-rows" and T == 1)  # (one row overlaps nothing)
    assert tiles_one_matrix(xs) == adjacent, case
    w = rng.linear_weight(40, sum(widths), dtype)
    with kernel_switches(fc_adjacent_gemm=switch):
        check_linear(device, xs, bases, w, EPS, norm, lead)
        got = torch.ops.eagle3._fc_last_path()
    rows = xs[0].numel() // xs[0].shape[-1]
    cuda = torch.device(device).type == "cuda"
    if switch and norm == "none" and adjacent:
        # at one row the CUDA decode / mma kernels go first (bf16 / fp16 / fp32 aligned rows)
        assert got == "gemm" or (cuda and rows == 1 and got in ("decode", "mma")), got
    else:
        assert got != "gemm" and (cuda or got == "pair"), got


@pytest.fixture
def decode_up_to_8():
    """Route T <= 8 through the fc's CUDA decode kernel (by default it serves T = 1 only),
    norm "none" on views of one tensor too (_fc_adjacent_gemm off); restores the previous
    settings. On the CPU build only the latter applies."""
    with kernel_switches(fc_decode_max_tokens=8, fc_adjacent_gemm=0):
        assert torch.ops.eagle3._fc_decode_max_tokens(-1) == 8
        yield


DECODE_WIDTHS = {"K1-64": [64], "K2-128-256": [128, 256], "K3-1024": [1024] * 3, "K5-8": [8] * 5}


@pytest.mark.parametrize("N", [1, 40])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("widths", [pytest.param(w, id=k) for k, w in DECODE_WIDTHS.items()])
@pytest.mark.parametrize("T", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_cat_linear_decode(device, seed, decode_up_to_8, dtype, T, widths, norm, N):
    """Decode sizes (T <= 8) with aligned widths and a contiguous weight: the shapes the
    CUDA decode kernel takes (T = 1 by default, up to 8 here)."""
    rng = Rng(seed, device)
    xs, bases = make_chunks(rng, "split" if T % 2 else "contig", T, widths, dtype)
    w = rng.linear_weight(N, sum(widths), dtype)
    check_linear(device, xs, bases, w, EPS, norm, (T,), path="decode")


@pytest.mark.parametrize("norm", ["chunk", "shared"])
@pytest.mark.parametrize("N", [4096, 4103])
@pytest.mark.parametrize("T", [1, 4, 8])
def test_rms_norm_cat_linear_decode_real_fc(device, seed, decode_up_to_8, T, N, norm):
    """The real fc (K = 3, H = 4096, bf16) at decode sizes, N = 4096 and a ragged N."""
    check_real_fc(device, seed, T, 4096, norm, "decode", N=N)


# ---- fold_norm_weights and the identity rms_norm_cat_linear rests on ------------------------


@pytest.mark.parametrize("gkind", ["same", "fp32"])
@pytest.mark.parametrize("widths", [pytest.param(w, id=k) for k, w in LIN_WIDTHS.items()])
@pytest.mark.parametrize("T", [1, 7, 83])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fold_identity_fc_norm(device, seed, dtype, T, widths, gkind):
    """rms_norm_cat_linear(xs, fold(W, g), 'chunk') == fc(rms_norm_cat(xs, g)) (fc_norm)."""
    rng = Rng(seed, device)
    xs, _ = make_chunks(rng, "split", T, widths, dtype)
    g = make_weights(rng, gkind, widths, dtype)
    W = rng.linear_weight(37, sum(widths), dtype)
    out = eagle3_ops.rms_norm_cat_linear(xs, eagle3_ops.fold_norm_weights(W, g), EPS, "chunk")
    eager = F.linear(reference.rms_norm_cat(xs, g, EPS), W)
    truth = reference.rms_norm_cat_fp64(xs, g, EPS) @ W.double().t()
    assert_output(out, (T, 37), dtype, device)
    assert_close_to_fp64(out, truth, eager, "fold identity (chunk)")
    # and the fused op with the folded weight against the unfused op + F.linear, in fp32
    if dtype == torch.float32:
        unfused = F.linear(eagle3_ops.rms_norm_cat(xs, g, EPS), W)
        assert rel_err(out, unfused.double()) < 1e-5


@pytest.mark.parametrize("T", [1, 7, 83])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fold_identity_norm_before_fc(device, seed, dtype, T):
    """One shared weight over the whole row (norm_before_fc): fold(W, g) with norm 'shared'."""
    rng = Rng(seed, device)
    widths = [769, 100, 64]
    xs, _ = make_chunks(rng, "split", T, widths, dtype)
    g = rng.norm_weight(sum(widths), dtype)
    W = rng.linear_weight(29, sum(widths), dtype)
    out = eagle3_ops.rms_norm_cat_linear(xs, eagle3_ops.fold_norm_weights(W, g), EPS, "shared")
    eager = F.linear(reference.rms_norm(torch.cat(xs, -1), g, EPS), W)
    truth = reference.rms_norm_cat_fp64([torch.cat(xs, -1)], [g], EPS) @ W.double().t()
    assert_close_to_fp64(out, truth, eager, "fold identity (shared)")
    # the per-chunk weights of the same g give the same folded weight
    assert torch.equal(eagle3_ops.fold_norm_weights(W, g),
                       eagle3_ops.fold_norm_weights(W, list(g.split(widths))))


@pytest.mark.parametrize("gdtype", [torch.float32, torch.bfloat16, torch.float16], ids=["g32", "gbf16", "gfp16"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fold_norm_weights_exact(device, seed, dtype, gdtype):
    """Folded in float64, cast once; a copy, inputs untouched; None -> a copy of W."""
    rng = Rng(seed, device)
    widths = [769, 100, 64]
    W = rng.linear_weight(13, sum(widths), dtype)
    gs = [rng.norm_weight(h, gdtype) for h in widths]
    snap = snapshot([W, *gs])
    folded = eagle3_ops.fold_norm_weights(W, gs)
    assert_output(folded, W.shape, dtype, device)
    expect = (W.double() * torch.cat([g.double() for g in gs])).to(dtype)
    assert torch.equal(folded, expect)
    single = eagle3_ops.fold_norm_weights(W, torch.cat(gs))
    assert torch.equal(single, expect)
    assert_unchanged(snap, "W/g")
    copy = eagle3_ops.fold_norm_weights(W, None)
    assert torch.equal(copy, W) and copy.data_ptr() != W.data_ptr()
    # a strided W works too
    Wt = W.t().contiguous().t()
    assert torch.equal(eagle3_ops.fold_norm_weights(Wt, gs), expect)


# ---- property tests -------------------------------------------------------------------------

_DT = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])


@st.composite
def chunk_inputs(draw, device):
    """K, widths, T, dtype, and per chunk a view with a random column offset / row
    padding (or a transposed tensor); optionally a 3-D leading shape."""
    K = draw(st.integers(1, 5))
    widths = draw(st.lists(st.integers(1, 300), min_size=K, max_size=K))
    T = draw(st.integers(0, 40))
    dtype = draw(_DT)
    three_d = draw(st.booleans()) and T > 0
    rng = Rng(draw(st.integers(0, 2**31 - 1)), device)
    xs, bases = [], []
    for h in widths:
        kind = draw(st.sampled_from(["offset", "transposed", "contig"]))
        if kind == "offset":
            off, pad = draw(st.integers(0, 7)), draw(st.integers(0, 9))
            b = rng.randn((T, off + h + pad), dtype)
            x = b[:, off:off + h]
        elif kind == "transposed":
            b = rng.randn((T, h), dtype).t().contiguous()
            x = b.t()
        else:
            b = x = rng.randn((T, h), dtype)
        if three_d:
            x = x.unflatten(0, (1, T)) if T % 2 else x.unflatten(0, (2, T // 2))
        xs.append(x)
        bases.append(b)
    return rng, xs, bases, dtype


@pytest.mark.parametrize("device", devices)
@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_rms_norm_cat_property(device, data):
    rng, xs, bases, dtype = data.draw(chunk_inputs(device))
    shared = data.draw(st.booleans())
    kinds = data.draw(st.lists(st.sampled_from([None, "same", "fp32"]), min_size=len(xs), max_size=len(xs)))
    weights = [None if k is None else rng.norm_weight(x.shape[-1], dtype if k == "same" else torch.float32)
               for k, x in zip(kinds, xs)]
    eps = data.draw(st.sampled_from([1e-6, 1e-5, 1e-3]))
    check_rms_norm_cat(device, xs, bases, weights, eps, shared, tuple(xs[0].shape[:-1]))


@pytest.mark.parametrize("device", devices)
@settings(max_examples=20, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_rms_norm_cat_linear_property(device, data):
    rng, xs, bases, dtype = data.draw(chunk_inputs(device))
    norm = data.draw(st.sampled_from(NORMS))
    N = data.draw(st.integers(1, 70))
    w = rng.linear_weight(N, sum(x.shape[-1] for x in xs), dtype)
    check_linear(device, xs, bases, w, EPS, norm, tuple(xs[0].shape[:-1]))


@pytest.mark.parametrize("device", devices)
@settings(max_examples=20, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fused_add_rms_norm_property(device, data):
    dtype = data.draw(_DT)
    T, H = data.draw(st.integers(0, 40)), data.draw(st.integers(1, 600))
    rng = Rng(data.draw(st.integers(0, 2**31 - 1)), device)
    layout = data.draw(st.sampled_from(PAIR_LAYOUTS))
    x, r, bases = make_pair(rng, layout, T, H, dtype)
    wk = data.draw(st.sampled_from([None, "same", "fp32"]))
    w = None if wk is None else rng.norm_weight(H, dtype if wk == "same" else torch.float32)
    check_fused_add(device, x, r, bases, w, EPS)


# ---- the checks themselves can fail ---------------------------------------------------------


def test_numerics_rule_rejects_bad_outputs(seed):
    """Guards against a tautological rule: a NaN, one wrong element, a wrong row
    statistic and a double rounding all fail it."""
    rng = Rng(seed)
    xs, _ = make_chunks(rng, "split", 83, [769, 100], torch.bfloat16)
    ws = make_weights(rng, "same", [769, 100], torch.bfloat16)
    ref64 = reference.rms_norm_cat_fp64(xs, ws, EPS)
    eager = reference.rms_norm_cat(xs, ws, EPS)
    good = eagle3_ops.rms_norm_cat(xs, ws, EPS)
    assert_close_to_fp64(good, ref64, eager)
    bad = []
    b = good.clone(); b[41, 768] = float("nan"); bad.append(b)
    b = good.clone(); b[82, 868] = 0; bad.append(b)                       # last element of the last chunk not written
    b = good.clone(); b[5] = good[6]; bad.append(b)                       # a row from the wrong row
    bad.append(reference.rms_norm_cat(xs, ws, EPS, shared_stats=True))    # wrong statistic
    bad.append((good.float() * (1 + 2 ** -7)).to(torch.bfloat16))         # a 1-ulp-scale bias on every element
    for i, b in enumerate(bad):
        with pytest.raises(AssertionError):
            assert_close_to_fp64(b, ref64, eager, f"bad[{i}]")
    with pytest.raises(AssertionError):
        assert_all_written(bad[0])
    xs32 = [x.float() for x in xs]
    ws32 = [w.float() for w in ws]
    f32 = eagle3_ops.rms_norm_cat(xs32, ws32, EPS)
    ref32 = reference.rms_norm_cat_fp64(xs32, ws32, EPS)
    assert_close_to_fp64(f32, ref32, None)
    with pytest.raises(AssertionError):  # bf16 accuracy is not fp32 accuracy
        assert_close_to_fp64(f32.bfloat16().float(), ref32, None)
    assert math.isclose(rel_err(ref64, ref64), 0.0)


# ---- the CUDA norm kernels' second strategy: rows read twice from global memory ------------


@pytest.fixture
def two_pass_norms():
    """Every row of the CUDA norm kernels read twice from global memory (no shared-memory
    stage), restored afterwards."""
    with kernel_switches(norm_stage_limit=0):
        yield


@pytest.mark.parametrize("shared", [False, True], ids=["chunk", "shared"])
@pytest.mark.parametrize("layout", ["split", "contig"])
@pytest.mark.parametrize("widths", [[4096, 4096, 4096], [769, 100, 64]], ids=["3x4096", "odd"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_cat_two_pass(device, seed, two_pass_norms, dtype, widths, layout, shared):
    rng = Rng(seed, device)
    xs, bases = make_chunks(rng, layout, 83, widths, dtype)
    weights = make_weights(rng, "mixed", widths, dtype)
    check_rms_norm_cat(device, xs, bases, weights, EPS, shared, lead_shape(layout, 83))


@pytest.mark.parametrize("H", [4096, 769])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm_two_pass(device, seed, two_pass_norms, dtype, H):
    rng = Rng(seed, device)
    x, r, bases = make_pair(rng, "contig", 83, H, dtype)
    check_fused_add(device, x, r, bases, rng.norm_weight(H, torch.float32), EPS)


# ---- the CUDA norm kernels' third strategy: rows kept in registers -------------------------


@pytest.fixture
def register_norms():
    """The register-resident CUDA norm kernels switched on (rows that do not qualify -- a
    chunk without 16-byte accesses, more than 4 chunks, a chunk wider than 2048 vectors,
    1024 with 4 chunks -- take the default kernels), restored afterwards."""
    with kernel_switches(norm_registers=1):
        assert torch.ops.eagle3._norm_registers(-1) == 1
        yield


@pytest.mark.parametrize("shared", [False, True], ids=["chunk", "shared"])
@pytest.mark.parametrize("layout", ["split", "contig"])
@pytest.mark.parametrize("widths", [[4096, 4096, 4096], [7168, 7168], [8192], [256, 512, 64, 1024],
                                    [16384, 8], [768, 8, 8, 8, 8], [769, 100, 64]],
                         ids=["3x4096", "2x7168", "8192", "4mixed", "wide", "5chunks", "odd"])
@pytest.mark.parametrize("T", [37, 65])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_cat_registers(device, seed, register_norms, dtype, T, widths, layout, shared):
    """T=37: blocks sized for one vector per thread, T=65 for two: the kernel's instances
    for 1 and 2 vectors per thread (for 4 where the block bound leaves no smaller one)."""
    rng = Rng(seed, device)
    xs, bases = make_chunks(rng, layout, T, widths, dtype)
    weights = make_weights(rng, "mixed", widths, dtype)
    check_rms_norm_cat(device, xs, bases, weights, EPS, shared, lead_shape(layout, T))


@pytest.mark.parametrize("H", [4096, 7168, 16384, 769])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm_registers(device, seed, register_norms, dtype, H):
    rng = Rng(seed, device)
    x, r, bases = make_pair(rng, "contig", 37, H, dtype)
    check_fused_add(device, x, r, bases, rng.norm_weight(H, torch.float32), EPS)


@pytest.mark.parametrize("stage_w", [64, 0], ids=["w-with-row", "w-after"])
@pytest.mark.parametrize("wdtype", ["same", "fp32", "none"])
@pytest.mark.parametrize("T", [1, 64, 65])
@pytest.mark.parametrize("H", [4096, 7168, 16384, 769])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm_registers_weights(device, seed, register_norms, dtype, H, T, wdtype, stage_w):
    """The register kernel loads the norm weight (x's dtype or fp32) with the row in launches
    of up to _norm_stage_weights rows ("+w" in the plan), after the reduction in larger ones
    or with the switch at 0; rows the kernel does not hold (769: no 16-byte accesses; fp32
    at 16384: 4096 vectors, past 4 per thread x 512) take the other kernels."""
    rng = Rng(seed, device)
    x, r, bases = make_pair(rng, "contig", T, H, dtype)
    w = None if wdtype == "none" else rng.norm_weight(H, dtype if wdtype == "same" else torch.float32)
    with kernel_switches(norm_stage_weights=stage_w):
        check_fused_add(device, x, r, bases, w, EPS)
        plan = torch.ops.eagle3._norm_last_plan()
    if torch.device(device).type == "cuda":
        regs = H != 769 and H * dtype.itemsize <= 2048 * 16
        assert plan.startswith("registers") == regs, plan
        assert ("+w" in plan) == (regs and wdtype != "none" and T <= stage_w), plan


# ---- rms_norm_cat with one block per (row, chunk) -------------------------------------------


@pytest.fixture
def split_norms():
    """rms_norm_cat on CUDA with one block per (row, chunk) where the norm is per chunk
    ("shared" rows keep one block per row), restored afterwards."""
    with kernel_switches(norm_split_chunks=1):
        assert torch.ops.eagle3._norm_split_chunks(-1) == 1
        yield


@pytest.mark.parametrize("stage", ["staged", "two-pass"])
@pytest.mark.parametrize("shared", [False, True], ids=["chunk", "shared"])
@pytest.mark.parametrize("layout", ["split", "contig", "padded"])
@pytest.mark.parametrize("widths", [[4096, 4096, 4096], [8192, 8192, 8192], [769, 100, 64], [1, 3, 8, 17, 33]],
                         ids=["3x4096", "3x8192", "odd", "5chunks"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_cat_split_chunks(device, seed, split_norms, dtype, widths, layout, shared, stage):
    rng = Rng(seed, device)
    xs, bases = make_chunks(rng, layout, 29, widths, dtype)
    weights = make_weights(rng, "mixed", widths, dtype)
    with kernel_switches(norm_stage_limit=0) if stage == "two-pass" else contextlib.nullcontext():
        check_rms_norm_cat(device, xs, bases, weights, EPS, shared, lead_shape(layout, 29))


@pytest.mark.parametrize("norm", ["none", "chunk", "shared"])
def test_rms_norm_cat_linear_pair_split_chunks(device, seed, split_norms, norm):
    """The fc's pair path normalises through the same kernel (without weights)."""
    rng = Rng(seed, device)
    xs, bases = make_chunks(rng, "split", 300, [4096, 768, 64], torch.bfloat16)
    check_linear(device, xs, bases, rng.linear_weight(96, 4928, torch.bfloat16), EPS, norm, (300,), path="pair")


# ---- the staged norm kernels with the norm weights staged too (small T) ---------------------


@pytest.fixture
def staged_weights():
    """The staged CUDA norm kernels copy the norm weights into shared memory with the row
    for launches of up to 1024 rows (chunks without 16-byte accesses read them from global
    memory as before), restored afterwards."""
    with kernel_switches(norm_stage_weights=1024):
        assert torch.ops.eagle3._norm_stage_weights(-1) == 1024
        yield


@pytest.mark.parametrize("T", [1, 83])
@pytest.mark.parametrize("split", [0, 1], ids=["row", "split"])
@pytest.mark.parametrize("kind", ["same", "fp32", "mixed", "strided"])
@pytest.mark.parametrize("shared", [False, True], ids=["chunk", "shared"])
@pytest.mark.parametrize("layout", ["split", "contig"])
@pytest.mark.parametrize("widths", [[4096, 4096, 4096], [4096, 100, 64], [1, 3, 8, 17, 33], [8192, 64], [7168] * 3],
                         ids=["3x4096", "4096+odd", "5chunks", "8192+64", "3x7168"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_cat_staged_weights(device, seed, staged_weights, dtype, widths, layout, shared, kind, split, T):
    """...and _norm_last_plan shows the weights staged where they must be: every chunk of
    3x4096 and 8192+64 (any weight kind fits the 100 KB stage); 4096+odd only in fp32, since
    a 16-bit output row of 4260 elements is no multiple of 8 and so no chunk takes 16-byte
    accesses (the first GPU run found this expectation wrong); 5chunks never."""
    rng = Rng(seed, device)
    xs, bases = make_chunks(rng, layout, T, widths, dtype)
    weights = make_weights(rng, kind, widths, dtype)
    with kernel_switches(norm_split_chunks=split):
        check_rms_norm_cat(device, xs, bases, weights, EPS, shared, lead_shape(layout, T))
    if torch.device(device).type == "cuda":
        plan = torch.ops.eagle3._norm_last_plan()
        if widths != [7168] * 3:  # (3x7168: the stage budget decides, by dtype and weight kind)
            assert plan.startswith("staged"), plan
            staged_w = widths in ([4096] * 3, [8192, 64]) or (widths == [4096, 100, 64] and dtype == torch.float32)
            assert ("+w" in plan) == staged_w, plan
        assert ("+split" in plan) == bool(split and not shared), plan


def test_rms_norm_cat_staged_weights_row_bound(device, seed):
    """The switch is a bound on the launch's rows: at 8 the 7-row and the 9-row launches (one
    stages the weights, one does not) both match the reference (one block per row, 4
    vectors per thread: 32 threads for 1024 bf16 columns)."""
    rng = Rng(seed, device)
    for T in (7, 9):
        xs, bases = make_chunks(rng, "split", T, [1024, 1024, 1024], torch.bfloat16)
        weights = make_weights(rng, "mixed", [1024] * 3, torch.bfloat16)
        with kernel_switches(norm_stage_weights=8, norm_vecs_per_thread=4, norm_split_chunks=0):
            check_rms_norm_cat(device, xs, bases, weights, EPS, False, (T,))
        plan = torch.ops.eagle3._norm_last_plan()
        if torch.device(device).type == "cuda":
            assert plan == ("staged+w 32" if T == 7 else "staged 32"), (T, plan)
        else:
            assert plan == "cpu", plan


@pytest.mark.parametrize("T", [1, 83])
@pytest.mark.parametrize("wdtype", ["same", "fp32", "none"])
@pytest.mark.parametrize("layout", ["contig", "padded", "3d"])
@pytest.mark.parametrize("H", [4096, 769, 8192])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm_staged_weights(device, seed, staged_weights, dtype, H, layout, wdtype, T):
    rng = Rng(seed, device)
    x, r, bases = make_pair(rng, layout, T, H, dtype)
    w = None if wdtype == "none" else rng.norm_weight(H, dtype if wdtype == "same" else torch.float32)
    check_fused_add(device, x, r, bases, w, EPS)
    if torch.device(device).type == "cuda":  # staged wherever the row has 16-byte accesses and a weight
        staged_w = H != 769 and layout != "padded" and wdtype != "none"
        assert ("+w" in torch.ops.eagle3._norm_last_plan()) == staged_w, torch.ops.eagle3._norm_last_plan()


# ---- the norm kernels' block size (vectors per thread) ---------------------------------------


# (one block per row: the 37-row launches below would split their rows by default)
NORM_STRATEGIES = {"staged": {"norm_stage_weights": 0, "norm_split_chunks": 0},
                   "two-pass": {"norm_stage_limit": 0, "norm_stage_weights": 0, "norm_split_chunks": 0},
                   "registers": {"norm_registers": 1}, "staged+w": {"norm_stage_weights": 1024, "norm_split_chunks": 0}}
# Threads per block for a 3 x 4096 row by (element size, vectors per thread): 512 (2-byte) or
# 1024 (fp32) vectors per chunk over v per thread, 32..512 threads; the register kernel holds
# at most 4 per thread and falls back to 4 where v would pass 512 threads.
NORM_THREADS = {(2, 1): 512, (2, 2): 256, (2, 8): 64, (4, 1): 512, (4, 2): 512, (4, 8): 128}
REG_THREADS = {(2, 1): 512, (2, 2): 256, (2, 8): 128, (4, 1): 256, (4, 2): 512, (4, 8): 256}


@pytest.mark.parametrize("vecs", [1, 2, 8])
@pytest.mark.parametrize("strategy", list(NORM_STRATEGIES))
@pytest.mark.parametrize("widths", [[4096, 4096, 4096], [8192], [769, 100, 64], [16384, 8]],
                         ids=["3x4096", "8192", "odd", "wide"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_cat_vecs_per_thread(device, seed, dtype, widths, strategy, vecs):
    """Every strategy with blocks sized for 1, 2 and 8 vectors per thread (the register
    kernel falls back to its 4 where 1 or 2 would pass its block bound, and holds at most 4)."""
    rng = Rng(seed, device)
    xs, bases = make_chunks(rng, "split", 37, widths, dtype)
    weights = make_weights(rng, "mixed", widths, dtype)
    with kernel_switches(norm_vecs_per_thread=vecs, **NORM_STRATEGIES[strategy]):
        assert torch.ops.eagle3._norm_vecs_per_thread(-1) == (vecs if eagle3_ops.has_cuda_kernels() else 0)
        for shared in (False, True):
            check_rms_norm_cat(device, xs, bases, weights, EPS, shared, (37,))
            if torch.device(device).type == "cuda" and widths == [4096] * 3:
                key = (dtype.itemsize, vecs)
                expect = {"registers": f"registers {REG_THREADS[key]}", "two-pass": f"two-pass {NORM_THREADS[key]}",
                          "staged": f"staged {NORM_THREADS[key]}", "staged+w": f"staged+w {NORM_THREADS[key]}"}
                assert torch.ops.eagle3._norm_last_plan() == expect[strategy], (strategy, key)


@pytest.mark.parametrize("vecs", [1, 2, 8])
@pytest.mark.parametrize("strategy", list(NORM_STRATEGIES))
@pytest.mark.parametrize("H", [4096, 769, 16384])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm_vecs_per_thread(device, seed, dtype, H, strategy, vecs):
    rng = Rng(seed, device)
    x, r, bases = make_pair(rng, "contig", 37, H, dtype)
    with kernel_switches(norm_vecs_per_thread=vecs, **NORM_STRATEGIES[strategy]):
        check_fused_add(device, x, r, bases, rng.norm_weight(H, torch.float32), EPS)


def assert_plan(plan: str) -> None:
    """_norm_last_plan is `plan`. Its carveout (" cNN") is the percentage of an SM with 228
    KB of shared memory (Hopper); on other cards the carveout's figure is not compared."""
    got = torch.ops.eagle3._norm_last_plan()
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    if getattr(props, "shared_memory_per_multiprocessor", 0) == 228 * 1024:
        assert got == plan, (got, plan)
    else:
        assert re.sub(r" c\d+$", "", got) == re.sub(r" c\d+$", "", plan), (got, plan)


# The carveouts by size (Hopper, 228 KB of shared memory per SM): c71 = 164 KB, an L1 cache
# of 92 KB. Where the blocks the threads allow per SM fit 164 KB it holds them all; else it
# leaves the L1 cache room for the weights and 40 KB (rms_norm_cat K=3 H=4096: 6 of its 8
# blocks; H=7168 with one statistic per row: 3 of 4 blocks of 43 KB).
@pytest.mark.parametrize("op,T,widths,shared,plan", [
    ("rms_norm_cat", 4096, [7168] * 3, False, "staged+split 224 c71"),   # wide chunks, large launch
    ("rms_norm_cat", 4096, [8192] * 2, False, "staged+split 256 c71"),
    ("rms_norm_cat", 4096, [7168] * 3, True, "staged 448 c71"),          # one statistic per row
    ("rms_norm_cat", 4095, [7168] * 3, False, "staged 448"),             # below the large launches
    ("rms_norm_cat", 4096, [4096] * 3, False, "staged 256 c71"),         # chunks not wide
    ("rms_norm_cat", 64, [4096] * 3, False, "staged+split+w 512"),       # small launch
    ("fused_add_rms_norm", 64, [4096], None, "staged+w 512"),
    ("fused_add_rms_norm", 512, [4096], None, "staged 512"),
    ("fused_add_rms_norm", 4095, [4096], None, "staged 512"),
    ("fused_add_rms_norm", 4096, [4096], None, "staged 256 c71"),
])
def test_norm_default_plans_by_size(device, seed, op, T, widths, shared, plan):
    """The default plans of the CUDA norm kernels by launch size (bf16, weights of the input
    dtype): rms_norm_cat splits large launches of chunks wider than 4096 elements by (row,
    chunk) with 4 vectors per thread; fused_add_rms_norm gives each thread one vector below
    4096 rows; launches of 4096 or more rows reading their weights from global memory take
    a smaller shared-memory carveout. Each also matches the reference. CUDA only (the CPU
    has no plans)."""
    if torch.device(device).type != "cuda":
        pytest.skip("the launch plans are the CUDA kernels'")
    rng = Rng(seed, device)
    dtype = torch.bfloat16
    if op == "rms_norm_cat":
        xs, bases = make_chunks(rng, "split", T, widths, dtype)
        check_rms_norm_cat(device, xs, bases, make_weights(rng, "same", widths, dtype), EPS, shared, (T,))
    else:
        x, r, bases = make_pair(rng, "contig", T, widths[0], dtype)
        check_fused_add(device, x, r, bases, rng.norm_weight(widths[0], dtype), EPS)
    assert_plan(plan)


@pytest.mark.parametrize("carveout", [0, 30, 100])
def test_norm_carveout(device, seed, carveout):
    """The staged norm kernels under each shared-memory carveout (_norm_carveout: 0 by size,
    else that percentage) match the reference at T = 5 and 4096, with and without weights;
    the plan names the carveout: a fixed one for every staged launch, by size only for
    launches of 4096 or more rows whose weights are read from global memory (rms_norm_cat
    K=3 H=4096: 164 KB with weights of x's dtype or fp32)."""
    if torch.device(device).type != "cuda":
        pytest.skip("the carveout is the CUDA kernels'")
    rng = Rng(seed, device)
    widths = [4096] * 3
    with kernel_switches(norm_carveout=carveout):
        assert torch.ops.eagle3._norm_carveout(-1) == carveout
        for T in (5, 4096):
            large = T >= 4096
            fixed = f" c{carveout}" if carveout else ""
            xs, bases = make_chunks(rng, "split", T, widths, torch.bfloat16)
            for kind, by_size in (("same", " c71"), ("fp32", " c71"), ("none", "")):
                check_rms_norm_cat(device, xs, bases, make_weights(rng, kind, widths, torch.bfloat16), EPS, False,
                                   (T,), f"carveout {carveout} T={T} {kind}")
                plan = ("staged 256" if large else "staged+split" + ("+w" if kind != "none" else "") + " 512")
                assert_plan(plan + (fixed or (by_size if large else "")))
            x, r, pair_bases = make_pair(rng, "contig", T, 4096, torch.bfloat16)
            check_fused_add(device, x, r, pair_bases, rng.norm_weight(4096, torch.bfloat16), EPS)
            assert_plan(("staged 256" if large else "staged+w 512") + (fixed or (" c71" if large else "")))


def test_strategy_switches_validate_their_argument():
    with pytest.raises(ValueError, match="_norm_split_chunks: value must be -1 \\(query\\), 0, 1 or 2 \\(by size\\), got 3"):
        torch.ops.eagle3._norm_split_chunks(3)
    with pytest.raises(ValueError, match="_norm_registers: value must be -1 \\(query\\), 0 or 1, got 2"):
        torch.ops.eagle3._norm_registers(2)
    with pytest.raises(ValueError, match="_norm_stage_limit: value must be -1"):
        torch.ops.eagle3._norm_stage_limit(-2)


# ---- the fc's tensor-core kernel (T = 2..64, bf16 / fp16) ----------------------------------


@pytest.fixture
def mma_up_to_64():
    """Route 2 <= T <= 64 through the fc's CUDA tensor-core kernel (by default it serves
    T <= 8 in one wave of blocks), at any N, norm "none" on views of one tensor too
    (_fc_adjacent_gemm off); restores the previous settings. On the CPU build only the
    latter applies."""
    with kernel_switches(fc_mma_max_tokens=64, fc_mma_max_waves=0, fc_adjacent_gemm=0):
        assert torch.ops.eagle3._fc_mma_max_tokens(-1) == (64 if eagle3_ops.has_cuda_kernels() else 0)
        yield


# K2-320-64: a warp's group of k-blocks (w, w + 8) starts in one chunk and ends in the next
MMA_WIDTHS = {"K1-64": [64], "K2-96-32": [96, 32], "K3-1024": [1024] * 3, "K5-32": [32] * 5,
              "K3-odd": [1024, 769, 64], "K2-320-64": [320, 64]}  # 769: not a multiple of 32, the pair serves it


@pytest.mark.parametrize("N", [1, 129])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("widths", [pytest.param(w, id=k) for k, w in MMA_WIDTHS.items()])
@pytest.mark.parametrize("T", [2, 8, 9, 17, 33, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_rms_norm_cat_linear_mma(device, seed, mma_up_to_64, dtype, T, widths, norm, N):
    """Every token-tile size of the tensor-core kernel (T = 2..64: 1, 2, 4, 8 tiles of 8,
    partial tiles), ragged N, chunk offsets inside k-blocks of 32; fp32 and widths that
    are not multiples of 32 take the other paths."""
    rng = Rng(seed, device)
    xs, bases = make_chunks(rng, "split" if T % 2 else "contig", T, widths, dtype)
    w = rng.linear_weight(N, sum(widths), dtype)
    mma = dtype != torch.float32 and all(h % 32 == 0 for h in widths)
    check_linear(device, xs, bases, w, EPS, norm, (T,), path="mma" if mma else "pair")


@pytest.mark.parametrize("norm", ["chunk", "shared", "none"])
@pytest.mark.parametrize("T", [2, 24, 64])
@pytest.mark.parametrize("H", [4096, 7168])
def test_rms_norm_cat_linear_mma_real_fc(device, seed, mma_up_to_64, H, T, norm):
    """The real fc (K = 3, bf16, N = H) through the tensor-core kernel."""
    check_real_fc(device, seed, T, H, norm, "mma")


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("T", [8, 64])
def test_rms_norm_cat_linear_mma_many_chunks(device, seed, mma_up_to_64, T, norm):
    """24 chunks: the kernel keeps one slot of partial products per chunk for norm "chunk"
    in shared memory; at T = 64 those exceed its 48 KB and the pair serves the call, while
    T = 8 (and "shared" / "none", one slot) stay on the kernel."""
    rng = Rng(seed, device)
    widths = [32] * 23 + [64]
    xs, bases = make_chunks(rng, "split", T, widths, torch.bfloat16)
    w = rng.linear_weight(40, sum(widths), torch.bfloat16)
    path = "pair" if T == 64 and norm == "chunk" else "mma"
    check_linear(device, xs, bases, w, EPS, norm, (T,), path=path)


@pytest.mark.parametrize("T", [2, 8])
def test_rms_norm_cat_linear_mma_waves(device, seed, T):
    """By default the tensor-core kernel takes a call only when its blocks (16 features
    each) fit on the card at once: 16 x (8 x SMs + 1) features are more than one wave (at
    most 8 blocks of 256 threads per SM), so the pair serves them; with the bound lifted
    (_fc_mma_max_waves(0)) the kernel does, and both match the reference."""
    rng = Rng(seed, device)
    cuda = torch.device(device).type == "cuda"
    sms = torch.cuda.get_device_properties(device).multi_processor_count if cuda else 132
    xs, bases = make_chunks(rng, "split", T, [64] * 3, torch.bfloat16)
    w = rng.linear_weight(16 * (8 * sms + 1), 3 * 64, torch.bfloat16)
    assert torch.ops.eagle3._fc_mma_max_waves(-1) == (1 if eagle3_ops.has_cuda_kernels() else 0)
    check_linear(device, xs, bases, w, EPS, "chunk", (T,), path="pair")
    with kernel_switches(fc_mma_max_waves=0):
        check_linear(device, xs, bases, w, EPS, "chunk", (T,), path="mma")


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("T", [2, 9, 17, 33, 64])
@pytest.mark.parametrize("features", [16, 32, 64])
def test_rms_norm_cat_linear_mma_features(device, seed, mma_up_to_64, features, T, norm):
    """Every block width of the tensor-core kernel (_fc_mma_features) at every token-tile
    count: N = 200 leaves a partial last block at each width, chunk boundaries fall inside
    a warp's group of k-blocks. 64 features at T > 32 would need 128 accumulators per
    thread: the pair serves it."""
    rng = Rng(seed, device)
    xs, bases = make_chunks(rng, "split", T, [320, 64, 256], torch.bfloat16)
    w = rng.linear_weight(200, 640, torch.bfloat16)
    with kernel_switches(fc_mma_features=features):
        assert torch.ops.eagle3._fc_mma_features(-1) == (features if eagle3_ops.has_cuda_kernels() else 0)
        check_linear(device, xs, bases, w, EPS, norm, (T,), path="pair" if features == 64 and T > 32 else "mma")


def test_rms_norm_cat_linear_mma_t1(device, seed, mma_up_to_64):
    """T = 1 through the tensor-core kernel (the decode kernel switched off)."""
    rng = Rng(seed, device)
    with kernel_switches(fc_decode_max_tokens=0):
        for norm in NORMS:
            xs, bases = make_chunks(rng, "split", 1, [1024, 512, 64], torch.bfloat16)
            w = rng.linear_weight(129, 1600, torch.bfloat16)
            check_linear(device, xs, bases, w, EPS, norm, (1,), path="mma")


def test_fc_mma_switch_validates_its_argument():
    with pytest.raises(ValueError, match="_fc_mma_max_tokens: value must be -1 \\(query\\) or 0..64, got 65"):
        torch.ops.eagle3._fc_mma_max_tokens(65)


# ---- the fc's split-k tensor-core kernel (Hopper, T = 1..64, bf16 / fp16) ------------------


# (ids without "c2": gpu_check.sh selects the wgmma cluster tests with -k "c2")
@pytest.fixture(params=[0, 2, 8], ids=["by-size", "cluster-of-2", "cluster-of-8"])
def splitk_up_to_64(request, device):
    """Route 1 <= T <= 64 through the fc's split-k tensor-core kernel (off by default) with
    the given blocks per cluster (0: by size), the decode and mma kernels off (so a call the
    kernel declines goes to the pair), norm "none" on views of one tensor too
    (_fc_adjacent_gemm off); restores the previous settings. Yields the cluster switch.
    CUDA only: on the CPU these calls take the pair, which the tests above cover."""
    if torch.device(device).type != "cuda":
        pytest.skip("the split-k kernel is a CUDA kernel; on the CPU the pair serves these calls")
    with kernel_switches(fc_splitk_max_tokens=64, fc_splitk_cluster=request.param, fc_decode_max_tokens=0,
                         fc_mma_max_tokens=0, fc_adjacent_gemm=0):
        assert torch.ops.eagle3._fc_splitk_max_tokens(-1) == 64
        yield request.param


def splitk_takes(device, widths, T, norm, split, dtype=torch.bfloat16) -> bool:
    """Whether the split-k kernel serves the call here (launch_fc_splitk's rules, with a
    cluster of `split` blocks, 0 by size): a compute capability 9.x card,
    bf16 / fp16, chunk widths that are multiples of 32, at most 4 slots of partial products
    (norm "chunk": the most chunks one of the split k ranges touches) and 100 KB of shared
    memory per block."""
    if not wgmma_expected(device) or dtype == torch.float32 or any(h % 32 for h in widths):
        return False
    offsets = [sum(widths[:k]) for k in range(len(widths))]
    num_kb = sum(widths) // 32

    def chunk_of(col):
        return max(k for k, off in enumerate(offsets) if col >= off)

    def fits(s):
        slots = 1
        if norm == "chunk":
            for r in range(s):
                b, e = r * num_kb // s, (r + 1) * num_kb // s
                if e > b:
                    slots = max(slots, chunk_of((e - 1) * 32) - chunk_of(b * 32) + 1)
        nt = 1 if T <= 8 else 2 if T <= 16 else 4 if T <= 32 else 8
        return slots <= 4 and 4 * (slots * 128 * (8 * nt + 4) + 2 * len(widths) * 8 * nt) <= 100 * 1024

    # by size: 8 or 4 blocks where they fit (the test shapes' clusters fit the card), else 2
    return fits(split) if split else any(fits(s) for s in (8, 4, 2))


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("widths", [pytest.param(w, id=k) for k, w in MMA_WIDTHS.items()])
@pytest.mark.parametrize("T", [1, 9, 33, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_rms_norm_cat_linear_splitk(device, seed, splitk_up_to_64, dtype, T, widths, norm):
    """Every token-tile size of the split-k kernel (T = 1..64: 1, 2, 4, 8 tiles of 8, partial
    tiles) in clusters of 2, 8 and by size; N = 300: two whole tiles of 128 features and a
    partial one; k ranges that start and end inside chunks (K2-320-64 over 8 blocks: 1-2
    k-blocks each), more blocks than k-blocks (K1-64 over 8: empty ranges); widths that are
    not multiples of 32 go to the pair."""
    rng = Rng(seed, device)
    xs, bases = make_chunks(rng, "split" if T % 2 else "contig", T, widths, dtype)
    w = rng.linear_weight(300, sum(widths), dtype)
    path = "mma-sk" if splitk_takes(device, widths, T, norm, splitk_up_to_64, dtype) else "pair"
    check_linear(device, xs, bases, w, EPS, norm, (T,), path=path)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("T", [1, 8])
@pytest.mark.parametrize("N", [1, 129])
def test_rms_norm_cat_linear_splitk_small_n(device, seed, splitk_up_to_64, N, T, norm):
    """One tile of 128 features, partly used (N = 1) or with a second, nearly empty one (129);
    fp32 goes to the pair."""
    rng = Rng(seed, device)
    for dtype in (torch.bfloat16, torch.float32):
        xs, bases = make_chunks(rng, "split", T, [256, 64, 128], dtype)
        w = rng.linear_weight(N, 448, dtype)
        path = "mma-sk" if splitk_takes(device, [256, 64, 128], T, norm, splitk_up_to_64, dtype) else "pair"
        check_linear(device, xs, bases, w, EPS, norm, (T,), path=path)


@pytest.mark.parametrize("norm", ["chunk", "shared", "none"])
@pytest.mark.parametrize("T", [2, 24, 64])
@pytest.mark.parametrize("H", [4096, 7168])
def test_rms_norm_cat_linear_splitk_real_fc(device, seed, splitk_up_to_64, H, T, norm):
    """The real fc (K = 3, bf16, N = H) through the split-k kernel."""
    expected = "mma-sk" if splitk_takes(device, [H] * 3, T, norm, splitk_up_to_64) else "pair"
    check_real_fc(device, seed, T, H, norm, expected)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("T", [8, 64])
def test_rms_norm_cat_linear_splitk_many_chunks(device, seed, splitk_up_to_64, T, norm):
    """24 chunks of 32-64: with norm "chunk" a block keeps one slot of partial products per
    chunk its k range touches (at most 4, in at most 100 KB), so clusters of 2 (12 chunks
    per range) decline and the pair serves them, and clusters of 8 (up to 3 chunks per
    range) take T=8 but not T=64 (3 slots of 128 x 68 floats: 104 KB); norm "shared" /
    "none" (one slot) always take the kernel."""
    rng = Rng(seed, device)
    widths = [32] * 23 + [64]
    xs, bases = make_chunks(rng, "split", T, widths, torch.bfloat16)
    w = rng.linear_weight(200, sum(widths), torch.bfloat16)
    path = "mma-sk" if splitk_takes(device, widths, T, norm, splitk_up_to_64) else "pair"
    check_linear(device, xs, bases, w, EPS, norm, (T,), path=path)


def test_fc_splitk_switches(device):
    """Both switches of the split-k kernel: off by default; on a CPU-only build they report 0."""
    cuda_build = eagle3_ops.has_cuda_kernels()
    assert torch.ops.eagle3._fc_splitk_max_tokens(-1) == 0
    assert torch.ops.eagle3._fc_splitk_cluster(-1) == 0
    with kernel_switches(fc_splitk_max_tokens=16, fc_splitk_cluster=4):
        assert torch.ops.eagle3._fc_splitk_max_tokens(-1) == (16 if cuda_build else 0)
        assert torch.ops.eagle3._fc_splitk_cluster(-1) == (4 if cuda_build else 0)
    assert torch.ops.eagle3._fc_splitk_max_tokens(-1) == 0


# ---- the fc's Hopper tensor-core kernel (TMA + wgmma, prefill sizes, bf16 / fp16) -----------


def wgmma_expected(device) -> bool:
    """Whether the wgmma kernel serves aligned bf16 / fp16 calls here when switched on: a
    compute capability 9.x card (the default build's architecture list names 9.0a)."""
    return torch.device(device).type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


@pytest.fixture(params=[(128, 1, 1, 1), (256, 1, 1, 1), (128, 2, 1, 1), (256, 2, 1, 1), (128, 1, 3, 1),
                        (128, 1, 3, 0), (256, 1, 0, 1)],
                ids=["bn128", "bn256", "bn128-c2", "bn256-c2", "bn128-sk3", "bn128-sk3-prepass", "bn256-sk-by-size"])
def wgmma_from_1(request, device):
    """Route every T through the fc's wgmma kernel (off by default), with the decode and mma
    kernels off, and with norm "none" on views of one tensor too (_fc_adjacent_gemm off):
    the given features per block; blocks per cluster (2: the weight tiles multicast); split
    of the k range over a cluster (3; 0: by size, 8 for these few tiles on an H100, with
    norm "chunk" a multiple of K, so most tests here leave some blocks no k-tile); and the
    norm statistics from the streamed tiles (1, where that applies: norm "shared" and
    one-chunk "chunk" always, "chunk" split over a cluster when K divides the split, so 5
    chunks, and 2 at a split of 3, take the pre-pass) or from the pre-pass (0). Restores
    them all. CUDA only: on the CPU these calls are the pair the other grids already cover."""
    if torch.device(device).type != "cuda":
        pytest.skip("the wgmma kernel is a CUDA path; the CPU takes the pair, covered above")
    tile_n, cluster, split_k, tile_stats = request.param
    with kernel_switches(fc_wgmma_min_tokens=1, fc_wgmma_tile_n=tile_n, fc_wgmma_cluster=cluster,
                         fc_wgmma_split_k=split_k, fc_wgmma_tile_stats=tile_stats, fc_decode_max_tokens=0,
                         fc_mma_max_tokens=0, fc_adjacent_gemm=0):
        yield request.param


# K = 1..5 with 64-wide k-tiles (chunk boundaries between tiles).
WGMMA_WIDTHS = {"K1-64": [64], "K2-128-64": [128, 64], "K3-192": [192] * 3, "K5-64": [64] * 5}


@pytest.mark.parametrize("N", [1, 264])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("widths", [pytest.param(w, id=k) for k, w in WGMMA_WIDTHS.items()])
@pytest.mark.parametrize("T", [1, 129, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_rms_norm_cat_linear_wgmma(device, seed, wgmma_from_1, dtype, T, widths, norm, N):
    """Token tiles of 128 (one partial, several with a partial last), N below, across and
    past the 128 / 256 feature tiles (N = 1: the odd-N store path), chunk boundaries on
    k-tiles."""
    rng = Rng(seed, device)
    xs, bases = make_chunks(rng, "split" if T % 2 else "contig", T, widths, dtype)
    w = rng.linear_weight(N, sum(widths), dtype)
    check_linear(device, xs, bases, w, EPS, norm, (T,), path="wgmma" if wgmma_expected(device) else "pair")


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype,widths", [
    pytest.param(torch.float32, [128, 64], id="fp32"),
    pytest.param(torch.bfloat16, [1024, 96, 64], id="width-96"),
    pytest.param(torch.bfloat16, [64] * 9, id="K9"),
])
def test_rms_norm_cat_linear_wgmma_declines(device, seed, wgmma_from_1, dtype, widths, norm):
    """What the wgmma kernel does not take goes to the pair, correctly: fp32, a width that
    is not a multiple of 64, more chunks than it has tensor maps for."""
    rng = Rng(seed, device)
    xs, bases = make_chunks(rng, "split", 129, widths, dtype)
    w = rng.linear_weight(40, sum(widths), dtype)
    check_linear(device, xs, bases, w, EPS, norm, (129,), path="pair")


@pytest.mark.parametrize("norm", NORMS)
def test_rms_norm_cat_linear_wgmma_strided_views(device, seed, wgmma_from_1, norm):
    """Chunks that are column slices of a wider tensor (row stride != the chunk widths, a
    base offset of 64 columns): each chunk's tensor map carries its own stride."""
    rng = Rng(seed, device)
    T, widths = 200, [256, 128, 64]
    big = rng.randn((T, sum(widths) + 192), torch.bfloat16)
    offs = [64, 64 + 256 + 64, 64 + 256 + 64 + 128]
    xs = [big[:, o:o + h] for o, h in zip(offs, widths)]
    w = rng.linear_weight(136, sum(widths), torch.bfloat16)
    check_linear(device, xs, [big], w, EPS, norm, (T,), path="wgmma" if wgmma_expected(device) else "pair")


def cuda_kernel_names(fn) -> list[str]:
    """The names of the CUDA kernels one call of fn launches (torch.profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.parametrize("norm,widths,cluster,split_k,tile_stats,pre_pass", [
    pytest.param("chunk", [192] * 3, 1, 3, 1, False, id="chunk-K3-sk3-tiles"),
    pytest.param("chunk", [192] * 3, 1, 0, 1, False, id="chunk-K3-by-size-tiles"),
    pytest.param("chunk", [192] * 3, 1, 3, 0, True, id="chunk-K3-sk3-prepass"),
    pytest.param("chunk", [128, 64], 1, 3, 1, True, id="chunk-K2-sk3-prepass"),
    pytest.param("chunk", [192] * 3, 1, 1, 1, True, id="chunk-no-split-prepass"),
    pytest.param("chunk", [576], 1, 1, 1, False, id="chunk-K1-no-split-tiles"),
    pytest.param("shared", [128, 64], 1, 3, 1, False, id="shared-K2-sk3-tiles"),
    pytest.param("shared", [192] * 3, 1, 1, 1, False, id="shared-no-split-tiles"),
    pytest.param("shared", [192] * 3, 2, 1, 1, False, id="shared-c2-tiles"),
    pytest.param("shared", [192] * 3, 1, 1, 0, True, id="shared-no-split-prepass"),
    pytest.param("none", [192] * 3, 1, 3, 1, False, id="none-sk3"),
    # 2 (the default): from the tiles only with the k range split
    pytest.param("shared", [192] * 3, 1, 1, 2, True, id="shared-no-split-split-only"),
    pytest.param("shared", [128, 64], 1, 3, 2, False, id="shared-K2-sk3-split-only"),
    pytest.param("chunk", [192] * 3, 1, 0, 2, False, id="chunk-K3-by-size-split-only"),
    pytest.param("chunk", [576], 1, 1, 2, True, id="chunk-K1-no-split-split-only"),
])
def test_rms_norm_cat_linear_wgmma_tile_statistics(device, seed, norm, widths, cluster, split_k, tile_stats,
                                                   pre_pass):
    """The wgmma kernel takes the norm statistics from the tiles it streams (one launch, no
    statistics pre-pass kernel) where _fc_wgmma_tile_stats(1) applies (2, the default: only
    with the k range split): norm "shared" (each block's own rows, also in multicast pairs;
    or added up over a split's cluster), and
    "chunk" with a split that is a multiple of K (the by-size choice makes it one) or over
    one chunk; else the pre-pass runs; norm "none" has none. Hopper only."""
    if not wgmma_expected(device):
        pytest.skip("the wgmma kernel needs a compute capability 9.x card")
    rng = Rng(seed, device)
    T = 100
    xs, bases = make_chunks(rng, "split", T, widths, torch.bfloat16)
    w = rng.linear_weight(264, sum(widths), torch.bfloat16)
    with kernel_switches(fc_wgmma_min_tokens=1, fc_wgmma_tile_n=128, fc_wgmma_cluster=cluster, fc_wgmma_split_k=split_k,
                         fc_wgmma_tile_stats=tile_stats, fc_decode_max_tokens=0, fc_mma_max_tokens=0,
                         fc_adjacent_gemm=0):
        check_linear(device, xs, bases, w, EPS, norm, (T,), path="wgmma")
        names = cuda_kernel_names(lambda: eagle3_ops.rms_norm_cat_linear(xs, w, EPS, norm))
    assert any("fc_wgmma_kernel" in n for n in names), names
    assert any("fc_row_scales_kernel" in n for n in names) == pre_pass, names


@pytest.mark.parametrize("T,path", [(31, "pair"), (32, "wgmma"), (100, "wgmma"), (101, "pair")])
def test_rms_norm_cat_linear_wgmma_token_range(device, seed, T, path):
    """_fc_wgmma_min_tokens / _fc_wgmma_max_tokens bound the T the wgmma kernel takes (here
    the split kernel's, by size); outside them the pair serves. Hopper only."""
    if not wgmma_expected(device):
        pytest.skip("the wgmma kernel needs a compute capability 9.x card")
    rng = Rng(seed, device)
    xs, bases = make_chunks(rng, "split", T, [256] * 3, torch.bfloat16)
    w = rng.linear_weight(200, 3 * 256, torch.bfloat16)
    with kernel_switches(fc_wgmma_min_tokens=32, fc_wgmma_max_tokens=100, fc_wgmma_split_k=0, fc_decode_max_tokens=0,
                         fc_mma_max_tokens=0, fc_adjacent_gemm=0):
        check_linear(device, xs, bases, w, EPS, "chunk", (T,), path=path)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("T", [128, 1000, 2048])
@pytest.mark.parametrize("H", [4096, 7168])
def test_rms_norm_cat_linear_wgmma_real_fc(device, seed, wgmma_from_1, H, T, norm):
    """The real fc (K = 3, bf16, N = H) through the wgmma kernel."""
    check_real_fc(device, seed, T, H, norm, "wgmma" if wgmma_expected(device) else "pair")


def test_kernel_switches_restore_and_check_names():
    """kernel_switches restores every switch it set, also when the block raises, and
    refuses a name that is no switch (before setting any)."""
    ops = torch.ops.eagle3
    before = {name: getattr(ops, "_" + name)(-1) for name in eagle3_ops.ops.KERNEL_SWITCHES}
    with pytest.raises(RuntimeError, match="inside"):
        with kernel_switches(fc_mma_max_tokens=64, norm_stage_limit=0):
            if eagle3_ops.has_cuda_kernels():
                assert (ops._fc_mma_max_tokens(-1), ops._norm_stage_limit(-1)) == (64, 0)
            raise RuntimeError("inside")
    with pytest.raises(TypeError, match="kernel_switches: unknown switch \\['fc_mma'\\]"):
        with kernel_switches(norm_registers=1, fc_mma=64):
            pass
    with pytest.raises(ValueError, match="_fc_wgmma_tile_n: value must be"):
        with kernel_switches(fc_decode_max_tokens=0, fc_wgmma_tile_n=64):
            pass
    assert {name: getattr(ops, "_" + name)(-1) for name in eagle3_ops.ops.KERNEL_SWITCHES} == before


# Each strategy switch: a value it refuses, and its whole message.
SWITCH_ERRORS = {
    "norm_stage_limit": (-2, "_norm_stage_limit: value must be -1 (query) or a byte count >= 0, got -2"),
    "norm_registers": (2, "_norm_registers: value must be -1 (query), 0 or 1, got 2"),
    "norm_split_chunks": (-3, "_norm_split_chunks: value must be -1 (query), 0, 1 or 2 (by size), got -3"),
    "norm_stage_weights": (-2, "_norm_stage_weights: value must be -1 (query) or a row count >= 0, got -2"),
    "norm_carveout": (101, "_norm_carveout: value must be -1 (query), 0 (by size) or 1..100 (percent), got 101"),
    "norm_vecs_per_thread": (9, "_norm_vecs_per_thread: value must be -1 (query), 0 (by rows) or 1..8, got 9"),
    "fc_decode_max_tokens": (9, "_fc_decode_max_tokens: value must be -1 (query) or 0..8, got 9"),
    "fc_mma_max_tokens": (65, "_fc_mma_max_tokens: value must be -1 (query) or 0..64, got 65"),
    "fc_mma_max_waves": (-2, "_fc_mma_max_waves: value must be -1 (query) or a wave count >= 0, got -2"),
    "fc_mma_features": (48, "_fc_mma_features: value must be -1 (query), 0 (by T), 16, 32 or 64, got 48"),
    "fc_splitk_max_tokens": (65, "_fc_splitk_max_tokens: value must be -1 (query) or 0..64, got 65"),
    "fc_splitk_cluster": (3, "_fc_splitk_cluster: value must be -1 (query), 0 (by size), 2, 4 or 8, got 3"),
    "fc_wgmma_min_tokens": (-2, "_fc_wgmma_min_tokens: value must be -1 (query) or a token count >= 0, got -2"),
    "fc_wgmma_max_tokens": (-2, "_fc_wgmma_max_tokens: value must be -1 (query) or a token count >= 0 "
                                "(0: no limit), got -2"),
    "fc_wgmma_tile_n": (64, "_fc_wgmma_tile_n: value must be -1 (query), 0 (by size), 128 or 256, got 64"),
    "fc_wgmma_cluster": (0, "_fc_wgmma_cluster: value must be -1 (query), 1 or 2, got 0"),
    "fc_wgmma_split_k": (9, "_fc_wgmma_split_k: value must be -1 (query), 0 (by size) or 1..8, got 9"),
    "fc_wgmma_tile_stats": (3, "_fc_wgmma_tile_stats: value must be -1 (query), 0, 1 or 2, got 3"),
    "fc_adjacent_gemm": (2, "_fc_adjacent_gemm: value must be -1 (query), 0 or 1, got 2"),
}


def test_every_strategy_switch_refuses_bad_values():
    """Every switch (CUDA and CPU-only builds alike) refuses a value outside its range with
    its own message, and a refused value leaves the switch as it was; the value a query
    reports is one the switch takes back (kernel_switches restores it)."""
    assert set(SWITCH_ERRORS) == set(eagle3_ops.ops.KERNEL_SWITCHES)
    for name, (bad, message) in SWITCH_ERRORS.items():
        op = getattr(torch.ops.eagle3, "_" + name)
        before = op(-1)
        assert op(before) == before, name
        with pytest.raises(ValueError, match=re.escape(message)):
            op(bad)
        assert op(-1) == before, name


def test_fc_wgmma_switches_validate_their_argument():
    with pytest.raises(ValueError, match="_fc_wgmma_min_tokens: value must be -1 \\(query\\) or a token count"):
        torch.ops.eagle3._fc_wgmma_min_tokens(-2)
    with pytest.raises(ValueError, match="_fc_wgmma_tile_n: value must be -1 \\(query\\), 0 \\(by size\\), 128 or 256"):
        torch.ops.eagle3._fc_wgmma_tile_n(64)


def test_norm_last_plan_names_the_launch(device, seed):
    """_norm_last_plan follows the norm calls: "none" for no rows, "cpu" on the CPU, and on
    CUDA the default strategy with its block size: launches of up to 64 rows take 1 vector
    per thread (a 4096 bf16 row or chunk: 512 threads), stage their weights and (rms_norm_cat
    with per-chunk statistics) give each chunk its own block; larger ones read the weights
    from global memory, and rms_norm_cat takes 2 (256 threads) with one block per row, while
    fused_add_rms_norm keeps 1 up to 4095 rows (test_norm_default_plans_by_size: the large
    launches)."""
    rng = Rng(seed, device)
    cuda = torch.device(device).type == "cuda"
    for T, small in [(3, True), (64, True), (65, False)]:
        plan, plan_w = ("staged 512", "staged+w 512") if small else ("staged 256", "staged 256")
        split = "staged+split 512" if small else plan
        split_w = "staged+split+w 512" if small else plan
        fused, fused_w = ("staged 512", "staged+w 512") if small else ("staged 512", "staged 512")
        xs = [rng.randn((T, 4096), torch.bfloat16) for _ in range(3)]
        ws = [rng.norm_weight(4096, torch.bfloat16) for _ in range(3)]
        for call, expected in [(lambda: eagle3_ops.rms_norm_cat(xs), split),
                               (lambda: eagle3_ops.rms_norm_cat(xs, ws), split_w),
                               (lambda: eagle3_ops.rms_norm_cat(xs, shared_stats=True), plan),
                               (lambda: eagle3_ops.rms_norm_cat(xs, ws, shared_stats=True), plan_w),
                               (lambda: eagle3_ops.rms_norm_cat([x[:0] for x in xs]), "none"),
                               (lambda: eagle3_ops.fused_add_rms_norm(xs[0], xs[1], None, EPS), fused),
                               (lambda: eagle3_ops.fused_add_rms_norm(xs[0], xs[1], ws[0], EPS), fused_w),
                               (lambda: eagle3_ops.fused_add_rms_norm(xs[0][:0], xs[1][:0], None, EPS), "none")]:
            call()
            assert torch.ops.eagle3._norm_last_plan() == (expected if cuda or expected == "none" else "cpu"), T


def test_fc_last_path_names_the_path(device, seed):
    """_fc_last_path follows the calls: "none" for T = 0; on CUDA, with the switches'
    defaults, the decode kernel at T = 1, the tensor-core kernel at T = 2..8 (64 features:
    4 blocks, one wave), the pair at T = 9, and at T = 300 the wgmma kernel where its
    threshold and the card allow, else the pair; the CPU always takes the pair."""
    rng = Rng(seed, device)
    w = rng.linear_weight(64, 3 * 128, torch.bfloat16)
    cuda = torch.device(device).type == "cuda"
    wg_min = torch.ops.eagle3._fc_wgmma_min_tokens(-1)
    t300 = "wgmma" if wgmma_expected(device) and 0 < wg_min <= 300 else "pair"
    mma = "mma" if cuda else "pair"
    for T, expected in [(0, "none"), (1, "decode" if cuda else "pair"), (2, mma), (8, mma), (9, "pair"),
                        (300, t300), (0, "none")]:
        xs, _ = make_chunks(rng, "split", T, [128] * 3, torch.bfloat16)
        eagle3_ops.rms_norm_cat_linear(xs, w, EPS, "chunk")
        assert torch.ops.eagle3._fc_last_path() == expected
