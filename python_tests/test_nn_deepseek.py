"""The DeepSeek (MLA) EAGLE-3 drafter, ``eagle3_ops.nn.Eagle3DeepseekDrafter``.

Truth: an independent drafter assembled from the `transformers` DeepSeek-V3 modules
(DeepseekV3Attention, DeepseekV3MLP, DeepseekV3RMSNorm, DeepseekV3RotaryEmbedding,
DeepseekV3DecoderLayer), with layer 0's ``q_a_proj`` (or ``q_proj``) and
``kv_a_proj_with_mqa`` widened to read the 2H input as the serving engines do, wired as
DESIGN.md section 1 says. transformers builds ``q_a_layernorm`` / ``kv_a_layernorm`` with
eps 1e-6 whatever the config says; the serving engines use ``rms_norm_eps``, and so do we:
the harness sets them to the config's eps. The package's own pure-PyTorch reference
(``reference_modules.ReferenceDeepseekDrafter``) is the truth on CUDA.

Numerics as test_nn_hf: fp32 within 1e-5 of the float64 run of the truth, bf16 within 2x
the error of the truth's bf16 run plus a floor. Grid: norm mode x norm_output x
norm_before_residual, with K, layers (1 / 2), rope (default / DeepSeek YaRN with
mscale != mscale_all_dim, so both YaRN factors matter), q LoRA or plain q_proj, interleaved
or rotate-half rope and [T] / [B, S] inputs cycling through the cases.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import pytest
import torch
from torch import nn

from eagle3_ops import nn as enn
from eagle3_ops.config import MLAConfig, resolve
from eagle3_ops.nn import reference_modules as R
from eagle3_ops.nn.rope import RotaryEmbedding
from numerics import Rng
from test_nn_helpers import HFDrafterWiring, check_vs_harness, H, HEADS, TARGET_HIDDEN, VOCAB, check, inputs, one_thread, randomize_, tiny_config  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
MLA = {"kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 24}
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 0.8}


def mla_config(norm="none", num_aux=3, norm_output=False, norm_before_residual=False, layers=1, rope="default",
               q_lora=48, interleave=True, **extra) -> dict:
    """The tiny drafter of test_nn_helpers with multi-head latent attention (hidden 64, 4
    heads, latent 32, nope 16 + rope 8 query/key dims, value 24, q LoRA 48 or none)."""
    cfg = tiny_config(norm=norm, num_aux=num_aux, norm_output=norm_output, norm_before_residual=norm_before_residual,
                      layers=layers, architectures=["Eagle3DeepseekV2ForCausalLM"], model_type="deepseek_v3",
                      num_key_value_heads=HEADS, q_lora_rank=q_lora, rope_interleave=interleave, **MLA)
    if rope == "yarn":
        cfg["rope_scaling"] = dict(YARN)
    cfg.update(extra)
    return cfg


def grid():
    cases = []
    for i, (norm, no, nbr) in enumerate(itertools.product(("none", "norm_before_fc", "fc_norm"), (False, True),
                                                           (False, True))):
        cases.append(dict(norm=norm, norm_output=no, norm_before_residual=nbr, num_aux=(2, 3, 4, 5)[i % 4],
                          layers=2 if i % 3 == 0 else 1, rope="yarn" if i % 2 == 0 else "default",
                          q_lora=None if i % 5 == 1 else 48, interleave=i % 6 != 4, batched=i % 4 in (1, 2)))
    return cases


def case_id(case) -> str:
    return (f"{case['norm']}-no{int(case['norm_output'])}-nbr{int(case['norm_before_residual'])}-K{case['num_aux']}"
            f"-L{case['layers']}-{case['rope']}-q{case['q_lora'] or 'proj'}-{'il' if case['interleave'] else 'half'}"
            f"-{'BS' if case['batched'] else 'T'}")


# ---- the transformers harness -------------------------------------------------------------


def _hf_modules():
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as D  # noqa: PLC0415
    return transformers, D


def hf_config(c):
    transformers, _ = _hf_modules()
    rope = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling:
        rope = {**c.rope_scaling, "rope_theta": c.rope_theta}
    dc = transformers.DeepseekV3Config(
        hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_attention_heads,
        q_lora_rank=c.mla.q_lora_rank, kv_lora_rank=c.mla.kv_lora_rank, qk_nope_head_dim=c.mla.qk_nope_head_dim,
        qk_rope_head_dim=c.mla.qk_rope_head_dim, v_head_dim=c.mla.v_head_dim, rms_norm_eps=c.rms_norm_eps,
        vocab_size=c.vocab_size, max_position_embeddings=c.max_position_embeddings, rope_parameters=rope,
        rope_interleave=c.mla.rope_interleave, first_k_dense_replace=10 ** 6, attention_bias=c.attention_bias,
        hidden_act=c.hidden_act)
    dc._attn_implementation = "eager"
    return dc


def _config_eps(attn, eps):
    for name in ("q_a_layernorm", "kv_a_layernorm"):
        norm = getattr(attn, name, None)
        if norm is not None:
            norm.variance_epsilon = eps


class HFDeepseekDrafter(HFDrafterWiring, nn.Module):
    """The EAGLE-3 drafter from transformers' DeepSeek-V3 parts (see the module docstring)."""

    def __init__(self, config):
        super().__init__()
        _, D = _hf_modules()
        c = self.c = resolve(config)
        dc = hf_config(c)
        H_, eps = c.hidden_size, c.rms_norm_eps
        self.embed_tokens = nn.Embedding(c.vocab_size, H_)
        self.fc = nn.Linear(c.fc_in_features, H_, bias=False)
        if c.norm_before_fc:
            self.input_norm = D.DeepseekV3RMSNorm(c.fc_in_features, eps=eps)
        if c.fc_norm:
            self.fc_norm = nn.ModuleList(D.DeepseekV3RMSNorm(c.target_hidden_size, eps=eps)
                                         for _ in range(c.num_aux_hidden_states))
        first = nn.Module()
        first.self_attn = D.DeepseekV3Attention(dc, layer_idx=0)
        a, m = first.self_attn, c.mla
        if m.q_lora_rank is None:
            a.q_proj = nn.Linear(2 * H_, c.num_attention_heads * m.qk_head_dim, bias=False)
        else:
            a.q_a_proj = nn.Linear(2 * H_, m.q_lora_rank, bias=c.attention_bias)
        a.kv_a_proj_with_mqa = nn.Linear(2 * H_, m.kv_lora_rank + m.qk_rope_head_dim, bias=c.attention_bias)
        first.mlp = D.DeepseekV3MLP(dc)
        first.input_layernorm = D.DeepseekV3RMSNorm(H_, eps=eps)
        first.post_attention_layernorm = D.DeepseekV3RMSNorm(H_, eps=eps)
        first.hidden_norm = D.DeepseekV3RMSNorm(H_, eps=eps)
        self.layers = nn.ModuleList([first] + [D.DeepseekV3DecoderLayer(dc, i) for i in range(1, c.num_hidden_layers)])
        for layer in self.layers:
            _config_eps(layer.self_attn, eps)
        self.norm = D.DeepseekV3RMSNorm(H_, eps=eps)
        self.rotary_emb = D.DeepseekV3RotaryEmbedding(dc)


