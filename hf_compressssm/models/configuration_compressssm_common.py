"""Per-layer SSM state sizes on a transformers config, shared by every CompreSSM family's configuration.

A family's config lists `PerLayerStateSizes` before its stock config class and defines ``layer_config(i)``. The mixin
adds ``state_sizes`` checks and makes the sizes visible through transformers' own per-layer mechanism:
``config.per_layer_config[i].state_size == config.state_sizes[i]``, ``config.is_heterogeneous`` when the sizes differ,
``per_layer_config={i: {"state_size": n}}`` accepted as input. Unlike a heterogeneous stock config,
``config.state_size`` stays readable (it is the cap N). This file is copied next to saved weights as remote code: it
imports only the standard library.
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


class PerLayerStateSizes:
    """Mixin for a config with ``state_size`` (the cap N), ``num_hidden_layers`` and ``state_sizes`` (one per layer)."""

    # ------------------------------------------------------------------ invariants
    def _check_global_sizes(self) -> None:
        for name in ("state_size", "num_hidden_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}.")

    def check_state_sizes(self, state_sizes: Sequence[int]) -> list[int]:
        """Check a per-layer state-size list against this config and return it as a new list of ints.

        Raises `ValueError` naming the first offending layer and the rule it breaks.
        """
        self._check_global_sizes()
        if isinstance(state_sizes, (str, bytes)) or not isinstance(state_sizes, Sequence):
            raise ValueError(f"state_sizes must be a list with one int per layer, got {type(state_sizes).__name__}.")
        if len(state_sizes) != self.num_hidden_layers:
            raise ValueError(
                f"state_sizes has {len(state_sizes)} entries but the model has num_hidden_layers="
                f"{self.num_hidden_layers}: give exactly one state size per layer."
            )
        checked = []
        for layer, size in enumerate(state_sizes):
            if isinstance(size, bool) or not isinstance(size, int):
                raise ValueError(f"state_sizes[{layer}] must be an int, got {size!r} ({type(size).__name__}).")
            if size < 1:
                raise ValueError(f"state_sizes[{layer}]={size} is invalid: every layer needs at least 1 state.")
            if size > self.state_size:
                raise ValueError(
                    f"state_sizes[{layer}]={size} exceeds state_size={self.state_size}, the largest allowed size; "
                    f"raise state_size or shrink that layer."
                )
            checked.append(int(size))
        return checked

    def check_invariants(self) -> None:
        """Check ``state_size >= 1``, ``len(state_sizes) == num_hidden_layers`` and each size in ``[1, state_size]``
        on the config as it is now (attributes may have been changed after construction). Raises `ValueError`."""
        if self.state_sizes is not None:
            self.check_state_sizes(self.state_sizes)
        else:
            self._check_global_sizes()

    def validate_state_sizes(self) -> None:
        """Class validator run by ``@strict`` at construction and by ``config.save_pretrained``."""
        self.check_invariants()

    def with_state_sizes(self, state_sizes: Sequence[int]) -> "PerLayerStateSizes":
        """Return a new config equal to this one except for ``state_sizes`` (this config is left untouched)."""
        checked = self.check_state_sizes(state_sizes)
        new = self.__class__.from_dict(self.to_dict())
        new.state_sizes = checked
        return new

    def _sizes(self) -> list[int]:
        return list(self.state_sizes) if self.state_sizes is not None else [self.state_size] * self.num_hidden_layers

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


__all__ = ["PerLayerStateSizes"]
