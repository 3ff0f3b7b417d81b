"""What the compression pipeline needs to know about one SSM family, and nothing else.

An `SSMFamily` tells calibration, surgery, the DDP helpers, PEFT and the model card how a family's mixers look:
how to find them, how to recompute the inputs of their state recurrence from a mixer's input (for the importance
statistics), which parameters shrink along which axis when states are removed, and which cached attributes must
follow a cut. Everything else (ranks, the cut's atomicity, optimizer slicing, the schedule) is family-agnostic.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn


LayerStatistics = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ShrinkAxis:
    """One parameter that changes shape in a cut: ``owner.<name>`` keeps ``rows`` along dimension ``dim``."""

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
    #: Files ``save_pretrained`` writes next to the weights so that the folder loads with ``trust_remote_code``.
    remote_code_files: tuple[str, ...] = ()
    #: PEFT: mixer submodules called as modules (LoRA works there), and those whose weights are read directly.
    lora_targets: tuple[str, ...] = ()
    never_lora_targets: tuple[str, ...] = ()
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
        """Recompute the recurrence inputs from the mixer's input (differentiable; wrap in no_grad to calibrate)."""
        raise NotImplementedError

    def statistics(self, projections: tuple[torch.Tensor, ...], mask: torch.Tensor | None) -> LayerStatistics:
        """Additive calibration sums of one batch (they add across batches and all-reduce across processes)."""
        raise NotImplementedError

    def nan_statistics(self, mixer: nn.Module, device: torch.device) -> LayerStatistics:
        """Statistics of the right shapes filled with NaN: marks a layer whose batch had non-finite values."""
        raise NotImplementedError

    def merge_statistics(self, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> LayerStatistics:
        raise NotImplementedError

    def scores(self, stats: Mapping[str, torch.Tensor], score: str) -> torch.Tensor:
        """One non-negative importance score per state, ``(N,)`` float64 (``(G, N)`` for a grouped family)."""
        raise NotImplementedError

    def scan_energy(
        self, projections: tuple[torch.Tensor, ...], mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference (slow): per-channel, per-state sums of squared state output contributions from the exact
        sequential recurrence, and the number of tokens counted."""
        raise NotImplementedError

    def scan_energy_scores(self, mixer: nn.Module, sum_sq: torch.Tensor, count: float) -> torch.Tensor:
        """Scan-measured scores (the shape of `scores`) from summed `scan_energy` results."""
        raise NotImplementedError

    def per_layer_config(self, config) -> bool:
        """Whether ``config`` lets each layer keep its own state size (has ``with_state_sizes``)."""
        return hasattr(config, "with_state_sizes") and hasattr(config, "state_sizes")
