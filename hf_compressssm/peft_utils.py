"""LoRA targets for (compressed) SSM models with PEFT, from the model's `SSMFamily`.

PEFT has no default targets for Mamba. For Mamba-1: Which adapters take effect depends on how the mixer uses each projection:

* CPU, or CUDA without the fused kernel (and any evaluation / generation): ``in_proj``, ``x_proj`` and ``out_proj``
  are called as modules, so LoRA on them trains and changes the output;
* CUDA training with ``mamba_ssm`` installed (fused ``mamba_inner_fn``): only ``in_proj`` is called as a module; the
  kernel reads ``x_proj``, ``dt_proj`` and ``out_proj`` weights directly, so adapters there get no gradient;
* ``dt_proj`` and ``conv1d``: never (their weights are used directly), on any device.

A compressed model has a different ``x_proj`` output size per layer (``R + 2 N_i``); PEFT sizes each adapter from
its own module, so LoRA works unchanged. Reload adapters onto the reduced base loaded from the compressed folder.

Mamba-2 (`families.mamba2.Mamba2Family`): ``in_proj`` and ``out_proj`` on the torch path, only ``in_proj`` under the
fused ``mamba_split_conv1d_scan_combined`` CUDA training kernel, ``conv1d`` never. Its ``in_proj`` output size is
``2I + 2 G N_i + H`` per layer.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn
from transformers.utils import logging

from .families import MambaFamily, family_of, find_mixers


logger = logging.get_logger(__name__)

MODULE_TARGETS = MambaFamily.lora_targets  # Mamba-1: called as modules on the non-fused path
FUSED_TARGETS = MambaFamily.fused_lora_targets  # Mamba-1: the only module call of the fused CUDA training path
NEVER_TARGETS = MambaFamily.never_lora_targets  # weights read directly: LoRA there never receives a gradient


def uses_fused_cuda_path(model: nn.Module, device: torch.device | str | None = None) -> bool:
    """Whether training ``model`` on ``device`` (default: where its parameters are) runs the fused ``mamba_ssm``
    kernel, which bypasses LoRA on every projection but ``in_proj``."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if device.type != "cuda" or importlib.util.find_spec("mamba_ssm") is None:
        return False
    mixers = find_mixers(model)
    if not mixers:
        return False
    backend = getattr(mixers[0], "_backend", None)
    if backend is not None:
        return backend(device) == "mamba_ssm"
    return True  # stock MambaMixer: its CUDA path with mamba_ssm installed is the fused kernel


def default_lora_targets(model: nn.Module, device: torch.device | str | None = None) -> list[str]:
    """LoRA ``target_modules`` that take effect when training ``model`` on ``device``."""
    family = family_of(model)
    fused = getattr(family, "fused_lora_targets", family.lora_targets)
    return list(fused if uses_fused_cuda_path(model, device) else family.lora_targets)


def ineffective_lora_targets(
    model: nn.Module, target_modules: list[str] | tuple[str, ...], device: torch.device | str | None = None
) -> list[str]:
    """The entries of ``target_modules`` whose adapters would receive no gradient on ``device`` (logged)."""
    family = family_of(model)
    effective = set(default_lora_targets(model, device))
    names = [t.split(".")[-1] for t in target_modules]
    bad = [
        t
        for t, n in zip(target_modules, names)
        if n in family.never_lora_targets or (n in family.lora_targets and n not in effective)
    ]
    if bad:
        logger.warning(f"LoRA on {bad} will not train here (effective targets: {sorted(effective)}).")
    return bad


__all__ = [
    "FUSED_TARGETS",
    "MODULE_TARGETS",
    "NEVER_TARGETS",
    "default_lora_targets",
    "ineffective_lora_targets",
    "uses_fused_cuda_path",
]
