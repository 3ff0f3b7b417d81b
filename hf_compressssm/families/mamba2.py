"""Mamba-2 layers, in a pure Mamba-2 model or inside a hybrid host model (Granite 4.0-H, Bamba, Nemotron-H,
Zamba2).

One family class, `Mamba2Family`, parameterised by a `Mamba2Host`: the small per-architecture description of where
the Mamba-2 layers are (the class names of the host's Mamba-2 mixers), which cached attributes follow a cut, how a
stock model of the host is converted, and which files its folders ship. The mixers of every host share the Mamba-2
layout and forward, so calibration, scores and surgery are the same; attention / MoE modules are never touched.

Per mixer (I = ``intermediate_size``, H heads of P channels, G groups of N states): ``in_proj.weight`` is
(2I + 2GN + H, hidden), split as ``[z | x | B | C | dt]``; the depthwise ``conv1d`` runs over ``[x | B | C]``
(I + 2GN channels). B and C are laid out group-major (state n of group g at ``g·N + n``). A cut keeps, in every
group g, the same number k of states ``S_g`` (the sets may differ between groups): rows ``2I + g·N + S_g`` (B) and
``2I + GN + g·N + S_g`` (C) of ``in_proj`` (weight and bias) and channels ``I + g·N + S_g``, ``I + GN + g·N + S_g``
of ``conv1d`` (weight and bias). ``A_log``, ``D``, ``dt_bias``, the gated norm and ``out_proj`` keep their shapes.
Scores: `hf_compressssm.compression.scores_mamba2` (docs/method_mamba2.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..compression.scores_mamba2 import (
    merge_ssd_statistics,
    ssd_energy_scores,
    ssd_state_output_energy,
    ssd_state_scores,
    ssd_statistics,
)
from ..models.modeling_compressssm_hybrid import kept_rows, mamba2_state_size, sync_mamba2_sizes
from .base import LayerStatistics, ShrinkAxis, SSMFamily


@dataclass(frozen=True)
class Mamba2Host:
    """Where a model keeps its Mamba-2 layers: one entry per supported architecture.

    Mixers are recognised by class name (transformers' classes are not part of its public API; a folder loaded as
    remote code has its own copies of ours).
    """

    #: Family name (reports, errors) and a readable name of the architecture.
    name: str
    title: str
    #: model_type of the stock transformers config and of our per-layer config.
    stock_model_type: str
    model_type: str
    #: Class names of the host's Mamba-2 mixers (stock, and ours where we have our own).
    mixer_class_names: tuple[str, ...]
    #: How a user turns a stock model into one whose layers can each have their own size.
    convert_hint: str
    #: Files ``save_pretrained`` writes next to the weights.
    remote_code_files: tuple[str, ...]
    #: Attributes the mixer caches from the state size, re-synced after a cut (skipped where they are properties).
    synced_attributes: tuple[str, ...] = ("ssm_state_size", "conv_dim")


MAMBA2 = Mamba2Host(
    name="mamba2",
    title="Mamba-2",
    stock_model_type="mamba2",
    model_type="compressssm_mamba2",
    mixer_class_names=("Mamba2Mixer", "CompreSSMMamba2Mixer"),
    convert_hint="CompreSSMMamba2ForCausalLM.from_mamba2(model)",
    remote_code_files=(
        "configuration_compressssm_mamba2.py",
        "configuration_compressssm_common.py",
        "modeling_compressssm_mamba2.py",
        "modeling_compressssm_common.py",
        "ssd_scan.py",
        "ssd_numba_scan.py",
        "selective_scan.py",
        "kernel_policy.py",
    ),
)

GRANITE_MOE_HYBRID = Mamba2Host(
    name="granitemoehybrid",
    title="IBM Granite 4.0-H",
    stock_model_type="granitemoehybrid",
    model_type="compressssm_granitemoehybrid",
    mixer_class_names=("GraniteMoeHybridMambaLayer",),
    convert_hint="CompreSSMGraniteMoeHybridForCausalLM.from_stock(model)",
    remote_code_files=(
        "configuration_compressssm_granitemoehybrid.py",
        "configuration_compressssm_common.py",
        "modeling_compressssm_granitemoehybrid.py",
        "modeling_compressssm_hybrid.py",
        "modeling_compressssm_common.py",
    ),
)

BAMBA = Mamba2Host(
    name="bamba",
    title="Bamba",
    stock_model_type="bamba",
    model_type="compressssm_bamba",
    mixer_class_names=("BambaMixer",),
    convert_hint="CompreSSMBambaForCausalLM.from_stock(model)",
    remote_code_files=(
        "configuration_compressssm_bamba.py",
        "configuration_compressssm_common.py",
        "modeling_compressssm_bamba.py",
        "modeling_compressssm_hybrid.py",
        "modeling_compressssm_common.py",
    ),
)

NEMOTRON_H = Mamba2Host(
    name="nemotron_h",
    title="NVIDIA Nemotron-H",
    stock_model_type="nemotron_h",
    model_type="compressssm_nemotron_h",
    mixer_class_names=("NemotronHMamba2Mixer",),
    convert_hint="CompreSSMNemotronHForCausalLM.from_stock(model)",
    remote_code_files=(
        "configuration_compressssm_nemotron_h.py",
        "configuration_compressssm_common.py",
        "modeling_compressssm_nemotron_h.py",
        "modeling_compressssm_hybrid.py",
        "modeling_compressssm_common.py",
    ),
)

ZAMBA2 = Mamba2Host(
    name="zamba2",
    title="Zyphra Zamba2",
    stock_model_type="zamba2",
    model_type="compressssm_zamba2",
    mixer_class_names=("Zamba2MambaMixer",),
    convert_hint="CompreSSMZamba2ForCausalLM.from_stock(model)",
    remote_code_files=(
        "configuration_compressssm_zamba2.py",
        "configuration_compressssm_common.py",
        "modeling_compressssm_zamba2.py",
        "modeling_compressssm_hybrid.py",
        "modeling_compressssm_common.py",
    ),
)

#: Every host whose Mamba-2 layers the pipeline compresses.
HOSTS = (MAMBA2, GRANITE_MOE_HYBRID, BAMBA, NEMOTRON_H, ZAMBA2)


class Mamba2Family(SSMFamily):
    """The Mamba-2 layers of one host (default: a pure Mamba-2 model)."""

    def __init__(self, host: Mamba2Host = MAMBA2):
        self.host = host
        self.name = host.name
        self.stock_model_type = host.stock_model_type
        self.model_type = host.model_type
        self.convert_hint = host.convert_hint
        self.remote_code_files = host.remote_code_files

    #: ``in_proj`` and ``out_proj`` are called as modules on the torch path; ``conv1d``'s weight is read directly.
    lora_targets = ("in_proj", "out_proj")
    never_lora_targets = ("conv1d",)
    #: The fused ``mamba_split_conv1d_scan_combined`` training kernel reads ``out_proj``'s weight directly.
    fused_lora_targets = ("in_proj",)
    grouped = True

    def is_mixer(self, module: nn.Module) -> bool:
        return type(module).__name__ in self.host.mixer_class_names

    def state_size(self, mixer: nn.Module) -> int:
        return mamba2_state_size(mixer)

    def state_groups(self, mixer: nn.Module) -> int:
        return int(mixer.n_groups)

    def sync_state_size(self, mixer: nn.Module) -> None:
        sync_mamba2_sizes(mixer, self.host.synced_attributes)  # a stock mixer caches them; ours reads conv1d

    def shrinkable_parameters(self, mixer: nn.Module) -> list[nn.Parameter]:
        params = [mixer.in_proj.weight, mixer.in_proj.bias, mixer.conv1d.weight, mixer.conv1d.bias]
        return [p for p in params if p is not None]

    def shrink_axes(self, mixer: nn.Module, keep: torch.Tensor) -> list[ShrinkAxis]:
        in_rows, conv_channels = kept_rows(mixer, keep)
        axes = [ShrinkAxis(mixer.in_proj, "weight", 0, in_rows)]
        if mixer.in_proj.bias is not None:
            axes.append(ShrinkAxis(mixer.in_proj, "bias", 0, in_rows))
        axes.append(ShrinkAxis(mixer.conv1d, "weight", 0, conv_channels))
        if mixer.conv1d.bias is not None:
            axes.append(ShrinkAxis(mixer.conv1d, "bias", 0, conv_channels))
        return axes

    def projections(
        self, mixer: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``u`` (b, L, H, P) post-conv SiLU activations, ``delta`` (b, L, H) = clamp(softplus(dt + dt_bias)),
        ``A`` (H,) = −exp(A_log), ``B``, ``C`` (b, L, G, N), as the mixer's forward computes them (float32;
        padding zeroed)."""
        bsz, length, _ = hidden_states.shape
        inner, heads, groups = mixer.intermediate_size, mixer.num_heads, mixer.n_groups
        size = self.state_size(mixer)
        if attention_mask is not None:
            hidden_states = hidden_states * attention_mask[:, :, None].to(hidden_states.dtype)
        projected = mixer.in_proj(hidden_states)
        _, xBC, dt = projected.split([inner, inner + 2 * groups * size, heads], dim=-1)
        weight = mixer.conv1d.weight
        xBC = F.conv1d(
            xBC.transpose(1, 2).to(weight.dtype),
            weight,
            mixer.conv1d.bias,
            padding=weight.shape[-1] - 1,
            groups=weight.shape[0],
        )[..., :length]
        xBC = mixer.act(xBC).transpose(1, 2)
        if attention_mask is not None:
            xBC = xBC * attention_mask[:, :, None].to(xBC.dtype)
        x, B, C = xBC.split([inner, groups * size, groups * size], dim=-1)
        delta = F.softplus(dt.float() + mixer.dt_bias.float())
        low, high = mixer.time_step_limit
        delta = delta.clamp(min=low, max=high)
        A = -torch.exp(mixer.A_log.float())
        return (
            x.float().reshape(bsz, length, heads, mixer.head_dim),
            delta,
            A,
            B.float().reshape(bsz, length, groups, size),
            C.float().reshape(bsz, length, groups, size),
        )

    def statistics(self, projections: tuple[torch.Tensor, ...], mask: torch.Tensor | None) -> LayerStatistics:
        return ssd_statistics(*projections, mask=mask)

    def nan_statistics(self, mixer: nn.Module, device: torch.device) -> LayerStatistics:
        heads, groups, size = mixer.num_heads, mixer.n_groups, self.state_size(mixer)
        nan = float("nan")
        return {
            "count": torch.full((), nan, dtype=torch.float64, device=device),
            "decay_sum": torch.full((heads,), nan, dtype=torch.float64, device=device),
            "ctrl_sum": torch.full((heads, mixer.head_dim, size), nan, dtype=torch.float64, device=device),
            "obs_sum": torch.full((groups, size), nan, dtype=torch.float64, device=device),
        }

    def merge_statistics(self, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> LayerStatistics:
        return merge_ssd_statistics(a, b)

    def scores(self, stats: Mapping[str, torch.Tensor], score: str) -> torch.Tensor:
        """``(G, N)`` float64: one score per state of every group."""
        return ssd_state_scores(stats, score)

    def scan_energy(
        self, projections: tuple[torch.Tensor, ...], mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return ssd_state_output_energy(*projections, mask=mask)

    def scan_energy_scores(self, mixer: nn.Module, sum_sq: torch.Tensor, count: float) -> torch.Tensor:
        return ssd_energy_scores(sum_sq, count, self.state_groups(mixer))


__all__ = [
    "BAMBA",
    "GRANITE_MOE_HYBRID",
    "HOSTS",
    "MAMBA2",
    "NEMOTRON_H",
    "ZAMBA2",
    "Mamba2Family",
    "Mamba2Host",
    "kept_rows",
]
