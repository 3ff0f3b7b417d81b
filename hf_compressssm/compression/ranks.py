"""Rank rules: how many states each layer keeps, and which ones, for every compression mode.

Pure functions on score vectors (no model). ``tolerance`` mode keeps the smallest rank holding ``1 − τ`` of the
score energy (:func:`select_rank`); ``fixed`` and ``pragmatic`` remove a fixed fraction (:func:`fixed_fraction_rank`);
an explicit target (:func:`target_rank`) serves ``compress_model(target_sizes=...)``. :func:`layer_rank` applies the
rule of a mode with the 0.95 gate. :func:`select_indices` picks the kept indices (``largest`` / ``smallest`` /
``random``). The rules are summarised in ``docs/method.md`` §4.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .checks import check_finite, check_fraction, check_int


__all__ = [
    "SELECTIONS",
    "fixed_fraction_rank",
    "group_profile",
    "layer_rank",
    "select_group_indices",
    "select_indices",
    "select_rank",
]

SELECTIONS: tuple[str, ...] = ("largest", "smallest", "random")
"""Valid ``selection`` names for :func:`select_indices`."""


def _as_scores(scores: Tensor | Sequence[float]) -> Tensor:
    s = torch.as_tensor(scores)
    if s.is_complex():
        raise ValueError("scores must be real; got a complex tensor.")
    s = s.detach().to(torch.float64)
    if s.ndim != 1 or s.numel() < 1:
        raise ValueError(f"scores must be a non-empty 1-D tensor (one score per state); got shape {tuple(s.shape)}.")
    check_finite("scores", s)
    if bool((s < 0).any()):
        raise ValueError("scores must be >= 0 (Hankel singular values or energy scores); got negative entries.")
    return s


def select_rank(
    scores: Tensor | Sequence[float],
    tau: float,
    current_size: int | None = None,
    gate: float = 0.95,
    min_size: int = 1,
    multiple_of: int = 1,
) -> int:
    """Number of states to keep under the energy rule of docs/method.md §4.

    ``τ`` is the fraction of energy **discarded**, energy = plain ``Σσ``. Steps:

    1. ``r = min{k : Σ_{i≤k} σ_(i) ≥ (1 − τ) Σσ}`` over scores sorted descending (relative slack 1e-12
       against rounding). ``τ = 0`` keeps every state (``r = current_size``), zero-score states included.
       All-zero scores give ``r = 0`` here, hence ``min_size`` after step 2.
    2. ``r = max(r, min_size)``, then rounded up to a multiple of ``multiple_of``; never above
       ``current_size``.
    3. Gate: if ``r ≥ gate · current_size`` the layer is not reduced and ``current_size`` is returned.

    Args:
        scores: ``(N,)`` non-negative scores (HSVs or selective scores), any order.
        tau: in ``[0, 1)``.
        current_size: present state size (default ``N``); must be ``≥ N``.
        gate: in ``(0, 1]``.  min_size: ``≥ 1``.  multiple_of: ``≥ 1``.
    Returns:
        int in ``[min(min_size, current_size), current_size]``.
    """
    s = _as_scores(scores)
    n = s.numel()
    if current_size is None:
        current_size = n
    current = check_int("current_size", current_size, n)
    tau = check_fraction("tau", tau, 0.0, 1.0, True, False, "fraction of Hankel energy discarded")
    gate = check_fraction("gate", gate, 0.0, 1.0, False, True, "reduce only if r < gate * current_size")
    min_size = check_int("min_size", min_size, 1)
    multiple_of = check_int("multiple_of", multiple_of, 1)

    if tau == 0:
        r = current
    else:
        cum = torch.sort(s, descending=True).values.cumsum(0)
        total = float(cum[-1])
        if total <= 0:
            r = 0
        else:
            target = (1.0 - float(tau)) * total * (1.0 - 1e-12)
            r = int((cum < target).sum()) + 1
    r = max(r, min_size)
    r = -(-r // multiple_of) * multiple_of
    r = min(r, current)
    if r >= gate * current:
        return current
    return r


def select_indices(
    scores: Tensor | Sequence[float],
    rank: int,
    selection: str = "largest",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Indices of the ``rank`` states to keep, in ascending (original) order.

    Args:
        scores: ``(N,)`` non-negative scores.
        rank: ``1 ≤ rank ≤ N``.
        selection: ``"largest"`` (keep the highest scores; ties go to the lower index), ``"smallest"``
            (ablation), or ``"random"`` (ablation; uniform without replacement, reproducible with
            ``generator``, a CPU generator).
    Returns:
        ``(rank,)`` int64 on the device of ``scores``, sorted ascending.
    """
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection {selection!r}; valid: {', '.join(SELECTIONS)}.")
    device = scores.device if isinstance(scores, Tensor) else torch.device("cpu")
    s = _as_scores(scores)
    n = s.numel()
    r = check_int("rank", rank, 1, n)
    if selection == "random":
        gen_device = generator.device if generator is not None else torch.device("cpu")
        idx = torch.randperm(n, generator=generator, device=gen_device)[:r]
    else:
        order = torch.argsort(s, descending=(selection == "largest"), stable=True)
        idx = order[:r]
    return torch.sort(idx).values.to(device=device, dtype=torch.long)


