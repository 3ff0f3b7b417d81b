"""The scoring math of each SSM family, looked up by family: one `FamilyScoring` of pure functions on tensors.

The families (`hf_compressssm.families`) only recompute a mixer's projections ``(u, delta, A, B, C)``; what is
measured from them and how states are scored lives here, per family: Mamba-1 in `mamba_scores`, Mamba-2 (and the
hybrid hosts, whose SSM layers are Mamba-2 layers) in `mamba2_scores`. A new family registers its functions with
`register_scoring`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from ..families import Mamba2Family, MambaFamily, SSMFamily
from . import mamba2_scores, mamba_scores
from .mamba_scores import SCORES


#: One layer's additive calibration sums (``count``, ``decay_sum``, ``ctrl_sum``, ``obs_sum``: float64 tensors).
LayerStatistics = dict[str, torch.Tensor]


@dataclass(frozen=True)
class FamilyScoring:
    """The scoring functions of one family. Projections are the family's ``(u, delta, A, B, C)``.

    * ``statistics(*projections, mask=)``: one batch's additive sums (they add across batches and all-reduce).
    * ``nan_statistics(*projections)``: sums of the same shapes filled with NaN (marks a non-finite batch).
    * ``merge(a, b)``: the key-wise sum of two sums of one layer.
    * ``scores(stats, score)``: one non-negative score per state, ``(N,)`` float64 (``(G, N)`` when grouped).
    * ``output_energy(*projections, mask=)``: the slow scan-measured reference sums ``(sum_sq, count)``.
    * ``energy_scores(sum_sq, count, groups)``: reference scores of the shape of ``scores``.
    """

    statistics: Callable[..., LayerStatistics]
    nan_statistics: Callable[..., LayerStatistics]
    merge: Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], LayerStatistics]
    scores: Callable[[Mapping[str, torch.Tensor], str], torch.Tensor]
    output_energy: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    energy_scores: Callable[[torch.Tensor, torch.Tensor | float, int], torch.Tensor]


MAMBA_SCORING = FamilyScoring(
    statistics=mamba_scores.selective_statistics,
    nan_statistics=mamba_scores.nan_statistics,
    merge=mamba_scores.merge_statistics,
    scores=mamba_scores.selective_state_scores,
    output_energy=mamba_scores.state_output_energy,
    energy_scores=mamba_scores.energy_scores,
)

MAMBA2_SCORING = FamilyScoring(
    statistics=mamba2_scores.ssd_statistics,
    nan_statistics=mamba2_scores.nan_ssd_statistics,
    merge=mamba2_scores.merge_ssd_statistics,
    scores=mamba2_scores.ssd_state_scores,
    output_energy=mamba2_scores.ssd_state_output_energy,
    energy_scores=mamba2_scores.ssd_energy_scores,
)

_REGISTRY: dict[type, FamilyScoring] = {MambaFamily: MAMBA_SCORING, Mamba2Family: MAMBA2_SCORING}


def register_scoring(family_class: type, scoring: FamilyScoring) -> None:
    """Use ``scoring`` for the families of ``family_class`` (and its subclasses)."""
    _REGISTRY[family_class] = scoring


def scoring_for(family: SSMFamily) -> FamilyScoring:
    """The scoring functions of ``family``; `ValueError` for a family without registered scores."""
    for family_class in type(family).__mro__:
        if family_class in _REGISTRY:
            return _REGISTRY[family_class]
    raise ValueError(f"no scores registered for the SSM family {family.name!r} ({type(family).__name__}).")


__all__ = [
    "FamilyScoring",
    "LayerStatistics",
    "MAMBA2_SCORING",
    "MAMBA_SCORING",
    "SCORES",
    "register_scoring",
    "scoring_for",
]
