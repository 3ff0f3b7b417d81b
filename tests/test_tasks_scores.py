"""Memory tasks as the score study uses them, every score/selection end to end, planted dead states, the study's
--quick mode. Tiny models only (hidden <= 64, L <= 64, N <= 16). Brute-force label checks of the task generators
themselves live in test_data.py; here: the study's settings, and properties that file does not check."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import random_ids, tiny_lm
from transformers import Trainer, TrainingArguments

from compressssm_app import sources as D
from hf_compressssm import CompreSSMCallback, compress_model
from hf_compressssm.compression.calibration import collect_statistics
from hf_compressssm.compression.mamba_scores import SCORES, selective_state_scores
from hf_compressssm.compression.ranks import SELECTIONS
from hf_compressssm.compression.scan_reference import scan_energy_scores, state_output_energy
from hf_compressssm.families import MambaFamily, find_mixers


REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "scripts" / "score_study.py"


# ------------------------------------------------------------------------------------------------ tasks
@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path, monkeypatch):
    """The study's datasets (``synthetic_dataset``) go to the test's own Arrow cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    datasets.disable_progress_bars()


def _study_module():
    """scripts/score_study.py as a module (scripts/ is on the test path: pyproject.toml's pytest pythonpath)."""

    return importlib.import_module("score_study")


def _brute_force_selective_copying(ids: list[int], labels: list[int], seq_len: int) -> None:
    data = [x for x in ids[:seq_len] if x != D.SelectiveCopyingTask.NOISE]
    scored = [(t, x) for t, x in enumerate(labels) if x != D.IGNORE_INDEX]
    assert [x for _, x in scored] == data
    # every answer is predicted from a marker (no teacher forcing): the sequence gives nothing away
    assert all(ids[t - 1] == D.SelectiveCopyingTask.MARKER for t, _ in scored)


def _brute_force_mqar(ids: list[int], labels: list[int], num_pairs: int) -> None:
    context = {ids[2 * i]: ids[2 * i + 1] for i in range(num_pairs)}
    for t, x in enumerate(labels):
        if x != D.IGNORE_INDEX:
            assert context[ids[t - 1]] == x


@pytest.mark.parametrize("preset", ["default", "quick"])
def test_study_task_settings_are_valid_and_deterministic(preset):
    S = _study_module()
    p = S.PRESETS[preset]
    a, b = S.train_set(p, seed=3, steps=1), S.train_set(p, seed=3, steps=1)
    other = S.train_set(p, seed=4, steps=1)
    ev = S.eval_set(p)
    assert len(a) == p.batch_size
    for i in range(len(a)):
        assert torch.equal(a[i]["input_ids"], b[i]["input_ids"]) and torch.equal(a[i]["labels"], b[i]["labels"])
        ids, labels = a[i]["input_ids"].tolist(), a[i]["labels"].tolist()
        assert max(ids) < S.model_vocab_size(p)
        if p.task == "selective_copying":
            _brute_force_selective_copying(ids, labels, p.seq_len)
        else:
            _brute_force_mqar(ids, labels, p.num_items)
    stack = lambda ds, n: torch.stack([ds[i]["input_ids"] for i in range(n)])  # noqa: E731
    assert not torch.equal(stack(a, 4), stack(other, 4))
    assert not torch.equal(stack(a, 4), stack(ev, 4)), "training and validation streams differ"


