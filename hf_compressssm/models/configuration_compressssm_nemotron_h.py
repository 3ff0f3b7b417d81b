"""Configuration of a NVIDIA Nemotron-H hybrid (``nemotron_h``) whose Mamba layers each have their own SSM state size.

This file stands on its own (it is copied next to saved weights as Hugging Face remote code): it imports only
``transformers``, ``huggingface_hub``, the standard library and its sibling ``configuration_compressssm_common.py``.
"""

from huggingface_hub.dataclasses import strict
from transformers import NemotronHConfig

from .configuration_compressssm_common import HybridStateSizes


@strict
class CompreSSMNemotronHConfig(HybridStateSizes, NemotronHConfig):
    r"""
    A [`NemotronHConfig`] whose Mamba layers each have their own per-group SSM state size.

    Args:
        ssm_state_size (`int`, defaults to 128):
            The initial, largest allowed per-group state size ``N`` (``config.state_size`` reads it). Every Mamba
            layer starts here unless ``mamba_state_sizes`` says otherwise; compression never grows a layer beyond it.
        mamba_state_sizes (`list[int | None]`, *optional*):
            One entry per layer (``len == num_hidden_layers``): the state size of a Mamba layer
            (``layers_block_type[i] == "linear_attention"``, ``"M"`` in a ``hybrid_override_pattern``; each
            ``1 <= n <= ssm_state_size``), None for an attention, MLP or MoE layer. Defaults to ``ssm_state_size``
            on every Mamba layer. ``config.state_sizes`` lists the Mamba layers' sizes only.
        compression (`dict`, *optional*):
            Free-form record of how the model was compressed (τ, schedule, score); informational only.

    Every other argument is a [`NemotronHConfig`] argument; attention, MLP and MoE layers are the stock ones.

    Example:

    ```python
    >>> from hf_compressssm import CompreSSMNemotronHConfig
    >>> config = CompreSSMNemotronHConfig(
    ...     hidden_size=32, layers_block_type=["mamba", "mamba", "attention", "mamba"],
    ...     mamba_num_heads=8, mamba_head_dim=8, n_groups=2, ssm_state_size=16, mamba_state_sizes=[16, 8, None, 4],
    ... )
    >>> config.state_sizes
    [16, 8, 4]
    ```
    """

    model_type = "compressssm_nemotron_h"
    _cap_name = "ssm_state_size"

    mamba_state_sizes: list | None = None
    compression: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.init_state_sizes()


__all__ = ["CompreSSMNemotronHConfig"]
