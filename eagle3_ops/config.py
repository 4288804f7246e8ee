"""Resolve and validate an EAGLE-3 drafter config (DESIGN.md section 1).

``resolve(cfg)`` turns any of the config layouts below into one immutable,
validated :class:`DrafterConfig`. This module imports only the standard
library, so it works before torch or the compiled extension are available.

Layouts read
------------

``"eagle3"`` -- the original EAGLE-3 layout: a flat Llama config describing
the drafter's decoder layer(s), plus drafter fields at the top level::

    {"architectures": ["LlamaForCausalLMEagle3"], "hidden_size": 4096,
     "num_attention_heads": 32, "num_key_value_heads": 8,
     "intermediate_size": 14336, "rms_norm_eps": 1e-05, "vocab_size": 128256,
     "draft_vocab_size": 32000, "rope_theta": 500000.0, "rope_scaling": {...},
     "max_position_embeddings": 131072, "num_hidden_layers": 1,
     "target_hidden_size": 4096,                  # optional
     "eagle_aux_hidden_state_layer_ids": [...]}   # optional

``"speculators"`` -- the vLLM ``speculators`` layout: the decoder layer's Llama
config is nested under ``transformer_layer_config``, the verifier (target) is
described under ``speculators_config``, and the drafter flags sit at the top::

    {"speculators_model_type": "eagle3", "draft_vocab_size": 32000,
     "norm_before_residual": true, "target_hidden_size": null,
     "transformer_layer_config": {"hidden_size": 4096, "vocab_size": 128256, ...},
     "speculators_config": {"algorithm": "eagle3",
                            "verifier": {"architectures": ["LlamaForCausalLM"],
                                         "name_or_path": "...",
                                         "num_hidden_layers": 32}}}  # optional

  Drafter flags (:data:`DRAFTER_FLAG_KEYS`) are read from the top level first,
  then from ``transformer_layer_config``; decoder fields are read from
  ``transformer_layer_config`` first, then from the top level.

``"eagle_config"`` -- a flat config (as in ``"eagle3"``) carrying a nested
``eagle_config`` dict, e.g. ModelOpt exports::

    {..., "eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 17, 30],
                           "use_aux_hidden_state": true,
                           "norm_before_fc": true}}

Any layout may also carry ``dflash_config: {"target_layer_ids": [...]}``; those
ids name layers whose *output* is captured, so they are shifted by +1 to name
the layer whose *input* (the residual stream entering it) is captured.

Resolution rules (DESIGN.md section 1, one helper below per rule):

* aux layer ids: top-level ``eagle_aux_hidden_state_layer_ids``, else
  ``eagle_config["eagle_aux_hidden_state_layer_ids"]``, else
  ``dflash_config["target_layer_ids"]`` + 1, else ``(2, L//2, L-3)`` for a
  target with L layers (the ``target_num_layers`` argument, else the
  speculators verifier's ``num_hidden_layers``), else None. A source that is
  present but empty or None is skipped. Ids are stored ascending: engines
  capture aux states in layer order, whatever order the config lists them in.
* ``num_aux_hidden_states``: top level, else the number of aux ids, else 3;
  a count that disagrees with the ids is an error naming both numbers.
* ``norm_before_fc``: the ``eagle_config`` value wins over the top level.
* ``norm_before_fc`` and ``fc_norm`` are mutually exclusive.
* ``target_hidden_size`` defaults to ``hidden_size``, ``draft_vocab_size`` to
  ``vocab_size``, ``num_key_value_heads`` to ``num_attention_heads``,
  ``head_dim`` to ``hidden_size // num_attention_heads``.

Multi-head latent attention (DeepSeek-V2/V3-family drafters, e.g. Kimi-K2's): a decoder
config naming ``kv_lora_rank`` resolves ``mla`` (:class:`MLAConfig`) from
``q_lora_rank`` (null: a plain q_proj), ``kv_lora_rank``, ``qk_nope_head_dim``,
``qk_rope_head_dim``, ``v_head_dim`` (all required) and ``rope_interleave`` (default
true); ``head_dim`` then defaults to ``qk_rope_head_dim`` and ``num_key_value_heads`` is
``num_attention_heads`` (whatever the config says: every head reads the one latent). MoE
fields are ignored (the drafter's MLP is dense, ``intermediate_size``). MLA sizes without ``kv_lora_rank`` are an
error.

Required everywhere: ``hidden_size``, ``num_attention_heads``,
``intermediate_size``, ``vocab_size``. Every invalid value raises
``ValueError`` naming the field and what was expected; an unsupported ``cfg``
type raises ``TypeError``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DRAFTER_FLAG_KEYS",
    "LAYOUTS",
    "DrafterConfig",
    "MLAConfig",
    "default_aux_layer_ids",
    "resolve",
    "validate_fc_width",
]

LAYOUTS = ("eagle3", "speculators", "eagle_config")

#: Keys that, in the speculators layout, are read from the top level before
#: ``transformer_layer_config`` (all other fields are read the other way round).
DRAFTER_FLAG_KEYS = (
    "draft_vocab_size",
    "norm_before_residual",
    "target_hidden_size",
    "fc_norm",
    "norm_output",
    "norm_before_fc",
    "eagle_aux_hidden_state_layer_ids",
    "num_aux_hidden_states",
    "eagle_config",
    "dflash_config",
)

_DEFAULT_NUM_AUX = 3
_DEFAULT_RMS_NORM_EPS = 1e-6  # transformers.LlamaConfig default
_DEFAULT_ROPE_THETA = 10000.0
_POSITIVE_INT_FIELDS = (
    "hidden_size",
    "target_hidden_size",
    "num_aux_hidden_states",
    "vocab_size",
    "draft_vocab_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "num_hidden_layers",
)
_OPTIONAL_POSITIVE_INT_FIELDS = ("max_position_embeddings", "target_num_layers")
_BOOL_FIELDS = (
    "norm_before_fc",
    "fc_norm",
    "norm_output",
    "norm_before_residual",
    "attention_bias",
    "mlp_bias",
    "tie_word_embeddings",
)


# --------------------------------------------------------------------------
# The resolved config
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2/V3 family) of the drafter's decoder layers.

    ``q_lora_rank`` None means a plain ``q_proj``; otherwise queries go through
    ``q_a_proj`` (to the rank) -> ``q_a_layernorm`` -> ``q_b_proj``. Keys and values come
    from one latent of width ``kv_lora_rank`` (``kv_a_proj_with_mqa`` also yields the
    ``qk_rope_head_dim`` shared rotary key), normalised by ``kv_a_layernorm`` and expanded
    by ``kv_b_proj`` to ``qk_nope_head_dim + v_head_dim`` per head. ``rope_interleave``:
    the rotary pairs are adjacent dims (DeepSeek's layout, the default) rather than the two
    halves.
    """

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_interleave: bool = True

    def __post_init__(self) -> None:
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.q_lora_rank is not None and (not _is_int(self.q_lora_rank) or self.q_lora_rank <= 0):
            raise ValueError(
                f"q_lora_rank must be a positive integer or null (a plain q_proj), got {self.q_lora_rank!r}"
            )
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even (rotary pairs), got {self.qk_rope_head_dim}")
        if not isinstance(self.rope_interleave, bool):
            raise ValueError(f"rope_interleave must be true or false, got {self.rope_interleave!r}")

    @property
    def qk_head_dim(self) -> int:
        """Query / key width per head: ``qk_nope_head_dim + qk_rope_head_dim``."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True, slots=True, kw_only=True)
class DrafterConfig:
    """Everything a drafter module or loader needs, resolved and validated.

    Construction (directly or through :func:`resolve`) validates every field;
    instances are immutable. ``aux_layer_ids`` may be given as any sequence
    and is stored as an ascending tuple; ``rope_scaling`` is stored as a copy
    (it is excluded from ``hash``).
    """

    # fc input: K aux hidden states of width target_hidden_size
    hidden_size: int
    target_hidden_size: int
    num_aux_hidden_states: int = _DEFAULT_NUM_AUX
    aux_layer_ids: tuple[int, ...] | None = None
    norm_before_fc: bool = False
    fc_norm: bool = False
    norm_output: bool = False
    norm_before_residual: bool = False
    rms_norm_eps: float = _DEFAULT_RMS_NORM_EPS
    # vocabularies
    vocab_size: int
    draft_vocab_size: int
    # decoder layer(s)
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    num_hidden_layers: int = 1
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    max_position_embeddings: int | None = None
    rope_theta: float = _DEFAULT_ROPE_THETA
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False)
    tie_word_embeddings: bool = False
    torch_dtype: str | None = None
    #: multi-head latent attention (DeepSeek-family drafters); None for Llama attention
    mla: MLAConfig | None = None
    # provenance
    target_num_layers: int | None = None
    layout: str = "eagle3"

    def __post_init__(self) -> None:
        if self.aux_layer_ids is not None and not isinstance(self.aux_layer_ids, (str, bytes)):
            try:
                ids = tuple(sorted(self.aux_layer_ids))
            except TypeError:
                ids = self.aux_layer_ids  # let _check_aux_ids name the problem
            object.__setattr__(self, "aux_layer_ids", ids)
        if isinstance(self.rope_scaling, Mapping):
            object.__setattr__(self, "rope_scaling", dict(self.rope_scaling))
        for check in _CHECKS:
            check(self)

    @property
    def fc_in_features(self) -> int:
        """Input width of ``fc``: ``num_aux_hidden_states * target_hidden_size``."""
        return self.num_aux_hidden_states * self.target_hidden_size

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field (ids as a list)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if out["aux_layer_ids"] is not None:
            out["aux_layer_ids"] = list(out["aux_layer_ids"])
        if out["rope_scaling"] is not None:
            out["rope_scaling"] = dict(out["rope_scaling"])
        if out["mla"] is not None:
            out["mla"] = self.mla.to_dict()
        return out


# --- checks run on every DrafterConfig, one per rule ---


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_sizes(c: DrafterConfig) -> None:
    for name in _POSITIVE_INT_FIELDS:
        value = getattr(c, name)
        if not _is_int(value) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    for name in _OPTIONAL_POSITIVE_INT_FIELDS:
        value = getattr(c, name)
        if value is not None and (not _is_int(value) or value <= 0):
            raise ValueError(f"{name} must be a positive integer or None, got {value!r}")


def _check_flags(c: DrafterConfig) -> None:
    for name in _BOOL_FIELDS:
        value = getattr(c, name)
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")


def _check_heads(c: DrafterConfig) -> None:
    if c.num_attention_heads % c.num_key_value_heads != 0:
        raise ValueError(
            f"num_attention_heads={c.num_attention_heads} must be a multiple of "
            f"num_key_value_heads={c.num_key_value_heads}"
        )


def _check_eps(c: DrafterConfig) -> None:
    eps = c.rms_norm_eps
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not (eps > 0) or math.isinf(eps):
        raise ValueError(f"rms_norm_eps must be a finite number > 0, got {eps!r}")


def _check_vocab(c: DrafterConfig) -> None:
    if c.draft_vocab_size > c.vocab_size:
        raise ValueError(
            f"draft_vocab_size={c.draft_vocab_size} must not exceed vocab_size={c.vocab_size}"
        )


def _check_aux_ids(c: DrafterConfig) -> None:
    ids = c.aux_layer_ids
    if ids is None:
        return
    if not isinstance(ids, tuple) or not ids or not all(_is_int(i) for i in ids):
        raise ValueError(f"aux_layer_ids must be a non-empty sequence of integers, got {ids!r}")
    negative = [i for i in ids if i < 0]
    if negative:
        raise ValueError(f"aux layer ids must be >= 0, got {ids} (negative: {negative})")
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"aux layer ids must be distinct, got {ids} (repeated: {duplicates})")
    L = c.target_num_layers
    if L is not None and ids[-1] >= L:
        raise ValueError(
            f"aux layer ids must be below target_num_layers={L}, got {ids}"
        )


def _check_aux_count(c: DrafterConfig) -> None:
    ids = c.aux_layer_ids
    if ids is not None and len(ids) != c.num_aux_hidden_states:
        raise ValueError(
            f"num_aux_hidden_states={c.num_aux_hidden_states} but aux layer ids "
            f"{ids} name {len(ids)} layers"
        )


def _check_fc_norms(c: DrafterConfig) -> None:
    if c.norm_before_fc and c.fc_norm:
        raise ValueError(
            "norm_before_fc and fc_norm are mutually exclusive (one RMSNorm over "
            "the whole concatenated row vs one RMSNorm per aux chunk); set only one"
        )


def _check_rope(c: DrafterConfig) -> None:
    if not isinstance(c.rope_theta, (int, float)) or isinstance(c.rope_theta, bool) or not (
        c.rope_theta > 0
    ):
        raise ValueError(f"rope_theta must be a number > 0, got {c.rope_theta!r}")
    if c.rope_scaling is not None and not isinstance(c.rope_scaling, dict):
        raise ValueError(f"rope_scaling must be a dict or None, got {c.rope_scaling!r}")


def _check_mla(c: DrafterConfig) -> None:
    if c.mla is not None and not isinstance(c.mla, MLAConfig):
        raise ValueError(f"mla must be an MLAConfig or None, got {c.mla!r}")


def _check_strings(c: DrafterConfig) -> None:
    if not isinstance(c.hidden_act, str) or not c.hidden_act:
        raise ValueError(f"hidden_act must be a non-empty string, got {c.hidden_act!r}")
    if c.torch_dtype is not None and not isinstance(c.torch_dtype, str):
        raise ValueError(f"torch_dtype must be a string or None, got {c.torch_dtype!r}")
    if c.layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {c.layout!r}")


_CHECKS = (
    _check_sizes,
    _check_flags,
    _check_heads,
    _check_eps,
    _check_vocab,
    _check_aux_ids,
    _check_aux_count,
    _check_fc_norms,
    _check_rope,
    _check_mla,
    _check_strings,
)


# --------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------


def resolve(cfg: Any, target_num_layers: int | None = None) -> DrafterConfig:
    """Resolve ``cfg`` into a validated :class:`DrafterConfig`.

    ``cfg`` may be a dict (any Mapping); a path (``str`` or ``os.PathLike``)
    to a ``config.json`` or to a checkpoint folder holding one; an object with
    attributes (read through its ``to_dict()`` if it has one, else ``vars()``,
    e.g. a ``transformers.PretrainedConfig`` or a ``SimpleNamespace``); or a
    ``DrafterConfig``, returned unchanged (when ``target_num_layers`` is given
    and differs from its own, a copy re-checked against it is returned, with
    the default ids filled in if it had none).

    ``target_num_layers`` is the number of layers L of the target model; it
    bounds the aux layer ids and supplies the default ids ``(2, L//2, L-3)``.
    """
    if isinstance(cfg, DrafterConfig):
        return _with_target_num_layers(cfg, target_num_layers)
    raw = _load_raw(cfg)
    return _resolve_raw(raw, target_num_layers)


def validate_fc_width(cfg: Any, fc_in_features: int) -> None:
    """Check a checkpoint's ``fc`` weight width against the config.

    ``fc_in_features`` is ``fc.weight.shape[1]``; it must equal
    ``num_aux_hidden_states * target_hidden_size``. ``cfg`` is anything
    :func:`resolve` accepts.
    """
    c = resolve(cfg)
    width = _as_int("fc_in_features", fc_in_features)
    if width == c.fc_in_features:
        return
    hint = ""
    if width > 0 and width % c.target_hidden_size == 0:
        hint = f" (the weight implies {width // c.target_hidden_size} aux hidden states)"
    raise ValueError(
        f"fc weight has {width} input features but the config expects "
        f"num_aux_hidden_states={c.num_aux_hidden_states} * "
        f"target_hidden_size={c.target_hidden_size} = {c.fc_in_features}{hint}"
    )


def default_aux_layer_ids(target_num_layers: int) -> tuple[int, int, int]:
    """The engines' default aux layers for a target with L layers: ``(2, L//2, L-3)``."""
    L = _as_int("target_num_layers", target_num_layers)
    ids = (2, L // 2, L - 3)
    if not ids[0] < ids[1] < ids[2]:
        raise ValueError(
            f"target_num_layers={L} is too small for the default aux layer ids "
            f"(2, L//2, L-3) = {ids}; it must be >= 7, or name the ids with "
            f"eagle_aux_hidden_state_layer_ids"
        )
    return ids


# --------------------------------------------------------------------------
# Loading: anything accepted -> a plain dict
# --------------------------------------------------------------------------


def _load_raw(cfg: Any) -> dict[str, Any]:
    if isinstance(cfg, Mapping):
        return _plain(cfg)
    if isinstance(cfg, (str, os.PathLike)):
        return _read_json(_config_path(Path(os.fspath(cfg))))
    if isinstance(cfg, (bytes, bytearray, int, float, bool, list, tuple, set)) or cfg is None:
        raise TypeError(_unsupported(cfg))
    if callable(getattr(cfg, "to_dict", None)):
        raw = cfg.to_dict()
    elif hasattr(cfg, "__dict__"):
        raw = vars(cfg)
    else:
        raise TypeError(_unsupported(cfg))
    if not isinstance(raw, Mapping):
        raise TypeError(f"{type(cfg).__name__}.to_dict() returned {type(raw).__name__}, not a dict")
    return _plain(raw)


def _unsupported(cfg: Any) -> str:
    return (
        f"cannot resolve a drafter config from {type(cfg).__name__}; expected a dict, "
        "a path to config.json or to a folder holding it, an object with attributes, "
        "or a DrafterConfig"
    )


def _plain(value: Any) -> Any:
    """Recursively turn Mappings and nested namespace/config objects into dicts."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (types.SimpleNamespace, argparse.Namespace)):
        return _plain(vars(value))
    if not isinstance(value, type) and callable(getattr(value, "to_dict", None)):
        return _plain(value.to_dict())
    return value


def _config_path(path: Path) -> Path:
    if not path.exists():
        raise ValueError(f"config path {str(path)!r} does not exist")
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"checkpoint folder {str(path.parent)!r} has no config.json")
    return path


def _read_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"cannot read config {str(path)!r}: {e}") from e
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"config {str(path)!r} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"config {str(path)!r} must hold a JSON object, got {type(raw).__name__}")
    return raw


# --------------------------------------------------------------------------
# Sources: where each field is looked up
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Sources:
    """The sections of one raw config, with the two lookup orders."""

    top: dict[str, Any]
    layer: dict[str, Any]  # transformer_layer_config ({} outside speculators)
    verifier: dict[str, Any]  # speculators_config["verifier"] ({} if absent)
    layout: str

    def flag(self, key: str) -> Any:
        """Drafter flag: top level first, then transformer_layer_config."""
        return _first_not_none(self.top.get(key), self.layer.get(key))

    def decoder(self, key: str) -> Any:
        """Decoder-layer field: transformer_layer_config first, then top level."""
        return _first_not_none(self.layer.get(key), self.top.get(key))

    def section(self, key: str) -> dict[str, Any]:
        """A nested dict-valued flag such as eagle_config ({} if absent or None)."""
        value = self.flag(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ValueError(f"{key} must be a dict, got {value!r}")
        return value


def _first_not_none(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _sources(raw: dict[str, Any]) -> _Sources:
    layout = _detect_layout(raw)
    layer = raw.get("transformer_layer_config")
    if layer is None:
        layer = {}
    elif not isinstance(layer, dict):
        raise ValueError(f"transformer_layer_config must be a dict, got {layer!r}")
    spec = raw.get("speculators_config")
    verifier = spec.get("verifier") if isinstance(spec, dict) else None
    return _Sources(
        top=raw,
        layer=layer,
        verifier=verifier if isinstance(verifier, dict) else {},
        layout=layout,
    )


def _detect_layout(raw: dict[str, Any]) -> str:
    kind = raw.get("speculators_model_type")
    if kind is not None and kind != "eagle3":
        raise ValueError(
            f"speculators_model_type must be 'eagle3' for an EAGLE-3 drafter, got {kind!r}"
        )
    if kind is not None or raw.get("transformer_layer_config") is not None:
        return "speculators"
    if raw.get("eagle_config"):
        return "eagle_config"
    return "eagle3"


# --------------------------------------------------------------------------
# Value coercion (JSON values -> typed fields)
# --------------------------------------------------------------------------


def _as_int(name: str, value: Any) -> int:
    if _is_int(value):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise ValueError(f"{name} must be an integer, got {value!r}")


def _opt_int(name: str, value: Any) -> int | None:
    return None if value is None else _as_int(name, value)


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"{name} must be a number, got {value!r}")


def _as_bool(name: str, value: Any, default: bool = False) -> bool:
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    raise ValueError(f"{name} must be true or false, got {value!r}")


def _required(name: str, value: Any) -> Any:
    if value is None:
        raise ValueError(f"config has no {name} (looked at the top level and transformer_layer_config)")
    return value


# --------------------------------------------------------------------------
# One helper per resolution rule
# --------------------------------------------------------------------------


def _target_layers(src: _Sources, argument: int | None) -> int | None:
    """L: the argument wins, else the speculators verifier's num_hidden_layers."""
    if argument is not None:
        return _as_int("target_num_layers", argument)
    return _opt_int("speculators_config.verifier.num_hidden_layers", src.verifier.get("num_hidden_layers"))


def _id_list(name: str, value: Any, shift: int = 0) -> tuple[int, ...] | None:
    """One id source: None/empty -> None (skipped); else a tuple of ints (+shift)."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a list of layer ids, got {value!r}")
    if not value:
        return None
    return tuple(_as_int(name, v) + shift for v in value)


def _named_aux_ids(src: _Sources) -> tuple[int, ...] | None:
    """The ids the config itself names (first three sources), or None."""
    return _first_not_none(
        _id_list("eagle_aux_hidden_state_layer_ids", src.flag("eagle_aux_hidden_state_layer_ids")),
        _id_list(
            "eagle_config.eagle_aux_hidden_state_layer_ids",
            src.section("eagle_config").get("eagle_aux_hidden_state_layer_ids"),
        ),
        _id_list(
            "dflash_config.target_layer_ids",
            src.section("dflash_config").get("target_layer_ids"),
            shift=1,
        ),
    )


def _aux_layer_ids(src: _Sources, L: int | None) -> tuple[int, ...] | None:
    """Named ids, else the default (2, L//2, L-3) when L is known, else None."""
    named = _named_aux_ids(src)
    if named is not None:
        return named
    return default_aux_layer_ids(L) if L is not None else None


def _num_aux(src: _Sources, ids: tuple[int, ...] | None) -> int:
    """Top-level count, else the number of ids, else 3 (agreement is checked later)."""
    explicit = _opt_int("num_aux_hidden_states", src.flag("num_aux_hidden_states"))
    if explicit is not None:
        return explicit
    return len(ids) if ids is not None else _DEFAULT_NUM_AUX


def _norm_before_fc(src: _Sources) -> bool:
    """The eagle_config value wins over the top level; default False."""
    value = _first_not_none(
        src.section("eagle_config").get("norm_before_fc"), src.flag("norm_before_fc")
    )
    return _as_bool("norm_before_fc", value)


def _check_uses_aux_states(src: _Sources) -> None:
    """eagle_config.use_aux_hidden_state=false means no fc over aux states: not EAGLE-3."""
    use = src.section("eagle_config").get("use_aux_hidden_state")
    if use is not None and _as_bool("eagle_config.use_aux_hidden_state", use) is False:
        raise ValueError(
            "eagle_config.use_aux_hidden_state is false: this drafter does not read the "
            "target's aux hidden states, which this package's EAGLE-3 fc requires"
        )


_MLA_KEYS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


def _mla(src: _Sources) -> MLAConfig | None:
    """Multi-head latent attention when the decoder config names ``kv_lora_rank``.

    Every MLA size must be given (``q_lora_rank`` may be null: a plain q_proj); a config
    naming some MLA sizes but no ``kv_lora_rank`` is an error rather than a Llama drafter.
    """
    present = [k for k in _MLA_KEYS if k in src.layer or k in src.top]
    if src.decoder("kv_lora_rank") is None:
        named = [k for k in present if src.decoder(k) is not None]
        if named:
            raise ValueError(
                f"config names multi-head latent attention sizes {named} but no kv_lora_rank; "
                "give kv_lora_rank (an MLA drafter) or remove them (a Llama drafter)"
            )
        return None
    missing = [k for k in _MLA_KEYS if k not in present or (k != "q_lora_rank" and src.decoder(k) is None)]
    if missing:
        raise ValueError(
            f"multi-head latent attention config (kv_lora_rank={src.decoder('kv_lora_rank')}) lacks {missing}; "
            "expected integers (q_lora_rank may be null for a plain q_proj)"
        )
    # q_lora_rank may be an explicit null: the section that names it wins, null or not
    q_lora = src.layer["q_lora_rank"] if "q_lora_rank" in src.layer else src.top.get("q_lora_rank")
    return MLAConfig(
        q_lora_rank=_opt_int("q_lora_rank", q_lora),
        kv_lora_rank=_as_int("kv_lora_rank", src.decoder("kv_lora_rank")),
        qk_nope_head_dim=_as_int("qk_nope_head_dim", src.decoder("qk_nope_head_dim")),
        qk_rope_head_dim=_as_int("qk_rope_head_dim", src.decoder("qk_rope_head_dim")),
        v_head_dim=_as_int("v_head_dim", src.decoder("v_head_dim")),
        rope_interleave=_as_bool("rope_interleave", src.decoder("rope_interleave"), default=True),
    )


def _head_dim(src: _Sources, hidden_size: int, num_heads: int, mla: MLAConfig | None = None) -> int:
    """Explicit head_dim, else the rotary width for MLA, else hidden_size //
    num_attention_heads (must divide)."""
    explicit = _opt_int("head_dim", src.decoder("head_dim"))
    if explicit is not None:
        return explicit
    if mla is not None:
        return mla.qk_rope_head_dim
    if num_heads > 0 and hidden_size % num_heads != 0:
        raise ValueError(
            f"hidden_size={hidden_size} is not divisible by num_attention_heads={num_heads}; "
            "expected a multiple, or an explicit head_dim"
        )
    return hidden_size // num_heads if num_heads > 0 else num_heads  # <= 0 rejected later


def _rope(src: _Sources) -> tuple[float, dict[str, Any] | None]:
    """rope_theta and a normalised rope_scaling from either spelling.

    ``rope_parameters`` (newer transformers) may hold ``rope_theta`` and
    ``rope_type``; ``rope_scaling`` is the older spelling. ``type`` is an alias
    of ``rope_type``. ``{"rope_type": "default"}`` alone (or an empty dict)
    means no scaling and becomes None.
    """
    theta = src.decoder("rope_theta")
    scaling: dict[str, Any] | None = None
    for key in ("rope_parameters", "rope_scaling"):
        params = _normalise_rope_dict(key, src.decoder(key))
        if params is None:
            continue
        inner_theta = params.pop("rope_theta", None)
        if inner_theta is not None:
            if theta is not None and _as_float(key, inner_theta) != _as_float("rope_theta", theta):
                raise ValueError(
                    f"rope_theta={theta} disagrees with {key}.rope_theta={inner_theta}"
                )
            theta = inner_theta
        params = params or None
        if params == {"rope_type": "default"}:
            params = None
        if scaling is not None and params is not None and params != scaling:
            raise ValueError(
                f"rope_parameters={scaling} and rope_scaling={params} disagree; give one"
            )
        scaling = _first_not_none(scaling, params)
    theta_value = _DEFAULT_ROPE_THETA if theta is None else _as_float("rope_theta", theta)
    return theta_value, scaling


def _normalise_rope_dict(key: str, value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"{key} must be a dict or None, got {value!r}")
    params = dict(value)
    alias = params.pop("type", None)
    if alias is not None:
        rope_type = params.setdefault("rope_type", alias)
        if rope_type != alias:
            raise ValueError(f"{key} has type={alias!r} but rope_type={rope_type!r}")
    return params


def _torch_dtype(src: _Sources) -> str | None:
    """``torch_dtype`` (or the newer ``dtype``), as a name such as "bfloat16"."""
    value = _first_not_none(
        src.top.get("torch_dtype"),
        src.top.get("dtype"),
        src.layer.get("torch_dtype"),
        src.layer.get("dtype"),
    )
    if value is None:
        return None
    name = str(value)
    return name[len("torch."):] if name.startswith("torch.") else name


# --------------------------------------------------------------------------
# Assembly
# --------------------------------------------------------------------------


def _resolve_raw(raw: dict[str, Any], target_num_layers: int | None) -> DrafterConfig:
    src = _sources(raw)
    _check_uses_aux_states(src)
    L = _target_layers(src, target_num_layers)

    hidden_size = _as_int("hidden_size", _required("hidden_size", src.decoder("hidden_size")))
    num_heads = _as_int(
        "num_attention_heads", _required("num_attention_heads", src.decoder("num_attention_heads"))
    )
    vocab_size = _as_int("vocab_size", _required("vocab_size", src.decoder("vocab_size")))
    ids = _aux_layer_ids(src, L)
    rope_theta, rope_scaling = _rope(src)
    mla = _mla(src)

    return DrafterConfig(
        hidden_size=hidden_size,
        target_hidden_size=_as_int(
            "target_hidden_size", _first_not_none(src.flag("target_hidden_size"), hidden_size)
        ),
        num_aux_hidden_states=_num_aux(src, ids),
        aux_layer_ids=ids,
        norm_before_fc=_norm_before_fc(src),
        fc_norm=_as_bool("fc_norm", src.flag("fc_norm")),
        norm_output=_as_bool("norm_output", src.flag("norm_output")),
        norm_before_residual=_as_bool("norm_before_residual", src.flag("norm_before_residual")),
        rms_norm_eps=_as_float(
            "rms_norm_eps", _first_not_none(src.decoder("rms_norm_eps"), _DEFAULT_RMS_NORM_EPS)
        ),
        vocab_size=vocab_size,
        draft_vocab_size=_as_int(
            "draft_vocab_size", _first_not_none(src.flag("draft_vocab_size"), vocab_size)
        ),
        num_attention_heads=num_heads,
        # MLA has no key / value heads of its own (every head reads the one latent); configs
        # saved by transformers carry an unrelated default there, so it is not read.
        num_key_value_heads=num_heads if mla is not None else _as_int(
            "num_key_value_heads", _first_not_none(src.decoder("num_key_value_heads"), num_heads)
        ),
        head_dim=_head_dim(src, hidden_size, num_heads, mla),
        intermediate_size=_as_int(
            "intermediate_size", _required("intermediate_size", src.decoder("intermediate_size"))
        ),
        num_hidden_layers=_as_int(
            "num_hidden_layers", _first_not_none(src.decoder("num_hidden_layers"), 1)
        ),
        hidden_act=_first_not_none(src.decoder("hidden_act"), "silu"),
        attention_bias=_as_bool("attention_bias", src.decoder("attention_bias")),
        mlp_bias=_as_bool("mlp_bias", src.decoder("mlp_bias")),
        max_position_embeddings=_opt_int(
            "max_position_embeddings", src.decoder("max_position_embeddings")
        ),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        tie_word_embeddings=_as_bool("tie_word_embeddings", src.decoder("tie_word_embeddings")),
        torch_dtype=_torch_dtype(src),
        mla=mla,
        target_num_layers=L,
        layout=src.layout,
    )


def _with_target_num_layers(cfg: DrafterConfig, L: int | None) -> DrafterConfig:
    """A DrafterConfig re-checked against a (new) target layer count."""
    if L is None or L == cfg.target_num_layers:
        return cfg
    L = _as_int("target_num_layers", L)
    ids = cfg.aux_layer_ids if cfg.aux_layer_ids is not None else default_aux_layer_ids(L)
    return dataclasses.replace(cfg, target_num_layers=L, aux_layer_ids=ids)
