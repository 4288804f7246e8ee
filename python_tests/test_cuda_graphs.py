"""CUDA only: every op inside a CUDA graph, large shapes, and 64-bit indexing.

* Each op is captured in a ``torch.cuda.CUDAGraph`` with static inputs (split views of one
  static tensor, padded and transposed views too); before each replay fresh random data
  is copied into the static inputs and the static outputs are filled with NaN, so a
  replay that reads stale inputs or leaves an element unwritten fails the comparison
  with the float64 truth (DESIGN.md section 4). Capture also fails if a kernel launches
  on a stream other than the current one.
* T = 1 (decode) and T = 16384 x K = 3 x H = 4096 bf16 (prefill) shapes.
* Tensors of more than 2^31 elements (fused_add_rms_norm, rms_norm_cat and
  rms_norm_cat_linear reading a [T, 3*4096] tensor past element 2^31) where the card
  has the memory: sampled rows, including those around the 2^31 boundary, are compared
  with the reference computed on those rows only.
Everything here is skipped without a CUDA device and the CUDA kernels.
"""

from __future__ import annotations

import math

import pytest
import torch

import eagle3_ops
from eagle3_ops import reference
from eagle3_ops.ops import kernel_switches
from conftest import requires_cuda
from numerics import Rng, assert_close_to_fp64, assert_output, make_chunks, make_pair, make_weights

pytestmark = [pytest.mark.cuda, requires_cuda]

EPS = 1e-6
DEV = "cuda"
BF = torch.bfloat16


def capture(fn):
    """Warm up on a side stream, then capture fn() in a CUDA graph; returns (graph, outputs)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    torch.cuda.synchronize()
    return g, out


def refill(rng, static_bases):
    """Fresh random data into the tensors that own the static inputs' storage."""
    for b in static_bases:
        if b.dtype.is_floating_point:
            b.copy_(rng.randn(b.shape, b.dtype))


def replay_poisoned(g, outs):
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    for o in outs:
        o.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()


def free_cuda():
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


# ---- graphs: every op, fresh data each replay -----------------------------------------------

GRAPH_SHAPES = [
    pytest.param(1, [4096] * 3, "split", id="T1-K3-4096"),
    pytest.param(83, [769, 100, 5128], "mixed", id="T83-odd-mixed"),
    pytest.param(7, [1, 3, 8, 17, 33], "padded", id="T7-K5-padded"),
    pytest.param(16384, [4096] * 3, "split", id="T16384-K3-4096"),
]


@pytest.mark.parametrize("shared", [False, True], ids=["chunk", "shared"])
@pytest.mark.parametrize("T,widths,layout", GRAPH_SHAPES)
def test_graph_rms_norm_cat(seed, T, widths, layout, shared):
    rng = Rng(seed, DEV)
    xs, bases = make_chunks(rng, layout, T, widths, BF)
    ws = make_weights(rng, "mixed", widths, BF)
    g, out = capture(lambda: eagle3_ops.rms_norm_cat(xs, ws, EPS, shared))
    assert_output(out, (T, sum(widths)), BF, DEV)
    for i in range(3):
        refill(rng, bases)
        replay_poisoned(g, out)
        assert_close_to_fp64(out, reference.rms_norm_cat_fp64(xs, ws, EPS, shared),
                             reference.rms_norm_cat(xs, ws, EPS, shared), f"replay {i}")
    del g, out
    free_cuda()


@pytest.mark.parametrize("T,H,layout", [
    pytest.param(1, 4096, "contig", id="T1-4096"),
    pytest.param(83, 5128, "mixed", id="T83-5128-mixed"),
    pytest.param(7, 769, "padded", id="T7-769-padded"),
    pytest.param(16384, 4096, "contig", id="T16384-4096"),
])
def test_graph_fused_add_rms_norm(seed, T, H, layout):
    rng = Rng(seed, DEV)
    x, r, bases = make_pair(rng, layout, T, H, BF)
    w = rng.norm_weight(H, torch.float32)
    g, (normed, summed) = capture(lambda: eagle3_ops.fused_add_rms_norm(x, r, w, EPS))
    for i in range(3):
        refill(rng, bases)
        replay_poisoned(g, (normed, summed))
        n64, s64 = reference.fused_add_rms_norm_fp64(x, r, w, EPS)
        ne, se = reference.fused_add_rms_norm(x, r, w, EPS)
        assert_close_to_fp64(summed, s64, se, f"residual_sum replay {i}")
        assert_close_to_fp64(normed, n64, ne, f"normed replay {i}")
    del g, normed, summed
    free_cuda()


