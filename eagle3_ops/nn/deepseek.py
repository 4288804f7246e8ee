"""``Eagle3DeepseekDrafter``: the EAGLE-3 draft model of DeepSeek-V2/V3-family targets
(DeepSeek-V3, Kimi-K2, ...), whose decoder layers use multi-head latent attention (MLA).

The outer structure is :class:`~eagle3_ops.nn.drafter.Eagle3Drafter` (DESIGN.md section 1):
combine (``fc`` with ``input_norm`` or ``fc_norm`` folded in), layer 0 reading
``cat([input_layernorm(embeds), hidden_norm(h)])`` of width 2H through one ``rms_norm_cat``,
``norm_before_residual``, a dense MLP, the final ``fused_add_rms_norm``, ``norm_output``,
logits through ``d2t``. Only the attention differs (:class:`Eagle3MLAttention`):

* queries: ``q_proj`` when ``q_lora_rank`` is null, else ``q_b_proj(q_a_layernorm(q_a_proj(x)))``;
* keys and values: ``kv_a_proj_with_mqa(x)`` gives a latent of width ``kv_lora_rank`` and a
  shared rotary key of width ``qk_rope_head_dim``; ``kv_a_layernorm`` normalises the latent
  (a strided view, read in place by ``rms_norm_cat``); ``kv_b_proj`` expands it to
  ``qk_nope_head_dim`` key and ``v_head_dim`` value dims per head;
* layer 0's ``q_a_proj`` / ``q_proj`` and ``kv_a_proj_with_mqa`` read the 2H-wide input,
  ``o_proj`` writes H;
* rotary embedding on the ``qk_rope_head_dim`` dims only, interleaved pairs by default
  (``rope_interleave``), with DeepSeek's YaRN scaling when ``rope_scaling`` asks for it;
  softmax scale ``qk_head_dim ** -0.5``, times ``mscale(factor, mscale_all_dim) ** 2``
  when ``rope_scaling`` names ``mscale_all_dim``.

The KV cache (:class:`~eagle3_ops.nn.drafter.DrafterKVCache`) holds the normalised latent
and the rotated shared key per position (``kv_lora_rank + qk_rope_head_dim`` values, not
``heads x (qk_head_dim + v_head_dim)``). A call with no cached past (a prefill) expands
the latent through ``kv_b_proj``; a call that attends to cached positions (drafting)
absorbs ``kv_b_proj`` into the query and the output instead (scores against the latent
directly), so a step never re-expands the whole cache -- unless it brings so many new
positions that expanding costs fewer multiply-adds (``_absorb``). With a q LoRA,
``q_a_layernorm`` and ``q_b_proj`` run as one ``rms_norm_cat_linear``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .combine import FoldedWeightCache, combine_aux
from .drafter import DrafterKVCache, Eagle3Drafter
from .norm import RMSNorm
from .rope import RotaryEmbedding, yarn_mscale

__all__ = ["Eagle3MLAttention", "Eagle3DeepseekDrafter", "mla_softmax_scale"]


def mla_softmax_scale(c) -> float:
    """``qk_head_dim ** -0.5``, times ``mscale(factor, mscale_all_dim) ** 2`` when the
    config's ``rope_scaling`` names ``mscale_all_dim`` (DeepSeek's YaRN configs)."""
    scale = c.mla.qk_head_dim ** -0.5
    rs = c.rope_scaling or {}
    mscale_all_dim = rs.get("mscale_all_dim")
    if mscale_all_dim:
        if "factor" not in rs:
            raise ValueError(f"rope_scaling names mscale_all_dim but no factor: {rs}")
        m = yarn_mscale(float(rs["factor"]), float(mscale_all_dim))
        scale *= m * m
    return scale


def _causal_mask(S: int, L: int, device) -> Tensor:
    """Queries at positions L-S..L-1 of an L-long sequence: a boolean ``[S, L]`` mask."""
    rows = torch.arange(L - S, L, device=device)[:, None]
    return rows >= torch.arange(L, device=device)[None, :]


class Eagle3MLAttention(nn.Module):
    """Multi-head latent attention (see the module docstring); ``in_features`` is 2H for
    layer 0, H otherwise. ``forward(x [B, S, in], cos, sin, cache=None) -> [B, S, H]``."""

    def __init__(self, c, in_features: int, layer_idx: int, *, device=None, dtype=None):
        super().__init__()
        m = c.mla
        fk = {"device": device, "dtype": dtype}
        bias = c.attention_bias
        self.layer_idx = layer_idx
        self.num_heads = c.num_attention_heads
        self.q_lora_rank, self.kv_lora_rank = m.q_lora_rank, m.kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
        self.qk_head_dim = m.qk_head_dim
        self.interleaved = m.rope_interleave
        h = self.num_heads
        if m.q_lora_rank is None:
            self.q_proj = nn.Linear(in_features, h * m.qk_head_dim, bias=False, **fk)
        else:
            self.q_a_proj = nn.Linear(in_features, m.q_lora_rank, bias=bias, **fk)
            self.q_a_layernorm = RMSNorm(m.q_lora_rank, c.rms_norm_eps, **fk)
            self.q_b_proj = nn.Linear(m.q_lora_rank, h * m.qk_head_dim, bias=False, **fk)
            self._q_folded = FoldedWeightCache()  # q_b_proj.weight * q_a_layernorm.weight
        self.kv_a_proj_with_mqa = nn.Linear(in_features, m.kv_lora_rank + m.qk_rope_head_dim, bias=bias, **fk)
        self.kv_a_layernorm = RMSNorm(m.kv_lora_rank, c.rms_norm_eps, **fk)
        self.kv_b_proj = nn.Linear(m.kv_lora_rank, h * (m.qk_nope_head_dim + m.v_head_dim), bias=False, **fk)
        self.o_proj = nn.Linear(h * m.v_head_dim, c.hidden_size, bias=bias, **fk)
        self.softmax_scale = mla_softmax_scale(c)

    def _rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        if self.interleaved:
            return RotaryEmbedding.apply_interleaved(x, cos, sin)
        return RotaryEmbedding.apply(x, cos, sin)

    def _queries(self, x: Tensor) -> Tensor:
        """``q_proj(x)``, or ``q_b_proj(q_a_layernorm(q_a_proj(x)))`` with the norm and
        q_b_proj as one ``rms_norm_cat_linear`` (the norm weight folded into q_b_proj's)."""
        if self.q_lora_rank is None:
            return self.q_proj(x)
        norm = self.q_a_layernorm
        return combine_aux(self.q_a_proj(x), self.q_b_proj.weight, "chunk", [norm.weight], norm.variance_epsilon,
                           1, self.q_lora_rank, self._q_folded)

    def _absorb(self, S: int, L: int) -> bool:
        """Attend in the latent space for S queries against L > S positions when that costs
        fewer multiply-adds than expanding the L latents through kv_b_proj: absorbed,
        S L h (2 r + d_rope) + S h d_nope r + S h r d_v; expanded, L r h (d_nope + d_v) +
        S L h (d_nope + d_rope + d_v). Drafting steps (S of 1 to a few dozen) absorb;
        long chunks appended to a short cache expand."""
        h, r, dn, dr, dv = self.num_heads, self.kv_lora_rank, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
        absorbed = S * L * h * (2 * r + dr) + S * h * r * (dn + dv)
        expanded = L * r * h * (dn + dv) + S * L * h * (dn + dr + dv)
        return absorbed < expanded

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: Optional[DrafterKVCache] = None) -> Tensor:
        B, S, _ = x.shape
        h, dn, dr, r = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.kv_lora_rank
        q = self._queries(x).view(B, S, h, self.qk_head_dim).transpose(1, 2)
        q_nope, q_rot = q.split([dn, dr], dim=-1)
        q_rot = self._rotate(q_rot, cos, sin)
        ckv = self.kv_a_proj_with_mqa(x)  # [B, S, r + dr]
        latent = self.kv_a_layernorm(ckv[..., :r]).unsqueeze(1)  # [B, 1, S, r]
        k_rot = self._rotate(ckv[..., r:].unsqueeze(1), cos, sin)  # [B, 1, S, dr]
        if cache is not None:
            latent, k_rot = cache.update(self.layer_idx, latent, k_rot)
        L = latent.shape[2]
        if S == 0:
            o = q.new_zeros(B, h, 0, self.v_head_dim)
        elif L > S and self._absorb(S, L):
            o = self._absorbed(q_nope, q_rot, latent, k_rot)
        else:
            o = self._expanded(q_nope, q_rot, latent, k_rot)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, h * self.v_head_dim))

    def _expanded(self, q_nope: Tensor, q_rot: Tensor, latent: Tensor, k_rot: Tensor) -> Tensor:
        """Keys and values of every head from ``kv_b_proj(latent)`` for all L positions; the
        S queries are the last S of them."""
        B, h, S, _ = q_nope.shape
        L = latent.shape[2]
        kv = self.kv_b_proj(latent[:, 0]).view(B, L, h, self.qk_nope_head_dim + self.v_head_dim).transpose(1, 2)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        q = torch.cat([q_nope, q_rot], dim=-1)
        k = torch.cat([k_nope, k_rot.expand(B, h, L, self.qk_rope_head_dim)], dim=-1)
        if L == S:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_causal_mask(S, L, q.device), scale=self.softmax_scale)

    def _absorbed(self, q_nope: Tensor, q_rot: Tensor, latent: Tensor, k_rot: Tensor) -> Tensor:
        """Queries against L cached positions: ``q_nope . k_nope = (q_nope W_uk) . latent`` and
        ``p @ v = (p @ latent) W_uv^T`` per head, so the scores and the weighted sum run in
        the latent space against one shared key / value "head" (width kv_lora_rank +
        qk_rope_head_dim / kv_lora_rank). The h heads are folded into the query rows
        (``[B, 1, h*S, .]``, head-major) so attention sees one head everywhere: no grouped
        query expansion of the cache, and the fused attention kernels stay eligible."""
        B, h, S, _ = q_nope.shape
        L = latent.shape[2]
        w = self.kv_b_proj.weight.view(h, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        w_uk, w_uv = w[:, :self.qk_nope_head_dim], w[:, self.qk_nope_head_dim:]
        q_lat = torch.einsum("bhsd,hdr->bhsr", q_nope, w_uk)
        q = torch.cat([q_lat, q_rot], dim=-1).reshape(B, 1, h * S, -1)
        k = torch.cat([latent, k_rot], dim=-1)
        mask = None if S == 1 else _causal_mask(S, L, q.device).repeat(h, 1)  # row h_i * S + s: position s
        o_lat = F.scaled_dot_product_attention(q, k, latent, attn_mask=mask, scale=self.softmax_scale)
        return torch.einsum("bhsr,hvr->bhsv", o_lat.view(B, h, S, self.kv_lora_rank), w_uv)


class Eagle3DeepseekDrafter(Eagle3Drafter):
    """The EAGLE-3 draft model of DeepSeek-V2/V3-family targets on the eagle3 ops:
    decoder layers of :class:`Eagle3MLAttention` and a dense MLP (``intermediate_size``;
    MoE fields of the config are ignored). The config must describe MLA (``kv_lora_rank``
    and the other sizes, see :class:`eagle3_ops.config.MLAConfig`). Everything else --
    ``forward``, ``combine_hidden_states``, ``compute_logits``, ``top_tokens``,
    ``draft_greedy``, a :class:`DrafterKVCache` of latents, loading of the original,
    speculators and serving layouts (fused ``fused_qkv_a_proj_with_mqa``) -- is described
    on :class:`~eagle3_ops.nn.drafter.Eagle3Drafter`."""

    attention_class = Eagle3MLAttention

    @staticmethod
    def make_rotary(c) -> RotaryEmbedding:
        return RotaryEmbedding(c.mla.qk_rope_head_dim, c.rope_theta, c.rope_scaling,
                               interleaved=c.mla.rope_interleave)

    def _check_config(self, c) -> None:
        if c.mla is None:
            raise ValueError("Eagle3DeepseekDrafter needs a multi-head latent attention config (kv_lora_rank, "
                             "q_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim); this config has none: "
                             "use eagle3_ops.nn.Eagle3LlamaDrafter")
