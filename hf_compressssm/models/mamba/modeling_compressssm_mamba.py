"""Mamba-1 models whose layers each have their own SSM state size.

The layers are the stock transformers Mamba layers; only the per-layer state size and the choice of scan kernel
differ. This file stands on its own (it is copied next to saved weights as Hugging Face remote code): it imports
``torch``, ``transformers`` and the two sibling files ``configuration_compressssm_mamba.py`` and
``selective_scan.py``.
"""

import json
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import MambaConfig, MambaForCausalLM
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.mamba.modeling_mamba import (
    MambaBlock,
    MambaMixer,
    MambaModel,
    MambaPreTrainedModel,
    MambaRMSNorm,
    apply_mask_to_padding_states,
    causal_conv1d_fn,
    causal_conv1d_update,
)
from transformers.models.mamba.modeling_mamba import (
    MambaForCausalLM as _StockMambaForCausalLM,
)
from transformers.utils import logging

from .configuration_compressssm_mamba import CompreSSMMambaConfig
from .selective_scan import ENV_VAR as _SCAN_BACKEND_ENV
from .selective_scan import resolve_scan_backend, selective_scan, selective_state_update


try:  # optional CUDA kernels (pip install "hf-compressssm[cuda]")
    from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn
except ImportError:
    mamba_inner_fn = None

logger = logging.get_logger(__name__)


class CompreSSMMambaMixer(MambaMixer):
    """A `MambaMixer` with its own state size ``N = config.state_sizes[layer_idx]``.

    Shapes: ``A_log`` (D, N), ``x_proj.weight`` (R + 2N, D) split as ``[dt | B | C]``; D = ``intermediate_size``.
    The selective scan runs through `selective_scan`, which picks the kernel from the tensors' device at call time
    (CUDA ``mamba_ssm`` kernels, the fast CPU scan, or the reference torch scan).
    """

    def __init__(self, config: CompreSSMMambaConfig, layer_idx: int, initialize_mixer_weights: bool = True):
        super().__init__(config.layer_config(layer_idx), layer_idx, initialize_mixer_weights)
        self.scan_backend = getattr(config, "scan_backend", None)

    @property
    def ssm_state_size(self) -> int:
        """The layer's state size N, read from ``A_log`` (so it always matches the parameters)."""
        a_log = self._parameters.get("A_log")
        return int(a_log.shape[-1]) if a_log is not None else self.__dict__["_initial_state_size"]

    @ssm_state_size.setter
    def ssm_state_size(self, value: int) -> None:  # set once by `MambaMixer.__init__`, before ``A_log`` exists
        self.__dict__["_initial_state_size"] = int(value)

    def _backend(self, device: torch.device) -> str:
        requested = os.environ.get(_SCAN_BACKEND_ENV) or self.scan_backend or "auto"
        return resolve_scan_backend(device, requested)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache: Any | None = None,
        attention_mask: torch.LongTensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """(batch, L, hidden) → (batch, L, hidden)."""
        seq_len = hidden_states.shape[1]
        dtype = hidden_states.dtype
        conv_state = recurrent_state = None
        if cache is not None:
            conv_state = cache.get_conv_state(self.layer_idx, state_idx=0)
            recurrent_state = cache.get_recurrent_state(self.layer_idx, state_idx=0)

        hidden_states = apply_mask_to_padding_states(hidden_states, attention_mask)
        projected = self.in_proj(hidden_states).transpose(1, 2)  # (b, 2D, L)
        A = -torch.exp(self.A_log.float())  # (D, N)
        backend = self._backend(projected.device)

        if backend == "mamba_ssm" and self.training and cache is None and mamba_inner_fn is not None:
            return mamba_inner_fn(
                projected,
                self.conv1d.weight,
                self.conv1d.bias if self.use_conv_bias else None,
                self.x_proj.weight,
                self.dt_proj.weight,
                self.out_proj.weight,
                self.out_proj.bias.float() if self.use_bias else None,
                A,
                None,
                None,
                self.D.float(),
                delta_bias=self.dt_proj.bias.float(),
                delta_softplus=True,
            )

        x, gate = projected.chunk(2, dim=1)  # (b, D, L) each
        decoding = conv_state is not None and seq_len == 1 and not cache.is_recording_past(self.layer_idx)
        conv_weight = self.conv1d.weight.squeeze(1)
        if decoding:
            x = causal_conv1d_update(x, conv_state, conv_weight, self.conv1d.bias, activation=self.activation)
        else:
            if cache is not None:
                x = cache.update_conv_state(x, self.layer_idx, conv_kernel_size=self.conv_kernel_size)
            x = causal_conv1d_fn(x, conv_weight, self.conv1d.bias, activation=self.activation)
            if cache is not None:
                x = x[:, :, -seq_len:]

        x = apply_mask_to_padding_states(x.transpose(1, 2), attention_mask)  # (b, L, D)
        dt, B, C = torch.split(self.x_proj(x), [self.time_step_rank, self.ssm_state_size, self.ssm_state_size], dim=-1)
        dt = self.dt_proj.weight @ dt.transpose(1, 2)  # (b, D, L), bias added inside the scan
        dt_bias = self.dt_proj.bias.float() if self.dt_proj.bias is not None else None

        if recurrent_state is not None and seq_len == 1:
            y = selective_state_update(
                recurrent_state,
                x[:, 0],
                dt[..., 0],
                A,
                B[:, 0],
                C[:, 0],
                self.D,
                z=gate[..., 0],
                dt_bias=dt_bias,
                dt_softplus=True,
            ).unsqueeze(-1)
        else:
            result = selective_scan(
                x.transpose(1, 2),
                dt,
                A,
                B.transpose(1, 2),
                C.transpose(1, 2),
                D=self.D.float(),
                z=gate,
                delta_bias=dt_bias,
                delta_softplus=True,
                return_last_state=cache is not None,
                backend=backend,
            )
            if cache is not None:
                y, final_state = result
                cache.update_recurrent_state(final_state, self.layer_idx)
            else:
                y = result
        return self.out_proj(y.transpose(1, 2).to(dtype))


class CompreSSMMambaBlock(MambaBlock):
    """Pre-norm residual block around a `CompreSSMMambaMixer`."""

    def __init__(self, config: CompreSSMMambaConfig, layer_idx: int):
        super(MambaBlock, self).__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = MambaRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mixer = CompreSSMMambaMixer(config, layer_idx=layer_idx, initialize_mixer_weights=False)


class CompreSSMMambaPreTrainedModel(MambaPreTrainedModel):
    config_class = CompreSSMMambaConfig
    config: CompreSSMMambaConfig
    base_model_prefix = "backbone"
    _no_split_modules = ["CompreSSMMambaBlock", "CompreSSMMambaMixer"]

    history_file = "compression_history.json"

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, plus ``compression_history.json`` when the model was compressed."""
        result = super().save_pretrained(save_directory, *args, **kwargs)
        history = getattr(self, "compression_history", None)
        if history and kwargs.get("is_main_process", True):
            with open(os.path.join(save_directory, self.history_file), "w") as f:
                json.dump(history, f, indent=1)
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
        """The state size of each layer, read from the parameters."""
        return [m.A_log.shape[-1] for m in self.modules() if isinstance(m, MambaMixer)]


class CompreSSMMambaModel(CompreSSMMambaPreTrainedModel, MambaModel):
    """The bare Mamba backbone with per-layer state sizes; outputs `MambaOutput`."""

    def __init__(self, config: CompreSSMMambaConfig):
        MambaPreTrainedModel.__init__(self, config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [CompreSSMMambaBlock(config, layer_idx=idx) for idx in range(config.num_hidden_layers)]
        )
        self.gradient_checkpointing = False
        self.norm_f = MambaRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self._register_load_state_dict_pre_hook(self.load_hook)
        self.post_init()


class CompreSSMMambaForCausalLM(CompreSSMMambaPreTrainedModel, MambaForCausalLM):
    """Mamba language model with per-layer state sizes (LM head tied to the input embeddings)."""

    _tied_weights_keys = {"lm_head.weight": "backbone.embeddings.weight"}

    def __init__(self, config: CompreSSMMambaConfig):
        MambaPreTrainedModel.__init__(self, config)
        self.backbone = CompreSSMMambaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_mamba(cls, model_or_path: "MambaForCausalLM | str | os.PathLike", **from_pretrained_kwargs):
        """Convert a stock `MambaForCausalLM` (object, saved folder or Hub id) into this class, weights unchanged.

        The logits of the returned model equal those of the stock model.
        """
        if isinstance(model_or_path, (str, os.PathLike)):
            source = str(model_or_path)
            mamba = _StockMambaForCausalLM.from_pretrained(source, **from_pretrained_kwargs)
        elif isinstance(model_or_path, _StockMambaForCausalLM):
            mamba = model_or_path
            source = getattr(mamba.config, "_name_or_path", "") or None
        else:
            raise TypeError(
                f"from_mamba expects a MambaForCausalLM or a path/Hub id of one, got {type(model_or_path).__name__}."
            )
        if isinstance(mamba.config, CompreSSMMambaConfig):
            raise TypeError("The model is already a CompreSSM Mamba model; use it directly.")
        values = {k: v for k, v in mamba.config.to_dict().items() if k not in _NON_ARCH_KEYS}
        config = CompreSSMMambaConfig(**values)
        if source:
            config.compression = {"base_model": source}
        model = cls(config).to(dtype=mamba.dtype)
        model.load_state_dict(mamba.state_dict(), strict=True)
        return model.to(mamba.device)

    def to_mamba(self) -> MambaForCausalLM:
        """Convert back to a stock `MambaForCausalLM`; every layer must have the same state size."""
        sizes = self.state_sizes()
        if len(set(sizes)) != 1:
            raise ValueError(
                f"to_mamba() needs one state size for every layer, but the layers have {sizes}: a stock MambaConfig "
                "holds a single state_size. Keep this model as a CompreSSMMambaForCausalLM (it loads with the Auto "
                "classes), or compress every layer to the same size."
            )
        values = {k: v for k, v in self.config.to_dict().items() if k not in _NON_ARCH_KEYS}
        for key in ("state_sizes", "classifier_pooling", "compression", "scan_backend"):
            values.pop(key, None)
        values["state_size"] = sizes[0]
        mamba = MambaForCausalLM(MambaConfig(**values)).to(dtype=self.dtype)
        mamba.load_state_dict(self.state_dict(), strict=True)
        return mamba.to(self.device)


class CompreSSMMambaForSequenceClassification(CompreSSMMambaPreTrainedModel):
    """Mamba backbone → pooled final hidden state (``config.classifier_pooling``) → linear head over ``num_labels``.

    Loss follows transformers conventions: regression (MSE) for ``num_labels == 1``, cross-entropy for integer
    labels, BCE-with-logits for float multi-label targets.
    """

    def __init__(self, config: CompreSSMMambaConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.backbone = CompreSSMMambaModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def get_input_embeddings(self):
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, new_embeddings):
        self.backbone.set_input_embeddings(new_embeddings)

    def _pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(batch, L, H) → (batch, H)."""
        if attention_mask is None:
            return hidden.mean(dim=1) if self.config.classifier_pooling == "mean" else hidden[:, -1]
        mask = attention_mask.to(hidden.dtype)
        if self.config.classifier_pooling == "mean":
            return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = (positions[None] * (mask > 0)).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> tuple | SequenceClassifierOutput:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.backbone(
            input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            output_hidden_states=output_hidden_states,
            use_cache=False,
            return_dict=True,
        )
        pooled = self._pool(outputs.last_hidden_state, attention_mask)
        logits = self.classifier(pooled.to(self.classifier.weight.dtype)).float()

        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1), labels.float())
            elif labels.dtype in (torch.long, torch.int, torch.int16, torch.int8, torch.uint8):
                loss = F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
            else:
                loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
        if not return_dict:
            output = (logits, outputs.hidden_states) if outputs.hidden_states is not None else (logits,)
            return ((loss,) + output) if loss is not None else output
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


# Keys of a config dict that are not architecture arguments.
_NON_ARCH_KEYS = {"model_type", "architectures", "transformers_version", "auto_map", "intermediate_size", "dtype"}


__all__ = [
    "CompreSSMMambaForCausalLM",
    "CompreSSMMambaForSequenceClassification",
    "CompreSSMMambaModel",
    "CompreSSMMambaPreTrainedModel",
]
