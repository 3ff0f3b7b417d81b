"""Tests for the pure math of hf_compressssm.compression (hankel, ranks, scores); scipy / numpy dense routes are the independent reference."""

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
from hf_compressssm.compression.ranks import select_indices, select_rank
from hf_compressssm.compression.scores import SCORES, merge_statistics, selective_state_scores, selective_statistics


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
# select_rank / select_indices
# ---------------------------------------------------------------------------------------------
def test_select_rank_energy_rule():
    s = torch.tensor([1.0, 1.0, 1.0, 1.0])
    assert select_rank(s, 0.5, gate=1.0) == 2  # exactly half kept
    assert select_rank(s, 0.25, gate=1.0) == 3
    assert select_rank(s, 0.1, gate=1.0) == 4
    s = torch.tensor([0.05, 5.0, 3.0, 2.0])  # unsorted on purpose; total 10.05
    assert select_rank(s, 0.25, gate=1.0) == 2  # 8.0 >= 7.5375
    assert select_rank(s, 0.2, gate=1.0) == 3  # 8.0 < 8.04, 10 >= 8.04
    assert select_rank([3.0, 2.0, 1.0], 0.5, gate=1.0) == 1  # lists accepted; 3 >= 3


def test_select_rank_tau_zero_keeps_all():
    assert select_rank(torch.tensor([1.0, 1e-20, 1e-30]), 0.0) == 3
    assert select_rank(torch.tensor([5.0, 0.0, 0.0, 0.0]), 0.0, gate=1.0) == 4


def test_select_rank_gate():
    s = torch.ones(100, dtype=torch.float64)
    assert select_rank(s, 0.05, gate=1.0) == 95
    assert select_rank(s, 0.05) == 100  # 95 >= 0.95 * 100: not worth cutting
    assert select_rank(s, 0.05, gate=0.96) == 95
    assert select_rank(s, 0.06) == 94  # 94 < 95: the gate passes
    s = torch.arange(100, 0, -1, dtype=torch.float64)  # total 5050; dropping 1..9 discards 45 <= 50.5
    assert select_rank(s, 0.01, gate=1.0) == 91
    assert select_rank(s, 0.01) == 91
    # current_size larger than len(scores): missing states carry no energy
    assert select_rank(torch.ones(10), 0.5, current_size=64) == 5


def test_select_rank_min_size_and_multiple_of():
    s = torch.tensor([10.0] + [1e-6] * 63)
    assert select_rank(s, 0.05) == 1
    assert select_rank(s, 0.05, min_size=4) == 4
    assert select_rank(s, 0.05, multiple_of=8) == 8
    assert select_rank(s, 0.05, min_size=9, multiple_of=8) == 16
    # rounding up never exceeds the current size (and then the gate keeps it)
    assert select_rank(torch.ones(10), 0.15, multiple_of=8, gate=1.0) == 10
    # min_size above the current size cannot grow the layer
    assert select_rank(torch.ones(4), 0.5, min_size=8) == 4


def test_select_rank_all_zero_scores_gives_min_size():
    assert select_rank(torch.zeros(16), 0.1) == 1
    assert select_rank(torch.zeros(16), 0.1, min_size=3) == 3
    assert select_rank(torch.zeros(16), 0.1, min_size=3, multiple_of=4) == 4
    assert select_rank(torch.zeros(16), 0.0) == 16  # τ = 0 keeps all


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(tau=-0.1), "tau"),
        (dict(tau=1.0), "tau"),
        (dict(tau=float("nan")), "tau"),
        (dict(tau="0.1"), "tau"),
        (dict(tau=True), "tau"),
        (dict(tau=0.1, gate=0.0), "gate"),
        (dict(tau=0.1, gate=1.5), "gate"),
        (dict(tau=0.1, min_size=0), "min_size"),
        (dict(tau=0.1, multiple_of=0), "multiple_of"),
        (dict(tau=0.1, multiple_of=2.0), "multiple_of"),
        (dict(tau=0.1, current_size=3), "current_size"),
    ],
)
def test_select_rank_invalid(kwargs, match):
    with pytest.raises(ValueError, match=match):
        select_rank(torch.ones(4), **kwargs)


