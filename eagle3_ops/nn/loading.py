"""Reading EAGLE-3 drafter checkpoints into :class:`Eagle3LlamaDrafter` and :class:`Eagle3DeepseekDrafter`.

Three naming layouts are read (DESIGN.md section 1), each from safetensors or torch files:

=============  ==========================================  ===================================
layout         layer 0 / other names                       notes
=============  ==========================================  ===================================
eagle3         ``midlayer.*``, ``fc``, ``norm``, ...        original EAGLE-3, flat Llama config
speculators    ``layers.0.*`` (``layers.N.*``)              ``transformer_layer_config``; these
                                                            are the module's own names
serving        ``model.layers.0.*``, ``model.fc``, ...      fused ``self_attn.qkv_proj`` (MLA:
               ``lm_head``, ``draft_id_to_target_id``       ``self_attn.fused_qkv_a_proj_with_mqa``
                                                            or ``fused_qkv_a_proj``) and
                                                            ``mlp.gate_up_proj``
=============  ==========================================  ===================================

The same names serve :class:`Eagle3LlamaDrafter` and :class:`Eagle3DeepseekDrafter` (whose
layer-0 attention holds ``q_a_proj`` / ``q_a_layernorm`` / ``q_b_proj`` or ``q_proj``,
``kv_a_proj_with_mqa``, ``kv_a_layernorm``, ``kv_b_proj``, ``o_proj``); ``model.midlayer.*``
is read as ``midlayer.*``.

Every name is mapped to the module's name (``canonical_name``), fused projections are
split by the config's head counts, then the whole set is checked at once: one
:class:`CheckpointError` lists every unexpected key, missing key (with the shape expected)
and shape mismatch (with both shapes). ``embed_tokens.weight`` / ``lm_head.weight`` may be
absent (shared with the target): they are reported, not an error. ``d2t`` offsets are
checked (every target id in range, none repeated) and ``t2d`` is derived from them when
absent or checked against them when present. ``*.rotary_emb.inv_freq`` entries (derived
from the config) are skipped.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Union

import torch
from torch import Tensor, nn

from ..config import DrafterConfig, resolve, validate_fc_width

__all__ = [
    "CheckpointError",
    "LoadReport",
    "LAYOUTS",
    "canonical_name",
    "read_checkpoint",
    "load_weights",
    "from_pretrained",
    "save_pretrained",
    "config_to_dict",
    "state_dict_in_layout",
    "set_target_weights",
    "fused_projections",
]

LAYOUTS = ("speculators", "eagle3", "serving")
SHARED_WITH_TARGET = ("embed_tokens.weight", "lm_head.weight")
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_TRAINING_FILES = re.compile(r"^(training_args\.bin|optimizer.*|scheduler.*|rng_state.*|trainer_state.*)$")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the drafter: the message lists every problem."""


@dataclass
class LoadReport:
    """What :func:`load_weights` did, by module parameter name."""

    loaded: list = field(default_factory=list)
    #: shared with the target and absent from the checkpoint: give them with set_target_weights
    missing_shared: list = field(default_factory=list)
    #: absent but tolerated because strict=False (parameters keep their values)
    missing: list = field(default_factory=list)
    #: unexpected names tolerated because strict=False
    unexpected: list = field(default_factory=list)
    #: skipped (derived from the config), e.g. rotary_emb.inv_freq
    ignored: list = field(default_factory=list)
    #: computed instead of read (t2d from d2t)
    derived: list = field(default_factory=list)
    #: module name -> checkpoint name(s) it came from
    sources: dict = field(default_factory=dict)

    def __str__(self) -> str:
        parts = [f"loaded {len(self.loaded)} tensors"]
        for what in ("missing_shared", "missing", "unexpected", "ignored", "derived"):
            names = getattr(self, what)
            if names:
                parts.append(f"{what.replace('_', ' ')}: {', '.join(names)}")
        return "; ".join(parts)


# ---- names ------------------------------------------------------------------------------


