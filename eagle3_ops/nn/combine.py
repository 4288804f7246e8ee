"""The EAGLE-3 combine: ``fc(norm(cat(aux)))`` as one ``eagle3.rms_norm_cat_linear`` call.

The norm weights are folded into the fc weight's columns once (``fold_norm_weights``, in
float64, cast once) and the folded weight is cached. The cache is rebuilt whenever one of
the parameters it came from changes: a different tensor object, a bumped ``_version``
(``load_state_dict``, ``param.copy_``, any in-place op), a different ``data_ptr``, device,
dtype, shape or stride (``.to()``, ``.half()``, ``param.data = ...``). Edits that bypass
the version counter (writing through ``param.data`` in place, or editing parameters that
were created under ``torch.inference_mode`` and so have no version counter) cannot be
seen: call ``refresh()`` after them. Under ``torch.compile`` the fold is traced into the graph
instead of cached (always fresh; inductor's freezing constant-folds it).
"""

from __future__ import annotations

import weakref
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..config import resolve
from . import reference_modules as ref
from .norm import RMSNorm, use_kernels

__all__ = ["Eagle3Combine", "FoldedWeightCache", "FusedNormLinear", "FoldedRMSNorm", "combine_aux"]


def _tensor_key(t: Tensor):
    version = -1 if t.is_inference() else t._version
    return (weakref.ref(t), version, t.data_ptr(), t.device, t.dtype, tuple(t.shape), tuple(t.stride()))


def _same_key(a, b) -> bool:
    if a is None or len(a) != len(b):
        return False
    for ka, kb in zip(a, b):
        if ka[0]() is None or ka[0]() is not kb[0]() or ka[1:] != kb[1:]:
            return False
    return True


class FoldedWeightCache:
    """``fold_norm_weights(fc_weight, norm_weights)``, rebuilt when any input tensor changes."""

    def __init__(self):
        self._key = None
        self._value: Optional[Tensor] = None

    def clear(self) -> None:
        self._key, self._value = None, None

    def get(self, fc_weight: Tensor, norm_weights: Sequence[Tensor]) -> Tensor:
        if torch.compiler.is_compiling():
            return ops.fold_norm_weights(fc_weight, list(norm_weights))
        key = tuple(_tensor_key(t) for t in (fc_weight, *norm_weights))
        if not _same_key(self._key, key):
            self._value = None  # free the stale copy before building the new one
            with torch.no_grad():
                self._value = ops.fold_norm_weights(fc_weight.detach(), [w.detach() for w in norm_weights])
            self._key = key
        return self._value


def _split_aux(aux: Union[Tensor, Sequence[Tensor]], num_aux: int, width: int, split: bool) -> list:
    """The aux input as the list of chunks the op reads: the K aux states (``split``) or one
    ``[..., K*width]`` tensor."""
    total = num_aux * width
    if isinstance(aux, Tensor):
        if aux.dim() < 1 or aux.shape[-1] != total:
            raise ValueError(f"aux hidden states must be [..., {total}] (num_aux_hidden_states={num_aux} x "
                             f"target_hidden_size={width}), got shape {tuple(aux.shape)}")
        return list(aux.split(width, dim=-1)) if split else [aux]
    if not isinstance(aux, (list, tuple)) or not all(isinstance(a, Tensor) for a in aux):
        raise TypeError(f"aux must be a tensor [..., {total}] or a list of {num_aux} tensors, got {type(aux).__name__}")
    if len(aux) != num_aux:
        raise ValueError(f"expected {num_aux} aux hidden states (num_aux_hidden_states), got {len(aux)}")
    for k, a in enumerate(aux):
        if a.shape[-1:] != (width,) or a.shape[:-1] != aux[0].shape[:-1]:
            raise ValueError(f"aux[{k}] must be [..., {width}] (target_hidden_size) with aux[0]'s leading shape "
                             f"{tuple(aux[0].shape[:-1])}, got {tuple(a.shape)}")
    return list(aux)


def combine_aux(aux, fc_weight: Tensor, norm: str, norm_weights: Sequence[Tensor], eps: float,
                num_aux: int, width: int, cache: FoldedWeightCache) -> Tensor:
    """``fc(norm_cat(aux))``: ``norm`` is "none", "shared" (norm_before_fc: one weight of
    width K*width) or "chunk" (fc_norm: K weights of width ``width``)."""
    xs = _split_aux(aux, num_aux, width, split=(norm == "chunk"))
    if use_kernels(xs[0], fc_weight, *norm_weights):
        w = fc_weight if norm == "none" else cache.get(fc_weight, norm_weights)
        return ops.rms_norm_cat_linear(xs, w, eps, norm)
    x = torch.cat(xs, dim=-1) if len(xs) > 1 else xs[0]
    if norm == "shared":
        x = ref.rms_norm(x, norm_weights[0], eps)
    elif norm == "chunk":
        x = torch.cat([ref.rms_norm(a, w, eps) for a, w in zip(x.split(width, dim=-1), norm_weights)], dim=-1)
    return F.linear(x, fc_weight)


