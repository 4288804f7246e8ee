"""What is measured: cases, their inputs, the implementations compared, the float64
truth, the numerics rule, and the bytes / FLOPs each case must move or do.

Shared by the runner (``python -m bench``) and the pytest-benchmark suite, so both time
exactly the same calls. Every implementation is an :class:`Impl` whose ``prepare`` turns
one input set into a zero-argument call; anything that is not the op itself (folding the
fc weight, normalising the floor's input, compiling) happens in ``prepare`` or before,
never inside the call.

Ops (the names the command line takes):

``rms_norm_cat``        K=3 chunks of one ``[T, K*H]`` tensor (the serving layout: the
                        aux hidden states arrive concatenated), one weight per chunk.
``midlayer_cat``        K=2 separate ``[T, H]`` tensors: ``cat([input_layernorm(e),
                        hidden_norm(h)])``, the midlayer's qkv input.
``fused_add_rms_norm``  ``(norm(x + residual), x + residual)`` on ``[T, H]``.
``rms_norm_cat_linear`` the fc: ``F.linear(norm_cat(xs), W)`` with ``W`` ``[N, K*H]``,
                        N = H, K=3; ``norm`` is none / chunk / shared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

import eagle3_ops
from eagle3_ops import reference as R

OPS = ("rms_norm_cat", "midlayer_cat", "fused_add_rms_norm", "rms_norm_cat_linear")
FC_OP = "rms_norm_cat_linear"
FC_NORMS = ("none", "chunk", "shared")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
EPS = 1e-6
# Numerics rule (DESIGN.md section 4): rel err <= 2 x eager's rel err + floor.
ERR_FLOOR = {torch.bfloat16: 1e-3, torch.float16: 1e-3, torch.float32: 1e-5}

#: Implementation names, in table order. "eagle3" is ours; the rest are baselines.
IMPL_ORDER = ("eagle3", "eager", "compile", "liger", "linear")
#: GB/s is reported for the norms, and for the fc up to this T (while it is a weight stream).
FC_GBPS_MAX_T = 128

Outputs = Any  # a tensor or a tuple of tensors


@dataclass(frozen=True)
class Case:
    """One measured configuration. ``K`` is the number of chunks (1 for the fused add),
    ``N`` the fc's output width, ``norm`` the fc's normalisation."""

    op: str
    T: int
    H: int
    dtype: torch.dtype
    device: str
    K: int = 3
    N: Optional[int] = None
    norm: Optional[str] = None

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]

    @property
    def elem(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def label(self) -> str:
        extra = f" N={self.N} norm={self.norm}" if self.op == FC_OP else ""
        return f"{self.op} T={self.T} H={self.H} K={self.K}{extra} {self.dtype_name} {self.device}"

    def bytes_moved(self) -> int:
        """Fewest bytes through memory: every input read once, every output written once,
        weights included (the fc weight too)."""
        T, H, K, e = self.T, self.H, self.K, self.elem
        if self.op in ("rms_norm_cat", "midlayer_cat"):
            return 2 * T * K * H * e + K * H * e
        if self.op == "fused_add_rms_norm":
            return 4 * T * H * e + H * e
        return T * K * H * e + self.N * K * H * e + T * self.N * e

    def flops(self) -> int:
        """Matrix FLOPs of the fc (2 T N K H); 0 for the norms."""
        return 2 * self.T * self.N * self.K * self.H if self.op == FC_OP else 0

    def input_bytes(self) -> int:
        """Bytes of one input set (what input rotation copies)."""
        T, H, K, e = self.T, self.H, self.K, self.elem
        if self.op == "fused_add_rms_norm":
            return 2 * T * H * e + H * e
        if self.op == FC_OP:
            return T * K * H * e + self.N * K * H * e + K * H * e
        return T * K * H * e + K * H * e

    def check_rows(self) -> Optional[torch.Tensor]:
        """Rows checked against float64; None = all. The float64 fc is slow on a CPU, so
        there large T checks 64 rows spread over the tensor (first and last included)."""
        if self.op == FC_OP and self.device == "cpu" and self.T > 64:
            return torch.linspace(0, self.T - 1, 64).round().long().unique()
        return None


def make_case(op: str, T: int, H: int, dtype: torch.dtype, device: str, norm: Optional[str] = None) -> Case:
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    if op == "midlayer_cat":
        return Case(op, T, H, dtype, device, K=2)
    if op == "fused_add_rms_norm":
        return Case(op, T, H, dtype, device, K=1)
    if op == FC_OP:
        if norm not in FC_NORMS:
            raise ValueError(f"fc norm must be one of {FC_NORMS}, got {norm!r}")
        return Case(op, T, H, dtype, device, K=3, N=H, norm=norm)
    return Case(op, T, H, dtype, device, K=3)


# ---- inputs -------------------------------------------------------------------------------


def make_inputs(case: Case, seed: int = 0) -> Dict[str, Any]:
    """One fresh random input set (never zeros). Keys: ``xs`` (list of [T, H] inputs),
    ``ws`` (per-chunk norm weights) for the norm-cats; ``x``, ``residual``, ``w`` for the
    fused add; ``xs``, ``gs`` (per-chunk norm weights), ``W`` [N, K*H] for the fc."""
    g = torch.Generator(device=case.device)
    g.manual_seed(seed)
    T, H, K, dt, dev = case.T, case.H, case.K, case.dtype, case.device

    def randn(*shape, scale=1.0, shift=0.0):
        t = torch.randn(*shape, generator=g, device=dev, dtype=torch.float32)
        return (t * scale + shift).to(dt)

    def norm_weights(k):
        return [randn(H, scale=0.1, shift=1.0) for _ in range(k)]

    if case.op == "midlayer_cat":  # e and h are separate tensors
        return {"xs": [randn(T, H), randn(T, H)], "ws": norm_weights(2)}
    if case.op == "fused_add_rms_norm":
        return {"x": randn(T, H), "residual": randn(T, H), "w": randn(H, scale=0.1, shift=1.0)}
    x = randn(T, K * H)  # the serving layout: aux hidden states concatenated, read as views
    xs = list(x.chunk(K, dim=-1))
    if case.op == "rms_norm_cat":
        return {"xs": xs, "ws": norm_weights(K)}
    return {"xs": xs, "gs": norm_weights(K), "W": randn(case.N, K * H, scale=1.0 / math.sqrt(K * H))}


def rotation_copies(case: Case, cache_bytes: int, cap: int, mem_cap_bytes: int) -> int:
    """How many input sets to rotate so they exceed 2x the cache, within ``cap`` copies and
    ``mem_cap_bytes``; at least 1."""
    per = max(case.input_bytes(), 1)
    want = math.ceil(2 * cache_bytes / per)
    return max(1, min(want, cap, mem_cap_bytes // per))


# ---- the compositions (module-level so torch.compile caches them by code object) -----------


def eager_norm_cat(xs: List[torch.Tensor], ws: List[torch.Tensor]) -> torch.Tensor:
    return R.rms_norm_cat(xs, ws, EPS)


def eager_fused_add(x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor):
    return R.fused_add_rms_norm(x, residual, w, EPS)


def eager_norm_cat_fc_input(xs: List[torch.Tensor], gs: List[torch.Tensor], norm: str) -> torch.Tensor:
    """The fc's input as the serving engines build it: chunk -> K RMSNorms (or one shared
    statistic) with the norm weights -> cat; plain cat for norm="none"."""
    if norm == "none":
        return torch.cat(xs, dim=-1)
    return R.rms_norm_cat(xs, gs, EPS, shared_stats=(norm == "shared"))


def eager_fc(xs: List[torch.Tensor], gs: List[torch.Tensor], W: torch.Tensor, norm: str) -> torch.Tensor:
    """chunk -> norms -> cat -> F.linear with the unfolded fc weight."""
    return F.linear(eager_norm_cat_fc_input(xs, gs, norm), W)


# ---- implementations ----------------------------------------------------------------------


@dataclass
class Impl:
    """``prepare(inputs)`` returns the zero-argument call that is timed."""

    name: str
    prepare: Callable[[Dict[str, Any]], Callable[[], Outputs]]
    note: str = ""


@dataclass
class ImplSet:
    impls: List[Impl] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)  # baselines left out, and why


def _eager_args(case: Case, inp: Dict[str, Any]) -> tuple:
    if case.op == "fused_add_rms_norm":
        return (inp["x"], inp["residual"], inp["w"])
    if case.op == FC_OP:
        return (inp["xs"], inp["gs"], inp["W"], case.norm)
    return (inp["xs"], inp["ws"])


def _eager_fn(case: Case) -> Callable:
    return {"fused_add_rms_norm": eager_fused_add, FC_OP: eager_fc}.get(case.op, eager_norm_cat)


def _ours(case: Case) -> Impl:
    if case.op == "fused_add_rms_norm":
        def prep(inp):
            x, r, w = inp["x"], inp["residual"], inp["w"]
            return lambda: eagle3_ops.fused_add_rms_norm(x, r, w, EPS)
    elif case.op == FC_OP:
        def prep(inp):
            xs, norm = inp["xs"], case.norm
            # Fold once, outside the timed region (norm="none": no norm weights).
            Wf = eagle3_ops.fold_norm_weights(inp["W"], None if norm == "none" else inp["gs"])
            return lambda: eagle3_ops.rms_norm_cat_linear(xs, Wf, EPS, norm)
    else:
        def prep(inp):
            xs, ws = inp["xs"], inp["ws"]
            return lambda: eagle3_ops.rms_norm_cat(xs, ws, EPS)
    return Impl("eagle3", prep)


def _bind(fn: Callable, case: Case) -> Callable[[Dict[str, Any]], Callable[[], Outputs]]:
    def prep(inp):
        args = _eager_args(case, inp)
        return lambda: fn(*args)
    return prep


def _compiled(case: Case) -> Impl:
    """torch.compile of the eager composition (dynamic=False, fullgraph=True). Compilation
    happens at the first call, i.e. in the correctness check, where errors are caught."""
    fn = torch.compile(_eager_fn(case), dynamic=False, fullgraph=True)
    return Impl("compile", _bind(fn, case))


def _linear_floor(case: Case) -> Impl:
    """cuBLAS / ATen F.linear alone on the already normalised, already concatenated input."""
    def prep(inp):
        xn = eager_norm_cat_fc_input(inp["xs"], inp["gs"], case.norm)
        W = inp["W"]
        return lambda: F.linear(xn, W)
    return Impl("linear", prep, note="F.linear on the pre-normalised input")


def load_liger():
    """(module with liger_rms_norm [, liger_fused_add_rms_norm], None) or (None, reason)."""
    try:
        from liger_kernel.transformers import functional as lf  # noqa: PLC0415
    except Exception as e:  # ImportError, or a Triton / CUDA problem at import
        return None, f"liger_kernel not importable ({type(e).__name__}: {e}); liger baseline omitted"
    if not hasattr(lf, "liger_rms_norm"):
        return None, "liger_kernel has no liger_rms_norm; liger baseline omitted"
    return lf, None


def _liger(case: Case, lf) -> Optional[Impl]:
    """Liger's Triton RMSNorm applied per chunk (+ cat; + F.linear for the fc)."""
    if case.op == "fused_add_rms_norm":
        if hasattr(lf, "liger_fused_add_rms_norm"):
            def prep(inp):
                x, r, w = inp["x"], inp["residual"], inp["w"]
                return lambda: lf.liger_fused_add_rms_norm(x, r, w, EPS)
            return Impl("liger", prep, note="liger_fused_add_rms_norm")

        def prep(inp):
            x, r, w = inp["x"], inp["residual"], inp["w"]

            def call():
                s = x + r
                return lf.liger_rms_norm(s, w, EPS), s
            return call
        return Impl("liger", prep, note="x + residual, then liger_rms_norm")
    if case.op == FC_OP:
        if case.norm != "chunk":
            return None  # liger has no shared-statistic norm; "none" has no norm at all

        def prep(inp):
            xs, gs, W = inp["xs"], inp["gs"], inp["W"]
            return lambda: F.linear(torch.cat([lf.liger_rms_norm(x, g, EPS) for x, g in zip(xs, gs)], -1), W)
        return Impl("liger", prep, note="liger_rms_norm per chunk, cat, F.linear")

    def prep(inp):
        xs, ws = inp["xs"], inp["ws"]
        return lambda: torch.cat([lf.liger_rms_norm(x, w, EPS) for x, w in zip(xs, ws)], -1)
    return Impl("liger", prep, note="liger_rms_norm per chunk, cat")