def canonical_name(name: str) -> str:
    """The module's name for a checkpoint name of any layout (fused names are kept; they are
    split by :func:`load_weights`)."""
    n = name
    if n.startswith("model."):
        n = n[len("model."):]
    m = re.match(r"midlayer\.(\d+)\.(.*)$", n)
    if m:
        n = f"layers.{m.group(1)}.{m.group(2)}"
    elif n.startswith("midlayer."):
        n = "layers.0." + n[len("midlayer."):]
    if n == "draft_id_to_target_id":
        n = "d2t"
    return n


def fused_projections(model) -> dict:
    """The fused projections a serving checkpoint may hold for ``model``: fused name (a
    suffix under ``layers.N.``) -> (part names, rows of each part), in the order the parts
    are stacked along dim 0. Several fused names may stand for the same parts (the first
    one is written by :func:`state_dict_in_layout`)."""
    c = model.config
    fused = {}
    if c.mla is None:
        fused["self_attn.qkv_proj"] = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                                       [c.num_attention_heads * c.head_dim] + [c.num_key_value_heads * c.head_dim] * 2)
    elif c.mla.q_lora_rank is not None:  # without a q LoRA, q_proj and kv_a_proj_with_mqa stay apart
        parts = (("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"),
                 [c.mla.q_lora_rank, c.mla.kv_lora_rank + c.mla.qk_rope_head_dim])
        fused["self_attn.fused_qkv_a_proj_with_mqa"] = parts
        fused["self_attn.fused_qkv_a_proj"] = parts
    fused["mlp.gate_up_proj"] = (("mlp.gate_proj", "mlp.up_proj"), [c.intermediate_size] * 2)
    return fused


def _fused_parts(model, name: str):
    """For a fused name (``layers.N.self_attn.qkv_proj.weight``...): the part names and the
    size of each along dim 0; else None."""
    for fused, (parts, sizes) in fused_projections(model).items():
        m = re.match(rf"(layers\.\d+\.){re.escape(fused)}\.(weight|bias)$", name)
        if m:
            return [f"{m.group(1)}{p}.{m.group(2)}" for p in parts], sizes
    return None


def _shape(t) -> list:
    return list(t.shape)


# ---- reading files ----------------------------------------------------------------------


