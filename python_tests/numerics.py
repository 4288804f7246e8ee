"""Shared test helpers: the numerics rule of DESIGN.md section 4, input makers, poison.

* ``rel_err`` / ``assert_close_to_fp64``: the op's error against the float64 truth must
  be at most 2x the error of the plain-PyTorch composition run in the same dtype, plus a
  small floor (fp16/bf16); under 1e-5 for fp32. The rule is checked on the relative
  Frobenius error AND, in the same 2x-plus-floor form, on the worst single element (floor:
  one rounding at the largest magnitude), so that one wrong element in a large output
  cannot hide in the norm. NaN/inf never pass.
  On failure the worst indices are printed with the op's, the truth's and eager's values.
* ``Rng``: fresh random inputs from a seeded ``torch.Generator`` (never zeros; each row
  gets its own scale so a statistic taken from the wrong row shows).
* ``make_chunks`` / ``make_weights``: the K inputs and norm weights in every layout the
  tests cover (separate tensors, ``torch.split`` views, padded views, 3-D, transposed...).
* ``poison_cuda_allocator`` / ``run_poisoned``: fill the CUDA caching allocator with NaN
  before an op runs, so an output element the kernel never writes reads back as NaN.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# Floors of the 2x rule on the relative error: about 1/4 (bf16) and 1/2.5 (fp16) of the unit
# round-off, far below any real bug.
FLOOR = {torch.bfloat16: 1e-3, torch.float16: 2e-4}
# Unit round-off (largest relative error of one rounding to nearest) of each dtype.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
FP32_TOL = 1e-5
# fp32 worst element, relative to max|ref| (same order as the norm rule).
FP32_ELEM_TOL = 1e-5


# ---- the numerics rule --------------------------------------------------------------------


def rel_err(out: Tensor, ref64: Tensor) -> float:
    """``||out - ref64|| / ||ref64||`` in float64 (0 for empty tensors; the absolute error
    when the truth is all zeros). NaN in ``out`` gives NaN, which no bound accepts."""
    if ref64.numel() == 0:
        return 0.0
    o = out.detach().to(device=ref64.device, dtype=torch.float64)
    r = ref64.to(torch.float64)
    num = torch.linalg.vector_norm(o - r).item()
    den = torch.linalg.vector_norm(r).item()
    return num / den if den > 0 else num


def max_abs_err(out: Tensor, ref64: Tensor) -> float:
    if ref64.numel() == 0:
        return 0.0
    d = (out.detach().to(device=ref64.device, dtype=torch.float64) - ref64.to(torch.float64)).abs()
    return float("nan") if torch.isnan(d).any() else d.max().item()


def _worst_report(out: Tensor, ref64: Tensor, eager: Optional[Tensor], n: int = 8) -> str:
    o = out.detach().to(device=ref64.device, dtype=torch.float64)
    r = ref64.to(torch.float64)
    d = (o - r).abs()
    d = torch.where(torch.isnan(d), torch.full_like(d, math.inf), d)  # NaN first
    flat = d.reshape(-1)
    k = min(n, flat.numel())
    vals, idx = torch.topk(flat, k)
    lines = [f"  worst {k} of {flat.numel()} elements (index: op / fp64 truth / eager in same dtype):"]
    for v, i in zip(vals.tolist(), idx.tolist()):
        pos = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), tuple(d.shape)))
        e = "" if eager is None else f" / {eager.reshape(-1)[i].item():.6g}"
        lines.append(f"    {pos}: {o.reshape(-1)[i].item():.6g} / {r.reshape(-1)[i].item():.6g}{e}"
                     f"   |err| {v:.3g}")
    nan = torch.isnan(o)
    if nan.any():
        rows = torch.nonzero(nan.reshape(-1, o.shape[-1]).any(-1)).reshape(-1)[:8].tolist() if o.dim() else []
        lines.append(f"  {int(nan.sum())} NaN element(s) in the op's output (rows {rows} ...)")
    return "\n".join(lines)


def assert_close_to_fp64(out: Tensor, ref64: Tensor, eager: Optional[Tensor], what: str = "") -> None:
    """DESIGN.md section 4. ``ref64``: float64 truth from the same inputs; ``eager``: the
    plain-PyTorch composition run in ``out``'s dtype (required for fp16/bf16)."""
    tag = f"{what}: " if what else ""
    assert tuple(out.shape) == tuple(ref64.shape), f"{tag}shape {tuple(out.shape)} != truth {tuple(ref64.shape)}"
    if out.numel() == 0:
        return
    finite = torch.isfinite(out)
    if not bool(finite.all()):
        raise AssertionError(f"{tag}{int((~finite).sum())} non-finite output element(s) (inputs are finite)\n"
                             + _worst_report(out, ref64, eager))
    err = rel_err(out, ref64)
    elem = max_abs_err(out, ref64)
    scale = ref64.abs().max().item()
    if out.dtype == torch.float32:
        bound, elem_bound = FP32_TOL, FP32_ELEM_TOL * scale
        detail = f"fp32 bound {FP32_TOL:g}"
        if eager is not None:
            # An ill-conditioned output (one dot product with cancellation, say) is off by more
            # than 1e-5 in any fp32 summation order; there the eager composition's error, x2,
            # is the bound (seen on an H200: eager and op both 1.6e-5 on a 1-element fc).
            e_err, e_elem = rel_err(eager, ref64), max_abs_err(eager, ref64)
            if 2.0 * e_err > bound:
                bound, elem_bound = 2.0 * e_err, max(elem_bound, 2.0 * e_elem)
                detail += f", raised to 2 x eager {e_err:.3g} (ill-conditioned output)"
    elif out.dtype in FLOOR:
        assert eager is not None, "the 2x rule needs the eager composition in the same dtype"
        assert eager.dtype == out.dtype, f"eager is {eager.dtype}, op is {out.dtype}"
        assert bool(torch.isfinite(eager).all()), "eager composition is not finite: bad test inputs"
        # The floor grows by u / sqrt(numel) for small outputs: the relative error of a few
        # roundings is a noisy sample (one element: eager may land on the truth by luck while
        # a correctly rounded op is u off); for outputs of thousands of elements it is nil.
        u = UNIT_ROUNDOFF[out.dtype]
        floor = FLOOR[out.dtype] + u / math.sqrt(out.numel())
        e_err = rel_err(eager, ref64)
        e_elem = max_abs_err(eager, ref64)
        bound = 2.0 * e_err + floor
        # worst element: 2x eager's worst element plus one rounding at the largest magnitude
        elem_bound = 2.0 * e_elem + u * scale
        detail = f"2 x eager {e_err:.3g} + floor {floor:.3g}; eager worst element {e_elem:.3g}"
    else:
        raise AssertionError(f"{tag}unexpected output dtype {out.dtype}")
    if not (err <= bound and elem <= elem_bound):
        raise AssertionError(
            f"{tag}{out.dtype} relative error {err:.4g} (bound {bound:.4g}: {detail}); "
            f"worst element error {elem:.4g} (bound {elem_bound:.4g}, max|truth| {scale:.4g})\n"
            + _worst_report(out, ref64, eager))


