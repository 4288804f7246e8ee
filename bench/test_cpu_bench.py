"""CPU benchmarks (pytest-benchmark) and the CPU speed-up checks.

Not part of the default test run (pyproject's testpaths is python_tests); run with::

    pytest bench/                                  # everything below
    pytest bench/ -k speedup                       # only the ratio checks
    pytest bench/ --benchmark-only --benchmark-group-by=group

Each benchmark group holds one case (op, dtype, T=2048, H=4096, K=3) with three members:
``eagle3`` (our op), ``eager`` (the composition from eagle3_ops.reference) and ``copy``
(``x.clone()`` of the same bytes: the roofline), so their ratios sit side by side.
``extra_info`` records the bytes moved and the GB/s of the median.

``test_cpu_speedup`` times ours and eager in this process with the runner's timer
(median over several samples, inputs rotated past the last-level cache) and asserts the
issue's ratios: rms_norm_cat >= 2x and fused_add_rms_norm >= 1.5x faster than eager.
"""

from __future__ import annotations

import os

import pytest
import torch

from bench import cases as C
from bench import timing

T, H = 2048, 4096
OPS = ("rms_norm_cat", "fused_add_rms_norm")
DTYPES = (torch.bfloat16, torch.float32)
MIN_SPEEDUP = {"rms_norm_cat": 2.0, "fused_add_rms_norm": 1.5}


def _case(op: str, dtype: torch.dtype) -> C.Case:
    return C.make_case(op, T, H, dtype, "cpu")


def _checked_call(case: C.Case, impl: C.Impl, inp) -> callable:
    """The timed call, after its output passed the numerics rule (copy is not checked)."""
    call = impl.prepare(inp)
    if impl.name != "copy":
        chk = C.Checker(case, inp)(call())
        assert chk.ok, f"{case.label} [{impl.name}]: rel err {chk.err:.3g} > tol {chk.tol:.3g}"
    return call


def _impl(case: C.Case, name: str) -> C.Impl:
    if name == "copy":
        return C.copy_roofline(case)
    return next(i for i in C.implementations(case, with_compile=False).impls if i.name == name)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.inference_mode():
        yield


@pytest.mark.parametrize("impl", ["eagle3", "eager", "copy"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: C.DTYPE_NAMES[d])
@pytest.mark.parametrize("op", OPS)
def test_cpu_bench(benchmark, op, dtype, impl):
    case = _case(op, dtype)
    inp = C.make_inputs(case, seed=0)
    call = _checked_call(case, _impl(case, impl), inp)
    benchmark.group = f"{op} {case.dtype_name} T={T} H={H} K={case.K}"
    benchmark.extra_info.update(op=op, impl=impl, dtype=case.dtype_name, T=T, H=H, K=case.K,
                                bytes=case.bytes_moved(), threads=torch.get_num_threads())
    benchmark(call)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:  # None under --benchmark-disable
        benchmark.extra_info["gbps"] = case.bytes_moved() / stats.stats.median / 1e9


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: C.DTYPE_NAMES[d])
@pytest.mark.parametrize("op", OPS)
def test_cpu_speedup(op, dtype):
    case = _case(op, dtype)
    cache, _ = timing.cpu_llc_bytes()
    n_rot = C.rotation_copies(case, cache, cap=4, mem_cap_bytes=1 << 30)
    inputs = [C.make_inputs(case, seed=i) for i in range(n_rot)]
    budget = timing.Budget(seconds=0.0, min_reps=9, max_reps=9, min_sample_s=0.0)
    call_sets = {}
    for name in ("eagle3", "eager"):
        impl = _impl(case, name)
        call_sets[name] = [_checked_call(case, impl, inputs[0])] + [impl.prepare(i) for i in inputs[1:]]
    med = {}
    for name, st in timing.time_interleaved(call_sets, budget, "cpu").items():  # timed together, in turns
        if isinstance(st, Exception):
            raise st
        med[name] = st.median_us
    ratio = med["eager"] / med["eagle3"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\n{case.label}: eagle3 {med['eagle3']:.0f} us, eager {med['eager']:.0f} us, {ratio:.2f}x "
          f"(load average {load:.1f}, {torch.get_num_threads()} threads)")
    assert ratio >= MIN_SPEEDUP[op], (
        f"{case.label}: eagle3 is {ratio:.2f}x faster than eager, expected >= {MIN_SPEEDUP[op]}x "
        f"(eagle3 {med['eagle3']:.0f} us, eager {med['eager']:.0f} us; load average {load:.1f})")
