"""SSM families the compression pipeline knows, and the lookups every stage uses to reach a model's mixers.

A new family plugs in by subclassing `SSMFamily` and appending an instance to `FAMILIES`.
"""

from __future__ import annotations

from torch import nn

from .base import LayerStatistics, ShrinkAxis, SSMFamily
from .mamba import MambaFamily
from .mamba2 import Mamba2Family


FAMILIES: list[SSMFamily] = [MambaFamily(), Mamba2Family()]


def family_of_mixer(module: nn.Module) -> SSMFamily | None:
    """The family whose mixer ``module`` is, or None."""
    for family in FAMILIES:
        if family.is_mixer(module):
            return family
    return None


def find_mixers(model: nn.Module) -> list[nn.Module]:
    """Every SSM mixer of ``model`` (any known family), in layer order."""
    return [m for m in model.modules() if family_of_mixer(m) is not None]


def family_of(model: nn.Module) -> SSMFamily:
    """The one family of ``model``'s mixers; `ValueError` when it has none (or mixes families)."""
    families = {id(f): f for f in (family_of_mixer(m) for m in model.modules()) if f is not None}
    if not families:
        known = ", ".join(f.name for f in FAMILIES)
        raise ValueError(f"{type(model).__name__} has no SSM mixers of a known family ({known}): nothing to compress.")
    if len(families) > 1:
        raise ValueError(f"{type(model).__name__} mixes SSM families {[f.name for f in families.values()]}.")
    return next(iter(families.values()))


def layer_state_sizes(model: nn.Module) -> list[int]:
    """State size of every SSM layer of ``model``, read from the parameters (stock models included)."""
    return [family_of_mixer(m).state_size(m) for m in find_mixers(model)]


def check_per_layer_model(model: nn.Module) -> SSMFamily:
    """The model's family, after checking that its config lets each layer keep its own size."""
    family = family_of(model)
    if not family.per_layer_config(getattr(model, "config", None)):
        raise ValueError(
            f"{type(model).__name__} has one state_size for all layers; convert it first with {family.convert_hint} "
            "so that each layer can keep its own size."
        )
    return family


__all__ = [
    "FAMILIES",
    "LayerStatistics",
    "Mamba2Family",
    "MambaFamily",
    "SSMFamily",
    "ShrinkAxis",
    "check_per_layer_model",
    "family_of",
    "family_of_mixer",
    "find_mixers",
    "layer_state_sizes",
]
