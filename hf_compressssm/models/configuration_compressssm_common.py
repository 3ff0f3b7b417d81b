"""Per-layer SSM state sizes on a transformers config, shared by every CompreSSM family's configuration.

`StateSizeRules` holds the rules of a state-size list: ``state_size`` is the cap N, ``state_sizes`` has one size per
SSM layer (`StateSizeRules.ssm_layers`), each in ``[1, N]``. Two mixins build on it:

* `PerLayerStateSizes` (pure SSM models: every layer is an SSM layer). A family's config lists it before its stock
  config class and defines ``layer_config(i)``. The sizes are also visible through transformers' own per-layer
  mechanism: ``config.per_layer_config[i].state_size == config.state_sizes[i]``, ``config.is_heterogeneous`` when the
  sizes differ, ``per_layer_config={i: {"state_size": n}}`` accepted as input. Unlike a heterogeneous stock config,
  ``config.state_size`` stays readable (it is the cap N).
* `HybridStateSizes` (a stock hybrid host: Mamba-2 layers among attention layers). ``config.json`` stores
  ``mamba_state_sizes``, one entry per layer (the size of a Mamba layer, None for any other layer);
  ``state_sizes`` is the view of the Mamba layers' sizes in layer order and ``state_size`` the host's cap
  (``mamba_d_state``). The host's transformers per-layer mechanism is left alone: the stock host model reads it for its
  attention layers (rope, caches), and it never sees the state sizes.

This file is copied next to saved weights as remote code: it imports only the standard library.
"""

from collections.abc import Iterable, Sequence
from typing import Any


class _PerLayerStateSizeView(Sequence):
    """``config.per_layer_config``: one layer config per layer, each with that layer's ``state_size``.

    Indexing follows transformers' own per-layer view: an int (negative allowed), a slice, or a layer type
    (``"linear_attention"``, allowed only while every layer has the same size).
    """

    def __init__(self, config: "PerLayerStateSizes") -> None:
        self._config = config

    def __len__(self) -> int:
        return int(self._config.num_hidden_layers)

    def __getitem__(self, layer_idx):
        if isinstance(layer_idx, str):
            if layer_idx not in self._config.layer_types:
                raise ValueError(f"Layer type {layer_idx!r} not found in config.layer_types.")
            if self._config.is_heterogeneous:
                raise ValueError(
                    f"Layer type {layer_idx!r} is not homogeneous across layers (state sizes "
                    f"{self._config.state_sizes}); use an integer index to get one layer's config."
                )
            return self._config
        if isinstance(layer_idx, slice):
            return [self[i] for i in range(*layer_idx.indices(len(self)))]
        if layer_idx < 0:
            layer_idx += len(self)
        if not 0 <= layer_idx < len(self):
            raise IndexError(f"layer index out of range (the model has {len(self)} layers)")
        return self._config.layer_config(layer_idx)


