"""Configuration of a Zyphra Zamba2 hybrid (``zamba2``) whose Mamba layers each have their own SSM state size.

This file stands on its own (it is copied next to saved weights as Hugging Face remote code): it imports only
``transformers``, ``huggingface_hub``, the standard library and its sibling ``configuration_compressssm_common.py``.
"""

from huggingface_hub.dataclasses import strict
from transformers import Zamba2Config

from .configuration_compressssm_common import HybridStateSizes


@strict
class CompreSSMZamba2Config(HybridStateSizes, Zamba2Config):
    r"""
    A [`Zamba2Config`] whose Mamba layers each have their own per-group SSM state size.

    Every Zamba2 layer has a Mamba-2 layer: a ``"mamba"`` layer is one, a ``"hybrid"`` layer runs the shared
    attention block and then one (``layers_block_type``).

    Args:
        mamba_d_state (`int`, defaults to 64):
            The initial, largest allowed per-group state size ``N`` (``config.state_size`` reads it). Every Mamba
            layer starts here unless ``mamba_state_sizes`` says otherwise; compression never grows a layer beyond it.
        mamba_state_sizes (`list[int]`, *optional*):
            One state size per layer (``len == num_hidden_layers``, each ``1 <= n <= mamba_d_state``). Defaults to
            ``mamba_d_state`` on every layer.
        compression (`dict`, *optional*):
            Free-form record of how the model was compressed (τ, schedule, score); informational only.

    Every other argument is a [`Zamba2Config`] argument; the shared attention blocks and their adapters are the stock
    ones.

    Example:

    ```python
    >>> from hf_compressssm import CompreSSMZamba2Config
    >>> config = CompreSSMZamba2Config(
    ...     hidden_size=32, num_hidden_layers=4, layers_block_type=["mamba", "hybrid", "mamba", "hybrid"],
    ...     n_mamba_heads=8, mamba_headdim=8, mamba_ngroups=2, mamba_d_state=16, mamba_state_sizes=[16, 8, 4, 4],
    ... )
    >>> config.state_sizes
    [16, 8, 4, 4]
    ```
    """

    model_type = "compressssm_zamba2"

    mamba_state_sizes: list | None = None
    compression: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.init_state_sizes()


__all__ = ["CompreSSMZamba2Config"]
