"""Folders saved by older code load with the package, and ``python -m hf_compressssm upgrade`` brings their remote code
up to date so they load without it.

Fixtures (regenerate with ``tests/fixtures/make_saved_f9ea757.py``): ``saved_f9ea757_mamba/`` and
``saved_f9ea757_mamba2/``, tiny [8, 3] models saved by commit f9ea757 on transformers 5.24, each with
``expected.json`` (``input_ids`` and the logits of that code). Their Mamba-2 remote code imports
``MambaRMSNormGated`` from ``transformers.models.mamba2.modeling_mamba2``, gone in 5.25. The upgrade tests also run on
``saved_before_layout_v0_1/`` (see test_legacy_folder.py). Every test works on copies in ``tmp_path``.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hf_compressssm import (
    CompreSSMMamba2Config,
    CompreSSMMamba2ForCausalLM,
    CompreSSMMambaConfig,
    CompreSSMMambaForCausalLM,
)
from hf_compressssm.__main__ import main
from hf_compressssm.hub.upgrade import UpgradeError, folder_needs_upgrade, upgrade_folder


pytestmark = pytest.mark.compat


REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
NEW_FIXTURES = ["saved_f9ea757_mamba", "saved_f9ea757_mamba2"]
ALL_FIXTURES = [*NEW_FIXTURES, "saved_before_layout_v0_1"]
HISTORY = [{"step": 1, "state_sizes": [8, 3]}]
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def expected(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, logits)`` the code that saved fixture ``name`` computed."""
    if name == "saved_before_layout_v0_1":
        stored = load_file(FIXTURES / "saved_before_layout_v0_1_expected.safetensors")
        return stored["input_ids"], stored["logits"]
    stored = json.loads((FIXTURES / name / "expected.json").read_text())
    return torch.tensor(stored["input_ids"]), torch.tensor(stored["logits"], dtype=torch.float32)


def copy_fixture(name: str, tmp_path: Path) -> Path:
    folder = tmp_path / name
    shutil.copytree(FIXTURES / name, folder)
    return folder


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def fresh_save(config: dict, folder: Path) -> Path:
    """``save_pretrained`` of a new tiny model of the same family and sizes as ``config`` (a config.json dict)."""
    common = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, state_size=8, state_sizes=[8, 3])
    if config["model_type"] == CompreSSMMamba2Config.model_type:
        extra = dict(num_heads=4, head_dim=8, n_groups=2, chunk_size=8)
        model = CompreSSMMamba2ForCausalLM(CompreSSMMamba2Config(**common, **extra))
    else:
        model = CompreSSMMambaForCausalLM(CompreSSMMambaConfig(**common))
    model.save_pretrained(folder)
    return folder


def python_env() -> dict[str, str]:
    """The environment without the repo on PYTHONPATH (other entries, e.g. a transformers target dir, are kept)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    keep = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and not _in_repo(p)]
    if keep:
        env["PYTHONPATH"] = os.pathsep.join(keep)
    env["HF_HUB_OFFLINE"] = "1"
    return env


def _in_repo(path: str) -> bool:
    resolved = Path(path).resolve()
    return resolved == REPO or REPO in resolved.parents


@pytest.mark.parametrize("name", NEW_FIXTURES)
def test_old_folder_loads_with_the_package(name, tmp_path):
    folder = copy_fixture(name, tmp_path)
    input_ids, logits = expected(name)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(model).__module__.startswith("hf_compressssm.")
    assert model.state_sizes() == [8, 3] and model.config.state_sizes == [8, 3]
    assert model.compression_history == HISTORY
    with torch.no_grad():
        out = model(input_ids).logits
    torch.testing.assert_close(out, logits, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_upgrade_matches_a_fresh_save_and_loads_without_the_package(name, tmp_path):
    folder = copy_fixture(name, tmp_path)
    before = digests(folder)
    config_before = json.loads((folder / "config.json").read_text())
    assert folder_needs_upgrade(folder)

    changes = upgrade_folder(folder)
    assert changes
    after = digests(folder)
    config_after = json.loads((folder / "config.json").read_text())
    fresh = fresh_save(config_before, tmp_path / "fresh")
    fresh_config = json.loads((fresh / "config.json").read_text())

    # Weights and every file that is neither code nor config.json: byte for byte the same.
    for file, digest in before.items():
        if not file.endswith(".py") and file != "config.json":
            assert after.get(file) == digest, file
    assert any(file.endswith(WEIGHT_SUFFIXES) for file in after)
    assert set(after) - set(before) <= {p.name for p in fresh.glob("*.py")}
    # config.json: only auto_map changed, to a fresh save's.
    assert {k: v for k, v in config_after.items() if k != "auto_map"} == {
        k: v for k, v in config_before.items() if k != "auto_map"
    }
    assert list(config_after) == list(config_before) + ([] if "auto_map" in config_before else ["auto_map"])
    assert config_after["auto_map"] == fresh_config["auto_map"]
    # Code files: exactly a fresh save's, which are the package's own files.
    code = {p.name: p.read_bytes() for p in folder.glob("*.py")}
    fresh_code = {p.name: p.read_bytes() for p in fresh.glob("*.py")}
    assert code == fresh_code
    package_dir = Path(sys.modules[CompreSSMMambaForCausalLM.__module__].__file__).parent
    assert all((package_dir / file).read_bytes() == data for file, data in code.items())
    # A second upgrade, and one of a fresh save, change nothing.
    assert not folder_needs_upgrade(folder) and upgrade_folder(folder) == [] and digests(folder) == after
    assert not folder_needs_upgrade(fresh) and upgrade_folder(fresh) == []
    assert not list(folder.glob(".*.tmp"))

    # As remote code, in a process that cannot import the package.
    input_ids, logits = expected(name)
    reference = tmp_path / "reference.json"
    reference.write_text(json.dumps({"input_ids": input_ids.tolist(), "logits": logits.tolist()}))
    script = f"""
