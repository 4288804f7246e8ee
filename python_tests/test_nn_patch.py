"""patch_drafter / unpatch_drafter on a drafter written elsewhere.

``ForeignDrafter`` below is a plain-PyTorch EAGLE-3 drafter in the style of the training
repositories: its own Hugging-Face-style RMSNorm class, ``torch.nn.RMSNorm`` in places,
``fc`` with ``input_norm`` or ``fc_norm``, a ``midlayer``, and one Gemma-style norm
(``(1 + weight)``) that must NOT be swapped. The patch must keep every parameter object
and state-dict key, give the same outputs (numerics rule against the unpatched model run
in float64), follow later weight edits, and be undone exactly.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from eagle3_ops import nn as enn
from numerics import Rng, assert_close_to_fp64
from test_nn_helpers import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

H, HT, K, V = 64, 48, 3, 100


class MyRMSNorm(nn.Module):
    def __init__(self, n, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.variance_epsilon = eps

    def forward(self, x):
        dtype = x.dtype
        xf = x.to(torch.float32) if dtype != torch.float64 else x
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * xf.to(dtype)


class GemmaRMSNorm(nn.Module):
    """Scales by (1 + weight): same shape and name pattern, different math."""

    def __init__(self, n, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight.float())).to(x.dtype)


class MidLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_layernorm = MyRMSNorm(H)
        self.hidden_norm = MyRMSNorm(H)
        self.post_attention_layernorm = nn.RMSNorm(H, eps=1e-5)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(2 * H, H), nn.Linear(2 * H, H), nn.Linear(2 * H, H)
        self.o_proj = nn.Linear(H, H)
        self.up, self.down = nn.Linear(H, 2 * H), nn.Linear(2 * H, H)

    def forward(self, e, h):
        x = torch.cat([self.input_layernorm(e), self.hidden_norm(h)], -1)
        q, k, v = (p(x).view(*x.shape[:-1], 4, 16).transpose(0, 1) for p in (self.q_proj, self.k_proj, self.v_proj))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(0, 1).reshape(*x.shape[:-1], H)
        r = h + self.o_proj(a)
        return r + self.down(F.silu(self.up(self.post_attention_layernorm(r))))


class ForeignDrafter(nn.Module):
    def __init__(self, norm: str):
        super().__init__()
        self.embed_tokens = nn.Embedding(V, H)
        self.fc = nn.Linear(K * HT, H, bias=False)
        if norm in ("input_norm", "both"):
            self.input_norm = MyRMSNorm(K * HT)
        else:
            self.input_norm = None
        self.fc_norm = nn.ModuleList(nn.RMSNorm(HT, eps=1e-5) for _ in range(K)) if norm in ("fc_norm", "both") else None
        self.midlayer = MidLayer()
        self.norm = MyRMSNorm(H)
        self.head_norm = GemmaRMSNorm(H)
        self.lm_head = nn.Linear(H, V, bias=False)

    def forward(self, ids, aux):
        x = aux
        if self.input_norm is not None:
            x = self.input_norm(x)
        if self.fc_norm is not None:
            x = torch.cat([n(c) for n, c in zip(self.fc_norm, x.chunk(K, -1))], -1)
        h = self.fc(x)
        out = self.norm(self.midlayer(self.embed_tokens(ids), h))
        return self.lm_head(self.head_norm(out)), out


def _randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if "embed" in name else 1.5 / math.sqrt(p.shape[1])))
            else:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))


def _run(model, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (9,), generator=g)
    aux = Rng(seed).randn((9, K * HT), dtype)
    with torch.no_grad():
        return model(ids, aux)


@pytest.mark.parametrize("norm", ["input_norm", "fc_norm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_patch_keeps_parameters_and_outputs_then_undo(seed, norm, dtype):
    model = ForeignDrafter(norm)
    _randomize(model, seed)
    model.to(dtype)
    truth = ForeignDrafter(norm).double()
    truth.load_state_dict(model.state_dict())
    before = _run(model, seed, dtype)
    params = {n: p for n, p in model.named_parameters()}
    keys = list(model.state_dict())

    report = enn.patch_drafter(model)
    swapped = [s.split(":")[0] for s in report.swapped]
    want = ["fc", "midlayer.input_layernorm", "midlayer.hidden_norm", "midlayer.post_attention_layernorm", "norm"]
    want += ["input_norm"] if norm == "input_norm" else [f"fc_norm.{i}" for i in range(K)]
    assert sorted(swapped) == sorted(want), report
    assert len(report.skipped) == 1 and report.skipped[0].startswith("head_norm: GemmaRMSNorm computes something else")
    assert isinstance(model.fc, enn.FusedNormLinear) and isinstance(model.norm, enn.RMSNorm)
    assert isinstance(model.midlayer.post_attention_layernorm, enn.RMSNorm)
    assert isinstance(model.head_norm, GemmaRMSNorm)
    assert list(model.state_dict()) == keys, "state-dict keys must not change"
    assert {n: p for n, p in model.named_parameters()} == params, "the same parameter objects"

    after = _run(model, seed, dtype)
    want64 = _run(truth, seed, torch.float64)
    for got, eager, w64, what in zip(after, before, want64, ("logits", "hidden")):
        assert_close_to_fp64(got, w64, eager if dtype != torch.float32 else None, f"patched {what} {dtype}")

    # weights edited while patched are seen (no stale folded fc weight)
    other = ForeignDrafter(norm)
    _randomize(other, seed + 1)
    model.load_state_dict(other.to(dtype).state_dict())
    edited = _run(model, seed, dtype)
    ref = _run(other, seed, dtype)
    torch.testing.assert_close(edited[1], ref[1], rtol=0.05 if dtype == torch.bfloat16 else 1e-4,
                               atol=0.05 if dtype == torch.bfloat16 else 1e-4)

    assert enn.patch_drafter(model).swapped == [], "patching twice changes nothing"
    restored = enn.unpatch_drafter(model)
    assert sorted(restored) == sorted(want)
    assert type(model.fc) is nn.Linear and type(model.norm) is MyRMSNorm
    assert type(model.midlayer.post_attention_layernorm) is nn.RMSNorm
    assert {n: p for n, p in model.named_parameters()} == params
    for a, b in zip(_run(model, seed, dtype), ref):
        assert torch.equal(a, b), "after undo the original modules compute exactly as before"
    assert enn.unpatch_drafter(model) == []


def test_patch_skips_a_model_with_both_fc_norms(seed):
    model = ForeignDrafter("both")
    _randomize(model, seed)
    report = enn.patch_drafter(model)
    assert any(s.startswith("fc: both input_norm and fc_norm are present") for s in report.skipped)
    assert type(model.fc) is nn.Linear and type(model.input_norm) is enn.RMSNorm  # norms still swapped alone
    before = _run(model, seed)
    enn.unpatch_drafter(model)
    torch.testing.assert_close(before[1], _run(model, seed)[1], rtol=1e-5, atol=1e-5)


def test_patch_then_to_and_replaced_parameters(seed):
    model = ForeignDrafter("fc_norm")
    _randomize(model, seed)
    enn.patch_drafter(model)
    model.to(torch.bfloat16)  # while patched
    assert model.fc.weight.dtype == torch.bfloat16
    out_bf16 = _run(model, seed, torch.bfloat16)
    ref = ForeignDrafter("fc_norm")
    ref.load_state_dict(model.state_dict())
    ref.to(torch.bfloat16)
    torch.testing.assert_close(out_bf16[1], _run(ref, seed, torch.bfloat16)[1], rtol=0.05, atol=0.05)
    # load_state_dict(assign=True) puts new Parameter objects into the swapped-in modules;
    # undo hands them to the original modules
    other = ForeignDrafter("fc_norm")
    _randomize(other, seed + 5)
    model.load_state_dict(other.state_dict(), assign=True)
    new_fc = model.fc.weight
    enn.unpatch_drafter(model)
    assert model.fc.weight is new_fc and type(model.fc) is nn.Linear
    for a, b in zip(_run(model, seed), _run(other, seed)):
        assert torch.equal(a, b)


def test_patch_our_own_drafter_is_a_no_op():
    from test_nn_helpers import tiny_config

    m = enn.Eagle3LlamaDrafter(tiny_config(norm="fc_norm"))
    report = enn.patch_drafter(m)
    assert report.swapped == [] and report.skipped == []
