"""Configuration of a Mamba-1 model whose layers each have their own SSM state size.

This file stands on its own (it is copied next to saved weights as Hugging Face remote code): it imports only
``transformers``, ``huggingface_hub``, the standard library and its sibling
``configuration_compressssm_common.py`` (the per-layer state sizes both families share).
"""

import copy

from huggingface_hub.dataclasses import strict
from transformers import MambaConfig

from .configuration_compressssm_common import PerLayerStateSizes


@strict
class CompreSSMMambaConfig(PerLayerStateSizes, MambaConfig):
    r"""
    A [`MambaConfig`] with one SSM state size per layer.

    Args:
        state_size (`int`, defaults to 16):
            The initial, largest allowed state size ``N`` (``>= 1``). Every layer starts here unless ``state_sizes``
            says otherwise; compression never grows a layer beyond it.
        state_sizes (`list[int]`, *optional*):
            One state size per layer (``len == num_hidden_layers``, each ``1 <= n <= state_size``). Defaults to
            ``[state_size] * num_hidden_layers``.
        classifier_pooling (`str`, defaults to `"mean"`):
            How [`CompreSSMMambaForSequenceClassification`] pools the final hidden states: ``"mean"`` over non-padding
            tokens, or ``"last"`` (the last non-padding token).
        compression (`dict`, *optional*):
            Free-form record of how the model was compressed (τ, schedule, score); informational only.
        scan_backend (`str`, defaults to `"auto"`):
            Selective-scan kernel: ``"auto"`` (by the tensors' device at call time: ``mamba_ssm`` on CUDA when
            installed, the fast CPU scan on CPU), or force one of ``"fast"``, ``"torch"``, ``"mambapy"``,
            ``"mamba_ssm"``. The environment variable ``HF_COMPRESSSSM_SCAN_BACKEND`` overrides it.

    Every other argument is a [`MambaConfig`] argument. Per-layer sizes are also visible through transformers' own
    per-layer mechanism: ``config.per_layer_config[i].state_size == config.state_sizes[i]`` and
    ``config.is_heterogeneous`` is true when the sizes differ. ``per_layer_config={i: {"state_size": n}}`` is
    accepted as input too. Unlike a heterogeneous stock config, ``config.state_size`` stays readable: it is the cap
    ``N``, not a layer's size. ``state_sizes`` is what ``config.json`` stores.

    Example:

    ```python
    >>> from hf_compressssm import CompreSSMMambaConfig
    >>> config = CompreSSMMambaConfig(hidden_size=64, num_hidden_layers=3, state_size=16, state_sizes=[16, 8, 4])
    >>> config.with_state_sizes([12, 8, 4]).state_sizes
    [12, 8, 4]
    >>> config.per_layer_config[1].state_size
    8
    ```
    """

    model_type = "compressssm_mamba"

    state_sizes: list | None = None
    classifier_pooling: str = "mean"
    compression: dict | None = None
    scan_backend: str = "auto"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._check_global_sizes()
        if self.state_sizes is None:
            self.state_sizes = [int(self.state_size)] * int(self.num_hidden_layers)
        else:
            self.state_sizes = self.check_state_sizes(self.state_sizes)
        if self.classifier_pooling not in ("mean", "last"):
            raise ValueError(f"classifier_pooling must be 'mean' or 'last', got {self.classifier_pooling!r}.")

    def layer_config(self, layer_idx: int) -> "CompreSSMMambaConfig":
        """The config of layer ``layer_idx``: a shallow copy of this config whose ``state_size`` is that layer's size
        (``state_sizes`` cleared, so the copy describes one uniform layer). Nothing is re-validated, so head-level
        fields (``num_labels``, ``problem_type``) are carried over as they are."""
        size = self._sizes()[layer_idx]
        layer = copy.copy(self)
        layer.__dict__.pop("_heterogeneity_spec", None)
        layer.__dict__["state_sizes"] = None
        layer.__dict__["state_size"] = int(size)
        layer.skip = []  # what transformers' own per-layer configs carry (no sub-layer is skipped)
        return layer


__all__ = ["CompreSSMMambaConfig"]