def fixed_fraction_rank(current_size: int, fraction: float, min_size: int = 1, multiple_of: int = 1) -> int:
    """Rank after removing ``fraction`` of ``current_size`` states: ``ceil(N (1 − f))``, ≥ min_size, rounded up."""
    r = max(int(min_size), math.ceil(current_size * (1.0 - fraction)))
    r = -(-r // multiple_of) * multiple_of
    return min(r, current_size)


def group_profile(scores: Tensor) -> Tensor:
    """``(N,)`` energy profile of grouped scores ``(G, N)``: entry i is the sum over groups of each group's i-th
    largest score. Keeping the top k of every group keeps the first k entries' sum, so :func:`select_rank` on the
    profile gives the smallest per-group k that holds ``1 − τ`` of the energy (for G = 1: the sorted scores)."""
    s = torch.as_tensor(scores)
    if s.ndim != 2 or s.numel() < 1:
        raise ValueError(f"grouped scores must have shape (groups, N); got {tuple(s.shape)}.")
    return torch.sort(s.detach().to(torch.float64), dim=-1, descending=True).values.sum(0)


def select_group_indices(
    scores: Tensor,
    rank: int,
    selection: str = "largest",
    generator: torch.Generator | None = None,
) -> Tensor:
    """:func:`select_indices` in every group of ``(G, N)`` scores: ``(G, rank)`` kept indices, rows ascending."""
    s = torch.as_tensor(scores)
    if s.ndim != 2:
        raise ValueError(f"grouped scores must have shape (groups, N); got {tuple(s.shape)}.")
    return torch.stack([select_indices(row, rank, selection, generator=generator) for row in s])


def layer_rank(scores: Tensor, size: int, args) -> int:
    """The rank one layer of present size ``size`` keeps under the mode of ``args`` (a `CompressionArguments`).

    ``tolerance``: :func:`select_rank` with τ (grouped ``(G, N)`` scores: on their :func:`group_profile`, the rank
    is then the count every group keeps); ``fixed`` / ``pragmatic``: :func:`fixed_fraction_rank`. In every mode a
    layer is left unchanged when the new rank is not below ``gate · size``.
    """
    if torch.as_tensor(scores).ndim == 2:
        scores = group_profile(scores)
    if args.mode == "tolerance":
        return select_rank(scores, args.tau, size, args.gate, args.min_state_size, args.multiple_of)
    rank = fixed_fraction_rank(size, args.fixed_fraction, args.min_state_size, args.multiple_of)
    return size if rank >= args.gate * size else rank
