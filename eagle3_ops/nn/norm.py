"""``RMSNorm``: a drop-in for the RMSNorm modules of Hugging Face and the serving engines."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import ops
from . import reference_modules as ref

__all__ = ["RMSNorm", "use_kernels"]

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def use_kernels(x: Tensor, *params: Optional[Tensor]) -> bool:
    """True when the eagle3 ops can compute this call: x's dtype has kernels (fp32, fp16,
    bf16) and autograd does not need a graph (the ops have no backward). Otherwise the
    modules run the differentiable pure-PyTorch composition of ``reference_modules``."""
    if x.dtype not in _KERNEL_DTYPES:
        return False
    if not torch.is_grad_enabled():
        return True
    return not (x.requires_grad or any(p is not None and p.requires_grad for p in params))


def weight_for(x: Tensor, w: Optional[Tensor]) -> Optional[Tensor]:
    """A norm weight the ops accept: x's dtype or float32 as it is, else cast to x's dtype."""
    if w is None or w.dtype == x.dtype or w.dtype == torch.float32:
        return w
    return w.to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm with a ``weight`` parameter, as the serving engines' RMSNorm.

    ``forward(x)`` returns ``normed``; ``forward(x, residual)`` returns
    ``(normed, residual_sum)`` with ``residual_sum = x + residual`` (one fused op). The
    statistic is taken in fp32, the result rounded once to x's dtype (DESIGN.md section 1).
    Uses ``eagle3.rms_norm_cat`` / ``eagle3.fused_add_rms_norm`` on CPU and CUDA; float64
    inputs, or calls that autograd must differentiate, run the pure-PyTorch reference.
    The epsilon is ``variance_epsilon`` (the Hugging Face name); ``eps`` is an alias.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, *, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.variance_epsilon = float(eps)

    @property
    def eps(self) -> float:
        return self.variance_epsilon

    @property
    def hidden_size(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: Tensor, residual: Optional[Tensor] = None):
        eps = self.variance_epsilon
        if use_kernels(x, self.weight, residual):
            w = weight_for(x, self.weight)
            if residual is None:
                return ops.rms_norm_cat([x], [w], eps)
            return ops.fused_add_rms_norm(x, residual, w, eps)
        if residual is None:
            return ref.rms_norm(x, self.weight, eps)
        return ref.add_rms_norm(x, residual, self.weight, eps)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.variance_epsilon}"