@pytest.mark.parametrize("vecs", [4, 1])
def test_graph_norms_staged_weights(seed, vecs):
    """The norm weights staged with the row (_norm_stage_weights; by default for launches of
    up to 64 rows) under graph replay: inputs and weights refilled in place before each replay
    are the ones every replay uses (each launch stages the weights anew)."""
    rng = Rng(seed, DEV)
    with kernel_switches(norm_stage_weights=64, norm_vecs_per_thread=vecs):
        xs, bases = make_chunks(rng, "split", 5, [4096] * 3, BF)
        ws = [rng.norm_weight(4096, BF), rng.norm_weight(4096, torch.float32), rng.norm_weight(4096, BF)]
        x, r, pair_bases = make_pair(rng, "contig", 5, 4096, BF)
        w = rng.norm_weight(4096, BF)
        g, (out, (normed, summed)) = capture(lambda: (eagle3_ops.rms_norm_cat(xs, ws, EPS),
                                                      eagle3_ops.fused_add_rms_norm(x, r, w, EPS)))
        assert torch.ops.eagle3._norm_last_plan().startswith("staged+w"), torch.ops.eagle3._norm_last_plan()
        for i in range(3):
            refill(rng, bases + pair_bases)
            for t in ws + [w]:  # new weights, near 1
                t.copy_(rng.norm_weight(t.numel(), t.dtype))
            replay_poisoned(g, (out, normed, summed))
            assert_close_to_fp64(out, reference.rms_norm_cat_fp64(xs, ws, EPS, False),
                                 reference.rms_norm_cat(xs, ws, EPS, False), f"rms_norm_cat replay {i}")
            n64, s64 = reference.fused_add_rms_norm_fp64(x, r, w, EPS)
            ne, se = reference.fused_add_rms_norm(x, r, w, EPS)
            assert_close_to_fp64(normed, n64, ne, f"normed replay {i}")
    del g, out, normed, summed
    free_cuda()


def test_graph_norm_carveout_not_captured(seed):
    """The staged norm kernels' carveout is a launch attribute (_norm_carveout), documented
    for launches only: under stream capture the launches go without it, the plan says so (no
    " c"), and the replays are right; the same launch outside capture takes it."""
    rng = Rng(seed, DEV)
    with kernel_switches(norm_carveout=50):
        xs, bases = make_chunks(rng, "split", 4096, [4096] * 3, BF)
        ws = make_weights(rng, "same", [4096] * 3, BF)
        eagle3_ops.rms_norm_cat(xs, ws, EPS)
        assert torch.ops.eagle3._norm_last_plan() == "staged 256 c50"
        g, out = capture(lambda: eagle3_ops.rms_norm_cat(xs, ws, EPS))
        assert torch.ops.eagle3._norm_last_plan() == "staged 256", torch.ops.eagle3._norm_last_plan()
        for i in range(2):
            refill(rng, bases)
            replay_poisoned(g, (out,))
            assert_close_to_fp64(out, reference.rms_norm_cat_fp64(xs, ws, EPS, False),
                                 reference.rms_norm_cat(xs, ws, EPS, False), f"rms_norm_cat replay {i}")
    del g, out
    free_cuda()


@pytest.mark.parametrize("norm", ["none", "chunk", "shared"])
@pytest.mark.parametrize("T,widths,layout,N", [
    pytest.param(1, [4096] * 3, "split", 4096, id="T1-K3-4096-N4096"),
    pytest.param(83, [769, 100, 5128], "mixed", 17, id="T83-odd-mixed-N17"),
    pytest.param(7, [1, 3, 8, 17, 33], "padded", 256, id="T7-K5-padded-N256"),
    pytest.param(16384, [4096] * 3, "split", 4096, id="T16384-K3-4096-N4096"),
])
def test_graph_rms_norm_cat_linear(seed, T, widths, layout, N, norm):
    rng = Rng(seed, DEV)
    xs, bases = make_chunks(rng, layout, T, widths, BF)
    W = eagle3_ops.fold_norm_weights(rng.linear_weight(N, sum(widths), BF), make_weights(rng, "same", widths, BF))
    g, out = capture(lambda: eagle3_ops.rms_norm_cat_linear(xs, W, EPS, norm))
    assert_output(out, (T, N), BF, DEV)
    replay_and_check_linear(rng, g, out, bases, xs, W, norm)
    del g, out
    free_cuda()