def _hf(cfg, state, dtype):
    m = HFDeepseekDrafter(cfg)
    missing, unexpected = m.load_state_dict(state, strict=False)
    assert missing == [] and set(unexpected) <= {"d2t", "t2d", "lm_head.weight"}, (missing, unexpected)
    return m.to(dtype)


def _build(cfg, seed, dtype, device="cpu"):
    m = enn.Eagle3DeepseekDrafter(cfg, device=device)
    randomize_(m, seed)
    return m.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", grid(), ids=case_id)
def test_drafter_vs_transformers(seed, dtype, case):
    case = dict(case)
    batched = case.pop("batched")
    cfg = mla_config(**case)
    K = case["num_aux"]
    m = _build(cfg, seed, dtype)
    state = m.state_dict()
    hf64, hf = _hf(cfg, state, torch.float64), _hf(cfg, state, dtype)
    T = 6 if batched else 10
    aux = Rng(seed).randn(((2, T) if batched else (T,)) + (K * TARGET_HIDDEN[K],), dtype)
    ids, pos, _ = inputs(seed, T, H, dtype, batched=batched, start=600)  # past the YaRN original context
    with torch.no_grad():
        h = m.combine_hidden_states(aux)
        out, fed = m(ids, pos, h)
        out64, fed64 = hf64(ids, pos, hf64.combine(aux.double()))
        oute, fede = hf(ids, pos, hf.combine(aux))
    what = f"{case_id({**case, 'batched': batched})} {dtype} vs transformers"
    check(out, out64, oute, f"hidden_for_logits {what}")
    check(fed, fed64, fede, f"hidden_fed_back {what}")
    if case["norm_output"]:
        assert torch.equal(fed, out)


def test_transformers_harness_detects_a_wrong_drafter(seed):
    """The comparison can fail: rotating the rotary dims as halves when the config says
    interleaved pairs is far outside the bound (and so is a softmax scale without YaRN's
    mscale_all_dim factor)."""
    cfg = mla_config(norm="fc_norm", rope="yarn")
    m = _build(cfg, seed, torch.float32)
    hf64 = _hf(cfg, m.state_dict(), torch.float64)
    ids, pos, h = inputs(seed, 8, H, torch.float32, start=600)
    with torch.no_grad():
        want, _ = hf64(ids, pos, h.double())
        for layer in m.layers:  # the same angles, applied to (i, i + d/2) pairs
            layer.self_attn._rotate = lambda x, c, s: RotaryEmbedding.apply(x, torch.cat([c, c], -1),
                                                                            torch.cat([s, s], -1))
        wrong, _ = m(ids, pos, h)
        with pytest.raises(AssertionError, match="relative error"):
            check(wrong, want, None, "rotate-half instead of pairs")
        for layer in m.layers:
            del layer.self_attn._rotate
            layer.self_attn.softmax_scale = resolve(cfg).mla.qk_head_dim ** -0.5
        wrong, _ = m(ids, pos, h)
        with pytest.raises(AssertionError, match="relative error"):
            check(wrong, want, None, "softmax scale without mscale_all_dim")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q_lora", [48, None], ids=["qlora", "qproj"])