def _load_file(path: Path) -> dict:
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:  # pragma: no cover - safetensors is a test dependency
            raise ImportError(f"reading {path} needs the safetensors package (pip install safetensors)") from e
        return load_file(str(path), device="cpu")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read torch checkpoint {str(path)!r}: {e}") from e
    if isinstance(obj, dict) and not all(isinstance(v, Tensor) for v in obj.values()):
        for key in ("state_dict", "model", "module"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise CheckpointError(f"{str(path)!r} holds a {type(obj).__name__}, expected a dict of tensors")
    bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{str(path)!r}: these entries are not tensors: {bad[:10]}")
    return dict(obj)


def checkpoint_files(folder: Path) -> list:
    """The weight files of a checkpoint folder: the safetensors index's files, else every
    ``*.safetensors``, else ``pytorch_model*.bin``, else ``*.bin`` / ``*.pt`` / ``*.pth``
    (training artefacts such as ``training_args.bin`` or ``optimizer.pt`` excluded)."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            weight_map = json.loads((folder / index).read_text())["weight_map"]
            return [folder / f for f in sorted(set(weight_map.values()))]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        files = sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        files = sorted(p for ext in ("*.bin", "*.pt", "*.pth") for p in folder.glob(ext)
                       if not _TRAINING_FILES.match(p.name))
    return files


def read_checkpoint(path: Union[str, os.PathLike]) -> dict:
    """All tensors of a checkpoint (a folder or one file), by their checkpoint names."""
    p = Path(os.fspath(path))
    if not p.exists():
        raise CheckpointError(f"checkpoint path {str(p)!r} does not exist")
    files = checkpoint_files(p) if p.is_dir() else [p]
    if not files:
        raise CheckpointError(f"no weight files in {str(p)!r}: looked for *.safetensors (or an index), "
                              f"pytorch_model*.bin, *.bin, *.pt, *.pth")
    out, where = {}, {}
    for f in files:
        for k, v in _load_file(f).items():
            if k in out:
                raise CheckpointError(f"tensor {k!r} is in both {where[k].name} and {f.name}")
            out[k], where[k] = v, f
    return out


# ---- loading ----------------------------------------------------------------------------


def _describe(model) -> str:
    c = model.config
    return (f"{type(model).__name__}(hidden_size={c.hidden_size}, target_hidden_size={c.target_hidden_size}, "
            f"num_aux_hidden_states={c.num_aux_hidden_states}, vocab_size={c.vocab_size}, "
            f"draft_vocab_size={c.draft_vocab_size}, num_hidden_layers={c.num_hidden_layers}, "
            f"norm_before_fc={c.norm_before_fc}, fc_norm={c.fc_norm})")


def _expected(model) -> dict:
    """name -> (parameter or buffer) the checkpoint may fill, plus d2t/t2d shapes."""
    exp = dict(model.state_dict(keep_vars=True))
    c = model.config
    if model.d2t is None:  # draft vocab == vocab: d2t/t2d are optional (identity)
        exp["d2t"] = torch.empty(c.draft_vocab_size, dtype=torch.long, device="meta")
        exp["t2d"] = torch.empty(c.vocab_size, dtype=torch.bool, device="meta")
    return exp


def _gather(model, weights) -> tuple:
    """Canonical names -> (tensor, source); fused tensors split; errors collected."""
    got, ignored, dup, shape_err = {}, [], [], []
    exp = _expected(model)
    for name, t in weights:
        if not isinstance(t, Tensor):
            raise CheckpointError(f"{name!r}: expected a tensor, got {type(t).__name__}")
        cname = canonical_name(name)
        if _IGNORED.search(cname):
            ignored.append(name)
            continue
        fused = _fused_parts(model, cname)
        if fused is not None:
            parts, sizes = fused
            want = [sum(sizes), *(_shape(exp[parts[0]])[1:] if parts[0] in exp else [])]
            if parts[0] not in exp or _shape(t) != want:
                shape_err.append(f"{name}: checkpoint {_shape(t)}, model expects {want} "
                                 f"(= {' + '.join(str(s) for s in sizes)} rows of {', '.join(parts)})"
                                 if parts[0] in exp else f"{name}: no such parameter {parts[0]}")
                continue
            items = [(p, piece, f"{name}[{o}:{o + s}]")
                     for p, piece, o, s in zip(parts, t.split(sizes, dim=0), _offsets(sizes), sizes)]
        else:
            items = [(cname, t, name)]
        for cn, piece, src in items:
            if cn in got:
                dup.append(f"{cn}: given by both {got[cn][1]!r} and {src!r}")
            else:
                got[cn] = (piece, src)
    return got, ignored, dup, shape_err


def _offsets(sizes):
    out, o = [], 0
    for s in sizes:
        out.append(o)
        o += s
    return out


def _check_vocab_maps(model, d2t: Optional[Tensor], t2d: Optional[Tensor]) -> list:
    c = model.config
    errors = []
    if d2t is None:
        return errors
    if d2t.dtype.is_floating_point or d2t.dtype == torch.bool:
        errors.append(f"d2t: must hold integer offsets, got dtype {d2t.dtype}")
        return errors
    target = torch.arange(c.draft_vocab_size) + d2t.to("cpu", torch.long)
    bad = torch.nonzero((target < 0) | (target >= c.vocab_size)).reshape(-1)
    if bad.numel():
        errors.append(f"d2t: draft ids {bad[:8].tolist()} map outside the target vocab [0, {c.vocab_size}) "
                      f"(target = draft + d2t[draft] = {target[bad[:8]].tolist()})")
    elif torch.unique(target).numel() != target.numel():
        errors.append("d2t: several draft ids map to the same target id (target = draft + d2t[draft])")
    elif t2d is not None:
        mask = t2d.to("cpu").bool()
        if int(mask.sum()) != c.draft_vocab_size or not bool(mask[target].all()):
            errors.append(f"t2d disagrees with d2t: t2d marks {int(mask.sum())} target ids, "
                          f"{int((~mask[target]).sum())} of d2t's {c.draft_vocab_size} target ids are not marked")
    return errors


def load_weights(model, weights: Iterable[tuple], strict: bool = True) -> LoadReport:
    """Load ``(name, tensor)`` pairs of any layout into ``model`` (see the module docstring)."""
    got, ignored, dup, shape_err = _gather(model, weights)
    c = model.config
    if "fc.weight" in got and got["fc.weight"][0].dim() == 2:
        width = got["fc.weight"][0].shape[1]
        if width != c.fc_in_features:
            try:
                validate_fc_width(c, width)
            except ValueError as e:
                raise CheckpointError(f"{got['fc.weight'][1]}: {e}") from None
    exp = _expected(model)
    unexpected = sorted(f"{n} {_shape(t)} (checkpoint name {src!r})" for n, (t, src) in got.items() if n not in exp)
    for n, (t, src) in got.items():
        if n in exp and _shape(t) != _shape(exp[n]):
            shape_err.append(f"{src}: checkpoint {_shape(t)}, model {n} expects {_shape(exp[n])}")
    optional = {"d2t", "t2d"} if model.d2t is None else {"t2d"}
    tied = getattr(model, "tied", False)
    missing_shared, missing = [], []
    for n, t in exp.items():
        if n in got or n in optional:
            continue
        if n in SHARED_WITH_TARGET:
            if n == "lm_head.weight" and tied and "embed_tokens.weight" in got:
                continue
            missing_shared.append(n)
        else:
            missing.append(f"{n}, expected {_shape(t)} {str(t.dtype).replace('torch.', '')}")
    d2t = got.get("d2t", (None,))[0]
    vocab_err = [] if shape_err else _check_vocab_maps(model, d2t, got.get("t2d", (None,))[0])
    problems = []
    if unexpected and strict:
        problems.append(f"unexpected keys ({len(unexpected)}):\n    " + "\n    ".join(unexpected))
    if missing and strict:
        problems.append(f"missing keys ({len(missing)}):\n    " + "\n    ".join(missing))
    if shape_err:
        problems.append(f"shape mismatches ({len(shape_err)}):\n    " + "\n    ".join(shape_err))
    if dup:
        problems.append(f"keys given twice ({len(dup)}):\n    " + "\n    ".join(dup))
    if vocab_err:
        problems.append("bad vocabulary maps:\n    " + "\n    ".join(vocab_err))
    if problems:
        raise CheckpointError(f"checkpoint does not fit {_describe(model)}:\n  " + "\n  ".join(problems))

    report = LoadReport(missing_shared=sorted(missing_shared), ignored=ignored,
                        missing=[m.split(",")[0] for m in missing],
                        unexpected=[u.split(" ")[0] for u in unexpected])
    with torch.no_grad():
        if d2t is not None and model.d2t is None:  # identity-sized d2t: keep it
            model.d2t = torch.empty(c.draft_vocab_size, dtype=torch.long, device=model.lm_head.weight.device)
            model.t2d = torch.empty(c.vocab_size, dtype=torch.bool, device=model.lm_head.weight.device)
        for n, (t, src) in got.items():
            if n not in exp:
                continue
            dst = getattr(model, n) if n in ("d2t", "t2d") else exp[n]
            dst.copy_(t.to(dtype=dst.dtype))
            report.loaded.append(n)
            report.sources[n] = src
        if d2t is not None and "t2d" not in got:
            t2d = torch.zeros(c.vocab_size, dtype=torch.bool, device=model.t2d.device)
            t2d[model.target_ids()] = True
            model.t2d.copy_(t2d)
            report.derived.append("t2d")
    model.missing_weights = set(missing_shared)
    model.load_report = report
    return report


def state_dict_pre_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                        error_msgs) -> None:
    """``load_state_dict`` hook of the drafters: renames original / serving keys to the
    module's and splits fused projections, so ``load_state_dict(strict=True)`` takes any layout."""
    keys = [k for k in state_dict if k.startswith(prefix)]
    for k in keys:
        rest = k[len(prefix):]
        cname = canonical_name(rest)
        fused = _fused_parts(module, cname)
        if cname == rest and fused is None:
            continue
        t = state_dict.pop(k)
        if fused is not None and t.shape[0] == sum(fused[1]):
            for p, piece in zip(fused[0], t.split(fused[1], dim=0)):
                state_dict[prefix + p] = piece
        else:  # a badly sized fused tensor is reported by load_state_dict as unexpected
            state_dict[prefix + cname] = t


# ---- from_pretrained / target weights -----------------------------------------------------


def from_pretrained(cls, path, *, dtype=None, device=None, target_num_layers=None, strict=True, target=None):
    p = Path(os.fspath(path))
    if not p.exists():
        raise CheckpointError(f"checkpoint path {str(p)!r} does not exist")
    folder = p if p.is_dir() else p.parent
    cfg = resolve(folder, target_num_layers=target_num_layers)
    state = read_checkpoint(p)
    if dtype is None:
        fc = next((t for k, t in state.items() if canonical_name(k) == "fc.weight"), None)
        dtype = fc.dtype if fc is not None and fc.is_floating_point() else torch.float32
    with torch.device("meta"):
        model = cls(cfg, dtype=dtype)
    model = model.to_empty(device=torch.device(device) if device is not None else torch.device("cpu"))
    model.tie_weights()
    with torch.no_grad():
        for t in list(model.parameters()) + [b for b in model.buffers() if b is not None]:
            t.zero_()
    try:
        model.load_weights(state.items(), strict=strict)
    except CheckpointError as e:
        raise CheckpointError(f"{str(p)!r}: {e}") from None
    model.eval()
    model.requires_grad_(False)
    if target is not None:
        model.set_target_weights(target)
    return model


def _find_param(target: nn.Module, method: str, suffix: str) -> Optional[Tensor]:
    getter = getattr(target, method, None)
    if callable(getter):
        try:
            mod = getter()
        except (NotImplementedError, AttributeError):
            mod = None
        if mod is not None and isinstance(getattr(mod, "weight", None), Tensor):
            return mod.weight
    for name, prm in target.named_parameters():
        if name == suffix or name.endswith("." + suffix):
            return prm
    return None


def set_target_weights(model, target=None, *, embed_tokens=None, lm_head=None) -> list:
    c = model.config
    if target is not None:
        if embed_tokens is None and "embed_tokens.weight" in model.missing_weights:
            embed_tokens = _find_param(target, "get_input_embeddings", "embed_tokens.weight")
        if lm_head is None and "lm_head.weight" in model.missing_weights and not model.tied:
            lm_head = _find_param(target, "get_output_embeddings", "lm_head.weight")
    done = []
    H = c.hidden_size
    if embed_tokens is not None:
        if _shape(embed_tokens) != [c.vocab_size, H]:
            raise CheckpointError(f"embed_tokens from the target is {_shape(embed_tokens)}, the drafter needs "
                                  f"[vocab_size={c.vocab_size}, hidden_size={H}]")
        _assign(model.embed_tokens, embed_tokens)
        done.append("embed_tokens.weight")
        model.tie_weights()
        if model.tied:
            done.append("lm_head.weight")
    if lm_head is not None:
        shape = _shape(lm_head)
        if shape == [c.draft_vocab_size, H]:
            _assign(model.lm_head, lm_head)
        elif shape == [c.vocab_size, H]:
            with torch.no_grad():
                rows = lm_head.detach().to(model.lm_head.weight.device)[model.target_ids()]
            _assign(model.lm_head, rows)
        else:
            raise CheckpointError(f"lm_head from the target is {shape}, the drafter needs [draft_vocab_size="
                                  f"{c.draft_vocab_size}, {H}] or [vocab_size={c.vocab_size}, {H}] (rows "
                                  f"picked through d2t)")
        done.append("lm_head.weight")
    model.missing_weights = model.missing_weights - set(done)
    return done


def _assign(module: nn.Module, w: Tensor) -> None:
    ref = module.weight
    if isinstance(w, nn.Parameter) and w.dtype == ref.dtype and w.device == ref.device:
        module.weight = w  # shared with the target
    else:
        module.weight = nn.Parameter(w.detach().to(device=ref.device, dtype=ref.dtype).clone(),
                                     requires_grad=ref.requires_grad)


# ---- saving -------------------------------------------------------------------------------


def config_to_dict(cfg: DrafterConfig, layout: str = "speculators") -> dict:
    """A config.json dict of ``layout`` that :func:`eagle3_ops.config.resolve` reads back."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    llama = {
        "model_type": "llama", "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim, "num_hidden_layers": cfg.num_hidden_layers, "rms_norm_eps": cfg.rms_norm_eps,
        "vocab_size": cfg.vocab_size, "hidden_act": cfg.hidden_act, "attention_bias": cfg.attention_bias,
        "mlp_bias": cfg.mlp_bias, "rope_theta": cfg.rope_theta, "tie_word_embeddings": cfg.tie_word_embeddings,
    }
    if cfg.max_position_embeddings is not None:
        llama["max_position_embeddings"] = cfg.max_position_embeddings
    if cfg.rope_scaling is not None:
        llama["rope_scaling"] = dict(cfg.rope_scaling)
    if cfg.torch_dtype is not None:
        llama["torch_dtype"] = cfg.torch_dtype
    if cfg.mla is not None:
        llama.update(cfg.mla.to_dict(), model_type="deepseek_v3")
    flags = {
        "draft_vocab_size": cfg.draft_vocab_size, "target_hidden_size": cfg.target_hidden_size,
        "num_aux_hidden_states": cfg.num_aux_hidden_states, "norm_before_fc": cfg.norm_before_fc,
        "fc_norm": cfg.fc_norm, "norm_output": cfg.norm_output, "norm_before_residual": cfg.norm_before_residual,
    }
    if cfg.aux_layer_ids is not None:
        flags["eagle_aux_hidden_state_layer_ids"] = list(cfg.aux_layer_ids)
    if layout == "speculators":
        out = {"architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3", **flags,
               "transformer_layer_config": llama,
               "speculators_config": {"algorithm": "eagle3", "verifier": {}}}
        if cfg.target_num_layers is not None:
            out["speculators_config"]["verifier"]["num_hidden_layers"] = cfg.target_num_layers
        return out
    arch = "LlamaForCausalLMEagle3" if cfg.mla is None else "Eagle3DeepseekV2ForCausalLM"
    return {"architectures": [arch], **llama, **flags}


def state_dict_in_layout(model, layout: str = "speculators") -> dict:
    """The model's tensors under the names of ``layout`` (weights missing from the model,
    i.e. shared with the target and never given, are left out; a tied lm_head too; ``t2d``
    is written from ``d2t``)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    sd = {k: v.detach() for k, v in model.state_dict().items() if k not in model.missing_weights}
    if getattr(model, "tied", False):
        sd.pop("lm_head.weight", None)
    if "d2t" in sd:  # t2d is derived data: write it from d2t, never stale
        t2d = torch.zeros(model.config.vocab_size, dtype=torch.bool, device=sd["d2t"].device)
        t2d[model.target_ids()] = True
        sd["t2d"] = t2d
    if layout == "speculators":
        return sd
    if layout == "eagle3":
        return {("midlayer." + k[len("layers.0."):] if k.startswith("layers.0.") else k): v for k, v in sd.items()}
    out = {}
    written = {}
    for fused, (parts, _) in fused_projections(model).items():
        written.setdefault(parts, fused)
    for k in list(sd):
        for parts, fused in written.items():
            m = re.match(rf"(layers\.\d+\.){re.escape(parts[0])}\.(weight|bias)$", k)
            if m:
                names = [f"{m.group(1)}{p}.{m.group(2)}" for p in parts]
                sd[f"{m.group(1)}{fused}.{m.group(2)}"] = torch.cat([sd.pop(n) for n in names], dim=0)
    for k, v in sd.items():
        if k == "d2t":
            out["draft_id_to_target_id"] = v
        elif k == "lm_head.weight" or k == "t2d":
            out[k] = v
        else:
            out["model." + k] = v
    return out


def save_pretrained(model, folder, layout: str = "speculators", safe_serialization: bool = True) -> None:
    folder = Path(os.fspath(folder))
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.contiguous().clone() for k, v in state_dict_in_layout(model, layout).items()}
    (folder / "config.json").write_text(json.dumps(config_to_dict(model.config, layout), indent=2))
    if safe_serialization:
        from safetensors.torch import save_file

        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(sd, str(folder / "pytorch_model.bin"))