def _local_lookup_accuracy(name: str, window: int, **kwargs) -> tuple[float, float]:
    """Fit the best memoryless predictor (the last ``window`` tokens -> most frequent answer) on the train split and
    score it on the validation split. Returns (its accuracy, chance)."""
    train = D.synthetic_task(name, "train", seed=0, num_samples=400, **kwargs)
    val = D.synthetic_task(name, "validation", seed=0, num_samples=200, **kwargs)

    def pairs(ds):
        for i in range(len(ds)):
            ids, labels = ds[i]["input_ids"].tolist(), ds[i]["labels"].tolist()
            for t, y in enumerate(labels):
                if y != D.IGNORE_INDEX:
                    yield tuple(ids[max(0, t - window) : t]), y

    counts: dict[tuple, dict[int, int]] = {}
    for ctx, y in pairs(train):
        counts.setdefault(ctx, {}).setdefault(y, 0)
        counts[ctx][y] += 1
    hits = total = 0
    for ctx, y in pairs(val):
        guess = max(counts[ctx], key=counts[ctx].get) if ctx in counts else None
        hits += guess == y
        total += 1
    chance = 1 / ((kwargs["vocab_size"] - 1) // 2) if name == "mqar" else 1 / kwargs["vocab_size"]
    return hits / total, chance


@pytest.mark.parametrize(
    "name,kwargs,window",
    [
        ("mqar", dict(seq_len=48, vocab_size=17, num_pairs=8, num_queries=12), 1),  # the query key alone
        ("selective_copying", dict(seq_len=24, vocab_size=8, num_tokens=8), 4),  # the conv window: markers only
    ],
)
def test_tasks_need_memory(name, kwargs, window):
    """No memoryless predictor beats chance by much: the answer is in the distant past, not in the local window."""
    acc, chance = _local_lookup_accuracy(name, window, **kwargs)
    assert acc < chance + 0.08, (acc, chance)


def test_task_accuracy_chance_level_for_uniform_guess():
    ds = D.synthetic_task(
        "selective_copying", "validation", seed=0, num_samples=200, seq_len=16, vocab_size=4, num_tokens=4
    )
    labels = torch.stack([torch.from_numpy(ds[i]["labels"]) for i in range(len(ds))])
    guess = torch.full_like(labels, D.SelectiveCopyingTask.DATA_OFFSET)  # always the first symbol
    scored = labels[:, 1:] != D.IGNORE_INDEX  # the prediction at t - 1 is scored against labels[t]
    assert abs((guess[:, :-1][scored] == labels[:, 1:][scored]).double().mean().item() - 0.25) < 0.05


# ------------------------------------------------------------------------------------------------ scores end to end
class _Copying(torch.utils.data.Dataset):
    def __init__(self):
        self.ds = D.synthetic_task(
            "selective_copying", "train", seed=0, num_samples=32, seq_len=16, vocab_size=6, num_tokens=4
        )

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return {k: torch.from_numpy(v) for k, v in self.ds[i].items()}


@pytest.mark.parametrize(
    "score,selection", [(s, "largest") for s in SCORES] + [("h2", sel) for sel in SELECTIONS if sel != "largest"]
)
def test_every_score_and_selection_through_the_callback(tmp_path, score, selection):
    model = tiny_lm(vocab_size=8, state_sizes=[8, 8])
    callback = CompreSSMCallback(
        mode="fixed",
        fixed_fraction=0.5,
        reduction_steps=[2],
        score=score,
        selection=selection,
        compression_seed=3,
        calibration_batches=1,
    )
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        logging_steps=100,
    )
    Trainer(model=model, args=args, train_dataset=_Copying(), callbacks=[callback]).train()
    assert model.config.state_sizes == [4, 4]
    entry = model.compression_history[0]
    assert entry["score"] == score and entry["selection"] == selection
    for layer in entry["layers"]:
        kept, scores = layer["kept"], torch.tensor(layer["scores"])
        order = torch.argsort(scores, descending=True, stable=True).tolist()
        if selection == "largest":
            assert sorted(kept) == sorted(order[:4])
        elif selection == "smallest":
            assert sorted(kept) == sorted(order[-4:])
    assert model.config.compression["score"] == score


def _planted(row: str, dead: int, seed: int = 0):
    model = tiny_lm(seed=seed, state_sizes=[8, 8])
    with torch.no_grad():
        for mixer in find_mixers(model):
            offset = mixer.time_step_rank + (0 if row == "B" else mixer.ssm_state_size)
            mixer.x_proj.weight[offset + dead].zero_()
    return model


@pytest.mark.parametrize("row,dead", [("B", 0), ("C", 5)])  # index 0: the slowest state at the S4D init
@pytest.mark.parametrize("score", SCORES)
def test_planted_dead_state_is_cut_first(row, dead, score):
    batches = [{"input_ids": random_ids(batch=4, length=16, seed=0)}]
    model = _planted(row, dead)
    report = compress_model(model, batches, mode="fixed", fixed_fraction=1 / 8, gate=1.0, score=score)
    assert report.sizes_after == [7, 7] and model.config.state_sizes == [7, 7]
    for layer in report.layers:
        assert dead not in layer.kept, (row, score, dead)
        assert layer.scores[dead] == 0.0 and min(layer.scores[i] for i in layer.kept) > 0
    # the inverse ablation keeps it
    report = compress_model(
        _planted(row, dead), batches, mode="fixed", fixed_fraction=1 / 8, gate=1.0, score=score, selection="smallest"
    )
    assert all(dead in layer.kept for layer in report.layers)


@pytest.mark.parametrize("row", ["B", "C"])
def test_scan_energy_reference_zero_for_dead_state_and_ranks_like_h2(row):
    batches = [{"input_ids": random_ids(batch=4, length=16, seed=0)}]
    model = _planted(row, 2)
    measured = scan_energy_scores(model, batches)
    closed = [selective_state_scores(s, "h2") for s in collect_statistics(model, batches)]
    for m, c in zip(measured, closed):
        assert m.shape == (8,) and float(m[2]) == 0.0 and bool((m[torch.arange(8) != 2] > 0).all())
        assert int(torch.argmin(m)) == int(torch.argmin(c)) == 2


