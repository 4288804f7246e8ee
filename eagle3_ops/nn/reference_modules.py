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
    "apply_rope_pairs",
    "yarn_factors",
    "causal_attention",
    "ReferenceRMSNorm",
    "ReferenceCombine",
    "ReferenceAttention",
    "ReferenceMLP",
    "ReferenceDecoderLayer",
    "ReferenceLlamaDrafter",
    "ReferenceMLAttention",
    "ReferenceDeepseekDrafter",
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
    elif kind in ("yarn", "deepseek_yarn"):
        factor = float(scaling["factor"])
        old = float(scaling["original_max_position_embeddings"])
        fast, slow = float(scaling.get("beta_fast") or 32), float(scaling.get("beta_slow") or 1)

        def dim_turning(turns: float) -> float:  # the dim whose wavelength fits `turns` times in `old`
            return head_dim * math.log(old / (turns * 2 * math.pi)) / (2 * math.log(theta))

        lo, hi = dim_turning(fast), dim_turning(slow)
        if scaling.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, head_dim - 1)
        hi = hi + 0.001 if hi == lo else hi
        out = []
        for i, f in enumerate(inv):
            t = min(max((i - lo) / (hi - lo), 0.0), 1.0)  # 0: high frequency, kept; 1: interpolated
            out.append(f * (1 - t) + f / factor * t)
        inv = out
    else:
        raise NotImplementedError(f"rope_type {kind!r} is not supported (default, linear, llama3, yarn)")
    return torch.tensor(inv, dtype=dtype)


def _cached_rope_inv_freq(owner: nn.Module, head_dim: int, theta: float, scaling: Optional[dict],
                         dtype: torch.dtype, device: torch.device) -> Tensor:
    """:func:`rope_inv_freq` on ``device``, computed once per (head_dim, dtype, device) and kept
    on ``owner`` as a plain attribute (not a buffer: not in the state dict, and valid after
    ``to_empty``). So a forward copies nothing from the host and can be captured in a CUDA
    graph; the values are those of ``rope_inv_freq``."""
    cache = owner.__dict__.setdefault("_rope_inv_freq", {})
    key = (head_dim, dtype, torch.device(device))
    inv = cache.get(key)
    if inv is None:
        with torch.inference_mode(False):  # an ordinary tensor, usable outside inference mode too
            inv = cache[key] = rope_inv_freq(head_dim, theta, scaling, dtype=dtype).to(device)
    return inv


def yarn_factors(scaling: Optional[dict]) -> tuple[float, float]:
    """(cos/sin multiplier, softmax-scale multiplier) of DeepSeek's YaRN: ``m(f, mscale) /
    m(f, mscale_all_dim)`` (or ``attention_factor``) and ``m(f, mscale_all_dim) ** 2``, with
    ``m(f, s) = 0.1 s ln f + 1`` for f > 1, else 1. (1, 1) without YaRN."""
    if not scaling:
        return 1.0, 1.0

    def m(f: float, s: float) -> float:
        return 0.1 * s * math.log(f) + 1.0 if f > 1 else 1.0

    f = float(scaling.get("factor", 1.0))
    all_dim = float(scaling.get("mscale_all_dim") or 0.0)
    softmax = m(f, all_dim) ** 2
    if scaling.get("rope_type", scaling.get("type")) not in ("yarn", "deepseek_yarn"):
        return 1.0, softmax
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"]), softmax
    return m(f, float(scaling.get("mscale") or 1.0)) / m(f, all_dim), softmax


def rope_cos_sin(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype, mult: float = 1.0) -> tuple[Tensor, Tensor]:
    """cos, sin ``[..., head_dim]`` for integer positions ``[...]``, computed in fp32 (fp64),
    times ``mult`` (YaRN's cos/sin factor), rounded to ``dtype``."""
    cd = compute_dtype(dtype)
    ang = positions.to(cd)[..., None] * inv_freq.to(device=positions.device, dtype=cd)
    ang = torch.cat([ang, ang], dim=-1)
    return (ang.cos() * mult).to(dtype), (ang.sin() * mult).to(dtype)


def apply_rope_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE of ``x [B, heads, S, D]`` whose pairs are adjacent dims ``(2i, 2i+1)``
    (DeepSeek), with the rotate-half tables ``cos, sin [B, S, D]`` (their first halves);
    the result is returned with the pairs split into halves (first elements, then second)."""
    half = x.shape[-1] // 2
    c, s_ = cos[:, None, :, :half], sin[:, None, :, :half]
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.cat([a * c - b * s_, b * c + a * s_], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE of ``x [B, heads, S, D]`` with ``cos, sin [B, S, D]``."""
    cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rot * sin


def causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None) -> Tensor:
    """Softmax attention, ``q [B, Hq, S, D]``, ``k [B, Hkv, S, D]``, ``v [B, Hkv, S, Dv]``:
    grouped heads, causal mask, scores (times ``scale``, default ``D ** -0.5``) and softmax
    in fp32 (fp64), weights rounded to q's dtype."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    cd = compute_dtype(q.dtype)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-1, -2)).to(cd) * scale
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


class ReferenceMLAttention(nn.Module):
    """DeepSeek multi-head latent attention, written out in full: queries (through the q
    LoRA when ``q_lora_rank`` is set), a latent ``kv_a_layernorm(kv_a_proj(x)[:rank])``
    expanded by ``kv_b_proj`` into per-head keys and values, a shared rotary key; RoPE on the
    rotary dims only (adjacent pairs unless ``rope_interleave`` is false); YaRN's softmax
    factor. ``forward(x, positions)`` (it builds its own tables)."""

    def __init__(self, c: DrafterConfig, in_features: int):
        super().__init__()
        m = self.mla = c.mla
        self.c, self.heads = c, c.num_attention_heads
        b = c.attention_bias
        if m.q_lora_rank is None:
            self.q_proj = nn.Linear(in_features, self.heads * m.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(in_features, m.q_lora_rank, bias=b)
            self.q_a_layernorm = ReferenceRMSNorm(m.q_lora_rank, c.rms_norm_eps)
            self.q_b_proj = nn.Linear(m.q_lora_rank, self.heads * m.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(in_features, m.kv_lora_rank + m.qk_rope_head_dim, bias=b)
        self.kv_a_layernorm = ReferenceRMSNorm(m.kv_lora_rank, c.rms_norm_eps)
        self.kv_b_proj = nn.Linear(m.kv_lora_rank, self.heads * (m.qk_nope_head_dim + m.v_head_dim), bias=False)
        self.o_proj = nn.Linear(self.heads * m.v_head_dim, c.hidden_size, bias=b)

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        m, c, nh = self.mla, self.c, self.heads
        B, S, _ = x.shape
        dtype = x.dtype
        inv = _cached_rope_inv_freq(self, m.qk_rope_head_dim, c.rope_theta, c.rope_scaling, compute_dtype(dtype),
                                   positions.device)
        cos_mult, softmax_mult = yarn_factors(c.rope_scaling)
        cos, sin = rope_cos_sin(positions, inv, dtype, cos_mult)
        rope = apply_rope_pairs if m.rope_interleave else apply_rope
        if m.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, S, nh, m.qk_head_dim).transpose(1, 2)
        kv_a = self.kv_a_proj_with_mqa(x)
        latent = self.kv_a_layernorm(kv_a[..., :m.kv_lora_rank])
        k_pe = kv_a[..., m.kv_lora_rank:].view(B, 1, S, m.qk_rope_head_dim)
        kv = self.kv_b_proj(latent).view(B, S, nh, m.qk_nope_head_dim + m.v_head_dim).transpose(1, 2)
        k_nope, v = kv[..., :m.qk_nope_head_dim], kv[..., m.qk_nope_head_dim:]
        q = torch.cat([q[..., :m.qk_nope_head_dim], rope(q[..., m.qk_nope_head_dim:], cos, sin)], dim=-1)
        k = torch.cat([k_nope, rope(k_pe, cos, sin).expand(B, nh, S, m.qk_rope_head_dim)], dim=-1)
        o = causal_attention(q, k, v, scale=m.qk_head_dim ** -0.5 * softmax_mult)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, nh * m.v_head_dim))


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
        attention = ReferenceAttention if c.mla is None else ReferenceMLAttention
        self.self_attn = attention(c, 2 * H if first else H)
        self.mlp = ReferenceMLP(c)
        self.input_layernorm = ReferenceRMSNorm(H, eps)
        self.post_attention_layernorm = ReferenceRMSNorm(H, eps)
        if first:
            self.hidden_norm = ReferenceRMSNorm(H, eps)

    def forward(self, cos, sin, h, residual=None, embeds=None, positions=None):
        if self.first:
            hn = self.hidden_norm(h)
            x = torch.cat([self.input_layernorm(embeds), hn], dim=-1)
            residual = hn if self.nbr else h
        else:
            x, residual = self.input_layernorm(h, residual)
        if isinstance(self.self_attn, ReferenceMLAttention):
            a = self.self_attn(x, positions)
        else:
            a = self.self_attn(x, cos, sin)
        x, residual = self.post_attention_layernorm(a, residual)
        return self.mlp(x), residual


class ReferenceLlamaDrafter(nn.Module):
    """The complete EAGLE-3 drafter of DESIGN.md section 1 (no KV cache: full sequence):
    Llama attention, or DeepSeek multi-head latent attention when the config describes it
    (:class:`ReferenceDeepseekDrafter` insists on the latter)."""

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
        cos = sin = None
        if c.mla is None:
            inv = _cached_rope_inv_freq(self, c.head_dim, c.rope_theta, c.rope_scaling, compute_dtype(dtype),
                                       positions.device)
            cos, sin = rope_cos_sin(positions, inv, dtype, yarn_factors(c.rope_scaling)[0])
        e = self.embed_tokens(input_ids)
        h, residual = hidden_states, None
        for i, layer in enumerate(self.layers):
            h, residual = layer(cos, sin, h, residual, embeds=e if i == 0 else None, positions=positions)
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



class ReferenceDeepseekDrafter(ReferenceLlamaDrafter):
    """The complete DeepSeek (MLA) EAGLE-3 drafter: :class:`ReferenceLlamaDrafter`'s
    structure with :class:`ReferenceMLAttention` in every layer (the config must describe
    multi-head latent attention)."""

    def __init__(self, config):
        if resolve(config).mla is None:
            raise ValueError("ReferenceDeepseekDrafter needs a multi-head latent attention config (kv_lora_rank ...)")
        super().__init__(config)
