"""Bad inputs raise an error that names the argument, and nothing crashes.

Each case runs through the Python wrapper ``eagle3_ops.<op>`` and, where the check lives
in C++, through ``torch.ops.eagle3.<op>.default`` directly (so the C++ checks are tested
without the wrapper in front). ValueError / TypeError / RuntimeError are all accepted;
the message must match the case's pattern (the argument's name and what was wrong).
Cases that need two devices run only where CUDA is present. A subset also runs on the
"meta" device, i.e. through the fake implementations that ``torch.compile`` traces.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch

import eagle3_ops
from conftest import devices, requires_cuda

E = torch.ops.eagle3
ERRORS = (ValueError, TypeError, RuntimeError)
EPS = 1e-6


def X(dev, *shape, dtype=torch.float32):
    return (torch.rand(shape, dtype=torch.float32) + 0.5).to(device=dev, dtype=dtype)


def other_device(dev):
    return "cpu" if torch.device(dev).type == "cuda" else "cuda"


@dataclass
class Case:
    name: str
    wrapper: Callable            # (dev) -> calls eagle3_ops.<op>
    raw: Optional[Callable]      # (dev) -> calls torch.ops.eagle3.<op>.default, None if the check is Python-only
    match: str
    cuda_only: bool = False      # needs a second device
    meta: bool = False           # the fake (meta) implementation checks this too
    xfail: Optional[str] = None  # a known bug: reason


def _xs(dev, widths=(64, 100), T=4, dtype=torch.float32):
    return [X(dev, T, h, dtype=dtype) for h in widths]


# ---- rms_norm_cat ---------------------------------------------------------------------------

def _nc(dev, xs, weights=None, eps=EPS, shared=False):
    return eagle3_ops.rms_norm_cat(xs, weights, eps, shared)


def _nc_raw(dev, xs, weights=None, eps=EPS, shared=False):
    weights = [None] * len(xs) if weights is None else weights
    return E.rms_norm_cat.default(xs, weights, eps, shared)


def nc_case(name, make, match, **kw):
    """make(dev) -> (xs, weights, eps)"""
    return Case(name, lambda d: _nc(d, *make(d)), lambda d: _nc_raw(d, *make(d)), match, **kw)


RMS_NORM_CAT_CASES = [
    # An empty xs reaches the dispatcher with no tensor argument; the wrapper checks it.
    Case("K=0", lambda d: eagle3_ops.rms_norm_cat([]), None, r"xs must hold at least one tensor"),
    Case("K=0 weights=[]", lambda d: eagle3_ops.rms_norm_cat([], []), None, r"xs must hold at least one tensor"),
    nc_case("weights shorter", lambda d: (_xs(d), [None]), r"weights must have one entry.*1 weights for 2 inputs",
            meta=True),
    nc_case("weights longer", lambda d: (_xs(d), [None, None, None]), r"weights.*3 weights for 2 inputs", meta=True),
    nc_case("leading shapes", lambda d: ([X(d, 4, 64), X(d, 5, 100)], None, EPS),
            r"xs must have the same leading shape.*xs\[1\]", meta=True),
    nc_case("leading ranks", lambda d: ([X(d, 4, 64), X(d, 2, 2, 100)], None, EPS),
            r"same leading shape.*xs\[1\]", meta=True),
    nc_case("mixed dtypes", lambda d: ([X(d, 4, 64), X(d, 4, 100, dtype=torch.float16)], None, EPS),
            r"xs.*one (float )?dtype.*xs\[1\]", meta=True),
    nc_case("int xs", lambda d: ([X(d, 4, 64, dtype=torch.int32)], None, EPS), r"xs.*float32.*Int|xs\[0\]",
            meta=True),
    nc_case("float64 xs", lambda d: ([X(d, 4, 64, dtype=torch.float64)], None, EPS), r"xs.*(Double|float64)",
            meta=True),
    nc_case("0-d xs", lambda d: ([X(d)], None, EPS), r"xs\[0\] must have at least one dimension"),
    nc_case("empty width", lambda d: ([X(d, 4, 64), X(d, 4, 0)], None, EPS), r"xs\[1\] has an empty last dimension"),
    nc_case("weight length", lambda d: (_xs(d), [None, X(d, 99)], EPS), r"weights\[1\] must be 1-D of length 100"),
    nc_case("weight rank", lambda d: (_xs(d), [X(d, 1, 64), None], EPS), r"weights\[0\] must be 1-D of length 64"),
    nc_case("weight 0-d", lambda d: (_xs(d), [X(d), None], EPS), r"weights\[0\] must be 1-D"),
    nc_case("weight int", lambda d: (_xs(d), [X(d, 64, dtype=torch.int64), None], EPS),
            r"weights\[0\] must be of x's dtype"),
    nc_case("weight float64", lambda d: (_xs(d), [None, X(d, 100, dtype=torch.float64)], EPS),
            r"weights\[1\] must be of x's dtype.*Double"),
    nc_case("weight fp16 on bf16 xs", lambda d: (_xs(d, dtype=torch.bfloat16), [X(d, 64, dtype=torch.float16), None],
                                                  EPS), r"weights\[0\] must be of x's dtype \(BFloat16\) or float32"),
    nc_case("eps 0", lambda d: (_xs(d), None, 0.0), r"eps must be a finite number > 0", meta=True),
    nc_case("eps negative", lambda d: (_xs(d), None, -1e-6), r"eps must be a finite number > 0", meta=True),
    nc_case("eps nan", lambda d: (_xs(d), None, math.nan), r"eps must be a finite number > 0", meta=True),
    nc_case("eps inf", lambda d: (_xs(d), None, math.inf), r"eps must be a finite number > 0", meta=True),
    nc_case("K=65", lambda d: ([X(d, 2, 8) for _ in range(65)], None, EPS), r"xs may hold at most 64 tensors, got 65"),
    Case("xs bare tensor", lambda d: eagle3_ops.rms_norm_cat(X(d, 4, 64)),
         lambda d: E.rms_norm_cat.default(X(d, 4, 64), [None], EPS, False), r"xs must be a list|argument 'xs'"),
    Case("xs holds a non-tensor", lambda d: eagle3_ops.rms_norm_cat([X(d, 4, 64), 3.0]), None,
         r"xs\[1\] must be a tensor"),
    Case("weights bare tensor", lambda d: eagle3_ops.rms_norm_cat([X(d, 4, 64)], X(d, 64)), None,
         r"weights must be a list"),
    Case("weights holds a non-tensor", lambda d: eagle3_ops.rms_norm_cat([X(d, 4, 64)], ["w"]), None,
         r"weights\[0\] must be a tensor or None"),
    nc_case("mixed devices", lambda d: ([X(d, 4, 64), X(other_device(d), 4, 100)], None, EPS),
            r"xs must be on one device.*xs\[1\]", cuda_only=True),
    nc_case("weight device", lambda d: (_xs(d), [X(other_device(d), 64), None], EPS), r"weights\[0\] is on",
            cuda_only=True),
]

# ---- fused_add_rms_norm ---------------------------------------------------------------------


def fa_case(name, make, match, **kw):
    """make(dev) -> (x, residual, weight, eps)"""
    return Case(name, lambda d: eagle3_ops.fused_add_rms_norm(*make(d)),
                lambda d: E.fused_add_rms_norm.default(*make(d)), match, **kw)


FUSED_ADD_CASES = [
    fa_case("residual shape", lambda d: (X(d, 4, 64), X(d, 4, 65), None, EPS), r"residual must have x's shape",
            meta=True),
    fa_case("residual lead shape", lambda d: (X(d, 4, 64), X(d, 2, 2, 64), None, EPS), r"residual must have x's shape",
            meta=True),
    fa_case("residual dtype", lambda d: (X(d, 4, 64), X(d, 4, 64, dtype=torch.bfloat16), None, EPS),
            r"residual must have x's dtype"),
    fa_case("int x", lambda d: (X(d, 4, 64, dtype=torch.int32), X(d, 4, 64, dtype=torch.int32), None, EPS),
            r"x must be float32, float16 or bfloat16"),
    fa_case("float64 x", lambda d: (X(d, 4, 64, dtype=torch.float64), X(d, 4, 64, dtype=torch.float64), None, EPS),
            r"x must be float32.*Double"),
    fa_case("0-d x", lambda d: (X(d), X(d), None, EPS), r"x must have at least one dimension"),
    fa_case("empty width", lambda d: (X(d, 4, 0), X(d, 4, 0), None, EPS), r"x has an empty last dimension"),
    fa_case("weight length", lambda d: (X(d, 4, 64), X(d, 4, 64), X(d, 63), EPS), r"weight must be 1-D of length 64"),
    fa_case("weight rank", lambda d: (X(d, 4, 64), X(d, 4, 64), X(d, 1, 64), EPS), r"weight must be 1-D of length 64"),
    fa_case("weight int", lambda d: (X(d, 4, 64), X(d, 4, 64), X(d, 64, dtype=torch.int32), EPS),
            r"weight must be of x's dtype"),
    fa_case("weight float64", lambda d: (X(d, 4, 64), X(d, 4, 64), X(d, 64, dtype=torch.float64), EPS),
            r"weight must be of x's dtype.*Double"),
    fa_case("weight fp16 on bf16", lambda d: (X(d, 4, 64, dtype=torch.bfloat16), X(d, 4, 64, dtype=torch.bfloat16),
                                              X(d, 64, dtype=torch.float16), EPS),
            r"weight must be of x's dtype \(BFloat16\) or float32"),
    fa_case("eps 0", lambda d: (X(d, 4, 64), X(d, 4, 64), None, 0.0), r"eps must be a finite number > 0", meta=True),
    fa_case("eps negative", lambda d: (X(d, 4, 64), X(d, 4, 64), None, -1.0), r"eps must be a finite number > 0",
            meta=True),
    fa_case("eps nan", lambda d: (X(d, 4, 64), X(d, 4, 64), None, math.nan), r"eps must be a finite number > 0",
            meta=True),
    fa_case("eps inf", lambda d: (X(d, 4, 64), X(d, 4, 64), None, math.inf), r"eps must be a finite number > 0",
            meta=True),
    fa_case("x not a tensor", lambda d: ([X(d, 4, 64)], X(d, 4, 64), None, EPS), r"argument 'x'"),
    fa_case("residual device", lambda d: (X(d, 4, 64), X(other_device(d), 4, 64), None, EPS), r"residual is on",
            cuda_only=True),
    fa_case("weight device", lambda d: (X(d, 4, 64), X(d, 4, 64), X(other_device(d), 64), EPS), r"weight is on",
            cuda_only=True),
]

# ---- rms_norm_cat_linear --------------------------------------------------------------------


def lin_case(name, make, match, **kw):
    """make(dev) -> (xs, weight, eps, norm)"""
    return Case(name, lambda d: eagle3_ops.rms_norm_cat_linear(*make(d)),
                lambda d: E.rms_norm_cat_linear.default(*make(d)), match, **kw)


LINEAR_CASES = [
    lin_case("K=0", lambda d: ([], X(d, 8, 164), EPS, "chunk"), r"xs must hold at least one tensor"),
    lin_case("leading shapes", lambda d: ([X(d, 4, 64), X(d, 3, 100)], X(d, 8, 164), EPS, "chunk"),
             r"same leading shape.*xs\[1\]", meta=True),
    lin_case("mixed dtypes", lambda d: ([X(d, 4, 64), X(d, 4, 100, dtype=torch.bfloat16)], X(d, 8, 164), EPS,
                                        "chunk"), r"xs.*one (float )?dtype.*xs\[1\]", meta=True),
    lin_case("int xs", lambda d: ([X(d, 4, 64, dtype=torch.int64)], X(d, 8, 64, dtype=torch.int64), EPS, "chunk"),
             r"xs.*float32", meta=True),
    lin_case("weight dtype", lambda d: (_xs(d), X(d, 8, 164, dtype=torch.float16), EPS, "chunk"),
             r"weight must have x's dtype"),
    lin_case("weight fp32 on bf16 xs", lambda d: (_xs(d, dtype=torch.bfloat16), X(d, 8, 164), EPS, "chunk"),
             r"weight must have x's dtype \(BFloat16\), got Float"),
    lin_case("weight float64", lambda d: (_xs(d), X(d, 8, 164, dtype=torch.float64), EPS, "chunk"),
             r"weight must have x's dtype.*Double"),
    lin_case("weight 1-D", lambda d: (_xs(d), X(d, 164), EPS, "chunk"), r"weight must be 2-D", meta=True),
    lin_case("weight 3-D", lambda d: (_xs(d), X(d, 2, 8, 164), EPS, "chunk"), r"weight must be 2-D", meta=True),
    lin_case("weight width", lambda d: (_xs(d), X(d, 8, 163), EPS, "chunk"), r"weight must (have sum H_k = 164|be 2-D)",
             meta=True),
    lin_case("weight transposed", lambda d: (_xs(d), X(d, 164, 8), EPS, "chunk"), r"weight must (have sum H_k|be 2-D)",
             meta=True),
    lin_case("norm unknown", lambda d: (_xs(d), X(d, 8, 164), EPS, "rms"), r"norm must be one of", meta=True),
    lin_case("norm case", lambda d: (_xs(d), X(d, 8, 164), EPS, "Chunk"), r"norm must be one of", meta=True),
    lin_case("norm empty", lambda d: (_xs(d), X(d, 8, 164), EPS, ""), r"norm must be one of", meta=True),
    Case("norm not a str", lambda d: eagle3_ops.rms_norm_cat_linear(_xs(d), X(d, 8, 164), EPS, None),
         lambda d: E.rms_norm_cat_linear.default(_xs(d), X(d, 8, 164), EPS, None),
         r"norm must be a str|argument 'norm'"),
    Case("norm a bool", lambda d: eagle3_ops.rms_norm_cat_linear(_xs(d), X(d, 8, 164), EPS, True), None,
         r"norm must be a str"),
    lin_case("eps 0", lambda d: (_xs(d), X(d, 8, 164), 0.0, "chunk"), r"eps must be a finite number > 0", meta=True),
    lin_case("eps negative", lambda d: (_xs(d), X(d, 8, 164), -1e-6, "shared"), r"eps must be a finite number > 0",
             meta=True),
    lin_case("eps nan", lambda d: (_xs(d), X(d, 8, 164), math.nan, "chunk"), r"eps must be a finite number > 0",
             meta=True),
    lin_case("eps inf", lambda d: (_xs(d), X(d, 8, 164), math.inf, "none"), r"eps must be a finite number > 0",
             meta=True),
    Case("xs bare tensor", lambda d: eagle3_ops.rms_norm_cat_linear(X(d, 4, 164), X(d, 8, 164)),
         lambda d: E.rms_norm_cat_linear.default(X(d, 4, 164), X(d, 8, 164), EPS, "chunk"),
         r"xs must be a list|argument 'xs'"),
    lin_case("mixed devices", lambda d: ([X(d, 4, 64), X(other_device(d), 4, 100)], X(d, 8, 164), EPS, "chunk"),
             r"xs must be on one device.*xs\[1\]", cuda_only=True),
    lin_case("weight device", lambda d: (_xs(d), X(other_device(d), 8, 164), EPS, "chunk"), r"weight is on",
             cuda_only=True),
]

# ---- fold_norm_weights (Python only) --------------------------------------------------------

FOLD_CASES = [
    Case("widths add up short", lambda d: eagle3_ops.fold_norm_weights(X(d, 8, 164), [X(d, 64), X(d, 99)]), None,
         r"norm weights' widths \[64, 99\] add up to 163.*164 columns"),
    Case("widths add up long", lambda d: eagle3_ops.fold_norm_weights(X(d, 8, 164), [X(d, 64), X(d, 100), X(d, 1)]),
         None, r"add up to 165"),
    Case("single weight width", lambda d: eagle3_ops.fold_norm_weights(X(d, 8, 164), X(d, 100)), None,
         r"add up to 100"),
    Case("fc_weight 1-D", lambda d: eagle3_ops.fold_norm_weights(X(d, 164), [X(d, 164)]), None,
         r"fc_weight must be a 2-D"),
    Case("fc_weight not a tensor", lambda d: eagle3_ops.fold_norm_weights([[1.0]], [X(d, 1)]), None,
         r"fc_weight must be a 2-D"),
    Case("norm weight 2-D", lambda d: eagle3_ops.fold_norm_weights(X(d, 8, 164), [X(d, 1, 64), X(d, 100)]), None,
         r"norm_weights\[0\] must be 1-D"),
    Case("norm weights empty", lambda d: eagle3_ops.fold_norm_weights(X(d, 8, 164), []), None,
         r"norm_weights must hold at least one tensor"),
    Case("norm weights non-tensor", lambda d: eagle3_ops.fold_norm_weights(X(d, 8, 164), [X(d, 64), 1.0]), None,
         r"norm_weights\[1\] must be a tensor"),
]

ALL = {"rms_norm_cat": RMS_NORM_CAT_CASES, "fused_add_rms_norm": FUSED_ADD_CASES,
       "rms_norm_cat_linear": LINEAR_CASES, "fold_norm_weights": FOLD_CASES}


def _params(path: str):
    out = []
    for op, cases in ALL.items():
        for c in cases:
            if path == "raw" and c.raw is None:
                continue
            if path == "meta" and not c.meta:
                continue
            marks = []
            if c.cuda_only:
                marks.append(requires_cuda)
            if c.xfail and path == "wrapper":
                marks.append(pytest.mark.xfail(strict=True, raises=AssertionError, reason=c.xfail))
            out.append(pytest.param(c, id=f"{op}-{c.name}", marks=marks))
    return out


def _check(call, dev, match):
    with pytest.raises(ERRORS, match=match):
        call(dev)


@pytest.mark.parametrize("case", _params("wrapper"))
def test_bad_input_wrapper(case, device):
    _check(case.wrapper, device, case.match)


@pytest.mark.parametrize("case", _params("raw"))
def test_bad_input_torch_ops(case, device):
    """The same input straight into torch.ops.eagle3 (the C++ checks without the wrapper)."""
    _check(case.raw, device, case.match)


@pytest.mark.parametrize("case", _params("meta"))
def test_bad_input_fake_impl(case):
    """The fake implementations (what torch.compile traces) reject it too, naming the argument."""
    _check(case.raw, "meta", case.match)


@pytest.mark.parametrize("device", devices)
def test_k0_raw_raises_without_crashing(device):
    # Through torch.ops an empty list has no tensor to dispatch on; whatever the message,
    # it must be an exception, not a crash. (Also see the K=0 wrapper case.)
    with pytest.raises(ERRORS):
        E.rms_norm_cat.default([], [], EPS, False)
    with pytest.raises(ERRORS):
        E.rms_norm_cat.default([], [], EPS, True)


@pytest.mark.parametrize("device", devices)
def test_good_inputs_still_work(device):
    """The inputs the bad cases start from are accepted once the defect is removed (so a
    case cannot pass merely because every call fails)."""
    xs = _xs(device)
    assert eagle3_ops.rms_norm_cat(xs).shape == (4, 164)
    assert eagle3_ops.rms_norm_cat(xs, [X(device, 64), X(device, 100)], 1e-5, True).shape == (4, 164)
    assert eagle3_ops.rms_norm_cat(_xs(device, dtype=torch.bfloat16), [X(device, 64), None]).shape == (4, 164)
    n, s = eagle3_ops.fused_add_rms_norm(X(device, 4, 64), X(device, 4, 64), X(device, 64), EPS)
    assert n.shape == s.shape == (4, 64)
    for norm in ("none", "chunk", "shared"):
        assert eagle3_ops.rms_norm_cat_linear(xs, X(device, 8, 164), EPS, norm).shape == (4, 8)
    assert eagle3_ops.rms_norm_cat_linear([X(device, 4, 64)] * 64, X(device, 8, 64 * 64), EPS).shape == (4, 8)
    assert eagle3_ops.fold_norm_weights(X(device, 8, 164), [X(device, 64), X(device, 100)]).shape == (8, 164)


def test_ops_refuse_to_run_where_autograd_needs_a_backward():
    """The ops have no backward: with grad mode on and an input that requires grad they raise
    (rather than return an output whose gradient would silently be missing); under no_grad,
    or with no input requiring grad, they run."""
    x = torch.randn(3, 8, requires_grad=True)
    w = torch.randn(4, 8)
    calls = {
        "rms_norm_cat": lambda a: eagle3_ops.rms_norm_cat([a], [None]),
        "fused_add_rms_norm": lambda a: eagle3_ops.fused_add_rms_norm(a, a.detach(), None),
        "rms_norm_cat_linear": lambda a: eagle3_ops.rms_norm_cat_linear([a], w, 1e-6, "chunk"),
    }
    for name, call in calls.items():
        with pytest.raises(RuntimeError, match=rf"{name}: has no backward"):
            call(x)
        with torch.no_grad():
            call(x)
        call(x.detach())


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("nm") is None, reason="needs Linux and nm")
def test_library_exports_no_cxx_runtime():
    """The library must not carry an exported copy of the C++ runtime. A build that linked
    libstdc++.a (the toolchain found no libstdc++.so) exported its own std::locale / ostream
    symbols; streams then met the other copy's facets, and every error message that held a
    number segfaulted instead of raising (seen on a GPU machine). CMakeLists.txt links the
    shared runtime there, and keeps any static copy's symbols inside the library."""
    out = subprocess.run(["nm", "-D", "--defined-only", str(eagle3_ops._lib)], capture_output=True, text=True,
                         check=True).stdout
    names = [line.split()[-1] for line in out.splitlines() if line.strip()]
    assert any("eagle3" in n for n in names), "nm listed none of the library's own symbols"
    runtime = [n for n in names if n.startswith(("_ZNSt6locale", "_ZNSo9_M_insert", "_ZNSt8ios_base"))]
    assert not runtime, f"the library exports {len(runtime)} libstdc++ symbols, e.g. {runtime[:3]}"
