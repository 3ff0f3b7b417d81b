"""Tests for hf_compressssm.compression.ranks: the energy rule, the gate, min size, multiples, index selection."""

from __future__ import annotations

import pytest
import torch

from hf_compressssm.compression.ranks import select_indices, select_rank


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
