"""Zyphra Zamba2 (``zamba2``) with per-layer SSM state sizes (``model_type = "compressssm_zamba2"``).

`CompreSSMZamba2ForCausalLM` is the stock `Zamba2ForCausalLM` whose Mamba layers each keep their own state size
(`modeling_compressssm_hybrid.CompreSSMHybridMixin`): the shared attention blocks (and their per-layer adapters),
embeddings and head are the stock modules, with the stock parameter names, so stock checkpoints load unchanged and ``from_stock`` /
``to_stock`` are exact. This file is copied next to saved weights as remote code: it imports torch, public names of
``transformers`` and its sibling files.
"""

from transformers import Zamba2ForCausalLM

from .configuration_compressssm_zamba2 import CompreSSMZamba2Config
from .modeling_compressssm_hybrid import CompreSSMHybridMixin


class CompreSSMZamba2ForCausalLM(CompreSSMHybridMixin, Zamba2ForCausalLM):
    """Zamba2 causal LM whose Mamba layers each have their own state size (``config.mamba_state_sizes``).

    ``model.state_sizes()`` lists each layer's size (every Zamba2 layer has a Mamba layer); ``from_stock(model_or_path)`` and
    ``to_stock()`` convert from / to `Zamba2ForCausalLM`.
    """

    config_class = CompreSSMZamba2Config
    config: CompreSSMZamba2Config
    stock_model_class = Zamba2ForCausalLM


__all__ = ["CompreSSMZamba2ForCausalLM"]