@pytest.mark.parametrize(
    "scores", [torch.tensor([1.0, -1.0]), torch.tensor([1.0, float("nan")]), torch.ones(2, 2), torch.ones(0)]
)
def test_select_rank_invalid_scores(scores):
    with pytest.raises(ValueError, match="scores"):
        select_rank(scores, 0.1)


def test_select_indices_modes():
    s = torch.tensor([0.5, 3.0, 0.1, 2.0, 2.0, 0.0])
    idx = select_indices(s, 3)
    assert idx.dtype == torch.long and idx.tolist() == [1, 3, 4]
    assert select_indices(s, 2).tolist() == [1, 3]  # tie 3 vs 4 goes to the lower index
    assert select_indices(s, 2, "smallest").tolist() == [2, 5]
    assert select_indices(s, 6).tolist() == list(range(6))
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    r1, r2 = select_indices(s, 4, "random", g1), select_indices(s, 4, "random", g2)
    assert r1.tolist() == r2.tolist()
    assert r1.tolist() == sorted(set(r1.tolist())) and len(r1) == 4 and 0 <= r1.min() and r1.max() < 6
    draws = {tuple(select_indices(s, 3, "random", torch.Generator().manual_seed(k)).tolist()) for k in range(20)}
    assert len(draws) > 1


def test_select_indices_invalid():
    s = torch.ones(4)
    with pytest.raises(ValueError, match="selection"):
        select_indices(s, 2, "biggest")
    with pytest.raises(ValueError, match="rank"):
        select_indices(s, 0)
    with pytest.raises(ValueError, match="rank"):
        select_indices(s, 5)
    with pytest.raises(ValueError, match="scores"):
        select_indices(torch.tensor([1.0, float("inf")]), 1)


# ---------------------------------------------------------------------------------------------
# Selective (Mamba-1) statistics and scores
# ---------------------------------------------------------------------------------------------
def random_selective(seed: int, bsz=3, length=11, d=5, n=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(bsz, length, d, generator=g, dtype=dtype)
    delta = torch.nn.functional.softplus(torch.randn(bsz, length, d, generator=g, dtype=dtype) - 1)
    A = -torch.exp(torch.randn(d, n, generator=g, dtype=dtype) * 0.5)
    B = torch.randn(bsz, length, n, generator=g, dtype=dtype)
    C = torch.randn(bsz, length, n, generator=g, dtype=dtype)
    return u, delta, A, B, C


def naive_statistics(u, delta, A, B, C):
    """Unchunked reference: materialises the whole (batch, length, D, N) tensor in numpy."""
    u, delta, A, B, C = (x.double().numpy() for x in (u, delta, A, B, C))
    decay = np.exp(delta[..., None] * A).sum((0, 1))
    ctrl = ((delta * u)[..., None] * B[:, :, None, :]) ** 2
    return {
        "count": float(u.shape[0] * u.shape[1]),
        "decay_sum": decay,
        "ctrl_sum": ctrl.sum((0, 1)),
        "obs_sum": (C**2).sum((0, 1)),
    }


def assert_stats_close(a, b, rtol=1e-12, decay_rtol=None):
    """``decay_rtol`` checks the decay *deficit* Σ(1 − exp(ΔA)), evaluated in the inputs' precision."""
    for k in ("count", "ctrl_sum", "obs_sum"):
        np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=rtol, atol=0)
    deficit_a = np.asarray(a["count"]) - np.asarray(a["decay_sum"])
    deficit_b = np.asarray(b["count"]) - np.asarray(b["decay_sum"])
    np.testing.assert_allclose(deficit_a, deficit_b, rtol=decay_rtol or rtol, atol=0)


