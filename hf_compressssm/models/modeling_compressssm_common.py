"""What every CompreSSM model family shares: norms, padding masks, outputs, weight init and the save/load contract.

The contract (`CompreSSMCheckpointMixin`, used by `CompreSSMPreTrainedModel` and by the hybrid hosts): a model is
saved only when its config describes its parameters (a folder that could not be loaded is never written),
``compression_history.json`` is written atomically and a corrupt one only warns on load, and loading is strict about
the layers: a checkpoint that lacks layer tensors, has another layer count, or would have layer tensors
re-initialised by ``ignore_mismatched_sizes=True`` is refused. Loading without a checkpoint
(``from_pretrained(None, config=..., state_dict=...)``) is the caller's explicit choice and is not checked.

This file is copied next to saved weights as remote code: it imports torch, public names of ``transformers`` and
``transformers.modeling_outputs`` only.
"""

import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, PreTrainedModel, logging
from transformers.modeling_outputs import ModelOutput


logger = logging.get_logger(__name__)

try:  # transformers' init functions skip tensors that were loaded from a checkpoint
    from transformers import initialization as _init
except ImportError:  # pragma: no cover - depends on the transformers release
    _init = None
    logger.warning_once(
        "transformers.initialization is missing in this transformers release: CompreSSM models initialise their "
        "weights with torch.nn.init, skipping tensors marked as loaded (_is_hf_initialized)."
    )


def _guarded(fn):
    def apply(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if getattr(tensor, "_is_hf_initialized", False):
            return tensor
        with torch.no_grad():
            return fn(tensor, *args, **kwargs)

    return apply


init_ones_ = getattr(_init, "ones_", None) or _guarded(nn.init.ones_)
init_zeros_ = getattr(_init, "zeros_", None) or _guarded(nn.init.zeros_)
init_copy_ = getattr(_init, "copy_", None) or _guarded(lambda t, other: t.copy_(other))
init_constant_ = getattr(_init, "constant_", None) or _guarded(nn.init.constant_)
init_uniform_ = getattr(_init, "uniform_", None) or _guarded(nn.init.uniform_)
init_kaiming_uniform_ = getattr(_init, "kaiming_uniform_", None) or _guarded(nn.init.kaiming_uniform_)


def inverse_softplus_time_steps(size: int, config, device) -> torch.Tensor:
    """Time-step biases: Δ log-uniform in [time_step_min, time_step_max] (floored), returned as softplus⁻¹(Δ) (size,)."""
    low, high = math.log(config.time_step_min), math.log(config.time_step_max)
    dt = torch.exp(torch.rand(size, device=device, dtype=torch.float32) * (high - low) + low)
    dt = dt.clamp(min=config.time_step_floor)
    return dt + torch.log(-torch.expm1(-dt))


class CompreSSMRMSNorm(nn.Module):
    """RMS norm over the last axis with a learned scale ``weight`` (hidden,), computed in float32."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.variance_epsilon}"


def apply_padding_mask(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Zero padded positions. hidden_states (b, L, ...), attention_mask (b, L) of 0/1 -> (b, L, ...)."""
    if attention_mask is None:
        return hidden_states
    return (hidden_states * attention_mask[:, :, None]).to(hidden_states.dtype)


def padding_mask(attention_mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """The (b, length) padding mask the mixers apply, or None when there is nothing to mask: no 2-D mask, a
    one-token decode step, or no padding. A longer mask (prompt + new tokens) is trimmed to its last ``length``."""
    if attention_mask is None or attention_mask.ndim != 2 or length == 1 or bool(attention_mask.all()):
        return None
    return attention_mask[:, -length:]


_ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu, "tanh": torch.tanh}


def activation_fn(name: str | None):
    """The elementwise activation called ``name`` (None: identity); `ValueError` for one these models lack."""
    if name is None:
        return None
    if name not in _ACTIVATIONS:
        raise ValueError(f"hidden_act={name!r} is not supported; use one of {sorted(_ACTIVATIONS)}.")
    return _ACTIVATIONS[name]


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = None
) -> torch.Tensor:
    """Depthwise causal convolution. x (b, D, L), weight (D, W), bias (D,) -> (b, D, L) in x's dtype."""
    out = F.conv1d(x.to(weight.dtype), weight.unsqueeze(1), bias, padding=weight.shape[-1] - 1, groups=weight.shape[0])
    act = activation_fn(activation)
    out = out[..., : x.shape[-1]]
    return (act(out) if act is not None else out).to(x.dtype)


