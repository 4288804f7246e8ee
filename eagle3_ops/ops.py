"""Thin wrappers over ``torch.ops.eagle3`` and the fake (meta) implementations.

The C++ operators check their inputs and raise errors that name the argument; the
wrappers only turn Python containers into the lists the schemas expect. Fake
implementations give output shapes to ``torch.compile`` and CUDA-graph capture.

Inputs whose last dimension is not contiguous are handled correctly: such a tensor
is copied once to a contiguous last dimension before the kernel reads it (views with
any row stride, e.g. ``x.chunk(K, -1)`` of a ``[T, K*H]`` tensor, are read in place).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import Tensor

_ops = torch.ops.eagle3
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_NORMS = ("none", "chunk", "shared")

__all__ = ["rms_norm_cat", "fused_add_rms_norm", "rms_norm_cat_linear", "fold_norm_weights", "has_cuda_kernels"]


def has_cuda_kernels() -> bool:
    """True when this build of eagle3_ops holds the CUDA kernels (else CPU only)."""
    return _ops._build_info() == "cuda"


# The kernels' private strategy switches, each an op torch.ops.eagle3._<name>(value) that
# sets the value and returns the previous one (-1 only queries).
KERNEL_SWITCHES = ("norm_stage_limit", "norm_registers", "norm_split_chunks", "norm_stage_weights", "norm_carveout",
                   "norm_vecs_per_thread", "fc_decode_max_tokens", "fc_mma_max_tokens", "fc_mma_max_waves",
                   "fc_mma_features", "fc_splitk_max_tokens", "fc_splitk_cluster", "fc_wgmma_min_tokens",
                   "fc_wgmma_max_tokens", "fc_wgmma_tile_n", "fc_wgmma_cluster", "fc_wgmma_split_k",
                   "fc_wgmma_tile_stats", "fc_adjacent_gemm")


@contextlib.contextmanager
def kernel_switches(**settings: int) -> Iterator[None]:
    """The given strategy switches (names of KERNEL_SWITCHES) set for the block and restored
    when it ends, also when it raises; for the benchmarks and tests that compare the CUDA
    kernels' paths. An invalid value raises the op's own error; an unknown name, TypeError."""
    unknown = sorted(set(settings) - set(KERNEL_SWITCHES))
    if unknown:
        raise TypeError(f"kernel_switches: unknown switch {unknown}; the switches are {list(KERNEL_SWITCHES)}")
    previous = {}
    try:
        for name, value in settings.items():
            previous[name] = getattr(_ops, "_" + name)(value)
        yield
    finally:
        for name, value in reversed(list(previous.items())):
            getattr(_ops, "_" + name)(value)


_MAX_CHUNKS = 64  # kMaxChunks in csrc/checks.h


def _as_tensor_list(name: str, xs) -> list:
    if isinstance(xs, Tensor) or not isinstance(xs, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of tensors, got {type(xs).__name__}")
    if not xs:
        # With no tensor argument the dispatcher cannot reach the op's own check.
        raise ValueError(f"{name} must hold at least one tensor, got an empty list")
    for i, x in enumerate(xs):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}[{i}] must be a tensor, got {type(x).__name__}")
    return list(xs)


def rms_norm_cat(
    xs: Sequence[Tensor],
    weights: Optional[Sequence[Optional[Tensor]]] = None,
    eps: float = 1e-6,
    shared_stats: bool = False,
) -> Tensor:
    """RMSNorm of each of K inputs ``[..., H_k]``, written into one ``[..., sum H_k]`` output.

    Chunk k of the output is ``xs[k] * rsqrt(mean(xs[k]**2) + eps) * weights[k]``, with
    the statistic in fp32 and one rounding to x's dtype. ``weights`` holds one entry per
    input, each None or a 1-D ``[H_k]`` tensor of x's dtype or float32 (``None`` for the
    whole list means no weights). With ``shared_stats`` one RMS statistic is taken over
    the whole concatenated row (``norm_before_fc``); the weights still apply per chunk.
    Inputs may be views with any row stride; a non-contiguous last dimension is copied.
    """
    xs = _as_tensor_list("xs", xs)
    weights = [None] * len(xs) if weights is None else _as_tensor_list_or_none("weights", weights)
    return _ops.rms_norm_cat.default(xs, weights, float(eps), bool(shared_stats))


def _as_tensor_list_or_none(name: str, ws) -> list:
    if isinstance(ws, Tensor) or not isinstance(ws, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of tensors or None, got {type(ws).__name__}")
    for i, w in enumerate(ws):
        if w is not None and not isinstance(w, Tensor):
            raise TypeError(f"{name}[{i}] must be a tensor or None, got {type(w).__name__}")
    return list(ws)


def fused_add_rms_norm(
    x: Tensor, residual: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """Returns ``(normed, residual_sum)``: ``residual_sum = x + residual`` (fp32 sum rounded
    to x's dtype) and ``normed`` the RMSNorm of that sum, its statistic taken from the fp32
    sum. Both outputs are new contiguous tensors of x's shape."""
    return _ops.fused_add_rms_norm.default(x, residual, weight, float(eps))


def rms_norm_cat_linear(xs: Sequence[Tensor], weight: Tensor, eps: float = 1e-6, norm: str = "chunk") -> Tensor:
    """``fc(norm_cat(xs))`` without materialising the normalised concatenation.

    ``weight`` is ``[N, sum H_k]`` of x's dtype and already carries the norm weights in
    its columns (see :func:`fold_norm_weights`). ``norm`` is ``"none"`` (fc over the
    concatenation), ``"chunk"`` (one RMS statistic per chunk: ``fc_norm``) or
    ``"shared"`` (one statistic over the whole row: ``norm_before_fc``).
    """
    xs = _as_tensor_list("xs", xs)
    if not isinstance(norm, str):
        raise TypeError(f"norm must be a str, one of {_NORMS}, got {type(norm).__name__}")
    return _ops.rms_norm_cat_linear.default(xs, weight, float(eps), norm)


def fold_norm_weights(fc_weight: Tensor, norm_weights: Union[Tensor, Sequence[Tensor], None]) -> Tensor:
    """The fc weight ``[N, sum H_k]`` with the RMSNorm weights folded into its columns.

    ``norm_weights`` is one 1-D weight of width ``sum H_k`` (``norm_before_fc``), a list
    of 1-D per-chunk weights whose widths add up to ``sum H_k`` (``fc_norm``), or None
    (no norm weights: a copy of ``fc_weight``). The product is formed in float64 and cast
    once to ``fc_weight``'s dtype.
    """
    if not isinstance(fc_weight, Tensor) or fc_weight.dim() != 2:
        shape = tuple(fc_weight.shape) if isinstance(fc_weight, Tensor) else type(fc_weight).__name__
        raise ValueError(f"fold_norm_weights: fc_weight must be a 2-D [N, sum H_k] tensor, got {shape}")
    if not fc_weight.is_floating_point():
        raise TypeError(f"fold_norm_weights: fc_weight must be a floating-point tensor, got {fc_weight.dtype}")
    width = fc_weight.shape[1]
    if norm_weights is None:
        return fc_weight.clone()
    if isinstance(norm_weights, Tensor):
        parts = [norm_weights]
    else:
        parts = _as_tensor_list("norm_weights", norm_weights)
    for i, w in enumerate(parts):
        if w.dim() != 1:
            raise ValueError(f"fold_norm_weights: norm_weights[{i}] must be 1-D, got shape {tuple(w.shape)}")
        if not w.is_floating_point():
            raise TypeError(f"fold_norm_weights: norm_weights[{i}] must be floating point, got {w.dtype}")
    widths = [w.shape[0] for w in parts]
    if sum(widths) != width:
        raise ValueError(
            f"fold_norm_weights: the norm weights' widths {widths} add up to {sum(widths)}, "
            f"but fc_weight has {width} columns"
        )
    g = torch.cat([w.to(device=fc_weight.device, dtype=torch.float64) for w in parts])
    return (fc_weight.to(torch.float64) * g).to(fc_weight.dtype)


# ---- fake (meta) implementations -------------------------------------------------------


def _check_fake_chunks(op: str, xs: list) -> tuple[list, int]:
    if not xs:
        raise ValueError(f"{op}: xs must hold at least one tensor, got an empty list")
    if len(xs) > _MAX_CHUNKS:
        raise ValueError(f"{op}: xs may hold at most {_MAX_CHUNKS} tensors, got {len(xs)}")
    for k, x in enumerate(xs):
        if x.dim() < 1:
            raise ValueError(f"{op}: xs[{k}] must have at least one dimension, got a 0-d tensor")
        if x.shape[-1] < 1:
            raise ValueError(f"{op}: xs[{k}] has an empty last dimension; expected width >= 1")
    lead = list(xs[0].shape[:-1])
    for k, x in enumerate(xs):
        if list(x.shape[:-1]) != lead:
            raise ValueError(f"{op}: all xs must have the same leading shape; xs[0] is {tuple(xs[0].shape)} "
                             f"but xs[{k}] is {tuple(x.shape)}")
        if x.dtype != xs[0].dtype or x.dtype not in _FLOATS:
            raise TypeError(f"{op}: xs must share one float dtype (float32, float16, bfloat16); "
                            f"xs[{k}] is {x.dtype}")
    return lead, sum(x.shape[-1] for x in xs)


def _check_fake_eps(op: str, eps: float) -> None:
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"{op}: eps must be a finite number > 0, got {eps}")