def test_drafter_vs_reference(device, seed, dtype, q_lora):
    """On every device: against the package's pure-PyTorch reference (fp64 truth, eager in dtype)."""
    cfg = mla_config(norm="fc_norm", norm_before_residual=True, layers=2, rope="yarn", q_lora=q_lora)
    m = _build(cfg, seed, dtype, device)
    r64 = R.ReferenceDeepseekDrafter(cfg).to(device=device, dtype=torch.float64)
    r64.load_state_dict(m.state_dict())
    eager = R.ReferenceDeepseekDrafter(cfg).to(device=device, dtype=dtype)
    eager.load_state_dict(m.state_dict())
    aux = Rng(seed, device).randn((9, 3 * TARGET_HIDDEN[3]), dtype)
    ids, pos, _ = inputs(seed, 9, H, dtype, start=700)
    ids, pos = ids.to(device), pos.to(device)
    with torch.no_grad():
        h = m.combine_hidden_states(aux)
        out, fed = m(ids, pos, h)
        out64, fed64 = r64(ids, pos, r64.combine_hidden_states(aux.double()))
        oute, fede = eager(ids, pos, eager.combine_hidden_states(aux))
        logits = m.compute_logits(out)
        logits64 = r64.compute_logits(out64)
    check(out, out64, oute, f"{device} {dtype} hidden_for_logits")
    check(fed, fed64, fede, f"{device} {dtype} hidden_fed_back")
    keep = ~torch.isinf(logits64[0])
    assert torch.equal(torch.isinf(logits), torch.isinf(logits64))
    check(logits[..., keep], logits64[..., keep], eager.compute_logits(oute)[..., keep], f"{device} {dtype} logits")


