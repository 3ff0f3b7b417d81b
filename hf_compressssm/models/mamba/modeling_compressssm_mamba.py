"""Mamba-1 models whose layers each have their own SSM state size.

The layers are the stock transformers Mamba layers; only the per-layer state size and the choice of scan kernel
differ. This file stands on its own (it is copied next to saved weights as Hugging Face remote code): it imports
``torch``, ``transformers`` and the sibling files ``configuration_compressssm_mamba.py``, ``selective_scan.py`` and
``kernel_policy.py``.
"""

import json
import os
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, MambaConfig, MambaForCausalLM
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.mamba.modeling_mamba import (
    MambaBlock,
    MambaMixer,
    MambaModel,
    MambaPreTrainedModel,
    MambaRMSNorm,
)
from transformers.models.mamba.modeling_mamba import (
    MambaForCausalLM as _StockMambaForCausalLM,
)
from transformers.utils import logging

from .configuration_compressssm_mamba import CompreSSMMambaConfig
from .kernel_policy import KernelPlan, _try_import, plan_kernels
from .selective_scan import selective_scan, selective_state_update


logger = logging.get_logger(__name__)


def apply_mask_to_padding_states(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the padded positions. hidden_states (b, L, ...) and attention_mask (b, L) -> (b, L, ...)."""
    if attention_mask is not None:
        return (hidden_states * attention_mask[:, :, None]).to(hidden_states.dtype)
    return hidden_states


def _conv_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: nn.Module | None):
    """Causal depthwise convolution. x (b, D, L), weight (D, W), bias (D,) -> (b, D, L)."""
    out = F.conv1d(x.to(weight.dtype), weight.unsqueeze(1), bias, padding=weight.shape[-1] - 1, groups=weight.shape[0])
    out = out[..., : x.shape[-1]]
    return (act(out) if act is not None else out).to(x.dtype)


def _conv_step_torch(x, conv_state, weight, bias, act):
    """One decode step of the convolution; updates ``conv_state`` (b, D, W) in place. x (b, D, 1) -> (b, D, 1)."""
    window = torch.cat([conv_state, x], dim=-1).to(weight.dtype)
    conv_state.copy_(window[:, :, -conv_state.shape[-1] :])
    out = F.conv1d(window, weight.unsqueeze(1), bias, groups=weight.shape[0])[..., -x.shape[-1] :]
    return (act(out) if act is not None else out).to(x.dtype)


def _kernel_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` (b, D, L) as ``causal_conv1d`` takes it: L-contiguous, or channel-last with 8-aligned D and strides."""
    if x.stride(2) == 1:
        return x
    channel_last = x.stride(1) == 1 and x.shape[1] % 8 == 0 and x.stride(2) % 8 == 0 and x.stride(0) % 8 == 0
    return x if channel_last else x.contiguous()


class _ForcedHooks:
    """Fire accelerate's hooks of child modules whose weights the forward reads directly (offloading), like
    transformers' ``force_accelerate_hooks`` but for a set of children chosen per call."""

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


class CompreSSMMambaMixer(MambaMixer):
    """A `MambaMixer` with its own state size ``N = config.state_sizes[layer_idx]``.

    Shapes: ``A_log`` (D, N), ``x_proj.weight`` (R + 2N, D) split as ``[dt | B | C]``; D = ``intermediate_size``.
    Every kernel (scan, convolution, fused training path, decode step) is chosen per call by
    `kernel_policy.plan_kernels` from the tensors' device and dtype, ``config.scan_backend``, the environment
    variable ``HF_COMPRESSSSM_SCAN_BACKEND``, the installed packages and the kernels' limits; a kernel that cannot
    take the inputs falls back to the portable code with one warning. The CUDA kernels see CUDA tensors only.
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

    def kernel_plan(
        self,
        device: torch.device,
        dtype: torch.dtype | None = None,
        cached: bool = False,
        attention_mask: torch.Tensor | None = None,
    ) -> KernelPlan:
        """The kernels a forward on ``device``/``dtype`` uses (see `kernel_policy.plan_kernels`)."""
        plain = (
            type(self.x_proj) is nn.Linear
            and type(self.dt_proj) is nn.Linear
            and type(self.out_proj) is nn.Linear
            and type(self.conv1d) is nn.Conv1d
        )
        args = dict(
            requested=self.scan_backend,
            d_state=self.ssm_state_size,
            conv_width=self.conv_kernel_size,
            activation=self.activation,
            training=self.training,
            cached=cached,
            plain_modules=plain,
        )
        plan = plan_kernels(device, dtype, **args)
        if plan.fused and attention_mask is not None and not bool(attention_mask.all()):
            plan = plan_kernels(device, dtype, padded=True, **args)
        for reason in plan.fallbacks:
            logger.warning_once(f"CompreSSMMambaMixer: {reason}.")
        return plan

    def _backend(self, device: torch.device) -> str:
        """The scan backend on ``device`` (kept for callers that ask only for the scan)."""
        return self.kernel_plan(device, self.A_log.dtype).scan

    def _conv(self, x: torch.Tensor, plan: KernelPlan) -> torch.Tensor:
        weight = self.conv1d.weight.squeeze(1)
        if plan.conv == "causal_conv1d":
            fn = _try_import("causal_conv1d").causal_conv1d_fn
            return fn(_kernel_layout(x), weight, self.conv1d.bias, activation=self.activation)
        return _conv_torch(x, weight, self.conv1d.bias, self.act)

    def _conv_step(self, x: torch.Tensor, conv_state: torch.Tensor, plan: KernelPlan) -> torch.Tensor:
        weight = self.conv1d.weight.squeeze(1)
        if plan.conv_step == "causal_conv1d" and conv_state.dtype == x.dtype:
            fn = _try_import("causal_conv1d").causal_conv1d_update
            return fn(x, conv_state, weight, self.conv1d.bias, activation=self.activation)
        return _conv_step_torch(x, conv_state, weight, self.conv1d.bias, self.act)

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
        plan = self.kernel_plan(projected.device, projected.dtype, cache is not None, attention_mask)

        if plan.fused:  # mamba_inner_fn reads every weight but in_proj's directly
            with _ForcedHooks(self, ("conv1d", "x_proj", "dt_proj", "out_proj")):
                A = -torch.exp(self.A_log.float())  # (D, N)
                return _try_import("mamba_ssm.ops.selective_scan_interface").mamba_inner_fn(
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

        with _ForcedHooks(self, ("conv1d", "dt_proj")):
            A = -torch.exp(self.A_log.float())  # (D, N)
            x, gate = projected.chunk(2, dim=1)  # (b, D, L) each
            if conv_state is not None and seq_len == 1 and not cache.is_recording_past(self.layer_idx):
                if hasattr(cache, "increase_count"):  # transformers >= 5.25 counts decode tokens on the conv step
                    cache.increase_count(self.layer_idx, 0)
                x = self._conv_step(x, conv_state, plan)
            else:
                if cache is not None:
                    x = cache.update_conv_state(x, self.layer_idx, conv_kernel_size=self.conv_kernel_size)
                x = self._conv(x, plan)
                if cache is not None:
                    x = x[:, :, -seq_len:]

            x = apply_mask_to_padding_states(x.transpose(1, 2), attention_mask)  # (b, L, D)
            dt, B, C = torch.split(
                self.x_proj(x), [self.time_step_rank, self.ssm_state_size, self.ssm_state_size], dim=-1
            )
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
                    backend=plan.scan,
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
                    backend=plan.scan,
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
        config.check_invariants()
        if config.state_sizes is not None and list(config.state_sizes) != sizes:
            raise ValueError(
                f"config.state_sizes={list(config.state_sizes)} but the layers' parameters have state sizes {sizes}: "
                f"a folder saved like this could not be loaded. Set config.state_sizes = model.state_sizes() (cuts "
                f"made with hf_compressssm keep them in sync)."
            )
        config.check_state_sizes(sizes)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, plus ``compression_history.json`` (written atomically) when the model
        was compressed. The config is checked against the model first: nothing is written if it is inconsistent."""
        self.check_savable()
        result = super().save_pretrained(save_directory, *args, **kwargs)
        history = getattr(self, "compression_history", None)
        if history and kwargs.get("is_main_process", True):
            _write_json_atomic(os.path.join(save_directory, self.history_file), history)
        return result

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, strict about the SSM layers, plus the compression history of a local
        folder when present.

        Raises `ValueError` when a layer tensor is missing from the checkpoint, when the checkpoint's layer count
        differs from ``config.num_hidden_layers``, or when ``ignore_mismatched_sizes=True`` would re-initialise a layer
        tensor (only head tensors such as ``classifier.weight`` may be re-initialised). A size mismatch without
        ``ignore_mismatched_sizes`` keeps transformers' `RuntimeError`, with a note on what to do. A corrupt
        ``compression_history.json`` only warns.
        """
        output_loading_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
            )
        except RuntimeError as err:
            if "ignore_mismatched_sizes" in str(err):
                err.add_note(
                    "CompreSSM models keep their per-layer state sizes in config.json: if the mismatched tensors "
                    "(load report above) are layer tensors such as A_log or x_proj.weight, load the folder with its "
                    "own config.json (not a config from another stage of compression). If only head tensors such as "
                    "classifier.weight differ (e.g. a new num_labels), pass ignore_mismatched_sizes=True to "
                    "re-initialise the head."
                )
            raise
        _check_loading_info(model, info, pretrained_model_name_or_path)
        path = os.path.join(str(pretrained_model_name_or_path), cls.history_file)
        if os.path.isfile(path):
            history = _read_history(path)
            if history is not None:
                model.compression_history = history
        return (model, info) if output_loading_info else model

    def state_sizes(self) -> list[int]:
        """The state size of each layer, read from the parameters."""
        return [m.A_log.shape[-1] for m in self.modules() if isinstance(m, MambaMixer)]


_LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _layer_of(key: str) -> int | None:
    match = _LAYER_KEY.search(key)
    return int(match.group(1)) if match else None


def _check_loading_info(model: nn.Module, info: dict, source) -> None:
    """Refuse a load that re-initialised or dropped SSM layer tensors (see `from_pretrained`)."""
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


def _read_history(path: str) -> list | None:
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


def _write_json_atomic(path: str, obj) -> None:
    """Write ``obj`` as JSON through a temporary file and a rename (a reader never sees a half-written file)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class CompreSSMMambaModel(CompreSSMMambaPreTrainedModel, MambaModel):
    """The bare Mamba backbone with per-layer state sizes; outputs `MambaOutput`."""

    def __init__(self, config: CompreSSMMambaConfig):
        config.check_invariants()  # attributes may have been changed since the config was constructed
        MambaPreTrainedModel.__init__(self, config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [CompreSSMMambaBlock(config, layer_idx=idx) for idx in range(config.num_hidden_layers)]
        )
        self.gradient_checkpointing = False
        self.norm_f = MambaRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self._register_load_state_dict_pre_hook(self.load_hook)
        self.post_init()


class CompreSSMMambaForCausalLM(CompreSSMMambaPreTrainedModel, MambaForCausalLM, GenerationMixin):
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

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Loss by ``config.problem_type`` as transformers' sequence classifiers compute it; when unset it is
        inferred (without changing the config): regression for one label, single-label for integer labels, else
        multi-label."""
        problem_type = self.config.problem_type
        if problem_type is None:
            if self.num_labels == 1:
                problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int, torch.int16, torch.int8, torch.uint8):
                problem_type = "single_label_classification"
            else:
                problem_type = "multi_label_classification"
        if problem_type == "regression":
            if self.num_labels == 1:
                return F.mse_loss(logits.squeeze(-1), labels.squeeze(-1).to(logits.dtype))
            return F.mse_loss(logits, labels.to(logits.dtype))
        if problem_type == "single_label_classification":
            return F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))

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
            loss = self._loss(logits, labels)
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
