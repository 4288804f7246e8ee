"""How things are timed: host clock (CPU), CUDA events over rotated inputs, CUDA-graph
replay, and the two ceilings (copy bandwidth, matmul rate) measured in the same run.

Every timer takes a list of zero-argument calls, one per rotated input set, and calls
them round-robin; only those calls run between the clock reads. A sample is a batch of
back-to-back calls (enough to last ``min_sample_s``); the reported figures are the median
and the 20th / 80th percentiles of the per-call time over the samples.

The implementations of one case are timed together (:func:`time_interleaved`,
:func:`time_graphs_interleaved`; one alone through :func:`time_calls`): each takes its
samples in several turns, in rotating order, so a drift of the card's clocks or power
state while the case runs reaches every implementation alike instead of whichever was
timed last.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Dict, List, Mapping, Optional, Sequence, Union

import torch

Call = Callable[[], object]


@dataclass
class Stats:
    median_us: float
    p20_us: float
    p80_us: float
    reps: int   # samples
    batch: int  # calls per sample
    # CUDA: the host's median time per call to issue a sample's calls (between the two event
    # records); close to median_us where the host, not the device, sets the rate
    host_us: Optional[float] = None


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


def summarize(per_call_s: Sequence[float], batch: int, host_per_call_s: Sequence[float] = ()) -> Stats:
    v = sorted(per_call_s)
    host = _quantile(sorted(host_per_call_s), 0.5) * 1e6 if host_per_call_s else None
    return Stats(_quantile(v, 0.5) * 1e6, _quantile(v, 0.2) * 1e6, _quantile(v, 0.8) * 1e6, len(v), batch, host)


class _RoundRobin:
    def __init__(self, calls: Sequence[Call]):
        self.calls, self.i = list(calls), 0

    def run(self, n: int) -> None:
        calls, k = self.calls, len(self.calls)
        for _ in range(n):
            calls[self.i % k]()
            self.i += 1


def _event():
    return torch.cuda.Event(enable_timing=True)


# ---- several implementations, interleaved ---------------------------------------------------

#: Turns each implementation's samples are split into (fewer when it takes fewer samples).
ROUNDS = 10
#: Calls at least this long start a turn without an unmeasured batch: an idle device costs
#: them a launch latency of a few microseconds, a fraction of a percent.
STEADY_CALL_S = 1e-3


def _estimate(rr: _RoundRobin, n: int, cuda: bool, warmup_s: float = 0.02) -> float:
    """Seconds per call after warm-up: one pass over the input sets, then one timed pass
    (on CUDA more calls follow until ``warmup_s`` of warm-up has run)."""
    if not cuda:
        t0 = time.perf_counter()
        rr.run(n)
        return (time.perf_counter() - t0) / n
    rr.run(n)
    torch.cuda.synchronize()
    s, e = _event(), _event()
    s.record()
    rr.run(n)
    e.record()
    e.synchronize()
    t_est = s.elapsed_time(e) * 1e-3 / n
    if t_est * n < warmup_s:
        rr.run(min(math.ceil(warmup_s / max(t_est, 1e-9)), 10_000))
    return t_est


def _turn(run_batch: Callable[[], None], samples: int, warm: bool, cuda: bool,
          host: Optional[List[float]] = None) -> List[float]:
    """One implementation's turn: from an idle device, one unmeasured batch where ``warm``
    (the host's launches reach their steady state: queued behind the device for calls it
    runs faster than the host issues them, issued as they run otherwise), then ``samples``
    batches, each between two clock reads. Seconds per batch; on CUDA the host's seconds
    to issue each batch are appended to ``host`` where given."""
    if not cuda:
        if warm:
            run_batch()
        out = []
        for _ in range(samples):
            t = time.perf_counter()
            run_batch()
            out.append(time.perf_counter() - t)
        return out
    torch.cuda.synchronize()
    if warm:
        run_batch()
    starts, ends = [_event() for _ in range(samples)], [_event() for _ in range(samples)]
    for i in range(samples):
        starts[i].record()
        t = time.perf_counter()
        run_batch()
        if host is not None:
            host.append(time.perf_counter() - t)
        ends[i].record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) * 1e-3 for a, b in zip(starts, ends)]


def _rotation(names: Sequence[str], reps: int, rounds: int):
    """(round, name, samples) in the order the turns run: ``reps`` samples per name split
    over min(rounds, reps) rounds, each round starting one name further on."""
    rounds = max(1, min(rounds, reps))
    for r in range(rounds):
        share = reps // rounds + (1 if r < reps % rounds else 0)
        k = r % len(names)
        for name in list(names[k:]) + list(names[:k]):
            yield r, name, share


Contexts = Optional[Mapping[str, Callable[[], ContextManager]]]


def _within(contexts: Contexts, name: str) -> ContextManager:
    """The context an implementation's warm-up, capture and turns run in (e.g. the kernel
    switches of a variant, entered outside the clock reads), or none."""
    return contexts[name]() if contexts and name in contexts else contextlib.nullcontext()


def _sync_quietly(cuda: bool) -> None:
    if cuda:
        try:
            torch.cuda.synchronize()
        except Exception:  # the error is reported through the implementation that raised it
            pass


def time_interleaved(call_sets: Mapping[str, Sequence[Call]], budget: Budget, device: str,
                     rounds: int = ROUNDS, contexts: Contexts = None) -> Dict[str, Union[Stats, Exception]]:
    """Every implementation of one case (name -> its calls, one per rotated input set) timed
    in turns: after each one's warm-up and estimate, every implementation takes the same
    number of samples (the budget's seconds per implementation on average), split over
    ``rounds`` rounds in rotating order (:func:`_turn`; CUDA events on the current stream,
    time.perf_counter on the CPU). The host is not synchronised inside a turn, so
    launch-bound calls are timed at the rate the host issues them (what eager serving sees);
    on CUDA each Stats also holds the host's time per call to issue them (``host_us``).
    ``contexts`` (name -> context factory) wraps each name's warm-up and turns. Returns per
    name its Stats, or the exception it raised (it then leaves the rotation)."""
    cuda = device == "cuda"
    out: Dict[str, Union[Stats, Exception]] = {}
    live: Dict[str, _RoundRobin] = {}
    t_est: Dict[str, float] = {}
    for name, calls in call_sets.items():
        try:
            rr = _RoundRobin(calls)
            with _within(contexts, name):
                t_est[name] = _estimate(rr, len(calls), cuda)
            live[name] = rr
        except Exception as e:
            out[name] = e
            _sync_quietly(cuda)
    if not live:
        return out
    batch = {k: max(1, math.ceil(budget.min_sample_s / max(t_est[k], 1e-9))) for k in live}
    reps = budget.reps_for(sum(batch[k] * t_est[k] for k in live) / len(live))
    samples: Dict[str, List[float]] = {k: [] for k in live}
    host: Dict[str, List[float]] = {k: [] for k in live}
    for _, name, share in _rotation(list(live), reps, rounds):
        if name in out:
            continue
        rr, b = live[name], batch[name]
        try:
            turn_host: List[float] = []
            with _within(contexts, name):
                got = _turn(lambda: rr.run(b), share, t_est[name] < STEADY_CALL_S, cuda, turn_host)
            samples[name] += [t / b for t in got]
            host[name] += [t / b for t in turn_host]
        except Exception as e:
            out[name] = e
            _sync_quietly(cuda)
    for name in live:
        if name not in out:
            out[name] = summarize(samples[name], batch[name], host[name])
    return out


def time_graphs_interleaved(call_sets: Mapping[str, Sequence[Call]], calls_per_graph: int, budget: Budget,
                            rounds: int = ROUNDS, contexts: Contexts = None) -> Dict[str, Union[Stats, Exception]]:
    """CUDA-graph replay (GPU time) of every implementation of one case: each captures
    ``calls_per_graph`` back-to-back calls (round-robin over its input sets) in one graph,
    after one warm-up pass off the default stream (as capture requires); then the replays
    are timed in turns as :func:`time_interleaved` times calls (one unmeasured replay
    starts each turn);
    ``contexts`` wraps each name's warm-up and capture. Per name its per-call Stats, or the
    exception its capture or replay raised."""
    out: Dict[str, Union[Stats, Exception]] = {}
    graphs: Dict[str, torch.cuda.CUDAGraph] = {}
    t_replay: Dict[str, float] = {}
    try:
        for name, calls in call_sets.items():
            try:
                with _within(contexts, name):
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
                graphs[name] = graph
                for _ in range(3):
                    graph.replay()
                torch.cuda.synchronize()
                s, e = _event(), _event()
                s.record()
                graph.replay()
                e.record()
                e.synchronize()
                t_replay[name] = s.elapsed_time(e) * 1e-3
            except Exception as e:
                out[name] = e
                graphs.pop(name, None)
                _sync_quietly(True)
        if not graphs:
            return out
        reps = budget.reps_for(sum(t_replay.values()) / len(graphs))
        samples: Dict[str, List[float]] = {k: [] for k in graphs}
        for _, name, share in _rotation(list(graphs), reps, rounds):
            if name in out:
                continue
            try:
                samples[name] += [t / calls_per_graph for t in _turn(graphs[name].replay, share, True, True)]
            except Exception as e:
                out[name] = e
                _sync_quietly(True)
        for name in graphs:
            if name not in out:
                out[name] = summarize(samples[name], calls_per_graph)
        return out
    finally:
        graphs.clear()
        _sync_quietly(True)


def time_calls(calls: Sequence[Call], budget: Budget, device: str) -> Stats:
    """One implementation's calls timed by :func:`time_interleaved` alone; raises what a
    call raised."""
    st = time_interleaved({"": calls}, budget, device)[""]
    if isinstance(st, Exception):
        raise st
    return st


# ---- ceilings and cache sizes -------------------------------------------------------------


def _time(fn: Call, device: str, reps: int, warmup: int = 3) -> float:
    """Median seconds of ``fn`` over ``reps`` single calls."""
    budget = Budget(seconds=0.0, min_reps=reps, max_reps=reps, min_sample_s=0.0)
    for _ in range(warmup - 1):
        fn()
    return time_calls([fn], budget, device).median_us * 1e-6


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
    "Stats", "Budget", "summarize", "time_interleaved", "time_graphs_interleaved", "time_calls", "copy_gbps",
    "clone_gbps",
    "matmul_tflops", "cuda_l2_bytes", "cpu_llc_bytes", "sync", "reset_ceiling_memory",
]