def test_absorbed_attention_equals_expanded(seed):
    """The cached-step path (kv_b_proj absorbed into the query and output) computes the same
    attention as the expanded path, in float64 to rounding."""
    cfg = mla_config(rope="yarn", q_lora=None)
    m = _build(cfg, seed, torch.float64)
    attn = m.layers[0].self_attn
    rng = Rng(seed)
    B, S = 2, 7
    q_nope, q_rot = rng.randn((B, HEADS, S, 16), torch.float64), rng.randn((B, HEADS, S, 8), torch.float64)
    latent, k_rot = rng.randn((B, 1, S, 32), torch.float64), rng.randn((B, 1, S, 8), torch.float64)
    with torch.no_grad():
        full = attn._expanded(q_nope, q_rot, latent, k_rot)
        absorbed = attn._absorbed(q_nope[:, :, 3:], q_rot[:, :, 3:], latent, k_rot)  # queries 3..6 of 7 keys
        one = attn._absorbed(q_nope[:, :, -1:], q_rot[:, :, -1:], latent, k_rot)
    torch.testing.assert_close(absorbed, full[:, :, 3:], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(one, full[:, :, -1:], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("q_lora", [48, None], ids=["qlora", "qproj"])
@pytest.mark.parametrize("batched", [False, True], ids=["T", "BS"])
def test_kv_cache_drafting_equals_full_forward(seed, q_lora, batched):
    """Prefill, then draft token by token feeding back each step's hidden state and greedy
    token: every cached step equals the last row of a full forward over everything so far;
    the cache holds latents (kv_lora_rank + qk_rope_head_dim per position, one "head");
    crop() then a 2-token append too."""
    cfg = mla_config(norm="fc_norm", norm_before_residual=True, norm_output=True, layers=2, rope="yarn",
                     q_lora=q_lora)
    m = _build(cfg, seed, torch.float32)
    P = 5
    ids, pos, h = inputs(seed, P, H, torch.float32, batched=batched, start=11)
    cache = enn.DrafterKVCache()
    tol = dict(rtol=2e-5, atol=2e-5)
    with torch.no_grad():
        out, fed = m(ids, pos, h, cache)
        torch.testing.assert_close(out, m(ids, pos, h)[0], **tol)
        assert [tuple(k.shape) for k in cache.keys] == [(2 if batched else 1, 1, P, 32)] * 2
        assert [tuple(v.shape) for v in cache.values] == [(2 if batched else 1, 1, P, 8)] * 2
        all_ids, all_pos, all_h = ids, pos, h
        for _ in range(4):
            nid = m.top_tokens(out[..., -1:, :])
            npos = all_pos[..., -1:] + 1
            nh = fed[..., -1:, :]
            out, fed = m(nid, npos, nh, cache)
            all_ids, all_pos = torch.cat([all_ids, nid], -1), torch.cat([all_pos, npos], -1)
            all_h = torch.cat([all_h, nh], -2)
            f_out, f_fed = m(all_ids, all_pos, all_h)
            torch.testing.assert_close(out[..., -1, :], f_out[..., -1, :], **tol)
            torch.testing.assert_close(fed[..., -1, :], f_fed[..., -1, :], **tol)
        assert cache.seq_len == P + 4
        cache.crop(P + 2)
        out2, _ = m(all_ids[..., P + 2:], all_pos[..., P + 2:], all_h[..., P + 2:, :], cache)
        torch.testing.assert_close(out2, m(all_ids, all_pos, all_h)[0][..., P + 2:, :], **tol)


def test_top_tokens_and_draft_greedy(seed):
    cfg = mla_config(norm="norm_before_fc", rope="yarn")
    m = _build(cfg, seed, torch.float32)
    ids, pos, h = inputs(seed, 6, H, torch.float32, start=3)
    with torch.no_grad():
        out, _ = m(ids, pos, h)
        assert torch.equal(m.top_tokens(out), m.compute_logits(out).argmax(-1))
    drafted = m.draft_greedy(ids, pos, h, num_tokens=4)
    seq_ids, seq_pos, seq_h, want = ids, pos, h, []
    with torch.no_grad():
        for _ in range(4):
            out, fed = m(seq_ids, seq_pos, seq_h)
            tok = m.compute_logits(out[-1:]).argmax(-1)
            want.append(tok)
            seq_ids, seq_pos = torch.cat([seq_ids, tok]), torch.cat([seq_pos, seq_pos[-1:] + 1])
            seq_h = torch.cat([seq_h, fed[-1:]])
    assert torch.equal(drafted, torch.cat(want))


def test_compile_drafter_forward(seed):
    cfg = mla_config(norm="fc_norm", layers=2, rope="yarn")
    m = _build(cfg, seed, torch.float32).requires_grad_(False)

    def step(aux, ids, pos):
        out, fed = m(ids, pos, m.combine_hidden_states(aux))
        return m.compute_logits(out), fed

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    rng = Rng(seed)
    for T in (5, 9):
        aux = rng.randn((T, 3 * TARGET_HIDDEN[3]), torch.float32)
        ids, pos, _ = inputs(seed + T, T, H, torch.float32, start=2)
        for g, w in zip(compiled(aux, ids, pos), step(aux, ids, pos)):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


# ---- loading --------------------------------------------------------------------------------


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("layout", ["speculators", "eagle3", "serving"])
@pytest.mark.parametrize("q_lora", [48, None], ids=["qlora", "qproj"])
@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "torch"])
def test_round_trip(tmp_path, seed, layout, q_lora, safe):
    cfg = mla_config(norm="fc_norm", layers=2, rope="yarn", q_lora=q_lora, norm_output=True)
    m = _build(cfg, seed, torch.bfloat16)
    m.save_pretrained(tmp_path, layout=layout, safe_serialization=safe)
    names = set(enn.read_checkpoint(tmp_path))
    if layout == "serving" and q_lora:
        assert "model.layers.0.self_attn.fused_qkv_a_proj_with_mqa.weight" in names
        assert not any("q_a_proj" in n and "fused" not in n for n in names)
    if layout == "eagle3":
        assert "midlayer.self_attn.kv_a_proj_with_mqa.weight" in names
    back = enn.Eagle3DeepseekDrafter.from_pretrained(tmp_path)
    assert dataclasses.replace(back.config, layout=m.config.layout) == m.config
    assert back.embed_tokens.weight.dtype == torch.bfloat16
    _same(m, back)
    auto = enn.load_drafter(tmp_path)
    assert isinstance(auto, enn.Eagle3DeepseekDrafter)
    _same(m, auto)


def test_serving_names_of_both_engines(seed):
    """``fused_qkv_a_proj`` and ``fused_qkv_a_proj_with_mqa`` (q_a rows first, then kv_a),
    ``model.midlayer.*`` and ``gate_up_proj`` all load; so does load_state_dict(strict=True)."""
    cfg = mla_config(norm="fc_norm", q_lora=48)
    m = _build(cfg, seed, torch.float32)
    sd = m.state_dict()
    a = "layers.0.self_attn."
    fused = torch.cat([sd[a + "q_a_proj.weight"], sd[a + "kv_a_proj_with_mqa.weight"]])
    gate_up = torch.cat([sd["layers.0.mlp.gate_proj.weight"], sd["layers.0.mlp.up_proj.weight"]])
    for fused_name, prefix in (("fused_qkv_a_proj", "model.layers.0."), ("fused_qkv_a_proj_with_mqa", "model.midlayer.")):
        ck = {}
        for k, v in sd.items():
            if k.endswith(("q_a_proj.weight", "kv_a_proj_with_mqa.weight", "gate_proj.weight", "up_proj.weight")):
                continue
            name = prefix + k[len("layers.0."):] if k.startswith("layers.0.") else "model." + k
            ck[name.replace("model.d2t", "draft_id_to_target_id").replace("model.t2d", "t2d")] = v
        ck[prefix + "self_attn." + fused_name + ".weight"] = fused
        ck[prefix + "mlp.gate_up_proj.weight"] = gate_up
        fresh = enn.Eagle3DeepseekDrafter(cfg)
        report = fresh.load_weights(ck.items())
        assert report.sources[a + "q_a_proj.weight"].endswith(f"{fused_name}.weight[0:48]")
        _same(m, fresh)
        fresh2 = enn.Eagle3DeepseekDrafter(cfg)
        fresh2.load_state_dict({k.replace("draft_id_to_target_id", "d2t"): v for k, v in ck.items()}, strict=True)
        _same(m, fresh2)


