"""Importance scores of the states of a Mamba-2 (SSD) layer, from additive calibration statistics.

Mamba-2 has one scalar decay per head and B/C shared by the heads of a group, so a state is ``(group g, index n)``
and its importance comes from its B/C energy together with the decay of the heads that read it; see
``docs/method_mamba2.md``. :func:`ssd_statistics` returns sums that add across batches (:func:`merge_ssd_statistics`)
and all-reduce across processes; :func:`ssd_state_scores` turns them into one score per state, ``(G, N)``.
:func:`ssd_state_output_energy` is the sequential reference: the measured per-state output energy of the exact
recurrence (slow; for checks and studies).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .checks import check_finite
from .mamba_scores import SCORES, check_scan_values, sum_statistics


__all__ = [
    "SSD_STAT_KEYS",
    "merge_ssd_statistics",
    "nan_ssd_statistics",
    "ssd_energy_scores",
    "ssd_state_output_energy",
    "ssd_state_scores",
    "ssd_statistics",
]

SSD_STAT_KEYS: tuple[str, ...] = ("count", "decay_sum", "ctrl_sum", "obs_sum")
"""Keys of the dicts returned by :func:`ssd_statistics`."""


def _check_projections(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> tuple[int, ...]:
    if u.ndim != 4:
        raise ValueError(f"u must have shape (batch, length, H, P); got {tuple(u.shape)}.")
    bsz, length, heads, _ = u.shape
    if tuple(delta.shape) != (bsz, length, heads):
        raise ValueError(
            f"delta must have shape (batch, length, H) = {(bsz, length, heads)}; got {tuple(delta.shape)}."
        )
    if tuple(A.shape) != (heads,):
        raise ValueError(f"A must have shape (H,) = ({heads},); got {tuple(A.shape)}.")
    if B.ndim != 4 or tuple(B.shape[:2]) != (bsz, length) or B.shape != C.shape:
        raise ValueError(
            f"B and C must both have shape (batch, length, G, N) with batch, length = {(bsz, length)}; "
            f"got {tuple(B.shape)} and {tuple(C.shape)}."
        )
    groups = B.shape[2]
    if heads % groups:
        raise ValueError(f"H={heads} heads cannot be split into G={groups} groups of B/C.")
    check_scan_values(u, delta, A, B, C, "softplus(dt + dt_bias)")
    return bsz, length, heads, groups


def _valid_tokens(mask: Tensor | None, bsz: int, length: int, device) -> Tensor | None:
    if mask is None:
        return None
    mask = torch.as_tensor(mask, device=device)
    if tuple(mask.shape) != (bsz, length):
        raise ValueError(f"mask must have shape (batch, length) = {(bsz, length)}; got {tuple(mask.shape)}.")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("mask must contain only 0 and 1 (1 = real token, 0 = padding).")
    return mask.reshape(-1).bool()


def ssd_statistics(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, mask: Tensor | None = None
) -> dict[str, Tensor]:
    """Additive calibration sums of one Mamba-2 mixer; projections only, no scan.

    Args:
        u: ``(batch, length, H, P)`` post-conv SiLU activations of the ``x`` part, per head.
        delta: ``(batch, length, H)`` time step after softplus (and the mixer's clamp), ``≥ 0``.
        A: ``(H,)`` continuous A, ``-exp(A_log)`` (strictly negative).
        B, C: ``(batch, length, G, N)`` input-dependent projections; head h reads group ``h // (H / G)``.
        mask: optional ``(batch, length)`` of 0/1 (or bool); 0 excludes a token (padding).
    Returns:
        float64 sums over valid tokens: ``count`` (scalar), ``decay_sum`` ``(H,)`` = ``Σ exp(Δ_h A_h)``,
        ``ctrl_sum`` ``(H, P, N)`` = ``Σ (Δ_h u_hp B_{g(h)n})²``, ``obs_sum`` ``(G, N)`` = ``Σ C_gn²``.
    """
    u, delta, A, B, C = (torch.as_tensor(x) for x in (u, delta, A, B, C))
    bsz, length, heads, groups = _check_projections(u, delta, A, B, C)
    head_dim, size = u.shape[-1], B.shape[-1]
    f64 = torch.float64
    u2 = u.reshape(-1, heads, head_dim).to(f64)
    dl2 = delta.reshape(-1, heads).to(f64)
    B2, C2 = (x.reshape(-1, groups, size).to(f64) for x in (B, C))
    keep = _valid_tokens(mask, bsz, length, u.device)
    if keep is not None:
        u2, dl2, B2, C2 = u2[keep], dl2[keep], B2[keep], C2[keep]
    tokens = dl2.shape[0]
    count = torch.tensor(float(tokens), dtype=f64, device=u.device)
    # Σ exp(ΔA) = count + Σ expm1(ΔA): keeps the deficit 1 − ā to relative precision for slow heads.
    decay_sum = count + torch.expm1(dl2 * A.to(f64)).sum(0)
    du2 = (dl2[..., None] * u2).square().reshape(tokens, groups, (heads // groups) * head_dim)
    ctrl_sum = torch.einsum("tgd,tgn->gdn", du2, B2.square()).reshape(heads, head_dim, size)
    obs_sum = C2.square().sum(0)
    return {"count": count, "decay_sum": decay_sum, "ctrl_sum": ctrl_sum, "obs_sum": obs_sum}


def nan_ssd_statistics(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> dict[str, Tensor]:
    """Statistics of the shapes :func:`ssd_statistics` gives for these projections, filled with NaN: they mark a
    layer whose batch had non-finite values (float64, on ``u``'s device)."""
    heads, head_dim = u.shape[-2:]
    groups, size = B.shape[-2:]
    nan, f64, device = float("nan"), torch.float64, u.device
    return {
        "count": torch.full((), nan, dtype=f64, device=device),
        "decay_sum": torch.full((heads,), nan, dtype=f64, device=device),
        "ctrl_sum": torch.full((heads, head_dim, size), nan, dtype=f64, device=device),
        "obs_sum": torch.full((groups, size), nan, dtype=f64, device=device),
    }


def _check_stats(name: str, stats: Mapping[str, Tensor]) -> tuple[int, int, int, int]:
    if not isinstance(stats, Mapping) or set(stats.keys()) != set(SSD_STAT_KEYS):
        got = sorted(stats.keys()) if isinstance(stats, Mapping) else type(stats).__name__
        raise ValueError(f"{name} must be a dict with keys {list(SSD_STAT_KEYS)} from ssd_statistics; got {got}.")
    ctrl, obs, decay = stats["ctrl_sum"], stats["obs_sum"], stats["decay_sum"]
    if ctrl.ndim != 3 or obs.ndim != 2 or tuple(decay.shape) != tuple(ctrl.shape[:1]) or ctrl.shape[2] != obs.shape[1]:
        raise ValueError(
            f"{name} has inconsistent shapes: decay_sum {tuple(decay.shape)}, ctrl_sum {tuple(ctrl.shape)}, "
            f"obs_sum {tuple(obs.shape)}; expected (H,), (H, P, N), (G, N)."
        )
    heads, head_dim, size = ctrl.shape
    if heads % obs.shape[0]:
        raise ValueError(f"{name}: H={heads} heads cannot be split into G={obs.shape[0]} groups.")
    if stats["count"].numel() != 1:
        raise ValueError(f"{name}['count'] must be a scalar; got shape {tuple(stats['count'].shape)}.")
    return heads, head_dim, obs.shape[0], size


def merge_ssd_statistics(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Key-wise sum of two :func:`ssd_statistics` dicts (same layer, same shapes)."""
    _check_stats("a", a)
    _check_stats("b", b)
    return sum_statistics(a, b, SSD_STAT_KEYS)


def ssd_state_scores(stats: Mapping[str, Tensor], score: str = "h2") -> Tensor:
    """One importance score per state ``(g, n)`` from summed statistics (docs/method_mamba2.md).

    Per head h: ``ā_h = decay_sum_h / count`` clamped into ``(0, 1 − 1e-12]``; per channel ``(h, p)`` and state
    ``n``: ``P_hpn = (ctrl_sum_hpn / count) / (1 − ā_h²)``; per state: ``c²_gn = obs_sum_gn / count``.

    * ``"h2"``: ``s_gn = Σ_{h∈g} Σ_p sqrt(P_hpn c²_gn)`` (one-mode H2 norm, ``|b c| / sqrt(1 − ā²)``).
    * ``"hankel"``: ``s_gn = Σ_{h∈g} Σ_p sqrt(P_hpn c²_gn / (1 − ā_h²))`` (one-mode HSV, ``|b c| / (1 − ā²)``).

    Returns:
        ``(G, N)`` float64, ≥ 0.
    """
    if score not in SCORES:
        raise ValueError(
            f"unknown score {score!r}; valid: {', '.join(SCORES)} "
            "(random / smallest are selections: see select_indices)."
        )
    heads, head_dim, groups, size = _check_stats("stats", stats)
    f64 = torch.float64
    count = stats["count"].to(f64).reshape(())
    if not bool(count > 0):
        raise ValueError("stats['count'] is 0: no calibration tokens were seen; run ssd_statistics on data.")
    for k in SSD_STAT_KEYS:
        check_finite(f"stats['{k}']", stats[k])
    a_bar = (stats["decay_sum"].to(f64) / count).clamp(torch.finfo(f64).tiny, 1 - 1e-12)
    one_m = (1 - a_bar.square())[:, None, None]  # (H, 1, 1)
    P = (stats["ctrl_sum"].to(f64) / count).clamp_min(0) / one_m  # (H, P, N)
    c2 = (stats["obs_sum"].to(f64) / count).clamp_min(0).repeat_interleave(heads // groups, dim=0)  # (H, N)
    per = P * c2[:, None, :]
    if score == "hankel":
        per = per / one_m
    return per.sqrt().reshape(groups, (heads // groups) * head_dim, size).sum(1)


@torch.no_grad()
def ssd_state_output_energy(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Sum over batch and valid time steps of ``(C_{t,g(h),n} h_{t,h,p,n})²`` from the exact recurrence
    ``h_t = exp(Δ_{t,h} A_h) h_{t−1} + Δ_{t,h} u_{t,h,p} B_{t,g(h),:}`` (float64, one step at a time).

    Shapes as in :func:`ssd_statistics`; a masked token neither updates the state nor counts.
    Returns:
        ``(sum_sq, count)``: ``(H, P, N)`` float64 sums and the float64 number of counted tokens.
    """
    bsz, length, heads, groups = _check_projections(*(torch.as_tensor(x) for x in (u, delta, A, B, C)))
    f64 = torch.float64
    u, delta, A, B, C = (torch.as_tensor(x).to(f64) for x in (u, delta, A, B, C))
    per_group = heads // groups
    B, C = (x.repeat_interleave(per_group, dim=2) for x in (B, C))  # (b, L, H, N)
    state = torch.zeros(bsz, heads, u.shape[-1], B.shape[-1], dtype=f64, device=u.device)
    sum_sq = torch.zeros(state.shape[1:], dtype=f64, device=u.device)
    m = torch.ones(bsz, length, dtype=f64, device=u.device) if mask is None else torch.as_tensor(mask).to(f64)
    for t in range(length):
        keep = m[:, t, None, None, None]
        decay = torch.exp(delta[:, t] * A)[:, :, None, None]  # (b, H, 1, 1)
        update = decay * state + (delta[:, t, :, None] * u[:, t])[..., None] * B[:, t, :, None, :]
        state = keep * update + (1 - keep) * state
        sum_sq += (keep * (C[:, t, :, None, :] * state).square()).sum(0)
    return sum_sq, m.sum()


def ssd_energy_scores(sum_sq: Tensor, count: Tensor | float, groups: int) -> Tensor:
    """Scan-measured scores ``s_gn = Σ_{h∈g} Σ_p sqrt(mean_t (C_{t,g,n} h_{t,h,p,n})²)``, ``(G, N)``, from the sums
    of :func:`ssd_state_output_energy` (the measured counterpart of the ``h2`` score)."""
    heads, head_dim, size = sum_sq.shape
    return (sum_sq / float(count)).sqrt().reshape(groups, (heads // groups) * head_dim, size).sum(1)
