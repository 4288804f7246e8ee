"""Checkpoint loading: round trips through every layout and file format, the weights
shared with the target, load_state_dict on real key sets, and the errors for bad
checkpoints.

The checkpoints are written here by hand from a randomised tiny drafter (hidden 64, 4
heads, 2 kv heads, vocab 128, draft vocab 96) -- key renaming and qkv / gate_up fusion
done by this file's own code, configs of each layout written out as dicts -- so the loader
is checked against files it did not write. ``save_pretrained`` gets its own round trip.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from eagle3_ops.config import resolve
from eagle3_ops.nn import CheckpointError, Eagle3LlamaDrafter
from eagle3_ops.nn.loading import config_to_dict
from test_nn_helpers import DRAFT_VOCAB, H, INTER, VOCAB, inputs, one_thread, randomize_, tiny_config  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

LLAMA_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
              "rms_norm_eps", "vocab_size", "hidden_act", "max_position_embeddings", "rope_theta", "rope_scaling",
              "head_dim", "attention_bias", "mlp_bias", "tie_word_embeddings")
FLAG_KEYS = ("draft_vocab_size", "target_hidden_size", "num_aux_hidden_states", "norm_before_fc", "fc_norm",
             "norm_output", "norm_before_residual")


# ---- writing checkpoints by hand ---------------------------------------------------------------


def layout_config(flat: dict, layout: str) -> dict:
    if layout in ("eagle3", "serving"):
        return dict(flat)
    layer = {k: flat[k] for k in LLAMA_KEYS if k in flat}
    layer["model_type"] = "llama"
    return {"architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3",
            **{k: flat[k] for k in FLAG_KEYS if k in flat},
            "transformer_layer_config": layer,
            "speculators_config": {"algorithm": "eagle3", "verifier": {"architectures": ["LlamaForCausalLM"],
                                                                       "name_or_path": None}}}


def layout_state(sd: dict, layout: str) -> dict:
    """Our (speculators) names -> the names of ``layout``."""
    sd = {k: v.clone() for k, v in sd.items()}
    if layout == "speculators":
        return sd
    if layout == "eagle3":
        return {re.sub(r"^layers\.0\.", "midlayer.", k): v for k, v in sd.items()}
    out = {}
    for k in [k for k in sd if ".self_attn.q_proj." in k]:
        pre, suf = k.split(".self_attn.q_proj.")
        parts = [sd.pop(f"{pre}.self_attn.{p}_proj.{suf}") for p in "qkv"]
        out[f"model.{pre}.self_attn.qkv_proj.{suf}"] = torch.cat(parts, 0)
    for k in [k for k in sd if ".mlp.gate_proj." in k]:
        pre, suf = k.split(".mlp.gate_proj.")
        out[f"model.{pre}.mlp.gate_up_proj.{suf}"] = torch.cat([sd.pop(k), sd.pop(f"{pre}.mlp.up_proj.{suf}")], 0)
    for k, v in sd.items():
        out["draft_id_to_target_id" if k == "d2t" else k if k in ("lm_head.weight", "t2d") else "model." + k] = v
    return out


def write(folder, flat_cfg: dict, state: dict, layout: str, fmt: str):
    """Writes config.json and the weights; returns the path to give from_pretrained."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(layout_config(flat_cfg, layout)))
    st = {k: v.contiguous() for k, v in layout_state(state, layout).items()}
    if fmt == "safetensors":
        save_file(st, str(folder / "model.safetensors"))
    elif fmt == "sharded":
        keys = sorted(st)
        shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
        for name, ks in shards.items():
            save_file({k: st[k] for k in ks}, str(folder / name))
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}))
    elif fmt == "bin":
        torch.save(st, folder / "pytorch_model.bin")
        torch.save({"not": "weights"}, folder / "training_args.bin")  # must be ignored
    elif fmt == "pt_file":  # one file given directly, wrapped in {"state_dict": ...}
        torch.save({"state_dict": st, "epoch": 3}, folder / "drafter.pt")
        return folder / "drafter.pt"
    else:
        raise ValueError(fmt)
    return folder


def source(seed, dtype=torch.float32, **cfg_kw):
    cfg = tiny_config(**cfg_kw)
    m = Eagle3LlamaDrafter(cfg)
    randomize_(m, seed)
    return cfg, m.to(dtype).eval()