def test_load_errors_name_every_problem(seed):
    cfg = mla_config(norm="fc_norm", q_lora=48)
    m = _build(cfg, seed, torch.float32)
    sd = dict(m.state_dict())
    sd.pop("layers.0.self_attn.kv_b_proj.weight")
    sd["layers.0.self_attn.q_proj.weight"] = torch.zeros(4 * 24, 2 * H)  # a plain q_proj: wrong for this config
    sd["layers.0.self_attn.fused_qkv_a_proj.weight"] = torch.zeros(48 + 40, 2 * H)  # 40 kv_a rows: rank 32 + rope 8
    sd["layers.0.self_attn.kv_a_layernorm.weight"] = torch.ones(16)
    with pytest.raises(enn.CheckpointError) as e:
        enn.Eagle3DeepseekDrafter(cfg).load_weights(sd.items())
    msg = str(e.value)
    assert "layers.0.self_attn.q_proj.weight" in msg and "unexpected" in msg
    assert "missing keys" in msg and "layers.0.self_attn.kv_b_proj.weight, expected [160, 32]" in msg
    assert "kv_a_layernorm.weight: checkpoint [16], model layers.0.self_attn.kv_a_layernorm.weight expects [32]" in msg
    assert "keys given twice" in msg and "q_a_proj.weight: given by both" in msg


def test_drafter_class_follows_the_config(tmp_path, seed):
    with pytest.raises(ValueError, match="multi-head latent attention.*Eagle3DeepseekDrafter"):
        enn.Eagle3LlamaDrafter(mla_config())
    with pytest.raises(ValueError, match="needs a multi-head latent attention config.*Eagle3LlamaDrafter"):
        enn.Eagle3DeepseekDrafter(tiny_config())
    assert enn.drafter_class(mla_config()) is enn.Eagle3DeepseekDrafter
    assert enn.drafter_class(tiny_config()) is enn.Eagle3LlamaDrafter
    m = enn.Eagle3LlamaDrafter(tiny_config())
    randomize_(m, seed)
    m.save_pretrained(tmp_path)
    assert type(enn.load_drafter(tmp_path)) is enn.Eagle3LlamaDrafter


# ---- config ---------------------------------------------------------------------------------


def test_config_resolves_mla_fields():
    c = resolve(mla_config(q_lora=None, interleave=False))
    assert c.mla == MLAConfig(q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                              v_head_dim=24, rope_interleave=False)
    assert c.head_dim == 8 and c.mla.qk_head_dim == 24  # no explicit head_dim: the rotary width
    no_head_dim = {k: v for k, v in mla_config().items()}
    no_head_dim["hidden_size"] = 66  # not a multiple of the 4 heads: fine for MLA, head_dim = rope dims
    assert resolve(no_head_dim).head_dim == 8
    assert resolve(mla_config()).mla.rope_interleave is True
    assert resolve(tiny_config()).mla is None
    spec = {"speculators_model_type": "eagle3", "transformer_layer_config": mla_config(), "draft_vocab_size": 96}
    assert resolve(spec).mla == resolve(mla_config()).mla


@pytest.mark.parametrize("edit,match", [
    ({"qk_rope_head_dim": None}, r"lacks \['qk_rope_head_dim'\]"),
    ({"v_head_dim": 0}, "v_head_dim must be a positive integer, got 0"),
    ({"qk_rope_head_dim": 7}, "qk_rope_head_dim must be even"),
    ({"q_lora_rank": -1}, "q_lora_rank must be a positive integer or null"),
    ({"kv_lora_rank": None}, r"names multi-head latent attention sizes \['q_lora_rank', 'qk_nope_head_dim'"),
    ({"rope_interleave": "yes"}, "rope_interleave must be true or false"),
    ({"kv_lora_rank": 12.5}, "kv_lora_rank must be an integer, got 12.5"),
])
def test_config_rejects_bad_mla_fields(edit, match):
    cfg = mla_config()
    cfg.update(edit)
    with pytest.raises(ValueError, match=match):
        resolve(cfg)


