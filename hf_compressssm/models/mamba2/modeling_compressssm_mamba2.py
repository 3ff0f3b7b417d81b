"""Mamba-2 models whose layers each have their own SSM state size.

The layers are the stock transformers Mamba-2 layers; only the per-layer (per-group) state size ``N`` differs, and
the mixer reads it from its parameters. The mixer's forward is the stock one, with its kernels chosen per call
(`CompreSSMMamba2Mixer.kernel_plan`): CPU tensors always run transformers' chunked torch code, CUDA tensors
``mamba_ssm``'s SSD kernels and ``causal_conv1d`` when installed, within the kernels' limits. This file stands on its
own (it is copied next to saved weights as Hugging Face remote code): it imports ``torch``, ``transformers`` and the
sibling ``configuration_compressssm_mamba2.py``.
"""

import importlib
import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, Mamba2Config, Mamba2ForCausalLM
from transformers.integrations.accelerate import force_accelerate_hooks
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.mamba2 import modeling_mamba2 as _stock
from transformers.models.mamba2.modeling_mamba2 import (
    Mamba2Block,
    Mamba2Mixer,
    Mamba2Model,
    Mamba2Output,
    Mamba2PreTrainedModel,
    Mamba2RMSNorm,
)
from transformers.utils import logging

from .configuration_compressssm_mamba2 import CompreSSMMamba2Config
from .ssd_scan import causal_conv1d, causal_conv1d_step, ssd_chunk_scan, ssd_state_update


logger = logging.get_logger(__name__)

# The gated norm class was renamed in transformers 5.25 (MambaRMSNormGated -> Mamba2RMSNormGated).
_GATED_NORM = getattr(_stock, "Mamba2RMSNormGated", None) or _stock.MambaRMSNormGated
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_IMPORTS: dict[str, Any] = {}


def _try_import(name: str) -> Any:
    """The module ``name``, or None when it (or its compiled extension) cannot be imported; remembered."""
    if name not in _IMPORTS:
        try:
            _IMPORTS[name] = importlib.import_module(name)
        except Exception:  # ImportError, or a CUDA extension that fails to load
            _IMPORTS[name] = None
    return _IMPORTS[name]