def same_outputs(a, b, seed, K=3, Ht=64):
    aux = torch.randn(5, K * Ht, generator=torch.Generator().manual_seed(seed)).to(a.fc.weight.dtype)
    ids, pos, _ = inputs(seed, 5, H, torch.float32)
    with torch.no_grad():
        ha, hb = a.combine_hidden_states(aux), b.combine_hidden_states(aux)
        oa, ob = a(ids, pos, ha), b(ids, pos, hb)
        assert torch.equal(ha, hb) and torch.equal(oa[0], ob[0]) and torch.equal(oa[1], ob[1])
        assert torch.equal(a.compute_logits(oa[0]), b.compute_logits(ob[0]))


# ---- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "sharded", "bin", "pt_file"])
@pytest.mark.parametrize("layout", ["eagle3", "speculators", "serving"])
@pytest.mark.parametrize("norm,K,layers", [("fc_norm", 3, 1), ("norm_before_fc", 4, 2), ("none", 2, 1)])
def test_round_trip(tmp_path, seed, layout, fmt, norm, K, layers):
    cfg, m = source(seed, norm=norm, num_aux=K, layers=layers, rope="llama3", norm_before_residual=True)
    path = write(tmp_path / "ckpt", cfg, m.state_dict(), layout, fmt)
    got = Eagle3LlamaDrafter.from_pretrained(path)
    assert got.config.layout == ("speculators" if layout == "speculators" else "eagle3")
    assert got.config.rope_scaling == cfg["rope_scaling"] and got.config.num_aux_hidden_states == K
    sd, want = got.state_dict(), m.state_dict()
    assert sorted(sd) == sorted(want)
    for k in want:
        assert torch.equal(sd[k], want[k]), k
    assert not got.training and not any(p.requires_grad for p in got.parameters())
    assert got.missing_weights == set() and got.load_report.missing_shared == []
    same_outputs(got, m, seed, K, {2: 96, 3: 64, 4: 40}[K])


@pytest.mark.parametrize("layout", ["eagle3", "speculators", "serving"])
def test_round_trip_with_biases(tmp_path, seed, layout):
    """Fused serving projections carry their biases too (qkv_proj.bias, gate_up_proj.bias)."""
    cfg, m = source(seed, layers=2, attention_bias=True, mlp_bias=True, head_dim=32)
    st = layout_state(m.state_dict(), layout)
    if layout == "serving":
        assert "model.layers.1.self_attn.qkv_proj.bias" in st and "model.layers.0.mlp.gate_up_proj.bias" in st
    write(tmp_path, cfg, m.state_dict(), layout, "safetensors")
    got = Eagle3LlamaDrafter.from_pretrained(tmp_path)
    for k, v in m.state_dict().items():
        assert torch.equal(got.state_dict()[k], v), k
    same_outputs(got, m, seed)


