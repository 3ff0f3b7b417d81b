"""Hankel analysis for state-space layers (METHOD.md §2–4).

Pure functions on torch tensors; no ``nn.Module`` and no model imports. Everything is computed in
float64 / complex128 internally and returned on the input device.

LTI (diagonal) systems, ``A = diag(poles)``:

* :func:`diagonal_gramians` — closed-form controllability / observability Gramians ``(P, Q)``.
* :func:`hankel_singular_values` — ``σ = sqrt(eig(P Q))``, sorted descending.
* :func:`balanced_truncation` / :func:`rediagonalize` — square-root balanced truncation and the way
  back to a diagonal parameterisation.
* :func:`hankel_nuclear_norm` — differentiable ``Σσ`` (regulariser of the Hankel-nuclear-norm
  baseline).

Selective (Mamba-1) layers:

* :func:`selective_statistics` / :func:`merge_statistics` — additive calibration sums.
* :func:`selective_state_scores` — one importance score per state index.

Rank choice (both families): :func:`select_rank` (τ = fraction of Σσ discarded, 0.95 gate) and
:func:`select_indices` (``largest`` / ``smallest`` / ``random``).

Shapes: ``poles`` is ``(..., N)``, ``B`` is ``(..., N, m)``, ``C`` is ``(..., p, N)``; the leading
dimensions broadcast against each other.
"""

from __future__ import annotations

import math
import operator
from typing import Mapping, Sequence

import torch
from torch import Tensor

__all__ = [
    "SCORES",
    "SELECTIONS",
    "STAT_KEYS",
    "diagonal_gramians",
    "hankel_singular_values",
    "balanced_truncation",
    "rediagonalize",
    "hankel_nuclear_norm",
    "select_rank",
    "select_indices",
    "selective_statistics",
    "merge_statistics",
    "selective_state_scores",
]

SCORES: tuple[str, ...] = ("hankel", "h2")
"""Valid ``score`` names for :func:`selective_state_scores`."""

SELECTIONS: tuple[str, ...] = ("largest", "smallest", "random")
"""Valid ``selection`` names for :func:`select_indices`."""

STAT_KEYS: tuple[str, ...] = ("count", "decay_sum", "ctrl_sum", "obs_sum")
"""Keys of the dicts returned by :func:`selective_statistics`."""

_DEFAULT_CHUNK_ELEMENTS = 1 << 22  # float64 elements per (tokens, D, N) chunk: 32 MiB


# ----------------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------------
def _check_finite(name: str, x: Tensor) -> None:
    if not bool(torch.isfinite(x.detach()).all()):
        raise ValueError(f"{name} contains NaN or Inf; pass finite values.")


