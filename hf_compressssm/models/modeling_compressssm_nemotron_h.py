"""NVIDIA Nemotron-H (``nemotron_h``) with per-layer SSM state sizes (``model_type = "compressssm_nemotron_h"``).

`CompreSSMNemotronHForCausalLM` is the stock `NemotronHForCausalLM` whose Mamba layers each keep their own state size
(`modeling_compressssm_hybrid.CompreSSMHybridMixin`): attention, MLP, MoE, embeddings and head are the stock
modules, with the stock parameter names, so stock checkpoints load unchanged and ``from_stock`` /
``to_stock`` are exact. This file is copied next to saved weights as remote code: it imports torch, public names of
``transformers`` and its sibling files.
"""

from transformers import NemotronHForCausalLM

from .configuration_compressssm_nemotron_h import CompreSSMNemotronHConfig
from .modeling_compressssm_hybrid import CompreSSMHybridMixin


class CompreSSMNemotronHForCausalLM(CompreSSMHybridMixin, NemotronHForCausalLM):
    """Nemotron-H causal LM whose Mamba layers each have their own state size (``config.mamba_state_sizes``).

    ``model.state_sizes()`` lists each layer's size (None for attention layers); ``from_stock(model_or_path)`` and
    ``to_stock()`` convert from / to `NemotronHForCausalLM`.
    """

    config_class = CompreSSMNemotronHConfig
    config: CompreSSMNemotronHConfig
    stock_model_class = NemotronHForCausalLM


__all__ = ["CompreSSMNemotronHForCausalLM"]
