"""The Mamba-2 family: transformers' `Mamba2Mixer` and our per-layer `CompreSSMMamba2Mixer`.

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
from .base import LayerStatistics, ShrinkAxis, SSMFamily


# transformers' mixer and ours (also when loaded as remote code), recognised by name: transformers' class is not part
# of its public API.
_MIXER_CLASS_NAMES = ("Mamba2Mixer", "CompreSSMMamba2Mixer")


class Mamba2Family(SSMFamily):
    name = "mamba2"
    stock_model_type = "mamba2"
    model_type = "compressssm_mamba2"
    convert_hint = "CompreSSMMamba2ForCausalLM.from_mamba2(model)"
    remote_code_files = (
        "configuration_compressssm_mamba2.py",
        "configuration_compressssm_common.py",
        "modeling_compressssm_mamba2.py",
        "modeling_compressssm_common.py",
        "ssd_scan.py",
        "kernel_policy.py",
    )
    #: ``in_proj`` and ``out_proj`` are called as modules on the torch path; ``conv1d``'s weight is read directly.
    lora_targets = ("in_proj", "out_proj")
    never_lora_targets = ("conv1d",)
    #: The fused ``mamba_split_conv1d_scan_combined`` training kernel reads ``out_proj``'s weight directly.
    fused_lora_targets = ("in_proj",)
    grouped = True

    def is_mixer(self, module: nn.Module) -> bool:
        return type(module).__name__ in _MIXER_CLASS_NAMES

    def state_size(self, mixer: nn.Module) -> int:
        return (int(mixer.conv1d.weight.shape[0]) - mixer.intermediate_size) // (2 * mixer.n_groups)

    def state_groups(self, mixer: nn.Module) -> int:
        return int(mixer.n_groups)

    def sync_state_size(self, mixer: nn.Module) -> None:
        size = self.state_size(mixer)
        channels = int(mixer.conv1d.weight.shape[0])
        for attr, value in (("ssm_state_size", size), ("conv_dim", channels)):
            if not isinstance(getattr(type(mixer), attr, None), property):
                setattr(mixer, attr, value)  # a stock mixer caches them; ours reads conv1d
        mixer.conv1d.in_channels = mixer.conv1d.out_channels = mixer.conv1d.groups = channels
        mixer.in_proj.out_features = int(mixer.in_proj.weight.shape[0])

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


def kept_rows(mixer: nn.Module, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For kept states ``keep`` (G, k) (each row ascending; a (k,) keep applies to every group), the kept
    ``in_proj`` rows and ``conv1d`` channels."""
    inner, heads, groups = mixer.intermediate_size, mixer.num_heads, mixer.n_groups
    size = (int(mixer.conv1d.weight.shape[0]) - inner) // (2 * groups)
    device = mixer.conv1d.weight.device
    keep = keep.to(device)
    keep = keep.expand(groups, -1) if keep.ndim == 1 else keep
    flat = (keep + size * torch.arange(groups, device=device)[:, None]).reshape(-1)  # ascending, group-major
    gn = groups * size
    conv = torch.cat([torch.arange(inner, device=device), inner + flat, inner + gn + flat])
    in_rows = torch.cat(
        [torch.arange(inner, device=device), inner + conv, torch.arange(heads, device=device) + 2 * inner + 2 * gn]
    )
    return in_rows, conv
