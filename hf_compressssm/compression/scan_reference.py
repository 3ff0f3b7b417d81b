"""Reference state-importance scores measured from the real recurrence (slow; for studies and checks), any family.

The scores of `scoring` come from a time-averaged LTI surrogate and need only projections. This module instead runs
the exact recurrence of every mixer on real batches and measures, for each channel and state, the energy of that
state's contribution to the SSM output (the family's ``output_energy``), then reduces it per state
(``energy_scores``): for Mamba-1 ``s_n = Σ_d sqrt(mean_t (C_{t,n} h_{t,d,n})²)``, the measured counterpart of the
``h2`` score. Cost: a sequential float64 scan, one pass per batch; fine for small models, not for the training loop.
"""

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..families import ssm_layers
from .calibration import visit_mixer_projections
from .mamba_scores import state_output_energy
from .scoring import scoring_for


__all__ = ["scan_energy_scores", "state_output_energy"]


@torch.no_grad()
def scan_energy_scores(model: nn.Module, batches: Iterable[Mapping[str, Any]]) -> list[torch.Tensor]:
    """Per-layer ``(N_layer,)`` float64 scan-measured scores on ``batches`` (``(G, N_layer)`` for a grouped family
    such as Mamba-2).

    ``batches``: dicts of model inputs (``labels`` ignored). The model runs in eval mode (restored after); each
    mixer's projections are recomputed from its input exactly as in `calibration.collect_statistics`.
    """
    layers = ssm_layers(model)
    scoring = scoring_for(layers.family)
    sums: list[torch.Tensor | None] = [None] * len(layers.mixers)
    counts = [0.0] * len(layers.mixers)

    def accumulate(index, *projections_and_mask) -> None:
        *projections, mask = projections_and_mask
        sum_sq, count = scoring.output_energy(*projections, mask=mask)
        sums[index] = sum_sq if sums[index] is None else sums[index] + sum_sq
        counts[index] += float(count)

    visit_mixer_projections(model, batches, accumulate, layers)
    if any(s is None for s in sums) or min(counts) <= 0:
        raise ValueError("scan_energy_scores saw no token: pass at least one batch of inputs.")
    return [scoring.energy_scores(s, c, layers.family.state_groups(m)) for m, s, c in zip(layers.mixers, sums, counts)]