class StateSizeRules:
    """Rules of a config with ``state_size`` (the cap N), ``num_hidden_layers`` and ``state_sizes`` (one size per SSM
    layer, in layer order)."""

    def ssm_layers(self) -> list[int]:
        """Indices of the layers that have an SSM state (every layer of a pure SSM model)."""
        return list(range(self.num_hidden_layers))

    _ssm_layer_noun = "layer"
    _cap_name = "state_size"

    def _layer_count(self) -> str:
        """How this config counts its SSM layers, for error messages."""
        return f"num_hidden_layers={self.num_hidden_layers}"

    # ------------------------------------------------------------------ invariants
    def _check_global_sizes(self) -> None:
        for name in ("state_size", "num_hidden_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}.")

    def check_state_sizes(self, state_sizes: Sequence[int]) -> list[int]:
        """Check a state-size list (one int per SSM layer) against this config and return it as a new list of ints.

        Raises `ValueError` naming the first offending layer and the rule it breaks.
        """
        self._check_global_sizes()
        if isinstance(state_sizes, (str, bytes)) or not isinstance(state_sizes, Sequence):
            raise ValueError(f"state_sizes must be a list with one int per layer, got {type(state_sizes).__name__}.")
        if len(state_sizes) != len(self.ssm_layers()):
            raise ValueError(
                f"state_sizes has {len(state_sizes)} entries but the model has {self._layer_count()}: give exactly one "
                f"state size per {self._ssm_layer_noun}."
            )
        checked = []
        for index, (layer, size) in enumerate(zip(self.ssm_layers(), state_sizes)):
            name = f"state_sizes[{index}]" + (f" (layer {layer})" if index != layer else "")
            if isinstance(size, bool) or not isinstance(size, int):
                raise ValueError(f"{name} must be an int, got {size!r} ({type(size).__name__}).")
            if size < 1:
                raise ValueError(f"{name}={size} is invalid: every layer needs at least 1 state.")
            if size > self.state_size:
                raise ValueError(
                    f"{name}={size} exceeds {self._cap_name}={self.state_size}, the largest allowed size; "
                    f"raise {self._cap_name} or shrink that layer."
                )
            checked.append(int(size))
        return checked

    def check_invariants(self) -> None:
        """Check ``state_size >= 1``, one size per SSM layer and each size in ``[1, state_size]`` on the config as it
        is now (attributes may have been changed after construction). Raises `ValueError`."""
        if self.state_sizes is not None:
            self.check_state_sizes(self.state_sizes)
        else:
            self._check_global_sizes()

    def validate_state_sizes(self) -> None:
        """Class validator run by ``@strict`` at construction and by ``config.save_pretrained``."""
        self.check_invariants()

    def with_state_sizes(self, state_sizes: Sequence[int]) -> "StateSizeRules":
        """Return a new config equal to this one except for ``state_sizes`` (this config is left untouched)."""
        checked = self.check_state_sizes(state_sizes)
        new = self.__class__.from_dict(self.to_dict())
        new.state_sizes = checked
        return new

    def _sizes(self) -> list[int]:
        return list(self.state_sizes) if self.state_sizes is not None else [self.state_size] * len(self.ssm_layers())


class PerLayerStateSizes(StateSizeRules):
    """Mixin for a pure SSM config: ``state_sizes`` (a config field) has one size per layer."""

    # ------------------------------------------------------------------ transformers' per-layer config mechanism
    @property
    def is_heterogeneous(self) -> bool:
        """True when the layers do not all have the same state size."""
        sizes = self.__dict__.get("state_sizes")
        return sizes is not None and len(set(sizes)) > 1

    @property
    def per_layer_config(self) -> Sequence:
        return _PerLayerStateSizeView(self)

    @per_layer_config.setter
    def per_layer_config(self, per_layer_config: dict[int | str, dict[str, Any]] | None) -> None:
        """Accept transformers' ``{layer_idx: {"state_size": n}}`` form; ``state_size`` is the only per-layer field."""
        if per_layer_config is None:
            return
        sizes = self._sizes()
        for key, overrides in dict(per_layer_config).items():
            idx = int(key)
            if not 0 <= idx < len(sizes):
                raise ValueError(
                    f"per_layer_config has layer index {key!r}, outside [0, {len(sizes)}) for num_hidden_layers="
                    f"{self.num_hidden_layers}."
                )
            other = sorted(set(overrides) - {"state_size", "skip"}) + (["skip"] if overrides.get("skip") else [])
            if other:
                raise ValueError(
                    f"per_layer_config[{key!r}] sets {other}: a CompreSSM config varies only state_size per layer."
                )
            if "state_size" in overrides:
                sizes[idx] = overrides["state_size"]
        self.state_sizes = self.check_state_sizes(sizes)

    @property
    def per_layer_attributes(self) -> set[str] | None:
        return {"state_size"} if self.is_heterogeneous else None

    def _iter_config_keys_with_heterogeneous_adjustment(self, keys: Iterable[str]) -> Iterable[str]:
        # ``state_size`` is the cap N on this config, never ambiguous: nothing is hidden.
        yield from keys

    def _update_heterogeneous_to_dict_output(self, d: dict[str, Any]) -> None:
        # ``state_sizes`` already carries the per-layer sizes; no second copy in config.json.
        d.pop("_heterogeneity_spec", None)
        d.pop("skip", None)


