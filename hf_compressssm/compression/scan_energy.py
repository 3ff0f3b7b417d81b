"""Reference state-importance score measured from the real selective scan (slow; for studies and checks).

The scores of `scores.selective_state_scores` come from a time-averaged LTI surrogate and need only projections.
This module instead runs the recurrence of every Mamba mixer on real batches and measures, for each channel ``d``
and state ``n``, the energy of that state's contribution to the SSM output, ``C_{t,n} h_{t,d,n}``:

    s_n = Σ_d sqrt( mean_t (C_{t,n} h_{t,d,n})² )

(mean over valid tokens of the batches; the skip term ``D u`` and the gate are not attributed to any state). This
is the measured counterpart of the ``h2`` score (``Σ_d`` of the per-channel RMS output of one mode), so it is the
natural reference for it. Cost: a sequential scan in float64 keeping ``(batch, D, N)`` states, one pass per batch;
fine for small models, not meant for the training loop.
"""

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..families import family_of, find_mixers
from .calibration import visit_mixer_projections


__all__ = ["state_output_energy", "scan_energy_scores"]


@torch.no_grad()
def state_output_energy(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over batch and valid time steps of ``(C_{t,n} h_{t,d,n})²`` from the exact recurrence.

    Args:
        u, delta: ``(batch, L, D)`` (post-conv activations; time step after softplus).
        A: ``(D, N)``, the continuous ``-exp(A_log)``.
        B, C: ``(batch, L, N)``.
        mask: optional ``(batch, L)`` 0/1; a masked token neither updates the state nor counts.
    Returns:
        ``(sum_sq, count)``: ``(D, N)`` float64 sums and the float64 number of counted tokens.
    """
    f64 = torch.float64
    u, delta, A, B, C = (x.to(f64) for x in (u, delta, A, B, C))
    bsz, length, d = u.shape
    n = A.shape[-1]
    h = torch.zeros(bsz, d, n, dtype=f64, device=u.device)
    sum_sq = torch.zeros(d, n, dtype=f64, device=u.device)
    m = torch.ones(bsz, length, dtype=f64, device=u.device) if mask is None else mask.to(f64)
    for t in range(length):
        keep = m[:, t, None, None]
        decay = torch.exp(delta[:, t, :, None] * A)  # (b, D, N)
        update = decay * h + (delta[:, t] * u[:, t])[:, :, None] * B[:, t, None, :]
        h = keep * update + (1 - keep) * h
        contribution = C[:, t, None, :] * h
        sum_sq += (keep * contribution.square()).sum(0)
    return sum_sq, m.sum()


@torch.no_grad()
def scan_energy_scores(model: nn.Module, batches: Iterable[Mapping[str, Any]]) -> list[torch.Tensor]:
    """Per-layer ``(N_layer,)`` float64 scores ``s_n = Σ_d sqrt(mean_t (C_{t,n} h_{t,d,n})²)`` on ``batches``
    (``(G, N_layer)`` for a grouped family such as Mamba-2: `SSMFamily.scan_energy_scores`).

    ``batches``: dicts of model inputs (``labels`` ignored). The model runs in eval mode (restored after); each
    mixer's projections are recomputed from its input exactly as in `calibration.collect_statistics`.
    """
    mixers = find_mixers(model)
    if not mixers:
        raise ValueError(f"{type(model).__name__} has no Mamba mixers.")
    family = family_of(model)
    sums: list[torch.Tensor | None] = [None] * len(mixers)
    counts = [0.0] * len(mixers)

    def accumulate(index, *projections_and_mask) -> None:
        *projections, mask = projections_and_mask
        sum_sq, count = family.scan_energy(tuple(projections), mask)
        sums[index] = sum_sq if sums[index] is None else sums[index] + sum_sq
        counts[index] += float(count)

    visit_mixer_projections(model, batches, accumulate)
    if any(s is None for s in sums) or min(counts) <= 0:
        raise ValueError("scan_energy_scores saw no token: pass at least one batch of inputs.")
    return [family.scan_energy_scores(m, s, c) for m, s, c in zip(mixers, sums, counts)]
