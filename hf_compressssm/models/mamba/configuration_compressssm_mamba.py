"""Configuration of a Mamba-1 model whose layers each have their own SSM state size.

This file stands on its own (it is copied next to saved weights as Hugging Face remote code): it imports only
``transformers`` and the standard library.
"""

from collections.abc import Sequence

from huggingface_hub.dataclasses import strict
from transformers import MambaConfig


@strict
class CompreSSMMambaConfig(MambaConfig):
    r"""
    A [`MambaConfig`] with one SSM state size per layer.

    Args:
        state_size (`int`, defaults to 16):
            The initial, largest allowed state size ``N``. Every layer starts here unless ``state_sizes`` says
            otherwise; compression never grows a layer beyond it.
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

    Every other argument is a [`MambaConfig`] argument.

    Example:

    ```python
    >>> from hf_compressssm import CompreSSMMambaConfig
    >>> config = CompreSSMMambaConfig(hidden_size=64, num_hidden_layers=3, state_size=16, state_sizes=[16, 8, 4])
    >>> config.with_state_sizes([12, 8, 4]).state_sizes
    [12, 8, 4]
    ```
    """

    model_type = "compressssm_mamba"

    state_sizes: list | None = None
    classifier_pooling: str = "mean"
    compression: dict | None = None
    scan_backend: str = "auto"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.state_sizes is None:
            self.state_sizes = [int(self.state_size)] * int(self.num_hidden_layers)
        else:
            self.state_sizes = self.check_state_sizes(self.state_sizes)
        if self.classifier_pooling not in ("mean", "last"):
            raise ValueError(f"classifier_pooling must be 'mean' or 'last', got {self.classifier_pooling!r}.")

    def check_state_sizes(self, state_sizes: Sequence[int]) -> list[int]:
        """Check a per-layer state-size list against this config and return it as a new list of ints.

        Raises `ValueError` naming the first offending layer and the rule it breaks.
        """
        if isinstance(state_sizes, (str, bytes)) or not isinstance(state_sizes, Sequence):
            raise ValueError(f"state_sizes must be a list with one int per layer, got {type(state_sizes).__name__}.")
        if len(state_sizes) != self.num_hidden_layers:
            raise ValueError(
                f"state_sizes has {len(state_sizes)} entries but the model has num_hidden_layers="
                f"{self.num_hidden_layers}: give exactly one state size per layer."
            )
        checked = []
        for layer, size in enumerate(state_sizes):
            if isinstance(size, bool) or not isinstance(size, int):
                raise ValueError(f"state_sizes[{layer}] must be an int, got {size!r} ({type(size).__name__}).")
            if size < 1:
                raise ValueError(f"state_sizes[{layer}]={size} is invalid: every layer needs at least 1 state.")
            if size > self.state_size:
                raise ValueError(
                    f"state_sizes[{layer}]={size} exceeds state_size={self.state_size}, the largest allowed size; "
                    f"raise state_size or shrink that layer."
                )
            checked.append(int(size))
        return checked

    def with_state_sizes(self, state_sizes: Sequence[int]) -> "CompreSSMMambaConfig":
        """Return a new config equal to this one except for ``state_sizes`` (this config is left untouched)."""
        checked = self.check_state_sizes(state_sizes)
        new = self.__class__.from_dict(self.to_dict())
        new.state_sizes = checked
        return new

    def layer_config(self, layer_idx: int) -> MambaConfig:
        """A stock `MambaConfig` describing layer ``layer_idx`` (its ``state_size`` is that layer's size)."""
        values = self.to_dict()
        for key in ("state_sizes", "classifier_pooling", "compression", "model_type", "auto_map", "architectures"):
            values.pop(key, None)
        values["state_size"] = self.state_sizes[layer_idx]
        return MambaConfig(**values)


__all__ = ["CompreSSMMambaConfig"]