def replay_and_check_linear(rng, g, out, bases, xs, W, norm):
    """Three replays of a captured rms_norm_cat_linear, each on fresh inputs into poisoned
    outputs, against float64."""
    for i in range(3):
        refill(rng, bases)
        replay_poisoned(g, out)
        assert_close_to_fp64(out, reference.rms_norm_cat_linear_fp64(xs, W, EPS, norm),
                             reference.rms_norm_cat_linear(xs, W, EPS, norm), f"replay {i}")


@pytest.mark.parametrize("norm", ["none", "chunk"])
@pytest.mark.parametrize("T,switch,path,cluster,split_k", [
    pytest.param(24, "fc_mma_max_tokens", "mma", 1, 1, id="mma-T24"),
    pytest.param(24, "fc_splitk_max_tokens", "mma-sk", 1, 1, id="mma-sk-T24"),
    pytest.param(64, "fc_splitk_max_tokens", "mma-sk", 1, 1, id="mma-sk-T64"),
    pytest.param(300, "fc_wgmma_min_tokens", "wgmma", 1, 1, id="wgmma-T300"),
    pytest.param(4096, "fc_wgmma_min_tokens", "wgmma", 1, 1, id="wgmma-T4096"),
    pytest.param(300, "fc_wgmma_min_tokens", "wgmma", 2, 1, id="wgmma-T300-c2"),
    pytest.param(4096, "fc_wgmma_min_tokens", "wgmma", 2, 1, id="wgmma-T4096-c2"),
    pytest.param(64, "fc_wgmma_min_tokens", "wgmma", 1, 0, id="wgmma-T64-sk-by-size"),
    pytest.param(300, "fc_wgmma_min_tokens", "wgmma", 1, 3, id="wgmma-T300-sk3"),
])
def test_graph_rms_norm_cat_linear_tensor_cores(seed, T, switch, path, cluster, split_k, norm):
    """The tensor-core fc kernels (beyond their defaults: mma at T=24, the split-k mma kernel,
    wgmma) captured and replayed with fresh data: (wgmma) the statistics pre-pass, its
    workspace and the tensor maps built at capture must serve every replay; the wgmma
    kernel also in clusters of two (a cluster launch in a graph) and with its k range split
    over a cluster. The split-k and wgmma kernels only on Hopper."""
    if path in ("wgmma", "mma-sk") and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip(f"the {path} kernel needs a compute capability 9.x card")
    with kernel_switches(**{switch: 64 if path in ("mma", "mma-sk") else 1}, fc_wgmma_cluster=cluster,
                         fc_wgmma_split_k=split_k, fc_adjacent_gemm=0):
        rng = Rng(seed, DEV)
        xs, bases = make_chunks(rng, "split", T, [1024] * 3, BF)
        W = rng.linear_weight(1000, 3 * 1024, BF)
        g, out = capture(lambda: eagle3_ops.rms_norm_cat_linear(xs, W, EPS, norm))
        assert torch.ops.eagle3._fc_last_path() == path
        replay_and_check_linear(rng, g, out, bases, xs, W, norm)
        del g, out
    free_cuda()


