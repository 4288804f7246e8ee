"""eagle3_ops: fused kernels for EAGLE-3 speculative-decoding drafters.

Operators live under ``torch.ops.eagle3``; the functions here are thin wrappers with
the same arguments. ``eagle3_ops.reference`` holds the pure-PyTorch truth of each op,
``eagle3_ops.config`` reads drafter configs, ``eagle3_ops.nn`` holds drop-in modules.
"""

from importlib.machinery import EXTENSION_SUFFIXES as _SUFFIXES
from pathlib import Path as _Path

import torch as _torch

# The library this interpreter's build wrote (setup.py names it like an extension module).
_lib = next((p for p in (_Path(__file__).parent / f"_C{s}" for s in _SUFFIXES) if p.exists()), None)
if _lib is None:
    raise ImportError(
        "eagle3_ops: the compiled library eagle3_ops/_C.so is missing; "
        "build it with `pip install --no-build-isolation -e .`"
    )
_torch.ops.load_library(str(_lib))

from .ops import (  # noqa: E402
    fold_norm_weights,
    fused_add_rms_norm,
    has_cuda_kernels,
    rms_norm_cat,
    rms_norm_cat_linear,
)

__all__ = [
    "rms_norm_cat",
    "fused_add_rms_norm",
    "rms_norm_cat_linear",
    "fold_norm_weights",
    "has_cuda_kernels",
]
__version__ = "0.1.0"
