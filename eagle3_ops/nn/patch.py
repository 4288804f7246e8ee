"""Swap eagle3_ops modules into an existing PyTorch drafter, in place, and undo it.

``patch_drafter(model)`` walks the model and replaces, keeping every parameter (the same
``nn.Parameter`` objects, so state-dict keys, ``load_state_dict`` and optimisers see no
change):

* **RMSNorm modules** -- a module whose class name ends in ``RMSNorm`` (Hugging Face,
  vLLM-style, custom) or a ``torch.nn.RMSNorm``, whose only parameter is a 1-D ``weight``
  and whose epsilon is in ``variance_epsilon``, ``eps`` or ``epsilon`` -- by
  :class:`eagle3_ops.nn.RMSNorm`. Each swap is verified on a random probe first: a norm
  that computes something else (e.g. Gemma's ``(1 + weight)``) is left alone and reported.
  The swapped norm returns x's dtype (a Hugging Face norm with an fp32 weight on bf16
  input returns fp32).
* **the combine** -- a module with an ``fc`` ``nn.Linear`` (no bias) and either an
  ``input_norm`` norm over the fc's whole input (norm_before_fc) or an ``fc_norm`` list of K
  norms over its K chunks: ``fc`` becomes a :class:`FusedNormLinear` that computes
  ``fc(norm(x))`` with one ``rms_norm_cat_linear`` call on the folded weight, and the norms
  become :class:`FoldedRMSNorm` pass-throughs that keep their weights. This assumes the
  model applies those norms only to the fc's input (as every EAGLE-3 implementation does).
  A module with both norms (which the design rejects) is left alone and reported.

``unpatch_drafter(model)`` puts the original modules back (re-binding any parameter that
was replaced meanwhile, e.g. by ``load_state_dict(assign=True)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .combine import Eagle3Combine, FoldedRMSNorm, FusedNormLinear
from .drafter import Eagle3Drafter
from .norm import RMSNorm

__all__ = ["PatchReport", "patch_drafter", "unpatch_drafter", "is_rms_norm_like"]

_UNDO_ATTR = "_eagle3_ops_patches"


@dataclass
class PatchReport:
    swapped: list = field(default_factory=list)  # "name: OldClass -> NewClass"
    skipped: list = field(default_factory=list)  # "name: reason"

    def __str__(self) -> str:
        return f"swapped {len(self.swapped)}: {self.swapped}; skipped {len(self.skipped)}: {self.skipped}"


def _eps_of(mod: nn.Module) -> Optional[float]:
    for attr in ("variance_epsilon", "eps", "epsilon"):
        v = getattr(mod, attr, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    if isinstance(mod, nn.RMSNorm) and mod.eps is None:  # torch's default: finfo(dtype).eps
        return float(torch.finfo(mod.weight.dtype).eps)
    return None


def is_rms_norm_like(mod: nn.Module) -> bool:
    """A candidate for RMSNorm: named ``*RMSNorm`` (or a torch.nn.RMSNorm), one 1-D
    ``weight`` parameter and no other parameters, a numeric epsilon."""
    if isinstance(mod, (RMSNorm, FoldedRMSNorm)):
        return False
    if not (isinstance(mod, nn.RMSNorm) or type(mod).__name__.lower().endswith("rmsnorm")):
        return False
    params = dict(mod.named_parameters())
    w = params.get("weight")
    return list(params) == ["weight"] and w is not None and w.dim() == 1 and _eps_of(mod) is not None


def _foldable_norm(mod: nn.Module) -> bool:
    return isinstance(mod, RMSNorm) or is_rms_norm_like(mod)


@torch.no_grad()
def _agrees(old: nn.Module, new: nn.Module) -> tuple[bool, str]:
    """Run both on a random probe (two rows, the weight's dtype and device)."""
    w = old.weight
    x = torch.randn(2, w.shape[0], device=w.device, dtype=torch.float32).to(w.dtype)
    try:
        a = old(x)
        b = new(x)
    except Exception as e:  # noqa: BLE001 - report whatever the foreign module raised
        return False, f"probe failed: {type(e).__name__}: {e}"
    if not isinstance(a, torch.Tensor) or a.shape != b.shape:
        return False, f"probe output differs in type/shape ({type(a).__name__} {getattr(a, 'shape', '')})"
    tol = 1e-4 if w.dtype == torch.float32 else 2e-2
    err = ((a.float() - b.float()).norm() / a.float().norm().clamp_min(1e-30)).item()
    if not err <= tol:
        return False, f"computes something else (relative difference {err:.3g} on a probe)"
    return True, ""


def _set_child(parent: nn.Module, name: str, mod: nn.Module) -> None:
    parent._modules[name] = mod


def _record(model: nn.Module, parent: nn.Module, name: str, original: nn.Module, new: nn.Module) -> None:
    undo = model.__dict__.setdefault(_UNDO_ATTR, [])
    undo.append((parent, name, original, new))


def _patch_combine(model, parent, pname, report, verify) -> set:
    """Swap parent.fc / parent.input_norm / parent.fc_norm; returns the ids of the norms folded."""
    fc = parent._modules.get("fc")
    input_norm = parent._modules.get("input_norm")
    fc_norm = parent._modules.get("fc_norm")
    where = f"{pname}.fc" if pname else "fc"
    if isinstance(parent, (Eagle3Drafter, Eagle3Combine)):
        return set()  # computes the combine with rms_norm_cat_linear already
    if not isinstance(fc, nn.Linear) or (input_norm is None and fc_norm is None):
        return set()
    if fc.bias is not None:
        report.skipped.append(f"{where}: has a bias (an EAGLE-3 fc has none)")
        return set()
    if input_norm is not None and fc_norm is not None:
        report.skipped.append(f"{where}: both input_norm and fc_norm are present (norm_before_fc and fc_norm "
                              f"are mutually exclusive)")
        return set()
    if input_norm is not None:
        norms, mode, num_aux = [input_norm], "shared", 1
        if not _foldable_norm(input_norm) or input_norm.weight.shape[0] != fc.in_features:
            report.skipped.append(f"{where}: input_norm is not an RMSNorm of width fc.in_features={fc.in_features}")
            return set()
    else:
        norms, mode, num_aux = list(fc_norm), "chunk", len(fc_norm)
        widths = [n.weight.shape[0] if _foldable_norm(n) else None for n in norms]
        if (not isinstance(fc_norm, nn.ModuleList) or not norms or None in widths or len(set(widths)) != 1
                or widths[0] * num_aux != fc.in_features):
            report.skipped.append(f"{where}: fc_norm is not a list of equal-width RMSNorms covering "
                                  f"fc.in_features={fc.in_features} (widths {widths})")
            return set()
    eps = {_eps_of(n) for n in norms}
    if len(eps) != 1:
        report.skipped.append(f"{where}: the fc norms have different epsilons {sorted(eps)}")
        return set()
    eps = eps.pop()
    folded = [FoldedRMSNorm(n.weight, eps) for n in norms]
    fused = FusedNormLinear(fc.weight, folded, mode, eps, num_aux)
    if verify:
        with torch.no_grad():
            x = torch.randn(2, fc.in_features, device=fc.weight.device).to(fc.weight.dtype)
            if mode == "shared":
                want = fc(norms[0](x))
            else:
                want = fc(torch.cat([n(a) for n, a in zip(norms, x.chunk(num_aux, -1))], -1))
            got = fused(x)
            tol = 1e-4 if fc.weight.dtype == torch.float32 else 3e-2
            err = ((want.float() - got.float()).norm() / want.float().norm().clamp_min(1e-30)).item()
        if not err <= tol:
            report.skipped.append(f"{where}: fused fc disagrees with the original (relative difference {err:.3g})")
            return set()
    _record(model, parent, "fc", fc, fused)
    _set_child(parent, "fc", fused)
    report.swapped.append(f"{where}: Linear -> FusedNormLinear(norm={mode!r})")
    if mode == "shared":
        _record(model, parent, "input_norm", input_norm, folded[0])
        _set_child(parent, "input_norm", folded[0])
        report.swapped.append(f"{pname + '.' if pname else ''}input_norm: {type(input_norm).__name__} -> FoldedRMSNorm")
    else:
        for i, (n, f) in enumerate(zip(norms, folded)):
            _record(model, fc_norm, str(i), n, f)
            _set_child(fc_norm, str(i), f)
            report.swapped.append(f"{pname + '.' if pname else ''}fc_norm.{i}: {type(n).__name__} -> FoldedRMSNorm")
    return {id(n) for n in norms}


def patch_drafter(model: nn.Module, *, rms_norm: bool = True, combine: bool = True,
                  verify: bool = True) -> PatchReport:
    """Swap eagle3_ops modules into ``model`` in place (see the module docstring). Returns
    what was swapped and what was skipped (and why). Calling it twice is harmless."""
    report = PatchReport()
    folded: set = set()
    if combine:
        for pname, parent in list(model.named_modules()):
            folded |= _patch_combine(model, parent, pname, report, verify)
    if rms_norm:
        for pname, parent in list(model.named_modules()):
            for cname, child in list(parent._modules.items()):
                if child is None or id(child) in folded or not is_rms_norm_like(child):
                    continue
                name = f"{pname}.{cname}" if pname else cname
                new = RMSNorm(child.weight.shape[0], _eps_of(child), device="meta")
                new.weight = child.weight
                if verify:
                    ok, why = _agrees(child, new)
                    if not ok:
                        report.skipped.append(f"{name}: {type(child).__name__} {why}")
                        continue
                _record(model, parent, cname, child, new)
                _set_child(parent, cname, new)
                report.swapped.append(f"{name}: {type(child).__name__} -> RMSNorm")
    return report


def unpatch_drafter(model: nn.Module) -> list:
    """Undo every :func:`patch_drafter` on ``model``; returns the names restored. The
    original modules get the current parameters back (the same objects as the swapped-in
    modules hold, so edits made while patched are kept)."""
    undo = model.__dict__.pop(_UNDO_ATTR, [])
    names = {id(m): n for n, m in model.named_modules()}
    restored = []
    for parent, name, original, new in reversed(undo):
        if parent._modules.get(name) is not new:
            continue  # replaced by someone else since: leave it
        for pn, p in new.named_parameters(recurse=False):
            if original._parameters.get(pn) is not p and pn in original._parameters:
                original._parameters[pn] = p
        _set_child(parent, name, original)
        pn = names.get(id(parent), "")
        restored.append(f"{pn}.{name}" if pn else name)
    return restored
