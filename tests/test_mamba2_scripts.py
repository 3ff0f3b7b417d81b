"""scripts/train.py with Mamba-2: the argument, the preset, a tiny end-to-end run, a stock Mamba-2 folder, bad input."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mamba2_helpers import stock_mamba2_lm
from transformers import AutoModelForCausalLM


REPO = Path(__file__).resolve().parent.parent
_ENV = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}


def test_preset_and_argument_defaults():
    from compressssm_app import parse_arguments

    model_args, *_ = parse_arguments(["--preset", "mamba2", "--output_dir", "unused"])
    assert model_args.model_type == "compressssm_mamba2" and model_args.state_size == 128
    model_args, *_ = parse_arguments(["--output_dir", "unused"])
    assert model_args.model_type == "compressssm_mamba"


def test_train_tiny_mamba2_end_to_end(tmp_path):
    import os

    out = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "scripts" / "train.py"), "--preset", "tiny", "--model_type", "compressssm_mamba2"]
    cmd += ["--head_dim", "16", "--n_groups", "2", "--chunk_size", "32", "--output_dir", str(out)]
    result = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, **_ENV}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "compressssm_mamba2" and config["n_groups"] == 2
    sizes = config["state_sizes"]
    assert all(s < 16 for s in sizes), sizes
    assert [h["step"] for h in json.loads((out / "compression_history.json").read_text())] == [2, 4]
    for name in ("configuration_compressssm_mamba2.py", "modeling_compressssm_mamba2.py", "README.md"):
        assert (out / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.state_sizes() == sizes
    assert "Mamba-2" in (out / "README.md").read_text()


def test_stock_mamba2_folder_is_converted(tmp_path, monkeypatch):
    from compressssm_app import parse_arguments
    from compressssm_app.model_builder import build_model
    from compressssm_app.task_data import TaskData
    from hf_compressssm import CompreSSMMamba2ForCausalLM

    stock = stock_mamba2_lm(vocab_size=300)
    stock.save_pretrained(tmp_path / "stock")
    model_args, *_ = parse_arguments(["--model_name_or_path", str(tmp_path / "stock"), "--output_dir", "unused"])
    data = TaskData.__new__(TaskData)
    data.task, data.vocab_size = "causal_lm", 257
    model = build_model(model_args, data)
    assert type(model) is CompreSSMMamba2ForCausalLM and model.config.compression["base_model"] == str(
        tmp_path / "stock"
    )
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), stock.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--model_type", "mamba3"], "unknown --model_type 'mamba3'"),
        (["--model_type", "compressssm_mamba2", "--head_dim", "7"], "--head_dim 7 must divide"),
        (["--model_type", "compressssm_mamba2", "--n_groups", "3"], "--n_groups 3 must divide"),
        (["--model_type", "compressssm_mamba2", "--task", "pixel_classification"], "needs a Mamba-1 model"),
    ],
    ids=["model-type", "head-dim", "groups", "pixel"],
)
def test_bad_mamba2_arguments_in_process(tmp_path, monkeypatch, args, needle):
    from compressssm_app import UsageError, parse_arguments, run_training

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "never"
    with pytest.raises(UsageError, match=re.escape(needle)):
        run_training(*parse_arguments(["--preset", "tiny", *args, "--output_dir", str(out)]))
    assert not out.exists()
