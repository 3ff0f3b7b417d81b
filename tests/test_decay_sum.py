"""Tests for hf_compressssm.compression.decay_sum: the fused numba kernel and the torch path of Σ_t expm1(Δ A)
against a float64 numpy reference, slow modes included, and the scores/decisions they lead to."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_compressssm.compression.decay_sum import decay_deficit_sum
from hf_compressssm.compression.mamba_scores import selective_state_scores, selective_statistics
from hf_compressssm.compression.ranks import select_rank


pytest.importorskip("numba")
torch.set_num_threads(1)


def inputs(seed: int, tokens: int = 300, d: int = 70, n: int = 37, slow: bool = True):
    """Steps and decays over the range a trained layer shows; ``slow`` adds channels/states with |Δ A| ≤ 1e-7."""
    g = torch.Generator().manual_seed(seed)
    delta = torch.nn.functional.softplus(torch.randn(tokens, d, generator=g) * 2 - 3)
    A = -torch.exp(torch.randn(d, n, generator=g) * 2)
    if slow:
        delta[:, :3] *= 1e-5
        A[:, :2] *= 1e-3
    return delta, A


def reference(delta, A):
    """float64 numpy, the whole (tokens, D, N) tensor at once."""
    x = delta.double().numpy()[:, :, None] * A.double().numpy()[None]
    return np.expm1(x).sum(0)


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize("tokens", [1, 63, 64, 65, 300])
def test_deficit_matches_float64_reference(backend, tokens):
    delta, A = inputs(0, tokens=tokens)
    got = decay_deficit_sum(delta, A, backend=backend)
    assert got.dtype == torch.float64 and got.shape == A.shape
    np.testing.assert_allclose(got.numpy(), reference(delta, A), rtol=2e-6, atol=0)


def test_deficit_keeps_relative_precision_of_slow_modes():
    """|Δ A| ≤ 1e-5: exp(ΔA) − 1 in float32 would keep at most a few bits; expm1 keeps ~1e-7 relative."""
    delta, A = inputs(1, slow=False)
    A = A * 1e-9
    assert float((delta[:, :, None] * A).abs().max()) < 1e-5
    ref = reference(delta, A)
    np.testing.assert_allclose(decay_deficit_sum(delta, A, backend="numba").numpy(), ref, rtol=1e-6, atol=0)


def test_deficit_large_arguments_and_underflow():
    """Δ A down to −1e4: expm1 → −1 (exp underflows to 0), no NaN."""
    delta = torch.tensor([[0.0, 1.0, 10.0, 100.0]]).repeat(5, 1)
    A = -torch.tensor([[1e-3, 0.5, 1.0, 100.0]]).repeat(4, 1)
    np.testing.assert_allclose(
        decay_deficit_sum(delta, A, backend="numba").numpy(), reference(delta, A), rtol=1e-6, atol=1e-12
    )


def test_auto_backend_uses_torch_for_float64_and_numba_refuses_it():
    delta, A = inputs(2)
    d64, a64 = delta.double(), A.double()
    np.testing.assert_allclose(decay_deficit_sum(d64, a64).numpy(), reference(delta, A), rtol=1e-12)
    with pytest.raises(RuntimeError, match="float32 CPU tensors"):
        decay_deficit_sum(d64, a64, backend="numba")
    with pytest.raises(ValueError, match="backend must be one of"):
        decay_deficit_sum(delta, A, backend="cuda")
    with pytest.raises(ValueError, match=r"delta must be \(tokens, D\)"):
        decay_deficit_sum(delta, A.mT)


def test_statistics_scores_and_ranks_equal_on_both_backends(monkeypatch):
    """selective_statistics with the kernel and with the torch path: the same scores (1e-6) and the same ranks."""
    import hf_compressssm.compression.mamba_scores as scores_module

    g = torch.Generator().manual_seed(3)
    u = torch.randn(4, 64, 48, generator=g)
    delta = torch.nn.functional.softplus(torch.randn(4, 64, 48, generator=g) - 2)
    A = -torch.exp(torch.randn(48, 32, generator=g))
    B = torch.randn(4, 64, 32, generator=g) * torch.linspace(0.01, 2, 32)
    C = torch.randn(4, 64, 32, generator=g)
    fast = selective_statistics(u, delta, A, B, C)
    original = scores_module.decay_deficit_sum
    monkeypatch.setattr(
        scores_module, "decay_deficit_sum", lambda dl, a, chunk_size=None: original(dl, a, chunk_size, "torch")
    )
    slow = selective_statistics(u, delta, A, B, C)
    for score in ("h2", "hankel"):
        s_fast, s_slow = selective_state_scores(fast, score), selective_state_scores(slow, score)
        np.testing.assert_allclose(s_fast.numpy(), s_slow.numpy(), rtol=1e-6)
        assert torch.equal(s_fast.argsort(), s_slow.argsort())
        for tau in (0.01, 0.05, 0.2):
            assert select_rank(s_fast, tau) == select_rank(s_slow, tau)
