"""Every ```python block of the README runs as written, each in a fresh process and folder; only the step counts
are made tiny (the substitutions below must each apply, so an edited README cannot silently skip them)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"^```python\n(.*?)^```", README, flags=re.S | re.M)

# (text in the README, tiny replacement): the README's sizes are meant for a real run, the test needs seconds.
SMALL = [
    ("max_steps=300,", "max_steps=8,"),
    ("max_steps=200, save_steps=100,", "max_steps=8, save_steps=4,"),
    ('"run/checkpoint-100"', '"run/checkpoint-4"'),
]


def test_readme_has_python_blocks_and_every_substitution_applies():
    assert len(BLOCKS) >= 3
    for old, _ in SMALL:
        assert any(old in block for block in BLOCKS), f"README no longer contains {old!r}: update SMALL"


def _shrink(code: str) -> str:
    for old, new in SMALL:
        code = code.replace(old, new)
    return code


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, tmp_path):
    code = _shrink(BLOCKS[index])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "scripts"), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "NUMBA_NUM_THREADS": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, f"README block {index}:\n{code}\n--- stderr ---\n{proc.stderr[-4000:]}"
