"""The pure-PyTorch truth of every eagle3 op (DESIGN.md section 1 rounding).

Each function computes what the serving engines' eager ("native") path computes:
the RMS statistic in fp32, ``(x.float() * rsqrt(mean(x**2) + eps)).to(dtype) * weight``,
rounded to x's dtype. ``*_fp64`` variants compute the exact answer in float64, the
yardstick of the numerics rule (DESIGN.md section 4). Tests, benchmarks and docs use these.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = [
    "rms_norm",
    "rms_norm_cat",
    "fused_add_rms_norm",
    "rms_norm_cat_linear",
    "rms_norm_cat_fp64",
    "fused_add_rms_norm_fp64",
    "rms_norm_cat_linear_fp64",
]


def rms_norm(x: Tensor, weight: Optional[Tensor], eps: float, scale: Optional[Tensor] = None) -> Tensor:
    """HF / serving RMSNorm: fp32 statistic, normalised value rounded to x's dtype, then
    times the weight, the product rounded to x's dtype. ``scale`` overrides the statistic."""
    xf = x.float()
    if scale is None:
        scale = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = (xf * scale).to(x.dtype)
    if weight is not None:
        y = (y * weight).to(x.dtype)
    return y


def rms_norm_cat(xs: Sequence[Tensor], weights: Optional[Sequence[Optional[Tensor]]], eps: float,
                 shared_stats: bool = False) -> Tensor:
    """The eager composition rms_norm_cat replaces: K RMSNorms (or one shared statistic), then cat."""
    weights = [None] * len(xs) if weights is None else list(weights)
    scale = None
    if shared_stats:
        total = sum(x.shape[-1] for x in xs)
        sq = sum(x.float().pow(2).sum(-1, keepdim=True) for x in xs)
        scale = torch.rsqrt(sq / total + eps)
    return torch.cat([rms_norm(x, w, eps, scale) for x, w in zip(xs, weights)], dim=-1)


def fused_add_rms_norm(x: Tensor, residual: Tensor, weight: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor]:
    """``(normed, residual_sum)``: the sum in fp32, returned rounded; the norm of the fp32 sum."""
    s = x.float() + residual.float()
    scale = torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps)
    y = (s * scale).to(x.dtype)
    if weight is not None:
        y = (y * weight).to(x.dtype)
    return y, s.to(x.dtype)


def _norm_cat_unweighted(xs: Sequence[Tensor], eps: float, norm: str) -> Tensor:
    if norm == "none":
        return torch.cat(list(xs), dim=-1)
    return rms_norm_cat(xs, None, eps, shared_stats=(norm == "shared"))


def rms_norm_cat_linear(xs: Sequence[Tensor], weight: Tensor, eps: float, norm: str) -> Tensor:
    """``F.linear(norm_cat(xs), weight)`` with the (folded) weight; ``norm`` in none/chunk/shared."""
    if norm not in ("none", "chunk", "shared"):
        raise ValueError(f"norm must be one of 'none', 'chunk', 'shared', got {norm!r}")
    return torch.nn.functional.linear(_norm_cat_unweighted(xs, eps, norm), weight)


# ---- exact float64 truths -----------------------------------------------------------------


def _rms64(x: Tensor, eps: float) -> Tensor:
    return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rms_norm_cat_fp64(xs: Sequence[Tensor], weights: Optional[Sequence[Optional[Tensor]]], eps: float,
                      shared_stats: bool = False) -> Tensor:
    """rms_norm_cat in float64 from the same inputs (inputs and weights upcast exactly)."""
    xd = [x.double() for x in xs]
    weights = [None] * len(xs) if weights is None else list(weights)
    if shared_stats:
        s = _rms64(torch.cat(xd, -1), eps)
        scales = [s] * len(xd)
    else:
        scales = [_rms64(x, eps) for x in xd]
    outs = [x * s * (w.double() if w is not None else 1.0) for x, s, w in zip(xd, scales, weights)]
    return torch.cat(outs, -1)


def fused_add_rms_norm_fp64(x: Tensor, residual: Tensor, weight: Optional[Tensor], eps: float):
    s = x.double() + residual.double()
    y = s * _rms64(s, eps)
    if weight is not None:
        y = y * weight.double()
    return y, s


def rms_norm_cat_linear_fp64(xs: Sequence[Tensor], weight: Tensor, eps: float, norm: str) -> Tensor:
    if norm == "none":
        xn = torch.cat([x.double() for x in xs], -1)
    else:
        xn = rms_norm_cat_fp64(xs, None, eps, shared_stats=(norm == "shared"))
    return xn @ weight.double().t()
