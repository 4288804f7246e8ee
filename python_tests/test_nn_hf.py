"""The drafter against an independent implementation: the `transformers` Llama modules.

The EAGLE-3 drafter is assembled here from transformers' LlamaRMSNorm, LlamaAttention,
LlamaMLP, LlamaDecoderLayer and LlamaRotaryEmbedding, with layer 0's q/k/v projections
widened to a 2H input as the serving engines do, wired as DESIGN.md section 1 says:
``fc(input_norm / fc_norm(aux))``, ``cat([input_layernorm(embeds), hidden_norm(h)])``
into attention, the residual ``h`` or ``hidden_norm(h)``, further ordinary decoder layers,
the final norm. The weights come from our module's state dict (the same parameter names).

Numerics: the truth is the transformers composition run in float64 (its RMSNorm and RoPE
round through fp32, so this truth is good to ~1e-7, far inside the bounds); fp32 output
within 1e-5 of it, bf16 within 2x the error of the transformers composition run in bf16
plus a floor. Grid: every norm mode x norm_output x norm_before_residual x num_aux in
{2,3,4,5}, target_hidden_size != hidden_size (except K=3), 1 or 2 layers, default and
Llama-3 rope, [T] and [B, S] inputs, fp32 and bf16.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig  # noqa: E402
from transformers.models.llama.modeling_llama import (  # noqa: E402
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from eagle3_ops import nn as enn  # noqa: E402
from eagle3_ops.config import resolve  # noqa: E402
from numerics import Rng  # noqa: E402
from test_nn_helpers import HFDrafterWiring, check_vs_harness, H, TARGET_HIDDEN, check, grid, grid_id, inputs, one_thread, randomize_, tiny_config  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


def llama_config(c) -> LlamaConfig:
    rope = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling:
        rope = {**c.rope_scaling, "rope_theta": c.rope_theta}
    lc = LlamaConfig(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                     num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
                     head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps, vocab_size=c.vocab_size,
                     max_position_embeddings=c.max_position_embeddings, hidden_act=c.hidden_act,
                     attention_bias=c.attention_bias, mlp_bias=c.mlp_bias, rope_parameters=rope)
    lc._attn_implementation = "eager"
    return lc


class HFFirstLayer(nn.Module):
    """Layer 0 from transformers parts, q/k/v widened to 2H."""

    def __init__(self, lc: LlamaConfig):
        super().__init__()
        self.self_attn = LlamaAttention(lc, layer_idx=0)
        d = lc.head_dim
        for name, heads in (("q_proj", lc.num_attention_heads), ("k_proj", lc.num_key_value_heads),
                            ("v_proj", lc.num_key_value_heads)):
            setattr(self.self_attn, name, nn.Linear(2 * lc.hidden_size, heads * d, bias=lc.attention_bias))
        self.mlp = LlamaMLP(lc)
        self.input_layernorm = LlamaRMSNorm(lc.hidden_size, eps=lc.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(lc.hidden_size, eps=lc.rms_norm_eps)
        self.hidden_norm = LlamaRMSNorm(lc.hidden_size, eps=lc.rms_norm_eps)


class HFEagle3Drafter(HFDrafterWiring, nn.Module):
    def __init__(self, config):
        super().__init__()
        c = self.c = resolve(config)
        lc = llama_config(c)
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.fc = nn.Linear(c.fc_in_features, c.hidden_size, bias=False)
        if c.norm_before_fc:
            self.input_norm = LlamaRMSNorm(c.fc_in_features, eps=c.rms_norm_eps)
        if c.fc_norm:
            self.fc_norm = nn.ModuleList(LlamaRMSNorm(c.target_hidden_size, eps=c.rms_norm_eps)
                                         for _ in range(c.num_aux_hidden_states))
        self.layers = nn.ModuleList([HFFirstLayer(lc)] + [LlamaDecoderLayer(lc, i)
                                                          for i in range(1, c.num_hidden_layers)])
        self.norm = LlamaRMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(lc)


def _hf(cfg, state, dtype):
    m = HFEagle3Drafter(cfg)
    missing, unexpected = m.load_state_dict(state, strict=False)
    assert missing == [] and set(unexpected) <= {"d2t", "t2d", "lm_head.weight"}, (missing, unexpected)
    return m.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", grid(), ids=grid_id)
def test_drafter_vs_transformers(seed, dtype, case):
    norm, no, nbr, K, layers, rope, batched = case
    cfg = tiny_config(norm=norm, num_aux=K, norm_output=no, norm_before_residual=nbr, layers=layers, rope=rope)
    m = enn.Eagle3LlamaDrafter(cfg)
    randomize_(m, seed)
    m.to(dtype)
    state = m.state_dict()
    hf64, hf = _hf(cfg, state, torch.float64), _hf(cfg, state, dtype)
    T = 6 if batched else 10
    aux = Rng(seed).randn(((2, T) if batched else (T,)) + (K * TARGET_HIDDEN[K],), dtype)
    ids, pos, _ = inputs(seed, T, H, dtype, batched=batched, start=40)
    with torch.no_grad():
        h = m.combine_hidden_states(aux)
        out, fed = m(ids, pos, h)
        h64 = hf64.combine(aux.double())
        out64, fed64 = hf64(ids, pos, h64)
        he = hf.combine(aux)
        oute, fede = hf(ids, pos, he)
    what = f"{grid_id(case)} {dtype} vs transformers"
    check(h, h64, he, f"combine {what}")
    check(out, out64, oute, f"hidden_for_logits {what}")
    check(fed, fed64, fede, f"hidden_fed_back {what}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_drafter_vs_transformers_biases_and_explicit_head_dim(seed, dtype):
    """attention_bias / mlp_bias and a head_dim that is not hidden_size / heads (32 vs 16)."""
    cfg = tiny_config(norm="fc_norm", num_aux=4, layers=2, rope="llama3", norm_before_residual=True,
                      attention_bias=True, mlp_bias=True, head_dim=32)
    m = enn.Eagle3LlamaDrafter(cfg)
    assert m.layers[0].self_attn.q_proj.weight.shape == (4 * 32, 2 * H) and m.layers[0].self_attn.q_proj.bias is not None
    randomize_(m, seed)
    m.to(dtype)
    hf64, hf = _hf(cfg, m.state_dict(), torch.float64), _hf(cfg, m.state_dict(), dtype)
    ids, pos, h = inputs(seed, 9, H, dtype, start=7)
    check_vs_harness(m, hf64, hf, ids, pos, h, f"biases/head_dim {dtype}")


def test_transformers_harness_detects_a_wrong_drafter(seed):
    """The comparison can fail: a drafter that puts hidden_norm(h) first in the 2H input
    (the wrong order) is far outside the bound."""
    cfg = tiny_config(norm="fc_norm", num_aux=3)
    m = enn.Eagle3LlamaDrafter(cfg)
    randomize_(m, seed)
    hf64 = _hf(cfg, m.state_dict(), torch.float64)
    ids, pos, h = inputs(seed, 8, H, torch.float32)
    first = m.layers[0]
    original = first._first_input
    first._first_input = lambda e, hh: original(hh, e)  # swapped halves
    with torch.no_grad():
        out, _ = m(ids, pos, h)
        want, _ = hf64(ids, pos, h.double())
    with pytest.raises(AssertionError, match="relative error"):
        check(out, want, None, "swapped")


@pytest.mark.parametrize("dtype", DTYPES)
def test_drafter_vs_transformers_yarn_rope(seed, dtype):
    """A Llama drafter with YaRN rope scaling (Qwen-style: factor and original context only,
    so cos / sin carry 0.1 ln(factor) + 1) against transformers' YaRN."""
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}
    cfg = tiny_config(norm="fc_norm", num_aux=3, layers=2, rope_scaling=yarn)
    m = enn.Eagle3LlamaDrafter(cfg)
    assert m.rotary.attention_factor > 1.1
    randomize_(m, seed)
    m.to(dtype)
    hf64, hf = _hf(cfg, m.state_dict(), torch.float64), _hf(cfg, m.state_dict(), dtype)
    ids, pos, h = inputs(seed, 9, H, dtype, start=1500)
    check_vs_harness(m, hf64, hf, ids, pos, h, f"yarn {dtype}")
