"""torch.library.opcheck for every op on every device, and torch.compile(fullgraph=True).

opcheck runs the schema / fake-tensor / autograd-registration / aot-dispatch checks
(the fake implementations must give the real kernels' shapes, dtypes and strides).
The compile cases trace functions calling each op with fullgraph=True (a graph break
fails) and compare with the eager op outputs, bit for bit: the ops are opaque to the
compiler, and the ops around them here are exact. The functions take views made inside
the graph (split / chunk of one tensor) and chain ops; only one pointwise op is left for
the compiler to generate, to keep compile time (C++ / Triton) low.

Backend: "inductor" on every device. Measured on the 2-core CPU box this suite was
written on: the first inductor CPU compile ~8 s (the C++ toolchain warm-up), later
functions ~3 s each; "aot_eager" is ~0.5 s. Inductor exercises the real lowering of the
custom ops (stride handling of views passed to them, buffer reuse around them), so it is
worth the cost; four compiled functions per device (one dtype each: the dtype paths are
covered by opcheck and test_ops) keep the file under a minute there.
"""

from __future__ import annotations

import pytest
import torch

import eagle3_ops
from conftest import devices
from numerics import Rng, make_chunks, make_pair, make_weights

E = torch.ops.eagle3
EPS = 1e-6
BACKEND = "inductor"


# ---- opcheck --------------------------------------------------------------------------------


def _rms_norm_cat_args(rng):
    """(xs, weights, eps, shared_stats) sets: split views + same-dtype weights, padded views
    + fp32/None weights + shared stats, 3-D, transposed (copied) input, T = 1."""
    bf, fp16, f32 = torch.bfloat16, torch.float16, torch.float32
    out = []
    xs, _ = make_chunks(rng, "split", 7, [64, 100, 769], bf)
    out.append((xs, make_weights(rng, "same", [64, 100, 769], bf), EPS, False))
    xs, _ = make_chunks(rng, "padded", 5, [100, 33], fp16)
    out.append((xs, make_weights(rng, "mixed", [100, 33], fp16), 1e-5, True))
    xs, _ = make_chunks(rng, "3d", 3, [17, 8], f32)
    out.append((xs, [None, None], EPS, True))
    xs, _ = make_chunks(rng, "transposed", 6, [40, 24], bf)
    out.append((xs, make_weights(rng, "fp32", [40, 24], bf), EPS, False))
    xs, _ = make_chunks(rng, "split", 1, [4096, 4096], bf)
    out.append((xs, make_weights(rng, "strided", [4096, 4096], bf), EPS, False))
    return out


def _fused_add_args(rng):
    bf, fp16, f32 = torch.bfloat16, torch.float16, torch.float32
    out = []
    x, r, _ = make_pair(rng, "contig", 7, 769, bf)
    out.append((x, r, rng.norm_weight(769, bf), EPS))
    x, r, _ = make_pair(rng, "padded", 5, 100, fp16)
    out.append((x, r, rng.norm_weight(100, f32), 1e-5))
    x, r, _ = make_pair(rng, "3d", 3, 64, f32)
    out.append((x, r, None, EPS))
    x, r, _ = make_pair(rng, "mixed", 4, 33, bf)
    out.append((x, r, rng.norm_weight(66, f32)[::2], EPS))
    return out


def _linear_args(rng):
    bf, fp16, f32 = torch.bfloat16, torch.float16, torch.float32
    out = []
    for norm, dtype, layout, widths, n in [
        ("chunk", bf, "split", [64, 100, 769], 17),
        ("shared", fp16, "padded", [100, 33], 8),
        ("none", f32, "3d", [17, 8], 5),
        ("chunk", f32, "transposed", [40, 24], 3),
        ("shared", bf, "split", [1, 3, 8, 17, 33], 1),
    ]:
        xs, _ = make_chunks(rng, layout, 5, widths, dtype)
        out.append((xs, rng.linear_weight(n, sum(widths), dtype), EPS, norm))
    return out


CASES = {"rms_norm_cat": _rms_norm_cat_args, "fused_add_rms_norm": _fused_add_args,
         "rms_norm_cat_linear": _linear_args}


@pytest.mark.parametrize("op", list(CASES))
def test_opcheck(op, device, seed):
    rng = Rng(seed, device)
    for i, args in enumerate(CASES[op](rng)):
        result = torch.library.opcheck(getattr(E, op).default, args)
        bad = {k: v for k, v in result.items() if v != "SUCCESS"}
        assert not bad, f"opcheck {op} arg set {i}: {bad}"