@torch.library.register_fake("eagle3::rms_norm_cat")
def _rms_norm_cat_fake(xs, weights, eps, shared_stats=False):
    lead, total = _check_fake_chunks("rms_norm_cat", xs)
    if len(weights) != len(xs):
        raise ValueError(f"rms_norm_cat: weights must have one entry (a tensor or None) per input; got "
                         f"{len(weights)} weights for {len(xs)} inputs")
    _check_fake_eps("rms_norm_cat", eps)
    return xs[0].new_empty([*lead, total])


@torch.library.register_fake("eagle3::fused_add_rms_norm")
def _fused_add_rms_norm_fake(x, residual, weight, eps):
    if x.dim() < 1 or x.dtype not in _FLOATS:
        raise TypeError(f"fused_add_rms_norm: x must be a float32, float16 or bfloat16 tensor [..., H], "
                        f"got {x.dtype} of shape {tuple(x.shape)}")
    if residual.dtype != x.dtype:
        raise TypeError(f"fused_add_rms_norm: residual must have x's dtype ({x.dtype}), got {residual.dtype}")
    if residual.shape != x.shape:
        raise ValueError(f"fused_add_rms_norm: residual must have x's shape {tuple(x.shape)}, "
                         f"got {tuple(residual.shape)}")
    _check_fake_eps("fused_add_rms_norm", eps)
    return x.new_empty(x.shape), x.new_empty(x.shape)


@torch.library.register_fake("eagle3::rms_norm_cat_linear")
def _rms_norm_cat_linear_fake(xs, weight, eps, norm):
    lead, total = _check_fake_chunks("rms_norm_cat_linear", xs)
    if weight.dim() != 2 or weight.shape[1] != total:
        raise ValueError(f"rms_norm_cat_linear: weight must be 2-D [N, {total}], got {tuple(weight.shape)}")
    if weight.dtype != xs[0].dtype:
        raise TypeError(f"rms_norm_cat_linear: weight must have x's dtype ({xs[0].dtype}), got {weight.dtype}")
    if norm not in _NORMS:
        raise ValueError(f"rms_norm_cat_linear: norm must be one of {_NORMS}, got {norm!r}")
    _check_fake_eps("rms_norm_cat_linear", eps)
    return xs[0].new_empty([*lead, weight.shape[0]])