def test_config_without_q_lora_rank_key_is_an_error():
    cfg = mla_config()
    del cfg["q_lora_rank"]
    with pytest.raises(ValueError, match=r"lacks \['q_lora_rank'\].*q_lora_rank may be null"):
        resolve(cfg)


def test_a_kimi_k2_sized_drafter_config(tmp_path):
    """A config shaped like the published Kimi-K2-family MLA drafters (eagle_config aux ids,
    YaRN factor 64 with mscale = mscale_all_dim = 1, MoE fields present and ignored) builds
    the full-size layer on the meta device with 2H-wide first projections."""
    cfg = {
        "architectures": ["Eagle3DeepseekV2ForCausalLM"], "model_type": "kimi_k2", "hidden_size": 7168,
        "intermediate_size": 18432, "moe_intermediate_size": 2048, "n_routed_experts": 384,
        "first_k_dense_replace": 1, "num_hidden_layers": 1, "num_attention_heads": 64, "num_key_value_heads": 64,
        "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "v_head_dim": 128, "rms_norm_eps": 1e-5, "vocab_size": 163840, "draft_vocab_size": 163840,
        "rope_theta": 50000.0, "max_position_embeddings": 262144, "hidden_act": "silu",
        "rope_scaling": {"type": "yarn", "factor": 64.0, "original_max_position_embeddings": 4096,
                         "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 29, 57], "use_aux_hidden_state": True},
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    c = resolve(tmp_path)
    assert c.aux_layer_ids == (1, 29, 57) and c.fc_in_features == 3 * 7168 and c.mla.q_lora_rank == 1536
    m = enn.Eagle3DeepseekDrafter(c, device="meta", dtype=torch.bfloat16)
    a = m.layers[0].self_attn
    assert a.q_a_proj.weight.shape == (1536, 2 * 7168)
    assert a.kv_a_proj_with_mqa.weight.shape == (512 + 64, 2 * 7168)
    assert a.q_b_proj.weight.shape == (64 * 192, 1536) and a.kv_b_proj.weight.shape == (64 * 256, 512)
    assert a.o_proj.weight.shape == (7168, 64 * 128)
    assert m.layers[0].mlp.gate_proj.weight.shape == (18432, 7168)
    want = 192 ** -0.5 * (0.1 * 1.0 * math.log(64.0) + 1) ** 2
    assert a.softmax_scale == pytest.approx(want, rel=1e-12)
    assert m.rotary.attention_factor == 1.0 and m.rotary.interleaved


# ---- the cached (absorbed) path against transformers, other dtypes, biases, edge sizes ----------


DTYPES3 = DTYPES + [pytest.param(torch.float16, id="fp16")]


@pytest.mark.parametrize("dtype", DTYPES3)
@pytest.mark.parametrize("q_lora", [48, None], ids=["qlora", "qproj"])
def test_cached_drafting_vs_transformers(seed, dtype, q_lora):
    """Prefill with a cache, a 3-token append, then 1-token steps (the absorbed path): every
    new row against transformers' full forward over the whole sequence (fp64 truth, and its
    run in the same dtype for the bound)."""
    cfg = mla_config(norm="fc_norm", norm_before_residual=True, layers=2, rope="yarn", q_lora=q_lora)
    m = _build(cfg, seed, dtype)
    hf64, hf = _hf(cfg, m.state_dict(), torch.float64), _hf(cfg, m.state_dict(), dtype)
    ids, pos, h = inputs(seed, 10, H, dtype, start=700)
    cache = enn.DrafterKVCache()
    with torch.no_grad():
        for lo, hi in ((0, 5), (5, 8), (8, 9), (9, 10)):
            out, fed = m(ids[lo:hi], pos[lo:hi], h[lo:hi], cache)
            out64, fed64 = hf64(ids[:hi], pos[:hi], h[:hi].double())
            oute, fede = hf(ids[:hi], pos[:hi], h[:hi])
            check(out, out64[lo:hi], oute[lo:hi], f"cached rows {lo}:{hi} {dtype}")
            check(fed, fed64[lo:hi], fede[lo:hi], f"cached fed back rows {lo}:{hi} {dtype}")
    assert cache.seq_len == 10


@pytest.mark.parametrize("dtype", DTYPES3)
def test_attention_bias_vs_transformers(seed, dtype):
    cfg = mla_config(norm="norm_before_fc", layers=2, rope="yarn", attention_bias=True)
    m = _build(cfg, seed, dtype)
    a = m.layers[0].self_attn
    assert a.q_a_proj.bias is not None and a.kv_a_proj_with_mqa.bias is not None and a.o_proj.bias is not None
    assert a.q_b_proj.bias is None and a.kv_b_proj.bias is None
    hf64, hf = _hf(cfg, m.state_dict(), torch.float64), _hf(cfg, m.state_dict(), dtype)
    ids, pos, h = inputs(seed, 7, H, dtype, start=5)
    check_vs_harness(m, hf64, hf, ids, pos, h, f"attention_bias {dtype}")


def test_empty_and_single_token(seed):
    cfg = mla_config(norm="fc_norm", layers=2, rope="yarn")
    m = _build(cfg, seed, torch.float32)
    with torch.no_grad():
        out, fed = m(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0, H))
        assert out.shape == (0, H) and fed.shape == (0, H)
        out, _ = m(torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0, H))
        assert out.shape == (2, 0, H)
        cache = enn.DrafterKVCache()
        ids, pos, h = inputs(seed, 3, H, torch.float32)
        m(ids[:0], pos[:0], h[:0], cache)  # an empty prefill, then tokens
        got = torch.cat([m(ids[i:i + 1], pos[i:i + 1], h[i:i + 1], cache)[0] for i in range(3)])
        torch.testing.assert_close(got, m(ids, pos, h)[0], rtol=2e-5, atol=2e-5)
        one, _ = m(ids[:1], pos[:1], h[:1])
        assert one.shape == (1, H)


