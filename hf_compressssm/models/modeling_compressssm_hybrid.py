"""Stock transformers hybrids (Mamba-2 layers among attention / MoE layers) whose Mamba layers each have their own
SSM state size.

A host's causal LM is the stock class with `CompreSSMHybridMixin` listed first. The stock model is built as usual
(every Mamba layer at the cap ``mamba_d_state``), then each Mamba layer keeps the first ``config.mamba_state_sizes[i]``
states of every group: its ``in_proj`` B/C rows and ``conv1d`` channels shrink and its cached ``ssm_state_size`` /
``conv_dim`` follow. The stock Mamba layer reads those two attributes at call time, so the stock forward, the hybrid
cache (attention KV + per-layer SSM states, allocated from the real state tensors), generation and gradient
checkpointing run unchanged; attention and MoE layers are the stock ones. ``from_pretrained`` of a compressed folder
builds the layers at their saved sizes before the weights load.

Layout of a Mamba-2 layer (I = ``intermediate_size``, H heads, G groups of N states): ``in_proj.weight`` is
(2I + 2GN + H, hidden), split as ``[z | x | B | C | dt]``; ``conv1d`` runs over ``[x | B | C]`` (I + 2GN channels);
B and C are group-major (state n of group g at ``g·N + n``).

This file is copied next to saved weights as remote code: it imports torch, public names of ``transformers`` and its
sibling files.
"""

import os

import torch
from torch import nn
from transformers import PreTrainedModel

from .modeling_compressssm_common import CompreSSMCheckpointMixin, convert_from_stock, convert_to_stock


def is_mamba2_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a Mamba-2 layer (the stock mixers of every host have these parameters and fields)."""
    return all(hasattr(module, name) for name in ("A_log", "conv1d", "in_proj", "n_groups", "intermediate_size"))


def mamba2_state_size(mixer: nn.Module) -> int:
    """A Mamba-2 layer's per-group state size N, read from its ``conv1d`` weight (I + 2GN channels)."""
    return (int(mixer.conv1d.weight.shape[0]) - int(mixer.intermediate_size)) // (2 * int(mixer.n_groups))


