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

from .modeling_compressssm_common import CompreSSMCheckpointMixin


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


# Keys of a config dict that are not architecture arguments.
_NON_ARCH_KEYS = {"model_type", "architectures", "transformers_version", "auto_map", "dtype"}


def _with_weights(model_class: type, config, source: nn.Module, copy: bool) -> PreTrainedModel:
    """``model_class(config)`` holding ``source``'s parameters and buffers (same names and shapes): built on the meta
    device, so no weight is initialised or allocated twice; ``copy`` clones the tensors (``source`` stays intact)."""
    with torch.device("meta"):
        model = model_class(config)
    state = source.state_dict()
    model.load_state_dict({k: v.clone() if copy else v for k, v in state.items()}, strict=True, assign=True)
    for name, buffer in source.named_buffers():  # non-persistent buffers (rotary frequencies) are not in the state
        if name not in state:
            owner, _, attr = name.rpartition(".")
            model.get_submodule(owner)._buffers[attr] = buffer.clone() if copy else buffer
    model.tie_weights()
    return model.train(source.training)


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
        stock_class = cls.stock_model_class
        if isinstance(model_or_path, CompreSSMHybridMixin) or isinstance(
            getattr(model_or_path, "config", None), cls.config_class
        ):
            raise TypeError(f"The model is already a {cls.__name__}; use it directly.")
        if isinstance(model_or_path, (str, os.PathLike)):
            source = str(model_or_path)
            stock, copy = stock_class.from_pretrained(source, **from_pretrained_kwargs), False
        elif isinstance(model_or_path, stock_class):
            stock, copy = model_or_path, True
            source = getattr(stock.config, "_name_or_path", "") or None
        else:
            raise TypeError(
                f"from_stock expects a {stock_class.__name__} or a path/Hub id of one, got "
                f"{type(model_or_path).__name__}."
            )
        values = {k: v for k, v in stock.config.to_dict().items() if k not in _NON_ARCH_KEYS}
        config = cls.config_class(**values)
        if source:
            config.compression = {"base_model": source}
        return _with_weights(cls, config, stock, copy=copy)

    def to_stock(self) -> PreTrainedModel:
        """Convert back to the stock class (a copy); every Mamba layer must have the same state size."""
        sizes = sorted({s for s in self.state_sizes() if s is not None})
        if len(sizes) > 1:
            raise ValueError(
                f"to_stock() needs one state size for every Mamba layer, but the layers have {self.state_sizes()}: a "
                f"stock {self.stock_model_class.config_class.__name__} holds a single mamba_d_state. Keep this model "
                f"as a {type(self).__name__} (it loads with the Auto classes), or compress every Mamba layer to the "
                f"same size."
            )
        values = {k: v for k, v in self.config.to_dict().items() if k not in _NON_ARCH_KEYS}
        for key in ("mamba_state_sizes", "compression"):
            values.pop(key, None)
        if sizes:
            values["mamba_d_state"] = sizes[0]
        stock_config = self.stock_model_class.config_class(**values)
        return _with_weights(self.stock_model_class, stock_config, self, copy=True)


__all__ = [
    "CompreSSMHybridMixin",
    "is_mamba2_layer",
    "keep_first_states",
    "kept_rows",
    "mamba2_state_size",
    "sync_mamba2_sizes",
]
