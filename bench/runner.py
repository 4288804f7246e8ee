"""``python -m bench``: sweep the eagle3 ops against their baselines and report rates.

For every case (op, T, H, dtype) and implementation (eagle3, eager, compile, liger, and
linear for the fc; eagle3 / eager / compile for the drafter step, where eager is the
package's pure-PyTorch reference drafter and compile its torch.compile): the output is
checked against the float64 reference first (relative error at most 2x eager's + 1e-3 for
bf16/fp16, + 1e-5 for fp32); a wrong or failing implementation is reported and not timed.
Then the correct implementations of the case are timed together, their samples taken in
interleaved turns so that a drift of the card's clocks reaches them alike (CUDA events over
rotated inputs, plus CUDA-graph replay for T <= 64; on CPU time.perf_counter), and each
row gets GB/s, TFLOP/s, % of the copy / matmul ceilings
measured in the same run, and the ratio to every baseline (time of X / time of this row:
> 1 means this row is faster).

Examples::

    python -m bench                                  # default sweep on cuda (else cpu)
    python -m bench --device cpu --quick             # about a minute or two on 2 cores
    python -m bench --ops rms_norm_cat_linear --num-tokens 1,64,4096 --fc-norms all
    python -m bench --ops midlayer_cat,fused_add_rms_norm --hidden-size 4096 --no-compile
    python -m bench --ops drafter_step                # combine + layer 0 + final norm, T = 1..512
    python -m bench --ops mla_drafter_step            # the same step of the DeepSeek (MLA) drafter
    python -m bench --device cpu --ops drafter_step --num-tokens 1,8 --hidden-size 2048

The JSON records the commit from ``git rev-parse HEAD`` (``+dirty`` when the tree has
changes); EAGLE3_COMMIT, where set, names the commit instead (a copied tree).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from . import cases as C
from . import report, timing

ROOT = Path(__file__).resolve().parent.parent

# ---- sweeps -------------------------------------------------------------------------------

GPU_T = [1, 8, 64, 512, 4096, 16384]
GPU_H = [4096, 7168, 8192]
GPU_FC_T = [1, 2, 4, 8, 16, 32, 64, 128, 512, 2048, 8192, 16384]
GPU_FC_H = [4096, 7168]
CPU_T = [1, 64, 2048]
CPU_H = [4096]
CPU_FC_T = [1, 64, 512]  # ATen's bf16 GEMM on a small CPU is slow: 2048 rows take ~20 s a call
# drafter_step (combine + layer 0 + final norm of a Llama-3-8B-like drafter, C.drafter_config).
GPU_DRAFTER_T = [1, 8, 64, 512]
GPU_DRAFTER_H = [4096]
# mla_drafter_step (the same step of a Kimi-K2-like MLA drafter, C.mla_drafter_config), at
# the DeepSeek-family width on a GPU; T as the drafter step.
GPU_MLA_DRAFTER_H = [7168]
CPU_DRAFTER_T = [1, 64]
# On a CPU the step is smaller than on a GPU: at H = 4096 it has ~290M parameters (0.6 GB in
# bf16; 2.3 GB more for the float64 truth) and ATen's bf16 GEMM on a small CPU runs at ~10
# GFLOP/s; H = 1024 (~18M parameters) keeps each case to seconds. --hidden-size overrides it.
CPU_DRAFTER_H = [1024]
CPU_MLA_DRAFTER_H = [1024]
QUICK = {
    "cuda": dict(T=[1, 64, 4096], H=[4096], fc_T=[1, 64, 4096], fc_H=[4096], drafter_T=[1, 8], drafter_H=[4096],
                 mla_drafter_H=[7168]),
    "cpu": dict(T=[1, 512], H=[4096], fc_T=[1, 16], fc_H=[4096], drafter_T=[1, 8], drafter_H=[1024],
                mla_drafter_H=[1024]),
}
GRAPH_MAX_T = 64          # T at or below which CUDA-graph replay is timed too
ROTATION_CAP = 128        # most input sets rotated (small T would need thousands)
ROTATION_MEM = 4 << 30    # most bytes held by rotated input sets (CUDA)
ROTATION_MEM_CPU = 1 << 30


@dataclass
class Config:
    device: str
    quick: bool
    budget: timing.Budget
    graph_budget: timing.Budget
    with_compile: bool
    cache_bytes: int
    liger: Any
    liger_note: str


def _ints(text: str) -> List[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}")
    if not vals or min(vals) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return vals


def _names(allowed, what):
    def parse(text: str) -> List[str]:
        vals = [v.strip() for v in text.split(",") if v.strip()]
        if vals == ["all"]:
            return list(allowed)
        bad = [v for v in vals if v not in allowed]
        if bad or not vals:
            raise argparse.ArgumentTypeError(f"unknown {what} {bad or text!r}; choose from {', '.join(allowed)}")
        return vals
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("Examples::")[1])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda when available, else cpu")
    p.add_argument("--ops", type=_names(C.OPS, "op"), default=list(C.OPS),
                   help=f"comma list (or 'all') of {', '.join(C.OPS)}")
    p.add_argument("--dtype", type=_names(tuple(C.DTYPES), "dtype"), default=["bf16"],
                   help="comma list of bf16, fp16, fp32 (default bf16)")
    p.add_argument("--num-tokens", type=_ints, default=None,
                   help="comma list of T (default: the device's sweep; applies to the fc and the drafter step too)")
    p.add_argument("--hidden-size", type=_ints, default=None,
                   help="comma list of H (default: the device's sweep; the fc uses N = H; the drafter step "
                        "defaults to 4096 on cuda, 1024 on cpu)")
    p.add_argument("--fc-norms", type=_names(C.FC_NORMS, "fc norm"), default=["chunk"],
                   help="the fc's normalisations: comma list of none, chunk, shared, or 'all' (default chunk)")
    p.add_argument("--quick", action="store_true", help="a small sweep with short timing budgets")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out", help="output folder (default bench/out)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    p.add_argument("--repeat", type=int, default=None,
                   help="timed samples per implementation (default: as many as the time budget allows)")
    p.add_argument("--budget-ms", type=float, default=None,
                   help="timing budget per implementation and case (default cuda 200, cpu 500; quick: 60 / 150)")
    p.add_argument("--threads", type=int, default=None, help="CPU: torch.set_num_threads (default: torch's)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return p


# ---- environment --------------------------------------------------------------------------


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def commit_id() -> str:
    """EAGLE3_COMMIT where set (a copied tree may carry no or stale git metadata: a GPU
    machine's copy reported an older HEAD); else the full sha of HEAD, '+dirty' when
    tracked files changed or untracked files exist (bench/out is ignored); 'unknown'
    outside a git checkout."""
    if os.environ.get("EAGLE3_COMMIT"):
        return os.environ["EAGLE3_COMMIT"]
    sha = _git("rev-parse", "HEAD")
    if not sha:
        return "unknown"
    status = _git("status", "--porcelain")
    return sha + ("+dirty" if status else "")


def card_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _versions() -> Dict[str, Optional[str]]:
    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": None, "liger_kernel": None}
    for name in ("triton", "liger_kernel"):
        try:
            from importlib.metadata import version  # noqa: PLC0415
            out[name] = version(name.replace("_", "-"))
        except Exception:
            pass
    return out


# ---- one case -----------------------------------------------------------------------------


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _base_row(case: C.Case, impl: C.Impl) -> Dict[str, Any]:
    return {
        "op": case.op, "impl": impl.name, "T": case.T, "H": case.H, "K": case.K, "N": case.N, "norm": case.norm,
        "dtype": case.dtype_name, "device": case.device, "median_us": None, "p20_us": None, "p80_us": None,
        "reps": None, "batch": None, "host_us": None, "graph_us": None, "graph_p20_us": None, "graph_p80_us": None,
        "graph_calls": None, "bytes": case.bytes_moved(), "flops": case.flops(), "correct": False,
        "max_rel_err": None, "tol": None, "eager_rel_err": None, "error": None, "note": impl.note or None,
        "first_call_s": None, "graph_error": None, "path": None,
    }


def run_case(case: C.Case, cfg: Config) -> List[Dict[str, Any]]:
    """Check, then time, every implementation of one case; one row each."""
    if cfg.with_compile:
        torch._dynamo.reset()  # each case compiles afresh; no recompile limit is ever reached
    mem_cap = ROTATION_MEM if case.device == "cuda" else ROTATION_MEM_CPU
    n_rot = C.rotation_copies(case, cfg.cache_bytes, ROTATION_CAP, mem_cap)
    inputs = [C.make_inputs(case, seed=i) for i in range(n_rot)]  # the drafter's models: built once, shared
    checker = C.Checker(case, inputs[0])
    iset = C.implementations(case, with_compile=cfg.with_compile, liger=cfg.liger, liger_note=cfg.liger_note)
    rows = []
    rot = {"n_rot": n_rot, "rotated_bytes": n_rot * case.input_bytes(),
           "exceeds_2x_cache": n_rot * case.input_bytes() + case.shared_bytes() >= 2 * cfg.cache_bytes,
           "checked_rows": case.T if case.check_rows() is None else int(case.check_rows().numel())}
    by_name: Dict[str, Dict[str, Any]] = {}
    live: Dict[str, list] = {}  # the implementations to time: name -> calls, one per input set
    for impl in iset.impls:
        row = _base_row(case, impl)
        row.update(rot)
        row["eager_rel_err"], row["tol"] = checker.eager_err, checker.tol
        rows.append(row)
        by_name[impl.name] = row
        try:
            calls = [impl.prepare(inp) for inp in inputs]
            timing.sync(case.device)
            t0 = time.perf_counter()
            out = calls[0]()  # the first call: compiles, for "compile"
            timing.sync(case.device)
            row["first_call_s"] = time.perf_counter() - t0
            if impl.name == "eagle3" and (case.op == C.FC_OP or case.op in C.DRAFTER_OPS):
                row["path"] = torch.ops.eagle3._fc_last_path()  # which fc kernel served (the drafter's: its last fc)
            elif impl.name == "eagle3":  # the norm launch's plan: strategy, weights staged, threads
                row["path"] = torch.ops.eagle3._norm_last_plan()
            chk = checker(out)
            del out
            row["max_rel_err"], row["correct"] = chk.err, chk.ok
            if not chk.ok:
                row["error"] = f"wrong: rel err {chk.err:.3g} > tol {chk.tol:.3g}; not timed"
                continue
            live[impl.name] = calls
        except Exception as e:
            _record_failure(row, e, case.device)
    # Timed together, in turns (timing.time_interleaved): the ratios between the rows compare
    # implementations under the same clocks.
    try:
        if live:
            timed = timing.time_interleaved(live, cfg.budget, case.device)
            for name, st in timed.items():
                if isinstance(st, Exception):
                    _record_failure(by_name[name], st, case.device)
                    live.pop(name)
                else:
                    by_name[name].update(median_us=st.median_us, p20_us=st.p20_us, p80_us=st.p80_us, reps=st.reps,
                                         batch=st.batch, host_us=st.host_us)
        if live and case.device == "cuda" and case.T <= GRAPH_MAX_T:
            per_graph = min(max(n_rot, 32), ROTATION_CAP)
            for name, st in timing.time_graphs_interleaved(live, per_graph, cfg.graph_budget).items():
                if isinstance(st, Exception):  # capture failed: keep the stream time, say why
                    by_name[name]["graph_error"] = _first_line(st)
                else:
                    by_name[name].update(graph_us=st.median_us, graph_p20_us=st.p20_us, graph_p80_us=st.p80_us,
                                         graph_calls=per_graph)
    finally:
        live.clear()
    for note in iset.notes:
        rows[0].setdefault("notes", []).append(note)
    del inputs, checker
    gc.collect()
    if case.device == "cuda":
        torch.cuda.empty_cache()
    return rows


def _record_failure(row: Dict[str, Any], e: BaseException, device: str) -> None:
    """An implementation that raised: not correct where it was not checked yet, the error's
    first line; the device synchronised (quietly) for the next implementation."""
    row["correct"] = False if row["max_rel_err"] is None else row["correct"]
    row["error"] = _first_line(e)
    if device == "cuda":
        try:
            torch.cuda.synchronize()
        except Exception:
            pass


def _failed_case_rows(case: C.Case, e: BaseException) -> List[Dict[str, Any]]:
    row = _base_row(case, C.Impl("eagle3", lambda inp: None))
    row["error"] = f"case failed before timing: {_first_line(e)}"
    return [row]


# ---- derived figures ----------------------------------------------------------------------


def add_rates(rows: List[Dict[str, Any]], copy_gbps: float, matmul_by_dtype: Dict[str, float]) -> None:
    """GB/s, TFLOP/s, % of the ceilings, % of the roofline (time at the ceilings / time)."""
    for r in rows:
        mm = matmul_by_dtype.get(r["dtype"])
        for prefix, key in (("", "median_us"), ("graph_", "graph_us")):
            t = r.get(key)
            vals = dict.fromkeys(("gbps", "tflops", "pct_of_copy_bw", "pct_of_matmul", "pct_of_roofline"))
            if t:
                s = t * 1e-6
                if (r["op"] != C.FC_OP and r["op"] not in C.DRAFTER_OPS) or r["T"] <= C.FC_GBPS_MAX_T:
                    vals["gbps"] = r["bytes"] / s / 1e9
                    vals["pct_of_copy_bw"] = 100 * vals["gbps"] / copy_gbps
                if r["flops"]:
                    vals["tflops"] = r["flops"] / s / 1e12
                    vals["pct_of_matmul"] = 100 * vals["tflops"] / mm if mm else None
                floor_s = max(r["bytes"] / (copy_gbps * 1e9), r["flops"] / (mm * 1e12) if mm and r["flops"] else 0.0)
                vals["pct_of_roofline"] = 100 * floor_s / s
            if prefix and not t:
                continue
            r.update({prefix + k: v for k, v in vals.items()})


def add_ratios(rows: List[Dict[str, Any]]) -> None:
    """ratio_vs_X = time of X / time of this row, X in the baselines measured for the same
    case (stream times; graph_ratio_vs_X from the CUDA-graph times)."""
    by_case: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in rows:
        by_case.setdefault(report.case_key(r), []).append(r)
    for group in by_case.values():
        for prefix, key in (("", "median_us"), ("graph_", "graph_us")):
            times = {r["impl"]: r.get(key) for r in group}
            for r in group:
                for base in ("eager", "compile", "liger", "linear"):
                    if base == r["impl"] or base not in times:
                        continue
                    if prefix and not r.get(key):
                        continue
                    t, tb = r.get(key), times.get(base)
                    r[f"{prefix}ratio_vs_{base}"] = (tb / t) if (t and tb) else None


# ---- main ---------------------------------------------------------------------------------


def _progress(items, desc: str):
    try:
        from tqdm import tqdm  # noqa: PLC0415
        return tqdm(items, desc=desc, file=sys.stderr, dynamic_ncols=True, unit="case")
    except ImportError:
        class _Plain:
            def __init__(self, it):
                self.items = list(it)

            def __iter__(self):
                n = len(self.items)
                for i, x in enumerate(self.items, 1):
                    yield x
                    print(f"[{desc}] {i}/{n} done", file=sys.stderr, flush=True)

            def set_postfix_str(self, s):
                print(f"[{desc}] {s}", file=sys.stderr, flush=True)

            def write(self, s):
                print(s, file=sys.stderr, flush=True)
        return _Plain(items)


class _CutShort(BaseException):
    """Raised by the SIGTERM handler; a BaseException so the per-case handler lets it through."""


def _cut_short(signum, frame):
    raise _CutShort()


def _sweep(bar, cfg: "Config", device: str, rows: List[Dict[str, Any]]) -> None:
    """Runs the cases in order, appending their rows to ``rows`` as each one ends."""
    with torch.inference_mode():
        for case in bar:
            if hasattr(bar, "set_postfix_str"):
                bar.set_postfix_str(case.label)
            if case.op not in C.DRAFTER_OPS:
                C.release_drafter_models()  # kept only from one drafter case to the next
            try:
                rows += run_case(case, cfg)
            except Exception as e:  # e.g. out of memory building the inputs
                rows += _failed_case_rows(case, e)
                C.release_drafter_models()
                if device == "cuda":
                    torch.cuda.empty_cache()
        C.release_drafter_models()


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("bench: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    dtypes = [C.DTYPES[d] for d in args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)

    sweep = QUICK[device] if args.quick else (
        dict(T=GPU_T, H=GPU_H, fc_T=GPU_FC_T, fc_H=GPU_FC_H, drafter_T=GPU_DRAFTER_T, drafter_H=GPU_DRAFTER_H,
             mla_drafter_H=GPU_MLA_DRAFTER_H)
        if device == "cuda" else
        dict(T=CPU_T, H=CPU_H, fc_T=CPU_FC_T, fc_H=CPU_H, drafter_T=CPU_DRAFTER_T, drafter_H=CPU_DRAFTER_H,
             mla_drafter_H=CPU_MLA_DRAFTER_H))
    Ts = args.num_tokens or sweep["T"]
    fc_Ts = args.num_tokens or sweep["fc_T"]
    drafter_Ts = args.num_tokens or sweep["drafter_T"]
    Hs = args.hidden_size or sweep["H"]
    fc_Hs = args.hidden_size or sweep["fc_H"]
    drafter_Hs = args.hidden_size or sweep["drafter_H"]
    mla_drafter_Hs = args.hidden_size or sweep["mla_drafter_H"]

    default_ms = {("cuda", False): 200, ("cuda", True): 60, ("cpu", False): 500, ("cpu", True): 150}[(device, args.quick)]
    seconds = (args.budget_ms if args.budget_ms is not None else default_ms) / 1e3
    if device == "cuda":
        budget = timing.Budget(seconds=seconds, min_reps=10, max_reps=300, repeat=args.repeat, min_sample_s=100e-6)
        graph_budget = timing.Budget(seconds=seconds / 2, min_reps=10, max_reps=100, repeat=args.repeat)
        cache_bytes, cache_measured = timing.cuda_l2_bytes()
    else:
        budget = timing.Budget(seconds=seconds, min_reps=3, max_reps=200, repeat=args.repeat, min_sample_s=1e-3)
        graph_budget = budget
        cache_bytes, cache_measured = timing.cpu_llc_bytes()

    liger, liger_note = (None, "")
    if device == "cuda":
        liger, liger_note = C.load_liger()
    else:
        liger_note = "liger baseline: CUDA only (Triton kernels)"

    card = card_name(device)
    meta: Dict[str, Any] = {
        "card": card, **_versions(), "commit": commit_id(),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, "-m", "bench", *(sys.argv[1:] if argv is None else argv)]),
        "device": device, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "threads": torch.get_num_threads(), "cache_bytes": cache_bytes, "cache_size_measured": cache_measured,
        "cache_kind": "L2" if device == "cuda" else "LLC",
        "timing": ("CUDA events over batches of back-to-back calls on rotated inputs, median and p20-p80 of "
                   f"the per-call time; CUDA-graph replay (graph_us) for T <= {GRAPH_MAX_T}; the implementations "
                   f"of a case timed in {timing.ROUNDS} interleaved turns each"
                   if device == "cuda" else
                   "time.perf_counter over batches of calls on rotated inputs, median and p20-p80; the "
                   f"implementations of a case timed in {timing.ROUNDS} interleaved turns each"),
        "compile": "off" if args.no_compile else "torch.compile(fn, dynamic=False, fullgraph=True), default mode",
        "notes": [],
    }
    if liger_note:
        meta["notes"].append(liger_note)
    if device == "cpu" and hasattr(os, "getloadavg"):
        meta["load_average"] = os.getloadavg()[0]
        if meta["load_average"] > 0.5 * (os.cpu_count() or 1):
            busy = (f"load average {meta['load_average']:.1f} on {os.cpu_count()} CPUs before the run: "
                    "other work shares the CPUs, CPU times are unreliable (OpenMP regions stall)")
            meta["notes"].append(busy)
            print(f"bench: warning: {busy}", file=sys.stderr)

    torch.manual_seed(0)
    print(f"bench: {card} ({device}), torch {torch.__version__}, commit {meta['commit'][:19]}", file=sys.stderr)
    print("bench: measuring ceilings ...", file=sys.stderr, flush=True)
    with torch.inference_mode():
        if device == "cuda":
            meta["copy_gbps"] = timing.copy_gbps("cuda", 1 << 30)
            mm_n, mm_dtypes = 8192, dtypes
        else:
            meta["copy_gbps"] = timing.copy_gbps("cpu", 256 << 20, reps=5)
            meta["clone_gbps"] = timing.clone_gbps("cpu", 256 << 20)
            # ATen's bf16/fp16 GEMM on many CPUs is far below its fp32 one: fp32 is the ceiling.
            mm_n, mm_dtypes = (1024 if args.quick else 2048), [torch.float32]
        mm = {C.DTYPE_NAMES[d]: timing.matmul_tflops(device, d, mm_n, reps=10 if device == "cuda" else 3)
              for d in mm_dtypes}
        if device == "cpu":
            mm = {d: mm["fp32"] for d in args.dtype}
        timing.reset_ceiling_memory(device)
    meta["matmul_n"] = mm_n
    meta["matmul_dtype"] = C.DTYPE_NAMES[mm_dtypes[0]]
    meta["matmul_tflops"] = mm[args.dtype[0]]
    meta["matmul_tflops_by_dtype"] = mm
    print(f"bench: copy {meta['copy_gbps']:.1f} GB/s, matmul {meta['matmul_tflops']:.2f} TFLOP/s "
          f"({meta['matmul_dtype']} {mm_n}^3)", file=sys.stderr, flush=True)

    cfg = Config(device, args.quick, budget, graph_budget, not args.no_compile, cache_bytes, liger, liger_note)
    sweep_cases = C.case_sweep(args.ops, Ts, Hs, dtypes, device, fc_Ts, fc_Hs, args.fc_norms, drafter_Ts, drafter_Hs,
                                 mla_drafter_Hs)
    rows: List[Dict[str, Any]] = []
    bar = _progress(sweep_cases, "bench")
    # `timeout` (the GPU check's step limit) sends SIGTERM: the rows measured so far are
    # still written, with a note saying where the sweep stopped.
    signal.signal(signal.SIGTERM, _cut_short)
    try:
        _sweep(bar, cfg, device, rows)
    except _CutShort:
        meta["notes"].append(f"cut short by SIGTERM after {len(rows)} rows; the later cases were not measured")
        print(f"bench: {meta['notes'][-1]}", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for r in rows:  # per-case notes (e.g. liger omitted) are said once, in the header
        for n in r.pop("notes", []):
            if n not in meta["notes"]:
                meta["notes"].append(n)
    add_rates(rows, meta["copy_gbps"], mm)
    add_ratios(rows)
    meta["rows"] = rows

    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{slug(card)}-{meta['commit'][:12]}" + ("-dirty" if meta["commit"].endswith("+dirty") else "")
    table = report.compact_table(rows)
    print(table)
    problems = report.problems(rows)
    if problems:
        print("\n" + problems)
    paths = [report.write_json(meta, args.out / f"{stem}.json"), report.write_markdown(meta, args.out / f"{stem}.md")]
    if not args.no_plots:
        plot_paths, note = report.write_plots(rows, meta, args.out, stem)
        paths += plot_paths
        if note:
            print(f"bench: {note}", file=sys.stderr)
    print("\nbench: wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
    return 1 if any(r["impl"] == "eagle3" and not r["correct"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