def assert_output(out: Tensor, shape: Sequence[int], dtype: torch.dtype, device, what: str = "") -> None:
    """Shape, dtype, device and contiguity of an op's output."""
    tag = f"{what}: " if what else ""
    assert isinstance(out, Tensor), f"{tag}expected a tensor, got {type(out).__name__}"
    assert tuple(out.shape) == tuple(shape), f"{tag}shape {tuple(out.shape)}, expected {tuple(shape)}"
    assert out.dtype == dtype, f"{tag}dtype {out.dtype}, expected {dtype}"
    assert out.device.type == torch.device(device).type, f"{tag}device {out.device}, expected {device}"
    assert out.is_contiguous(), f"{tag}output is not contiguous (strides {out.stride()})"


def assert_no_alias(outs: Sequence[Tensor], inputs: Sequence[Tensor]) -> None:
    """Outputs are new tensors: none shares storage with an input (or with another output)."""
    outs = [o for o in outs if o.numel()]
    seen = {t.untyped_storage().data_ptr() for t in inputs if t.numel()}
    for i, o in enumerate(outs):
        p = o.untyped_storage().data_ptr()
        assert p not in seen, f"output {i} shares storage with an input or another output"
        seen.add(p)


def assert_all_written(*outs: Tensor, what: str = "") -> None:
    """With finite inputs, a NaN can only come from an element the kernel never wrote
    (CUDA outputs come from an allocator filled with NaN, see ``run_poisoned``)."""
    for i, o in enumerate(outs):
        nan = torch.isnan(o)
        if bool(nan.any()):
            flat = nan.reshape(-1, o.shape[-1]) if o.dim() else nan.reshape(1, 1)
            rows = torch.nonzero(flat.any(-1)).reshape(-1)
            cols = torch.nonzero(flat.any(0)).reshape(-1)
            raise AssertionError(f"{what} output {i}: {int(nan.sum())} element(s) never written (NaN): "
                                 f"rows {rows[:10].tolist()}..., columns {cols[:10].tolist()}...")


