"""Mamba-2 with one SSM state size per layer (``model_type = "compressssm_mamba2"``).

This folder is the Hugging Face unit shipped as remote code: ``configuration_compressssm_mamba2.py`` and
``modeling_compressssm_mamba2.py`` import nothing from the rest of the package, so ``save_pretrained`` copies them
next to the weights and a process without this package loads the folder with ``trust_remote_code=True``.
"""

from .configuration_compressssm_mamba2 import CompreSSMMamba2Config
from .modeling_compressssm_mamba2 import (
    CompreSSMMamba2ForCausalLM,
    CompreSSMMamba2Mixer,
    CompreSSMMamba2Model,
    CompreSSMMamba2PreTrainedModel,
)


__all__ = [
    "CompreSSMMamba2Config",
    "CompreSSMMamba2ForCausalLM",
    "CompreSSMMamba2Mixer",
    "CompreSSMMamba2Model",
    "CompreSSMMamba2PreTrainedModel",
]
