"""eagle3_ops.nn modules against the pure-PyTorch reference (eagle3_ops.nn.reference_modules).

Numerics (DESIGN.md section 4): each module output is compared with the reference run in
float64 on the same (exactly upcast) weights and inputs; fp32 within 1e-5, bf16 within 2x
the error of the reference run in bf16 plus a floor. Also: the modules really call the ops
(bit-equal to a direct op call), the folded fc weight is never stale (load_state_dict,
.to(), in-place edits, replaced parameters), KV-cache drafting equals the full forward,
torch.compile of the drafter forward, autograd / float64 fallbacks, input errors.
"""

from __future__ import annotations


import pytest
import torch

import eagle3_ops
from eagle3_ops import nn as enn
from eagle3_ops.nn import reference_modules as R
from conftest import requires_cuda
from numerics import Rng
from test_nn_helpers import (DRAFT_VOCAB, H, TARGET_HIDDEN, VOCAB, check, grid, grid_id, inputs, one_thread,  # noqa: F401
                             randomize_, tiny_config)

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
EPS = 1e-5


# ---- RMSNorm --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 64), (2, 5, 769), (64,), (1, 100), (0, 64)], ids=str)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_rms_norm_vs_reference(device, seed, dtype, shape, with_residual):
    rng = Rng(seed, device)
    width = shape[-1]
    m = enn.RMSNorm(width, eps=EPS, device=device, dtype=dtype)
    assert [n for n, _ in m.named_parameters()] == ["weight"]
    with torch.no_grad():
        m.weight.copy_(rng.norm_weight(width, dtype))
    x = rng.randn(shape, dtype)
    r = rng.randn(shape, dtype) if with_residual else None
    with torch.no_grad():
        out = m(x) if r is None else m(x, r)
    if r is None:
        check(out, R.rms_norm(x.double(), m.weight.double(), EPS), R.rms_norm(x, m.weight, EPS), "RMSNorm")
        with torch.no_grad():  # the ops have no backward; the weight requires grad
            direct = eagle3_ops.rms_norm_cat([x], [m.weight], EPS)
        assert torch.equal(out, direct), "RMSNorm must call rms_norm_cat"
    else:
        normed, summed = out
        t_n, t_s = R.add_rms_norm(x.double(), r.double(), m.weight.double(), EPS)
        e_n, e_s = R.add_rms_norm(x, r, m.weight, EPS)
        check(normed, t_n, e_n, "RMSNorm(x, residual) normed")
        check(summed, t_s, e_s, "RMSNorm(x, residual) residual sum")
        with torch.no_grad():
            direct = eagle3_ops.fused_add_rms_norm(x, r, m.weight, EPS)[0]
        assert torch.equal(normed, direct)


def test_rms_norm_fp32_weight_bf16_input(seed):
    rng = Rng(seed)
    m = enn.RMSNorm(96, eps=EPS)  # fp32 weight (a model that keeps norms in fp32)
    with torch.no_grad():
        m.weight.copy_(rng.norm_weight(96, torch.float32))
        x = rng.randn((5, 96), torch.bfloat16)
        out = m(x)
    assert out.dtype == torch.bfloat16
    check(out, R.rms_norm(x.double(), m.weight.double(), EPS), R.rms_norm(x, m.weight, EPS), "fp32 weight")


def test_rms_norm_autograd_and_float64_fall_back_to_reference(seed):
    rng = Rng(seed)
    m = enn.RMSNorm(48, eps=EPS)
    with torch.no_grad():
        m.weight.copy_(rng.norm_weight(48, torch.float32))
    x = rng.randn((4, 48), torch.float32).requires_grad_()
    y = m(x)  # grad enabled, weight requires grad: differentiable composition
    assert y.grad_fn is not None
    y.square().sum().backward()
    x2 = x.detach().clone().requires_grad_()
    w2 = m.weight.detach().clone().requires_grad_()
    R.rms_norm(x2, w2, EPS).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(m.weight.grad, w2.grad)
    xd = x.detach().double()
    torch.testing.assert_close(m.double()(xd), R.rms_norm(xd, m.weight.double(), EPS), rtol=0, atol=0)


