"""Hankel analysis of linear time-invariant state-space layers with diagonal state matrix ``A = diag(poles)``.

Pure functions on torch tensors, computed in float64 / complex128 and returned on the input device:

* :func:`diagonal_gramians` — closed-form controllability / observability Gramians ``(P, Q)``.
* :func:`hankel_singular_values` — ``σ = sqrt(eig(P Q))``, sorted descending.
* :func:`balanced_truncation` / :func:`rediagonalize` — square-root balanced truncation and the way back to a
  diagonal parameterisation.
* :func:`hankel_nuclear_norm` — differentiable ``Σσ`` (regulariser of the Hankel-nuclear-norm baseline).

Shapes: ``poles`` is ``(..., N)``, ``B`` is ``(..., N, m)``, ``C`` is ``(..., p, N)``; the leading dimensions
broadcast against each other. The theory is summarised in ``docs/method.md`` §2.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .checks import check_finite, check_int


__all__ = [
    "diagonal_gramians",
    "hankel_singular_values",
    "balanced_truncation",
    "rediagonalize",
    "hankel_nuclear_norm",
]


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
        check_finite(name, x)
    mag = poles.detach().abs()
    if bool((mag >= 1).any()):
        raise ValueError(
            f"poles must satisfy |pole| < 1 (stable discrete-time system); max |pole| = {float(mag.max()):.6g}. "
            "Pass the discretised poles of a stable layer."
        )
    dtype = torch.complex128 if any(x.is_complex() for x in (poles, B, C)) else torch.float64
    return poles.to(dtype), B.to(dtype), C.to(dtype)


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
    r = check_int("rank", rank, 1, n)
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
        check_finite(name, x)
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