def kept_rows(mixer: nn.Module, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For kept states ``keep`` (G, k) (each row ascending; a (k,) keep applies to every group), the kept
    ``in_proj`` rows (2I + 2Gk + H,) and ``conv1d`` channels (I + 2Gk,) of a Mamba-2 layer."""
    inner, heads, groups = int(mixer.intermediate_size), int(mixer.num_heads), int(mixer.n_groups)
    size = mamba2_state_size(mixer)
    device = mixer.conv1d.weight.device
    device = device if device.type != "meta" else torch.device("cpu")
    keep = keep.to(device)
    keep = keep.expand(groups, -1) if keep.ndim == 1 else keep
    flat = (keep + size * torch.arange(groups, device=device)[:, None]).reshape(-1)  # ascending, group-major
    gn = groups * size
    conv = torch.cat([torch.arange(inner, device=device), inner + flat, inner + gn + flat])
    in_rows = torch.cat(
        [torch.arange(inner, device=device), inner + conv, torch.arange(heads, device=device) + 2 * inner + 2 * gn]
    )
    return in_rows, conv


def sync_mamba2_sizes(mixer: nn.Module, attributes: tuple[str, ...] = ("ssm_state_size", "conv_dim")) -> None:
    """Bring a Mamba-2 layer's cached sizes in line with its parameters: ``attributes`` (the state size and the conv
    width; skipped where the class computes them) and the ``conv1d`` / ``in_proj`` module fields."""
    channels = int(mixer.conv1d.weight.shape[0])
    values = {"ssm_state_size": mamba2_state_size(mixer), "conv_dim": channels}
    for attr in attributes:
        if not isinstance(getattr(type(mixer), attr, None), property):
            setattr(mixer, attr, values[attr])
    mixer.conv1d.in_channels = mixer.conv1d.out_channels = mixer.conv1d.groups = channels
    mixer.in_proj.out_features = int(mixer.in_proj.weight.shape[0])


@torch.no_grad()
def keep_first_states(mixer: nn.Module, size: int) -> None:
    """Shrink a freshly built Mamba-2 layer to the first ``size`` states of every group (new parameters; no
    optimizer involved: for construction only, cuts go through the compression pipeline)."""
    in_rows, conv = kept_rows(mixer, torch.arange(size, device="cpu"))
    for owner, name, index in (
        (mixer.in_proj, "weight", in_rows),
        (mixer.in_proj, "bias", in_rows),
        (mixer.conv1d, "weight", conv),
        (mixer.conv1d, "bias", conv),
    ):
        param = getattr(owner, name)
        if param is not None:
            if param.is_meta:  # built for from_pretrained: only the shape matters
                kept = param.new_empty((len(index), *param.shape[1:]))
            else:
                kept = param.index_select(0, index.to(param.device))
            setattr(owner, name, nn.Parameter(kept, requires_grad=param.requires_grad))
    sync_mamba2_sizes(mixer)


class CompreSSMHybridMixin(CompreSSMCheckpointMixin):
    """Per-layer SSM state sizes on a stock hybrid causal LM (list it before the stock class).

    A host sets ``stock_model_class`` (the stock causal LM) and ``config_class`` (its `HybridStateSizes` config); the
    decoder layers are ``<base model>.layers``, and a layer's Mamba module is the one submodule that is a Mamba-2
    layer (`is_mamba2_layer`), wherever the host keeps it (``mamba``, ``mixer``, ...). Saving and loading follow `CompreSSMCheckpointMixin` (strict; ``compression_history.json``).
    """

    stock_model_class: type[PreTrainedModel]

    def __init__(self, config, *args, **kwargs):
        if not hasattr(config, "mamba_state_sizes"):
            raise TypeError(
                f"{type(self).__name__} needs a {self.config_class.__name__} (per-layer mamba_state_sizes), got a "
                f"{type(config).__name__}: convert a stock model with {type(self).__name__}.from_stock(model), or "
                f"build the config with {self.config_class.__name__}(**stock_config.to_dict())."
            )
        config.check_invariants()  # attributes may have been changed since the config was constructed
        super().__init__(config, *args, **kwargs)
        for mixer, size in zip(self._layer_mixers(), config.mamba_state_sizes):
            if mixer is not None and size != mamba2_state_size(mixer):
                keep_first_states(mixer, size)

    def _layer_mixers(self) -> list[nn.Module | None]:
        """Each decoder layer's Mamba-2 module (None for the other layers), in layer order."""
        mixers = []
        for index, layer in enumerate(getattr(self, self.base_model_prefix).layers):
            found = [m for m in layer.modules() if is_mamba2_layer(m)]
            if len(found) > 1:
                raise ValueError(f"decoder layer {index} holds {len(found)} Mamba-2 layers; a host has one per layer.")
            mixers.append(found[0] if found else None)
        return mixers

    def ssm_mixers(self) -> list[nn.Module]:
        """The Mamba layers' mixers, in layer order."""
        return [m for m in self._layer_mixers() if m is not None]

    def state_sizes(self) -> list[int | None]:
        """Each layer's state size read from the parameters: an int for a Mamba layer, None for any other layer."""
        return [None if m is None else mamba2_state_size(m) for m in self._layer_mixers()]

    def check_savable(self) -> None:
        """Raise `ValueError` unless a folder saved now loads back: the config's invariants hold, its layer count and
        ``layer_types`` match the layers, and ``mamba_state_sizes`` equals the parameters' sizes."""
        config = self.config
        sizes = self.state_sizes()
        if len(sizes) != config.num_hidden_layers:
            raise ValueError(
                f"config.num_hidden_layers={config.num_hidden_layers} but the model has {len(sizes)} layers: a folder "
                f"saved like this could not be loaded. Set config.num_hidden_layers = {len(sizes)}."
            )
        config.check_invariants()
        mamba_layers = [i for i, s in enumerate(sizes) if s is not None]
        if mamba_layers != config.ssm_layers():
            raise ValueError(
                f"config.layer_types puts Mamba layers at {config.ssm_layers()} but the model has them at "
                f"{mamba_layers}: a folder saved like this could not be loaded. Restore config.layer_types."
            )
        if list(config.mamba_state_sizes) != sizes:
            raise ValueError(
                f"config.mamba_state_sizes={list(config.mamba_state_sizes)} but the layers' parameters have state "
                f"sizes {sizes}: a folder saved like this could not be loaded. Set config.mamba_state_sizes = "
                f"model.state_sizes() (cuts made with hf_compressssm keep them in sync)."
            )

    @classmethod
    def from_stock(cls, model_or_path: "PreTrainedModel | str | os.PathLike", **from_pretrained_kwargs):
        """Convert a stock model of the host (object, saved folder or Hub id) into this class, weights unchanged:
        the logits (and greedy generations) equal the stock model's. A model object is copied (it stays usable); a
        path is loaded with ``stock_model_class.from_pretrained(path, **from_pretrained_kwargs)`` and its tensors
        are taken over."""
        return convert_from_stock(cls, model_or_path, cls.stock_model_class, "from_stock", **from_pretrained_kwargs)

    def to_stock(self) -> PreTrainedModel:
        """Convert back to the stock class (a copy); every Mamba layer must have the same state size."""
        stock_class = self.stock_model_class
        return convert_to_stock(
            self,
            stock_class,
            stock_class.config_class,
            "to_stock",
            drop_config_keys=("mamba_state_sizes", "compression"),
            size_key=self.config._cap_name,
        )


__all__ = [
    "CompreSSMHybridMixin",
    "is_mamba2_layer",
    "keep_first_states",
    "kept_rows",
    "mamba2_state_size",
    "sync_mamba2_sizes",
]