# ---- Eagle3Combine ----------------------------------------------------------------------------


def _combine_input(rng, form, K, Ht, dtype, T=9):
    if form == "cat":
        return rng.randn((T, K * Ht), dtype)
    if form == "1d":
        return rng.randn((K * Ht,), dtype)
    if form == "3d":
        return rng.randn((2, T, K * Ht), dtype)
    if form == "view":  # a column slice of a wider buffer (row stride > K*Ht)
        return rng.randn((T, K * Ht + 13), dtype)[:, 5:5 + K * Ht]
    if form == "list":
        return [rng.randn((T, Ht), dtype) for _ in range(K)]
    if form == "t0":
        return rng.randn((0, K * Ht), dtype)
    raise ValueError(form)


def _as_tensor(aux):
    return aux if isinstance(aux, torch.Tensor) else torch.cat(aux, -1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [2, 3, 4, 5])
@pytest.mark.parametrize("norm", ["none", "norm_before_fc", "fc_norm"])
@pytest.mark.parametrize("form", ["cat", "list", "1d", "3d", "view", "t0"])
def test_combine_vs_reference(device, seed, dtype, K, norm, form):
    cfg = tiny_config(norm=norm, num_aux=K)
    m = enn.Eagle3Combine(cfg, device=device)
    randomize_(m, seed)
    m.to(dtype)
    names = sorted(n for n, _ in m.named_parameters())
    expect = ["fc.weight"] + (["input_norm.weight"] if norm == "norm_before_fc" else []) + \
        ([f"fc_norm.{i}.weight" for i in range(K)] if norm == "fc_norm" else [])
    assert names == sorted(expect)
    r64 = R.ReferenceCombine(cfg).to(device=device, dtype=torch.float64)
    r64.load_state_dict(m.state_dict())
    eager = R.ReferenceCombine(cfg).to(device=device, dtype=dtype)
    eager.load_state_dict(m.state_dict())
    aux = _combine_input(Rng(seed, device), form, K, TARGET_HIDDEN[K], dtype)
    with torch.no_grad():
        out = m(aux)
        a = _as_tensor(aux)
        truth, ref = r64(a.double()), eager(a)
    assert out.shape == (*a.shape[:-1], H)
    check(out, truth, ref, f"Eagle3Combine[{norm}, K={K}, {form}]")
    # the module is one rms_norm_cat_linear call on the folded weight
    norm_weights = [p for n, p in m.named_parameters() if "norm" in n]
    w = m.fc.weight if norm == "none" else eagle3_ops.fold_norm_weights(m.fc.weight, norm_weights)
    xs = list(aux) if form == "list" else list(a.split(TARGET_HIDDEN[K], -1)) if norm == "fc_norm" else [a]
    mode = {"none": "none", "norm_before_fc": "shared", "fc_norm": "chunk"}[norm]
    with torch.no_grad():  # the ops have no backward; the parameters require grad
        direct = eagle3_ops.rms_norm_cat_linear(xs, w, cfg["rms_norm_eps"], mode)
    assert torch.equal(out, direct)


def _fresh_out(m, aux):
    """What a newly built combine with m's current parameters returns."""
    fresh = enn.Eagle3Combine(m.config).to(m.fc.weight.dtype)
    fresh.load_state_dict(m.state_dict())
    with torch.no_grad():
        return fresh(aux)


