"""Mamba-1 models whose layers each have their own SSM state size (``model_type = "compressssm_mamba"``).

The classes are written here and keep the stock transformers Mamba parameter names, shapes and initialisation, so
stock checkpoints load unchanged (`CompreSSMMambaForCausalLM.from_mamba` / `to_mamba` are exact). Kernels are chosen
per call by `kernel_policy.plan_kernels`. This file is copied next to saved weights as remote code: it imports torch,
public names of ``transformers`` and its sibling files.
"""

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, GradientCheckpointingLayer, MambaConfig, MambaForCausalLM
from transformers import logging as hf_logging
from transformers.modeling_outputs import SequenceClassifierOutput

from .configuration_compressssm_mamba import CompreSSMMambaConfig
from .kernel_policy import KernelPlan, _try_import, plan_kernels
from .modeling_compressssm_common import (
    CompreSSMBackboneMixin,
    CompreSSMCausalLMMixin,
    CompreSSMPreTrainedModel,
    CompreSSMRMSNorm,
    ForcedHooks,
    activation_fn,
    advance_decode_count,
    apply_padding_mask,
    causal_conv1d,
    causal_conv1d_step,
    convert_from_stock,
    convert_to_stock,
    init_constant_,
    init_copy_,
    init_ones_,
    init_uniform_,
    inverse_softplus_time_steps,
    kernel_layout,
)
from .selective_scan import selective_scan, selective_state_update


logger = hf_logging.get_logger(__name__)


class CompreSSMMambaMixer(nn.Module):
    """A Mamba-1 mixer with its own state size ``N = config.state_sizes[layer_idx]``.

    Shapes (D = ``intermediate_size``, R = ``time_step_rank``): ``in_proj`` (2D, hidden), ``conv1d`` depthwise over D,
    ``x_proj.weight`` (R + 2N, D) split as ``[dt | B | C]``, ``dt_proj`` (D, R), ``A_log`` (D, N), ``D`` (D,),
    ``out_proj`` (hidden, D). Every kernel (scan, convolution, fused training path, decode step) is chosen per call by
    `kernel_policy.plan_kernels` from the tensors' device and dtype, ``config.scan_backend``, the environment
    variable ``HF_COMPRESSSSM_SCAN_BACKEND``, the installed packages and the kernels' limits; a kernel that cannot
    take the inputs falls back to the portable code with one warning. The CUDA kernels see CUDA tensors only.
    """

    def __init__(self, config: CompreSSMMambaConfig, layer_idx: int):
        super().__init__()
        layer = config.layer_config(layer_idx)
        self.config = layer
        self.layer_idx = layer_idx
        self.hidden_size = layer.hidden_size
        self.intermediate_size = layer.intermediate_size
        self.time_step_rank = int(layer.time_step_rank)
        self.conv_kernel_size = layer.conv_kernel
        self.use_conv_bias = layer.use_conv_bias
        self.use_bias = layer.use_bias
        self.activation = layer.hidden_act
        self.act = activation_fn(layer.hidden_act)
        self.scan_backend = getattr(config, "scan_backend", None)
        n, d = int(layer.state_size), self.intermediate_size
        self.conv1d = nn.Conv1d(
            d, d, layer.conv_kernel, groups=d, padding=layer.conv_kernel - 1, bias=layer.use_conv_bias
        )
        self.in_proj = nn.Linear(self.hidden_size, 2 * d, bias=layer.use_bias)
        self.x_proj = nn.Linear(d, self.time_step_rank + 2 * n, bias=False)
        self.dt_proj = nn.Linear(self.time_step_rank, d, bias=True)
        self.A_log = nn.Parameter(torch.empty(d, n))
        self.D = nn.Parameter(torch.empty(d))
        self.out_proj = nn.Linear(d, self.hidden_size, bias=layer.use_bias)

    @torch.no_grad()
    def init_ssm_weights(self) -> None:
        """S4D-real ``A_log`` (log 1..N per channel), ``D = 1``, ``dt_proj`` by ``time_step_init_scheme`` and its bias
        softplus⁻¹ of a log-uniform step in [time_step_min, time_step_max]."""
        config = self.config
        n = self.A_log.shape[-1]
        a = torch.arange(1, n + 1, dtype=torch.float32, device=self.A_log.device)[None, :]
        init_copy_(self.A_log, torch.log(a.expand(self.intermediate_size, -1).contiguous()))
        init_ones_(self.D)
        std = config.time_step_rank**-0.5 * config.time_step_scale
        if config.time_step_init_scheme == "constant":
            init_constant_(self.dt_proj.weight, std)
        elif config.time_step_init_scheme == "random":
            init_uniform_(self.dt_proj.weight, -std, std)
        init_copy_(
            self.dt_proj.bias, inverse_softplus_time_steps(self.intermediate_size, config, self.dt_proj.bias.device)
        )

    @property
    def ssm_state_size(self) -> int:
        """The layer's state size N, read from ``A_log`` (D, N), so it always matches the parameters."""
        return int(self.A_log.shape[-1])

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
            return fn(kernel_layout(x), weight, self.conv1d.bias, activation=self.activation)
        return causal_conv1d(x, weight, self.conv1d.bias, self.activation)

    def _conv_step(self, x: torch.Tensor, conv_state: torch.Tensor, plan: KernelPlan) -> torch.Tensor:
        weight = self.conv1d.weight.squeeze(1)
        if plan.conv_step == "causal_conv1d" and conv_state.dtype == x.dtype:
            fn = _try_import("causal_conv1d").causal_conv1d_update
            return fn(x, conv_state, weight, self.conv1d.bias, activation=self.activation)
        return causal_conv1d_step(x, conv_state, weight, self.conv1d.bias, self.activation)

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

        hidden_states = apply_padding_mask(hidden_states, attention_mask)
        projected = self.in_proj(hidden_states).transpose(1, 2)  # (b, 2D, L)
        plan = self.kernel_plan(projected.device, projected.dtype, cache is not None, attention_mask)

        if plan.fused:  # mamba_inner_fn reads every weight but in_proj's directly
            with ForcedHooks(self, ("conv1d", "x_proj", "dt_proj", "out_proj")):
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

        with ForcedHooks(self, ("conv1d", "dt_proj")):
            A = -torch.exp(self.A_log.float())  # (D, N)
            x, gate = projected.chunk(2, dim=1)  # (b, D, L) each
            if conv_state is not None and seq_len == 1 and not cache.is_recording_past(self.layer_idx):
                advance_decode_count(cache, self.layer_idx)
                x = self._conv_step(x, conv_state, plan)
            else:
                if cache is not None:
                    x = cache.update_conv_state(x, self.layer_idx, conv_kernel_size=self.conv_kernel_size)
                x = self._conv(x, plan)
                if cache is not None:
                    x = x[:, :, -seq_len:]

            x = apply_padding_mask(x.transpose(1, 2), attention_mask)  # (b, L, D)
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