@pytest.mark.parametrize("layout", ["eagle3", "speculators", "serving"])
def test_load_state_dict_strict_takes_every_layout(seed, layout):
    cfg, m = source(seed, norm="norm_before_fc", num_aux=3, layers=2)
    fresh = Eagle3LlamaDrafter(cfg)
    result = fresh.load_state_dict(layout_state(m.state_dict(), layout), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for k, v in m.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    same_outputs(fresh, m, seed)


def test_load_state_dict_strict_still_rejects_wrong_keys(seed):
    cfg, m = source(seed)
    sd = layout_state(m.state_dict(), "serving")
    sd["model.layers.0.self_attn.qkv_proj.weight"] = sd["model.layers.0.self_attn.qkv_proj.weight"][:100]
    with pytest.raises(RuntimeError, match="qkv_proj"):
        Eagle3LlamaDrafter(cfg).load_state_dict(sd, strict=True)


def test_bf16_checkpoint_loads_as_bf16_unless_told(tmp_path, seed):
    cfg, m = source(seed, dtype=torch.bfloat16, norm="fc_norm")
    write(tmp_path, cfg, m.state_dict(), "speculators", "safetensors")
    got = Eagle3LlamaDrafter.from_pretrained(tmp_path)
    assert got.fc.weight.dtype == torch.bfloat16 and got.d2t.dtype == torch.long and got.t2d.dtype == torch.bool
    same_outputs(got, m, seed)
    got32 = Eagle3LlamaDrafter.from_pretrained(tmp_path, dtype=torch.float32)
    assert got32.fc.weight.dtype == torch.float32 and torch.equal(got32.fc.weight, m.fc.weight.float())


def test_t2d_is_derived_when_absent(tmp_path, seed):
    cfg, m = source(seed)
    sd = m.state_dict()
    del sd["t2d"]
    write(tmp_path, cfg, sd, "eagle3", "safetensors")
    got = Eagle3LlamaDrafter.from_pretrained(tmp_path)
    assert got.load_report.derived == ["t2d"] and torch.equal(got.t2d, m.t2d)


def test_same_size_vocab_without_d2t_and_tied_embeddings(tmp_path, seed):
    cfg, m = source(seed, draft_vocab=VOCAB, tie_word_embeddings=True)
    assert m.d2t is None and m.lm_head.weight is m.embed_tokens.weight
    sd = m.state_dict()
    del sd["lm_head.weight"]  # tied: checkpoints store it once
    write(tmp_path, cfg, sd, "eagle3", "safetensors")
    got = Eagle3LlamaDrafter.from_pretrained(tmp_path)
    assert got.lm_head.weight is got.embed_tokens.weight and got.missing_weights == set()
    same_outputs(got, m, seed)


# ---- weights shared with the target -----------------------------------------------------------------


class ToyTarget(nn.Module):
    """A target model with HF-style names: model.embed_tokens, lm_head over the full vocab."""

    def __init__(self, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(VOCAB, H)
        self.lm_head = nn.Linear(H, VOCAB, bias=False)
        with torch.no_grad():
            self.model.embed_tokens.weight.copy_(torch.randn(VOCAB, H, generator=g))
            self.lm_head.weight.copy_(torch.randn(VOCAB, H, generator=g) / 8)


@pytest.mark.parametrize("layout", ["eagle3", "speculators", "serving"])
def test_missing_embeddings_and_head_come_from_the_target(tmp_path, seed, layout):
    cfg, m = source(seed, norm="fc_norm")
    target = ToyTarget(seed)
    sd = m.state_dict()
    del sd["embed_tokens.weight"], sd["lm_head.weight"]
    write(tmp_path, cfg, sd, layout, "safetensors")
    got = Eagle3LlamaDrafter.from_pretrained(tmp_path)
    assert got.missing_weights == {"embed_tokens.weight", "lm_head.weight"}
    assert got.load_report.missing_shared == ["embed_tokens.weight", "lm_head.weight"]
    assert "missing shared: embed_tokens.weight, lm_head.weight" in str(got.load_report)
    ids, pos, h = inputs(seed, 4, H, torch.float32)
    with pytest.raises(RuntimeError, match="embed_tokens.weight was not in the checkpoint"):
        got(ids, pos, h)
    assert sorted(got.set_target_weights(target)) == ["embed_tokens.weight", "lm_head.weight"]
    assert got.missing_weights == set()
    assert got.embed_tokens.weight is target.model.embed_tokens.weight, "same dtype/device: shared, not copied"
    assert torch.equal(got.lm_head.weight, target.lm_head.weight[got.target_ids()]), "head rows picked by d2t"
    # the drafter with the target's weights computes what the source drafter computes with them
    with torch.no_grad():
        m.embed_tokens.weight.copy_(target.model.embed_tokens.weight)
        m.lm_head.weight.copy_(target.lm_head.weight[torch.arange(DRAFT_VOCAB) + m.d2t])
    same_outputs(got, m, seed)
    # from_pretrained(target=...) does the same in one call
    got2 = Eagle3LlamaDrafter.from_pretrained(tmp_path, target=target)
    assert got2.missing_weights == set()
    same_outputs(got2, m, seed)


def test_set_target_weights_rejects_wrong_shapes(seed):
    cfg, m = source(seed)
    with pytest.raises(CheckpointError, match=r"embed_tokens from the target is \[128, 32\].*\[vocab_size=128, "
                                              r"hidden_size=64\]"):
        m.set_target_weights(embed_tokens=torch.zeros(VOCAB, 32))
    with pytest.raises(CheckpointError, match=r"lm_head from the target is \[100, 64\]"):
        m.set_target_weights(lm_head=torch.zeros(100, H))


# ---- save_pretrained -----------------------------------------------------------------------------


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
@pytest.mark.parametrize("layout", ["eagle3", "speculators", "serving"])
def test_save_pretrained_round_trip(tmp_path, seed, layout, safe):
    cfg, m = source(seed, norm="norm_before_fc", num_aux=5, layers=2, rope="llama3", norm_output=True,
                    eagle_aux_hidden_state_layer_ids=[1, 5, 9, 13, 20])
    m.save_pretrained(tmp_path, layout=layout, safe_serialization=safe)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert ("transformer_layer_config" in raw) == (layout == "speculators")
    got = Eagle3LlamaDrafter.from_pretrained(tmp_path)
    for k, v in m.state_dict().items():
        assert torch.equal(got.state_dict()[k], v), k
    same_outputs(got, m, seed, K=5, Ht=80)
    a, b = got.config.to_dict(), m.config.to_dict()
    for d in (a, b):
        d.pop("layout")
    assert a == b


def test_save_pretrained_writes_t2d_from_d2t(tmp_path, seed):
    """A d2t set by hand (t2d left as it was) is saved with a matching t2d."""
    cfg, m = source(seed)
    with torch.no_grad():
        m.d2t.copy_(torch.arange(DRAFT_VOCAB) * 0 + (VOCAB - DRAFT_VOCAB))  # the last 96 target ids
    m.save_pretrained(tmp_path, layout="speculators")
    got = Eagle3LlamaDrafter.from_pretrained(tmp_path)
    assert torch.equal(got.d2t, m.d2t)
    assert torch.equal(got.t2d.nonzero().reshape(-1), torch.arange(VOCAB - DRAFT_VOCAB, VOCAB))


@pytest.mark.parametrize("layout", ["eagle3", "speculators", "serving"])
def test_config_to_dict_resolves_back(layout):
    c = resolve(tiny_config(norm="fc_norm", num_aux=4, rope="llama3", target_num_layers=None))
    back = resolve(config_to_dict(c, layout))
    assert {**back.to_dict(), "layout": None} == {**c.to_dict(), "layout": None}


# ---- errors -----------------------------------------------------------------------------------------


def _load_error(tmp_path, cfg, sd, layout="speculators", **kw) -> str:
    write(tmp_path, cfg, sd, layout, "safetensors")
    with pytest.raises(CheckpointError) as e:
        Eagle3LlamaDrafter.from_pretrained(tmp_path, **kw)
    return str(e.value)


def test_error_lists_unexpected_missing_and_mismatched_at_once(tmp_path, seed):
    cfg, m = source(seed)
    sd = m.state_dict()
    sd["layers.0.self_attn.extra_proj.weight"] = torch.zeros(3, 5)
    del sd["layers.0.mlp.down_proj.weight"]
    sd["layers.0.self_attn.q_proj.weight"] = torch.zeros(H, H)  # not widened to 2H
    msg = _load_error(tmp_path, cfg, sd, layout="eagle3")
    assert str(tmp_path) in msg and "Eagle3LlamaDrafter(hidden_size=64" in msg
    assert "unexpected keys (1):\n    layers.0.self_attn.extra_proj.weight [3, 5] (checkpoint name " \
           "'midlayer.self_attn.extra_proj.weight')" in msg
    assert "missing keys (1):\n    layers.0.mlp.down_proj.weight, expected [64, 128] float32" in msg
    assert "shape mismatches (1):\n    midlayer.self_attn.q_proj.weight: checkpoint [64, 64], model " \
           "layers.0.self_attn.q_proj.weight expects [64, 128]" in msg


def test_error_fc_width_names_both_numbers(tmp_path, seed):
    cfg, m = source(seed, num_aux=3)
    sd = m.state_dict()
    sd["fc.weight"] = torch.zeros(H, 4 * 64)
    msg = _load_error(tmp_path, cfg, sd)
    assert "fc weight has 256 input features but the config expects num_aux_hidden_states=3 * " \
           "target_hidden_size=64 = 192 (the weight implies 4 aux hidden states)" in msg


def test_error_fused_projection_of_wrong_size(tmp_path, seed):
    cfg, m = source(seed)
    sd = layout_state(m.state_dict(), "serving")
    sd["model.layers.0.mlp.gate_up_proj.weight"] = sd["model.layers.0.mlp.gate_up_proj.weight"][:INTER]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.gate_up_proj\.weight: checkpoint \[128, 64\], "
                                              r"model expects \[256, 64\] \(= 128 \+ 128 rows of "
                                              r"layers\.0\.mlp\.gate_proj\.weight, layers\.0\.mlp\.up_proj\.weight\)"):
        Eagle3LlamaDrafter.from_pretrained(tmp_path)


def test_error_same_tensor_twice(seed):
    cfg, m = source(seed)
    sd = m.state_dict()
    pairs = list(sd.items()) + [("midlayer.hidden_norm.weight", sd["layers.0.hidden_norm.weight"])]
    with pytest.raises(CheckpointError, match=r"keys given twice \(1\):\n    layers\.0\.hidden_norm\.weight: given "
                                              r"by both 'layers\.0\.hidden_norm\.weight' and 'midlayer\.hidden_norm\.weight'"):
        Eagle3LlamaDrafter(cfg).load_weights(pairs)


def test_error_bad_vocab_maps(tmp_path, seed):
    cfg, m = source(seed)
    sd = m.state_dict()
    bad = sd["d2t"].clone()
    bad[7] = VOCAB  # target id 7 + 128 is outside the vocab
    with pytest.raises(CheckpointError, match=r"d2t: draft ids \[7\] map outside the target vocab \[0, 128\)"):
        Eagle3LlamaDrafter(cfg).load_weights({**sd, "d2t": bad}.items())
    dup = sd["d2t"].clone()
    dup[1] = dup[0] - 1  # draft 1 -> the target id of draft 0
    with pytest.raises(CheckpointError, match="several draft ids map to the same target id"):
        Eagle3LlamaDrafter(cfg).load_weights({**sd, "d2t": dup}.items())
    t2d = sd["t2d"].clone()
    t2d[t2d.nonzero()[0]] = False
    with pytest.raises(CheckpointError, match="t2d disagrees with d2t: t2d marks 95 target ids, 1 of d2t's 96"):
        Eagle3LlamaDrafter(cfg).load_weights({**sd, "t2d": t2d}.items())
    no_d2t = {k: v for k, v in sd.items() if k not in ("d2t", "t2d")}
    with pytest.raises(CheckpointError, match=r"missing keys \(1\):\n    d2t, expected \[96\] int64"):
        Eagle3LlamaDrafter(cfg).load_weights(no_d2t.items())


def test_non_strict_reports_instead_of_raising(seed):
    cfg, m = source(seed)
    sd = m.state_dict()
    del sd["norm.weight"]
    sd["something.else"] = torch.zeros(2)
    fresh = Eagle3LlamaDrafter(cfg)
    report = fresh.load_weights(sd.items(), strict=False)
    assert report.missing == ["norm.weight"] and report.unexpected == ["something.else"]
    assert torch.equal(fresh.fc.weight, m.fc.weight)
    sd["fc.weight"] = torch.zeros(H, 100)
    with pytest.raises(CheckpointError, match="fc weight has 100 input features"):
        fresh.load_weights(sd.items(), strict=False)  # shapes are never tolerated


def test_rotary_inv_freq_entries_are_skipped(seed):
    cfg, m = source(seed)
    sd = m.state_dict()
    sd["midlayer.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    report = Eagle3LlamaDrafter(cfg).load_weights(sd.items())
    assert report.ignored == ["midlayer.self_attn.rotary_emb.inv_freq"]


def test_error_files(tmp_path, seed):
    cfg, m = source(seed)
    with pytest.raises(CheckpointError, match="does not exist"):
        Eagle3LlamaDrafter.from_pretrained(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"no weight files in .*looked for \*\.safetensors"):
        Eagle3LlamaDrafter.from_pretrained(tmp_path)
    torch.save([1, 2, 3], tmp_path / "weights.pt")
    with pytest.raises(CheckpointError, match="holds a list, expected a dict of tensors"):
        Eagle3LlamaDrafter.from_pretrained(tmp_path / "weights.pt")
    empty = tmp_path / "no_config"
    empty.mkdir()
    save_file({"fc.weight": torch.zeros(2, 2)}, str(empty / "model.safetensors"))
    with pytest.raises(ValueError, match="has no config.json"):
        Eagle3LlamaDrafter.from_pretrained(empty)
    cfg_bad = dict(cfg, norm_before_fc=True, fc_norm=True)
    (tmp_path / "config.json").write_text(json.dumps(cfg_bad))
    with pytest.raises(ValueError, match="mutually exclusive"):
        Eagle3LlamaDrafter.from_pretrained(tmp_path)
