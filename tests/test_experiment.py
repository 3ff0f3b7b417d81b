"""compressssm_app.experiment and .harness: the resumable results store, and training/measurement as the scripts use it."""

import json

import pytest
import torch
from helpers import random_ids, tiny_lm

from compressssm_app.evaluation import evaluate_quality
from compressssm_app.experiment import (
    step_summary,
    train_and_measure,
    training_arguments,
)
from compressssm_app.harness import ResultsMismatchError, ResultsStore, fingerprint, in_child
from hf_compressssm import CompressionArguments, CompreSSMCallback


# ------------------------------------------------------------------------------------------------ results store
def test_store_appends_each_run_and_a_reopened_store_skips_it(tmp_path):
    path = tmp_path / "runs.jsonl"
    store = ResultsStore(path, {"lm": "a1", "px": "b1"}, commit="c0")
    assert store.get("lm/full/seed0") is None
    store.add("lm/full/seed0", "lm", {"loss": 1.5})
    assert len(path.read_text().splitlines()) == 1  # on disk at once, before any other run
    store.add("px/full/seed0", "px", {"accuracy": 0.5})
    again = ResultsStore(path, {"lm": "a1", "px": "b1"}, commit="c0")
    assert again.get("lm/full/seed0") == {"loss": 1.5} and again.get("px/full/seed0") == {"accuracy": 0.5}
    assert again.other_commits == {}
    assert [r for r in again.results("lm")] == [{"loss": 1.5}]
    with pytest.raises(KeyError):
        again.add("x", "unknown-group", {})


def test_store_detects_changed_settings_and_other_commits(tmp_path):
    path = tmp_path / "runs.jsonl"
    ResultsStore(path, {"lm": "a1", "px": "b1"}, commit="c0").add("lm/full/seed0", "lm", {"loss": 1.5})
    before = path.read_text()
    with pytest.raises(ResultsMismatchError, match="lm.*other settings.*--fresh"):
        ResultsStore(path, {"lm": "a2"}, commit="c0")
    assert path.read_text() == before  # nothing discarded by the refusal
    # a group not asked for now is left alone; a run of another commit is reused and reported
    other = ResultsStore(path, {"px": "b2"}, commit="c1")
    assert other.get("lm/full/seed0") == {"loss": 1.5}
    same = ResultsStore(path, {"lm": "a1"}, commit="c1")
    assert same.other_commits == {"c0": 1}
    fresh = ResultsStore(path, {"lm": "a2"}, commit="c1", fresh=True)
    assert fresh.records == {} and not path.exists()


def test_store_drops_a_torn_last_line_but_refuses_a_corrupt_middle(tmp_path):
    path = tmp_path / "runs.jsonl"
    store = ResultsStore(path, {"lm": "a"}, commit=None)
    store.add("r1", "lm", {"v": 1})
    store.add("r2", "lm", {"v": 2})
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # killed while writing r2
    reopened = ResultsStore(path, {"lm": "a"})
    assert reopened.get("r1") == {"v": 1} and reopened.get("r2") is None
    assert path.read_text() == lines[0] + "\n"
    reopened.add("r2", "lm", {"v": 2})
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["r1", "r2"]
    path.write_text("not json\n" + path.read_text())
    with pytest.raises(ResultsMismatchError, match="line 1"):
        ResultsStore(path, {"lm": "a"})


def test_fingerprint_is_order_independent_and_sensitive():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


def _double(x):
    return {"value": 2 * x}


def _fail():
    raise ValueError("bad input")


def test_in_child_returns_the_result_or_raises_with_the_child_traceback():
    assert in_child(_double, 21) == {"value": 42}
    with pytest.raises(RuntimeError, match="ValueError: bad input"):
        in_child(_fail)


def test_step_summary_against_statistics():
    times = [0.5, 0.1, 0.2, 0.3, 0.4, 0.6]
    s = step_summary(times)
    assert s["count"] == 6 and s["sum_s"] == pytest.approx(2.1) and s["median_s"] == pytest.approx(0.35)
    assert s["steady_median_s"] == pytest.approx(0.4) and s["first_median_s"] == pytest.approx(0.5)
    assert step_summary([]) == {}


# ------------------------------------------------------------------------------------------------ training
def _data(n=16, length=12):
    ids = random_ids(batch=n, length=length, seed=3)
    return [{"input_ids": row, "labels": row} for row in ids]


def _args(tmp_path, steps=6):
    return training_arguments(str(tmp_path), steps=steps, batch_size=4, learning_rate=1e-2, seed=0, use_cpu=True)


def test_train_and_measure_with_a_curve_matches_a_run_without_and_measures(tmp_path):
    """The learning curve's evaluations change nothing in training (same weights) and are out of the timing; the
    run reports steps, per-step times, sizes, cuts and the final quality of `evaluate_quality`."""
    data = _data()
    plain = train_and_measure(tiny_lm(), data, _args(tmp_path / "a", steps=8))  # 2 epochs: the order is re-drawn
    curved = train_and_measure(
        tiny_lm(), data, _args(tmp_path / "b", steps=8), eval_dataset=data[:4], task="causal_lm", curve_steps=[2, 5, 8]
    )
    for (name, a), b in zip(plain.model.named_parameters(), curved.model.parameters()):
        assert torch.equal(a, b), name
    assert [pt["step"] for pt in curved.curve] == [2, 5, 8]
    assert curved.curve[-1]["loss"] == pytest.approx(curved.eval["loss"])
    assert curved.eval == evaluate_quality(curved.model, data[:4], "causal_lm")
    assert plain.steps_run == 8 and len(plain.step_times) == 8 and plain.train_seconds > 0
    assert plain.eval is None and plain.reductions == []

    comp = CompressionArguments(tau=0.3, calibration_batches=1)
    cut = train_and_measure(tiny_lm(), data, _args(tmp_path / "c", steps=20), callbacks=[CompreSSMCallback(comp)])
    summary = cut.summary()
    assert summary["sizes_initial"] == [8, 8] and summary["sizes_final"] == list(cut.model.config.state_sizes)
    assert summary["reductions"] and summary["reduction_seconds"] == pytest.approx(
        sum(r["seconds"] for r in summary["reductions"])
    )
    assert summary["parameters_final"] < summary["parameters_initial"]
    json.dumps(summary)  # JSON-ready


def test_stop_after_keeps_the_schedule_and_curve_needs_a_task(tmp_path):
    run = train_and_measure(tiny_lm(), _data(), _args(tmp_path, steps=10), stop_after=3)
    assert run.steps_run == 3 and len(run.step_times) == 3
    assert run.trainer.lr_scheduler.get_last_lr()[0] > 0  # a 10-step cosine stopped early, not a 3-step one
    with pytest.raises(ValueError, match="task="):
        train_and_measure(tiny_lm(), _data(), _args(tmp_path, steps=2), eval_dataset=_data(4), curve_steps=[1])