# ---- inputs ---------------------------------------------------------------------------------


class Rng:
    """Random inputs from one seeded generator on ``device`` (reproducible per test)."""

    def __init__(self, seed: int, device="cpu"):
        self.device = torch.device(device)
        self.gen = torch.Generator(device=self.device)
        self.gen.manual_seed(int(seed) & 0x7FFFFFFF)

    def randn(self, shape, dtype=torch.float32, row_scale: bool = True) -> Tensor:
        """Normal values, each row ([..., H]) times its own scale in [1/4, 4]; never zero."""
        shape = tuple(shape)
        x = torch.randn(shape, generator=self.gen, device=self.device, dtype=torch.float32)
        if row_scale and len(shape) >= 1:
            s = torch.rand((*shape[:-1], 1), generator=self.gen, device=self.device) * 2.8 - 1.4
            x = x * s.exp()
        x = x.to(dtype)
        # A value that rounds to zero would not be "never zeros": push it away from 0.
        return torch.where(x == 0, torch.full_like(x, 0.5), x)

    def norm_weight(self, width: int, dtype) -> Tensor:
        """A norm weight near 1 with enough spread that a misplaced column shows."""
        return (1.0 + 0.5 * torch.randn(width, generator=self.gen, device=self.device)).to(dtype)

    def linear_weight(self, n: int, width: int, dtype) -> Tensor:
        """fc weight [n, width] scaled so outputs stay O(1) for any width."""
        w = torch.randn((n, width), generator=self.gen, device=self.device) / math.sqrt(max(width, 1))
        return w.to(dtype)


LAYOUTS = ("contig", "split", "padded", "3d", "3d_sliced", "transposed", "mixed")


def lead_shape(layout: str, T: int) -> tuple:
    """Leading shape the layout gives for T: the 3-D layouts hold 2T rows."""
    if layout == "3d":
        return (2, T)
    if layout == "3d_sliced":
        return (T, 2)
    return (T,)


def make_chunks(rng: Rng, layout: str, T: int, widths: Sequence[int], dtype) -> tuple[list, list]:
    """K inputs [..., H_k] in one layout; returns (xs, bases): bases are the tensors that own
    the storage (padding included), to check the op leaves every byte of them unchanged.

    contig     separate contiguous [T, H_k]
    split      torch.split of one [T, sum H_k] tensor (row stride sum H_k)
    padded     big_k[:, 3:3+H_k] of a [T, H_k + 11] tensor (odd row stride, misaligned start)
    3d         torch.split of one [2, T, sum H_k] tensor (mergeable leading dims)
    3d_sliced  big_k[:, 1:3, :] of a [T, 4, H_k] tensor (leading dims not mergeable: copied)
    transposed y_k.t() of a [H_k, T] tensor (last dim not contiguous: copied)
    mixed      chunk k cycles through transposed, padded, split views
    """
    widths = list(widths)
    total = sum(widths)
    if layout == "contig":
        xs = [rng.randn((T, h), dtype) for h in widths]
        return xs, list(xs)
    if layout == "split":
        big = torch.cat([rng.randn((T, h), dtype) for h in widths], dim=-1)  # own row scales per chunk
        return list(torch.split(big, widths, dim=-1)), [big]
    if layout == "padded":
        bigs = [rng.randn((T, h + 11), dtype) for h in widths]
        return [b[:, 3:3 + h] for b, h in zip(bigs, widths)], bigs
    if layout == "3d":
        big = torch.cat([rng.randn((2, T, h), dtype) for h in widths], dim=-1)
        return list(torch.split(big, widths, dim=-1)), [big]
    if layout == "3d_sliced":
        bigs = [rng.randn((T, 4, h), dtype) for h in widths]
        return [b[:, 1:3, :] for b in bigs], bigs
    if layout == "transposed":
        bigs = [rng.randn((T, h), dtype).t().contiguous() for h in widths]  # [H_k, T]
        return [b.t() for b in bigs], bigs
    if layout == "mixed":
        xs, bases = [], []
        big = rng.randn((T, total + 5), dtype)
        bases.append(big)
        off = 2
        for k, h in enumerate(widths):
            kind = k % 3
            if kind == 0:
                b = rng.randn((T, h), dtype).t().contiguous()
                xs.append(b.t())
                bases.append(b)
            elif kind == 1:
                b = rng.randn((T, h + 11), dtype)
                xs.append(b[:, 3:3 + h])
                bases.append(b)
            else:
                xs.append(big[:, off:off + h])
            off += h
        return xs, bases
    raise ValueError(f"unknown layout {layout!r}")