@pytest.mark.parametrize("device", devices)
def test_fake_matches_real(device, seed):
    """The fake (meta) outputs have the real outputs' shapes, dtypes and strides, for
    inputs of every layout (opcheck compares them too; this names the mismatch)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    rng = Rng(seed, device)
    for op, make in CASES.items():
        for args in make(rng):
            real = getattr(E, op).default(*args)
            with FakeTensorMode(allow_non_fake_inputs=False) as mode:
                fargs = torch.utils._pytree.tree_map_only(torch.Tensor, mode.from_tensor, args)
                fake = getattr(E, op).default(*fargs)
            reals = real if isinstance(real, tuple) else (real,)
            fakes = fake if isinstance(fake, tuple) else (fake,)
            for r, f in zip(reals, fakes):
                assert (r.shape, r.dtype, r.stride(), r.device) == (f.shape, f.dtype, f.stride(), f.device), op


# ---- torch.compile(fullgraph=True) ----------------------------------------------------------


def _compile(fn, **kw):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend=BACKEND, **kw)


def _assert_same(got, want, what):
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    assert len(got) == len(want), what
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and g.dtype == w.dtype, f"{what}[{i}]: {g.shape} {g.dtype} vs {w.shape} {w.dtype}"
        assert torch.equal(g, w), f"{what}[{i}]: compiled differs from eager, max |diff| " \
                                  f"{(g.double() - w.double()).abs().max().item():.3g}"


def fc_norm_fc(aux, w_folded, widths):
    # the fc of a post-norm drafter: split views of one [T, K*H] tensor, folded weight
    return eagle3_ops.rms_norm_cat_linear(list(aux.split(widths, -1)), w_folded, EPS, "chunk")


def norm_cat_then(aux, ws, widths, shared):
    return eagle3_ops.rms_norm_cat(list(aux.split(widths, -1)), ws, EPS, shared)


def final_norm(x, r, w):
    return eagle3_ops.fused_add_rms_norm(x, r, w, EPS)


def mini_drafter(aux, emb, w_fc, g_in, g_hidden, g_final, resid):
    """fc -> midlayer qkv input cat([input_layernorm(e), hidden_norm(h)]) -> final add+norm."""
    K = 3
    h = eagle3_ops.rms_norm_cat_linear(list(aux.chunk(K, -1)), w_fc, EPS, "shared")
    qkv_in = eagle3_ops.rms_norm_cat([emb, h], [g_in, g_hidden], EPS)
    out, pre = eagle3_ops.fused_add_rms_norm(h, resid, g_final, EPS)
    return h, qkv_in, out, pre * 2  # one pointwise op the compiler generates code for


def test_compile_rms_norm_cat(device, seed):
    dtype = torch.bfloat16
    rng = Rng(seed, device)
    widths = [64, 100, 769]
    cf = _compile(norm_cat_then)
    for T, shared, wkind in [(7, False, "same"), (83, True, "mixed")]:
        aux, _ = make_chunks(rng, "split", T, [sum(widths)], dtype)
        ws = make_weights(rng, wkind, widths, dtype)
        _assert_same(cf(aux[0], ws, widths, shared), norm_cat_then(aux[0], ws, widths, shared),
                     f"rms_norm_cat T={T}")


def test_compile_fused_add_rms_norm(device, seed):
    dtype = torch.float16
    rng = Rng(seed, device)
    cf = _compile(final_norm)
    for T, layout, wdt in [(5, "contig", dtype), (9, "padded", torch.float32)]:
        x, r, _ = make_pair(rng, layout, T, 769, dtype)
        w = rng.norm_weight(769, wdt)
        _assert_same(cf(x, r, w), final_norm(x, r, w), f"fused_add_rms_norm T={T} {layout}")


def test_compile_rms_norm_cat_linear(device, seed):
    dtype = torch.float32
    rng = Rng(seed, device)
    widths = [100, 769]
    cf = _compile(fc_norm_fc)
    for T in (6, 33):
        aux = rng.randn((T, sum(widths)), dtype)
        w = eagle3_ops.fold_norm_weights(rng.linear_weight(24, sum(widths), dtype),
                                         make_weights(rng, "same", widths, dtype))
        _assert_same(cf(aux, w, widths), fc_norm_fc(aux, w, widths), f"rms_norm_cat_linear T={T}")


def test_compile_dynamic_mini_drafter(device, seed):
    """dynamic=True: the fake impls must work with a symbolic T; three T values, one graph
    family; every op in one fullgraph function, as a drafter step would call them."""
    rng = Rng(seed, device)
    dt, H = torch.bfloat16, 96
    w_fc = rng.linear_weight(H, 3 * H, dt)
    g_in, g_hidden, g_final = (rng.norm_weight(H, dt) for _ in range(3))
    cf = _compile(mini_drafter, dynamic=True)
    for T in (5, 17, 64):
        aux, emb, resid = rng.randn((T, 3 * H), dt), rng.randn((T, H), dt), rng.randn((T, H), dt)
        args = (aux, emb, w_fc, g_in, g_hidden, g_final, resid)
        _assert_same(cf(*args), mini_drafter(*args), f"mini drafter T={T}")
