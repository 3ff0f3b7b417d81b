"""The Mamba-1 family: transformers' `MambaMixer` and our per-layer `CompreSSMMambaMixer`.

Per mixer (D = ``intermediate_size``, N states, R = ``time_step_rank``): ``A_log`` is (D, N) and ``x_proj.weight`` is
(R + 2N, D), split as ``[dt | B | C]``. B_t and C_t are shared by all channels, so a cut keeps one set S of state
indices per layer: columns S of ``A_log`` and rows ``[0:R] ∪ (R + S) ∪ (R + N + S)`` of ``x_proj.weight``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import ShrinkAxis, SSMFamily


# transformers' mixer and ours (also when loaded as remote code), recognised by name: transformers' class is not part
# of its public API.
_MIXER_CLASS_NAMES = ("MambaMixer", "CompreSSMMambaMixer")


class MambaFamily(SSMFamily):
    name = "mamba"
    stock_model_type = "mamba"
    model_type = "compressssm_mamba"
    convert_hint = "CompreSSMMambaForCausalLM.from_mamba(model)"

    def is_mixer(self, module: nn.Module) -> bool:
        return type(module).__name__ in _MIXER_CLASS_NAMES

    def state_size(self, mixer: nn.Module) -> int:
        return int(mixer.A_log.shape[-1])

    def sync_state_size(self, mixer: nn.Module) -> None:
        size = self.state_size(mixer)
        if not isinstance(type(mixer).__dict__.get("ssm_state_size"), property):
            mixer.ssm_state_size = size  # a stock mixer caches it; ours reads A_log
        layer_config = getattr(mixer, "config", None)
        if layer_config is not None and getattr(layer_config, "state_size", size) != size:
            layer_config.state_size = size  # the mixer's own per-layer config, never the model's

    def shrinkable_parameters(self, mixer: nn.Module) -> list[nn.Parameter]:
        return [mixer.A_log, mixer.x_proj.weight]

    def shrink_axes(self, mixer: nn.Module, keep: torch.Tensor) -> list[ShrinkAxis]:
        keep = keep.to(mixer.A_log.device)
        return [
            ShrinkAxis(mixer, "A_log", 1, keep),
            ShrinkAxis(mixer.x_proj, "weight", 0, kept_x_proj_rows(mixer, keep)),
        ]

    def projections(
        self, mixer: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``u`` (batch, L, D) post-conv SiLU activations, ``delta`` (batch, L, D) = softplus(dt_proj(δ)), ``A`` (D, N)
        = −exp(A_log), ``B``, ``C`` (batch, L, N), as the mixer's forward computes them (float32; padding zeroed)."""
        length = hidden_states.shape[1]
        if attention_mask is not None:
            hidden_states = hidden_states * attention_mask[:, :, None].to(hidden_states.dtype)
        x, _ = mixer.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)  # (b, D, L)
        u = mixer.act(mixer.conv1d(x)[..., :length]).transpose(1, 2)  # (b, L, D)
        if attention_mask is not None:
            u = u * attention_mask[:, :, None].to(u.dtype)
        size = self.state_size(mixer)
        dt, B, C = torch.split(mixer.x_proj(u), [mixer.time_step_rank, size, size], dim=-1)
        delta = F.softplus(mixer.dt_proj(dt).float())
        A = -torch.exp(mixer.A_log.float())
        return u.float(), delta, A, B.float(), C.float()


def kept_x_proj_rows(mixer: nn.Module, keep: torch.Tensor) -> torch.Tensor:
    """Rows of ``x_proj.weight`` to keep for state indices ``keep``: ``[0:R] ∪ (R + keep) ∪ (R + N + keep)``."""
    rank, size = mixer.time_step_rank, mixer.A_log.shape[-1]
    keep = keep.to(mixer.A_log.device)
    return torch.cat([torch.arange(rank, device=keep.device), rank + keep, rank + size + keep])