class CombineParams:
    """The parameters of the EAGLE-3 fc and its folded weight: ``fc`` (``Linear(K*H_t -> H)``,
    no bias) and, per config, ``input_norm`` (norm_before_fc: one RMSNorm over the K*H_t row)
    or ``fc_norm.{k}`` (fc_norm: one RMSNorm per aux chunk); the absent one is None.

    Shared by :class:`Eagle3Combine` and the drafters, whose checkpoints keep these
    parameters at the top level. Mixed into an ``nn.Module`` that has a resolved ``config``.
    """

    def _init_combine(self, c, **fk) -> None:
        self.fc = nn.Linear(c.fc_in_features, c.hidden_size, bias=False, **fk)
        self.input_norm = RMSNorm(c.fc_in_features, c.rms_norm_eps, **fk) if c.norm_before_fc else None
        self.fc_norm = (nn.ModuleList(RMSNorm(c.target_hidden_size, c.rms_norm_eps, **fk)
                                      for _ in range(c.num_aux_hidden_states)) if c.fc_norm else None)
        self._folded = FoldedWeightCache()

    @property
    def norm_mode(self) -> str:
        return "shared" if self.input_norm is not None else "chunk" if self.fc_norm is not None else "none"

    def norm_weights(self) -> list:
        if self.input_norm is not None:
            return [self.input_norm.weight]
        if self.fc_norm is not None:
            return [n.weight for n in self.fc_norm]
        return []

    def refresh(self) -> None:
        """Drop the cached folded fc weight (needed only after edits through ``param.data``)."""
        self._folded.clear()

    def _combine(self, aux: Union[Tensor, Sequence[Tensor]]) -> Tensor:
        c = self.config
        return combine_aux(aux, self.fc.weight, self.norm_mode, self.norm_weights(), c.rms_norm_eps,
                           c.num_aux_hidden_states, c.target_hidden_size, self._folded)


class Eagle3Combine(CombineParams, nn.Module):
    """The EAGLE-3 fc over the K aux hidden states (parameters: see :class:`CombineParams`).

    ``forward(aux)`` takes ``[..., K*H_t]`` (1-D too) or a list of K ``[..., H_t]`` tensors
    and returns ``[..., H]`` through one ``rms_norm_cat_linear`` call with the cached folded
    weight (see the module docstring for when it is rebuilt; ``refresh()`` drops it).
    """

    def __init__(self, config, *, device=None, dtype=None):
        super().__init__()
        c = self.config = resolve(config)
        self._init_combine(c, device=device, dtype=dtype)

    def forward(self, aux: Union[Tensor, Sequence[Tensor]]) -> Tensor:
        return self._combine(aux)

    def extra_repr(self) -> str:
        c = self.config
        return f"num_aux={c.num_aux_hidden_states}, target_hidden_size={c.target_hidden_size}, norm={self.norm_mode!r}"


class FoldedRMSNorm(nn.Module):
    """Put in place of a norm whose effect is folded into the next ``fc`` by
    :func:`eagle3_ops.nn.patch_drafter`: keeps the norm's ``weight`` (same parameter, same
    state-dict key) and returns its input unchanged."""

    def __init__(self, weight: nn.Parameter, eps: float):
        super().__init__()
        self.weight = weight
        self.variance_epsilon = float(eps)

    def forward(self, x: Tensor) -> Tensor:
        return x

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.variance_epsilon}, folded into the next fc"


class FusedNormLinear(nn.Module):
    """Put in place of an ``fc`` ``nn.Linear`` whose input was normalised by ``input_norm``
    (norm "shared") or ``fc_norm`` (norm "chunk"), by :func:`eagle3_ops.nn.patch_drafter`.
    Keeps the Linear's ``weight`` (same parameter and key); reads the norm weights from the
    :class:`FoldedRMSNorm` modules that replaced the norms (not registered here, so the state
    dict is unchanged) and computes ``fc(norm(x))`` with one ``rms_norm_cat_linear``."""

    def __init__(self, weight: nn.Parameter, norms: Sequence[nn.Module], norm: str, eps: float, num_aux: int):
        super().__init__()
        self.weight = weight
        self.out_features, self.in_features = weight.shape
        self.norm, self.eps, self.num_aux = norm, float(eps), num_aux
        self._norm_modules = list(norms)  # a plain list: not registered as children
        self._folded = FoldedWeightCache()

    def refresh(self) -> None:
        self._folded.clear()

    def forward(self, x: Tensor) -> Tensor:
        return combine_aux(x, self.weight, self.norm, [m.weight for m in self._norm_modules], self.eps,
                           self.num_aux, self.in_features // self.num_aux, self._folded)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, norm={self.norm!r}, " \
               f"num_aux={self.num_aux}"
