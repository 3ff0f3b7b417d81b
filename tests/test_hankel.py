"""Tests for hf_compressssm.compression.hankel (LTI theory); scipy / numpy dense routes are the independent reference."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg as sla
import torch

from hf_compressssm.compression.hankel import (
    balanced_truncation,
    diagonal_gramians,
    hankel_nuclear_norm,
    hankel_singular_values,
    rediagonalize,
)


torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------
# helpers (numpy / scipy reference)
# ---------------------------------------------------------------------------------------------
def random_system(rng: np.random.Generator, n: int, m: int, p: int, complex_: bool, max_radius: float = 0.95):
    rad = rng.uniform(0.05, max_radius, n)
    if complex_:
        lam = rad * np.exp(1j * rng.uniform(-np.pi, np.pi, n))
        B = rng.standard_normal((n, m)) + 1j * rng.standard_normal((n, m))
        C = rng.standard_normal((p, n)) + 1j * rng.standard_normal((p, n))
    else:
        lam = rad * rng.choice([-1.0, 1.0], n)
        B = rng.standard_normal((n, m))
        C = rng.standard_normal((p, n))
    return lam, B, C


def t(x) -> torch.Tensor:
    return torch.as_tensor(x)


def dense_hsv(A: np.ndarray, B: np.ndarray, C: np.ndarray) -> np.ndarray:
    P = sla.solve_discrete_lyapunov(A, B @ B.conj().T)
    Q = sla.solve_discrete_lyapunov(A.conj().T, C.conj().T @ C)
    ev = np.linalg.eigvals(P @ Q).real
    return np.sort(np.sqrt(np.clip(ev, 0, None)))[::-1]


def tf_diagonal(lam, B, C, z):
    """G(z) = C (zI - diag(lam))^{-1} B on points z -> (len(z), p, m)."""
    return np.einsum("pn,wn,nm->wpm", C, 1.0 / (z[:, None] - lam[None, :]), B)


def tf_dense(A, B, C, z):
    eye = np.eye(A.shape[0])
    return np.stack([C @ np.linalg.solve(zz * eye - A, B) for zz in z])


def hinf_on_grid(G):
    return max(np.linalg.norm(Gk, 2) for Gk in G)


Z_GRID = np.exp(1j * np.linspace(0, 2 * np.pi, 1024, endpoint=False))


# ---------------------------------------------------------------------------------------------
# Gramians and HSVs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("m,p", [(1, 1), (3, 2)])
@pytest.mark.parametrize("seed", range(3))
def test_gramians_match_scipy_lyapunov(complex_, m, p, seed):
    rng = np.random.default_rng(seed)
    lam, B, C = random_system(rng, 7, m, p, complex_, max_radius=0.99)
    P, Q = diagonal_gramians(t(lam), t(B), t(C))
    A = np.diag(lam)
    P_ref = sla.solve_discrete_lyapunov(A, B @ B.conj().T)
    Q_ref = sla.solve_discrete_lyapunov(A.conj().T, C.conj().T @ C)
    assert P.dtype == (torch.complex128 if complex_ else torch.float64)
    for got, ref in ((P.numpy(), P_ref), (Q.numpy(), Q_ref)):
        assert np.linalg.norm(got - ref) <= 1e-8 * np.linalg.norm(ref)


def test_gramians_batched_and_broadcast():
    rng = np.random.default_rng(1)
    systems = [random_system(rng, 5, 2, 3, True) for _ in range(4)]
    lam = t(np.stack([s[0] for s in systems])).reshape(2, 2, 5)
    B = t(np.stack([s[1] for s in systems])).reshape(2, 2, 5, 2)
    C_shared = t(systems[0][2])  # (p, N): broadcasts over the batch
    P, Q = diagonal_gramians(lam, B, C_shared)
    assert P.shape == Q.shape == (2, 2, 5, 5)
    P1, Q1 = diagonal_gramians(lam[1, 0], B[1, 0], C_shared)
    torch.testing.assert_close(P[1, 0], P1)
    torch.testing.assert_close(Q[1, 0], Q1)
    s = hankel_singular_values(lam, B, C_shared)
    torch.testing.assert_close(s[0, 1], hankel_singular_values(lam[0, 1], B[0, 1], C_shared))


@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_hsv_invariant_under_similarity(complex_, seed):
    rng = np.random.default_rng(100 + seed)
    n = 6
    lam, B, C = random_system(rng, n, 2, 2, complex_)
    s = hankel_singular_values(t(lam), t(B), t(C)).numpy()
    assert np.all(s >= 0) and np.all(np.diff(s) <= 0)
    T = np.eye(n) + 0.4 * rng.standard_normal((n, n)) / np.sqrt(n)
    if complex_:
        T = T + 0.2j * rng.standard_normal((n, n)) / np.sqrt(n)
    Ti = np.linalg.inv(T)
    s_dense = dense_hsv(Ti @ np.diag(lam) @ T, Ti @ B, C @ T)
    np.testing.assert_allclose(s, s_dense, rtol=0, atol=1e-7 * s[0])


def test_hsv_singular_gramian_gives_zero_sigma():
    lam = t([0.9, 0.5, -0.3])
    B = t([[1.0], [0.0], [2.0]])  # state 1 uncontrollable
    C = t([[1.0, 1.0, 1.0]])
    s = hankel_singular_values(lam, B, C)
    assert torch.isfinite(s).all() and s.min() >= 0
    assert s[-1] < 1e-7 * s[0]
    ref = dense_hsv(np.diag(lam.numpy()), B.numpy(), C.numpy())
    np.testing.assert_allclose(s.numpy(), ref, atol=1e-7 * s[0].item())


# ---------------------------------------------------------------------------------------------
# Balanced truncation
# ---------------------------------------------------------------------------------------------
def test_balanced_truncation_error_bound_on_random_systems():
    rng = np.random.default_rng(2024)
    checked = 0
    for i in range(60):
        complex_ = bool(i % 2)
        n = int(rng.integers(2, 9))
        lam, B, C = random_system(rng, n, int(rng.integers(1, 3)), int(rng.integers(1, 3)), complex_)
        s = hankel_singular_values(t(lam), t(B), t(C)).numpy()
        r = int(rng.integers(1, n))
        A_r, B_r, C_r = (x.numpy() for x in balanced_truncation(t(lam), t(B), t(C), r))
        assert A_r.shape == (r, r) and B_r.shape == (r, B.shape[1]) and C_r.shape == (C.shape[0], r)
        assert np.iscomplexobj(A_r) == complex_
        assert np.max(np.abs(np.linalg.eigvals(A_r))) < 1.0
        err = hinf_on_grid(tf_diagonal(lam, B, C, Z_GRID) - tf_dense(A_r, B_r, C_r, Z_GRID))
        assert err <= 2 * s[r:].sum() + 1e-8 * s[0], (i, err, 2 * s[r:].sum())
        checked += 1
    assert checked >= 50


def test_balanced_truncation_full_rank_is_balanced_realisation():
    rng = np.random.default_rng(7)
    lam, B, C = random_system(rng, 5, 2, 2, True)
    s = hankel_singular_values(t(lam), t(B), t(C)).numpy()
    A_b, B_b, C_b = (x.numpy() for x in balanced_truncation(t(lam), t(B), t(C), 5))
    P = sla.solve_discrete_lyapunov(A_b, B_b @ B_b.conj().T)
    Q = sla.solve_discrete_lyapunov(A_b.conj().T, C_b.conj().T @ C_b)
    np.testing.assert_allclose(P, np.diag(s), atol=1e-8 * s[0])
    np.testing.assert_allclose(Q, np.diag(s), atol=1e-8 * s[0])
    G = tf_diagonal(lam, B, C, Z_GRID[::8])
    np.testing.assert_allclose(tf_dense(A_b, B_b, C_b, Z_GRID[::8]), G, atol=1e-9 * np.abs(G).max())


def test_balanced_truncation_batched_matches_single():
    rng = np.random.default_rng(3)
    systems = [random_system(rng, 6, 1, 1, False) for _ in range(3)]
    lam, B, C = (t(np.stack([s[k] for s in systems])) for k in range(3))
    A_r, B_r, C_r = balanced_truncation(lam, B, C, 3)
    assert A_r.shape == (3, 3, 3)
    for k in range(3):
        A1, B1, C1 = balanced_truncation(lam[k], B[k], C[k], 3)
        # the balanced basis is unique up to signs: compare transfer functions
        z = Z_GRID[::16]
        np.testing.assert_allclose(
            tf_dense(A_r[k].numpy(), B_r[k].numpy(), C_r[k].numpy(), z),
            tf_dense(A1.numpy(), B1.numpy(), C1.numpy(), z),
            atol=1e-10,
        )


@pytest.mark.parametrize("complex_", [False, True])
def test_rediagonalize_round_trip(complex_):
    rng = np.random.default_rng(11 + complex_)
    lam, B, C = random_system(rng, 8, 2, 3, complex_)
    A_r, B_r, C_r = balanced_truncation(t(lam), t(B), t(C), 4)
    poles, B2, C2 = rediagonalize(A_r, B_r, C_r)
    assert poles.shape == (4,) and B2.shape == (4, 2) and C2.shape == (3, 4)
    assert poles.dtype == torch.complex128
    assert poles.abs().max() < 1
    G_dense = tf_dense(A_r.numpy(), B_r.numpy(), C_r.numpy(), Z_GRID[::4])
    G_diag = tf_diagonal(poles.numpy(), B2.numpy(), C2.numpy(), Z_GRID[::4])
    np.testing.assert_allclose(G_diag, G_dense, atol=1e-9 * np.abs(G_dense).max())
    # the rediagonalised system feeds straight back into the diagonal-system functions
    s_r = hankel_singular_values(poles, B2, C2)
    s_ref = dense_hsv(A_r.numpy(), B_r.numpy(), C_r.numpy())
    np.testing.assert_allclose(s_r.numpy(), s_ref, atol=1e-7 * s_ref[0])


# ---------------------------------------------------------------------------------------------
# Hankel nuclear norm
# ---------------------------------------------------------------------------------------------
def test_nuclear_norm_gradcheck_real():
    rng = np.random.default_rng(5)
    lam, B, C = random_system(rng, 4, 2, 1, False, max_radius=0.9)
    inputs = tuple(t(x).requires_grad_() for x in (lam, B, C))
    assert torch.autograd.gradcheck(hankel_nuclear_norm, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_nuclear_norm_gradcheck_complex():
    rng = np.random.default_rng(6)
    lam, B, C = random_system(rng, 3, 1, 2, True, max_radius=0.9)
    inputs = tuple(t(x).requires_grad_() for x in (lam, B, C))
    assert torch.autograd.gradcheck(hankel_nuclear_norm, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_nuclear_norm_gradcheck_lru_parameterisation():
    """Gradient through real LRU parameters ν, θ (λ = exp(−exp ν + i exp θ)) to a real loss."""
    rng = np.random.default_rng(8)
    nu = t(rng.uniform(-2.0, 0.0, 3)).requires_grad_()
    theta = t(rng.uniform(-1.0, 1.0, 3)).requires_grad_()
    B = t(rng.standard_normal((3, 1)) + 1j * rng.standard_normal((3, 1)))
    C = t(rng.standard_normal((1, 3)) + 1j * rng.standard_normal((1, 3)))

    def f(nu, theta):
        lam = torch.exp(torch.complex(-torch.exp(nu), torch.exp(theta)))
        return hankel_nuclear_norm(lam, B, C)

    assert torch.autograd.gradcheck(f, (nu, theta), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_nuclear_norm_equals_sum_of_hsv_batched():
    rng = np.random.default_rng(9)
    systems = [random_system(rng, 5, 2, 2, True) for _ in range(3)]
    lam, B, C = (t(np.stack([s[k] for s in systems])) for k in range(3))
    nn = hankel_nuclear_norm(lam, B, C)
    assert nn.shape == (3,) and nn.dtype == torch.float64
    torch.testing.assert_close(nn, hankel_singular_values(lam, B, C).sum(-1), rtol=1e-10, atol=0)


def test_nuclear_norm_singular_gramian_is_finite_with_gradient():
    lam = t([0.9, 0.5, -0.3]).requires_grad_()
    B = t([[1.0], [0.0], [2.0]]).requires_grad_()
    C = t([[1.0, 1.0, 1.0]])
    nn = hankel_nuclear_norm(lam, B, C)
    nn.backward()
    assert torch.isfinite(lam.grad).all() and torch.isfinite(B.grad).all()
    torch.testing.assert_close(nn.detach(), hankel_singular_values(lam, B, C).sum(), rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------------------------
# ValueError cases (systems and selective inputs)
# ---------------------------------------------------------------------------------------------
LAM = torch.tensor([0.5, -0.2, 0.9])
BB = torch.ones(3, 1)
CC = torch.ones(1, 3)


@pytest.mark.parametrize("fn", [diagonal_gramians, hankel_singular_values, hankel_nuclear_norm])
@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.tensor([0.5, 1.0, 0.1]), BB, CC), "poles"),
        ((torch.tensor([0.5, 0.1j, 1.1 + 0j]), BB, CC), "poles"),
        ((torch.tensor([0.5, float("nan"), 0.1]), BB, CC), "poles"),
        ((LAM, torch.tensor([[1.0], [float("inf")], [0.0]]), CC), "B"),
        ((LAM, BB, torch.tensor([[1.0, float("nan"), 0.0]])), "C"),
        ((LAM, torch.ones(2, 1), CC), "B"),
        ((LAM, BB, torch.ones(1, 4)), "C"),
        ((LAM, torch.ones(3), CC), "B"),
        ((torch.tensor(0.5), BB, CC), "poles"),
        ((LAM.expand(2, 3), BB.expand(3, 3, 1), CC), "broadcast"),
    ],
)
def test_system_validation(fn, args, match):
    with pytest.raises(ValueError, match=match):
        fn(*args)


def test_balanced_truncation_and_rediagonalize_validation():
    for bad in (0, 4, 2.0, True, "2"):
        with pytest.raises(ValueError, match="rank"):
            balanced_truncation(LAM, BB, CC, bad)
    with pytest.raises(ValueError, match="poles"):
        balanced_truncation(torch.tensor([0.5, 1.5, 0.1]), BB, CC, 1)
    # rank beyond the minimal order: state 1 is uncontrollable, so σ_3 = 0
    with pytest.raises(ValueError, match="rank"):
        balanced_truncation(LAM, torch.tensor([[1.0], [0.0], [1.0]]), CC, 3)
    with pytest.raises(ValueError, match="A_r"):
        rediagonalize(torch.ones(2, 3), torch.ones(2, 1), torch.ones(1, 2))
    with pytest.raises(ValueError, match="B_r"):
        rediagonalize(torch.eye(2), torch.ones(3, 1), torch.ones(1, 2))
    with pytest.raises(ValueError, match="C_r"):
        rediagonalize(torch.eye(2), torch.ones(2, 1), torch.ones(1, 3))
    with pytest.raises(ValueError, match="A_r"):
        rediagonalize(torch.full((2, 2), float("nan")), torch.ones(2, 1), torch.ones(1, 2))
