"""Config resolution and validation (DESIGN.md section 1): eagle3_ops.config.

Fixtures are written as real config.json files of each layout; every field of
the resolved DrafterConfig is compared against hand-written expectations.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import math
import sys
import types
from pathlib import Path

import pytest

try:
    from eagle3_ops import config as C
except ImportError:  # package __init__ needs a compiled extension not built yet
    _path = Path(__file__).resolve().parents[1] / "eagle3_ops" / "config.py"
    _spec = importlib.util.spec_from_file_location("_eagle3_ops_config", _path)
    C = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = C
    _spec.loader.exec_module(C)


# ---------------------------------------------------------------------------
# Fixtures: realistic configs of each layout
# ---------------------------------------------------------------------------

LLAMA31_ROPE = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}

# Original EAGLE-3 layout: a Llama-3.1-8B-style drafter (flat Llama config).
EAGLE3_LLAMA31_8B = {
    "architectures": ["LlamaForCausalLMEagle3"],
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 1,
    "num_key_value_heads": 8,
    "pad_token_id": 0,
    "rms_norm_eps": 1e-05,
    "rope_scaling": LLAMA31_ROPE,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.28.1",
    "use_cache": True,
    "vocab_size": 128256,
    "draft_vocab_size": 32000,
}

EXPECTED_EAGLE3_LLAMA31_8B = {
    "hidden_size": 4096,
    "target_hidden_size": 4096,
    "num_aux_hidden_states": 3,
    "aux_layer_ids": None,
    "norm_before_fc": False,
    "fc_norm": False,
    "norm_output": False,
    "norm_before_residual": False,
    "rms_norm_eps": 1e-05,
    "vocab_size": 128256,
    "draft_vocab_size": 32000,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 14336,
    "num_hidden_layers": 1,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rope_scaling": LLAMA31_ROPE,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "mla": None,
    "target_num_layers": None,
    "layout": "eagle3",
}

# speculators layout: decoder config nested, verifier described, flags on top.
SPECULATORS_LLAMA31_8B = {
    "architectures": ["Eagle3Speculator"],
    "speculators_model_type": "eagle3",
    "speculators_version": "0.1.0",
    "draft_vocab_size": 32000,
    "norm_before_residual": True,
    "target_hidden_size": None,
    "torch_dtype": "bfloat16",
    "tie_word_embeddings": True,  # PretrainedConfig default at top level; the layer's wins
    "transformer_layer_config": {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": 32,
        "num_hidden_layers": 1,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "rope_scaling": LLAMA31_ROPE,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": 128256,
        "norm_before_residual": False,  # top level wins for drafter flags
    },
    "speculators_config": {
        "algorithm": "eagle3",
        "default_proposal_method": "greedy",
        "proposal_methods": [
            {"proposal_type": "greedy", "speculative_tokens": 5, "verifier_accept_k": 1}
        ],
        "verifier": {
            "architectures": ["LlamaForCausalLM"],
            "name_or_path": "meta-llama/Llama-3.1-8B-Instruct",
        },
    },
}

EXPECTED_SPECULATORS_LLAMA31_8B = {
    **EXPECTED_EAGLE3_LLAMA31_8B,
    "norm_before_residual": True,
    "torch_dtype": "bfloat16",
    "layout": "speculators",
}

# Post-norm drafter (speculators, wider target): one RMSNorm per aux chunk.
POSTNORM_QWEN_STYLE = {
    "speculators_model_type": "eagle3",
    "draft_vocab_size": 64000,
    "target_hidden_size": 5120,
    "fc_norm": True,
    "norm_output": True,
    "norm_before_residual": False,
    "eagle_aux_hidden_state_layer_ids": [44, 1, 23],  # stored ascending
    "num_aux_hidden_states": 3,
    "torch_dtype": "bfloat16",
    "transformer_layer_config": {
        "hidden_size": 4096,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "intermediate_size": 12288,
        "rms_norm_eps": 1e-06,
        "vocab_size": 151936,
        "max_position_embeddings": 40960,
        "rope_theta": 1000000.0,
        "hidden_act": "silu",
        "attention_bias": True,
        "num_hidden_layers": 2,
    },
    "speculators_config": {
        "algorithm": "eagle3",
        "verifier": {
            "architectures": ["Qwen3ForCausalLM"],
            "name_or_path": "Qwen/Qwen3-32B",
            "hidden_size": 5120,
            "num_hidden_layers": 64,
        },
    },
}

EXPECTED_POSTNORM = {
    "hidden_size": 4096,
    "target_hidden_size": 5120,
    "num_aux_hidden_states": 3,
    "aux_layer_ids": [1, 23, 44],
    "norm_before_fc": False,
    "fc_norm": True,
    "norm_output": True,
    "norm_before_residual": False,
    "rms_norm_eps": 1e-06,
    "vocab_size": 151936,
    "draft_vocab_size": 64000,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "intermediate_size": 12288,
    "num_hidden_layers": 2,
    "hidden_act": "silu",
    "attention_bias": True,
    "mlp_bias": False,
    "max_position_embeddings": 40960,
    "rope_theta": 1000000.0,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "mla": None,
    "target_num_layers": 64,
    "layout": "speculators",
}

# Nested eagle_config layout (e.g. ModelOpt export): flat config + eagle_config.
EAGLE_CONFIG_LAYOUT = {
    "architectures": ["LlamaForCausalLMEagle3"],
    "hidden_size": 2048,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 8192,
    "rms_norm_eps": 1e-05,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "num_hidden_layers": 1,
    "tie_word_embeddings": False,
    "norm_before_fc": False,  # eagle_config's value wins
    "eagle_config": {
        "eagle_aux_hidden_state_layer_ids": [1, 8, 13],
        "use_aux_hidden_state": True,
        "norm_before_fc": True,
    },
}

EXPECTED_EAGLE_CONFIG = {
    "hidden_size": 2048,
    "target_hidden_size": 2048,
    "num_aux_hidden_states": 3,
    "aux_layer_ids": [1, 8, 13],
    "norm_before_fc": True,
    "fc_norm": False,
    "norm_output": False,
    "norm_before_residual": False,
    "rms_norm_eps": 1e-05,
    "vocab_size": 128256,
    "draft_vocab_size": 128256,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "intermediate_size": 8192,
    "num_hidden_layers": 1,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "torch_dtype": None,
    "mla": None,
    "target_num_layers": None,
    "layout": "eagle_config",
}

# The smallest valid flat config, for rule and error tests.
MINIMAL = {
    "hidden_size": 256,
    "num_attention_heads": 4,
    "intermediate_size": 512,
    "vocab_size": 1000,
}


def write_config(folder: Path, cfg: dict, name: str = "config.json") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(cfg, indent=2))
    return path


def with_(base: dict, **changes) -> dict:
    """A deep copy of ``base`` with top-level keys changed (None values kept)."""
    out = copy.deepcopy(base)
    out.update(changes)
    return out


def without(base: dict, *keys: str) -> dict:
    out = copy.deepcopy(base)
    for k in keys:
        out.pop(k)
    return out


# ---------------------------------------------------------------------------
# Every field, each layout, from files
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        (EAGLE3_LLAMA31_8B, EXPECTED_EAGLE3_LLAMA31_8B),
        (SPECULATORS_LLAMA31_8B, EXPECTED_SPECULATORS_LLAMA31_8B),
        (POSTNORM_QWEN_STYLE, EXPECTED_POSTNORM),
        (EAGLE_CONFIG_LAYOUT, EXPECTED_EAGLE_CONFIG),
    ],
    ids=["eagle3", "speculators", "postnorm", "eagle_config"],
)
def test_every_field_from_config_file(tmp_path, raw, expected):
    path = write_config(tmp_path / "ckpt", raw)
    cfg = C.resolve(path)
    assert isinstance(cfg, C.DrafterConfig)
    assert cfg.to_dict() == expected
    # field names are exactly those expected (nothing silently added or lost)
    assert [f.name for f in dataclasses.fields(cfg)] == list(expected)
    json.dumps(cfg.to_dict())  # serialisable


def test_field_types(tmp_path):
    cfg = C.resolve(write_config(tmp_path, POSTNORM_QWEN_STYLE))
    assert cfg.aux_layer_ids == (1, 23, 44) and isinstance(cfg.aux_layer_ids, tuple)
    assert type(cfg.rms_norm_eps) is float and type(cfg.rope_theta) is float
    assert type(cfg.hidden_size) is int and type(cfg.fc_norm) is bool


def test_fc_in_features():
    assert C.resolve(POSTNORM_QWEN_STYLE).fc_in_features == 3 * 5120
    assert C.resolve(EAGLE3_LLAMA31_8B).fc_in_features == 3 * 4096
    assert C.resolve(with_(MINIMAL, num_aux_hidden_states=5)).fc_in_features == 5 * 256


# ---------------------------------------------------------------------------
# Input kinds
# ---------------------------------------------------------------------------


def test_path_forms_agree(tmp_path):
    path = write_config(tmp_path / "ckpt", EAGLE3_LLAMA31_8B)
    from_file_str = C.resolve(str(path))
    from_file_path = C.resolve(path)
    from_folder_str = C.resolve(str(path.parent))
    from_folder_path = C.resolve(path.parent)
    from_dict = C.resolve(EAGLE3_LLAMA31_8B)
    assert from_file_str == from_file_path == from_folder_str == from_folder_path == from_dict
    assert from_dict.to_dict() == EXPECTED_EAGLE3_LLAMA31_8B


def test_resolve_does_not_mutate_input():
    raw = copy.deepcopy(SPECULATORS_LLAMA31_8B)
    C.resolve(raw)
    assert raw == SPECULATORS_LLAMA31_8B


def test_namespace_object_with_nested_namespaces():
    ns = types.SimpleNamespace(
        **{k: v for k, v in EAGLE_CONFIG_LAYOUT.items() if k != "eagle_config"},
        eagle_config=types.SimpleNamespace(**EAGLE_CONFIG_LAYOUT["eagle_config"]),
    )
    assert C.resolve(ns).to_dict() == EXPECTED_EAGLE_CONFIG


class _PretrainedLike:
    """Mimics transformers.PretrainedConfig: attributes plus to_dict()."""

    def __init__(self, d):
        self._d = copy.deepcopy(d)
        self.hidden_size = -1  # to_dict() is what is read, not vars()

    def to_dict(self):
        return copy.deepcopy(self._d)


class _NestedConfig:
    def __init__(self, d):
        self._d = d

    def to_dict(self):
        return dict(self._d)


def test_object_with_to_dict_and_nested_config_objects():
    d = copy.deepcopy(SPECULATORS_LLAMA31_8B)
    d["transformer_layer_config"] = _NestedConfig(d["transformer_layer_config"])
    assert C.resolve(_PretrainedLike(d)).to_dict() == EXPECTED_SPECULATORS_LLAMA31_8B


def test_plain_object_read_through_vars():
    class Plain:
        pass

    obj = Plain()
    obj.__dict__.update(copy.deepcopy(MINIMAL))
    obj.draft_vocab_size = 500
    cfg = C.resolve(obj)
    assert (cfg.hidden_size, cfg.draft_vocab_size, cfg.head_dim) == (256, 500, 64)


def test_dtype_object_spelling_normalised():
    class FakeDtype:
        def __str__(self):
            return "torch.bfloat16"

    assert C.resolve(with_(MINIMAL, torch_dtype=FakeDtype())).torch_dtype == "bfloat16"
    assert C.resolve(with_(MINIMAL, dtype="float16")).torch_dtype == "float16"


def test_drafter_config_returned_unchanged():
    cfg = C.resolve(EAGLE3_LLAMA31_8B)
    assert C.resolve(cfg) is cfg


def test_drafter_config_rechecked_against_new_target():
    cfg = C.resolve(EAGLE3_LLAMA31_8B)
    again = C.resolve(cfg, target_num_layers=32)
    assert again.aux_layer_ids == (2, 16, 29) and again.target_num_layers == 32
    named = C.resolve(with_(MINIMAL, eagle_aux_hidden_state_layer_ids=[2, 10, 40]))
    with pytest.raises(ValueError, match="below target_num_layers=32"):
        C.resolve(named, target_num_layers=32)


@pytest.mark.parametrize("bad", [42, 3.5, None, [1, 2], (1,), b"config.json"])
def test_unsupported_type_is_type_error(bad):
    with pytest.raises(TypeError, match="cannot resolve a drafter config"):
        C.resolve(bad)


# ---------------------------------------------------------------------------
# Layout-specific precedence
# ---------------------------------------------------------------------------


def test_speculators_flags_top_level_wins_decoder_fields_layer_wins():
    cfg = C.resolve(SPECULATORS_LLAMA31_8B)
    assert cfg.norm_before_residual is True  # top True beats layer False
    assert cfg.tie_word_embeddings is False  # layer False beats top True
    raw = copy.deepcopy(SPECULATORS_LLAMA31_8B)
    raw["hidden_size"] = 999  # top-level decoder field loses to the layer config
    raw["transformer_layer_config"]["draft_vocab_size"] = 7  # loses to top-level flag
    cfg = C.resolve(raw)
    assert cfg.hidden_size == 4096 and cfg.draft_vocab_size == 32000


def test_speculators_falls_back_to_top_level():
    raw = copy.deepcopy(SPECULATORS_LLAMA31_8B)
    del raw["transformer_layer_config"]["intermediate_size"]
    raw["intermediate_size"] = 11008
    del raw["norm_before_residual"]
    assert C.resolve(raw).intermediate_size == 11008
    assert C.resolve(raw).norm_before_residual is False  # from the layer config now
    raw["transformer_layer_config"]["norm_before_residual"] = True
    assert C.resolve(raw).norm_before_residual is True


def test_speculators_missing_hidden_size_anywhere():
    raw = copy.deepcopy(SPECULATORS_LLAMA31_8B)
    del raw["transformer_layer_config"]["hidden_size"]
    with pytest.raises(ValueError, match="hidden_size"):
        C.resolve(raw)
    raw["hidden_size"] = 4096
    assert C.resolve(raw).hidden_size == 4096


def test_norm_before_fc_eagle_config_wins_over_top_level():
    assert C.resolve(EAGLE_CONFIG_LAYOUT).norm_before_fc is True
    raw = copy.deepcopy(EAGLE_CONFIG_LAYOUT)
    raw["norm_before_fc"] = True
    raw["eagle_config"]["norm_before_fc"] = False
    assert C.resolve(raw).norm_before_fc is False
    del raw["eagle_config"]["norm_before_fc"]
    assert C.resolve(raw).norm_before_fc is True  # falls back to the top level
    assert C.resolve(MINIMAL).norm_before_fc is False


def test_layout_detection():
    assert C.resolve(MINIMAL).layout == "eagle3"
    assert C.resolve(with_(MINIMAL, eagle_config={"norm_before_fc": True})).layout == "eagle_config"
    assert C.resolve(with_(MINIMAL, eagle_config=None)).layout == "eagle3"
    assert C.resolve({"transformer_layer_config": MINIMAL}).layout == "speculators"


# ---------------------------------------------------------------------------
# Aux layer ids and count
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("L", [32, 36, 64, 80, 7])
def test_default_ids(L):
    cfg = C.resolve(MINIMAL, target_num_layers=L)
    assert cfg.aux_layer_ids == (2, L // 2, L - 3)
    assert cfg.num_aux_hidden_states == 3 and cfg.target_num_layers == L


def test_default_ids_concrete_values():
    assert C.resolve(MINIMAL, target_num_layers=32).aux_layer_ids == (2, 16, 29)
    assert C.resolve(MINIMAL, target_num_layers=80).aux_layer_ids == (2, 40, 77)


def test_default_ids_need_enough_layers():
    with pytest.raises(ValueError, match="target_num_layers=6 is too small"):
        C.resolve(MINIMAL, target_num_layers=6)


def test_no_ids_without_target():
    cfg = C.resolve(MINIMAL)
    assert cfg.aux_layer_ids is None and cfg.num_aux_hidden_states == 3
    assert cfg.target_num_layers is None


def test_target_layers_from_verifier_and_argument_wins():
    raw = copy.deepcopy(SPECULATORS_LLAMA31_8B)
    raw["speculators_config"]["verifier"]["num_hidden_layers"] = 32
    assert C.resolve(raw).aux_layer_ids == (2, 16, 29)
    assert C.resolve(raw).target_num_layers == 32
    assert C.resolve(raw, target_num_layers=80).aux_layer_ids == (2, 40, 77)


def test_named_ids_beat_default():
    raw = with_(MINIMAL, eagle_aux_hidden_state_layer_ids=[1, 5, 9])
    assert C.resolve(raw, target_num_layers=32).aux_layer_ids == (1, 5, 9)


@pytest.mark.parametrize("empty", [[], None])
def test_empty_early_source_does_not_override_later(empty):
    raw = with_(
        MINIMAL,
        eagle_aux_hidden_state_layer_ids=empty,
        eagle_config={"eagle_aux_hidden_state_layer_ids": [3, 7, 11]},
    )
    assert C.resolve(raw).aux_layer_ids == (3, 7, 11)
    raw = with_(
        MINIMAL,
        eagle_aux_hidden_state_layer_ids=empty,
        eagle_config={"eagle_aux_hidden_state_layer_ids": empty},
        dflash_config={"target_layer_ids": [1, 15, 28]},
    )
    assert C.resolve(raw).aux_layer_ids == (2, 16, 29)
    raw = with_(MINIMAL, eagle_aux_hidden_state_layer_ids=empty)
    assert C.resolve(raw, target_num_layers=32).aux_layer_ids == (2, 16, 29)


@pytest.mark.parametrize("empty", [[], None])
def test_empty_later_source_does_not_override_earlier(empty):
    raw = with_(
        MINIMAL,
        eagle_aux_hidden_state_layer_ids=[3, 7, 11],
        eagle_config={"eagle_aux_hidden_state_layer_ids": empty},
        dflash_config={"target_layer_ids": empty},
    )
    assert C.resolve(raw, target_num_layers=32).aux_layer_ids == (3, 7, 11)


def test_source_order_top_then_eagle_config_then_dflash():
    raw = with_(
        MINIMAL,
        eagle_aux_hidden_state_layer_ids=[1, 2, 3],
        eagle_config={"eagle_aux_hidden_state_layer_ids": [4, 5, 6]},
        dflash_config={"target_layer_ids": [7, 8, 9]},
    )
    assert C.resolve(raw).aux_layer_ids == (1, 2, 3)
    del raw["eagle_aux_hidden_state_layer_ids"]
    assert C.resolve(raw).aux_layer_ids == (4, 5, 6)
    del raw["eagle_config"]
    assert C.resolve(raw).aux_layer_ids == (8, 9, 10)


def test_dflash_ids_shifted_by_one():
    raw = with_(MINIMAL, dflash_config={"target_layer_ids": [1, 9, 17, 25, 33]})
    cfg = C.resolve(raw, target_num_layers=36)
    assert cfg.aux_layer_ids == (2, 10, 18, 26, 34)
    assert cfg.num_aux_hidden_states == 5


def test_num_aux_from_ids_length_and_top_level():
    cfg = C.resolve(with_(MINIMAL, eagle_aux_hidden_state_layer_ids=[1, 5]))
    assert cfg.num_aux_hidden_states == 2 and cfg.fc_in_features == 512
    assert C.resolve(with_(MINIMAL, num_aux_hidden_states=4)).num_aux_hidden_states == 4
    agree = with_(MINIMAL, num_aux_hidden_states=2, eagle_aux_hidden_state_layer_ids=[5, 1])
    assert C.resolve(agree).aux_layer_ids == (1, 5)


def test_count_mismatch_names_both_numbers():
    raw = with_(MINIMAL, num_aux_hidden_states=4, eagle_aux_hidden_state_layer_ids=[2, 16, 29])
    with pytest.raises(
        ValueError, match=r"num_aux_hidden_states=4 but aux layer ids \(2, 16, 29\) name 3 layers"
    ):
        C.resolve(raw)


def test_count_mismatch_with_eagle_config_ids():
    raw = with_(
        MINIMAL,
        num_aux_hidden_states=2,
        eagle_config={"eagle_aux_hidden_state_layer_ids": [1, 2, 3]},
    )
    with pytest.raises(ValueError, match=r"num_aux_hidden_states=2 .* name 3 layers"):
        C.resolve(raw)


def test_count_mismatch_with_default_ids():
    with pytest.raises(ValueError, match=r"num_aux_hidden_states=4 .* name 3 layers"):
        C.resolve(with_(MINIMAL, num_aux_hidden_states=4), target_num_layers=32)


# ---------------------------------------------------------------------------
# fc norms
# ---------------------------------------------------------------------------


def test_norm_before_fc_and_fc_norm_mutually_exclusive():
    with pytest.raises(ValueError, match="norm_before_fc and fc_norm are mutually exclusive"):
        C.resolve(with_(MINIMAL, norm_before_fc=True, fc_norm=True))
    raw = copy.deepcopy(EAGLE_CONFIG_LAYOUT)
    raw["fc_norm"] = True  # eagle_config's norm_before_fc=True + top-level fc_norm
    with pytest.raises(ValueError, match="mutually exclusive"):
        C.resolve(raw)
    raw["eagle_config"]["norm_before_fc"] = False  # top-level False loses, so fine
    assert C.resolve(raw).fc_norm is True


def test_use_aux_hidden_state_false_rejected():
    raw = copy.deepcopy(EAGLE_CONFIG_LAYOUT)
    raw["eagle_config"]["use_aux_hidden_state"] = False
    with pytest.raises(ValueError, match="use_aux_hidden_state"):
        C.resolve(raw)


# ---------------------------------------------------------------------------
# Rope spellings
# ---------------------------------------------------------------------------


def test_rope_scaling_type_alias():
    raw = with_(MINIMAL, rope_scaling={"type": "linear", "factor": 2.0})
    assert C.resolve(raw).rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_rope_parameters_spelling():
    params = dict(LLAMA31_ROPE, rope_theta=500000.0)
    cfg = C.resolve(with_(MINIMAL, rope_parameters=params))
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == LLAMA31_ROPE  # rope_theta moved out
    old = C.resolve(with_(MINIMAL, rope_scaling=LLAMA31_ROPE, rope_theta=500000.0))
    assert old == cfg


def test_rope_default_type_alone_becomes_none():
    cfg = C.resolve(with_(MINIMAL, rope_parameters={"rope_type": "default", "rope_theta": 1e6}))
    assert cfg.rope_scaling is None and cfg.rope_theta == 1e6
    assert C.resolve(with_(MINIMAL, rope_scaling={"type": "default"})).rope_scaling is None
    assert C.resolve(with_(MINIMAL, rope_scaling={})).rope_scaling is None
    kept = C.resolve(with_(MINIMAL, rope_scaling={"rope_type": "default", "factor": 1.0}))
    assert kept.rope_scaling == {"rope_type": "default", "factor": 1.0}


def test_rope_defaults():
    cfg = C.resolve(MINIMAL)
    assert cfg.rope_theta == 10000.0 and cfg.rope_scaling is None


def test_rope_conflicts_rejected():
    with pytest.raises(ValueError, match="rope_theta"):
        C.resolve(with_(MINIMAL, rope_theta=1e4, rope_parameters={"rope_theta": 5e5}))
    with pytest.raises(ValueError, match="rope_type"):
        C.resolve(with_(MINIMAL, rope_scaling={"type": "linear", "rope_type": "dynamic"}))
    with pytest.raises(ValueError, match="rope_scaling must be a dict"):
        C.resolve(with_(MINIMAL, rope_scaling="linear"))


# ---------------------------------------------------------------------------
# Defaults
# ---------------------------------------------------------------------------


def test_defaults_from_minimal_config():
    cfg = C.resolve(MINIMAL)
    assert cfg.target_hidden_size == 256
    assert cfg.draft_vocab_size == 1000
    assert cfg.num_key_value_heads == 4
    assert cfg.head_dim == 64
    assert cfg.num_hidden_layers == 1
    assert cfg.hidden_act == "silu"
    assert (cfg.attention_bias, cfg.mlp_bias, cfg.tie_word_embeddings) == (False, False, False)
    assert (cfg.fc_norm, cfg.norm_output, cfg.norm_before_residual) == (False, False, False)
    assert cfg.max_position_embeddings is None and cfg.torch_dtype is None
    assert cfg.layout == "eagle3"


def test_explicit_head_dim_allows_indivisible_hidden():
    cfg = C.resolve(with_(MINIMAL, hidden_size=2880, num_attention_heads=64, head_dim=64))
    assert cfg.head_dim == 64


# ---------------------------------------------------------------------------
# Validation errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, match",
    [
        (without(MINIMAL, "hidden_size"), "no hidden_size"),
        (without(MINIMAL, "num_attention_heads"), "no num_attention_heads"),
        (without(MINIMAL, "intermediate_size"), "no intermediate_size"),
        (without(MINIMAL, "vocab_size"), "no vocab_size"),
        (with_(MINIMAL, hidden_size=0), r"hidden_size must be a positive integer, got 0"),
        (with_(MINIMAL, hidden_size=-256), r"hidden_size must be a positive integer, got -256"),
        (with_(MINIMAL, hidden_size="256"), r"hidden_size must be an integer, got '256'"),
        (with_(MINIMAL, hidden_size=True), r"hidden_size must be an integer"),
        (with_(MINIMAL, intermediate_size=-1), r"intermediate_size must be a positive integer"),
        (with_(MINIMAL, vocab_size=0), r"vocab_size must be a positive integer"),
        (with_(MINIMAL, target_hidden_size=0), r"target_hidden_size must be a positive integer"),
        (with_(MINIMAL, num_attention_heads=0), r"num_attention_heads must be a positive integer"),
        (with_(MINIMAL, num_key_value_heads=0), r"num_key_value_heads must be a positive integer"),
        (with_(MINIMAL, head_dim=-64), r"head_dim must be a positive integer"),
        (with_(MINIMAL, num_hidden_layers=0), r"num_hidden_layers must be a positive integer"),
        (with_(MINIMAL, num_aux_hidden_states=0), r"num_aux_hidden_states must be a positive"),
        (with_(MINIMAL, max_position_embeddings=0), r"max_position_embeddings must be a positive"),
        (with_(MINIMAL, draft_vocab_size=0), r"draft_vocab_size must be a positive integer"),
        (
            with_(MINIMAL, hidden_size=250),
            r"hidden_size=250 is not divisible by num_attention_heads=4",
        ),
        (
            with_(MINIMAL, num_attention_heads=4, num_key_value_heads=3),
            r"num_attention_heads=4 must be a multiple of num_key_value_heads=3",
        ),
        (with_(MINIMAL, rms_norm_eps=0.0), r"rms_norm_eps must be a finite number > 0, got 0.0"),
        (with_(MINIMAL, rms_norm_eps=-1e-6), r"rms_norm_eps must be .*> 0"),
        (with_(MINIMAL, rms_norm_eps=math.nan), r"rms_norm_eps must be .*nan"),
        (with_(MINIMAL, rms_norm_eps="1e-6"), r"rms_norm_eps must be a number"),
        (
            with_(MINIMAL, draft_vocab_size=1001),
            r"draft_vocab_size=1001 must not exceed vocab_size=1000",
        ),
        (with_(MINIMAL, eagle_aux_hidden_state_layer_ids=[-1, 5, 9]), r"must be >= 0.*-1"),
        (
            with_(MINIMAL, eagle_aux_hidden_state_layer_ids=[2, 16, 16]),
            r"must be distinct.*repeated: \[16\]",
        ),
        (with_(MINIMAL, eagle_aux_hidden_state_layer_ids=7), r"must be a list of layer ids"),
        (with_(MINIMAL, eagle_aux_hidden_state_layer_ids=["a"]), r"must be an integer"),
        (with_(MINIMAL, fc_norm="yes"), r"fc_norm must be true or false"),
        (with_(MINIMAL, eagle_config=[1, 2]), r"eagle_config must be a dict"),
        (with_(MINIMAL, speculators_model_type="eagle"), r"speculators_model_type must be 'eagle3'"),
        ({"transformer_layer_config": 5}, r"transformer_layer_config must be a dict"),
        (with_(MINIMAL, hidden_act=""), r"hidden_act must be a non-empty string"),
    ],
    ids=lambda x: None if isinstance(x, dict) else x[:40],
)
def test_validation_errors(raw, match):
    with pytest.raises(ValueError, match=match):
        C.resolve(raw)


@pytest.mark.parametrize(
    "ids, L",
    [([2, 16, 32], 32), ([2, 16, 40], 32), ([0, 1, 5], 5)],
)
def test_ids_must_be_below_target_layers(ids, L):
    raw = with_(MINIMAL, eagle_aux_hidden_state_layer_ids=ids)
    with pytest.raises(ValueError, match=rf"below target_num_layers={L}"):
        C.resolve(raw, target_num_layers=L)
    C.resolve(raw)  # fine while L is unknown


def test_ids_below_verifier_layers():
    raw = copy.deepcopy(SPECULATORS_LLAMA31_8B)
    raw["speculators_config"]["verifier"]["num_hidden_layers"] = 32
    raw["eagle_aux_hidden_state_layer_ids"] = [2, 16, 31]
    assert C.resolve(raw).aux_layer_ids == (2, 16, 31)
    raw["eagle_aux_hidden_state_layer_ids"] = [2, 16, 32]
    with pytest.raises(ValueError, match="below target_num_layers=32"):
        C.resolve(raw)


@pytest.mark.parametrize("L", [0, -3])
def test_non_positive_target_layers(L):
    with pytest.raises(ValueError, match="target_num_layers"):
        C.resolve(with_(MINIMAL, eagle_aux_hidden_state_layer_ids=[0, 1, 2]), target_num_layers=L)


def test_missing_path(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        C.resolve(tmp_path / "nope" / "config.json")
    with pytest.raises(ValueError, match="does not exist"):
        C.resolve(str(tmp_path / "nope"))


def test_folder_without_config_json(tmp_path):
    write_config(tmp_path / "ckpt", MINIMAL, name="params.json")
    with pytest.raises(ValueError, match="has no config.json"):
        C.resolve(tmp_path / "ckpt")


def test_bad_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"hidden_size": 256,')
    with pytest.raises(ValueError, match="not valid JSON"):
        C.resolve(path)
    path.write_text("[1, 2, 3]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        C.resolve(path)


def test_nan_eps_in_json_file(tmp_path):
    path = write_config(tmp_path, with_(MINIMAL, rms_norm_eps=math.nan))  # json writes NaN
    with pytest.raises(ValueError, match="rms_norm_eps"):
        C.resolve(path)


# ---------------------------------------------------------------------------
# DrafterConfig itself
# ---------------------------------------------------------------------------


def test_immutable():
    cfg = C.resolve(POSTNORM_QWEN_STYLE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hidden_size = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.aux_layer_ids = (1, 2, 3)
    with pytest.raises((AttributeError, TypeError)):
        cfg.new_field = 1  # slots: no instance __dict__
    assert not hasattr(cfg, "__dict__")
    assert cfg.hidden_size == 4096 and cfg.aux_layer_ids == (1, 23, 44)


def test_hashable_and_comparable():
    a = C.resolve(EAGLE3_LLAMA31_8B)
    b = C.resolve(copy.deepcopy(EAGLE3_LLAMA31_8B))
    assert a == b and hash(a) == hash(b)
    assert a != C.resolve(with_(EAGLE3_LLAMA31_8B, draft_vocab_size=16000))


def test_direct_construction_is_validated():
    kwargs = dict(
        hidden_size=256,
        target_hidden_size=256,
        vocab_size=1000,
        draft_vocab_size=1000,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=64,
        intermediate_size=512,
        aux_layer_ids=[9, 1, 5],
    )
    cfg = C.DrafterConfig(**kwargs)
    assert cfg.aux_layer_ids == (1, 5, 9) and cfg.num_aux_hidden_states == 3
    with pytest.raises(ValueError, match="mutually exclusive"):
        C.DrafterConfig(**kwargs, fc_norm=True, norm_before_fc=True)
    with pytest.raises(ValueError, match=r"num_aux_hidden_states=2 .* name 3 layers"):
        C.DrafterConfig(**kwargs, num_aux_hidden_states=2)
    with pytest.raises(ValueError, match="layout must be one of"):
        C.DrafterConfig(**kwargs, layout="medusa")


# ---------------------------------------------------------------------------
# validate_fc_width
# ---------------------------------------------------------------------------


def test_validate_fc_width_accepts_matching_width():
    assert C.validate_fc_width(POSTNORM_QWEN_STYLE, 15360) is None
    assert C.validate_fc_width(C.resolve(EAGLE3_LLAMA31_8B), 12288) is None


def test_validate_fc_width_names_both_numbers():
    cfg = C.resolve(EAGLE3_LLAMA31_8B)
    with pytest.raises(ValueError, match=r"16384 input features.*=3 \*.*=4096 = 12288") as e:
        C.validate_fc_width(cfg, 16384)
    assert "implies 4 aux hidden states" in str(e.value)
    with pytest.raises(ValueError, match=r"12288 input features.*15360"):
        C.validate_fc_width(POSTNORM_QWEN_STYLE, 12288)
