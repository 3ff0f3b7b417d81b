"""`accelerate launch` with the shipped CPU config starts 2 processes and trains exactly as `torchrun` does; log lines
once; no DDP find_unused_parameters warning; `accelerate launch --cpu --num_processes 2` (one process) is flagged."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file


REPO = Path(__file__).resolve().parent.parent
TRAIN = str(REPO / "scripts" / "train.py")
CONFIG = str(REPO / "configs" / "accelerate_cpu_2proc.yaml")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accelerate() -> list[str]:
    exe = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    return [exe] if exe else [sys.executable, "-m", "accelerate.commands.launch"]


def _launch(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _train_args(out: Path) -> list[str]:
    return [TRAIN, "--preset", "tiny", "--output_dir", str(out)]


def test_accelerate_two_processes_equal_torchrun(tmp_path):
    port = _free_port()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    ref = _launch(torchrun + _train_args(tmp_path / "torchrun"))
    acc = _launch([*_accelerate(), "launch", "--config_file", CONFIG, "--main_process_port", str(_free_port())]
                  + _train_args(tmp_path / "accelerate"))  # fmt: skip
    for proc in (ref, acc):
        log = proc.stdout + proc.stderr
        assert "find_unused_parameters" not in log
        assert "world size 1" not in log
        steps = [line for line in log.splitlines() if "CompreSSM step 2:" in line]
        assert len(steps) == 1, "the cut is logged once (main process), not once per rank"
    a, b = (json.loads((tmp_path / n / "train_results.json").read_text()) for n in ("torchrun", "accelerate"))
    assert a["epoch"] == b["epoch"] == pytest.approx(2 * 6 * 4 / 64), "2 ranks of batch 4 over 64 blocks"
    assert a["train_loss"] == b["train_loss"]
    ea, eb = (json.loads((tmp_path / n / "eval_results.json").read_text()) for n in ("torchrun", "accelerate"))
    assert ea == eb
    wa, wb = (load_file(tmp_path / n / "model.safetensors") for n in ("torchrun", "accelerate"))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert wa[key].equal(wb[key]), key
    ca, cb = (json.loads((tmp_path / n / "config.json").read_text()) for n in ("torchrun", "accelerate"))
    assert ca["state_sizes"] == cb["state_sizes"] and sum(ca["state_sizes"]) < 32


def test_accelerate_cpu_flag_starts_one_process_and_is_flagged(tmp_path):
    proc = _launch([*_accelerate(), "launch", "--cpu", "--num_processes", "2", "--num_machines", "1"]
                   + ["--mixed_precision", "no", "--dynamo_backend", "no"] + _train_args(tmp_path / "one"))  # fmt: skip
    assert "the launcher asked for 2 processes but this run has world size 1" in proc.stderr
    assert "accelerate_cpu_2proc.yaml" in proc.stderr
    state = json.loads((tmp_path / "one" / "train_results.json").read_text())
    assert state["epoch"] == pytest.approx(6 * 4 / 64), "a single process"