def implementations(case: Case, *, with_compile: bool = True, liger=None, liger_note: str = "") -> ImplSet:
    """Ours first, then the baselines: eager, compile, liger (CUDA, when importable), and
    for the fc the F.linear floor."""
    out = ImplSet([_ours(case), Impl("eager", _bind(_eager_fn(case), case))])
    if with_compile:
        out.impls.append(_compiled(case))
    if case.device == "cuda":
        if liger is not None:
            impl = _liger(case, liger)
            if impl is not None:
                out.impls.append(impl)
        elif liger_note:
            out.notes.append(liger_note)
    if case.op == FC_OP:
        out.impls.append(_linear_floor(case))
    return out


def copy_roofline(case: Case) -> Impl:
    """``x.clone()`` of a tensor whose read + write bytes equal the case's bytes_moved."""
    def prep(inp):
        n = max(1, case.bytes_moved() // 2 // case.elem)
        src = torch.randn(n, device=case.device, dtype=torch.float32).to(case.dtype)
        return lambda: src.clone()
    return Impl("copy", prep, note="x.clone() of the same bytes")


# ---- truth and the numerics rule ----------------------------------------------------------


def reference_fp64(case: Case, inp: Dict[str, Any], rows: Optional[torch.Tensor] = None) -> Outputs:
    """The exact answer in float64 (on ``rows`` only when given)."""
    def take(t):
        return t if rows is None else t[rows.to(t.device)]

    if case.op == "fused_add_rms_norm":
        return R.fused_add_rms_norm_fp64(take(inp["x"]), take(inp["residual"]), inp["w"], EPS)
    xs = [take(x) for x in inp["xs"]]
    if case.op == FC_OP:
        # The model's fc: the norm weights folded in exactly (float64, never rounded).
        W = inp["W"].double()
        if case.norm != "none":
            W = W * torch.cat([g.double() for g in inp["gs"]])
        return R.rms_norm_cat_linear_fp64(xs, W, EPS, case.norm)
    return R.rms_norm_cat_fp64(xs, inp["ws"], EPS)


def as_tuple(out: Outputs) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def rel_err(out: Outputs, ref: Outputs, rows: Optional[torch.Tensor] = None) -> float:
    """max over outputs of ||out - ref|| / ||ref|| (float64); inf for a non-finite output or
    a shape mismatch."""
    worst = 0.0
    outs, refs = as_tuple(out), as_tuple(ref)
    if len(outs) != len(refs):
        return math.inf
    for o, r in zip(outs, refs):
        if rows is not None:
            o = o[rows.to(o.device)]
        if tuple(o.shape) != tuple(r.shape):
            return math.inf
        o64 = o.double()
        if not bool(torch.isfinite(o64).all()):
            return math.inf
        den = torch.linalg.vector_norm(r).item()
        num = torch.linalg.vector_norm(o64 - r).item()
        worst = max(worst, num / den if den > 0 else num)
    return worst


def tolerance(case: Case, eager_err: float) -> float:
    return 2.0 * eager_err + ERR_FLOOR[case.dtype]


@dataclass
class Check:
    err: float
    tol: float
    eager_err: float

    @property
    def ok(self) -> bool:
        return self.err <= self.tol


class Checker:
    """Computes the float64 truth and eager's error once per input set, then judges any
    implementation's output against the tolerance."""

    def __init__(self, case: Case, inp: Dict[str, Any]):
        self.case = case
        self.rows = case.check_rows()
        self.ref = reference_fp64(case, inp, self.rows)
        eager_out = _bind(_eager_fn(case), case)(inp)()
        self.eager_err = rel_err(eager_out, self.ref, self.rows)
        self.tol = tolerance(case, self.eager_err)

    def __call__(self, out: Outputs) -> Check:
        return Check(rel_err(out, self.ref, self.rows), self.tol, self.eager_err)


def case_sweep(ops: Sequence[str], Ts: Sequence[int], Hs: Sequence[int], dtypes: Sequence[torch.dtype],
               device: str, fc_Ts: Sequence[int], fc_Hs: Sequence[int], fc_norms: Sequence[str]) -> List[Case]:
    cases = []
    for dt in dtypes:
        for op in ops:
            if op == FC_OP:
                cases += [make_case(op, T, H, dt, device, nm) for nm in fc_norms for H in fc_Hs for T in fc_Ts]
            else:
                cases += [make_case(op, T, H, dt, device) for H in Hs for T in Ts]
    return cases
