"""Drop-in modules on the eagle3 ops, checkpoint loading, and complete Llama and DeepSeek EAGLE-3 drafters.

* :class:`RMSNorm` -- ``forward(x, residual=None)`` -> normed or ``(normed, x + residual)``.
* :class:`Eagle3Combine` -- ``fc`` over the K aux hidden states with ``input_norm``
  (norm_before_fc) or ``fc_norm.{k}`` folded in: one ``rms_norm_cat_linear`` call.
* :class:`Eagle3LlamaDrafter` / :class:`Eagle3DeepseekDrafter` -- the draft model of
  DESIGN.md section 1 with Llama (grouped-query) or DeepSeek (multi-head latent) attention, with
  ``from_pretrained`` / ``load_weights`` for the original EAGLE-3, speculators and
  serving-engine layouts, a :class:`DrafterKVCache` for token-by-token drafting, and
  ``compute_logits`` through the ``d2t`` offsets; :func:`load_drafter` picks the class a
  checkpoint's config describes.
* :func:`patch_drafter` / :func:`unpatch_drafter` -- swap these into an existing
  PyTorch drafter in place (parameters kept) and back.
* :mod:`eagle3_ops.nn.reference_modules` -- the pure-PyTorch truth they are tested against.

The modules call the ops, which run the CUDA kernels for CUDA tensors and the CPU kernels
otherwise. Parameter names follow the speculators checkpoints so ``load_state_dict`` works
on real key sets.
"""

from .auto import drafter_class, load_drafter
from .combine import Eagle3Combine, FoldedRMSNorm, FoldedWeightCache, FusedNormLinear
from .drafter import DrafterKVCache, Eagle3DecoderLayer, Eagle3Drafter, Eagle3MLP
from .deepseek import Eagle3DeepseekDrafter, Eagle3MLAttention
from .llama import Eagle3Attention, Eagle3LlamaDrafter
from .loading import (
    CheckpointError,
    LoadReport,
    canonical_name,
    config_to_dict,
    read_checkpoint,
    state_dict_in_layout,
)
from .norm import RMSNorm
from .patch import PatchReport, patch_drafter, unpatch_drafter
from . import reference_modules

__all__ = [
    "RMSNorm",
    "Eagle3Combine",
    "Eagle3Drafter",
    "Eagle3LlamaDrafter",
    "Eagle3DeepseekDrafter",
    "Eagle3MLAttention",
    "drafter_class",
    "load_drafter",
    "Eagle3DecoderLayer",
    "Eagle3Attention",
    "Eagle3MLP",
    "DrafterKVCache",
    "FusedNormLinear",
    "FoldedRMSNorm",
    "FoldedWeightCache",
    "CheckpointError",
    "LoadReport",
    "canonical_name",
    "config_to_dict",
    "read_checkpoint",
    "state_dict_in_layout",
    "PatchReport",
    "patch_drafter",
    "unpatch_drafter",
    "reference_modules",
]