PAIR_LAYOUTS = ("contig", "padded", "3d", "3d_sliced", "transposed", "mixed")


def make_pair(rng: Rng, layout: str, T: int, H: int, dtype) -> tuple[Tensor, Tensor, list]:
    """(x, residual, bases) for fused_add_rms_norm, both [..., H] (leading shape ``lead_shape``).

    contig     two contiguous [T, H]
    padded     big[:, 3:3+H] views of [T, H + 11] tensors
    3d         x, residual = the two halves of one [2, T, 2H] tensor (row stride 2H)
    3d_sliced  big[:, 1:3, :] of [T, 4, H] tensors (leading dims not mergeable)
    transposed x = y.t() of a [H, T] tensor (copied), residual contiguous
    mixed      x padded view, residual transposed
    """
    if layout == "contig":
        x, r = rng.randn((T, H), dtype), rng.randn((T, H), dtype)
        return x, r, [x, r]
    if layout == "padded":
        bx, br = rng.randn((T, H + 11), dtype), rng.randn((T, H + 11), dtype)
        return bx[:, 3:3 + H], br[:, 3:3 + H], [bx, br]
    if layout == "3d":
        big = torch.cat([rng.randn((2, T, H), dtype), rng.randn((2, T, H), dtype)], dim=-1)
        return big[..., :H], big[..., H:], [big]
    if layout == "3d_sliced":
        bx, br = rng.randn((T, 4, H), dtype), rng.randn((T, 4, H), dtype)
        return bx[:, 1:3], br[:, 1:3], [bx, br]
    if layout == "transposed":
        bx = rng.randn((T, H), dtype).t().contiguous()
        r = rng.randn((T, H), dtype)
        return bx.t(), r, [bx, r]
    if layout == "mixed":
        bx = rng.randn((T, H + 11), dtype)
        br = rng.randn((T, H), dtype).t().contiguous()
        return bx[:, 3:3 + H], br.t(), [bx, br]
    raise ValueError(f"unknown layout {layout!r}")


def pair_lead_shape(layout: str, T: int) -> tuple:
    return lead_shape(layout, T)


WEIGHT_KINDS = ("none", "nones", "same", "fp32", "strided", "mixed")


def make_weights(rng: Rng, kind: str, widths: Sequence[int], dtype) -> Optional[list]:
    """Norm weights per chunk: none (the list is None), nones ([None]*K), same (x's dtype),
    fp32, strided (fp32, non-contiguous 1-D views), mixed (cycle x's dtype / None / fp32)."""
    if kind == "none":
        return None
    if kind == "nones":
        return [None] * len(widths)
    if kind == "same":
        return [rng.norm_weight(h, dtype) for h in widths]
    if kind == "fp32":
        return [rng.norm_weight(h, torch.float32) for h in widths]
    if kind == "strided":
        return [rng.norm_weight(2 * h, torch.float32)[::2] for h in widths]
    if kind == "mixed":
        return [(rng.norm_weight(h, dtype), None, rng.norm_weight(h, torch.float32))[k % 3]
                for k, h in enumerate(widths)]
    raise ValueError(f"unknown weight kind {kind!r}")


def snapshot(tensors: Sequence[Optional[Tensor]]) -> list:
    return [None if t is None else (t, t.clone()) for t in tensors]


def assert_unchanged(snap: list, what: str = "inputs") -> None:
    """The op must not write to its inputs (nor to the padding around a view)."""
    for i, s in enumerate(snap):
        if s is None:
            continue
        t, c = s
        assert torch.equal(t, c), f"{what}[{i}] was modified by the op"


# ---- poison ---------------------------------------------------------------------------------


def poison_cuda_allocator(nbytes: Sequence[int], copies: int = 3, device="cuda") -> None:
    """Fill the CUDA caching allocator with NaN: allocate ``copies`` blocks of each size
    (plus one large block) filled with 0xFF bytes (NaN in fp32, fp16 and bf16), then free
    them. The next allocations on this stream reuse those blocks, so an output element the
    kernel never writes reads back as NaN."""
    blocks = []
    for n in list(nbytes) + [64 << 20]:
        for _ in range(copies):
            blocks.append(torch.full((max(int(n), 1),), 0xFF, dtype=torch.uint8, device=device))
    del blocks


def run_poisoned(device, fn: Callable, out_nbytes: Sequence[int]):
    """Runs fn() (an op call); on CUDA, after filling the caching allocator with NaN."""
    if torch.device(device).type == "cuda":
        poison_cuda_allocator(out_nbytes, device=device)
        out = fn()
        torch.cuda.synchronize()
        return out
    return fn()


def nbytes(shape, dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()
