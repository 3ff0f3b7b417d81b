"""Tests for hf_compressssm.compression.mamba_scores: selective statistics (against an unchunked naive formula and a one-state LTI
proxy) and the importance scores."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg as sla
import torch

from hf_compressssm.compression.mamba_scores import (
    SCORES,
    merge_statistics,
    selective_state_scores,
    selective_statistics,
)
from hf_compressssm.compression.ranks import select_indices, select_rank


torch.set_num_threads(1)


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
