"""Pick the drafter class a config describes, and load a checkpoint into it."""

from __future__ import annotations

import os
from typing import Optional, Union

import torch
from torch import nn

from ..config import resolve
from .deepseek import Eagle3DeepseekDrafter
from .drafter import Eagle3Drafter
from .llama import Eagle3LlamaDrafter

__all__ = ["drafter_class", "load_drafter"]


def drafter_class(config) -> type:
    """:class:`Eagle3DeepseekDrafter` when the config describes multi-head latent attention
    (``kv_lora_rank`` ...), else :class:`Eagle3LlamaDrafter`. ``config``: anything
    :func:`eagle3_ops.config.resolve` accepts."""
    return Eagle3DeepseekDrafter if resolve(config).mla is not None else Eagle3LlamaDrafter


def load_drafter(path: Union[str, os.PathLike], *, dtype: Optional[torch.dtype] = None, device=None,
                 target_num_layers: Optional[int] = None, strict: bool = True,
                 target: Optional[nn.Module] = None) -> Eagle3Drafter:
    """``drafter_class(path).from_pretrained(path, ...)``: a checkpoint folder (or one weights
    file next to its config.json) into the drafter its config describes."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.fspath(path)) or "."
    cls = drafter_class(resolve(folder, target_num_layers=target_num_layers))
    return cls.from_pretrained(path, dtype=dtype, device=device, target_num_layers=target_num_layers,
                               strict=strict, target=target)
