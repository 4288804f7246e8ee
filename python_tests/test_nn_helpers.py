"""Shared pieces of the test_nn_* files (no tests here): tiny configs, random weights,
random inputs, and the numerics rule applied to module outputs.

Tiny sizes: hidden 64, 4 heads (head_dim 16), 2 kv heads, intermediate 128, vocab 128,
draft vocab 96. ``target_hidden_size`` follows the number of aux states so the grid covers
``H_t == H`` and ``H_t != H``: TARGET_HIDDEN[K].
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from numerics import Rng, assert_close_to_fp64

H, HEADS, KV_HEADS, INTER, VOCAB, DRAFT_VOCAB = 64, 4, 2, 128, 128, 96
TARGET_HIDDEN = {2: 96, 3: 64, 4: 40, 5: 80}
NORM_MODES = ("none", "norm_before_fc", "fc_norm")
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


def tiny_config(norm="none", num_aux=3, norm_output=False, norm_before_residual=False, layers=1,
                rope="default", draft_vocab=DRAFT_VOCAB, target_hidden=None, **extra) -> dict:
    """A flat (original EAGLE-3 layout) config dict of the tiny drafter."""
    cfg = {
        "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama",
        "hidden_size": H, "intermediate_size": INTER, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "num_hidden_layers": layers, "rms_norm_eps": 1e-5,
        "vocab_size": VOCAB, "draft_vocab_size": draft_vocab, "hidden_act": "silu",
        "max_position_embeddings": 2048, "rope_theta": 10000.0,
        "target_hidden_size": TARGET_HIDDEN[num_aux] if target_hidden is None else target_hidden,
        "num_aux_hidden_states": num_aux, "norm_before_fc": norm == "norm_before_fc",
        "fc_norm": norm == "fc_norm", "norm_output": norm_output,
        "norm_before_residual": norm_before_residual,
    }
    if rope == "llama3":
        cfg["rope_scaling"] = dict(LLAMA3_ROPE)
    cfg.update(extra)
    return cfg


def grid():
    """Every combination of norm mode x norm_output x norm_before_residual x num_aux; the
    number of layers (1 or 2) and the rope (default / llama3) and input style ([T] / [B, S])
    cycle through the cases so each value is met with each flag."""
    cases = []
    for i, (norm, no, nbr, k) in enumerate(itertools.product(NORM_MODES, (False, True), (False, True), (2, 3, 4, 5))):
        layers = 2 if i % 3 == 0 else 1
        rope = "llama3" if i % 2 == 0 else "default"
        batched = i % 4 in (1, 2)
        cases.append((norm, no, nbr, k, layers, rope, batched))
    return cases


def grid_id(case) -> str:
    norm, no, nbr, k, layers, rope, batched = case
    return f"{norm}-no{int(no)}-nbr{int(nbr)}-K{k}-L{layers}-{rope}-{'BS' if batched else 'T'}"


def randomize_(model, seed: int, d2t_seed: int = 0) -> None:
    """Fills every parameter of a drafter-like module with fresh values: linear weights
    ~ N(0, 1/in) (scaled up a little so residual branches matter), norm weights 1 + 0.3 N,
    biases 0.1 N, embeddings N(0, 1); d2t a random increasing subset of the target vocab."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" in name:
                v = torch.randn(p.shape, generator=g)
            elif p.dim() == 2:
                v = torch.randn(p.shape, generator=g) * (1.5 / math.sqrt(p.shape[1]))
            elif name.endswith("bias"):
                v = 0.1 * torch.randn(p.shape, generator=g)
            else:
                v = 1.0 + 0.3 * torch.randn(p.shape, generator=g)
            p.copy_(v.to(p.dtype))
        d2t = getattr(model, "d2t", None)
        if d2t is not None:
            ids = torch.sort(torch.randperm(model.config.vocab_size, generator=g)[: d2t.numel()]).values
            d2t.copy_(ids - torch.arange(d2t.numel()))
            t2d = torch.zeros(model.config.vocab_size, dtype=torch.bool)
            t2d[ids] = True
            model.t2d.copy_(t2d)


