"""Mamba-2 state scores: statistics against direct loops, the scan reference against a hand-written recurrence and
the mixer's own output, h2 against the scan-measured energy, planted dead states cut first."""

import numpy as np
import pytest
import torch
from helpers import random_ids
from mamba2_helpers import tiny_mamba2_lm
from scipy.stats import spearmanr

from hf_compressssm import compress_model
from hf_compressssm.compression.calibration import collect_statistics
from hf_compressssm.compression.mamba2_scores import (
    merge_ssd_statistics,
    ssd_energy_scores,
    ssd_state_output_energy,
    ssd_state_scores,
    ssd_statistics,
)
from hf_compressssm.compression.mamba_scores import SCORES
from hf_compressssm.compression.scan_reference import scan_energy_scores
from hf_compressssm.families import Mamba2Family, family_of, find_mixers


def _random_projections(b=2, L=7, H=4, P=3, G=2, N=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, L, H, P, generator=g, dtype=torch.float64)
    delta = torch.rand(b, L, H, generator=g, dtype=torch.float64)
    A = -torch.rand(H, generator=g, dtype=torch.float64) - 0.1
    B, C = (torch.randn(b, L, G, N, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.ones(b, L)
    mask[1, 4:] = 0
    return u, delta, A, B, C, mask


def test_statistics_match_direct_sums_and_add_across_batches():
    u, delta, A, B, C, mask = _random_projections()
    stats = ssd_statistics(u, delta, A, B, C, mask)
    H, P, G, N = 4, 3, 2, 5
    count = 0
    decay, ctrl, obs = np.zeros(H), np.zeros((H, P, N)), np.zeros((G, N))
    for i in range(u.shape[0]):
        for t in range(u.shape[1]):
            if mask[i, t] == 0:
                continue
            count += 1
            for h in range(H):
                g = h // (H // G)
                decay[h] += np.exp(float(delta[i, t, h] * A[h]))
                ctrl[h] += (float(delta[i, t, h]) * u[i, t, h].numpy())[:, None] ** 2 * B[i, t, g].numpy()[None] ** 2
            obs += C[i, t].numpy() ** 2
    assert float(stats["count"]) == count == 11
    np.testing.assert_allclose(stats["decay_sum"].numpy(), decay, rtol=1e-12)
    np.testing.assert_allclose(stats["ctrl_sum"].numpy(), ctrl, rtol=1e-12)
    np.testing.assert_allclose(stats["obs_sum"].numpy(), obs, rtol=1e-12)
    # additive: two halves of the batch merge to the whole
    halves = [
        ssd_statistics(*(x[i : i + 1] for x in (u, delta)), A, *(x[i : i + 1] for x in (B, C, mask))) for i in (0, 1)
    ]
    merged = merge_ssd_statistics(*halves)
    for k in stats:
        torch.testing.assert_close(merged[k], stats[k], rtol=1e-12, atol=0)


def test_scores_closed_form():
    u, delta, A, B, C, mask = _random_projections()
    stats = ssd_statistics(u, delta, A, B, C, mask)
    count = float(stats["count"])
    a_bar = stats["decay_sum"] / count
    want = {s: torch.zeros(2, 5, dtype=torch.float64) for s in SCORES}
    for h in range(4):
        g = h // 2
        b2 = stats["ctrl_sum"][h] / count  # (P, N)
        c2 = stats["obs_sum"][g] / count  # (N,)
        one_m = 1 - a_bar[h] ** 2
        want["h2"][g] += (b2 * c2 / one_m).sqrt().sum(0)
        want["hankel"][g] += (b2 * c2).sqrt().sum(0) / one_m
    for score in SCORES:
        got = ssd_state_scores(stats, score)
        assert got.shape == (2, 5)
        torch.testing.assert_close(got, want[score], rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="unknown score"):
        ssd_state_scores(stats, "energy")


def test_state_output_energy_matches_a_direct_recurrence():
    u, delta, A, B, C, mask = _random_projections()
    sum_sq, count = ssd_state_output_energy(u, delta, A, B, C, mask)
    H, P, G, N = 4, 3, 2, 5
    want = np.zeros((H, P, N))
    for i in range(u.shape[0]):
        state = np.zeros((H, P, N))
        for t in range(u.shape[1]):
            if mask[i, t] == 0:
                continue
            for h in range(H):
                g = h // (H // G)
                dt = float(delta[i, t, h])
                state[h] = np.exp(dt * float(A[h])) * state[h] + dt * np.outer(u[i, t, h].numpy(), B[i, t, g].numpy())
                want[h] += (C[i, t, g].numpy()[None] * state[h]) ** 2
    assert float(count) == 11
    np.testing.assert_allclose(sum_sq.numpy(), want, rtol=1e-10)
    scores = ssd_energy_scores(sum_sq, count, G)
    torch.testing.assert_close(
        scores, torch.from_numpy(np.sqrt(want / 11).reshape(G, 2 * P, N).sum(1)), rtol=1e-10, atol=0
    )


def test_projections_reproduce_the_mixer_output():
    """The family's projections, run through the sequential recurrence, give the mixer's own forward output."""
    model = tiny_mamba2_lm(num_hidden_layers=2, state_sizes=[8, 3]).eval()
    family = family_of(model)
    assert isinstance(family, Mamba2Family)
    hidden = torch.randn(2, 19, 16, generator=torch.Generator().manual_seed(1))
    for mixer in find_mixers(model):
        u, delta, A, B, C = family.projections(mixer, hidden)
        H, P, G, N = mixer.num_heads, mixer.head_dim, mixer.n_groups, family.state_size(mixer)
        state = torch.zeros(2, H, P, N, dtype=torch.float64)
        ys = []
        Bh, Ch = (x.double().repeat_interleave(H // G, dim=2) for x in (B, C))
        for t in range(u.shape[1]):
            dt = delta[:, t].double()
            state = (
                torch.exp(dt * A.double())[..., None, None] * state
                + (dt[..., None] * u[:, t].double())[..., None] * Bh[:, t, :, None, :]
            )
            ys.append((state * Ch[:, t, :, None, :]).sum(-1) + mixer.D.double()[:, None] * u[:, t].double())
        y = torch.stack(ys, 1).reshape(2, 19, H * P).float()
        gate = mixer.in_proj(hidden)[..., : mixer.intermediate_size]
        expected = mixer.out_proj(mixer.norm(y, gate))
        with torch.no_grad():
            torch.testing.assert_close(mixer(hidden), expected, atol=2e-5, rtol=1e-4)


def _batches():
    return [{"input_ids": random_ids(batch=4, length=24, seed=s)} for s in (0, 1)]


def test_h2_ranks_like_the_scan_measured_energy():
    model = tiny_mamba2_lm(seed=2, num_hidden_layers=2)
    batches = _batches()
    measured = scan_energy_scores(model, batches)
    closed = [ssd_state_scores(s, "h2") for s in collect_statistics(model, batches)]
    for m, c in zip(measured, closed):
        assert m.shape == c.shape == (2, 8)
        rho = spearmanr(m.flatten().numpy(), c.flatten().numpy()).statistic
        assert rho > 0.8, rho


def _planted(part: str, group: int, dead: int, seed: int = 0):
    model = tiny_mamba2_lm(seed=seed, num_hidden_layers=2)
    with torch.no_grad():
        for mixer in find_mixers(model):
            inner, gn = mixer.intermediate_size, mixer.n_groups * mixer.ssm_state_size
            row = 2 * inner + (0 if part == "B" else gn) + group * mixer.ssm_state_size + dead
            mixer.in_proj.weight[row].zero_()
            mixer.conv1d.bias[row - inner] = 0.0  # the conv bias would otherwise feed the state a constant
    return model


@pytest.mark.parametrize("part,group,dead", [("B", 0, 0), ("C", 1, 5)])
@pytest.mark.parametrize("score", SCORES)
def test_planted_dead_state_is_cut_first(part, group, dead, score):
    batches = _batches()
    model = _planted(part, group, dead)
    measured = scan_energy_scores(model, batches)
    assert all(float(m[group, dead]) == 0.0 and int((m == 0).sum()) == 1 for m in measured)
    report = compress_model(model, batches, mode="fixed", fixed_fraction=1 / 8, gate=1.0, score=score)
    assert report.sizes_after == [7, 7] and model.config.state_sizes == [7, 7] and model.state_sizes() == [7, 7]
    for layer in report.layers:
        assert layer.scores[group][dead] == 0.0
        assert dead not in layer.kept[group] and len(layer.kept[group]) == 7
        assert min(layer.scores[group][i] for i in layer.kept[group]) > 0
    # the inverse ablation keeps it
    report = compress_model(
        _planted(part, group, dead),
        batches,
        mode="fixed",
        fixed_fraction=1 / 8,
        gate=1.0,
        score=score,
        selection="smallest",
    )
    assert all(dead in layer.kept[group] for layer in report.layers)


def test_cut_matches_a_model_built_at_the_kept_states():
    """Cutting states whose B rows are zero leaves the logits unchanged (they contribute nothing) and the cut model
    equals a fresh model of the new sizes loaded with the sliced weights."""
    model = tiny_mamba2_lm(seed=4, num_hidden_layers=2).eval()
    with torch.no_grad():
        for mixer in find_mixers(model):
            for g, n in ((0, 1), (0, 6), (1, 2), (1, 3)):
                row = 2 * mixer.intermediate_size + g * 8 + n
                mixer.in_proj.weight[row].zero_()
                mixer.conv1d.bias[row - mixer.intermediate_size] = 0.0
    ids = random_ids(length=20)
    with torch.no_grad():
        before = model(ids).logits
    from hf_compressssm.compression.surgery import shrink_mixers

    keep = torch.tensor([[0, 2, 3, 4, 5, 7], [0, 1, 4, 5, 6, 7]])
    shrink_mixers(model, {0: keep, 1: keep})
    assert model.state_sizes() == [6, 6] and model.config.state_sizes == [6, 6]
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    fresh = type(model)(model.config).eval()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, after)
    from hf_compressssm.compression.surgery import SurgeryError

    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SurgeryError, match=r"shape \(groups, k\) = \(2, k\)"):
        shrink_mixers(model, {0: torch.tensor([[0, 1], [0, 1], [2, 3]])})
    with pytest.raises(SurgeryError, match="distinct"):
        shrink_mixers(model, {1: torch.tensor([[0, 0], [1, 2]])})
    assert model.state_sizes() == [6, 6] and all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
