"""scripts/evaluate_model.py: what it evaluates and what it refuses.

7. A checkpoint of a run on the user's own data is evaluated on that data (each checkpoint carries the run record;
   one without it uses its run folder's), and a checkpoint with no record anywhere is refused instead of evaluated
   on the default KJV split.
10. A truncated safetensors file, a config.json with edited sizes, and --compare_to a model with a smaller
   vocabulary: one error line, exit 2, found before any evaluation (nothing measured, no report written).
"""

import importlib
import json
import os
import shutil
from pathlib import Path

import pytest

from compressssm_app import parse_arguments, run_training
from compressssm_app.output_dir import RUN_FILE


REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def evaluate_script():
    return importlib.import_module("evaluate_model")


@pytest.fixture(scope="module")
def own_data_run(tmp_path_factory):
    """A tiny run on a local text file, checkpoints at steps 2, 4, 6."""
    root = tmp_path_factory.mktemp("own")
    corpus = root / "corpus.txt"
    corpus.write_text("".join(f"verse {i}: the quick brown fox jumps over the lazy dog\n" for i in range(300)))
    out = root / "run"
    run_training(
        *parse_arguments(
            ["--preset", "tiny", "--train_file", str(corpus), "--output_dir", str(out), "--disable_tqdm", "true"]
            + ["--save_strategy", "steps", "--save_steps", "2", "--max_eval_samples", "4"]
        )
    )
    return out


def _evaluate(script, *argv):
    return script.main([*map(str, argv), "--no_speed", "--batch_size", "4"])


def test_checkpoint_is_evaluated_on_its_runs_data(own_data_run, evaluate_script, tmp_path, capsys):
    final = tmp_path / "final.json"
    assert _evaluate(evaluate_script, own_data_run, "--output", final) == 0
    expected = json.loads(final.read_text())
    assert "corpus.txt" in expected["dataset"]

    ckpt = _copy_into(own_data_run, tmp_path / "run")  # a copy of the whole run folder
    report = tmp_path / "ckpt.json"
    assert (ckpt / "checkpoint-4" / RUN_FILE).is_file()
    assert _evaluate(evaluate_script, ckpt / "checkpoint-4", "--output", report) == 0
    got = json.loads(report.read_text())
    assert (got["dataset"], got["split"]) == (expected["dataset"], expected["split"])

    # a checkpoint saved without its record (e.g. by an older version): its run folder's record is used
    (ckpt / "checkpoint-4" / RUN_FILE).unlink()
    capsys.readouterr()
    assert _evaluate(evaluate_script, ckpt / "checkpoint-4", "--output", report) == 0
    assert f"using the run record {ckpt / RUN_FILE}" in capsys.readouterr().err
    assert json.loads(report.read_text())["dataset"] == expected["dataset"]

    # no record anywhere: refused, not evaluated on the KJV default split
    alone = tmp_path / "alone"
    shutil.copytree(ckpt / "checkpoint-4", alone)
    assert _evaluate(evaluate_script, alone, "--output", tmp_path / "alone.json") == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "training checkpoint without a run record" in lines[0] and "--train_file" in lines[0]
    assert not (tmp_path / "alone.json").exists()


def _copy_into(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _broken(kind: str, src: Path, root: Path) -> tuple[list[str], str]:
    """Arguments after the model path, and the expected error."""
    folder = root / kind
    if kind == "truncated":
        shutil.copytree(src, folder, ignore=shutil.ignore_patterns("checkpoint-*"))
        weights = folder / "model.safetensors"
        with open(weights, "r+b") as f:
            f.truncate(os.path.getsize(weights) - 100)
        return [str(folder)], "model.safetensors is truncated or unreadable"
    if kind == "edited_config":
        shutil.copytree(src, folder, ignore=shutil.ignore_patterns("checkpoint-*"))
        config = json.loads((folder / "config.json").read_text())
        config["hidden_size"] = 2 * config["hidden_size"]
        (folder / "config.json").write_text(json.dumps(config))
        return [str(folder)], "config.json does not match the weights: backbone.embeddings.weight is [257, 32]"
    from helpers import tiny_lm  # vocabulary 40 < the byte tokenizer's 257 ids

    tiny_lm().save_pretrained(folder)
    return [str(src), "--compare_to", str(folder)], f"--compare_to {folder} has a vocabulary of 40 token ids"


@pytest.mark.parametrize("kind", ["truncated", "edited_config", "small_vocab_compare"])
def test_broken_models_fail_before_any_evaluation(own_data_run, evaluate_script, tmp_path, capsys, monkeypatch, kind):
    from compressssm_app import evaluation

    def never(*args, **kwargs):
        raise AssertionError("evaluated before the inputs were checked")

    monkeypatch.setattr(evaluation, "evaluate_quality", never)
    args, needle = _broken(kind, own_data_run, tmp_path)
    report = tmp_path / "report.json"
    assert _evaluate(evaluate_script, *args, "--output", report) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and needle in lines[0], err[-3000:]
    assert "Traceback" not in err and not report.exists()