@pytest.mark.parametrize("norm", ["norm_before_fc", "fc_norm"])
def test_combine_folded_weight_is_cached_and_never_stale(seed, norm):
    cfg = tiny_config(norm=norm, num_aux=3)
    m = enn.Eagle3Combine(cfg)
    randomize_(m, seed)
    aux = Rng(seed).randn((6, 3 * TARGET_HIDDEN[3]), torch.float32)
    norm_w = m.input_norm.weight if norm == "norm_before_fc" else m.fc_norm[1].weight
    with torch.inference_mode():
        first = m(aux)
        cached = m._folded._value
        assert m(aux).equal(first) and m._folded._value is cached, "unchanged parameters must reuse the fold"

        # 1. load_state_dict (copy_ into the same parameters)
        other = enn.Eagle3Combine(cfg)
        randomize_(other, seed + 1)
        m.load_state_dict(other.state_dict())
        out = m(aux)
        assert not out.equal(first)
        assert out.equal(_fresh_out(m, aux)), "stale fold after load_state_dict"

        # 2. in-place edit of a norm weight, then of the fc weight
        norm_w.mul_(1.7)
        out2 = m(aux)
        assert not out2.equal(out) and out2.equal(_fresh_out(m, aux)), "stale fold after an in-place norm edit"
        m.fc.weight[3].add_(0.5)
        out3 = m(aux)
        assert not out3.equal(out2) and out3.equal(_fresh_out(m, aux)), "stale fold after an in-place fc edit"

    # 3. .to(): dtype round trip and a dtype change
    m.to(torch.bfloat16)
    with torch.no_grad():
        ob = m(aux.bfloat16())
        assert ob.dtype == torch.bfloat16 and ob.equal(_fresh_out(m, aux.bfloat16())), "stale fold after .to(bf16)"
    m.to(torch.float32)
    with torch.no_grad():
        assert m(aux).equal(_fresh_out(m, aux)), "stale fold after .to(fp32)"

    # 4. a replaced parameter (load_state_dict(assign=True)) and param.data = ...
    other2 = enn.Eagle3Combine(cfg)
    randomize_(other2, seed + 2)
    m.load_state_dict(other2.state_dict(), assign=True)
    with torch.no_grad():
        assert m(aux).equal(_fresh_out(m, aux)), "stale fold after load_state_dict(assign=True)"
        m.fc.weight.data = m.fc.weight.data * 0.5
        assert m(aux).equal(_fresh_out(m, aux)), "stale fold after param.data = ..."
        # edits through .data bypass the version counter: refresh() is the documented fix
        m.fc.weight.data.mul_(2.0)
        m.refresh()
        assert m(aux).equal(_fresh_out(m, aux))


@requires_cuda
def test_modules_follow_the_device():
    """Built on CPU, moved with .to("cuda"): the cached fold is rebuilt on the GPU and the
    CUDA kernels give what the CPU kernels gave."""
    cfg = tiny_config(norm="fc_norm", num_aux=3, layers=2, rope="llama3")
    m = enn.Eagle3LlamaDrafter(cfg)
    randomize_(m, 3)
    aux = Rng(3).randn((6, 3 * TARGET_HIDDEN[3]), torch.float32)
    ids, pos, _ = inputs(3, 6, H, torch.float32)
    with torch.no_grad():
        h_cpu = m.combine_hidden_states(aux)
        out_cpu = m(ids, pos, h_cpu)
        m.to("cuda")
        h = m.combine_hidden_states(aux.cuda())
        out = m(ids.cuda(), pos.cuda(), h)
    assert h.device.type == "cuda" and out[0].device.type == "cuda"
    torch.testing.assert_close(h.cpu(), h_cpu, rtol=1e-5, atol=1e-5)
    for a, b in zip(out, out_cpu):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-4)


def test_combine_input_errors():
    m = enn.Eagle3Combine(tiny_config(norm="fc_norm", num_aux=3))
    with pytest.raises(ValueError, match=r"\[\.\.\., 192\].*num_aux_hidden_states=3.*got shape \(4, 191\)"):
        m(torch.randn(4, 191))
    with pytest.raises(ValueError, match="expected 3 aux hidden states"):
        m([torch.randn(4, 64)] * 2)
    with pytest.raises(ValueError, match=r"aux\[1\] must be \[\.\.\., 64\]"):
        m([torch.randn(4, 64), torch.randn(4, 63), torch.randn(4, 64)])