@pytest.mark.parametrize("chunk_size", [None, 1, 4, 1000])
@pytest.mark.parametrize("dtype, decay_rtol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_selective_statistics_match_unchunked_formula(chunk_size, dtype, decay_rtol):
    args = random_selective(0, dtype=dtype)
    stats = selective_statistics(*args, chunk_size=chunk_size)
    assert set(stats) == {"count", "decay_sum", "ctrl_sum", "obs_sum"}
    assert all(v.dtype == torch.float64 for v in stats.values())
    assert stats["count"].shape == () and stats["decay_sum"].shape == (5, 4) and stats["obs_sum"].shape == (4,)
    assert_stats_close({k: v.numpy() for k, v in stats.items()}, naive_statistics(*args), decay_rtol=decay_rtol)


def test_selective_statistics_slow_modes_keep_relative_precision():
    """ā → 1 (slow decay): the deficit 1 − ā that drives 1/(1 − ā²) stays accurate in float32."""
    u, delta, A, B, C = random_selective(4)
    A = torch.full_like(A, -1e-4)  # |ΔA| ~ 1e-4: exp(ΔA) = 1 − O(1e-4), beyond float32 resolution of 1 − ā
    stats = selective_statistics(u, delta, A, B, C)
    ref = naive_statistics(u, delta, A, B, C)
    np.testing.assert_allclose(
        (stats["count"] - stats["decay_sum"]).numpy(), ref["count"] - ref["decay_sum"], rtol=1e-6, atol=0
    )


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_selective_statistics_additive_across_batch_splits(dtype, rtol):
    """Exact in float64; float32 inputs sum the exp term in float32 chunks, so the grouping shows at 1e-7."""
    u, delta, A, B, C = random_selective(1, bsz=4, dtype=dtype)
    full = selective_statistics(u, delta, A, B, C)
    h1 = selective_statistics(u[:1], delta[:1], A, B[:1], C[:1])
    h2 = selective_statistics(u[1:], delta[1:], A, B[1:], C[1:])
    merged = merge_statistics(h1, h2)
    for k in full:
        torch.testing.assert_close(merged[k], full[k], rtol=1e-12 if k != "decay_sum" else rtol, atol=0)
    torch.testing.assert_close(selective_state_scores(merged), selective_state_scores(full), rtol=rtol, atol=0)


def test_selective_statistics_mask_equals_dropping_tokens():
    u, delta, A, B, C = random_selective(2, bsz=2, length=9, dtype=torch.float64)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, 6:] = 0
    mask[1, 3:] = 0
    u = u.clone()
    u[mask == 0] = 1e6  # padded content must not leak in
    stats = selective_statistics(u, delta, A, B, C, mask=mask)
    ref = merge_statistics(
        selective_statistics(u[:1, :6], delta[:1, :6], A, B[:1, :6], C[:1, :6]),
        selective_statistics(u[1:, :3], delta[1:, :3], A, B[1:, :3], C[1:, :3]),
    )
    assert float(stats["count"]) == 9.0
    for k in stats:
        torch.testing.assert_close(stats[k], ref[k], rtol=1e-12, atol=0)
    stats_bool = selective_statistics(u, delta, A, B, C, mask=mask.bool(), chunk_size=2)
    for k in stats:
        torch.testing.assert_close(stats_bool[k], ref[k], rtol=1e-12, atol=0)


