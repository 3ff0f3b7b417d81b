"""LoRA targets for (compressed) SSM models with PEFT, per `SSMFamily` (`LoraTargets`) and the mixer's kernel plan.

PEFT has no default targets for Mamba. Whether an adapter trains depends on whether the mixer calls the wrapped
projection as a module or reads its weight directly, which the mixer's ``kernel_plan`` decides per call:

* Mamba-1 (`MAMBA_LORA`): ``in_proj``, ``x_proj`` and ``out_proj`` are called as modules on every
  unfused path (CPU; CUDA without ``mamba_ssm``; evaluation and generation). The fused CUDA training kernel
  ``mamba_inner_fn`` reads ``x_proj``, ``dt_proj`` and ``out_proj`` weights directly, but the mixer runs it only
  when those are plain ``nn.Linear``: LoRA on ``x_proj``/``out_proj`` turns the fused path off, so it trains
  (at the unfused path's speed); LoRA on ``in_proj`` alone keeps the fused kernel. ``dt_proj`` and ``conv1d``
  never train (their weights are always used directly).
* Mamba-2 (`MAMBA2_LORA`): ``in_proj`` and ``out_proj``, the same way (a wrapped ``out_proj``
  turns ``mamba_split_conv1d_scan_combined`` off); ``conv1d`` never.

Stock transformers mixers have no plan; with ``mamba_ssm`` installed their CUDA training path is the fused kernel
whatever the modules, so only ``in_proj`` trains there. A compressed model has different projection sizes per layer;
PEFT sizes each adapter from its own module, so LoRA works unchanged. Reload adapters onto the reduced base loaded
from the compressed folder.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import logging

from .families import Mamba2Family, MambaFamily, SSMFamily, family_of, find_mixers


logger = logging.get_logger(__name__)


@dataclass(frozen=True)
class LoraTargets:
    """Where LoRA adapters train in one family's mixers."""

    #: Called as modules on every unfused path (LoRA works there).
    module: tuple[str, ...]
    #: The only module calls of the fused CUDA training kernel.
    fused: tuple[str, ...]
    #: Weights always read directly: LoRA there never receives a gradient.
    never: tuple[str, ...]


#: Mamba-1: ``mamba_inner_fn`` reads every weight but ``in_proj``'s directly.
MAMBA_LORA = LoraTargets(module=("in_proj", "x_proj", "out_proj"), fused=("in_proj",), never=("dt_proj", "conv1d"))
#: Mamba-2 (and the hybrid hosts' Mamba-2 layers): ``mamba_split_conv1d_scan_combined`` reads ``out_proj`` directly.
MAMBA2_LORA = LoraTargets(module=("in_proj", "out_proj"), fused=("in_proj",), never=("conv1d",))

MODULE_TARGETS = MAMBA_LORA.module  # Mamba-1: called as modules on the non-fused path
FUSED_TARGETS = MAMBA_LORA.fused  # Mamba-1: the only module call of the fused CUDA training path
NEVER_TARGETS = MAMBA_LORA.never  # weights read directly: LoRA there never receives a gradient


def lora_targets_of(family: SSMFamily) -> LoraTargets:
    """The `LoraTargets` of ``family``."""
    if isinstance(family, Mamba2Family):
        return MAMBA2_LORA
    if isinstance(family, MambaFamily):
        return MAMBA_LORA
    raise ValueError(f"no LoRA targets known for the SSM family {family.name!r}.")


class _AdapterProbe(nn.Module):
    """Stands in for a PEFT wrapper while a mixer is asked for its plan (not a plain ``nn.Linear``)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def __getattr__(self, name: str):  # like PEFT's layers: other attributes (``weight``, ...) are the base layer's
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


def _device(model: nn.Module, device) -> torch.device:
    return torch.device(device) if device is not None else next(model.parameters()).device


def _training_plans(model: nn.Module, device, wrapped: Iterable[str] = ()) -> list | None:
    """Each mixer's kernel plan for a training forward on ``device``, as if the child modules named in ``wrapped``
    carried adapters (the mixer is asked, with its modules restored after); None for mixers without a plan."""
    mixers = find_mixers(model)
    if not mixers or not all(hasattr(m, "kernel_plan") for m in mixers):
        return None
    device = _device(model, device)
    plans = []
    for mixer in mixers:
        swapped = {n: mixer._modules[n] for n in set(wrapped) if mixer._modules.get(n) is not None}
        was_training = mixer.training
        dtype = next(mixer.parameters()).dtype
        try:
            for name, child in swapped.items():
                if type(child) in (nn.Linear, nn.Conv1d):  # already wrapped modules stay as they are
                    mixer._modules[name] = _AdapterProbe(child)
            mixer.training = True
            plans.append(mixer.kernel_plan(device, dtype))
        finally:
            mixer.training = was_training
            mixer._modules.update(swapped)
    return plans


def _stock_fused(model: nn.Module, device) -> bool:
    """A stock transformers mixer's CUDA training path is the fused kernel when ``mamba_ssm`` is installed."""
    return _device(model, device).type == "cuda" and importlib.util.find_spec("mamba_ssm") is not None


def uses_fused_cuda_path(model: nn.Module, device: torch.device | str | None = None) -> bool:
    """Whether training ``model`` as it is (adapters included) on ``device`` (default: where its parameters are)
    runs the fused ``mamba_ssm`` kernel in some layer, which reads every projection but ``in_proj`` directly."""
    if not find_mixers(model):
        return False
    plans = _training_plans(model, device)
    if plans is None:
        return _stock_fused(model, device)
    return any(plan.fused for plan in plans)


def _effective(model: nn.Module, names: Iterable[str], device) -> set[str]:
    """The entries of ``names`` (module names) whose adapters train when all of them carry one."""
    targets = lora_targets_of(family_of(model))
    names = set(names)
    plans = _training_plans(model, device, wrapped=names)
    fused = _stock_fused(model, device) if plans is None else any(plan.fused for plan in plans)
    return names & set(targets.fused if fused else targets.module)


def default_lora_targets(model: nn.Module, device: torch.device | str | None = None) -> list[str]:
    """LoRA ``target_modules`` that take effect when training ``model`` on ``device`` (all of them adapted)."""
    targets = lora_targets_of(family_of(model))
    effective = _effective(model, targets.module, device)
    return [t for t in targets.module if t in effective]


def ineffective_lora_targets(
    model: nn.Module, target_modules: list[str] | tuple[str, ...], device: torch.device | str | None = None
) -> list[str]:
    """The entries of ``target_modules`` whose adapters would receive no gradient on ``device`` (logged)."""
    targets = lora_targets_of(family_of(model))
    names = [t.split(".")[-1] for t in target_modules]
    known = set(targets.module) | set(targets.never)
    effective = _effective(model, [n for n in names if n in known], device)
    bad = [t for t, n in zip(target_modules, names) if n in known and n not in effective]
    if bad:
        logger.warning(f"LoRA on {bad} will not train here (effective targets: {sorted(effective)}).")
    return bad


__all__ = [
    "FUSED_TARGETS",
    "LoraTargets",
    "MAMBA2_LORA",
    "MAMBA_LORA",
    "MODULE_TARGETS",
    "NEVER_TARGETS",
    "default_lora_targets",
    "ineffective_lora_targets",
    "lora_targets_of",
    "uses_fused_cuda_path",
]