def _as_system(poles: Tensor, B: Tensor, C: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Validate a diagonal system and promote it to a common float64 / complex128 dtype."""
    poles, B, C = torch.as_tensor(poles), torch.as_tensor(B), torch.as_tensor(C)
    if poles.ndim < 1:
        raise ValueError(f"poles must have shape (..., N); got a scalar of shape {tuple(poles.shape)}.")
    if B.ndim < 2:
        raise ValueError(f"B must have shape (..., N, m); got shape {tuple(B.shape)}.")
    if C.ndim < 2:
        raise ValueError(f"C must have shape (..., p, N); got shape {tuple(C.shape)}.")
    n = poles.shape[-1]
    if n < 1:
        raise ValueError("poles must hold at least one pole (N >= 1).")
    if B.shape[-2] != n:
        raise ValueError(
            f"B has shape {tuple(B.shape)} but poles has N={n}; B must be (..., N, m) with B.shape[-2] == N."
        )
    if C.shape[-1] != n:
        raise ValueError(
            f"C has shape {tuple(C.shape)} but poles has N={n}; C must be (..., p, N) with C.shape[-1] == N."
        )
    try:
        torch.broadcast_shapes(poles.shape[:-1], B.shape[:-2], C.shape[:-2])
    except RuntimeError as exc:
        raise ValueError(
            f"leading (batch) dimensions of poles {tuple(poles.shape[:-1])}, B {tuple(B.shape[:-2])} and "
            f"C {tuple(C.shape[:-2])} do not broadcast; make them equal or 1."
        ) from exc
    for name, x in (("poles", poles), ("B", B), ("C", C)):
        _check_finite(name, x)
    mag = poles.detach().abs()
    if bool((mag >= 1).any()):
        raise ValueError(
            f"poles must satisfy |pole| < 1 (stable discrete-time system); max |pole| = {float(mag.max()):.6g}. "
            "Pass the discretised poles of a stable layer."
        )
    dtype = torch.complex128 if any(x.is_complex() for x in (poles, B, C)) else torch.float64
    return poles.to(dtype), B.to(dtype), C.to(dtype)


def _check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer; got {value!r}.")
    try:
        v = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer; got {value!r}.") from None
    if v < low or (high is not None and v > high):
        rng = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be in {rng}; got {v}.")
    return v


def _check_fraction(name: str, value: object, low: float, high: float, closed_low: bool, closed_high: bool,
                    meaning: str) -> float:
    bad = isinstance(value, (bool, str, bytes))
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, RuntimeError):
        bad, v = True, math.nan
    ok_low = v >= low if closed_low else v > low
    ok_high = v <= high if closed_high else v < high
    if bad or not math.isfinite(v) or not (ok_low and ok_high):
        rng = ("[" if closed_low else "(") + f"{low:g}, {high:g}" + ("]" if closed_high else ")")
        raise ValueError(f"{name} ({meaning}) must be in {rng}; got {value!r}.")
    return v


def _hermitian(x: Tensor) -> Tensor:
    return x.mH if x.is_complex() else x.mT


# ----------------------------------------------------------------------------------------------
# LTI systems
# ----------------------------------------------------------------------------------------------
def diagonal_gramians(poles: Tensor, B: Tensor, C: Tensor) -> tuple[Tensor, Tensor]:
    """Closed-form Gramians of ``x_{k+1} = diag(poles) x_k + B u_k``, ``y_k = C x_k``.

    ``P_ij = (B B^H)_ij / (1 − λ_i conj(λ_j))`` (controllability, ``P = A P A^H + B B^H``) and
    ``Q_ij = (C^H C)_ij / (1 − conj(λ_i) λ_j)`` (observability, ``Q = A^H Q A + C^H C``).

    Args:
        poles: ``(..., N)`` real or complex, ``|pole| < 1``.
        B: ``(..., N, m)``.  C: ``(..., p, N)``.
    Returns:
        ``(P, Q)``, each ``(..., N, N)``, Hermitian PSD; float64 for real inputs, complex128 if any input
        is complex. Differentiable.
    """
    lam, B, C = _as_system(poles, B, C)
    lam_c = lam.conj() if lam.is_complex() else lam
    bbh = B @ _hermitian(B)
    chc = _hermitian(C) @ C
    P = bbh / (1 - lam.unsqueeze(-1) * lam_c.unsqueeze(-2))
    Q = chc / (1 - lam_c.unsqueeze(-1) * lam.unsqueeze(-2))
    return P, Q


def _psd_factor(M: Tensor) -> Tensor:
    """``L`` with ``L L^H = M`` for Hermitian PSD ``M`` (..., N, N): Cholesky, falling back per batch
    member to an eigendecomposition factor (negative eigenvalues clamped to 0) where Cholesky fails
    because ``M`` is singular to working precision."""
    L, info = torch.linalg.cholesky_ex(M)
    bad = info != 0
    if bool(bad.any()):
        w, U = torch.linalg.eigh(M)
        Le = U * w.clamp_min(0).sqrt().to(U.dtype).unsqueeze(-2)
        L = torch.where(bad[..., None, None], Le, L)
    return L


def _balanced_svd(poles: Tensor, B: Tensor, C: Tensor):
    P, Q = diagonal_gramians(poles, B, C)
    Lc, Lo = _psd_factor(P), _psd_factor(Q)
    U, s, Vh = torch.linalg.svd(_hermitian(Lo) @ Lc)
    return Lc, Lo, U, s, Vh


def hankel_singular_values(poles: Tensor, B: Tensor, C: Tensor) -> Tensor:
    """Hankel singular values ``σ = sqrt(eig(P Q))`` of the diagonal system, sorted descending.

    Computed as the singular values of ``Lo^H Lc`` (``P = Lc Lc^H``, ``Q = Lo Lo^H``), which equals
    ``sqrt(eig(P Q))`` and is ≥ 0 by construction. Invariant under state-coordinate changes.

    Args: as :func:`diagonal_gramians`.
    Returns: ``(..., N)`` float64, descending, ≥ 0.
    """
    *_, s, _ = _balanced_svd(poles, B, C)
    return s.clamp_min(0)


def balanced_truncation(poles: Tensor, B: Tensor, C: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Square-root balanced truncation of the diagonal system to ``rank`` states.

    ``Lc = chol(P)``, ``Lo = chol(Q)`` (an exact PSD factor is used where Cholesky fails),
    ``svd(Lo^H Lc) = U Σ V^H``, ``T = Lc V Σ^{-1/2}``, ``T^{-1} = Σ^{-1/2} U^H Lo^H``; keeps the leading
    ``rank`` balanced states: ``A_r = T_r^{-1} A T_r``, ``B_r = T_r^{-1} B``, ``C_r = C T_r``. The result is
    stable and satisfies ``‖G − G_r‖_∞ ≤ 2 Σ_{i>rank} σ_i`` when ``σ_rank > σ_{rank+1}``.

    Args:
        poles, B, C: as :func:`diagonal_gramians`.
        rank: number of states kept, ``1 ≤ rank ≤ N``; ``σ_rank`` must be numerically non-zero.
    Returns:
        ``(A_r, B_r, C_r)`` of shapes ``(..., r, r)``, ``(..., r, m)``, ``(..., p, r)``; dense, float64 for
        real inputs, complex128 otherwise. Use :func:`rediagonalize` to return to diagonal form.
    """
    lam, B, C = _as_system(poles, B, C)
    n = lam.shape[-1]
    r = _check_int("rank", rank, 1, n)
    Lc, Lo, U, s, Vh = _balanced_svd(lam, B, C)
    s_r = s[..., r - 1]
    floor = s[..., 0] * (n * torch.finfo(torch.float64).eps)
    if bool((s_r <= floor).any()) or bool((s_r <= 0).any()):
        nonzero = int((s > floor.unsqueeze(-1)).sum(-1).min())
        raise ValueError(
            f"rank={r} exceeds the numerical order of the system (σ_rank is zero to working precision); "
            f"choose rank <= {max(nonzero, 1)}."
        )
    inv_sqrt = s[..., :r].rsqrt().to(lam.dtype)
    T = (Lc @ _hermitian(Vh)[..., :r]) * inv_sqrt.unsqueeze(-2)  # (..., N, r)
    Ti = inv_sqrt.unsqueeze(-1) * (_hermitian(U)[..., :r, :] @ _hermitian(Lo))  # (..., r, N)
    A_r = (Ti * lam.unsqueeze(-2)) @ T  # Ti diag(λ) T
    return A_r, Ti @ B, C @ T


def rediagonalize(A_r: Tensor, B_r: Tensor, C_r: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Back to diagonal form: ``A_r = V diag(λ) V^{-1}``, ``B' = V^{-1} B_r``, ``C' = C_r V``.

    Args:
        A_r: ``(..., r, r)`` (diagonalisable).  B_r: ``(..., r, m)``.  C_r: ``(..., p, r)``.
    Returns:
        ``(poles, B', C')`` of shapes ``(..., r)``, ``(..., r, m)``, ``(..., p, r)``, always complex128
        (take ``.real`` where the poles are known to be real). The transfer function is unchanged.
    """
    A_r, B_r, C_r = torch.as_tensor(A_r), torch.as_tensor(B_r), torch.as_tensor(C_r)
    if A_r.ndim < 2 or A_r.shape[-1] != A_r.shape[-2]:
        raise ValueError(f"A_r must be square with shape (..., r, r); got {tuple(A_r.shape)}.")
    r = A_r.shape[-1]
    if B_r.ndim < 2 or B_r.shape[-2] != r:
        raise ValueError(f"B_r must have shape (..., r, m) with r={r}; got {tuple(B_r.shape)}.")
    if C_r.ndim < 2 or C_r.shape[-1] != r:
        raise ValueError(f"C_r must have shape (..., p, r) with r={r}; got {tuple(C_r.shape)}.")
    for name, x in (("A_r", A_r), ("B_r", B_r), ("C_r", C_r)):
        _check_finite(name, x)
    lam, V = torch.linalg.eig(A_r.to(torch.complex128))
    B_new = torch.linalg.solve(V, B_r.to(torch.complex128))
    C_new = C_r.to(torch.complex128) @ V
    return lam, B_new, C_new


def hankel_nuclear_norm(poles: Tensor, B: Tensor, C: Tensor) -> Tensor:
    """Differentiable Hankel nuclear norm ``Σσ`` (the regulariser of the Hankel-nuclear-norm baseline).

    ``Σσ = ‖Lo^H Lc‖_*`` with Cholesky factors of the closed-form Gramians; gradients flow to ``poles``,
    ``B`` and ``C`` (real or complex). If a Gramian is singular to working precision, a jitter
    ``ε·mean(diag)·I`` (ε from 1e-14 up to 1e-6) is added so the Cholesky factor, and its gradient, exist.

    Args: as :func:`diagonal_gramians`.
    Returns: ``(...)`` float64, equal to ``hankel_singular_values(...).sum(-1)``.
    """
    P, Q = diagonal_gramians(poles, B, C)
    Lc, Lo = _jittered_cholesky(P), _jittered_cholesky(Q)
    return torch.linalg.svdvals(_hermitian(Lo) @ Lc).sum(-1)


def _jittered_cholesky(M: Tensor) -> Tensor:
    L, info = torch.linalg.cholesky_ex(M)
    if not bool((info != 0).any()):
        return L
    n = M.shape[-1]
    eye = torch.eye(n, dtype=M.dtype, device=M.device)
    scale = torch.diagonal(M.detach(), dim1=-2, dim2=-1).real.mean(-1).clamp_min(torch.finfo(torch.float64).tiny)
    for eps in (1e-14, 1e-12, 1e-10, 1e-8, 1e-6):
        L, info = torch.linalg.cholesky_ex(M + (eps * scale)[..., None, None] * eye)
        if not bool((info != 0).any()):
            return L
    raise ValueError("a Gramian is not positive semi-definite even with jitter; check poles, B and C.")


# ----------------------------------------------------------------------------------------------
# Rank and index selection
# ----------------------------------------------------------------------------------------------
def _as_scores(scores: Tensor | Sequence[float]) -> Tensor:
    s = torch.as_tensor(scores)
    if s.is_complex():
        raise ValueError("scores must be real; got a complex tensor.")
    s = s.detach().to(torch.float64)
    if s.ndim != 1 or s.numel() < 1:
        raise ValueError(f"scores must be a non-empty 1-D tensor (one score per state); got shape {tuple(s.shape)}.")
    _check_finite("scores", s)
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
    """Number of states to keep under the energy rule of METHOD §4.

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
    current = _check_int("current_size", current_size, n)
    tau = _check_fraction("tau", tau, 0.0, 1.0, True, False, "fraction of Hankel energy discarded")
    gate = _check_fraction("gate", gate, 0.0, 1.0, False, True, "reduce only if r < gate * current_size")
    min_size = _check_int("min_size", min_size, 1)
    multiple_of = _check_int("multiple_of", multiple_of, 1)

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
    r = _check_int("rank", rank, 1, n)
    if selection == "random":
        gen_device = generator.device if generator is not None else torch.device("cpu")
        idx = torch.randperm(n, generator=generator, device=gen_device)[:r]
    else:
        order = torch.argsort(s, descending=(selection == "largest"), stable=True)
        idx = order[:r]
    return torch.sort(idx).values.to(device=device, dtype=torch.long)


# ----------------------------------------------------------------------------------------------
# Selective (Mamba-1) importance
# ----------------------------------------------------------------------------------------------
def selective_statistics(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    mask: Tensor | None = None,
    chunk_size: int | None = None,
) -> dict[str, Tensor]:
    """Additive calibration sums of one Mamba-1 mixer (METHOD §3); projections only, no scan.

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
    for name, x in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)):
        if x.is_complex():
            raise ValueError(f"{name} must be real; got a complex tensor.")
        _check_finite(name, x)
    if bool((A >= 0).any()):
        raise ValueError("A must be strictly negative (pass the continuous A = -exp(A_log), not A_log).")
    if bool((delta < 0).any()):
        raise ValueError("delta must be >= 0 (pass softplus(dt_proj(δ) + dt_bias), not the raw projection).")
    if chunk_size is not None:
        chunk_size = _check_int("chunk_size", chunk_size, 1)

    f64 = torch.float64
    u2, dl2, B2, C2 = (x.reshape(-1, x.shape[-1]) for x in (u, delta, B, C))
    if mask is not None:
        mask = torch.as_tensor(mask, device=u.device)
        if tuple(mask.shape) != (bsz, length):
            raise ValueError(f"mask must have shape (batch, length) = {(bsz, length)}; got {tuple(mask.shape)}.")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask must contain only 0 and 1 (1 = real token, 0 = padding).")
        keep = mask.reshape(-1).bool()
        u2, dl2, B2, C2 = u2[keep], dl2[keep], B2[keep], C2[keep]
    dl2 = dl2.to(f64)
    A = A.to(f64)
    du2 = (dl2 * u2.to(f64)).square()  # (T, D)
    ctrl_sum = du2.mT @ B2.to(f64).square()  # (D, N) = Σ_t (Δu)²_td B²_tn
    obs_sum = C2.to(f64).square().sum(0)
    tokens = dl2.shape[0]
    if chunk_size is None:
        chunk_size = max(1, _DEFAULT_CHUNK_ELEMENTS // max(1, d * n))
    # Σ exp(ΔA) = count + Σ expm1(ΔA). The (tokens, D, N) term is the cost of calibration: it is evaluated in the
    # inputs' precision (float32 for float32 models, ~6x faster than float64) with expm1, which keeps the *deficit*
    # 1 − exp(ΔA) to relative precision even for slow modes (ā → 1, where 1/(1 − ā²) dominates the scores), and each
    # chunk's partial sum is accumulated in float64.
    work = torch.promote_types(delta.dtype, torch.float32)
    dl_work, A_work = dl2.to(work), A.to(work)
    deficit = torch.zeros(d, n, dtype=f64, device=u.device)
    for start in range(0, tokens, chunk_size):
        chunk = dl_work[start : start + chunk_size]
        deficit += torch.expm1(chunk.unsqueeze(-1) * A_work).sum(0).to(f64)
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


def merge_statistics(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Key-wise sum of two :func:`selective_statistics` dicts (same layer, same shapes)."""
    _check_stats("a", a)
    _check_stats("b", b)
    for k in STAT_KEYS:
        if a[k].shape != b[k].shape:
            raise ValueError(f"cannot merge statistics of different layers: {k} has shapes {tuple(a[k].shape)} "
                             f"and {tuple(b[k].shape)}.")
    return {k: a[k] + b[k].to(device=a[k].device, dtype=a[k].dtype) for k in STAT_KEYS}


def selective_state_scores(stats: Mapping[str, Tensor], score: str = "h2") -> Tensor:
    """One importance score per state index from summed statistics (METHOD §3).

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
        raise ValueError(f"unknown score {score!r}; valid: {', '.join(SCORES)} "
                         "(random / smallest are selections: see select_indices).")
    _check_stats("stats", stats)
    f64 = torch.float64
    count = stats["count"].to(f64).reshape(())
    if not bool(count > 0):
        raise ValueError("stats['count'] is 0: no calibration tokens were seen; run selective_statistics on data.")
    for k in STAT_KEYS:
        _check_finite(f"stats['{k}']", stats[k])
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