# A fresh process whose first call of each kernel configuration happens inside the capture
# (no warm-up): the host-side first-call work -- tensor maps, shared-memory attributes,
# occupancy and cluster-occupancy queries, the cached checks of the sm_90a build -- must be
# legal while the stream captures. Each configuration is checked on replay against float64.
FIRST_CALLS = r"""
import sys, torch, eagle3_ops
from eagle3_ops import reference
from eagle3_ops.ops import kernel_switches
torch.manual_seed(0)
hopper = torch.cuda.get_device_capability()[0] == 9
off = dict(fc_decode_max_tokens=0, fc_mma_max_tokens=0, fc_adjacent_gemm=0)
configs = [
    ("decode", dict(fc_decode_max_tokens=1), 1, "decode"),
    # (its one-wave check queries the occupancy)
    ("mma f32", dict(fc_decode_max_tokens=0, fc_mma_max_tokens=64, fc_mma_features=32), 24, "mma"),
]
if hopper:
    configs += [
        ("wgmma", dict(off, fc_wgmma_min_tokens=1, fc_wgmma_tile_n=256), 300, "wgmma"),
        ("wgmma split by size", dict(off, fc_wgmma_min_tokens=1, fc_wgmma_split_k=0), 64, "wgmma"),
        ("wgmma c2", dict(off, fc_wgmma_min_tokens=1, fc_wgmma_cluster=2), 300, "wgmma"),
        # (its cluster size by size queries the cluster occupancy)
        ("mma-sk by size", dict(off, fc_splitk_max_tokens=64), 24, "mma-sk"),
    ]
bad = 0
for name, switches, T, path in configs:
    with kernel_switches(**switches):
        for norm in ("chunk", "shared"):
            x = torch.randn(T, 3 * 1024, device="cuda", dtype=torch.bfloat16)
            xs = list(x.split(1024, dim=-1))
            W = (torch.randn(1000, 3 * 1024, device="cuda") / 32).to(torch.bfloat16)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out = eagle3_ops.rms_norm_cat_linear(xs, W, 1e-6, norm)
            took = torch.ops.eagle3._fc_last_path()
            x.copy_(torch.randn_like(x))
            g.replay()
            torch.cuda.synchronize()
            ref = reference.rms_norm_cat_linear_fp64(xs, W, 1e-6, norm)
            err = ((out.double() - ref).norm() / ref.norm()).item()
            ok = took == path and err < 2e-2
            bad += not ok
            print(f"{name} {norm}: path {took}, relative error {err:.2g}{'' if ok else '  WRONG'}")
# (T=4096: the carveout by size queries the device's shared-memory figures on its first call)
for op, T in (("rms_norm_cat", 5), ("fused_add_rms_norm", 5), ("rms_norm_cat", 4096), ("fused_add_rms_norm", 4096)):
    x = torch.randn(T, 4096, device="cuda", dtype=torch.bfloat16)
    r = torch.randn_like(x)
    w = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = (eagle3_ops.rms_norm_cat([x], [w], 1e-6) if op == "rms_norm_cat"
               else eagle3_ops.fused_add_rms_norm(x, r, w, 1e-6)[0])
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    ref = (reference.rms_norm_cat_fp64([x], [w], 1e-6) if op == "rms_norm_cat"
           else reference.fused_add_rms_norm_fp64(x, r, w, 1e-6)[0])
    err = ((out.double() - ref).norm() / ref.norm()).item()
    bad += not err < 2e-2
    print(f"{op} T={T}: relative error {err:.2g}{'' if err < 2e-2 else '  WRONG'}")
sys.exit(1 if bad else 0)
"""


