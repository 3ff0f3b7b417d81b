"""Bamba (``bamba``) with per-layer SSM state sizes (``model_type = "compressssm_bamba"``).

`CompreSSMBambaForCausalLM` is the stock `BambaForCausalLM` whose Mamba layers each keep their own state size
(`modeling_compressssm_hybrid.CompreSSMHybridMixin`): attention, MLP, embeddings and head are the stock modules, with the stock parameter names, so stock checkpoints load unchanged and ``from_stock`` /
``to_stock`` are exact. This file is copied next to saved weights as remote code: it imports torch, public names of
``transformers`` and its sibling files.
"""

from transformers import BambaForCausalLM

from .configuration_compressssm_bamba import CompreSSMBambaConfig
from .modeling_compressssm_hybrid import CompreSSMHybridMixin


class CompreSSMBambaForCausalLM(CompreSSMHybridMixin, BambaForCausalLM):
    """Bamba causal LM whose Mamba layers each have their own state size (``config.mamba_state_sizes``).

    ``model.state_sizes()`` lists each layer's size (None for attention layers); ``from_stock(model_or_path)`` and
    ``to_stock()`` convert from / to `BambaForCausalLM`.
    """

    config_class = CompreSSMBambaConfig
    config: CompreSSMBambaConfig
    stock_model_class = BambaForCausalLM


__all__ = ["CompreSSMBambaForCausalLM"]
