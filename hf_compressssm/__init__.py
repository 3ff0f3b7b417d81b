"""hf_compressssm: CompreSSM in-training compression of state-space models for Hugging Face transformers.

Layout, bottom to top (docs/design.md): ``models/`` (one Hugging Face unit per SSM family) ← ``families/`` (a thin
adapter: find a family's mixers, compute their projections, name the axes a cut shrinks) ← ``compression/`` (the
pipeline, one module per stage, and `Compressor` for any training loop) ← ``trainer/`` (`CompreSSMCallback`),
``hub/`` (cards, upload) and ``peft_utils``. The scripts, their data and presets live in the repository
(``scripts/``), outside the package.

Importing the package registers the model families (Mamba-1, Mamba-2) with the Auto classes (``AutoConfig``,
``AutoModel``, ``AutoModelForCausalLM``, ``AutoModelForSequenceClassification`` for Mamba-1) and the hybrid hosts
(Granite 4.0-H, Bamba, Nemotron-H, Zamba2: ``AutoConfig``, ``AutoModelForCausalLM``), and marks the classes for remote-code export,
so ``save_pretrained`` writes ``auto_map`` and the self-contained configuration/modeling files next to the weights.
"""

__version__ = "0.3.0"

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from .compression import CompressionArguments, CompressionRecord, Compressor, ReductionReport, compress_model
from .models import (
    CompreSSMBambaConfig,
    CompreSSMBambaForCausalLM,
    CompreSSMGraniteMoeHybridConfig,
    CompreSSMGraniteMoeHybridForCausalLM,
    CompreSSMMamba2Config,
    CompreSSMMamba2ForCausalLM,
    CompreSSMMamba2Model,
    CompreSSMMamba2PreTrainedModel,
    CompreSSMMambaConfig,
    CompreSSMMambaForCausalLM,
    CompreSSMMambaForSequenceClassification,
    CompreSSMMambaModel,
    CompreSSMMambaPreTrainedModel,
    CompreSSMNemotronHConfig,
    CompreSSMNemotronHForCausalLM,
    CompreSSMZamba2Config,
    CompreSSMZamba2ForCausalLM,
)
from .trainer import CompreSSMCallback


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
    AutoConfig.register(CompreSSMMamba2Config.model_type, CompreSSMMamba2Config, exist_ok=True)
    for auto_class, model_class in (
        (AutoModel, CompreSSMMamba2Model),
        (AutoModelForCausalLM, CompreSSMMamba2ForCausalLM),
    ):
        auto_class.register(CompreSSMMamba2Config, model_class, exist_ok=True)
        model_class.register_for_auto_class(auto_class.__name__)
    CompreSSMMamba2Config.register_for_auto_class()
    for config_class, model_class in (
        (CompreSSMGraniteMoeHybridConfig, CompreSSMGraniteMoeHybridForCausalLM),
        (CompreSSMBambaConfig, CompreSSMBambaForCausalLM),
        (CompreSSMNemotronHConfig, CompreSSMNemotronHForCausalLM),
        (CompreSSMZamba2Config, CompreSSMZamba2ForCausalLM),
    ):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)
        model_class.register_for_auto_class("AutoModelForCausalLM")
        config_class.register_for_auto_class()


_register()

__all__ = [
    "CompreSSMCallback",
    "CompressionArguments",
    "CompressionRecord",
    "Compressor",
    "ReductionReport",
    "compress_model",
    "CompreSSMMambaConfig",
    "CompreSSMMambaForCausalLM",
    "CompreSSMMambaForSequenceClassification",
    "CompreSSMMambaModel",
    "CompreSSMMambaPreTrainedModel",
    "CompreSSMMamba2Config",
    "CompreSSMMamba2ForCausalLM",
    "CompreSSMMamba2Model",
    "CompreSSMMamba2PreTrainedModel",
    "CompreSSMGraniteMoeHybridConfig",
    "CompreSSMGraniteMoeHybridForCausalLM",
    "CompreSSMBambaConfig",
    "CompreSSMBambaForCausalLM",
    "CompreSSMNemotronHConfig",
    "CompreSSMNemotronHForCausalLM",
    "CompreSSMZamba2Config",
    "CompreSSMZamba2ForCausalLM",
    "__version__",
]