# ---- the drafter --------------------------------------------------------------------------------


def _build(cfg, seed, dtype, device="cpu"):
    m = enn.Eagle3LlamaDrafter(cfg, device=device)
    randomize_(m, seed)
    m.to(dtype)
    r64 = R.ReferenceLlamaDrafter(cfg).to(device=device, dtype=torch.float64)
    r64.load_state_dict(m.state_dict())
    eager = R.ReferenceLlamaDrafter(cfg).to(device=device, dtype=dtype)
    eager.load_state_dict(m.state_dict())
    return m, r64, eager


def _check_logits(out, truth, eager, what):
    inf = torch.isinf(truth)
    assert torch.equal(torch.isinf(out), inf) and bool((out[inf] < 0).all()), f"{what}: -inf pattern differs"
    keep = ~inf.reshape(-1, inf.shape[-1])[0]
    check(out[..., keep], truth[..., keep], eager[..., keep], what)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", grid(), ids=grid_id)
def test_drafter_vs_reference(device, seed, dtype, case):
    norm, no, nbr, K, layers, rope, batched = case
    cfg = tiny_config(norm=norm, num_aux=K, norm_output=no, norm_before_residual=nbr, layers=layers, rope=rope)
    m, r64, eager = _build(cfg, seed, dtype, device)
    rng = Rng(seed, device)
    T = 6 if batched else 11
    aux = rng.randn(((2, T) if batched else (T,)) + (K * TARGET_HIDDEN[K],), dtype)
    ids, pos, _ = inputs(seed, T, H, dtype, batched=batched, start=29)
    ids, pos = ids.to(device), pos.to(device)
    with torch.no_grad():
        h = m.combine_hidden_states(aux)
        out, fed = m(ids, pos, h)
        logits = m.compute_logits(out)
        h64 = r64.combine_hidden_states(aux.double())
        out64, fed64 = r64(ids, pos, h64)
        he = eager.combine_hidden_states(aux)
        oute, fede = eager(ids, pos, he)
        logits64, logitse = r64.compute_logits(out64), eager.compute_logits(oute)
    what = f"{grid_id(case)} {dtype}"
    check(h, h64, he, f"combine_hidden_states {what}")
    check(out, out64, oute, f"hidden_for_logits {what}")
    check(fed, fed64, fede, f"hidden_fed_back {what}")
    if no:
        assert torch.equal(fed, out)
    assert logits.shape == (*ids.shape, VOCAB)
    _check_logits(logits, logits64, logitse, f"logits {what}")


def test_drafter_float64_and_autograd_use_the_reference_composition(seed):
    cfg = tiny_config(norm="fc_norm", num_aux=3, norm_before_residual=True, layers=2, rope="llama3")
    m, r64, _ = _build(cfg, seed, torch.float64)
    ids, pos, h = inputs(seed, 7, H, torch.float64)
    aux = Rng(seed).randn((7, 192), torch.float64)
    with torch.no_grad():
        got = m(ids, pos, m.combine_hidden_states(aux))
        want = r64(ids, pos, r64.combine_hidden_states(aux))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    m32 = m.float()
    out, _ = m32(ids, pos, m32.combine_hidden_states(aux.float()))  # grad enabled: differentiable
    out.sum().backward()
    assert m32.fc.weight.grad is not None and m32.fc_norm[0].weight.grad is not None
    assert m32.layers[0].hidden_norm.weight.grad is not None


