"""SSM families the compression pipeline knows, and the lookups every stage uses to reach a model's mixers.

A new family plugs in by subclassing `SSMFamily` and appending an instance to `FAMILIES` (and registering its scores
in `hf_compressssm.compression.scoring`); a new hybrid host whose SSM layers are Mamba-2 layers is one more
`Mamba2Host` description (`families.mamba2`). `ssm_layers(model)` resolves a model's family and mixers once; the
pipeline passes the resulting `SSMLayers` down instead of looking them up again.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .base import ShrinkAxis, SSMFamily
from .mamba import MambaFamily
from .mamba2 import HOSTS, Mamba2Family, Mamba2Host


FAMILIES: list[SSMFamily] = [MambaFamily(), *(Mamba2Family(host) for host in HOSTS)]

# Hybrid or SSM architectures of transformers whose layers this package does not compress (yet), by model_type.
UNSUPPORTED_SSM_MODELS = {
    "falcon_h1": "Falcon-H1",
    "falcon_mamba": "Falcon-Mamba",
    "jamba": "Jamba",
    "zamba": "Zamba",
}


def supported_models() -> str:
    """The architectures whose SSM layers the pipeline compresses, for error messages."""
    hosts = [f"{h.title} ({h.stock_model_type}: {h.convert_hint})" for h in HOSTS]
    return f"Mamba ({MambaFamily.stock_model_type}: {MambaFamily.convert_hint}), " + ", ".join(hosts)


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
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        unsupported = UNSUPPORTED_SSM_MODELS.get(model_type)
        what = (
            f"is {unsupported} (model_type {model_type!r}), an architecture whose SSM layers hf_compressssm does not "
            f"support yet"
            if unsupported
            else "has no SSM mixers of a known family"
        )
        raise ValueError(
            f"{type(model).__name__} {what}: nothing to compress. Supported architectures: {supported_models()}."
        )
    if len(families) > 1:
        raise ValueError(f"{type(model).__name__} mixes SSM families {[f.name for f in families.values()]}.")
    return next(iter(families.values()))


@dataclass(frozen=True)
class SSMLayers:
    """A model's SSM family and its mixers in layer order, resolved once (`ssm_layers`) and passed down."""

    family: SSMFamily
    mixers: tuple[nn.Module, ...]

    def state_sizes(self) -> list[int]:
        """State size of every layer, read from the parameters (`SSMFamily.state_size`)."""
        return [self.family.state_size(m) for m in self.mixers]

    def sync_state_sizes(self) -> None:
        """Bring every mixer's cached size attributes in line with its parameters."""
        for mixer in self.mixers:
            self.family.sync_state_size(mixer)


def ssm_layers(model: nn.Module, per_layer: bool = False) -> SSMLayers:
    """``model``'s family and mixers; ``per_layer``: also check that its config lets each layer keep its own size
    (`ValueError` naming the conversion otherwise)."""
    family = family_of(model)
    if per_layer and not family.per_layer_config(getattr(model, "config", None)):
        raise ValueError(
            f"{type(model).__name__} has one state_size for all layers; convert it first with {family.convert_hint} "
            "so that each layer can keep its own size."
        )
    return SSMLayers(family, tuple(m for m in model.modules() if family.is_mixer(m)))


def layer_state_sizes(model: nn.Module) -> list[int]:
    """State size of every SSM layer of ``model``, read from the parameters (stock models included)."""
    return [family_of_mixer(m).state_size(m) for m in find_mixers(model)]


def check_per_layer_model(model: nn.Module) -> SSMFamily:
    """The model's family, after checking that its config lets each layer keep its own size."""
    return ssm_layers(model, per_layer=True).family


__all__ = [
    "FAMILIES",
    "Mamba2Family",
    "Mamba2Host",
    "UNSUPPORTED_SSM_MODELS",
    "MambaFamily",
    "SSMFamily",
    "SSMLayers",
    "ShrinkAxis",
    "check_per_layer_model",
    "family_of",
    "family_of_mixer",
    "find_mixers",
    "layer_state_sizes",
    "ssm_layers",
    "supported_models",
]
