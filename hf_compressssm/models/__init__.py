"""The Hugging Face modeling units of the SSM families with per-layer state sizes, and their kernels.

Each family (Mamba-1, Mamba-2) and each hybrid host (Granite 4.0-H, Bamba, Nemotron-H, Zamba2) is a ``configuration_*.py`` / ``modeling_*.py``
pair; the hosts share ``modeling_compressssm_hybrid.py``; the files they import with single-dot relative
imports (``modeling_compressssm_common.py``, the kernels ``selective_scan.py``, ``ssd_scan.py``,
``ssd_numba_scan.py``, ``kernel_policy.py``) sit in this one folder, because ``save_pretrained`` copies a unit and
its relative imports next to the weights as remote code. These files import nothing from the rest of the package
and only public names of transformers.
"""

from .configuration_compressssm_bamba import CompreSSMBambaConfig
from .configuration_compressssm_granitemoehybrid import CompreSSMGraniteMoeHybridConfig
from .configuration_compressssm_mamba import CompreSSMMambaConfig
from .configuration_compressssm_mamba2 import CompreSSMMamba2Config
from .configuration_compressssm_nemotron_h import CompreSSMNemotronHConfig
from .configuration_compressssm_zamba2 import CompreSSMZamba2Config
from .modeling_compressssm_bamba import CompreSSMBambaForCausalLM
from .modeling_compressssm_granitemoehybrid import CompreSSMGraniteMoeHybridForCausalLM
from .modeling_compressssm_hybrid import CompreSSMHybridMixin
from .modeling_compressssm_mamba import (
    CompreSSMMambaForCausalLM,
    CompreSSMMambaForSequenceClassification,
    CompreSSMMambaMixer,
    CompreSSMMambaModel,
    CompreSSMMambaPreTrainedModel,
)
from .modeling_compressssm_mamba2 import (
    CompreSSMMamba2ForCausalLM,
    CompreSSMMamba2Mixer,
    CompreSSMMamba2Model,
    CompreSSMMamba2PreTrainedModel,
)
from .modeling_compressssm_nemotron_h import CompreSSMNemotronHForCausalLM
from .modeling_compressssm_zamba2 import CompreSSMZamba2ForCausalLM


__all__ = [
    "CompreSSMMambaConfig",
    "CompreSSMMambaForCausalLM",
    "CompreSSMMambaForSequenceClassification",
    "CompreSSMMambaMixer",
    "CompreSSMMambaModel",
    "CompreSSMMambaPreTrainedModel",
    "CompreSSMMamba2Config",
    "CompreSSMMamba2ForCausalLM",
    "CompreSSMMamba2Mixer",
    "CompreSSMMamba2Model",
    "CompreSSMMamba2PreTrainedModel",
    "CompreSSMGraniteMoeHybridConfig",
    "CompreSSMGraniteMoeHybridForCausalLM",
    "CompreSSMBambaConfig",
    "CompreSSMBambaForCausalLM",
    "CompreSSMHybridMixin",
    "CompreSSMNemotronHConfig",
    "CompreSSMNemotronHForCausalLM",
    "CompreSSMZamba2Config",
    "CompreSSMZamba2ForCausalLM",
]
