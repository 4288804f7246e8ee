"""Rotary position embedding of the drafters: default, linear, Llama-3 and YaRN scaling
(YaRN as DeepSeek defines it, with its ``mscale`` / ``mscale_all_dim`` factors), in the
rotate-half layout (Llama) or the interleaved-pairs layout (DeepSeek)."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = ["rope_inverse_frequencies", "rope_attention_factor", "yarn_mscale", "RotaryEmbedding"]

_YARN_TYPES = ("yarn", "deepseek_yarn")


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude factor ``0.1 * mscale * ln(factor) + 1`` (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_field(scaling: dict, key: str):
    try:
        return float(scaling[key])
    except KeyError:
        raise ValueError(f"rope_scaling of type {scaling.get('rope_type')} needs {key!r}; got {scaling}") from None


def rope_attention_factor(scaling: Optional[dict]) -> float:
    """The factor the cos / sin tables are multiplied by: 1, except for YaRN, where it is
    ``attention_factor`` when given, else ``mscale(factor, mscale) / mscale(factor,
    mscale_all_dim)`` (``mscale`` defaults to 1, ``mscale_all_dim`` to 0).

    These are DeepSeek's own YaRN rules, which the serving engines follow. transformers
    agrees whenever both ``mscale`` and ``mscale_all_dim`` are given (every DeepSeek-V2/V3
    and Kimi-K2 config) and differs when only one is: it then uses ``mscale(factor, 1)``.
    ``factor`` is required (transformers would derive it from the context lengths)."""
    if (scaling or {}).get("rope_type", "default") not in _YARN_TYPES:
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = _yarn_field(scaling, "factor")
    mscale = float(scaling.get("mscale") or 1.0)
    mscale_all_dim = float(scaling.get("mscale_all_dim") or 0.0)
    return yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)


def _yarn_inverse_frequencies(inv: Tensor, head_dim: int, theta: float, scaling: dict) -> Tensor:
    """Low frequencies interpolated by ``factor``, high ones kept, a linear ramp between the
    dims that turn ``beta_slow`` and ``beta_fast`` times over the original context."""
    factor = _yarn_field(scaling, "factor")
    old_len = _yarn_field(scaling, "original_max_position_embeddings")
    beta_fast = float(scaling.get("beta_fast") or 32)
    beta_slow = float(scaling.get("beta_slow") or 1)

    def dim_of(rotations: float) -> float:
        return head_dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64, device="cpu") - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate
    return inv / factor * (1 - keep) + inv * keep


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: Optional[dict]) -> Tensor:
    """float64 ``[head_dim // 2]`` inverse frequencies for ``rope_theta`` and the config's
    normalised ``rope_scaling`` (None, ``rope_type`` "default", "linear" or "llama3")."""
    inv = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim)
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "default":
        return inv
    if rope_type == "linear":
        return inv / float(scaling["factor"])
    if rope_type in _YARN_TYPES:
        return _yarn_inverse_frequencies(inv, head_dim, theta, scaling)
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
        f"rope_scaling type {rope_type!r} is not supported by eagle3_ops.nn (supported: default, linear, "
        f"llama3, yarn)")


class RotaryEmbedding:
    """cos/sin tables for integer positions; the inverse frequencies are kept per device in
    float32 and float64 (a plain attribute, not a buffer: ``module.to(bfloat16)`` must not
    round them).

    ``interleaved=False`` (Llama): dims ``i`` and ``i + d/2`` form a pair and the tables are
    ``[..., d]``; ``interleaved=True`` (DeepSeek): dims ``2i`` and ``2i + 1`` form a pair and
    the tables are ``[..., d/2]``. Use :meth:`rotate` with the tables of :meth:`cos_sin`."""

    def __init__(self, head_dim: int, theta: float, scaling: Optional[dict], *, interleaved: bool = False):
        self.head_dim = head_dim
        self.interleaved = interleaved
        self._inv64 = rope_inverse_frequencies(head_dim, theta, scaling)
        self.attention_factor = rope_attention_factor(scaling)
        self._per_device: dict = {}

    def inv_freq(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        key = (device, dtype)
        t = self._per_device.get(key)
        if t is None:
            t = self._per_device[key] = self._inv64.to(device=device, dtype=dtype)
        return t

    def cos_sin(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``cos, sin`` for ``positions [...]`` (``[..., head_dim]``, or ``[..., head_dim/2]``
        when interleaved): angles in fp32 (fp64 for float64 runs), times the YaRN attention
        factor, rounded to ``dtype``, as the serving engines' native path."""
        cd = torch.float64 if dtype == torch.float64 else torch.float32
        ang = positions.to(cd)[..., None] * self.inv_freq(positions.device, cd)
        if not self.interleaved:
            ang = torch.cat([ang, ang], dim=-1)
        cos, sin = ang.cos(), ang.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos.to(dtype), sin.to(dtype)

    def rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """``x [B, heads, S, head_dim]`` rotated by this embedding's tables ``[B, S, ...]``."""
        return self.apply_interleaved(x, cos, sin) if self.interleaved else self.apply(x, cos, sin)

    @staticmethod
    def apply_interleaved(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """``x [B, heads, S, D]`` with pairs ``(2i, 2i+1)``, ``cos, sin [B, S, D/2]``; the
        output keeps the interleaved layout."""
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)

    @staticmethod
    def apply(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """``x [B, heads, S, D]``, ``cos, sin [B, S, D]`` (rotate-half convention)."""
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin
