"""How things are timed: host clock (CPU), CUDA events over rotated inputs, CUDA-graph
replay, and the two ceilings (copy bandwidth, matmul rate) measured in the same run.

Every timer takes a list of zero-argument calls, one per rotated input set, and calls
them round-robin; only those calls run between the clock reads. A sample is a batch of
back-to-back calls (enough to last ``min_sample_s``); the reported figures are the median
and the 20th / 80th percentiles of the per-call time over the samples.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch

Call = Callable[[], object]


@dataclass
class Stats:
    median_us: float
    p20_us: float
    p80_us: float
    reps: int   # samples
    batch: int  # calls per sample


@dataclass
class Budget:
    """Samples are taken until ``seconds`` are spent, within [min_reps, max_reps];
    ``repeat`` fixes the number of samples instead."""

    seconds: float = 0.2
    min_reps: int = 10
    max_reps: int = 300
    repeat: Optional[int] = None
    min_sample_s: float = 100e-6

    def reps_for(self, sample_s: float) -> int:
        if self.repeat:
            return self.repeat
        return int(min(self.max_reps, max(self.min_reps, self.seconds / max(sample_s, 1e-9))))


def _quantile(sorted_vals: Sequence[float], q: float) -> float:
    if len(sorted_vals) == 1:
        return sorted_vals[0]
    pos = q * (len(sorted_vals) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def summarize(per_call_s: Sequence[float], batch: int) -> Stats:
    v = sorted(per_call_s)
    return Stats(_quantile(v, 0.5) * 1e6, _quantile(v, 0.2) * 1e6, _quantile(v, 0.8) * 1e6, len(v), batch)


class _RoundRobin:
    def __init__(self, calls: Sequence[Call]):
        self.calls, self.i = list(calls), 0

    def run(self, n: int) -> None:
        calls, k = self.calls, len(self.calls)
        for _ in range(n):
            calls[self.i % k]()
            self.i += 1


# ---- CPU ----------------------------------------------------------------------------------


def time_host(calls: Sequence[Call], budget: Budget) -> Stats:
    """time.perf_counter around batches of calls (CPU work: the calls are synchronous)."""
    rr = _RoundRobin(calls)
    t0 = time.perf_counter()
    rr.run(len(calls))  # warm-up: one pass over every input set
    t_est = (time.perf_counter() - t0) / len(calls)
    batch = max(1, math.ceil(budget.min_sample_s / max(t_est, 1e-9)))
    reps = budget.reps_for(batch * t_est)
    samples = []
    for _ in range(reps):
        t = time.perf_counter()
        rr.run(batch)
        samples.append((time.perf_counter() - t) / batch)
    return summarize(samples, batch)


# ---- CUDA ---------------------------------------------------------------------------------


def _event():
    return torch.cuda.Event(enable_timing=True)


def time_cuda(calls: Sequence[Call], budget: Budget, warmup_s: float = 0.02) -> Stats:
    """CUDA events around batches of calls on the current stream, after warm-up. The host
    is never synchronised between samples, so launch-bound calls are timed at the rate the
    host issues them (what eager serving sees); see :func:`time_cuda_graph` for GPU time."""
    rr = _RoundRobin(calls)
    rr.run(len(calls))
    torch.cuda.synchronize()
    s, e = _event(), _event()
    s.record()
    rr.run(len(calls))
    e.record()
    e.synchronize()
    t_est = s.elapsed_time(e) * 1e-3 / len(calls)
    extra = math.ceil(warmup_s / max(t_est, 1e-9)) if t_est * len(calls) < warmup_s else 0
    rr.run(min(extra, 10_000))
    batch = max(1, math.ceil(budget.min_sample_s / max(t_est, 1e-9)))
    reps = budget.reps_for(batch * t_est)
    starts, ends = [_event() for _ in range(reps)], [_event() for _ in range(reps)]
    for i in range(reps):
        starts[i].record()
        rr.run(batch)
        ends[i].record()
    torch.cuda.synchronize()
    return summarize([a.elapsed_time(b) * 1e-3 / batch for a, b in zip(starts, ends)], batch)


def time_cuda_graph(calls: Sequence[Call], calls_per_graph: int, budget: Budget) -> Stats:
    """Captures ``calls_per_graph`` back-to-back calls (round-robin over the input sets) in
    one CUDA graph and times its replays with events; reports the per-call time."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
        _RoundRobin(calls).run(len(calls))
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    rr = _RoundRobin(calls)
    with torch.cuda.graph(graph):
        rr.run(calls_per_graph)
    try:
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        s, e = _event(), _event()
        s.record()
        graph.replay()
        e.record()
        e.synchronize()
        t_replay = s.elapsed_time(e) * 1e-3
        reps = budget.reps_for(t_replay)
        starts, ends = [_event() for _ in range(reps)], [_event() for _ in range(reps)]
        for i in range(reps):
            starts[i].record()
            graph.replay()
            ends[i].record()
        torch.cuda.synchronize()
        return summarize([a.elapsed_time(b) * 1e-3 / calls_per_graph for a, b in zip(starts, ends)],
                         calls_per_graph)
    finally:
        del graph
        torch.cuda.synchronize()


# ---- ceilings and cache sizes -------------------------------------------------------------


def _time(fn: Call, device: str, reps: int, warmup: int = 3) -> float:
    """Median seconds of ``fn`` over ``reps`` single calls."""
    budget = Budget(seconds=0.0, min_reps=reps, max_reps=reps, min_sample_s=0.0)
    for _ in range(warmup - 1):
        fn()
    stats = time_cuda([fn], budget) if device == "cuda" else time_host([fn], budget)
    return stats.median_us * 1e-6


def copy_gbps(device: str, nbytes: int, reps: int = 20) -> float:
    """Copy bandwidth, bytes read + written: ``dst.copy_(src)`` of ``nbytes`` into a buffer
    allocated beforehand (device-to-device on CUDA; on CPU a large memcpy-like clone without
    the page faults a fresh allocation adds)."""
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = _time(lambda: dst.copy_(src), device, reps)
    return 2 * n * 4 / t / 1e9


def clone_gbps(device: str, nbytes: int, reps: int = 5) -> float:
    """``x.clone()`` rate (bytes read + written), allocation included."""
    src = torch.randn(nbytes // 4, device=device)
    t = _time(lambda: src.clone(), device, reps)
    return 2 * src.numel() * 4 / t / 1e9


def matmul_tflops(device: str, dtype: torch.dtype, n: int, reps: int = 10) -> float:
    """Rate of an n x n x n matmul on random data."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    t = _time(lambda: torch.mm(a, b), device, reps)
    return 2 * n ** 3 / t / 1e12


def cuda_l2_bytes() -> tuple[int, bool]:
    """(L2 size, measured?) of device 0; 60 MB assumed when torch does not report it."""
    size = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) or 0
    return (int(size), True) if size > 0 else (60 * 10 ** 6, False)


def cpu_llc_bytes() -> tuple[int, bool]:
    """(last-level cache size, measured?) from sysfs; 32 MiB assumed when unreadable."""
    best = 0
    for idx in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (idx / "size").read_text().strip().upper()
            mult = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}.get(text[-1], 1)
            best = max(best, int(text.rstrip("KMG")) * mult)
        except (OSError, ValueError):
            continue
    return (best, True) if best else (32 * 1024 ** 2, False)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def reset_ceiling_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()


__all__: List[str] = [
    "Stats", "Budget", "summarize", "time_host", "time_cuda", "time_cuda_graph", "copy_gbps", "clone_gbps",
    "matmul_tflops", "cuda_l2_bytes", "cpu_llc_bytes", "sync", "reset_ceiling_memory",
]