@pytest.mark.parametrize("dtype", DTYPES3)
def test_kv_cache_on_each_device(device, seed, dtype):
    """The cached path on every device (CUDA: the ops and the fused attention kernels)
    against the package's reference over the whole sequence."""
    cfg = mla_config(norm="fc_norm", norm_output=True, layers=2, rope="yarn")
    m = _build(cfg, seed, dtype, device)
    r64 = R.ReferenceDeepseekDrafter(cfg).to(device=device, dtype=torch.float64)
    r64.load_state_dict(m.state_dict())
    eager = R.ReferenceDeepseekDrafter(cfg).to(device=device, dtype=dtype)
    eager.load_state_dict(m.state_dict())
    ids, pos, h = inputs(seed, 9, H, dtype, start=300)
    ids, pos, h = ids.to(device), pos.to(device), h.to(device)
    cache = enn.DrafterKVCache()
    with torch.no_grad():
        for lo, hi in ((0, 4), (4, 6), (6, 7), (7, 8), (8, 9)):
            out, _ = m(ids[lo:hi], pos[lo:hi], h[lo:hi], cache)
            check(out, r64(ids[:hi], pos[:hi], h[:hi].double())[0][lo:hi], eager(ids[:hi], pos[:hi], h[:hi])[0][lo:hi],
                  f"{device} {dtype} cached rows {lo}:{hi}")


# ---- configs as transformers writes them; YaRN against transformers ----------------------------


