"""``Eagle3LlamaDrafter``: the Llama EAGLE-3 draft model of DESIGN.md section 1.

Grouped-query attention with rotate-half RoPE in every decoder layer (layer 0's q / k / v
projections read the 2H-wide ``cat([input_layernorm(embeds), hidden_norm(h)])``); the rest
of the model is :class:`~eagle3_ops.nn.drafter.Eagle3Drafter`. Checkpoint names: the
original EAGLE-3 ``midlayer.*``, speculators ``layers.N.*`` (the module's own) and serving
``model.`` names with fused ``qkv_proj`` / ``gate_up_proj``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .drafter import DrafterKVCache, Eagle3DecoderLayer, Eagle3Drafter, Eagle3MLP
from .rope import RotaryEmbedding

__all__ = ["DrafterKVCache", "Eagle3Attention", "Eagle3MLP", "Eagle3DecoderLayer", "Eagle3LlamaDrafter"]


class Eagle3Attention(nn.Module):
    """Grouped-query attention with RoPE; layer 0's projections read the 2H-wide input."""

    def __init__(self, c, in_features: int, layer_idx: int, *, device=None, dtype=None):
        super().__init__()
        fk = {"device": device, "dtype": dtype, "bias": c.attention_bias}
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(in_features, self.num_heads * self.head_dim, **fk)
        self.k_proj = nn.Linear(in_features, self.num_kv_heads * self.head_dim, **fk)
        self.v_proj = nn.Linear(in_features, self.num_kv_heads * self.head_dim, **fk)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, c.hidden_size, **fk)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: Optional[DrafterKVCache] = None) -> Tensor:
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = RotaryEmbedding.apply(q, cos, sin), RotaryEmbedding.apply(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        L = k.shape[2]
        gqa = self.num_heads != self.num_kv_heads
        if S == 0:
            o = q.new_zeros(B, self.num_heads, 0, self.head_dim)
        elif L == S:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif S == 1:
            o = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        else:  # queries at positions L-S..L-1 of the cached sequence
            rows = torch.arange(L - S, L, device=x.device)[:, None]
            mask = rows >= torch.arange(L, device=x.device)[None, :]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, self.num_heads * self.head_dim))


class Eagle3LlamaDrafter(Eagle3Drafter):
    """The Llama EAGLE-3 draft model (DESIGN.md section 1) on the eagle3 ops: decoder
    layers of :class:`Eagle3Attention` (grouped-query, rotate-half RoPE with default,
    linear, Llama-3 or YaRN scaling) and a dense MLP. Everything else -- ``forward``,
    ``combine_hidden_states``, ``compute_logits``, ``top_tokens``, ``draft_greedy``,
    loading -- is described on :class:`~eagle3_ops.nn.drafter.Eagle3Drafter`."""

    attention_class = Eagle3Attention

    def _check_config(self, c) -> None:
        if c.mla is not None:
            raise ValueError("this config describes multi-head latent attention (kv_lora_rank="
                             f"{c.mla.kv_lora_rank}): use eagle3_ops.nn.Eagle3DeepseekDrafter")
