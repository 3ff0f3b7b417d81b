"""Mamba-2 models whose layers each have their own SSM state size (``model_type = "compressssm_mamba2"``).

The classes are written here and keep the stock transformers Mamba-2 parameter names, shapes and initialisation, so
stock checkpoints load unchanged (`CompreSSMMamba2ForCausalLM.from_mamba2` / `to_mamba2` are exact). Kernels are
chosen per call (`CompreSSMMamba2Mixer.kernel_plan`): CPU tensors run the numba SSD scan of ``ssd_numba_scan.py`` when
numba is installed (else the torch code of ``ssd_scan.py``), CUDA tensors ``mamba_ssm``'s SSD kernels and
``causal_conv1d`` when installed, within the kernels' limits. This file is copied next
to saved weights as remote code: it imports torch, public names of ``transformers`` and its sibling files.
"""

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, GradientCheckpointingLayer, Mamba2Config, Mamba2ForCausalLM
from transformers import logging as hf_logging

from .configuration_compressssm_mamba2 import CompreSSMMamba2Config
from .kernel_policy import KernelPlan, _try_import, plan_mamba2_kernels
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
    init_copy_,
    init_ones_,
    inverse_softplus_time_steps,
    kernel_layout,
    take_old_cache_name,
)
from .ssd_numba_scan import ssd_numba_scan
from .ssd_scan import ssd_chunk_scan, ssd_state_update


logger = hf_logging.get_logger(__name__)


