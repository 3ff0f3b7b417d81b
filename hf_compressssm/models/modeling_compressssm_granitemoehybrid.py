"""IBM Granite 4.0-H (``granitemoehybrid``) with per-layer SSM state sizes
(``model_type = "compressssm_granitemoehybrid"``).

`CompreSSMGraniteMoeHybridForCausalLM` is the stock `GraniteMoeHybridForCausalLM` whose Mamba layers each keep their
own state size (`modeling_compressssm_hybrid.CompreSSMHybridMixin`): attention, MoE, shared MLP, embeddings and head
are the stock modules, with the stock parameter names, so stock checkpoints load unchanged and ``from_stock`` /
``to_stock`` are exact. This file is copied next to saved weights as remote code: it imports torch, public names of
``transformers`` and its sibling files.
"""

from transformers import GraniteMoeHybridForCausalLM

from .configuration_compressssm_granitemoehybrid import CompreSSMGraniteMoeHybridConfig
from .modeling_compressssm_hybrid import CompreSSMHybridMixin


class CompreSSMGraniteMoeHybridForCausalLM(CompreSSMHybridMixin, GraniteMoeHybridForCausalLM):
    """Granite 4.0-H causal LM whose Mamba layers each have their own state size (``config.mamba_state_sizes``).

    ``model.state_sizes()`` lists each layer's size (None for attention layers); ``from_stock(model_or_path)`` and
    ``to_stock()`` convert from / to `GraniteMoeHybridForCausalLM`.
    """

    config_class = CompreSSMGraniteMoeHybridConfig
    config: CompreSSMGraniteMoeHybridConfig
    stock_model_class = GraniteMoeHybridForCausalLM


__all__ = ["CompreSSMGraniteMoeHybridForCausalLM"]
