"""Reporting: the compact markdown table (stdout), the markdown file with the conditions
and every row, the JSON file, and the plots (time and % of roofline against T)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .cases import DRAFTER_OP, FC_OP, IMPL_ORDER, MLA_DRAFTER_OP, OPS

BASELINES = ("eager", "compile", "liger", "linear")


def case_key(r: Dict[str, Any]) -> tuple:
    return (r["op"], r["norm"], r["dtype"], r["device"], r["H"], r["K"], r["N"], r["T"])


def _op_name(r: Dict[str, Any]) -> str:
    return f"{r['op']}/{r['norm']}" if r["op"] == FC_OP else r["op"]


def _f(v: Optional[float], digits: int = 3) -> str:
    """Compact number: 3 significant digits, no exponent for everyday sizes."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—" if v is None else str(v)
    if v == 0:
        return "0"
    mag = math.floor(math.log10(abs(v)))
    if mag >= digits or mag < -3:
        return f"{v:.{digits - 1}e}" if mag < -3 else f"{v:.0f}"
    return f"{v:.{max(0, digits - 1 - mag)}f}"


def _md(header: Sequence[str], lines: List[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in line) + " |" for line in lines]
    return "\n".join(out)


def _grouped(rows: List[Dict[str, Any]]) -> List[Tuple[tuple, Dict[str, Dict[str, Any]]]]:
    """Rows grouped by case in sweep order: [(key, {impl: row})]."""
    groups: Dict[tuple, Dict[str, Dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(case_key(r), {})[r["impl"]] = r
    return list(groups.items())


def _status(r: Dict[str, Any]) -> str:
    if r.get("correct") and not r.get("error"):
        return "ok"
    if r.get("max_rel_err") is not None and (r.get("error") or "").startswith("wrong"):
        return f"WRONG {_f(r['max_rel_err'])}"
    return "ERROR"


def _ratio_cell(r: Dict[str, Any], base: str) -> str:
    s, g = r.get(f"ratio_vs_{base}"), r.get(f"graph_ratio_vs_{base}")
    if s is None and g is None:
        return ""
    return _f(s) + (f" (g {_f(g)})" if g is not None else "")


def compact_table(rows: List[Dict[str, Any]]) -> str:
    """One line per case: our time (and CUDA-graph time), the rates and % of the roofline
    (from the graph time where there is one), eager's time, and the ratios to each
    baseline (time of X / our time: > 1 means eagle3 is faster; '(g ...)' = graph times)."""
    present = {r["impl"] for r in rows}
    bases = [b for b in BASELINES if b in present and b != "eager"]
    graphs = any(r.get("graph_us") for r in rows)
    header = ["op", "T", "H", "K", "dtype", "eagle3 us", *(["graph us"] if graphs else []), "eager us", "GB/s",
              "TFLOP/s", "% roofline", "x eager", *[f"x {b}" for b in bases], "check"]
    lines = []
    for _key, impls in _grouped(rows):
        r = impls.get("eagle3") or next(iter(impls.values()))
        e = impls.get("eager", {})
        g = "graph_" if r.get("graph_us") else ""
        lines.append([
            _op_name(r), r["T"], r["H"], r["K"], r["dtype"], _f(r.get("median_us")),
            *([_f(r.get("graph_us"))] if graphs else []), _f(e.get("median_us")), _f(r.get(g + "gbps")),
            _f(r.get(g + "tflops")), _f(r.get(g + "pct_of_roofline")),
            _ratio_cell(r, "eager"), *[_ratio_cell(r, b) for b in bases], _status(r),
        ])
    return _md(header, lines)


def full_table(rows: List[Dict[str, Any]]) -> str:
    header = ["op", "impl", "T", "H", "K", "N", "dtype", "median us", "p20-p80 us", "host us", "graph us", "GB/s", "TFLOP/s",
              "% copy", "% matmul", "% roofline", "x eager", "x compile", "x liger", "x linear", "rel err", "tol",
              "check", "n_rot"]
    lines = []
    order = {name: i for i, name in enumerate(IMPL_ORDER)}
    for _key, impls in _grouped(rows):
        for name in sorted(impls, key=lambda n: order.get(n, 99)):
            r = impls[name]
            g = "graph_" if r.get("graph_us") else ""
            spread = f"{_f(r['p20_us'])}-{_f(r['p80_us'])}" if r.get("p20_us") is not None else "—"
            lines.append([
                _op_name(r), f"{name} ({r['path']})" if r.get("path") else name,  # ours: the fc path / norm plan
                r["T"], r["H"], r["K"], r["N"] or "", r["dtype"], _f(r.get("median_us")), spread,
                _f(r.get("host_us")), _f(r.get("graph_us")), _f(r.get(g + "gbps")), _f(r.get(g + "tflops")), _f(r.get(g + "pct_of_copy_bw")),
                _f(r.get(g + "pct_of_matmul")), _f(r.get(g + "pct_of_roofline")),
                *[_ratio_cell(r, b) for b in BASELINES], _f(r.get("max_rel_err")), _f(r.get("tol")), _status(r),
                r.get("n_rot", ""),
            ])
    return _md(header, lines)


def problems(rows: List[Dict[str, Any]]) -> str:
    """Every wrong or failed implementation, and every failed graph capture."""
    out = []
    for r in rows:
        where = f"{_op_name(r)} T={r['T']} H={r['H']} K={r['K']} {r['dtype']} [{r['impl']}]"
        if not r.get("correct") or r.get("error"):
            out.append(f"- {where}: {r.get('error') or 'not correct'}")
        if r.get("graph_error"):
            out.append(f"- {where}: CUDA graph not timed: {r['graph_error']}")
    return ("Problems (not timed, or graph not timed):\n" + "\n".join(out)) if out else ""


def conditions(meta: Dict[str, Any]) -> str:
    mm = meta.get("matmul_tflops_by_dtype", {})
    items = [
        ("card", meta["card"]), ("device", meta["device"]), ("torch", meta["torch"]), ("cuda", meta["cuda"]),
        ("triton", meta.get("triton")), ("liger_kernel", meta.get("liger_kernel")), ("commit", meta["commit"]),
        ("command", f"`{meta['command']}`"), ("date", meta.get("date")), ("threads", meta.get("threads")),
        ("copy ceiling", f"{meta['copy_gbps']:.1f} GB/s (bytes read + written)"),
        ("matmul ceiling", ", ".join(f"{v:.2f} TFLOP/s ({k}; measured in {meta.get('matmul_dtype')}, "
                                     f"{meta.get('matmul_n')}^3)" for k, v in mm.items())),
        (f"{meta.get('cache_kind', 'cache')} size", f"{meta.get('cache_bytes', 0) / 1e6:.1f} MB"
         + ("" if meta.get("cache_size_measured", True) else " (assumed)")),
        ("timing", meta.get("timing")), ("compile baseline", meta.get("compile")),
    ]
    if meta.get("clone_gbps"):
        items.append(("clone rate (allocation included)", f"{meta['clone_gbps']:.1f} GB/s"))
    text = "\n".join(f"- **{k}**: {v}" for k, v in items)
    if meta.get("notes"):
        text += "\n" + "\n".join(f"- note: {n}" for n in meta["notes"])
    return text


LEGEND = ("Ratios are time of the baseline / time of eagle3 (> 1: eagle3 is faster); '(g x)' is the same "
          "ratio from CUDA-graph replay times. GB/s counts every input read once, every output written "
          "once and the weights (the fc weight too); rates and % roofline use the graph time where there is "
          "one. % roofline = max(bytes / copy ceiling, FLOPs / matmul ceiling) / time. "
          f"{DRAFTER_OP}: combine + layer 0 + final norm of a Llama-3-8B-like drafter (no logits, no KV "
          "cache; eager = the pure-PyTorch reference drafter); its bytes are every weight of those modules "
          "(not embed_tokens / lm_head) + aux, embedding rows, ids, positions + the two outputs, its FLOPs "
          "2 T x matrix weights + causal attention (QK^T, PV); GB/s is shown for T <= 128 as for the fc. "
          f"{MLA_DRAFTER_OP}: the same step of a Kimi-K2-like DeepSeek (MLA) drafter with fc_norm and "
          "norm_output (eager = the pure-PyTorch reference MLA drafter). 'host us' (CUDA, every "
          "implementation's table): the host's time per call to issue the timed calls; near 'median us' "
          "the host, not the device, set the stream time (the graph time shows the device's).")


def write_markdown(meta: Dict[str, Any], path: Path) -> Path:
    rows = meta["rows"]
    parts = [f"# eagle3_ops benchmark: {meta['card']}", "", conditions(meta), "", "## Summary", "",
             LEGEND, "", compact_table(rows), "", "## Every implementation", "", full_table(rows)]
    p = problems(rows)
    if p:
        parts += ["", "## Problems", "", p]
    path.write_text("\n".join(parts) + "\n")
    return path


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def write_json(meta: Dict[str, Any], path: Path) -> Path:
    first = ("card", "torch", "cuda", "commit", "command", "device", "copy_gbps", "matmul_tflops")
    ordered = {k: meta[k] for k in first}
    ordered.update({k: v for k, v in meta.items() if k not in ordered and k != "rows"})
    ordered["rows"] = [{k: _jsonable(v) for k, v in r.items()} for r in meta["rows"]]
    path.write_text(json.dumps(ordered, indent=1) + "\n")
    return path


def write_plots(rows: List[Dict[str, Any]], meta: Dict[str, Any], out: Path, stem: str) -> Tuple[List[Path], str]:
    """Two PNGs, time against T and % of roofline against T (log x): one column of panels
    per op, one row per (dtype, H). Colour = implementation; solid with dots = stream time,
    dotted with crosses = CUDA-graph time; the fc's norms differ by line style (the drafter
    step's fixed norm is drawn solid)."""
    try:
        import matplotlib  # noqa: PLC0415
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
        from matplotlib.lines import Line2D  # noqa: PLC0415
    except ImportError:
        return [], "matplotlib not installed: plots skipped"
    ops = [op for op in OPS if any(r["op"] == op for r in rows)]
    if not ops:
        return [], "no rows to plot"
    panels = sorted({(r["dtype"], r["H"]) for r in rows}, key=lambda k: (k[0], k[1]))
    colors = {"eagle3": "C3", "eager": "C0", "compile": "C2", "liger": "C4", "linear": "C7"}
    norm_style = {None: "-", "chunk": "-", "shared": "--", "none": "-."}
    impls = [i for i in IMPL_ORDER if any(r["impl"] == i for r in rows)]
    norms = sorted({r["norm"] for r in rows if r["norm"] and r["op"] == FC_OP})
    paths = []
    for kind in ("time", "roofline"):
        fig, axes = plt.subplots(len(panels), len(ops), figsize=(4.4 * len(ops), 3.2 * len(panels) + 0.8),
                                 squeeze=False)
        for (dtype, H), ax_row in zip(panels, axes):
            for op, ax in zip(ops, ax_row):
                sel = [r for r in rows if r["op"] == op and r["dtype"] == dtype and r["H"] == H]
                if not sel:
                    ax.axis("off")
                    continue
                for impl in impls:
                    for norm in sorted({r["norm"] for r in sel}, key=str):
                        line = sorted((r for r in sel if r["impl"] == impl and r["norm"] == norm), key=lambda r: r["T"])
                        line_style = norm_style[norm] if op == FC_OP else "-"
                        if kind == "time":
                            series = [("median_us", "o", line_style, 1.5), ("graph_us", "x", ":", 1.0)]
                        else:
                            series = [("pct_of_roofline", "o", line_style, 1.5),
                                      ("graph_pct_of_roofline", "x", ":", 1.0)]
                        for key, marker, style, lw in series:
                            pts = [(max(r["T"], 0.5), r[key]) for r in line if r.get(key)]
                            if pts:
                                ax.plot(*zip(*pts), linestyle=style, marker=marker, ms=3, lw=lw, color=colors.get(impl))
                ax.set_xscale("log", base=2)
                if kind == "time":
                    ax.set_yscale("log")
                else:
                    ax.set_ylim(bottom=0)
                ax.set_title(f"{op}  H={H} {dtype}", fontsize=9)
                ax.grid(True, which="both", alpha=0.3)
                ax.tick_params(labelsize=7)
            shown = [ax for ax in ax_row if ax.axison] or [ax_row[0]]  # the first panel with data
            shown[0].set_ylabel("time per call (us)" if kind == "time" else "% of roofline", fontsize=8)
        for ax in axes[-1]:
            ax.set_xlabel("T (tokens)", fontsize=8)
        handles = [Line2D([], [], color=colors.get(i), marker="o", ms=3, label=i) for i in impls]
        handles += [Line2D([], [], color="k", marker="o", ms=3, label="stream (CUDA events)" if meta["device"] == "cuda"
                           else "host clock"),
                    Line2D([], [], color="k", marker="x", ms=3, linestyle=":", label="CUDA graph")]
        handles += [Line2D([], [], color="k", linestyle=norm_style[n], label=f"fc norm={n}") for n in norms]
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)
        what = "time per call" if kind == "time" else "% of roofline = max(bytes/copy, FLOPs/matmul ceiling) / time"
        fig.suptitle(f"{meta['card']} · torch {meta['torch']} · {meta['commit'][:12]} · {what}", fontsize=9)
        fig.tight_layout(rect=(0, 0.05, 1, 0.97))
        p = out / f"{stem}-{kind}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths, ""