def test_config_saved_by_transformers_resolves(tmp_path, seed):
    """``DeepseekV3Config(...).to_dict()`` (rope_parameters spelling, its default
    num_key_value_heads=128 with 4 heads, head_dim = qk_rope_head_dim) plus the EAGLE-3
    fields resolves, builds, and matches transformers."""
    transformers, _ = _hf_modules()
    dc = transformers.DeepseekV3Config(
        hidden_size=H, intermediate_size=128, num_hidden_layers=1, num_attention_heads=HEADS, q_lora_rank=48,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=24, rms_norm_eps=1e-6, vocab_size=VOCAB,
        max_position_embeddings=2048,
        rope_parameters={**{k: v for k, v in YARN.items() if k != "type"}, "rope_type": "yarn", "rope_theta": 10000.0})
    raw = {**dc.to_dict(), "architectures": ["Eagle3DeepseekV2ForCausalLM"], "draft_vocab_size": 96,
           "fc_norm": True, "eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 4, 7]}}
    assert raw["num_key_value_heads"] != HEADS and raw.get("rope_scaling") is None
    (tmp_path / "config.json").write_text(json.dumps(raw))
    c = resolve(tmp_path)
    assert c.num_key_value_heads == HEADS and c.head_dim == 8 and c.rope_scaling["rope_type"] == "yarn"
    assert c.mla == MLAConfig(q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=24)
    m = _build(c, seed, torch.float32)
    hf64 = _hf(c, m.state_dict(), torch.float64)
    assert m.layers[0].self_attn.softmax_scale == pytest.approx(hf64.layers[0].self_attn.scaling, rel=1e-12)
    ids, pos, h = inputs(seed, 6, H, torch.float32, start=900)
    with torch.no_grad():
        out, _ = m(ids, pos, h)
        want, _ = hf64(ids, pos, h.double())
    check(out, want, None, "config from DeepseekV3Config.to_dict()")


def test_q_lora_rank_null_in_the_layer_section_wins():
    spec = {"speculators_model_type": "eagle3", "q_lora_rank": 48,
            "transformer_layer_config": mla_config(q_lora=None), "draft_vocab_size": 96}
    assert resolve(spec).mla.q_lora_rank is None


@pytest.mark.parametrize("scaling", [
    {"factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
     "mscale_all_dim": 1.0},  # DeepSeek-V3
    {"factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1, "mscale": 0.707,
     "mscale_all_dim": 0.707},  # DeepSeek-V2-Lite
    {"factor": 64.0, "original_max_position_embeddings": 4096, "beta_fast": 1, "beta_slow": 1, "mscale": 1.0,
     "mscale_all_dim": 1.0},  # Kimi-K2.5-like drafter
    {"factor": 4.0, "original_max_position_embeddings": 512, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
     "mscale_all_dim": 0.8},  # the test grid's
], ids=["deepseek-v3", "deepseek-v2-lite", "kimi", "grid"])
def test_yarn_matches_transformers(scaling):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: PLC0415
    from eagle3_ops.nn.rope import rope_attention_factor, rope_inverse_frequencies  # noqa: PLC0415

    theta = 50000.0 if scaling["beta_fast"] == 1 else 10000.0
    dc = transformers.DeepseekV3Config(
        hidden_size=64, num_attention_heads=4, qk_rope_head_dim=64, max_position_embeddings=163840,
        rope_parameters={**scaling, "rope_type": "yarn", "rope_theta": theta})
    inv_hf, factor_hf = ROPE_INIT_FUNCTIONS["yarn"](dc, "cpu")
    ours = {**scaling, "rope_type": "yarn"}
    torch.testing.assert_close(rope_inverse_frequencies(64, theta, ours), inv_hf.double(), rtol=1e-6, atol=0)
    assert rope_attention_factor(ours) == pytest.approx(factor_hf, rel=1e-12)


def test_long_chunk_after_a_prefill_expands_and_matches(seed):
    """Appending many positions to a short cache expands the latents (L > S, a causal mask
    offset by the past) instead of absorbing; both choices equal the full forward."""
    cfg = mla_config(norm="fc_norm", layers=2, rope="yarn")
    m = _build(cfg, seed, torch.float32)
    attn = m.layers[0].self_attn
    assert attn._absorb(1, 45) and attn._absorb(8, 45) and not attn._absorb(40, 45)
    kimi = enn.Eagle3DeepseekDrafter(C_KIMI, device="meta").layers[0].self_attn
    assert kimi._absorb(1, 8192) and kimi._absorb(64, 8192) and not kimi._absorb(2048, 2100)
    ids, pos, h = inputs(seed, 46, H, torch.float32, start=3)
    cache = enn.DrafterKVCache()
    with torch.no_grad():
        full, _ = m(ids, pos, h)
        parts = [m(ids[a:b], pos[a:b], h[a:b], cache)[0] for a, b in ((0, 5), (5, 45), (45, 46))]
    torch.testing.assert_close(torch.cat(parts), full, rtol=2e-5, atol=2e-5)


def test_expanded_attention_with_a_past_equals_absorbed(seed):
    cfg = mla_config(rope="yarn")
    m = _build(cfg, seed, torch.float64)
    attn = m.layers[0].self_attn
    rng = Rng(seed)
    q_nope, q_rot = rng.randn((2, HEADS, 4, 16), torch.float64), rng.randn((2, HEADS, 4, 8), torch.float64)
    latent, k_rot = rng.randn((2, 1, 9, 32), torch.float64), rng.randn((2, 1, 9, 8), torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(attn._expanded(q_nope, q_rot, latent, k_rot),
                                   attn._absorbed(q_nope, q_rot, latent, k_rot), rtol=1e-12, atol=1e-12)


C_KIMI = {
    "architectures": ["Eagle3DeepseekV2ForCausalLM"], "hidden_size": 7168, "intermediate_size": 18432,
    "num_attention_heads": 64, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "vocab_size": 1024, "num_hidden_layers": 1,
}


def test_q_lora_norm_and_projection_run_as_one_op_and_stay_differentiable(seed, monkeypatch):
    """Under no_grad, q_a_layernorm + q_b_proj is one rms_norm_cat_linear call per layer
    (plus the combine's); with autograd on, the composition is differentiable end to end."""
    from eagle3_ops.nn import combine  # noqa: PLC0415
    cfg = mla_config(norm="fc_norm", layers=2)
    m = _build(cfg, seed, torch.float32)
    calls = []
    real = combine.ops.rms_norm_cat_linear
    monkeypatch.setattr(combine.ops, "rms_norm_cat_linear", lambda *a: calls.append(a[3]) or real(*a))
    ids, pos, h = inputs(seed, 5, H, torch.float32)
    aux = Rng(seed).randn((5, 3 * TARGET_HIDDEN[3]), torch.float32)
    with torch.no_grad():
        want, _ = m(ids, pos, m.combine_hidden_states(aux))
    assert calls == ["chunk"] * 3  # the combine (fc_norm) + one per layer
    calls.clear()
    out, _ = m(ids, pos, m.combine_hidden_states(aux))
    assert calls == [] and out.requires_grad
    out.square().sum().backward()
    assert m.layers[0].self_attn.q_b_proj.weight.grad is not None
    assert m.layers[0].self_attn.q_a_layernorm.weight.grad is not None
    torch.testing.assert_close(out.detach(), want, rtol=1e-5, atol=1e-5)