def apply_mask_to_padding_states(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the padded positions. hidden_states (b, L, ...) and attention_mask (b, L) -> (b, L, ...)."""
    if attention_mask is not None:
        return (hidden_states * attention_mask[:, :, None]).to(hidden_states.dtype)
    return hidden_states


def padding_mask(attention_mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """The (b, length) padding mask the mixers apply, or None when there is nothing to mask: no 2-D mask, a
    one-token decode step, or no padding. A longer mask (prompt + new tokens) is trimmed to its last ``length``."""
    if attention_mask is None or attention_mask.ndim != 2 or length == 1 or bool(attention_mask.all()):
        return None
    return attention_mask[:, -length:]


def _device_type(device) -> str:
    return torch.device(device).type


def _kernel_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` (b, D, L) as ``causal_conv1d`` takes it: L-contiguous, or channel-last with 8-aligned D and strides."""
    if x.stride(2) == 1:
        return x
    channel_last = x.stride(1) == 1 and x.shape[1] % 8 == 0 and x.stride(2) % 8 == 0 and x.stride(0) % 8 == 0
    return x if channel_last else x.contiguous()


@dataclass(frozen=True)
class Mamba2KernelPlan:
    """The kernels one Mamba-2 forward uses.

    ``scan``: ``mamba_ssm`` (triton SSD, ``mamba_chunk_scan_combined``) | ``torch``; ``conv`` and ``conv_step``:
    ``causal_conv1d`` | ``torch``; ``step`` (decode state update): ``mamba_ssm`` | ``torch``; ``fused``: a training
    forward runs ``mamba_split_conv1d_scan_combined`` (reads ``conv1d``, ``norm`` and ``out_proj`` weights directly);
    ``fallbacks``: why a kernel was not used on CUDA (warned once).
    """

    scan: str
    conv: str
    fused: bool
    step: str
    conv_step: str
    fallbacks: tuple[str, ...] = ()


class CompreSSMMamba2Mixer(Mamba2Mixer):
    """A `Mamba2Mixer` with its own per-group state size ``N = config.state_sizes[layer_idx]``.

    Shapes (I = ``intermediate_size``, G = ``n_groups``, H = ``num_heads``): ``in_proj.weight`` is
    (I + (I + 2GN) + H, hidden), split as ``[z | x | B | C | dt]``; ``conv1d.weight`` is (I + 2GN, 1, kernel) over
    ``[x | B | C]``; ``A_log``, ``D``, ``dt_bias`` are (H,). ``ssm_state_size`` and ``conv_dim`` are read from
    ``conv1d.weight``, so they always match the parameters (also after a cut). Kernels: see `kernel_plan`.
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

    def kernel_plan(
        self,
        device: torch.device | str,
        dtype: torch.dtype | None = None,
        cached: bool = False,
        attention_mask: torch.Tensor | None = None,
    ) -> Mamba2KernelPlan:
        """The kernels a forward on ``device``/``dtype`` uses.

        CPU (any device but CUDA): transformers' torch code. CUDA: ``mamba_ssm``'s SSD kernels and ``causal_conv1d``
        when importable and the dtype is float32/float16/bfloat16; ``causal_conv1d`` also needs conv width 2-4 and a
        SiLU activation. The fused training kernel additionally needs plain ``conv1d``/``norm``/``out_proj`` modules
        (an adapter there would be bypassed), no padding in the batch (it does not re-mask after the convolution)
        and ``I + 2GN`` divisible by 8 (``mamba_ssm``'s ``ensure_stride`` asserts it); otherwise the unfused
        kernels run.
        """
        if _device_type(device) != "cuda":
            return Mamba2KernelPlan("torch", "torch", False, "torch", "torch")
        fallbacks = []
        dtype_ok = dtype is None or dtype in _KERNEL_DTYPES
        ssd = _try_import("mamba_ssm.ops.triton.ssd_combined")
        if ssd is None:
            fallbacks.append(
                "mamba_ssm is not installed: the SSD scan runs transformers' torch code on CUDA "
                '(pip install "hf-compressssm[cuda]")'
            )
        elif not dtype_ok:
            fallbacks.append(f"the mamba_ssm SSD kernels cannot take dtype {dtype}: using the torch code")
        scan = "mamba_ssm" if ssd is not None and dtype_ok else "torch"
        step = "mamba_ssm" if scan == "mamba_ssm" else "torch"
        conv = "torch"
        if _try_import("causal_conv1d") is None:
            fallbacks.append(
                'causal_conv1d is not installed: the convolution runs in torch (pip install "hf-compressssm[cuda]")'
            )
        elif not 2 <= self.conv_kernel_size <= 4 or self.activation not in ("silu", "swish") or not dtype_ok:
            fallbacks.append(
                f"causal_conv1d cannot take conv_kernel={self.conv_kernel_size}, hidden_act={self.activation!r}, "
                f"dtype {dtype}: using the torch convolution"
            )
        else:
            conv = "causal_conv1d"
        fused = False
        if self.training and not cached and scan == "mamba_ssm" and conv == "causal_conv1d":
            plain = (
                type(self.conv1d) is nn.Conv1d and type(self.out_proj) is nn.Linear and type(self.norm) is _GATED_NORM
            )
            padded = attention_mask is not None and not bool(attention_mask.all())
            if self.conv_dim % 8:
                fallbacks.append(
                    f"the fused mamba_ssm kernel needs I + 2GN divisible by 8, got {self.conv_dim} (N = "
                    f"{self.ssm_state_size}): using the unfused kernels"
                )
            fused = plain and not padded and self.conv_dim % 8 == 0
        for reason in fallbacks:
            logger.warning_once(f"CompreSSMMamba2Mixer: {reason}.")
        return Mamba2KernelPlan(scan, conv, fused, step, conv, tuple(fallbacks))

    @force_accelerate_hooks("conv1d")
    def forward(
        self,
        hidden_states: torch.Tensor,
        cache: Any | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """The stock `Mamba2Mixer.forward` with the kernels of `kernel_plan`. (b, L, hidden) → (b, L, hidden)."""
        if "cache_params" in kwargs:  # the stock forward's deprecated name
            cache = kwargs.pop("cache_params")
        batch_size, seq_len, _ = hidden_states.shape
        dtype = hidden_states.dtype
        conv_state = recurrent_state = None
        if cache is not None:
            conv_state = cache.get_conv_state(self.layer_idx, state_idx=0)
            recurrent_state = cache.get_recurrent_state(self.layer_idx, state_idx=0)

        hidden_states = apply_mask_to_padding_states(hidden_states, attention_mask)
        projected_states = self.in_proj(hidden_states)
        plan = self.kernel_plan(projected_states.device, projected_states.dtype, cache is not None, attention_mask)
        seq_idx = kwargs.get("seq_idx")
        if plan.scan == "torch" and (seq_idx is not None or kwargs.get("cu_seqlens") is not None):
            raise ValueError("Packed sequences (seq_idx / cu_seqlens) need mamba_ssm's kernels on CUDA tensors.")
        ssd = _try_import("mamba_ssm.ops.triton.ssd_combined") if plan.scan == "mamba_ssm" else None

        A = -torch.exp(self.A_log.float())
        if plan.fused:
            return ssd.mamba_split_conv1d_scan_combined(
                projected_states,
                self.conv1d.weight.squeeze(1),
                self.conv1d.bias,
                self.dt_bias,
                A,
                D=self.D,
                chunk_size=self.chunk_size,
                seq_idx=seq_idx,
                dt_limit=self.time_step_limit,
                activation=self.activation,
                rmsnorm_weight=self.norm.weight,
                rmsnorm_eps=self.norm.variance_epsilon,
                outproj_weight=self.out_proj.weight,
                outproj_bias=self.out_proj.bias,
                headdim=self.head_dim,
                ngroups=self.n_groups,
                norm_before_gate=False,
            )

        gate, hidden_states_B_C, dt = projected_states.split(
            [self.intermediate_size, self.conv_dim, self.num_heads], dim=-1
        )
        hidden_states_B_C = hidden_states_B_C.transpose(1, 2)
        weight = self.conv1d.weight.squeeze(1)
        if conv_state is not None and seq_len == 1 and not cache.is_recording_past(self.layer_idx):
            if hasattr(cache, "increase_count"):  # transformers >= 5.25 counts decode tokens on the conv step
                cache.increase_count(self.layer_idx, 0)
            if plan.conv_step == "causal_conv1d" and conv_state.dtype == hidden_states_B_C.dtype:
                update = _try_import("causal_conv1d").causal_conv1d_update
            else:
                update = causal_conv1d_step
            hidden_states_B_C = update(
                hidden_states_B_C, conv_state, weight, self.conv1d.bias, activation=self.activation
            )
        else:
            if cache is not None:
                hidden_states_B_C = cache.update_conv_state(
                    hidden_states_B_C, self.layer_idx, conv_kernel_size=self.conv_kernel_size
                )
            if plan.conv == "causal_conv1d":
                hidden_states_B_C = _try_import("causal_conv1d").causal_conv1d_fn(
                    _kernel_layout(hidden_states_B_C),
                    weight,
                    self.conv1d.bias,
                    seq_idx=seq_idx,
                    activation=self.activation,
                )
            else:
                hidden_states_B_C = causal_conv1d(
                    hidden_states_B_C, weight, self.conv1d.bias, activation=self.activation
                )
            if cache is not None:
                hidden_states_B_C = hidden_states_B_C[:, :, -seq_len:]

        hidden_states_B_C = apply_mask_to_padding_states(hidden_states_B_C.transpose(1, 2), attention_mask)
        groups_n = self.n_groups * self.ssm_state_size
        hidden_states, B, C = torch.split(hidden_states_B_C, [self.intermediate_size, groups_n, groups_n], dim=-1)

        if recurrent_state is not None and seq_len == 1:
            step_args = (
                recurrent_state,
                hidden_states.view(batch_size, self.num_heads, self.head_dim),
                dt.transpose(1, 2).expand(-1, -1, self.head_dim),
                A[:, None, None].expand(-1, self.head_dim, self.ssm_state_size),
                B.view(batch_size, self.n_groups, self.ssm_state_size),
                C.view(batch_size, self.n_groups, self.ssm_state_size),
                self.D[:, None].expand(-1, self.head_dim),
            )
            dt_bias = self.dt_bias[:, None].expand(-1, self.head_dim)
            if plan.step == "mamba_ssm":
                fn = _try_import("mamba_ssm.ops.triton.selective_state_update").selective_state_update
            else:
                fn = ssd_state_update
            next_state = recurrent_state.clone()  # out of place, so a cache recording its past keeps the old state
            scan_output = fn(next_state, *step_args[1:], z=None, dt_bias=dt_bias, dt_softplus=True)
            cache.update_recurrent_state(next_state, layer_idx=self.layer_idx)
            scan_output = scan_output.view(batch_size, 1, -1)
        else:
            scan_args = (
                hidden_states.view(batch_size, seq_len, self.num_heads, self.head_dim),
                dt,
                A,
                B.view(batch_size, seq_len, self.n_groups, self.ssm_state_size),
                C.view(batch_size, seq_len, self.n_groups, self.ssm_state_size),
            )
            scan_kwargs = dict(
                chunk_size=self.chunk_size,
                D=self.D,
                z=None,
                dt_bias=self.dt_bias,
                initial_states=recurrent_state,
                dt_softplus=True,
                dt_limit=self.time_step_limit,
                return_final_states=cache is not None,
            )
            if ssd is not None:
                scan_result = ssd.mamba_chunk_scan_combined(*scan_args, seq_idx=seq_idx, **scan_kwargs)
            else:
                scan_result = ssd_chunk_scan(*scan_args, **scan_kwargs)
            if cache is not None:
                scan_output, final_state = scan_result
                cache.update_recurrent_state(final_state, layer_idx=self.layer_idx)
            else:
                scan_output = scan_result
            scan_output = scan_output.reshape(batch_size, seq_len, -1)

        scan_output = self.norm(scan_output, gate)
        return self.out_proj(scan_output.to(dtype))


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

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: Any | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> "tuple | Mamba2Output":
        """Embeddings → blocks → final norm. input_ids (b, L) or inputs_embeds (b, L, hidden) → (b, L, hidden).

        A cache is made only when ``use_cache`` (default: ``config.use_cache`` outside training)."""
        if "cache_params" in kwargs:
            cache = kwargs.pop("cache_params")
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embeddings(input_ids)
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        mask = padding_mask(attention_mask, inputs_embeds.shape[1])
        hidden_states = inputs_embeds
        all_hidden_states = () if output_hidden_states else None
        for block in self.layers:
            hidden_states = block(hidden_states, cache=cache if use_cache else None, attention_mask=mask)
            if output_hidden_states:
                all_hidden_states = all_hidden_states + (hidden_states,)
        hidden_states = self.norm_f(hidden_states)
        if output_hidden_states:
            all_hidden_states = all_hidden_states + (hidden_states,)
        if not return_dict:
            return tuple(v for v in (hidden_states, cache if use_cache else None, all_hidden_states) if v is not None)
        return Mamba2Output(
            last_hidden_state=hidden_states, cache=cache if use_cache else None, hidden_states=all_hidden_states
        )


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
    "Mamba2KernelPlan",
    "CompreSSMMamba2Mixer",
    "CompreSSMMamba2Model",
    "CompreSSMMamba2PreTrainedModel",
]
