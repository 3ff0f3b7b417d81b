"""A folder saved by the code before the layout change (acddb23) loads with the package and, as remote code, without it.

Fixture: ``tests/fixtures/saved_before_layout_v0_1/`` (a [8, 5] model with the remote-code files of that time) and
``saved_before_layout_v0_1_expected.safetensors`` (``input_ids`` and the ``logits`` the old code computed).
"""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import BLOCK_PACKAGE
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from hf_compressssm import CompreSSMMambaConfig, CompreSSMMambaForCausalLM


pytestmark = pytest.mark.compat


FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
LEGACY = os.path.join(FIXTURES, "saved_before_layout_v0_1")
EXPECTED = os.path.join(FIXTURES, "saved_before_layout_v0_1_expected.safetensors")


def test_legacy_folder_loads_with_the_package(tmp_path):
    expected = load_file(EXPECTED)
    config = AutoConfig.from_pretrained(LEGACY)
    assert type(config) is CompreSSMMambaConfig and config.state_sizes == [8, 5]
    assert [c.state_size for c in config.per_layer_config] == [8, 5]
    model = AutoModelForCausalLM.from_pretrained(LEGACY).eval()
    assert type(model) is CompreSSMMambaForCausalLM and model.state_sizes() == [8, 5]
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    assert torch.equal(logits, expected["logits"])
    # Saved again by the current code, it still loads to the same logits.
    model.save_pretrained(tmp_path / "resaved")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "resaved").eval()
    with torch.no_grad():
        assert torch.equal(again(expected["input_ids"]).logits, expected["logits"])


@pytest.mark.slow
def test_legacy_folder_loads_as_remote_code_without_the_package(tmp_path):
    folder = tmp_path / "legacy"
    shutil.copytree(LEGACY, folder)
    script = (
        BLOCK_PACKAGE
        + f"""
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
assert not type(model).__module__.startswith('hf_compressssm'), type(model).__module__
expected = load_file({EXPECTED!r})
with torch.no_grad():
    logits = model(expected['input_ids']).logits
assert torch.equal(logits, expected['logits']), (logits - expected['logits']).abs().max()
print('LEGACY_REMOTE_OK', type(model).__name__, [layer.mixer.A_log.shape[-1] for layer in model.backbone.layers])
"""
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LEGACY_REMOTE_OK CompreSSMMambaForCausalLM [8, 5]" in result.stdout
