"""The parts every EAGLE-3 drafter shares (DESIGN.md section 1), whatever its attention.

:class:`Eagle3Drafter` is the whole model -- combine (``fc`` with ``input_norm`` or
``fc_norm`` folded in), decoder layers, final fused add + norm, ``norm_output``, logits
through ``d2t`` -- parameterised by the attention of its decoder layers:
:class:`~eagle3_ops.nn.llama.Eagle3LlamaDrafter` (grouped-query attention) and
:class:`~eagle3_ops.nn.deepseek.Eagle3DeepseekDrafter` (multi-head latent attention)
are the two concrete drafters. Parameter names are those of the speculators checkpoints
(``embed_tokens``, ``fc``, ``input_norm`` / ``fc_norm.{k}``, ``layers.{i}.*`` with layer
0 holding ``hidden_norm``, ``norm``, ``lm_head``, buffers ``d2t`` / ``t2d``);
``load_state_dict`` also accepts the original EAGLE-3 names (``midlayer.*``) and the
serving-engine names (``model.`` prefix, fused projections), see :mod:`eagle3_ops.nn.loading`.
"""

from __future__ import annotations

import os
from typing import Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..config import resolve
from . import loading
from .combine import CombineParams
from .norm import RMSNorm, use_kernels, weight_for
from .rope import RotaryEmbedding

__all__ = ["DrafterKVCache", "Eagle3MLP", "Eagle3DecoderLayer", "Eagle3Drafter"]