import sys
sys.modules["hf_compressssm"] = None
import json
import torch
import transformers
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
assert not type(model).__module__.startswith("hf_compressssm"), type(model).__module__
reference = json.load(open({str(reference)!r}))
with torch.no_grad():
    logits = model(torch.tensor(reference["input_ids"])).logits
torch.testing.assert_close(logits, torch.tensor(reference["logits"], dtype=torch.float32), atol=1e-5, rtol=0)
print("REMOTE_OK", transformers.__version__, type(model).__name__)
"""
    env = python_env()
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    work = tmp_path / "cwd"
    work.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"REMOTE_OK {transformers.__version__}" in result.stdout  # the same transformers as this process


@pytest.mark.slow
def test_cli_upgrades_a_folder_and_exits_2_on_a_missing_path(tmp_path):
    folder = copy_fixture("saved_f9ea757_mamba2", tmp_path)
    env = python_env()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    command = [sys.executable, "-m", "hf_compressssm", "upgrade"]
    result = subprocess.run([*command, str(folder)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "upgraded" in result.stdout and not folder_needs_upgrade(folder)
    missing = tmp_path / "missing"
    result = subprocess.run(
        [*command, str(missing)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {missing} is not a folder: {_NOT_A_FOLDER_FIX}"]
    assert not missing.exists()


_NOT_A_FOLDER_FIX = "pass the folder the model was saved to (it holds config.json)."


def _foreign(tmp_path: Path) -> Path:
    folder = copy_fixture("saved_f9ea757_mamba", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "mamba"
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def _no_config(tmp_path: Path) -> Path:
    folder = tmp_path / "no_config"
    folder.mkdir()
    shutil.copy(FIXTURES / "saved_f9ea757_mamba" / "model.safetensors", folder)
    shutil.copy(FIXTURES / "saved_f9ea757_mamba" / "modeling_compressssm_mamba.py", folder)
    return folder


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp: tmp / "missing", "is not a folder: pass the folder"),
        (lambda tmp: Path(shutil.copy(FIXTURES / "saved_f9ea757_mamba" / "config.json", tmp)), "is not a folder"),
        (_no_config, "has no config.json: pass the folder save_pretrained wrote"),
        (
            _foreign,
            "has model_type 'mamba', not one of hf_compressssm's "
            "(compressssm_bamba, compressssm_granitemoehybrid, compressssm_mamba, compressssm_mamba2, "
            "compressssm_nemotron_h, compressssm_zamba2)",
        ),
    ],
    ids=["missing", "file", "no_config", "foreign_model_type"],
)
def test_cli_refuses_what_it_cannot_upgrade(make, message, tmp_path, capsys):
    path = make(tmp_path)
    before = digests(path) if path.is_dir() else None
    assert main(["upgrade", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    if before is not None:
        assert digests(path) == before
        with pytest.raises(UpgradeError):
            folder_needs_upgrade(path)


def test_upgrade_removes_only_our_obsolete_code_files(tmp_path):
    folder = fresh_save({"model_type": CompreSSMMambaConfig.model_type}, tmp_path / "saved")
    fresh_code = {p.name: p.read_bytes() for p in folder.glob("*.py")}
    # An older layout: the model class in another module, which imports a helper the current code does not use.
    (folder / "old_modeling.py").write_text(
        "from .old_helper import thing\nfrom .configuration_compressssm_mamba import X\n"
    )
    (folder / "old_helper.py").write_text("thing = 1\n")
    (folder / "notes.py").write_text("print('not ours')\n")
    (folder / "tokenization_x.py").write_text("class Tok: ...\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"]["AutoModelForCausalLM"] = "old_modeling.CompreSSMMambaForCausalLM"
    config["auto_map"]["AutoTokenizer"] = ["tokenization_x.Tok", None]
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    weights = digests(folder)["model.safetensors"]

    changes = upgrade_folder(folder)
    assert changes == ["rewrote auto_map in config.json", "removed old_helper.py", "removed old_modeling.py"]
    code = {p.name: p.read_bytes() for p in folder.glob("*.py")}
    assert set(code) == set(fresh_code) | {"notes.py", "tokenization_x.py"}
    assert all(code[file] == data for file, data in fresh_code.items())
    assert json.loads((folder / "config.json").read_text())["auto_map"] == {
        "AutoConfig": "configuration_compressssm_mamba.CompreSSMMambaConfig",
        "AutoModelForCausalLM": "modeling_compressssm_mamba.CompreSSMMambaForCausalLM",
        "AutoTokenizer": ["tokenization_x.Tok", None],
    }
    assert digests(folder)["model.safetensors"] == weights
    assert upgrade_folder(folder) == []


def test_loading_an_old_folder_names_the_upgrade_command(tmp_path, caplog):
    from hf_compressssm.models import modeling_compressssm_common as common

    folder = tmp_path / "old"
    shutil.copytree(Path(__file__).parent / "fixtures" / "saved_f9ea757_mamba2", folder)
    with caplog.at_level("WARNING"):
        common._warn_if_old_code(str(folder))
    assert f"python -m hf_compressssm upgrade {folder}" in caplog.text
    upgrade_folder(folder)
    caplog.clear()
    with caplog.at_level("WARNING"):
        common._warn_if_old_code(str(folder))
    assert "upgrade" not in caplog.text
