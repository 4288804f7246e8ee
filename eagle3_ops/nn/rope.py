"""Rotary position embedding of the Llama drafter: default, linear and Llama-3 scaling."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = ["rope_inverse_frequencies", "RotaryEmbedding"]


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: Optional[dict]) -> Tensor:
    """float64 ``[head_dim // 2]`` inverse frequencies for ``rope_theta`` and the config's
    normalised ``rope_scaling`` (None, ``rope_type`` "default", "linear" or "llama3")."""
    inv = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim)
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "default":
        return inv
    if rope_type == "linear":
        return inv / float(scaling["factor"])
    if rope_type == "llama3":
        try:
            factor = float(scaling["factor"])
            old_len = float(scaling["original_max_position_embeddings"])
        except KeyError as e:
            raise ValueError(f"rope_scaling of type llama3 needs {e.args[0]!r}; got {scaling}") from None
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, blended, scaled)
    raise NotImplementedError(
        f"rope_scaling type {rope_type!r} is not supported by eagle3_ops.nn (supported: default, linear, llama3)")


class RotaryEmbedding:
    """cos/sin tables for integer positions; the inverse frequencies are kept per device in
    float32 and float64 (a plain attribute, not a buffer: ``module.to(bfloat16)`` must not
    round them)."""

    def __init__(self, head_dim: int, theta: float, scaling: Optional[dict]):
        self.head_dim = head_dim
        self._inv64 = rope_inverse_frequencies(head_dim, theta, scaling)
        self._per_device: dict = {}

    def inv_freq(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        key = (device, dtype)
        t = self._per_device.get(key)
        if t is None:
            t = self._per_device[key] = self._inv64.to(device=device, dtype=dtype)
        return t

    def cos_sin(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``cos, sin [..., head_dim]`` for ``positions [...]``: angles in fp32 (fp64 for
        float64 runs), rounded to ``dtype``, as the serving engines' native path."""
        cd = torch.float64 if dtype == torch.float64 else torch.float32
        ang = positions.to(cd)[..., None] * self.inv_freq(positions.device, cd)
        ang = torch.cat([ang, ang], dim=-1)
        return ang.cos().to(dtype), ang.sin().to(dtype)

    @staticmethod
    def apply(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """``x [B, heads, S, D]``, ``cos, sin [B, S, D]`` (rotate-half convention)."""
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin
