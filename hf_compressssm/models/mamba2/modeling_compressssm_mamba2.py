"""Mamba-2 models whose layers each have their own SSM state size.

The layers are the stock transformers Mamba-2 layers; only the per-layer (per-group) state size ``N`` differs, and
the mixer reads it from its parameters, so the stock forward (the chunked torch SSD path on CPU; ``mamba_ssm``'s
SSD kernels on CUDA when installed), the cache and ``generate`` work unchanged with any ``N`` per layer. This file
stands on its own (it is copied next to saved weights as Hugging Face remote code): it imports ``torch``,
``transformers`` and the sibling ``configuration_compressssm_mamba2.py``.
"""

import json
import os

from torch import nn
from transformers import Mamba2Config, Mamba2ForCausalLM
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.mamba2.modeling_mamba2 import (
    Mamba2Block,
    Mamba2Mixer,
    Mamba2Model,
    Mamba2PreTrainedModel,
    Mamba2RMSNorm,
)
from transformers.utils import logging

from .configuration_compressssm_mamba2 import CompreSSMMamba2Config


logger = logging.get_logger(__name__)


class CompreSSMMamba2Mixer(Mamba2Mixer):
    """A `Mamba2Mixer` with its own per-group state size ``N = config.state_sizes[layer_idx]``.

    Shapes (I = ``intermediate_size``, G = ``n_groups``, H = ``num_heads``): ``in_proj.weight`` is
    (I + (I + 2GN) + H, hidden), split as ``[z | x | B | C | dt]``; ``conv1d.weight`` is (I + 2GN, 1, kernel) over
    ``[x | B | C]``; ``A_log``, ``D``, ``dt_bias`` are (H,). ``ssm_state_size`` and ``conv_dim`` are read from
    ``conv1d.weight``, so they always match the parameters (also after a cut).
    """

    def __init__(self, config: CompreSSMMamba2Config, layer_idx: int, initialize_mixer_weights: bool = True):
        super().__init__(config.layer_config(layer_idx), layer_idx, initialize_mixer_weights)

    def _conv_channels(self) -> int | None:
        conv = self._modules.get("conv1d")
        return int(conv.weight.shape[0]) if conv is not None else None

    @property
    def ssm_state_size(self) -> int:
        """The layer's per-group state size N, read from ``conv1d.weight`` (I + 2GN channels)."""
        channels = self._conv_channels()
        if channels is None:
            return self.__dict__["_initial_state_size"]
        return (channels - self.intermediate_size) // (2 * self.n_groups)

    @ssm_state_size.setter
    def ssm_state_size(self, value: int) -> None:  # set once by `Mamba2Mixer.__init__`, before ``conv1d`` exists
        self.__dict__["_initial_state_size"] = int(value)

    @property
    def conv_dim(self) -> int:
        """Channels of the depthwise convolution, ``I + 2GN``."""
        channels = self._conv_channels()
        return channels if channels is not None else self.intermediate_size + 2 * self.n_groups * self.ssm_state_size

    @conv_dim.setter
    def conv_dim(self, value: int) -> None:  # derived; the stock __init__ assigns it
        pass


class CompreSSMMamba2Block(Mamba2Block):
    """Pre-norm residual block around a `CompreSSMMamba2Mixer`."""

    def __init__(self, config: CompreSSMMamba2Config, layer_idx: int):
        GradientCheckpointingLayer.__init__(self)
        self.config = config
        self.layer_idx = layer_idx
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = Mamba2RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mixer = CompreSSMMamba2Mixer(config, layer_idx=layer_idx, initialize_mixer_weights=False)


class CompreSSMMamba2PreTrainedModel(Mamba2PreTrainedModel):
    config_class = CompreSSMMamba2Config
    config: CompreSSMMamba2Config
    base_model_prefix = "backbone"
    _no_split_modules = ["CompreSSMMamba2Block"]

    history_file = "compression_history.json"

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, plus ``compression_history.json`` when the model was compressed."""
        result = super().save_pretrained(save_directory, *args, **kwargs)
        history = getattr(self, "compression_history", None)
        if history and kwargs.get("is_main_process", True):
            path = os.path.join(save_directory, self.history_file)
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(history, f, indent=1)
            os.replace(tmp, path)
        return result

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, plus the compression history of a local folder when present."""
        if kwargs.get("ignore_mismatched_sizes"):
            raise ValueError(
                "ignore_mismatched_sizes=True would silently re-initialise the states of any layer whose size differs "
                "from the checkpoint. CompreSSM models carry their per-layer sizes in config.json: load the checkpoint "
                "with its own config instead."
            )
        try:
            model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except RuntimeError as err:
            if "mismatch" not in str(err) and "ignore_mismatched_sizes" not in str(err):
                raise
            raise ValueError(
                f"The weights in {pretrained_model_name_or_path} do not match the state sizes of the config used to "
                f"build the model (see the load report above for the tensors). A compressed checkpoint must be "
                f"loaded with its own config.json: do not pass a config from another stage of compression, and "
                f"keep config.json and model.safetensors of one save together."
            ) from err
        path = os.path.join(str(pretrained_model_name_or_path), cls.history_file)
        if os.path.isfile(path):
            with open(path) as f:
                model.compression_history = json.load(f)
        return model

    def state_sizes(self) -> list[int]:
        """The per-group state size of each layer, read from the parameters."""
        return [m.ssm_state_size for m in self.modules() if isinstance(m, CompreSSMMamba2Mixer)]


class CompreSSMMamba2Model(CompreSSMMamba2PreTrainedModel, Mamba2Model):
    """The bare Mamba-2 backbone with per-layer state sizes; outputs `Mamba2Output`."""

    def __init__(self, config: CompreSSMMamba2Config):
        Mamba2PreTrainedModel.__init__(self, config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [CompreSSMMamba2Block(config, layer_idx=idx) for idx in range(config.num_hidden_layers)]
        )
        self.gradient_checkpointing = False
        self.norm_f = Mamba2RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self._register_load_state_dict_pre_hook(self.load_hook)
        self.post_init()


class CompreSSMMamba2ForCausalLM(CompreSSMMamba2PreTrainedModel, Mamba2ForCausalLM):
    """Mamba-2 language model with per-layer state sizes."""

    _tied_weights_keys = {"lm_head.weight": "backbone.embeddings.weight"}

    def __init__(self, config: CompreSSMMamba2Config):
        Mamba2PreTrainedModel.__init__(self, config)
        self.backbone = CompreSSMMamba2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_mamba2(cls, model_or_path: "Mamba2ForCausalLM | str | os.PathLike", **from_pretrained_kwargs):
        """Convert a stock `Mamba2ForCausalLM` (object, saved folder or Hub id) into this class, weights unchanged.

        The logits of the returned model equal those of the stock model.
        """
        if isinstance(model_or_path, (str, os.PathLike)):
            source = str(model_or_path)
            stock = Mamba2ForCausalLM.from_pretrained(source, **from_pretrained_kwargs)
        elif isinstance(model_or_path, Mamba2ForCausalLM):
            stock = model_or_path
            source = getattr(stock.config, "_name_or_path", "") or None
        else:
            raise TypeError(
                f"from_mamba2 expects a Mamba2ForCausalLM or a path/Hub id of one, got {type(model_or_path).__name__}."
            )
        if isinstance(stock.config, CompreSSMMamba2Config):
            raise TypeError("The model is already a CompreSSM Mamba-2 model; use it directly.")
        values = {k: v for k, v in stock.config.to_dict().items() if k not in _NON_ARCH_KEYS}
        config = CompreSSMMamba2Config(**values)
        if source:
            config.compression = {"base_model": source}
        model = cls(config).to(dtype=stock.dtype)
        model.load_state_dict(stock.state_dict(), strict=True)
        return model.to(stock.device)

    def to_mamba2(self) -> Mamba2ForCausalLM:
        """Convert back to a stock `Mamba2ForCausalLM`; every layer must have the same state size."""
        sizes = self.state_sizes()
        if len(set(sizes)) != 1:
            raise ValueError(
                f"to_mamba2() needs one state size for every layer, but the layers have {sizes}: a stock Mamba2Config "
                "holds a single state_size. Keep this model as a CompreSSMMamba2ForCausalLM (it loads with the Auto "
                "classes), or compress every layer to the same size."
            )
        values = {k: v for k, v in self.config.to_dict().items() if k not in _NON_ARCH_KEYS}
        for key in ("state_sizes", "compression"):
            values.pop(key, None)
        values["state_size"] = sizes[0]
        stock = Mamba2ForCausalLM(Mamba2Config(**values)).to(dtype=self.dtype)
        stock.load_state_dict(self.state_dict(), strict=True)
        return stock.to(self.device)


# Keys of a config dict that are not architecture arguments.
_NON_ARCH_KEYS = {"model_type", "architectures", "transformers_version", "auto_map", "dtype"}


__all__ = [
    "CompreSSMMamba2ForCausalLM",
    "CompreSSMMamba2Mixer",
    "CompreSSMMamba2Model",
    "CompreSSMMamba2PreTrainedModel",
]