class CompreSSMGatedRMSNorm(nn.Module):
    """RMS norm of ``x · silu(gate)`` over groups of ``group_size`` channels, scaled by ``weight`` (I,); float32 inside.
    x, gate (..., I) -> (..., I) in x's dtype."""

    def __init__(self, hidden_size: int, group_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        self.group_size = group_size

    def forward(self, hidden_states: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)
        if gate is not None:
            x = x * F.silu(gate.to(torch.float32))
        *prefix, width = x.shape
        grouped = x.view(*prefix, width // self.group_size, self.group_size)
        grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * grouped.view(*prefix, width).to(dtype)


class CompreSSMMamba2Mixer(nn.Module):
    """A Mamba-2 mixer with its own per-group state size ``N = config.state_sizes[layer_idx]``.

    Shapes (I = ``intermediate_size``, G = ``n_groups``, H = ``num_heads``): ``in_proj.weight`` is
    (I + (I + 2GN) + H, hidden), split as ``[z | x | B | C | dt]``; ``conv1d.weight`` is (I + 2GN, 1, kernel) over
    ``[x | B | C]``; ``A_log``, ``D``, ``dt_bias`` are (H,); ``norm`` is the gated RMS norm over I. ``ssm_state_size``
    and ``conv_dim`` are read from ``conv1d.weight``, so they always match the parameters (also after a cut).
    Kernels: see `kernel_plan`.
    """

    def __init__(self, config: CompreSSMMamba2Config, layer_idx: int):
        super().__init__()
        layer = config.layer_config(layer_idx)
        self.config = layer
        self.layer_idx = layer_idx
        self.hidden_size = layer.hidden_size
        self.num_heads = layer.num_heads
        self.head_dim = layer.head_dim
        self.n_groups = layer.n_groups
        self.intermediate_size = int(layer.expand * layer.hidden_size)
        self.time_step_rank = int(layer.time_step_rank)
        self.conv_kernel_size = layer.conv_kernel
        self.use_conv_bias = layer.use_conv_bias
        self.use_bias = layer.use_bias
        self.activation = layer.hidden_act
        self.act = activation_fn(layer.hidden_act)
        self.layer_norm_epsilon = layer.layer_norm_epsilon
        self.chunk_size = layer.chunk_size
        self.time_step_limit = layer.time_step_limit
        self.time_step_min = layer.time_step_min
        self.time_step_max = layer.time_step_max
        self.time_step_floor = layer.time_step_floor
        conv_dim = self.intermediate_size + 2 * self.n_groups * int(layer.state_size)
        self.conv1d = nn.Conv1d(
            conv_dim,
            conv_dim,
            layer.conv_kernel,
            groups=conv_dim,
            padding=layer.conv_kernel - 1,
            bias=layer.use_conv_bias,
        )
        self.in_proj = nn.Linear(
            self.hidden_size, self.intermediate_size + conv_dim + self.num_heads, bias=layer.use_bias
        )
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.norm = CompreSSMGatedRMSNorm(
            self.intermediate_size, group_size=self.intermediate_size // self.n_groups, eps=layer.layer_norm_epsilon
        )
        self.D = nn.Parameter(torch.empty(self.num_heads))
        self.out_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=layer.use_bias)

    @property
    def ssm_state_size(self) -> int:
        """The layer's per-group state size N, read from ``conv1d.weight`` (I + 2GN channels)."""
        return (int(self.conv1d.weight.shape[0]) - self.intermediate_size) // (2 * self.n_groups)

    @property
    def conv_dim(self) -> int:
        """Channels of the depthwise convolution, ``I + 2GN``."""
        return int(self.conv1d.weight.shape[0])

    @torch.no_grad()
    def init_ssm_weights(self) -> None:
        """``A_log = log(1..H)``, ``D = 1``, ``dt_bias`` softplus⁻¹ of a log-uniform step in [time_step_min, max]."""
        a = torch.arange(1, self.num_heads + 1, device=self.A_log.device, dtype=torch.float32)
        init_copy_(self.A_log, torch.log(a))
        init_ones_(self.D)
        init_copy_(self.dt_bias, inverse_softplus_time_steps(self.num_heads, self, self.dt_bias.device))

    def kernel_plan(
        self,
        device: torch.device | str,
        dtype: torch.dtype | None = None,
        cached: bool = False,
        attention_mask: torch.Tensor | None = None,
    ) -> KernelPlan:
        """The kernels a forward on ``device``/``dtype`` uses.

        CPU: the numba SSD scan of ``ssd_numba_scan.py`` when numba is importable (``HF_COMPRESSSSM_SCAN_BACKEND=torch``
        forces the torch code), else the torch code of ``ssd_scan.py``, as on other devices but CUDA; the decode step is
        torch's. CUDA: ``mamba_ssm``'s SSD kernels and ``causal_conv1d``
        when importable and the dtype is float32/float16/bfloat16; ``causal_conv1d`` also needs conv width 2-4 and a
        SiLU activation. The fused training kernel additionally needs plain ``conv1d``/``norm``/``out_proj`` modules
        (an adapter there would be bypassed), no padding in the batch (it does not re-mask after the convolution)
        and ``I + 2GN`` divisible by 8 (``mamba_ssm``'s ``ensure_stride`` asserts it); otherwise the unfused
        kernels run.
        """
        plain = (
            type(self.conv1d) is nn.Conv1d
            and type(self.out_proj) is nn.Linear
            and type(self.norm) is CompreSSMGatedRMSNorm
        )
        plan = plan_mamba2_kernels(
            device,
            dtype,
            conv_width=self.conv_kernel_size,
            activation=self.activation,
            training=self.training,
            cached=cached,
            plain_modules=plain,
            padded=attention_mask is not None and not bool(attention_mask.all()),
            conv_dim=self.conv_dim,
            state_size=self.ssm_state_size,
        )
        for reason in plan.fallbacks:
            logger.warning_once(f"CompreSSMMamba2Mixer: {reason}.")
        return plan

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache: Any | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """(b, L, hidden) → (b, L, hidden), with the kernels of `kernel_plan`."""
        with ForcedHooks(self, ("conv1d",)):
            return self._forward(hidden_states, cache, attention_mask, **kwargs)

    def _forward(self, hidden_states, cache, attention_mask, **kwargs) -> torch.Tensor:
        cache = take_old_cache_name(cache, kwargs)
        batch_size, seq_len, _ = hidden_states.shape
        dtype = hidden_states.dtype
        conv_state = recurrent_state = None
        if cache is not None:
            conv_state = cache.get_conv_state(self.layer_idx, state_idx=0)
            recurrent_state = cache.get_recurrent_state(self.layer_idx, state_idx=0)

        hidden_states = apply_padding_mask(hidden_states, attention_mask)
        projected_states = self.in_proj(hidden_states)
        plan = self.kernel_plan(projected_states.device, projected_states.dtype, cache is not None, attention_mask)
        seq_idx = kwargs.get("seq_idx")
        if plan.scan != "mamba_ssm" and (seq_idx is not None or kwargs.get("cu_seqlens") is not None):
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
            advance_decode_count(cache, self.layer_idx)
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
                    kernel_layout(hidden_states_B_C),
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

        hidden_states_B_C = apply_padding_mask(hidden_states_B_C.transpose(1, 2), attention_mask)
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
            elif plan.scan == "numba":
                scan_result = ssd_numba_scan(*scan_args, **scan_kwargs)
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


class CompreSSMMamba2Block(GradientCheckpointingLayer):
    """Pre-norm residual block around a `CompreSSMMamba2Mixer`. (b, L, hidden) -> (b, L, hidden)."""

    def __init__(self, config: CompreSSMMamba2Config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = CompreSSMRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mixer = CompreSSMMamba2Mixer(config, layer_idx=layer_idx)

    def forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
        residual = hidden_states
        hidden_states = self.norm(hidden_states.to(dtype=self.norm.weight.dtype))
        if self.residual_in_fp32:
            residual = residual.to(torch.float32)
        return residual + self.mixer(hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)


class CompreSSMMamba2PreTrainedModel(CompreSSMPreTrainedModel):
    config_class = CompreSSMMamba2Config
    config: CompreSSMMamba2Config
    _no_split_modules = ["CompreSSMMamba2Block"]
    mixer_class = CompreSSMMamba2Mixer


class CompreSSMMamba2Model(CompreSSMBackboneMixin, CompreSSMMamba2PreTrainedModel):
    """The bare Mamba-2 backbone with per-layer state sizes; outputs `CompreSSMModelOutput`."""

    block_class = CompreSSMMamba2Block


class CompreSSMMamba2ForCausalLM(CompreSSMCausalLMMixin, CompreSSMMamba2PreTrainedModel, GenerationMixin):
    """Mamba-2 language model with per-layer state sizes."""

    def __init__(self, config: CompreSSMMamba2Config):
        super().__init__(config)
        self.backbone = CompreSSMMamba2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_mamba2(cls, model_or_path: "Mamba2ForCausalLM | str | os.PathLike", **from_pretrained_kwargs):
        """Convert a stock `Mamba2ForCausalLM` (object, saved folder or Hub id) into this class, weights unchanged.

        The logits of the returned model equal those of the stock model.
        """
        return convert_from_stock(cls, model_or_path, Mamba2ForCausalLM, "from_mamba2", **from_pretrained_kwargs)

    def to_mamba2(self) -> Mamba2ForCausalLM:
        """Convert back to a stock `Mamba2ForCausalLM`; every layer must have the same state size."""
        return convert_to_stock(
            self, Mamba2ForCausalLM, Mamba2Config, "to_mamba2", drop_config_keys=("state_sizes", "compression")
        )


__all__ = [
    "CompreSSMMamba2Block",
    "CompreSSMMamba2ForCausalLM",
    "CompreSSMMamba2Mixer",
    "CompreSSMMamba2Model",
    "CompreSSMMamba2PreTrainedModel",
    "CompreSSMGatedRMSNorm",
]