_ACTS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu,
         "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class DrafterKVCache:
    """Two tensors per decoder layer, ``[B, heads, S, width]`` each, for drafting token by
    token after a prefill: keys and values (Llama attention), or the normalised latent and
    the rotated shared key (multi-head latent attention). Pass the same object to every
    drafter ``forward`` call of one sequence (batch); ``crop(n)`` rolls it back to its first
    n positions (e.g. after the target rejected drafted tokens).

    Storage grows by doubling (64 positions of headroom at the first call, or ``reserve(n)``
    up front), so a drafting step writes its new positions in place instead of copying the
    whole cache. ``keys`` / ``values`` (and what ``update`` returns) are views of that
    storage: positions a later ``crop`` gives up are overwritten by the next ``update``."""

    def __init__(self):
        self._k: list = []
        self._v: list = []
        self._len: list = []
        self._reserve = 0

    @property
    def keys(self) -> list:
        return [k[:, :, :n] for k, n in zip(self._k, self._len)]

    @property
    def values(self) -> list:
        return [v[:, :, :n] for v, n in zip(self._v, self._len)]

    @property
    def seq_len(self) -> int:
        return self._len[0] if self._len else 0

    @property
    def capacity(self) -> int:
        """Positions held without reallocating."""
        return self._k[0].shape[2] if self._k else self._reserve

    def reserve(self, positions: int) -> None:
        """Room for ``positions`` positions (allocated at the first update if empty)."""
        if positions < 0:
            raise ValueError(f"DrafterKVCache.reserve: positions must be >= 0, got {positions}")
        self._reserve = max(self._reserve, positions)
        for layer in range(len(self._k)):
            self._grow(layer, positions)

    def _grow(self, layer: int, needed: int) -> None:
        k, v = self._k[layer], self._v[layer]
        if needed <= k.shape[2]:
            return
        cap = max(needed, 2 * k.shape[2])
        n = self._len[layer]
        nk = k.new_empty(k.shape[0], k.shape[1], cap, k.shape[3])
        nv = v.new_empty(v.shape[0], v.shape[1], cap, v.shape[3])
        nk[:, :, :n] = k[:, :, :n]
        nv[:, :, :n] = v[:, :, :n]
        self._k[layer], self._v[layer] = nk, nv

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append ``k`` / ``v`` ``[B, heads, S, width]`` to ``layer``; returns everything
        cached for it (views)."""
        S = k.shape[2]
        if layer == len(self._k):
            cap = max(S + 64, self._reserve)
            self._k.append(k.new_empty(k.shape[0], k.shape[1], cap, k.shape[3]))
            self._v.append(v.new_empty(v.shape[0], v.shape[1], cap, v.shape[3]))
            self._len.append(0)
        elif layer > len(self._k):
            raise IndexError(f"DrafterKVCache: layer {layer} updated before layer {len(self._k)}")
        buf_k, buf_v = self._k[layer], self._v[layer]
        for name, new, buf in (("keys", k, buf_k), ("values", v, buf_v)):
            if (new.shape[0], new.shape[1], new.shape[3]) != (buf.shape[0], buf.shape[1], buf.shape[3]) or \
                    new.dtype != buf.dtype or new.device != buf.device:
                raise ValueError(f"DrafterKVCache: layer {layer} {name} are [B, heads, S, width] = "
                                 f"{list(buf.shape[:2]) + ['S', buf.shape[3]]} {buf.dtype} on {buf.device}; got "
                                 f"{list(new.shape)} {new.dtype} on {new.device} (one cache per sequence batch)")
        n = self._len[layer]
        self._grow(layer, n + S)
        self._k[layer][:, :, n:n + S] = k
        self._v[layer][:, :, n:n + S] = v
        self._len[layer] = n + S
        return self._k[layer][:, :, :n + S], self._v[layer][:, :, :n + S]

    def crop(self, length: int) -> None:
        if not 0 <= length <= self.seq_len:
            raise ValueError(f"DrafterKVCache.crop: length must be in [0, {self.seq_len}], got {length}")
        self._len = [min(n, length) for n in self._len]

    def reset(self) -> None:
        self._k, self._v, self._len = [], [], []


class Eagle3MLP(nn.Module):
    def __init__(self, c, *, device=None, dtype=None):
        super().__init__()
        if c.hidden_act not in _ACTS:
            raise ValueError(f"hidden_act {c.hidden_act!r} is not supported; expected one of {sorted(_ACTS)}")
        fk = {"device": device, "dtype": dtype, "bias": c.mlp_bias}
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, **fk)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, **fk)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, **fk)
        self.act_fn = _ACTS[c.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Eagle3DecoderLayer(nn.Module):
    """Layer 0 (the midlayer): ``x = cat([input_layernorm(embeds), hidden_norm(h)])`` by one
    ``rms_norm_cat`` call, attention over the 2H-wide x, residual ``h`` (``hidden_norm(h)``
    with norm_before_residual). Layers > 0: ordinary pre-norm layers whose input norm is
    fused with the residual add. The MLP is dense. ``attention``: the attention class,
    called as ``attention(config, in_features, layer_idx, device=, dtype=)``. ``forward``
    returns ``(mlp_out, residual)``; the caller adds them (the next layer's
    ``input_layernorm`` or the final ``norm``)."""

    def __init__(self, c, layer_idx: int, attention: type, *, device=None, dtype=None):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        H, eps = c.hidden_size, c.rms_norm_eps
        self.layer_idx, self.is_first, self.norm_before_residual = layer_idx, layer_idx == 0, c.norm_before_residual
        self.self_attn = attention(c, 2 * H if self.is_first else H, layer_idx, **fk)
        self.mlp = Eagle3MLP(c, **fk)
        self.input_layernorm = RMSNorm(H, eps, **fk)
        self.post_attention_layernorm = RMSNorm(H, eps, **fk)
        if self.is_first:
            self.hidden_norm = RMSNorm(H, eps, **fk)

    def _first_input(self, embeds: Tensor, hidden: Tensor) -> Tensor:
        """``cat([input_layernorm(embeds), hidden_norm(hidden)], -1)``: ``[..., 2H]``."""
        n_e, n_h = self.input_layernorm, self.hidden_norm
        if n_e.variance_epsilon == n_h.variance_epsilon and use_kernels(embeds, n_e.weight, n_h.weight, hidden):
            return ops.rms_norm_cat([embeds, hidden], [weight_for(embeds, n_e.weight), weight_for(hidden, n_h.weight)],
                                    n_e.variance_epsilon)
        return torch.cat([n_e(embeds), n_h(hidden)], dim=-1)

    def forward(self, cos: Tensor, sin: Tensor, hidden: Tensor, residual: Optional[Tensor] = None,
                embeds: Optional[Tensor] = None, cache: Optional[DrafterKVCache] = None):
        if self.is_first:
            x = self._first_input(embeds, hidden)
            residual = x[..., hidden.shape[-1]:] if self.norm_before_residual else hidden
        else:
            x, residual = self.input_layernorm(hidden, residual)
        a = self.self_attn(x, cos, sin, cache)
        x, residual = self.post_attention_layernorm(a, residual)
        return self.mlp(x), residual


class Eagle3Drafter(CombineParams, nn.Module):
    """An EAGLE-3 draft model (DESIGN.md section 1) on the eagle3 ops; subclasses name the
    attention of the decoder layers (``attention_class``) and its rotary embedding
    (``make_rotary``).

    ``config``: anything :func:`eagle3_ops.config.resolve` accepts (a dict of any layout, a
    path to config.json or its folder, a DrafterConfig).

    * ``combine_hidden_states(aux)``: K aux states ``[..., K*H_t]`` (or a list) -> ``[..., H]``.
    * ``forward(input_ids, positions, hidden_states, cache=None)`` ->
      ``(hidden_for_logits, hidden_fed_back)``; ``[T]`` ids/positions with ``[T, H]`` hidden
      (one causal sequence, serving style) or ``[B, S]`` with ``[B, S, H]``. The second
      output is the normed state with norm_output, the pre-norm residual sum otherwise.
      With a :class:`DrafterKVCache` the call appends to it and attends to everything in it.
    * ``compute_logits(h)``: target-vocab logits, ``-inf`` outside the draft vocab (through
      ``d2t`` offsets: target = draft + d2t[draft]); the draft logits when there is no d2t.
    * ``top_tokens(h)``: the greedy next token of each row as a target-vocab id, without
      building target-vocab logits.

    Kernels run for fp32/fp16/bf16 under ``torch.no_grad()`` / ``inference_mode()`` (or
    with parameters that do not require grad); float64, or a call autograd must
    differentiate, runs the pure-PyTorch composition of the same math.
    """

    #: the decoder layers' attention: ``attention_class(config, in_features, layer_idx, device=, dtype=)``
    attention_class: type = None

    @staticmethod
    def make_rotary(c) -> RotaryEmbedding:
        return RotaryEmbedding(c.head_dim, c.rope_theta, c.rope_scaling)

    def _check_config(self, c) -> None:
        """Reject a config this drafter cannot build (subclasses)."""

    def __init__(self, config, *, device=None, dtype=None):
        super().__init__()
        c = self.config = resolve(config)
        self._check_config(c)
        fk = {"device": device, "dtype": dtype}
        H = c.hidden_size
        self.embed_tokens = nn.Embedding(c.vocab_size, H, **fk)
        self._init_combine(c, **fk)
        self.layers = nn.ModuleList(Eagle3DecoderLayer(c, i, self.attention_class, **fk)
                                    for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(H, c.rms_norm_eps, **fk)
        self.lm_head = nn.Linear(H, c.draft_vocab_size, bias=False, **fk)
        if c.draft_vocab_size != c.vocab_size:
            self.register_buffer("d2t", torch.zeros(c.draft_vocab_size, dtype=torch.long, device=device))
            self.register_buffer("t2d", torch.zeros(c.vocab_size, dtype=torch.bool, device=device))
        else:
            self.register_buffer("d2t", None)
            self.register_buffer("t2d", None)
        self.tie_weights()
        self.rotary = self.make_rotary(c)
        #: names of weights the checkpoint did not hold (embed_tokens / lm_head shared with
        #: the target); forward / compute_logits refuse to run until set_target_weights.
        self.missing_weights: set = set()
        self.load_report = None
        self.register_load_state_dict_pre_hook(loading.state_dict_pre_hook)

    # ---- parameters ----------------------------------------------------------------------

    @property
    def tied(self) -> bool:
        return self.config.tie_word_embeddings and self.config.draft_vocab_size == self.config.vocab_size

    def tie_weights(self) -> None:
        if self.tied:
            self.lm_head.weight = self.embed_tokens.weight

    # ---- compute -------------------------------------------------------------------------

    def combine_hidden_states(self, aux: Union[Tensor, Sequence[Tensor]]) -> Tensor:
        """The fc over the K aux hidden states: ``[..., K*H_t]`` or K ``[..., H_t]`` -> ``[..., H]``."""
        return self._combine(aux)

    def _check_present(self, name: str) -> None:
        if name in self.missing_weights:
            raise RuntimeError(
                f"{name} was not in the checkpoint (it is shared with the target model); give it with "
                f"drafter.set_target_weights(target_model) or set_target_weights({name.split('.')[0]}=tensor)")

    def forward(self, input_ids: Tensor, positions: Tensor, hidden_states: Tensor,
                cache: Optional[DrafterKVCache] = None) -> tuple[Tensor, Tensor]:
        c = self.config
        if input_ids.dim() not in (1, 2) or tuple(positions.shape) != tuple(input_ids.shape):
            raise ValueError(f"input_ids and positions must both be [T] or [B, S]; got {tuple(input_ids.shape)} "
                             f"and {tuple(positions.shape)}")
        if tuple(hidden_states.shape) != (*input_ids.shape, c.hidden_size):
            hint = (" (these look like the K aux states: call combine_hidden_states first)"
                    if hidden_states.shape[-1] == c.fc_in_features else "")
            raise ValueError(f"hidden_states must be {[*input_ids.shape, c.hidden_size]} (input_ids' shape + "
                             f"[hidden_size]), got {list(hidden_states.shape)}{hint}")
        if hidden_states.dtype != self.embed_tokens.weight.dtype:
            raise ValueError(f"hidden_states are {hidden_states.dtype} but the drafter's weights are "
                             f"{self.embed_tokens.weight.dtype}")
        self._check_present("embed_tokens.weight")
        flat = input_ids.dim() == 1
        if flat:
            input_ids, positions, hidden_states = input_ids[None], positions[None], hidden_states[None]
        cos, sin = self.rotary.cos_sin(positions, hidden_states.dtype)
        embeds = self.embed_tokens(input_ids)
        h, residual = hidden_states, None
        for layer in self.layers:
            h, residual = layer(cos, sin, h, residual, embeds=embeds, cache=cache)
        out, pre = self.norm(h, residual)
        fed_back = out if c.norm_output else pre
        if flat:
            return out[0], fed_back[0]
        return out, fed_back

    def target_ids(self) -> Tensor:
        """Target-vocab id of each draft id: ``arange(draft_vocab) + d2t`` (identity without d2t)."""
        ids = torch.arange(self.config.draft_vocab_size, device=self.lm_head.weight.device)
        return ids if self.d2t is None else ids + self.d2t

    def draft_to_target(self, draft_ids: Tensor) -> Tensor:
        """Map draft-vocab token ids to target-vocab ids (``id + d2t[id]``)."""
        return draft_ids if self.d2t is None else draft_ids + self.d2t[draft_ids]

    def compute_draft_logits(self, h: Tensor) -> Tensor:
        """``lm_head(h)``: logits over the draft vocab ``[..., draft_vocab_size]``."""
        self._check_present("lm_head.weight")
        return self.lm_head(h)

    def compute_logits(self, h: Tensor) -> Tensor:
        """Logits over the target vocab ``[..., vocab_size]``: draft logits scattered to their
        target ids, ``-inf`` elsewhere; the draft logits themselves when there is no d2t."""
        logits = self.compute_draft_logits(h)
        if self.d2t is None:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.config.vocab_size), float("-inf"))
        return full.index_copy_(full.dim() - 1, self.target_ids(), logits)

    def top_tokens(self, h: Tensor) -> Tensor:
        """The greedy next token of each row of ``h [..., H]`` as a target-vocab id
        ``[...]``: the argmax of the draft logits mapped through ``d2t`` (never builds the
        ``-inf``-padded target-vocab logits)."""
        return self.draft_to_target(self.compute_draft_logits(h).argmax(-1))

    @torch.no_grad()
    def draft_greedy(self, input_ids: Tensor, positions: Tensor, hidden_states: Tensor, num_tokens: int,
                     cache: Optional[DrafterKVCache] = None) -> Tensor:
        """Greedy drafting for one sequence: run ``forward`` over ``[T]`` ids/positions and
        combined hidden states (a prefill, or the new tokens of a step), then feed back
        ``num_tokens - 1`` times the last drafted token with the fed-back hidden state.
        Returns the ``num_tokens`` drafted target-vocab ids ``[num_tokens]``. With a cache
        it is extended by T + num_tokens - 1 positions."""
        if input_ids.dim() != 1:
            raise ValueError(f"draft_greedy takes one sequence: [T] ids, got {tuple(input_ids.shape)}")
        cache = DrafterKVCache() if cache is None else cache
        out, fed = self(input_ids, positions, hidden_states, cache)
        drafted = []
        pos = positions[-1]
        for i in range(num_tokens):
            token = self.top_tokens(out[-1:])
            drafted.append(token)
            if i + 1 == num_tokens:
                break
            pos = pos + 1
            out, fed = self(token, pos.reshape(1), fed[-1:], cache)
        return torch.cat(drafted)

    # ---- loading -------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, Tensor]], strict: bool = True) -> "loading.LoadReport":
        """Load ``(name, tensor)`` pairs in any of the three layouts (original ``midlayer.*``,
        speculators ``layers.N.*``, serving ``model.`` + fused ``qkv_proj`` / ``gate_up_proj``).
        Raises :class:`CheckpointError` listing every unexpected / missing key and shape
        mismatch (with ``strict=False`` only shape mismatches raise). ``embed_tokens`` and
        ``lm_head`` may be absent: they are listed in the report and in ``missing_weights``."""
        return loading.load_weights(self, weights, strict=strict)

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], *, dtype: Optional[torch.dtype] = None,
                        device=None, target_num_layers: Optional[int] = None, strict: bool = True,
                        target: Optional[nn.Module] = None) -> "Eagle3Drafter":
        """Read a checkpoint folder (config.json + ``*.safetensors`` or torch ``*.bin`` /
        ``*.pt`` files) or one weights file next to its config.json. ``dtype`` defaults to the
        checkpoint's fc weight dtype. ``target``: a target model to take missing
        ``embed_tokens`` / ``lm_head`` from. Returned in eval mode, parameters not requiring grad."""
        return loading.from_pretrained(cls, path, dtype=dtype, device=device, target_num_layers=target_num_layers,
                                       strict=strict, target=target)

    def save_pretrained(self, folder: Union[str, os.PathLike], layout: str = "speculators",
                        safe_serialization: bool = True) -> None:
        """Write config.json and the weights in ``layout`` ("speculators", "eagle3" or
        "serving") as ``model.safetensors`` (or ``pytorch_model.bin``)."""
        loading.save_pretrained(self, folder, layout=layout, safe_serialization=safe_serialization)

    def set_target_weights(self, target: Optional[nn.Module] = None, *, embed_tokens: Optional[Tensor] = None,
                           lm_head: Optional[Tensor] = None) -> list:
        """Give the weights shared with the target model: from ``target`` (its input
        embeddings and output head, found by ``get_input_embeddings`` / ``get_output_embeddings``
        or by the parameter names ``*embed_tokens.weight`` / ``*lm_head.weight``) or as
        tensors. A ``[vocab, H]`` lm_head is reduced to the draft vocab's rows through d2t.
        A parameter of the right dtype and device is shared, anything else copied. Returns
        the names set."""
        return loading.set_target_weights(self, target, embed_tokens=embed_tokens, lm_head=lm_head)

    def extra_repr(self) -> str:
        c = self.config
        return (f"hidden_size={c.hidden_size}, target_hidden_size={c.target_hidden_size}, "
                f"num_aux={c.num_aux_hidden_states}, norm={self.norm_mode!r}, norm_output={c.norm_output}, "
                f"norm_before_residual={c.norm_before_residual}, layers={c.num_hidden_layers}")
