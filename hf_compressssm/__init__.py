"""hf_compressssm: CompreSSM in-training compression of Mamba state-space models for Hugging Face transformers.

Importing the package registers the model family with the Auto classes (``AutoConfig``, ``AutoModel``,
``AutoModelForCausalLM``, ``AutoModelForSequenceClassification``) and marks the classes for remote-code export, so
``save_pretrained`` writes ``auto_map`` and the self-contained configuration/modeling files next to the weights.
"""

__version__ = "0.1.0"

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from .arguments import CompressionArguments
from .callback import CompreSSMCallback
from .configuration_compressssm_mamba import CompreSSMMambaConfig
from .modeling_compressssm_mamba import (
    CompreSSMMambaForCausalLM,
    CompreSSMMambaForSequenceClassification,
    CompreSSMMambaModel,
    CompreSSMMambaPreTrainedModel,
)
from .reduction import ReductionReport, compress_model


def _register() -> None:
    AutoConfig.register(CompreSSMMambaConfig.model_type, CompreSSMMambaConfig, exist_ok=True)
    for auto_class, model_class in (
        (AutoModel, CompreSSMMambaModel),
        (AutoModelForCausalLM, CompreSSMMambaForCausalLM),
        (AutoModelForSequenceClassification, CompreSSMMambaForSequenceClassification),
    ):
        auto_class.register(CompreSSMMambaConfig, model_class, exist_ok=True)
        model_class.register_for_auto_class(auto_class.__name__)
    CompreSSMMambaConfig.register_for_auto_class()


_register()

__all__ = [
    "CompreSSMCallback",
    "CompressionArguments",
    "ReductionReport",
    "compress_model",
    "CompreSSMMambaConfig",
    "CompreSSMMambaForCausalLM",
    "CompreSSMMambaForSequenceClassification",
    "CompreSSMMambaModel",
    "CompreSSMMambaPreTrainedModel",
    "__version__",
]