class CompreSSMMambaBlock(GradientCheckpointingLayer):
    """Pre-norm residual block around a `CompreSSMMambaMixer`. (b, L, hidden) -> (b, L, hidden)."""

    def __init__(self, config: CompreSSMMambaConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = CompreSSMRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mixer = CompreSSMMambaMixer(config, layer_idx=layer_idx)

    def forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
        residual = hidden_states
        hidden_states = self.norm(hidden_states.to(dtype=self.norm.weight.dtype))
        if self.residual_in_fp32:
            residual = residual.to(torch.float32)
        return residual + self.mixer(hidden_states, cache=cache, attention_mask=attention_mask)


class CompreSSMMambaPreTrainedModel(CompreSSMPreTrainedModel):
    config_class = CompreSSMMambaConfig
    config: CompreSSMMambaConfig
    _no_split_modules = ["CompreSSMMambaBlock", "CompreSSMMambaMixer"]
    mixer_class = CompreSSMMambaMixer


class CompreSSMMambaModel(CompreSSMBackboneMixin, CompreSSMMambaPreTrainedModel):
    """The bare Mamba backbone with per-layer state sizes; outputs `CompreSSMModelOutput`."""

    block_class = CompreSSMMambaBlock


class CompreSSMMambaForCausalLM(CompreSSMCausalLMMixin, CompreSSMMambaPreTrainedModel, GenerationMixin):
    """Mamba language model with per-layer state sizes (LM head tied to the input embeddings)."""

    def __init__(self, config: CompreSSMMambaConfig):
        super().__init__(config)
        self.backbone = CompreSSMMambaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_mamba(cls, model_or_path: "MambaForCausalLM | str | os.PathLike", **from_pretrained_kwargs):
        """Convert a stock `MambaForCausalLM` (object, saved folder or Hub id) into this class, weights unchanged.

        The logits of the returned model equal those of the stock model.
        """
        return convert_from_stock(
            cls,
            model_or_path,
            MambaForCausalLM,
            "from_mamba",
            drop_keys=("intermediate_size",),
            **from_pretrained_kwargs,
        )

    def to_mamba(self) -> MambaForCausalLM:
        """Convert back to a stock `MambaForCausalLM`; every layer must have the same state size."""
        return convert_to_stock(
            self,
            MambaForCausalLM,
            MambaConfig,
            "to_mamba",
            drop_keys=("intermediate_size",),
            drop_config_keys=("state_sizes", "classifier_pooling", "compression", "scan_backend"),
        )


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


__all__ = [
    "CompreSSMMambaBlock",
    "CompreSSMMambaForCausalLM",
    "CompreSSMMambaForSequenceClassification",
    "CompreSSMMambaMixer",
    "CompreSSMMambaModel",
    "CompreSSMMambaPreTrainedModel",
]