def test_selective_scores_constant_inputs_equal_one_state_lti_proxy():
    """Δ, u, B, C constant in time: each (d, n) is the LTI mode a = exp(Δ_d A_dn), b = Δ_d u_d B_n, c = C_n."""
    rng = np.random.default_rng(3)
    bsz, length, d, n = 2, 7, 3, 4
    u_d = rng.standard_normal(d)
    delta_d = rng.uniform(0.05, 1.5, d)
    A = -np.exp(rng.uniform(-1.0, 1.0, (d, n)))
    B_n = rng.standard_normal(n)
    C_n = rng.standard_normal(n)

    def tile(x):
        return torch.tensor(np.broadcast_to(x, (bsz, length, x.shape[-1])).copy())

    stats = selective_statistics(tile(u_d), tile(delta_d), torch.tensor(A), tile(B_n), tile(C_n))
    hankel = selective_state_scores(stats, "hankel").numpy()
    h2 = selective_state_scores(stats, "h2").numpy()

    ref_hankel = np.zeros(n)
    ref_h2 = np.zeros(n)
    k = np.arange(4000)
    for i in range(d):
        for j in range(n):
            a = np.exp(delta_d[i] * A[i, j])
            b = delta_d[i] * u_d[i] * B_n[j]
            c = C_n[j]
            # one-state system: Gramians by scipy, HSV = sqrt(P Q); H2 norm from the impulse response
            P = sla.solve_discrete_lyapunov(np.array([[a]]), np.array([[b * b]]))[0, 0]
            Q = sla.solve_discrete_lyapunov(np.array([[a]]), np.array([[c * c]]))[0, 0]
            ref_hankel[j] += np.sqrt(P * Q)
            ref_h2[j] += np.sqrt(np.sum((c * a**k * b) ** 2))
    np.testing.assert_allclose(hankel, ref_hankel, rtol=1e-9)
    np.testing.assert_allclose(h2, ref_h2, rtol=1e-9)
    # for one state the HSV also equals |b c| / (1 - a²) and the H2 norm |b c| / sqrt(1 - a²)
    a = np.exp(delta_d[:, None] * A)
    bc = np.abs(delta_d[:, None] * u_d[:, None] * B_n[None] * C_n[None])
    np.testing.assert_allclose(hankel, (bc / (1 - a**2)).sum(0), rtol=1e-9)
    np.testing.assert_allclose(h2, (bc / np.sqrt(1 - a**2)).sum(0), rtol=1e-9)


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("which", ["B", "C"])
def test_selective_state_with_zero_B_or_C_scores_zero_and_is_cut_first(score, which):
    u, delta, A, B, C = random_selective(4, n=6)
    dead = 2
    if which == "B":
        B[..., dead] = 0
    else:
        C[..., dead] = 0
    s = selective_state_scores(selective_statistics(u, delta, A, B, C), score)
    assert s.shape == (6,)
    assert s[dead] == 0 and (s[torch.arange(6) != dead] > 0).all()
    kept = select_indices(s, 5)
    assert dead not in kept.tolist()
    assert select_indices(s, 1, "smallest").tolist() == [dead]


def test_selective_scores_h2_vs_hankel_relation():
    stats = selective_statistics(*random_selective(5))
    hk, h2 = selective_state_scores(stats, "hankel"), selective_state_scores(stats, "h2")
    assert (hk >= h2).all()  # hankel carries the extra 1/sqrt(1-ā²) ≥ 1 factor
    assert selective_state_scores(stats).equal(h2)  # default is h2


def test_selective_scores_fed_to_select_rank():
    s = selective_state_scores(selective_statistics(*random_selective(6, n=16)))
    r = select_rank(s, 0.3)
    assert 1 <= r <= 16
    assert select_indices(s, r).shape == (r,)


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


def test_selective_validation():
    u, delta, A, B, C = random_selective(7, bsz=2, length=3, d=4, n=5)
    cases = [
        ((u[0], delta, A, B, C), {}, "u"),
        ((u, delta[:, :2], A, B, C), {}, "delta"),
        ((u, delta, A[:3], B, C), {}, "A"),
        ((u, delta, A, B[..., :4], C), {}, "B"),
        ((u, delta, A, B, C[:1]), {}, "C"),
        ((u, delta, -A, B, C), {}, "A"),
        ((u, -delta, A, B, C), {}, "delta"),
        ((u.masked_fill(u > 1, float("nan")), delta, A, B, C), {}, "u"),
        ((u, delta, A, B, C), {"mask": torch.ones(2, 4)}, "mask"),
        ((u, delta, A, B, C), {"mask": torch.full((2, 3), 2)}, "mask"),
        ((u, delta, A, B, C), {"chunk_size": 0}, "chunk_size"),
    ]
    for args, kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            selective_statistics(*args, **kwargs)

    stats = selective_statistics(u, delta, A, B, C)
    with pytest.raises(ValueError, match="score"):
        selective_state_scores(stats, "random")
    with pytest.raises(ValueError, match="hankel, h2"):
        selective_state_scores(stats, "nope")
    with pytest.raises(ValueError, match="count"):
        selective_state_scores(selective_statistics(u, delta, A, B, C, mask=torch.zeros(2, 3)))
    with pytest.raises(ValueError, match="keys"):
        selective_state_scores({k: v for k, v in stats.items() if k != "obs_sum"})
    other = selective_statistics(*random_selective(8, bsz=2, length=3, d=4, n=6))
    with pytest.raises(ValueError, match="shapes"):
        merge_statistics(stats, other)