def test_reference_rope_frequencies_built_once(seed):
    """The reference drafters compute their RoPE frequencies once per dtype and device and
    keep them on that device (so a forward copies nothing from the host and can be captured
    in a CUDA graph; test_cuda_graphs captures it); the kept table is rope_inv_freq's, and
    the second forward equals the first."""
    cfg = tiny_config(norm="fc_norm", num_aux=3, layers=2, rope="llama3")
    _, _, eager = _build(cfg, seed, torch.float32)
    ids, pos, h = inputs(seed, 7, H, torch.float32, start=100)
    with torch.no_grad():
        first = eager(ids, pos, h)
        cache = dict(eager.__dict__["_rope_inv_freq"])
        second = eager(ids, pos, h)
    kept = eager.__dict__["_rope_inv_freq"]
    assert len(cache) == 1 and kept.keys() == cache.keys() and all(kept[k] is v for k, v in cache.items())
    ((head_dim, dtype, device), inv), = cache.items()
    c = eager.config
    assert (head_dim, dtype, device) == (c.head_dim, torch.float32, torch.device("cpu"))
    assert torch.equal(inv, R.rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling, dtype=torch.float32))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_drafter_parameter_names_are_checkpoint_names():
    m = enn.Eagle3LlamaDrafter(tiny_config(norm="norm_before_fc", num_aux=3, layers=2))
    keys = set(m.state_dict())
    for k in ["embed_tokens.weight", "fc.weight", "input_norm.weight", "norm.weight", "lm_head.weight", "d2t", "t2d",
              "layers.0.hidden_norm.weight", "layers.0.input_layernorm.weight",
              "layers.0.post_attention_layernorm.weight", "layers.0.self_attn.q_proj.weight",
              "layers.0.self_attn.k_proj.weight", "layers.0.self_attn.v_proj.weight",
              "layers.0.self_attn.o_proj.weight", "layers.0.mlp.gate_proj.weight", "layers.0.mlp.up_proj.weight",
              "layers.0.mlp.down_proj.weight", "layers.1.input_layernorm.weight", "layers.1.self_attn.q_proj.weight"]:
        assert k in keys, k
    assert "layers.1.hidden_norm.weight" not in keys
    assert m.layers[0].self_attn.q_proj.weight.shape == (H, 2 * H)
    assert m.layers[1].self_attn.q_proj.weight.shape == (H, H)
    assert m.layers[0].self_attn.k_proj.weight.shape == (32, 2 * H)