def test_graph_first_calls_captured():
    """Each kernel configuration's first call in the process made inside a CUDA-graph
    capture, then replayed with fresh data (FIRST_CALLS; a subprocess, so the caches of
    this process's earlier calls do not hide a first-call step that capture refuses)."""
    import subprocess
    import sys
    res = subprocess.run([sys.executable, "-c", FIRST_CALLS], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


def test_graph_all_ops_one_graph(seed):
    """A drafter step's three ops captured together in one graph, T = 1 and 4."""
    rng = Rng(seed, DEV)
    H = 4096
    for T in (1, 4):
        aux = rng.randn((T, 3 * H), BF)
        emb, resid = rng.randn((T, H), BF), rng.randn((T, H), BF)
        W = rng.linear_weight(H, 3 * H, BF)
        g_in, g_hid, g_fin = (rng.norm_weight(H, BF) for _ in range(3))

        def step():
            h = eagle3_ops.rms_norm_cat_linear(list(aux.chunk(3, -1)), W, EPS, "chunk")
            q = eagle3_ops.rms_norm_cat([emb, h], [g_in, g_hid], EPS)
            o, p = eagle3_ops.fused_add_rms_norm(h, resid, g_fin, EPS)
            return h, q, o, p

        g, outs = capture(step)
        for _ in range(2):
            refill(rng, [aux, emb, resid])
            replay_poisoned(g, outs)
            h, q, o, p = outs
            xs = list(aux.chunk(3, -1))
            assert_close_to_fp64(h, reference.rms_norm_cat_linear_fp64(xs, W, EPS, "chunk"),
                                 reference.rms_norm_cat_linear(xs, W, EPS, "chunk"), "fc")
            # downstream ops checked on the op's own h (the graph's input to them)
            assert_close_to_fp64(q, reference.rms_norm_cat_fp64([emb, h], [g_in, g_hid], EPS),
                                 reference.rms_norm_cat([emb, h], [g_in, g_hid], EPS), "qkv input")
            n64, s64 = reference.fused_add_rms_norm_fp64(h, resid, g_fin, EPS)
            ne, se = reference.fused_add_rms_norm(h, resid, g_fin, EPS)
            assert_close_to_fp64(o, n64, ne, "final norm")
            assert_close_to_fp64(p, s64, se, "residual sum")
        del g, outs


@pytest.mark.parametrize("kind", ["llama", "deepseek"])
def test_graph_drafters(seed, kind):
    """Whole drafter steps (combine + forward, two layers), ours and the pure-PyTorch
    reference, captured in one CUDA graph each: a forward copies nothing from the host (the
    reference keeps its RoPE frequencies on the device) and replays on fresh ids, positions
    and aux states match an eager forward on the same data."""
    from eagle3_ops import nn as enn  # noqa: PLC0415
    from eagle3_ops.nn import reference_modules as R  # noqa: PLC0415
    from test_nn_deepseek import mla_config  # noqa: PLC0415
    from test_nn_helpers import TARGET_HIDDEN, VOCAB, randomize_, tiny_config  # noqa: PLC0415

    if kind == "llama":
        cfg = tiny_config("fc_norm", 3, layers=2, rope="llama3")
        Ours, Ref = enn.Eagle3LlamaDrafter, R.ReferenceLlamaDrafter
    else:
        cfg = mla_config("fc_norm", 3, layers=2, rope="yarn")
        Ours, Ref = enn.Eagle3DeepseekDrafter, R.ReferenceDeepseekDrafter
    ours = Ours(cfg, device=DEV)
    randomize_(ours, seed)
    ours.to(BF)
    ref = Ref(cfg).to(device=DEV, dtype=BF)
    ref.load_state_dict(ours.state_dict())
    T, rng = 5, Rng(seed, DEV)
    aux = rng.randn((T, 3 * TARGET_HIDDEN[3]), BF)
    ids = torch.zeros(T, dtype=torch.long, device=DEV)
    pos = torch.zeros(T, dtype=torch.long, device=DEV)
    g = torch.Generator().manual_seed(seed)
    for model in (ours, ref):
        def step(m=model):
            return m(ids, pos, m.combine_hidden_states(aux))

        with torch.no_grad():
            graph, outs = capture(step)
            for start in (3, 700):
                refill(rng, [aux])
                ids.copy_(torch.randint(0, VOCAB, (T,), generator=g))
                pos.copy_(torch.arange(T) + start)
                replay_poisoned(graph, outs)
                want = step()
                for got, exp, what in zip(outs, want, ("out", "fed back")):
                    assert not got.isnan().any(), f"{type(model).__name__} {what}: replay left NaN"
                    torch.testing.assert_close(got.float(), exp.float(), rtol=2e-2, atol=2e-2,
                                               msg=lambda m, w=what: f"{type(model).__name__} {w}: {m}")
        del graph, outs
    free_cuda()


def test_ops_follow_current_stream(seed):
    """Inputs written on a side stream, op launched on it, read after syncing only that
    stream: a kernel launched on another stream would race (and capture above would fail)."""
    rng = Rng(seed, DEV)
    s = torch.cuda.Stream()
    widths = [4096] * 3
    with torch.cuda.stream(s):
        aux = torch.empty((2048, sum(widths)), dtype=BF, device=DEV)
        aux.copy_(rng.randn(aux.shape, BF))
        xs = list(aux.split(widths, -1))
        out = eagle3_ops.rms_norm_cat(xs, None, EPS, False)
    s.synchronize()
    assert_close_to_fp64(out, reference.rms_norm_cat_fp64(xs, None, EPS), reference.rms_norm_cat(xs, None, EPS))


# ---- more than 2^31 elements ----------------------------------------------------------------

GiB = 1 << 30


def _need(nbytes: int) -> None:
    total = torch.cuda.get_device_properties(0).total_memory
    free, _ = torch.cuda.mem_get_info()
    if total < 1.4 * nbytes or free < 1.2 * nbytes:
        pytest.skip(f"needs ~{nbytes / GiB:.1f} GiB of GPU memory; card has {total / GiB:.1f} GiB, "
                    f"{free / GiB:.1f} GiB free")


def _randn_big(shape, dtype, seed):
    g = torch.Generator(device=DEV)
    g.manual_seed(seed & 0x7FFFFFFF)
    return torch.randn(shape, dtype=dtype, device=DEV, generator=g)


def _sample_rows(T: int, H: int, seed: int) -> torch.Tensor:
    """First/last rows, the rows around element 2^31 (and 2^32 when present), random rows."""
    rows = {0, 1, T // 2, T - 2, T - 1}
    for b in (2**31, 2**32):
        r = b // H
        rows.update(x for x in (r - 1, r, r + 1) if 0 <= x < T)
    g = torch.Generator().manual_seed(seed & 0x7FFFFFFF)
    rows.update(torch.randint(0, T, (8,), generator=g).tolist())
    return torch.tensor(sorted(rows), device=DEV)


def test_int64_indexing_fused_add_rms_norm(seed):
    H = 4096
    T = 2**31 // H + 8                      # x has 2^31 + 32768 elements
    _need(4 * T * H * 2 + 2 * GiB)          # x, residual, normed, sum in bf16
    x = _randn_big((T, H), BF, seed)
    r = _randn_big((T, H), BF, seed + 1)
    w = torch.rand(H, device=DEV) + 0.5
    normed, summed = eagle3_ops.fused_add_rms_norm(x, r, w, EPS)
    torch.cuda.synchronize()
    rows = _sample_rows(T, H, seed)
    xs, rs = x[rows], r[rows]
    n64, s64 = reference.fused_add_rms_norm_fp64(xs, rs, w, EPS)
    ne, se = reference.fused_add_rms_norm(xs, rs, w, EPS)
    assert_close_to_fp64(summed[rows], s64, se, "residual_sum (sampled rows)")
    assert_close_to_fp64(normed[rows], n64, ne, "normed (sampled rows)")
    assert not torch.isnan(normed[-1]).any() and not torch.isnan(summed[-1]).any()
    del x, r, normed, summed
    free_cuda()


@pytest.mark.parametrize("shared", [False, True], ids=["chunk", "shared"])
def test_int64_indexing_rms_norm_cat(seed, shared):
    widths = [4096] * 3
    total = sum(widths)
    T = -(-2**31 // total) + 8              # the [T, 12288] input and output pass 2^31 elements
    _need(2 * T * total * 2 + 2 * GiB)
    aux = _randn_big((T, total), BF, seed)
    xs = list(aux.split(widths, -1))
    ws = [torch.rand(h, device=DEV, dtype=BF) + 0.5 for h in widths]
    out = eagle3_ops.rms_norm_cat(xs, ws, EPS, shared)
    torch.cuda.synchronize()
    rows = _sample_rows(T, total, seed)
    sub = [x[rows] for x in xs]
    assert_close_to_fp64(out[rows], reference.rms_norm_cat_fp64(sub, ws, EPS, shared),
                         reference.rms_norm_cat(sub, ws, EPS, shared), "sampled rows")
    del aux, xs, out
    free_cuda()


@pytest.mark.parametrize("norm", ["chunk", "shared"])
def test_int64_indexing_rms_norm_cat_linear(seed, norm):
    widths = [4096] * 3
    total = sum(widths)
    T = -(-2**31 // total) + 8
    N = 256
    _need(T * total * 2 + 2 * T * total * 2 + 2 * GiB)   # input, plus room for a normalised copy
    aux = _randn_big((T, total), BF, seed)
    xs = list(aux.split(widths, -1))
    W = (_randn_big((N, total), torch.float32, seed + 1) / math.sqrt(total)).to(BF)
    out = eagle3_ops.rms_norm_cat_linear(xs, W, EPS, norm)
    torch.cuda.synchronize()
    rows = _sample_rows(T, total, seed)
    sub = [x[rows] for x in xs]
    assert_close_to_fp64(out[rows], reference.rms_norm_cat_linear_fp64(sub, W, EPS, norm),
                         reference.rms_norm_cat_linear(sub, W, EPS, norm), "sampled rows")
    del aux, xs, out
    free_cuda()
