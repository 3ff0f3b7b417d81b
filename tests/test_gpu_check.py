"""scripts/gpu_check.py: its CPU smoke mode runs every part and writes the JSON + Markdown report."""

import json
import os
import subprocess
import sys

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.py")


def test_help_works_without_a_gpu():
    out = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--smoke" in out.stdout


@pytest.mark.slow
def test_smoke_mode_writes_a_complete_report(tmp_path):
    env = dict(os.environ)
    env.pop("HF_COMPRESSSSM_SCAN_BACKEND", None)
    cmd = [sys.executable, SCRIPT, "--smoke", "--out", str(tmp_path), "--sizes", "8", "4", "--steps", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["smoke"] is True
    for ref in ("vs_cpu", "vs_torch_on_device"):
        agreement = report["agreement"][ref]
        assert agreement["train_logits_max_abs"] < 1e-4 and agreement["grads_max_rel"] < 1e-4
        assert agreement["generate_tokens_equal"] is True
    assert [r["state_size"] for r in report["timing"]] == [8, 4]
    assert all(r["ms_per_step_median"] > 0 for r in report["timing"])
    run = report["compressssm"]
    assert 1 <= len(run["history_sizes"]) <= 4 and run["sizes_after"] == run["history_sizes"][-1]
    assert "| state size |" in (tmp_path / "gpu_check.md").read_text()