def test_compute_logits_d2t_offsets_and_identity(seed):
    m, _, _ = _build(tiny_config(), seed, torch.float32)
    h = Rng(seed).randn((5, H), torch.float32)
    with torch.no_grad():
        draft = m.lm_head(h)
        full = m.compute_logits(h)
    target = torch.arange(DRAFT_VOCAB) + m.d2t
    assert torch.equal(full[:, target], draft)
    others = torch.ones(VOCAB, dtype=torch.bool)
    others[target] = False
    assert bool(torch.isneginf(full[:, others]).all()) and int(others.sum()) == VOCAB - DRAFT_VOCAB
    assert torch.equal(m.draft_to_target(torch.tensor([0, 5, 95])), target[[0, 5, 95]])
    assert torch.equal(m.t2d.nonzero().reshape(-1), target)
    # no d2t (draft vocab == vocab): the draft logits themselves, ids unchanged
    m2 = enn.Eagle3LlamaDrafter(tiny_config(draft_vocab=VOCAB))
    assert m2.d2t is None and "d2t" not in m2.state_dict()
    with torch.no_grad():
        assert torch.equal(m2.compute_logits(h), m2.lm_head(h))
    assert torch.equal(m2.draft_to_target(torch.tensor([3, 7])), torch.tensor([3, 7]))


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("norm_output", [False, True])
@pytest.mark.parametrize("batched", [False, True], ids=["T", "BS"])
def test_kv_cache_drafting_equals_full_forward(seed, layers, norm_output, batched):
    """Prefill P tokens, then draft token by token feeding back each step's hidden state
    and greedy token: every cached step equals the last row of a full-sequence forward
    over everything so far; a 2-token append and crop() too."""
    cfg = tiny_config(norm="fc_norm", num_aux=3, norm_output=norm_output, norm_before_residual=True,
                      layers=layers, rope="llama3")
    m, _, _ = _build(cfg, seed, torch.float32)
    P = 5
    ids, pos, h = inputs(seed, P, H, torch.float32, batched=batched, start=11)
    cache = enn.DrafterKVCache()
    with torch.no_grad():
        out, fed = m(ids, pos, h, cache)
        full_out, full_fed = m(ids, pos, h)
        torch.testing.assert_close(out, full_out, rtol=1e-5, atol=1e-5)
        all_ids, all_pos, all_h = ids, pos, h
        for step in range(4):
            nid = m.draft_to_target(m.compute_draft_logits(out[..., -1:, :]).argmax(-1))
            npos = all_pos[..., -1:] + 1
            nh = fed[..., -1:, :]
            out, fed = m(nid, npos, nh, cache)
            all_ids = torch.cat([all_ids, nid], -1)
            all_pos = torch.cat([all_pos, npos], -1)
            all_h = torch.cat([all_h, nh], -2)
            f_out, f_fed = m(all_ids, all_pos, all_h)
            torch.testing.assert_close(out[..., -1, :], f_out[..., -1, :], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(fed[..., -1, :], f_fed[..., -1, :], rtol=1e-5, atol=1e-5)
        assert cache.seq_len == P + 4
        # roll back two drafted tokens, then append two at once
        cache.crop(P + 2)
        two_ids, two_pos, two_h = all_ids[..., P + 2:], all_pos[..., P + 2:], all_h[..., P + 2:, :]
        out2, _ = m(two_ids, two_pos, two_h, cache)
        f_out, _ = m(all_ids, all_pos, all_h)
        torch.testing.assert_close(out2, f_out[..., P + 2:, :], rtol=1e-5, atol=1e-5)


def test_draft_greedy_matches_a_manual_loop(seed):
    cfg = tiny_config(norm="norm_before_fc", num_aux=3, rope="llama3")
    m, _, _ = _build(cfg, seed, torch.float32)
    ids, pos, h = inputs(seed, 6, H, torch.float32, start=3)
    drafted = m.draft_greedy(ids, pos, h, num_tokens=4)
    assert drafted.shape == (4,)
    seq_ids, seq_pos, seq_h = ids, pos, h
    want = []
    with torch.no_grad():
        for _ in range(4):
            out, fed = m(seq_ids, seq_pos, seq_h)
            tok = m.draft_to_target(m.lm_head(out[-1:]).argmax(-1))
            want.append(tok)
            seq_ids, seq_pos, seq_h = (torch.cat([seq_ids, tok]), torch.cat([seq_pos, seq_pos[-1:] + 1]),
                                       torch.cat([seq_h, fed[-1:]]))
    assert torch.equal(drafted, torch.cat(want))
    assert bool(m.t2d[drafted].all()), "drafted ids must be in the draft vocab"


def test_empty_sequence(seed):
    m, _, _ = _build(tiny_config(norm="fc_norm", layers=2), seed, torch.float32)
    with torch.no_grad():
        out, fed = m(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0, H))
        assert out.shape == (0, H) and fed.shape == (0, H)
        assert m.combine_hidden_states(torch.zeros(0, 192)).shape == (0, H)
        assert m.compute_logits(out).shape == (0, VOCAB)


