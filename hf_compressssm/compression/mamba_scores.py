"""Importance scores of the states of a selective (Mamba-1) layer, from additive calibration statistics.

The layer is summarised per channel by a time-averaged LTI surrogate (mean decay, input and output energy), measured
on real batches from projections only (no scan); see ``docs/method.md`` §3. :func:`selective_statistics` returns
sums that add across batches (:func:`merge_statistics`) and all-reduce across processes; :func:`selective_state_scores`
turns them into one score per state: ``h2`` (the mode's output energy, the default) or ``hankel`` (the one-state
Hankel singular value of the paper). :func:`state_output_energy` is the sequential reference: the measured
per-state output energy of the exact recurrence (slow; for checks and studies).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .checks import check_finite, check_int
from .decay_sum import decay_deficit_sum


__all__ = [
    "SCORES",
    "STAT_KEYS",
    "energy_scores",
    "merge_statistics",
    "nan_statistics",
    "selective_state_scores",
    "selective_statistics",
    "state_output_energy",
    "sum_statistics",
]

SCORES: tuple[str, ...] = ("hankel", "h2")
"""Valid ``score`` names for :func:`selective_state_scores`."""

STAT_KEYS: tuple[str, ...] = ("count", "decay_sum", "ctrl_sum", "obs_sum")
"""Keys of the dicts returned by :func:`selective_statistics`."""


def check_scan_values(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, delta_formula: str) -> None:
    """The value checks of every family's statistics (shapes are checked by each family): real and finite inputs,
    A < 0 (the continuous A), delta >= 0 (the discretised step, ``delta_formula`` in the message)."""
    for name, x in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)):
        if x.is_complex():
            raise ValueError(f"{name} must be real; got a complex tensor.")
        check_finite(name, x)
    if bool((A >= 0).any()):
        raise ValueError("A must be strictly negative (pass the continuous A = -exp(A_log), not A_log).")
    if bool((delta < 0).any()):
        raise ValueError(f"delta must be >= 0 (pass {delta_formula}, not the raw projection).")


def selective_statistics(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    mask: Tensor | None = None,
    chunk_size: int | None = None,
) -> dict[str, Tensor]:
    """Additive calibration sums of one Mamba-1 mixer (docs/method.md §3); projections only, no scan.

    Args:
        u: ``(batch, length, D)`` post-conv SiLU activations.
        delta: ``(batch, length, D)`` time step after softplus (dt bias included), ``≥ 0``.
        A: ``(D, N)`` continuous A, ``-exp(A_log)`` (strictly negative).
        B, C: ``(batch, length, N)`` input-dependent projections (shared by all channels).
        mask: optional ``(batch, length)`` of 0/1 (or bool); 0 excludes a token (padding).
        chunk_size: tokens per chunk for ``Σ exp(ΔA)``, the only term that needs ``(tokens, D, N)``
            intermediates; default keeps a chunk at ≈ 4M float64 elements.
    Returns:
        float64 sums over valid tokens: ``count`` (scalar), ``decay_sum`` ``(D, N)`` = ``Σ exp(Δ_d A_dn)``,
        ``ctrl_sum`` ``(D, N)`` = ``Σ (Δ_d u_d B_n)²``, ``obs_sum`` ``(N,)`` = ``Σ C_n²``. Sum them across
        batches with :func:`merge_statistics` or an all-reduce (SUM), then call
        :func:`selective_state_scores`.
    """
    u, delta, A, B, C = (torch.as_tensor(x) for x in (u, delta, A, B, C))
    if u.ndim != 3:
        raise ValueError(f"u must have shape (batch, length, D); got {tuple(u.shape)}.")
    bsz, length, d = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"delta must have the shape of u {tuple(u.shape)}; got {tuple(delta.shape)}.")
    if A.ndim != 2 or A.shape[0] != d:
        raise ValueError(f"A must have shape (D, N) with D={d}; got {tuple(A.shape)}.")
    n = A.shape[1]
    for name, x in (("B", B), ("C", C)):
        if tuple(x.shape) != (bsz, length, n):
            raise ValueError(f"{name} must have shape (batch, length, N) = {(bsz, length, n)}; got {tuple(x.shape)}.")
    check_scan_values(u, delta, A, B, C, "softplus(dt_proj(δ) + dt_bias)")
    if chunk_size is not None:
        chunk_size = check_int("chunk_size", chunk_size, 1)

    f64 = torch.float64
    work = torch.promote_types(delta.dtype, torch.float32)  # the decay term's precision
    A_work = A.to(work)
    u2, dl2, B2, C2 = (x.reshape(-1, x.shape[-1]) for x in (u, delta, B, C))
    if mask is not None:
        mask = torch.as_tensor(mask, device=u.device)
        if tuple(mask.shape) != (bsz, length):
            raise ValueError(f"mask must have shape (batch, length) = {(bsz, length)}; got {tuple(mask.shape)}.")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask must contain only 0 and 1 (1 = real token, 0 = padding).")
        keep = mask.reshape(-1).bool()
        u2, dl2, B2, C2 = u2[keep], dl2[keep], B2[keep], C2[keep]
    dl_work = dl2.to(work)
    dl2 = dl2.to(f64)
    du2 = (dl2 * u2.to(f64)).square()  # (T, D)
    ctrl_sum = du2.mT @ B2.to(f64).square()  # (D, N) = Σ_t (Δu)²_td B²_tn
    obs_sum = C2.to(f64).square().sum(0)
    tokens = dl2.shape[0]
    # Σ exp(ΔA) = count + Σ expm1(ΔA). The (tokens, D, N) term is the cost of calibration: it is evaluated in the
    # inputs' precision (float32 for float32 models) with expm1, which keeps the *deficit* 1 − exp(ΔA) to relative
    # precision even for slow modes (ā → 1, where 1/(1 − ā²) dominates the scores), and accumulated in float64; on
    # CPU by one fused numba kernel (decay_sum.py), elsewhere by torch in chunks.
    deficit = decay_deficit_sum(dl_work, A_work, chunk_size=chunk_size)
    count = torch.tensor(float(tokens), dtype=f64, device=u.device)
    decay_sum = count + deficit
    return {"count": count, "decay_sum": decay_sum, "ctrl_sum": ctrl_sum, "obs_sum": obs_sum}


def _check_stats(name: str, stats: Mapping[str, Tensor]) -> None:
    if not isinstance(stats, Mapping) or set(stats.keys()) != set(STAT_KEYS):
        got = sorted(stats.keys()) if isinstance(stats, Mapping) else type(stats).__name__
        raise ValueError(f"{name} must be a dict with keys {list(STAT_KEYS)} from selective_statistics; got {got}.")
    dn = tuple(stats["decay_sum"].shape)
    if len(dn) != 2 or tuple(stats["ctrl_sum"].shape) != dn or tuple(stats["obs_sum"].shape) != dn[1:]:
        raise ValueError(
            f"{name} has inconsistent shapes: decay_sum {dn}, ctrl_sum {tuple(stats['ctrl_sum'].shape)}, "
            f"obs_sum {tuple(stats['obs_sum'].shape)}; expected (D, N), (D, N), (N,)."
        )
    if stats["count"].numel() != 1:
        raise ValueError(f"{name}['count'] must be a scalar; got shape {tuple(stats['count'].shape)}.")


def sum_statistics(a: Mapping[str, Tensor], b: Mapping[str, Tensor], keys: tuple[str, ...]) -> dict[str, Tensor]:
    """Key-wise sum of two statistics dicts of one layer over ``keys``; `ValueError` when a shape differs."""
    for k in keys:
        if a[k].shape != b[k].shape:
            raise ValueError(
                f"cannot merge statistics of different layers: {k} has shapes {tuple(a[k].shape)} "
                f"and {tuple(b[k].shape)}."
            )
    return {k: a[k] + b[k].to(device=a[k].device, dtype=a[k].dtype) for k in keys}


def merge_statistics(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Key-wise sum of two :func:`selective_statistics` dicts (same layer, same shapes)."""
    _check_stats("a", a)
    _check_stats("b", b)
    return sum_statistics(a, b, STAT_KEYS)


