"""Pure-PyTorch reference of the eagle3_ops.nn modules, written from DESIGN.md section 1.

This is the truth the modules are tested against (and the composition they replace). It
uses no eagle3 op and no code of the modules. Parameter names are those of
:mod:`eagle3_ops.nn` (the speculators checkpoint names), so one state dict loads into both.

Rounding follows the serving engines' eager ("native") path: RMS statistics in fp32, the
normalised value rounded to the input dtype, then times the weight (rounded); RoPE cos/sin
computed in fp32 and rounded to the input dtype; attention softmax in fp32. Run in float64
(``module.double()``) every step is float64, which gives the exact answer of the numerics
rule (DESIGN.md section 4).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import DrafterConfig, resolve

__all__ = [
    "compute_dtype",
    "rms_norm",
    "add_rms_norm",
    "rope_inv_freq",
    "rope_cos_sin",
    "apply_rope",
    "causal_attention",
    "ReferenceRMSNorm",
    "ReferenceCombine",
    "ReferenceAttention",
    "ReferenceMLP",
    "ReferenceDecoderLayer",
    "ReferenceLlamaDrafter",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are taken in: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- functions --------------------------------------------------------------------------


def rms_norm(x: Tensor, weight: Optional[Tensor], eps: float) -> Tensor:
    """``(x * rsqrt(mean(x**2) + eps)).to(dtype) * weight``, statistic in fp32 (fp64)."""
    xf = x.to(compute_dtype(x.dtype))
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    if weight is not None:
        y = (y * weight).to(x.dtype)
    return y


def add_rms_norm(x: Tensor, residual: Tensor, weight: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor]:
    """``(rms_norm(x + residual), x + residual)``: the sum formed in fp32 (fp64), the norm
    taken of that sum, the returned sum rounded to x's dtype."""
    cd = compute_dtype(x.dtype)
    s = x.to(cd) + residual.to(cd)
    y = (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    if weight is not None:
        y = (y * weight).to(x.dtype)
    return y, s.to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: Optional[dict], dtype=torch.float64) -> Tensor:
    """Inverse frequencies of RoPE, ``theta ** (-2i / head_dim)``, with the rope scaling of
    the config: None / "default", "linear" (divide by factor) or "llama3" (Llama 3.1: long
    wavelengths divided by factor, short kept, a smooth blend in between)."""
    inv = [theta ** (-(2 * i) / head_dim) for i in range(head_dim // 2)]
    kind = None if not scaling else scaling.get("rope_type", scaling.get("type", "default"))
    if kind in (None, "default"):
        pass
    elif kind == "linear":
        inv = [f / float(scaling["factor"]) for f in inv]
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old = float(scaling["original_max_position_embeddings"])
        out = []
        for f in inv:
            wavelen = 2 * math.pi / f
            if wavelen < old / high:  # high frequency: kept
                out.append(f)
            elif wavelen > old / low:  # low frequency: scaled
                out.append(f / factor)
            else:  # in between: blend
                smooth = (old / wavelen - low) / (high - low)
                out.append((1 - smooth) * f / factor + smooth * f)
        inv = out
    else:
        raise NotImplementedError(f"rope_type {kind!r} is not supported (default, linear, llama3)")
    return torch.tensor(inv, dtype=dtype)


def rope_cos_sin(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin ``[..., head_dim]`` for integer positions ``[...]``, computed in fp32 (fp64)
    and rounded to ``dtype``."""
    cd = compute_dtype(dtype)
    ang = positions.to(cd)[..., None] * inv_freq.to(device=positions.device, dtype=cd)
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE of ``x [B, heads, S, D]`` with ``cos, sin [B, S, D]``."""
    cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rot * sin


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Softmax attention, ``q [B, Hq, S, D]``, ``k, v [B, Hkv, S, D]``: grouped heads,
    causal mask, scores and softmax in fp32 (fp64), weights rounded to q's dtype."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    cd = compute_dtype(q.dtype)
    scores = (q @ k.transpose(-1, -2)).to(cd) / math.sqrt(q.shape[-1])
    S = q.shape[-2]
    mask = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1).to(q.dtype) @ v


_ACTS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu,
         "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


# ---- modules ----------------------------------------------------------------------------


class ReferenceRMSNorm(nn.Module):
    """RMSNorm; ``forward(x, residual=None)`` -> normed, or (normed, x + residual)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: Tensor, residual: Optional[Tensor] = None):
        if residual is None:
            return rms_norm(x, self.weight, self.variance_epsilon)
        return add_rms_norm(x, residual, self.weight, self.variance_epsilon)


class ReferenceCombine(nn.Module):
    """``fc(input_norm(cat(aux)))`` (norm_before_fc), ``fc(cat(fc_norm[k](a_k)))`` (fc_norm)
    or ``fc(cat(aux))``."""

    def __init__(self, config):
        super().__init__()
        c = resolve(config)
        self.num_aux, self.width, self.eps = c.num_aux_hidden_states, c.target_hidden_size, c.rms_norm_eps
        self.fc = nn.Linear(c.fc_in_features, c.hidden_size, bias=False)
        if c.norm_before_fc:
            self.input_norm = ReferenceRMSNorm(c.fc_in_features, c.rms_norm_eps)
        if c.fc_norm:
            self.fc_norm = nn.ModuleList(ReferenceRMSNorm(c.target_hidden_size, c.rms_norm_eps)
                                         for _ in range(c.num_aux_hidden_states))

    def forward(self, aux: Union[Tensor, Sequence[Tensor]]) -> Tensor:
        x = aux if isinstance(aux, Tensor) else torch.cat(list(aux), dim=-1)
        if hasattr(self, "input_norm"):
            x = self.input_norm(x)
        if hasattr(self, "fc_norm"):
            x = torch.cat([n(a) for n, a in zip(self.fc_norm, x.split(self.width, dim=-1))], dim=-1)
        return self.fc(x)


class ReferenceAttention(nn.Module):
    def __init__(self, c: DrafterConfig, in_features: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        b = c.attention_bias
        self.q_proj = nn.Linear(in_features, self.heads * self.head_dim, bias=b)
        self.k_proj = nn.Linear(in_features, self.kv_heads * self.head_dim, bias=b)
        self.v_proj = nn.Linear(in_features, self.kv_heads * self.head_dim, bias=b)
        self.o_proj = nn.Linear(self.heads * self.head_dim, c.hidden_size, bias=b)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, S, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.kv_heads, self.head_dim).transpose(1, 2)
        o = causal_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, self.heads * self.head_dim))


class ReferenceMLP(nn.Module):
    def __init__(self, c: DrafterConfig):
        super().__init__()
        b = c.mlp_bias
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=b)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=b)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=b)
        self.act = _ACTS[c.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class ReferenceDecoderLayer(nn.Module):
    """Layer 0 (``first=True``): attention over ``cat([input_layernorm(e), hidden_norm(h)])``
    (width 2H), residual h (or hidden_norm(h) with norm_before_residual). Later layers: an
    ordinary pre-norm Llama layer. Returns ``(mlp_out, residual)``; the caller adds them."""

    def __init__(self, c: DrafterConfig, first: bool):
        super().__init__()
        self.first, self.nbr = first, c.norm_before_residual
        H, eps = c.hidden_size, c.rms_norm_eps
        self.self_attn = ReferenceAttention(c, 2 * H if first else H)
        self.mlp = ReferenceMLP(c)
        self.input_layernorm = ReferenceRMSNorm(H, eps)
        self.post_attention_layernorm = ReferenceRMSNorm(H, eps)
        if first:
            self.hidden_norm = ReferenceRMSNorm(H, eps)

    def forward(self, cos, sin, h, residual=None, embeds=None):
        if self.first:
            hn = self.hidden_norm(h)
            x = torch.cat([self.input_layernorm(embeds), hn], dim=-1)
            residual = hn if self.nbr else h
        else:
            x, residual = self.input_layernorm(h, residual)
        a = self.self_attn(x, cos, sin)
        x, residual = self.post_attention_layernorm(a, residual)
        return self.mlp(x), residual


class ReferenceLlamaDrafter(nn.Module):
    """The complete Llama EAGLE-3 drafter of DESIGN.md section 1 (no KV cache: full sequence)."""

    def __init__(self, config):
        super().__init__()
        c = self.config = resolve(config)
        H = c.hidden_size
        self.embed_tokens = nn.Embedding(c.vocab_size, H)
        self.fc = nn.Linear(c.fc_in_features, H, bias=False)
        if c.norm_before_fc:
            self.input_norm = ReferenceRMSNorm(c.fc_in_features, c.rms_norm_eps)
        if c.fc_norm:
            self.fc_norm = nn.ModuleList(ReferenceRMSNorm(c.target_hidden_size, c.rms_norm_eps)
                                         for _ in range(c.num_aux_hidden_states))
        self.layers = nn.ModuleList(ReferenceDecoderLayer(c, i == 0) for i in range(c.num_hidden_layers))
        self.norm = ReferenceRMSNorm(H, c.rms_norm_eps)
        self.lm_head = nn.Linear(H, c.draft_vocab_size, bias=False)
        if c.draft_vocab_size != c.vocab_size:
            self.register_buffer("d2t", torch.zeros(c.draft_vocab_size, dtype=torch.long))
            self.register_buffer("t2d", torch.zeros(c.vocab_size, dtype=torch.bool))
        else:
            self.d2t = self.t2d = None

    def combine_hidden_states(self, aux) -> Tensor:
        x = aux if isinstance(aux, Tensor) else torch.cat(list(aux), dim=-1)
        if hasattr(self, "input_norm"):
            x = self.input_norm(x)
        if hasattr(self, "fc_norm"):
            w = self.config.target_hidden_size
            x = torch.cat([n(a) for n, a in zip(self.fc_norm, x.split(w, dim=-1))], dim=-1)
        return self.fc(x)

    def forward(self, input_ids: Tensor, positions: Tensor, hidden_states: Tensor):
        flat = input_ids.dim() == 1
        if flat:
            input_ids, positions, hidden_states = input_ids[None], positions[None], hidden_states[None]
        c = self.config
        dtype = hidden_states.dtype
        inv = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling, dtype=compute_dtype(dtype))
        cos, sin = rope_cos_sin(positions, inv, dtype)
        e = self.embed_tokens(input_ids)
        h, residual = hidden_states, None
        for i, layer in enumerate(self.layers):
            h, residual = layer(cos, sin, h, residual, embeds=e if i == 0 else None)
        out, pre = self.norm(h, residual)
        fed_back = out if c.norm_output else pre
        if flat:
            out, fed_back = out[0], fed_back[0]
        return out, fed_back

    def compute_logits(self, h: Tensor) -> Tensor:
        logits = self.lm_head(h)
        if self.d2t is None:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.config.vocab_size), float("-inf"))
        full[..., torch.arange(self.config.draft_vocab_size, device=h.device) + self.d2t] = logits
        return full