def causal_conv1d_step(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """One decode step; shifts ``x`` into ``conv_state`` (b, D, W) in place. x (b, D, 1) -> (b, D, 1)."""
    window = torch.cat([conv_state, x], dim=-1).to(weight.dtype)
    conv_state.copy_(window[:, :, -conv_state.shape[-1] :])
    out = F.conv1d(window, weight.unsqueeze(1), bias, groups=weight.shape[0])[..., -x.shape[-1] :]
    act = activation_fn(activation)
    return (act(out) if act is not None else out).to(x.dtype)


def kernel_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` (b, D, L) as ``causal_conv1d``'s CUDA kernel takes it: L-contiguous, or channel-last with 8-aligned D
    and strides."""
    if x.stride(2) == 1:
        return x
    channel_last = x.stride(1) == 1 and x.shape[1] % 8 == 0 and x.stride(2) % 8 == 0 and x.stride(0) % 8 == 0
    return x if channel_last else x.contiguous()


def advance_decode_count(cache: Any, layer_idx: int) -> None:
    """Count one decoded token in ``cache`` for a layer whose conv state is updated in place (transformers >= 5.25
    counts tokens this way; older caches have no count to advance)."""
    if hasattr(cache, "increase_count"):
        cache.increase_count(layer_idx, 0)


class ForcedHooks:
    """Fire accelerate's hooks of child modules whose weights a forward reads directly (CPU/disk offloading)."""

    def __init__(self, module: nn.Module, names: tuple[str, ...]):
        self.pairs = [(child, getattr(child, "_hf_hook", None)) for child in (getattr(module, n) for n in names)]

    def __enter__(self):
        for child, hook in self.pairs:
            if hook is not None:
                hook.pre_forward(child)

    def __exit__(self, *exc):
        for child, hook in reversed(self.pairs):
            if hook is not None:
                hook.post_forward(child, ())


@dataclass
class CompreSSMModelOutput(ModelOutput):
    """Backbone output: ``last_hidden_state`` (b, L, hidden), the decode ``cache``, optional ``hidden_states``."""

    last_hidden_state: torch.Tensor | None = None
    cache: Any | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class CompreSSMCausalLMOutput(ModelOutput):
    """Causal-LM output: ``loss``, ``logits`` (b, L, vocab), the decode ``cache``, optional ``hidden_states``."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: Any | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


def take_old_cache_name(cache: Any, kwargs: dict) -> Any:
    """``cache``, or the cache passed under transformers' older name ``cache_params`` (with a FutureWarning)."""
    if "cache_params" in kwargs:
        warnings.warn(
            "`cache_params` is deprecated and will be removed in transformers 6: pass the decode cache as `cache`.",
            FutureWarning,
            stacklevel=3,
        )
        old = kwargs.pop("cache_params")
        return old if cache is None else cache
    return cache


def backbone_forward(
    model, input_ids, inputs_embeds, cache, use_cache, output_hidden_states, return_dict, attention_mask, kwargs
) -> tuple | CompreSSMModelOutput:
    """The forward of every CompreSSM backbone: embeddings → blocks → final norm. input_ids (b, L) or inputs_embeds
    (b, L, hidden) → (b, L, hidden). A decode cache is made when ``use_cache`` (default: ``config.use_cache`` outside
    training)."""
    cache = take_old_cache_name(cache, kwargs)
    config = model.config
    output_hidden_states = output_hidden_states if output_hidden_states is not None else config.output_hidden_states
    use_cache = use_cache if use_cache is not None else (config.use_cache and not model.training)
    return_dict = return_dict if return_dict is not None else config.return_dict
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds.")
    if inputs_embeds is None:
        inputs_embeds = model.embeddings(input_ids)
    if model.gradient_checkpointing and model.training and use_cache:
        use_cache = False
    if use_cache and cache is None:
        cache = DynamicCache(config=config)
    if not use_cache:
        cache = None
    mask = padding_mask(attention_mask, inputs_embeds.shape[1])
    hidden_states = inputs_embeds
    all_hidden_states = () if output_hidden_states else None
    for block in model.layers:
        hidden_states = block(hidden_states, cache=cache, attention_mask=mask)
        if output_hidden_states:
            all_hidden_states = all_hidden_states + (hidden_states,)
    hidden_states = model.norm_f(hidden_states)
    if output_hidden_states:
        all_hidden_states = all_hidden_states + (hidden_states,)
    if not return_dict:
        return tuple(v for v in (hidden_states, cache, all_hidden_states) if v is not None)
    return CompreSSMModelOutput(last_hidden_state=hidden_states, cache=cache, hidden_states=all_hidden_states)


class CompreSSMCausalLMMixin:
    """The language-model head over ``self.backbone`` shared by the families (list it before the family's
    pre-trained class and `GenerationMixin`). ``lm_head`` is tied to the input embeddings when
    ``config.tie_word_embeddings``."""

    _tied_weights_keys = {"lm_head.weight": "backbone.embeddings.weight"}

    def get_input_embeddings(self):
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, new_embeddings):
        self.backbone.set_input_embeddings(new_embeddings)

    def prepare_inputs_for_generation(
        self,
        input_ids,
        inputs_embeds=None,
        use_cache=None,
        cache=None,
        attention_mask=None,
        is_first_iteration: bool | None = False,
        **kwargs,
    ):
        """`GenerationMixin`'s inputs; after the first step the recurrent state carries the past, so no mask."""
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            cache=cache,
            attention_mask=attention_mask,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )
        if use_cache and not is_first_iteration:
            model_inputs["attention_mask"] = None
        return model_inputs

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: Any | None = None,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> tuple | CompreSSMCausalLMOutput:
        """Backbone → ``lm_head``: logits (b, L, vocab) in float32 (the last ``logits_to_keep`` positions when it is
        > 0); ``labels`` (b, L) give the shifted next-token cross-entropy (-100 ignored)."""
        cache = take_old_cache_name(cache, kwargs)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.backbone(
            input_ids,
            inputs_embeds=inputs_embeds,
            cache=cache,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            attention_mask=attention_mask,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden_states = hidden_states[:, -logits_to_keep:] if logits_to_keep > 0 else hidden_states
        else:
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states.to(self.lm_head.weight.dtype)).float()
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        if not return_dict:
            output = tuple(v for v in (logits, outputs.cache, outputs.hidden_states) if v is not None)
            return ((loss,) + output) if loss is not None else output
        return CompreSSMCausalLMOutput(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states
        )


_LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _layer_of(key: str) -> int | None:
    match = _LAYER_KEY.search(key)
    return int(match.group(1)) if match else None


class CompreSSMCheckpointMixin:
    """The save/load contract of every CompreSSM model (list it before the `PreTrainedModel` base): a folder is
    written only when `check_savable` passes, ``compression_history.json`` travels with the weights, and loading is
    strict about the layers (see `from_pretrained`). A class using it defines `check_savable`."""

    history_file = "compression_history.json"

    def check_savable(self) -> None:
        """Raise `ValueError` unless a folder saved now loads back (the config describes the parameters)."""
        raise NotImplementedError

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, plus ``compression_history.json`` (written atomically) when the model
        was compressed. The config is checked against the model first: nothing is written if it is inconsistent."""
        self.check_savable()
        result = super().save_pretrained(save_directory, *args, **kwargs)
        history = getattr(self, "compression_history", None)
        if history and kwargs.get("is_main_process", True):
            write_json_atomic(os.path.join(save_directory, self.history_file), history)
        return result

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, strict about the SSM layers, plus the compression history of a local
        folder when present.

        Raises `ValueError` when a layer tensor is missing from the checkpoint, when the checkpoint's layer count
        differs from ``config.num_hidden_layers``, or when ``ignore_mismatched_sizes=True`` would re-initialise a layer
        tensor (head tensors such as ``classifier.weight`` may be). A size mismatch without
        ``ignore_mismatched_sizes`` keeps transformers' error, with a note on what to do. A corrupt
        ``compression_history.json`` only warns. ``pretrained_model_name_or_path=None`` (weights from ``state_dict``
        or none at all) is not checked.
        """
        output_loading_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
            )
        except RuntimeError as err:
            if "ignore_mismatched_sizes" in str(err) or "size mismatch" in str(err):
                err.add_note(
                    "CompreSSM models keep their per-layer state sizes in config.json: if the mismatched tensors are "
                    "layer tensors such as A_log, x_proj.weight, in_proj.weight or conv1d.weight, load the folder "
                    "with its own config.json (not a config from another stage of compression). If only head tensors "
                    "such as classifier.weight differ (e.g. a new num_labels), pass ignore_mismatched_sizes=True to "
                    "re-initialise the head."
                )
            raise
        if pretrained_model_name_or_path is not None:
            _check_loading_info(model, info, pretrained_model_name_or_path)
            _warn_if_old_code(str(pretrained_model_name_or_path))
            path = os.path.join(str(pretrained_model_name_or_path), cls.history_file)
            if os.path.isfile(path):
                history = read_history(path)
                if history is not None:
                    model.compression_history = history
        return (model, info) if output_loading_info else model


class CompreSSMPreTrainedModel(CompreSSMCheckpointMixin, PreTrainedModel):
    """Base of every CompreSSM model: per-layer sizes read from the mixers, strict loading, history file.

    A family's mixer exposes ``ssm_state_size`` (read from its parameters); ``mixer_class`` names it.
    """

    base_model_prefix = "backbone"
    supports_gradient_checkpointing = True
    _is_stateful = True
    mixer_class: type[nn.Module]  # set by each family; its instances have ``init_ssm_weights()``

    def _init_weights(self, module: nn.Module) -> None:
        """transformers' defaults, then the stock mixer initialisation of both families: the family's SSM parameters
        (``init_ssm_weights``), kaiming-uniform ``conv1d`` / ``out_proj`` weights, zero ``conv1d`` bias, and
        ``out_proj`` scaled by 1/sqrt(num_hidden_layers) when ``config.rescale_prenorm_residual``."""
        super()._init_weights(module)
        if isinstance(module, self.mixer_class):
            module.init_ssm_weights()
            init_kaiming_uniform_(module.conv1d.weight, a=math.sqrt(5))
            if module.conv1d.bias is not None:
                init_zeros_(module.conv1d.bias)
            init_kaiming_uniform_(module.out_proj.weight, a=math.sqrt(5))
            if self.config.rescale_prenorm_residual and not getattr(
                module.out_proj.weight, "_is_hf_initialized", False
            ):
                with torch.no_grad():
                    module.out_proj.weight /= math.sqrt(self.config.num_hidden_layers)

    def ssm_mixers(self) -> list[nn.Module]:
        """The SSM mixers, in layer order."""
        return [m for m in self.modules() if isinstance(m, self.mixer_class)]

    def state_sizes(self) -> list[int]:
        """The state size of each layer, read from the parameters."""
        return [int(m.ssm_state_size) for m in self.ssm_mixers()]

    def check_savable(self) -> None:
        """Raise `ValueError` unless a folder saved now loads back: the config's invariants hold and its
        ``num_hidden_layers`` / ``state_sizes`` equal the layers and parameter shapes of this model."""
        config = self.config
        sizes = self.state_sizes()
        if len(sizes) != config.num_hidden_layers:
            raise ValueError(
                f"config.num_hidden_layers={config.num_hidden_layers} but the model has {len(sizes)} layers: a folder "
                f"saved like this could not be loaded. Set config.num_hidden_layers = {len(sizes)}."
            )
        if hasattr(config, "check_invariants"):
            config.check_invariants()
        if config.state_sizes is not None and list(config.state_sizes) != sizes:
            raise ValueError(
                f"config.state_sizes={list(config.state_sizes)} but the layers' parameters have state sizes {sizes}: "
                f"a folder saved like this could not be loaded. Set config.state_sizes = model.state_sizes() (cuts "
                f"made with hf_compressssm keep them in sync)."
            )
        config.check_state_sizes(sizes)


def _check_loading_info(model: nn.Module, info: dict, source) -> None:
    """Refuse a load that re-initialised or dropped SSM layer tensors (see `CompreSSMCheckpointMixin.from_pretrained`)."""
    num_layers = model.config.num_hidden_layers
    bare = not hasattr(model, model.base_model_prefix)  # the bare backbone: every key is a backbone key

    def in_backbone(key: str) -> bool:
        return bare or key.startswith(model.base_model_prefix + ".")

    layer_mismatches = sorted(m for m in info.get("mismatched_keys", ()) if _layer_of(m[0]) is not None)
    if layer_mismatches:
        listed = "; ".join(f"{key}: checkpoint {tuple(a)} vs model {tuple(b)}" for key, a, b in layer_mismatches)
        raise ValueError(
            f"ignore_mismatched_sizes=True would re-initialise SSM layer tensors of {source}: {listed}. Only head "
            f"tensors (e.g. classifier.weight / classifier.bias) may be re-initialised on load. The config's "
            f"state_sizes do not match the checkpoint: load the folder with its own config.json."
        )
    missing = sorted(k for k in info.get("missing_keys", ()) if in_backbone(k))
    extra_layers = sorted({i for k in info.get("unexpected_keys", ()) if (i := _layer_of(k)) is not None})
    model_layer_keys = [k for k, _ in model.state_dict().items() if _layer_of(k) is not None]
    loaded_layers = {_layer_of(k) for k in model_layer_keys if k not in set(missing)}
    checkpoint_layers = max(loaded_layers | set(extra_layers), default=-1) + 1
    if extra_layers or (missing and checkpoint_layers != num_layers):
        raise ValueError(
            f"The checkpoint in {source} has {checkpoint_layers} layers but config.num_hidden_layers={num_layers}: "
            f"layers would be {'dropped' if extra_layers else 're-initialised at random'}. Keep config.json and the "
            f"weights of one save together (num_hidden_layers and state_sizes must describe the checkpoint)."
        )
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ValueError(
            f"The checkpoint in {source} lacks {len(missing)} backbone tensor(s): {shown}. They would be "
            f"re-initialised at random, which a compressed layer never survives. Use a complete checkpoint (a folder "
            f"written by save_pretrained), or build the model with from_config and load weights yourself."
        )


def _warn_if_old_code(folder: str) -> None:
    """Warn once when a local folder carries modeling code from before this shared file existed: that code imports
    transformers' private names and fails to load as remote code on newer transformers releases."""
    if not os.path.isfile(os.path.join(folder, "config.json")):
        return
    shipped = [f for f in os.listdir(folder) if f.startswith("modeling_compressssm_") and f.endswith(".py")]
    if shipped and "modeling_compressssm_common.py" not in shipped:
        logger.warning_once(
            f"{folder} carries CompreSSM modeling code written before version 0.3 of hf_compressssm: it loads here "
            f"(the installed package's classes are used), but not with trust_remote_code=True on transformers >= "
            f"5.25. Run `python -m hf_compressssm upgrade {folder}` to rewrite its code files (weights untouched)."
        )


def read_history(path: str) -> list | None:
    """``compression_history.json`` as a list, or None with a warning when the file is unreadable or corrupt."""
    try:
        with open(path) as f:
            history = json.load(f)
        if not isinstance(history, list):
            raise ValueError(f"expected a JSON list, got {type(history).__name__}")
    except (OSError, ValueError) as err:
        logger.warning(
            f"Ignoring {path}: it could not be read ({err}). The weights loaded normally; only the compression "
            f"history (metadata) is missing. Delete or restore the file to silence this warning."
        )
        return None
    return history


def write_json_atomic(path: str, obj) -> None:
    """Write ``obj`` as JSON through a temporary file and a rename (a reader never sees a half-written file)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# Keys of a config dict that are not architecture arguments.
NON_ARCH_KEYS = frozenset({"model_type", "architectures", "transformers_version", "auto_map", "dtype"})


def model_with_weights(model_class, config, source: nn.Module, copy: bool) -> PreTrainedModel:
    """``model_class(config)`` holding ``source``'s parameters and buffers (same names and shapes): built on the meta
    device, so no weight is initialised or allocated twice; ``copy`` clones the tensors (``source`` stays intact).
    Dtype, device and train/eval mode follow ``source``."""
    with torch.device("meta"):
        model = model_class(config)
    state = source.state_dict()
    model.load_state_dict({k: v.clone() if copy else v for k, v in state.items()}, strict=True, assign=True)
    for name, buffer in source.named_buffers():  # non-persistent buffers (rotary frequencies) are not in the state
        if name not in state:
            owner, _, attr = name.rpartition(".")
            model.get_submodule(owner)._buffers[attr] = buffer.clone() if copy else buffer
    model.tie_weights()
    return model.train(source.training)


def convert_from_stock(cls, model_or_path, stock_class, method: str, drop_keys=(), **from_pretrained_kwargs):
    """``cls`` (a CompreSSM causal LM) with the weights of a stock ``stock_class`` model, an object (copied: it stays
    usable) or a folder / Hub id (loaded, its tensors taken over); the config is the stock one plus
    ``compression = {"base_model": source}``. The logits are the stock model's."""
    family = cls.config_class.__name__.removeprefix("CompreSSM").removesuffix("Config")
    if isinstance(model_or_path, CompreSSMCheckpointMixin) or isinstance(
        getattr(model_or_path, "config", None), cls.config_class
    ):
        raise TypeError(f"The model is already a CompreSSM {family} model; use it directly.")
    if isinstance(model_or_path, (str, os.PathLike)):
        source = str(model_or_path)
        stock, copy = stock_class.from_pretrained(source, **from_pretrained_kwargs), False
    elif isinstance(model_or_path, stock_class):
        stock, copy = model_or_path, True
        source = getattr(stock.config, "_name_or_path", "") or None
    else:
        raise TypeError(
            f"{method} expects a {stock_class.__name__} or a path/Hub id of one, got {type(model_or_path).__name__}."
        )
    drop = NON_ARCH_KEYS | set(drop_keys)
    config = cls.config_class(**{k: v for k, v in stock.config.to_dict().items() if k not in drop})
    if source:
        config.compression = {"base_model": source}
    return model_with_weights(cls, config, stock, copy=copy)


def convert_to_stock(
    model, stock_class, stock_config_class, method: str, drop_keys=(), drop_config_keys=(), size_key="state_size"
):
    """A stock ``stock_class`` model with a copy of the weights of ``model``; every SSM layer must have the same
    state size, which goes to the stock config's ``size_key``."""
    sizes = model.state_sizes()
    ssm_sizes = [s for s in sizes if s is not None]  # a hybrid lists None for its other layers
    noun = getattr(model.config, "_ssm_layer_noun", "layer")
    if len(set(ssm_sizes)) > 1:
        raise ValueError(
            f"{method}() needs one state size for every {noun}, but the layers have {sizes}: a stock "
            f"{stock_config_class.__name__} holds a single {size_key}. Keep this model as a {type(model).__name__} "
            f"(it loads with the Auto classes), or compress every {noun} to the same size."
        )
    drop = NON_ARCH_KEYS | set(drop_keys) | set(drop_config_keys)
    values = {k: v for k, v in model.config.to_dict().items() if k not in drop}
    if ssm_sizes:
        values[size_key] = ssm_sizes[0]
    return model_with_weights(stock_class, stock_config_class(**values), model, copy=True)


class CompreSSMBackboneMixin:
    """The bare backbone of a family: embeddings → ``block_class`` blocks → final RMS norm; outputs
    `CompreSSMModelOutput`. List it before the family's pre-trained class (``block_class`` is set there)."""

    block_class: type[nn.Module]

    def __init__(self, config):
        config.check_invariants()  # attributes may have been changed since the config was constructed
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([self.block_class(config, layer_idx=i) for i in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False
        self.norm_f = CompreSSMRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings

    def set_input_embeddings(self, new_embeddings):
        self.embeddings = new_embeddings

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
    ) -> tuple | CompreSSMModelOutput:
        """See `backbone_forward`."""
        return backbone_forward(
            self, input_ids, inputs_embeds, cache, use_cache, output_hidden_states, return_dict, attention_mask, kwargs
        )