def inputs(seed: int, T: int, hidden: int, dtype, batched: bool = False, start: int = 0):
    """(input_ids, positions, hidden_states): [T] or [2, T]; positions start at ``start``
    (batched: a different start per row)."""
    rng = Rng(seed)
    g = torch.Generator().manual_seed(seed + 1)
    if batched:
        ids = torch.randint(0, VOCAB, (2, T), generator=g)
        pos = torch.arange(T)[None] + torch.tensor([[start], [start + 5]])
        h = rng.randn((2, T, hidden), dtype)
    else:
        ids = torch.randint(0, VOCAB, (T,), generator=g)
        pos = torch.arange(T) + start
        h = rng.randn((T, hidden), dtype)
    return ids, pos, h


def check(out, ref64, eager, what: str) -> None:
    """DESIGN.md section 4 on a module output: fp32 within 1e-5 of the fp64 truth; bf16 /
    fp16 within 2x the error of the pure-PyTorch composition in the same dtype + floor."""
    assert out.dtype == (eager.dtype if eager is not None else out.dtype)
    assert_close_to_fp64(out, ref64, eager if out.dtype != torch.float32 else None, what)


def check_vs_harness(m, hf64, hf, ids, pos, h, what: str) -> None:
    """``m(ids, pos, h)`` against a truth model run in float64 (``hf64``) and in h's dtype
    (``hf``, for the bound): both outputs, hidden_for_logits and hidden_fed_back."""
    with torch.no_grad():
        out, fed = m(ids, pos, h)
        out64, fed64 = hf64(ids, pos, h.double())
        oute, fede = hf(ids, pos, h)
    check(out, out64, oute, what)
    check(fed, fed64, fede, f"{what} fed back")


@pytest.fixture(scope="module", autouse=False)
def one_thread():
    """The test_nn tensors are tiny: on a small shared CPU box, intra-op threads only add
    synchronisation (measured here: a 11x128 @ 128x64 linear 18 us on one thread, 1.7 ms on
    two under load). One thread for the module's tests, restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class HFDrafterWiring:
    """DESIGN.md section 1 wired from `transformers` parts (the test_nn_hf / test_nn_deepseek
    harnesses): ``combine(aux)`` = fc over input_norm / fc_norm; ``forward(ids, pos, h)`` =
    layer 0 on ``cat([input_layernorm(embeds), hidden_norm(h)])`` with the residual h (or
    hidden_norm(h)), ordinary decoder layers after it, the final norm. The subclass sets
    ``c`` (the resolved config), ``embed_tokens``, ``fc``, ``input_norm`` / ``fc_norm``,
    ``layers`` (layer 0 a container of self_attn / mlp / the three norms), ``norm`` and
    ``rotary_emb``."""

    def combine(self, aux):
        if hasattr(self, "input_norm"):
            aux = self.input_norm(aux)
        if hasattr(self, "fc_norm"):
            chunks = aux.split(self.c.target_hidden_size, dim=-1)
            aux = torch.cat([n(a) for n, a in zip(self.fc_norm, chunks)], dim=-1)
        return self.fc(aux)

    def forward(self, ids, pos, h):
        flat = ids.dim() == 1
        if flat:
            ids, pos, h = ids[None], pos[None], h[None]
        S = ids.shape[1]
        mask = torch.full((S, S), torch.finfo(h.dtype).min, dtype=h.dtype, device=h.device).triu(1)[None, None]
        cos_sin = self.rotary_emb(h, pos)
        first = self.layers[0]
        hn = first.hidden_norm(h)
        x = torch.cat([first.input_layernorm(self.embed_tokens(ids)), hn], dim=-1)
        residual = hn if self.c.norm_before_residual else h
        a, _ = first.self_attn(x, position_embeddings=cos_sin, attention_mask=mask)
        r = residual + a
        hs = r + first.mlp(first.post_attention_layernorm(r))
        for layer in self.layers[1:]:
            hs = layer(hs, attention_mask=mask, position_embeddings=cos_sin)
        out = self.norm(hs)
        fed = out if self.c.norm_output else hs
        return (out[0], fed[0]) if flat else (out, fed)
