"""What the compression pipeline needs to know about one SSM family: where its mixers are and how they are built.

An `SSMFamily` is a thin adapter over a family's mixers: it recognises them, reads their state size from their
parameters, recomputes the inputs of their state recurrence from a mixer's input (the projections the importance
statistics are computed from), and names the parameters that shrink, along which axis, when states are removed.
It holds no scoring math (`hf_compressssm.compression.scoring`), no PEFT data (`hf_compressssm.peft_utils`) and no
Hub data (`hf_compressssm.hub`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ShrinkAxis:
    """One parameter that changes shape in a cut: ``owner.<name>`` keeps ``index`` along dimension ``dim``."""

    owner: nn.Module
    name: str
    dim: int
    index: torch.Tensor


class SSMFamily:
    """Interface of one SSM family (Mamba-1 is `hf_compressssm.families.mamba.MambaFamily`).

    Subclasses set the class attributes and implement the methods that raise `NotImplementedError`.
    """

    name: str = ""
    #: model_type of the stock transformers config and of our per-layer config.
    stock_model_type: str = ""
    model_type: str = ""
    #: How a user turns a stock model of this family into one whose layers can each have their own size.
    convert_hint: str = ""
    #: Whether states come in groups cut separately (Mamba-2: B/C per group). Grouped families score states as
    #: ``(G, N)`` and take kept indices as ``(G, k)`` (the same count k per group); others as ``(N,)`` / ``(k,)``.
    grouped: bool = False

    def is_mixer(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def state_size(self, mixer: nn.Module) -> int:
        """The mixer's present state size, read from its parameters (the one source of truth)."""
        raise NotImplementedError

    def state_groups(self, mixer: nn.Module) -> int:
        """Number of state groups of the mixer (1 for an ungrouped family)."""
        return 1

    def sync_state_size(self, mixer: nn.Module) -> None:
        """Bring the mixer's cached size attributes in line with its parameters after a cut or a restore."""
        raise NotImplementedError

    def shrinkable_parameters(self, mixer: nn.Module) -> list[nn.Parameter]:
        """The parameters a cut replaces (kept out of DDP, all-reduced by hand)."""
        raise NotImplementedError

    def shrink_axes(self, mixer: nn.Module, keep: torch.Tensor) -> list[ShrinkAxis]:
        """For kept state indices ``keep`` (ascending, distinct, validated; ``(G, k)`` rows for a grouped family),
        what each shrinkable parameter keeps."""
        raise NotImplementedError

    def projections(
        self, mixer: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        """Recompute the recurrence inputs ``(u, delta, A, B, C)`` from the mixer's input ``hidden_states``
        ``(batch, L, hidden)`` (differentiable; wrap in no_grad to calibrate)."""
        raise NotImplementedError

    def per_layer_config(self, config) -> bool:
        """Whether ``config`` lets each layer keep its own state size (has ``with_state_sizes``)."""
        return hasattr(config, "with_state_sizes") and hasattr(config, "state_sizes")
