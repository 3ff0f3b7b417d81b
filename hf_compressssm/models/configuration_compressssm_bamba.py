"""Configuration of a Bamba hybrid (``bamba``) whose Mamba layers each have their own SSM state size.

This file stands on its own (it is copied next to saved weights as Hugging Face remote code): it imports only
``transformers``, ``huggingface_hub``, the standard library and its sibling ``configuration_compressssm_common.py``.
"""

from huggingface_hub.dataclasses import strict
from transformers import BambaConfig

from .configuration_compressssm_common import HybridStateSizes


@strict
class CompreSSMBambaConfig(HybridStateSizes, BambaConfig):
    r"""
    A [`BambaConfig`] whose Mamba layers each have their own per-group SSM state size.

    Args:
        mamba_d_state (`int`, defaults to 256):
            The initial, largest allowed per-group state size ``N`` (``config.state_size`` reads it). Every Mamba
            layer starts here unless ``mamba_state_sizes`` says otherwise; compression never grows a layer beyond it.
        mamba_state_sizes (`list[int | None]`, *optional*):
            One entry per layer (``len == num_hidden_layers``): the state size of a Mamba layer (a layer not in
            ``attn_layer_indices``; each ``1 <= n <= mamba_d_state``), None for an attention layer. Defaults to
            ``mamba_d_state`` on every Mamba layer. ``config.state_sizes`` lists the Mamba layers' sizes only.
        compression (`dict`, *optional*):
            Free-form record of how the model was compressed (τ, schedule, score); informational only.

    Every other argument is a [`BambaConfig`] argument; attention and MLP layers are the stock ones.

    Example:

    ```python
    >>> from hf_compressssm import CompreSSMBambaConfig
    >>> config = CompreSSMBambaConfig(
    ...     hidden_size=32, num_hidden_layers=4, attn_layer_indices=[2],
    ...     mamba_n_heads=8, mamba_n_groups=2, mamba_d_state=16, mamba_state_sizes=[16, 8, None, 4],
    ... )
    >>> config.state_sizes
    [16, 8, 4]
    ```
    """

    model_type = "compressssm_bamba"

    mamba_state_sizes: list | None = None
    compression: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.init_state_sizes()


__all__ = ["CompreSSMBambaConfig"]