def test_state_output_energy_matches_a_direct_recurrence():
    g = torch.Generator().manual_seed(0)
    b, L, d, n = 2, 7, 3, 4
    u, B, C = (torch.randn(b, L, k, generator=g, dtype=torch.float64) for k in (d, n, n))
    delta = torch.rand(b, L, d, generator=g, dtype=torch.float64)
    A = -torch.rand(d, n, generator=g, dtype=torch.float64) - 0.1
    mask = torch.ones(b, L)
    mask[1, 4:] = 0
    sum_sq, count = state_output_energy(u, delta, A, B, C, mask)
    want = np.zeros((d, n))
    for i in range(b):
        h = np.zeros((d, n))
        for t in range(L):
            if mask[i, t] == 0:
                continue
            h = (
                np.exp(delta[i, t, :, None].numpy() * A.numpy()) * h
                + (delta[i, t] * u[i, t]).numpy()[:, None] * B[i, t].numpy()[None, :]
            )
            want += (C[i, t].numpy()[None, :] * h) ** 2
    assert float(count) == 7 + 4
    np.testing.assert_allclose(sum_sq.numpy(), want, rtol=1e-10)


def test_calibration_projections_shapes_for_scan_energy():
    model = tiny_lm(state_sizes=[8, 4])
    mixer = find_mixers(model)[1]
    hidden = torch.randn(2, 5, model.config.hidden_size)
    u, delta, A, B, C = MambaFamily().projections(mixer, hidden)
    assert B.shape == C.shape == (2, 5, 4) and A.shape[-1] == 4


# ------------------------------------------------------------------------------------------------ the study script
@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("k", [1, 3, 5])
def test_study_cut_to_k_keeps_what_the_old_fraction_trick_kept(k, selection):
    """The study cuts to exactly k states with compress_model(target_sizes=...); the fixed-fraction detour it
    replaced (fraction 1 − (k − 0.5)/N, gate off) keeps the same states."""
    S = _study_module()
    batches = [{"input_ids": random_ids(batch=2, length=10, seed=s)} for s in range(2)]
    new, old = tiny_lm(seed=1), tiny_lm(seed=1)
    report = S.cut_to(new, k, batches, "h2", selection, seed=3)
    n = max(old.config.state_sizes)
    fraction = 1.0 - (k - 0.5) / n
    legacy = compress_model(
        old,
        batches,
        mode="fixed",
        fixed_fraction=fraction,
        score="h2",
        selection=selection,
        compression_seed=3,
        calibration_batches=len(batches),
        gate=1.0,
    )
    assert report.sizes_after == legacy.sizes_after == [k, k]
    assert [d.kept for d in report.layers] == [d.kept for d in legacy.layers]
    for a, b in zip(new.parameters(), old.parameters()):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_quick_study_writes_well_formed_outputs(tmp_path):
    out = tmp_path / "study"
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_DATASETS_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(
        [sys.executable, str(STUDY), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.with_suffix(".json").read_text())
    assert results["preset_name"] == "quick" and set(results["parts"]) == {"curve", "cuts", "tau", "protocol"}
    p = results["preset"]
    assert {r["state_size"] for r in results["curve"]["rows"]} == set(p["curve_sizes"]) | {p["full_state_size"]}
    methods = {s["method"] for s in results["cuts"]["summary"]}
    assert {"h2", "hankel", "scan_energy", "smallest(h2)", "smallest(hankel)", "random"} <= methods
    random_rows = [r for r in results["cuts"]["rows"] if r["selection"] == "random"]
    assert len(random_rows) == p["random_seeds"] * len(p["cut_sizes"]) * p["cut_bases"]
    for row in results["cuts"]["rows"]:
        assert 0.0 <= row["accuracy_after_cut"] <= 1.0 and 0.0 <= row["accuracy_after_recovery"] <= 1.0
        assert all(len(kept) == row["k"] for kept in row["kept"])
    assert {(r["score"], r["tau"]) for r in results["tau"]["rows"]} == {
        (s, t) for s in p["tau_scores"] for t in p["tau_values"]
    }
    proto = results["protocol"]
    assert len(proto["runs"]) == p["protocol_seeds"]
    for run in proto["runs"]:
        assert len(run["compressed_sizes"]) == p["num_layers"] and max(run["compressed_sizes"]) <= p["full_state_size"]
    md = out.with_suffix(".md").read_text()
    for heading in ("## State-size curve", "## One cut", "## Final state sizes per τ", "## In-training protocol"):
        assert heading in md
    assert "| k | method | after cut % | after recovery % |" in md