def selective_state_scores(stats: Mapping[str, Tensor], score: str = "h2") -> Tensor:
    """One importance score per state index from summed statistics (docs/method.md §3).

    ``ā = decay_sum/count`` clamped into ``(0, 1 − 1e-12]``; ``c² = obs_sum/count``;
    ``P = (ctrl_sum/count)/(1 − ā²)``; ``Q = c²/(1 − ā²)``.

    * ``"hankel"``: ``s_n = Σ_d sqrt(P_dn Q_dn)`` (one-state HSV, ``|b c|/(1 − ā²)``).
    * ``"h2"``: ``s_n = Σ_d sqrt(P_dn c²_n)`` (one-state H2 norm, ``|b c|/sqrt(1 − ā²)``).

    Args:
        stats: dict from :func:`selective_statistics` (possibly merged / all-reduced).
        score: one of :data:`SCORES`.
    Returns:
        ``(N,)`` float64, ≥ 0. ``random`` / ``smallest`` ablations belong to :func:`select_indices`.
    """
    if score not in SCORES:
        raise ValueError(
            f"unknown score {score!r}; valid: {', '.join(SCORES)} "
            "(random / smallest are selections: see select_indices)."
        )
    _check_stats("stats", stats)
    f64 = torch.float64
    count = stats["count"].to(f64).reshape(())
    if not bool(count > 0):
        raise ValueError("stats['count'] is 0: no calibration tokens were seen; run selective_statistics on data.")
    for k in STAT_KEYS:
        check_finite(f"stats['{k}']", stats[k])
    a_bar = (stats["decay_sum"].to(f64) / count).clamp(torch.finfo(f64).tiny, 1 - 1e-12)
    one_m = 1 - a_bar.square()
    ctrl = (stats["ctrl_sum"].to(f64) / count).clamp_min(0)
    c2 = (stats["obs_sum"].to(f64) / count).clamp_min(0)
    P = ctrl / one_m
    if score == "hankel":
        per = (P * (c2 / one_m)).sqrt()
    else:
        per = (P * c2).sqrt()
    return per.sum(0)


