"""The host's time to issue one call of each op and of its parts, on CUDA.

    python3 bench/host_cost.py [OUT.json]

The benchmark's event times of launch-bound calls are the rate the host issues them
(``host_us`` per row). This script takes the fc's host time apart: per call, with the
device idle and the launch queue far from full (a burst of ``BURST`` calls between two
clock reads, then a sync), the median over ``SAMPLES`` bursts of

* ``F.linear`` alone and ``torch.mm`` into a preallocated output (cuBLAS's own host time),
* ``eagle3_ops.rms_norm_cat_linear`` (Python wrapper), the op through
  ``torch.ops.eagle3.rms_norm_cat_linear.default`` (no wrapper), and the op with its autograd
  key skipped (``torch._C._AutoDispatchBelowAutograd``),
* ``eagle3_ops.rms_norm_cat`` alone and ``torch.empty`` of the normalised concatenation,
* fused_add_rms_norm (T=1) beside torch.compile of the eager composition,

at the fc's pair sizes (T = 16, 64, 128) and at T=8 (the mma kernel).
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import eagle3_ops
from eagle3_ops import reference

BURST, SAMPLES, EPS = 16, 60, 1e-6
if not torch.cuda.is_available():  # the CPU dry run: few samples
    SAMPLES = 2


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def host_us(fn) -> float:
    for _ in range(3):
        fn()
    _sync()
    per_call = []
    for _ in range(SAMPLES):
        t = time.perf_counter()
        for _ in range(BURST):
            fn()
        per_call.append((time.perf_counter() - t) / BURST)
        _sync()
    return statistics.median(per_call) * 1e6


def main() -> None:
    dev, bf, H = ("cuda" if torch.cuda.is_available() else "cpu"), torch.bfloat16, 4096  # CPU: a dry run
    g = torch.Generator(device=dev).manual_seed(0)
    w = torch.randn(H, 3 * H, device=dev, dtype=bf, generator=g) / (3 * H) ** 0.5
    op = torch.ops.eagle3.rms_norm_cat_linear.default
    rows = []
    with torch.inference_mode():
        for T in (8, 16, 64, 128):
            xs = list(torch.randn(T, 3 * H, device=dev, dtype=bf, generator=g).chunk(3, -1))
            xn = eagle3_ops.rms_norm_cat(xs)
            out = torch.empty(T, H, device=dev, dtype=bf)
            wt = w.t()
            variants = {
                "F.linear": lambda: F.linear(xn, w),
                "torch.mm out=": lambda: torch.mm(xn, wt, out=out),
                "rms_norm_cat_linear": lambda: eagle3_ops.rms_norm_cat_linear(xs, w, EPS, "chunk"),
                "op .default": lambda: op(xs, w, EPS, "chunk"),
                "rms_norm_cat": lambda: eagle3_ops.rms_norm_cat(xs),
                "torch.empty": lambda: torch.empty(T, 3 * H, device=dev, dtype=bf),
            }

            def below_autograd():
                with torch._C._AutoDispatchBelowAutograd():
                    return op(xs, w, EPS, "chunk")

            variants["op below autograd"] = below_autograd
            for name, fn in variants.items():
                rows.append({"what": name, "T": T, "H": H, "host_us": round(host_us(fn), 2)})
                if name == "rms_norm_cat_linear":
                    rows[-1]["path"] = torch.ops.eagle3._fc_last_path()
        x = torch.randn(1, H, device=dev, dtype=bf, generator=g)
        r = torch.randn(1, H, device=dev, dtype=bf, generator=g)
        nw = torch.ones(H, device=dev, dtype=bf)
        compiled = torch.compile(lambda x, r, w: reference.fused_add_rms_norm(x, r, w, EPS), dynamic=False,
                                 fullgraph=True)
        for name, fn in {"fused_add_rms_norm": lambda: eagle3_ops.fused_add_rms_norm(x, r, nw, EPS),
                         "fused_add torch.compile": lambda: compiled(x, r, nw)}.items():
            rows.append({"what": name, "T": 1, "H": H, "host_us": round(host_us(fn), 2)})
    print("| what | T | host us per call | path |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['T']} | {r['host_us']:.2f} | {r.get('path', '')} |")
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump({"card": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__, "burst": BURST,
                       "samples": SAMPLES, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