def test_compile_drafter_forward(seed):
    """torch.compile(fullgraph=True) of combine + forward + logits equals eager, follows an
    in-place weight edit (the fold is traced, not cached, when compiled), and handles a new T."""
    cfg = tiny_config(norm="norm_before_fc", num_aux=3, norm_before_residual=True, layers=2, rope="llama3")
    m, _, _ = _build(cfg, seed, torch.float32)
    m.requires_grad_(False)

    def step(aux, ids, pos):
        h = m.combine_hidden_states(aux)
        out, fed = m(ids, pos, h)
        return m.compute_logits(out), fed

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    rng = Rng(seed)
    for T in (5, 9):
        aux = rng.randn((T, 192), torch.float32)
        ids, pos, _ = inputs(seed + T, T, H, torch.float32, start=2)
        want = step(aux, ids, pos)
        got = compiled(aux, ids, pos)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        m.input_norm.weight.mul_(1.5)
    got = compiled(aux, ids, pos)
    want = step(aux, ids, pos)
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-6)


def test_forward_input_errors(seed):
    m, _, _ = _build(tiny_config(norm="fc_norm", num_aux=3), seed, torch.float32)
    ids, pos, h = inputs(seed, 4, H, torch.float32)
    with pytest.raises(ValueError, match="call combine_hidden_states first"):
        m(ids, pos, torch.randn(4, 192))
    with pytest.raises(ValueError, match=r"must both be \[T\] or \[B, S\]"):
        m(ids, pos[:3], h)
    with pytest.raises(ValueError, match="hidden_states are torch.bfloat16 but the drafter's weights are torch.float32"):
        m(ids, pos, h.bfloat16())
    m.missing_weights = {"embed_tokens.weight", "lm_head.weight"}
    with pytest.raises(RuntimeError, match="embed_tokens.weight was not in the checkpoint.*set_target_weights"):
        m(ids, pos, h)
    with pytest.raises(RuntimeError, match="lm_head.weight was not in the checkpoint"):
        m.compute_logits(h)


def test_kv_cache_storage_grows_in_place_and_checks_shapes():
    """Appends write into doubling storage (no copy of the whole cache per step), growth
    keeps every cached position, crop + append overwrites, reserve pre-sizes, and a tensor
    of another batch / width / dtype is refused with the shapes named."""
    c = enn.DrafterKVCache()
    c.reserve(10)
    assert c.capacity == 10 and c.seq_len == 0
    ks, vs = [], []
    for step in range(40):
        S = 7 if step == 0 else 1 + step % 3
        k, v = torch.randn(2, 3, S, 4), torch.randn(2, 3, S, 5)
        ks.append(k)
        vs.append(v)
        K, V = c.update(0, k, v)
        c.update(1, k * 2, v * 2)
        torch.testing.assert_close(K, torch.cat(ks, 2), rtol=0, atol=0)
        torch.testing.assert_close(V, torch.cat(vs, 2), rtol=0, atol=0)
        torch.testing.assert_close(c.values[1], 2 * torch.cat(vs, 2), rtol=0, atol=0)
    total = c.seq_len
    assert total == sum(k.shape[2] for k in ks) and c.capacity >= total
    cap = c.capacity
    c.crop(5)
    assert c.seq_len == 5 and [k.shape[2] for k in c.keys] == [5, 5]
    k, v = torch.randn(2, 3, 2, 4), torch.randn(2, 3, 2, 5)
    K, _ = c.update(0, k, v)
    torch.testing.assert_close(K, torch.cat([torch.cat(ks, 2)[:, :, :5], k], 2), rtol=0, atol=0)
    assert c.capacity == cap  # no reallocation for positions already held
    with pytest.raises(ValueError, match=r"layer 1 keys are \[B, heads, S, width\] = \[2, 3, 'S', 4\]"):
        c.update(1, torch.randn(1, 3, 1, 4), torch.randn(1, 3, 1, 5))
    with pytest.raises(ValueError, match="torch.float64"):
        c.update(0, torch.randn(2, 3, 1, 4, dtype=torch.float64), torch.randn(2, 3, 1, 5))
    with pytest.raises(IndexError, match="layer 3 updated before layer 2"):
        c.update(3, k, v)
    with pytest.raises(ValueError, match=r"crop: length must be in \[0, 7\]"):
        c.crop(8)
    c.reset()
    assert c.seq_len == 0 and c.keys == []
