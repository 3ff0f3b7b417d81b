"""Mamba-1 with one SSM state size per layer (``model_type = "compressssm_mamba"``).

This folder is the Hugging Face unit shipped as remote code: ``configuration_compressssm_mamba.py``,
``modeling_compressssm_mamba.py`` and ``selective_scan.py`` (the scan kernels and the one policy that picks them)
import nothing from the rest of the package, so ``save_pretrained`` copies them next to the weights and a process
without this package loads the folder with ``trust_remote_code=True``.
"""

from .configuration_compressssm_mamba import CompreSSMMambaConfig
from .modeling_compressssm_mamba import (
    CompreSSMMambaForCausalLM,
    CompreSSMMambaForSequenceClassification,
    CompreSSMMambaMixer,
    CompreSSMMambaModel,
    CompreSSMMambaPreTrainedModel,
)


__all__ = [
    "CompreSSMMambaConfig",
    "CompreSSMMambaForCausalLM",
    "CompreSSMMambaForSequenceClassification",
    "CompreSSMMambaMixer",
    "CompreSSMMambaModel",
    "CompreSSMMambaPreTrainedModel",
]