def nan_statistics(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> dict[str, Tensor]:
    """Statistics of the shapes :func:`selective_statistics` gives for these projections, filled with NaN: they mark
    a layer whose batch had non-finite values (float64, on ``u``'s device)."""
    channels, states = A.shape
    nan, f64, device = float("nan"), torch.float64, u.device
    return {
        "count": torch.full((), nan, dtype=f64, device=device),
        "decay_sum": torch.full((channels, states), nan, dtype=f64, device=device),
        "ctrl_sum": torch.full((channels, states), nan, dtype=f64, device=device),
        "obs_sum": torch.full((states,), nan, dtype=f64, device=device),
    }


@torch.no_grad()
def state_output_energy(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Sum over batch and valid time steps of ``(C_{t,n} h_{t,d,n})²`` from the exact recurrence (float64, one step
    at a time; the skip term ``D u`` and the gate are not attributed to any state).

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


def energy_scores(sum_sq: Tensor, count: Tensor | float, groups: int = 1) -> Tensor:
    """Scan-measured scores ``s_n = Σ_d sqrt(mean_t (C_{t,n} h_{t,d,n})²)``, ``(N,)``, from the sums of
    :func:`state_output_energy` (the measured counterpart of the ``h2`` score). ``groups`` is unused (always 1)."""
    return (sum_sq / float(count)).sqrt().sum(0)