class HybridStateSizes(StateSizeRules):
    """Mixin for a hybrid host config: ``mamba_state_sizes`` (a config field, one entry per layer, None for the
    layers that are not Mamba layers) holds the sizes; ``state_sizes`` is the list of the Mamba layers' sizes (read
    and written by the compression pipeline) and ``state_size`` the host's cap, the field named by ``_cap_name``
    (``mamba_d_state``; Nemotron-H: ``ssm_state_size``). Call `init_state_sizes` at the end of ``__post_init__``."""

    #: ``layer_types`` entries of the layers with a Mamba layer (transformers' name, the legacy one, and
    #: ``"hybrid"``: linear and full attention in one layer, e.g. Zamba2's shared-attention layers).
    ssm_layer_types = ("linear_attention", "mamba", "hybrid")
    _ssm_layer_noun = "Mamba layer"
    _cap_name = "mamba_d_state"

    @property
    def state_size(self) -> int:
        """The largest allowed per-group state size N: the host's ``_cap_name`` field (``mamba_d_state``)."""
        return getattr(self, self._cap_name)

    def ssm_layers(self) -> list[int]:
        return [i for i, kind in enumerate(self.layer_types) if kind in self.ssm_layer_types]

    def _layer_count(self) -> str:
        return f"{len(self.ssm_layers())} Mamba layers (layers {self.ssm_layers()} of layer_types)"

    @property
    def state_sizes(self) -> list[int]:
        """The Mamba layers' state sizes, in layer order (``mamba_state_sizes`` without the None entries)."""
        full = self.__dict__.get("mamba_state_sizes")
        if full is None:
            return [self.state_size] * len(self.ssm_layers())
        return [size for size in full if size is not None]

    @state_sizes.setter
    def state_sizes(self, state_sizes: Sequence[int]) -> None:
        checked = self.check_state_sizes(state_sizes)
        full: list[int | None] = [None] * self.num_hidden_layers
        for layer, size in zip(self.ssm_layers(), checked):
            full[layer] = size
        self.mamba_state_sizes = full

    def init_state_sizes(self) -> None:
        """Default ``mamba_state_sizes`` to ``mamba_d_state`` on every Mamba layer, or check the given list."""
        self._check_global_sizes()
        if self.mamba_state_sizes is None:
            self.state_sizes = [self.state_size] * len(self.ssm_layers())
        else:
            self.check_invariants()
            self.mamba_state_sizes = [None if s is None else int(s) for s in self.mamba_state_sizes]

    def check_invariants(self) -> None:
        """Check that ``mamba_state_sizes`` has one entry per layer, a size in ``[1, mamba_d_state]`` exactly at the
        Mamba layers of ``layer_types`` and None elsewhere (on the config as it is now). Raises `ValueError`."""
        self._check_global_sizes()
        full = self.mamba_state_sizes
        if full is None:
            return
        if isinstance(full, (str, bytes)) or not isinstance(full, Sequence) or len(full) != self.num_hidden_layers:
            raise ValueError(
                f"mamba_state_sizes must be a list with one entry per layer (num_hidden_layers="
                f"{self.num_hidden_layers}): the state size of a Mamba layer, None for any other layer; got {full!r}."
            )
        ssm = set(self.ssm_layers())
        for layer, size in enumerate(full):
            if layer in ssm and size is None:
                raise ValueError(
                    f"mamba_state_sizes[{layer}] is None but layer {layer} is a Mamba layer (layer_types[{layer}]="
                    f"{self.layer_types[layer]!r}): give its state size."
                )
            if layer not in ssm and size is not None:
                raise ValueError(
                    f"mamba_state_sizes[{layer}]={size!r} but layer {layer} is a {self.layer_types[layer]!r} layer, "
                    f"which has no SSM state: set that entry to None."
                )
        self.check_state_sizes(self.state_sizes)


__all__ = ["HybridStateSizes", "PerLayerStateSizes", "StateSizeRules"]
