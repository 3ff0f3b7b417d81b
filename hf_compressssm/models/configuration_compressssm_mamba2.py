"""Configuration of a Mamba-2 model whose layers each have their own SSM state size.

This file stands on its own (it is copied next to saved weights as Hugging Face remote code): it imports only
``transformers``, ``huggingface_hub``, the standard library and its sibling
``configuration_compressssm_common.py`` (the per-layer state sizes both families share).
"""

from huggingface_hub.dataclasses import strict
from transformers import Mamba2Config

from .configuration_compressssm_common import PerLayerStateSizes


@strict
class CompreSSMMamba2Config(PerLayerStateSizes, Mamba2Config):
    r"""
    A [`Mamba2Config`] with one SSM state size per layer.

    In a Mamba-2 mixer every one of the ``n_groups`` groups has ``N`` states (B and C are ``n_groups × N``); a layer's
    state size is that per-group ``N``, the same for every group of the layer.

    Args:
        state_size (`int`, defaults to 128):
            The initial, largest allowed per-group state size ``N``. Every layer starts here unless ``state_sizes``
            says otherwise; compression never grows a layer beyond it.
        state_sizes (`list[int]`, *optional*):
            One state size per layer (``len == num_hidden_layers``, each ``1 <= n <= state_size``). Defaults to
            ``[state_size] * num_hidden_layers``.
        compression (`dict`, *optional*):
            Free-form record of how the model was compressed (τ, schedule, score); informational only.

    Every other argument is a [`Mamba2Config`] argument.

    Example:

    ```python
    >>> from hf_compressssm import CompreSSMMamba2Config
    >>> config = CompreSSMMamba2Config(
    ...     hidden_size=32, num_heads=8, head_dim=8, n_groups=2, num_hidden_layers=3, state_size=16,
    ...     state_sizes=[16, 8, 4],
    ... )
    >>> config.with_state_sizes([12, 8, 4]).state_sizes
    [12, 8, 4]
    ```
    """

    model_type = "compressssm_mamba2"

    state_sizes: list | None = None
    compression: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._check_global_sizes()
        if self.n_groups < 1 or self.num_heads % self.n_groups:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of n_groups={self.n_groups} (each group of heads "
                "shares one B and one C)."
            )
        if self.state_sizes is None:
            self.state_sizes = [int(self.state_size)] * int(self.num_hidden_layers)
        else:
            self.state_sizes = self.check_state_sizes(self.state_sizes)

    def layer_config(self, layer_idx: int) -> Mamba2Config:
        """A stock `Mamba2Config` describing layer ``layer_idx`` (its ``state_size`` is that layer's size)."""
        values = self.to_dict()
        for key in ("state_sizes", "compression", "model_type", "auto_map", "architectures"):
            values.pop(key, None)
        values["state_size"] = self.state_sizes[layer_idx]
        return Mamba2Config(**values)


__all__ = ["CompreSSMMamba2Config"]
