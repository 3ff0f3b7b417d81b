"""Hub publishing, offline: the upload folder is complete, and a model laid out in an HF cache loads by repo id with
``HF_HUB_OFFLINE=1`` and ``trust_remote_code=True`` in a process that cannot import ``hf_compressssm``."""

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import random_ids, tiny_lm
from huggingface_hub import ModelCard

import hf_compressssm.hub as hub
from compressssm_app.sources import build_byte_tokenizer
from hf_compressssm import compress_model


REPO = Path(__file__).resolve().parent.parent
REPO_ID = "someone/tiny-compressssm"


@pytest.fixture(scope="module")
def compressed():
    model = tiny_lm(seed=2, vocab_size=257, pad_token_id=256, bos_token_id=256, eos_token_id=256)
    compress_model(
        model,
        [{"input_ids": random_ids(batch=2, length=24, vocab=256, seed=s)} for s in range(2)],
        tau=0.3,
        calibration_batches=2,
    )
    assert model.config.state_sizes != [8, 8]
    return model.eval()


@pytest.fixture(scope="module")
def upload_dir(compressed, tmp_path_factory):
    folder = tmp_path_factory.mktemp("upload")
    hub.prepare_folder(compressed, folder, build_byte_tokenizer(), repo_id=REPO_ID, metrics={"perplexity": 9.0})
    return folder


def test_upload_folder_is_complete(upload_dir, compressed):
    assert hub.missing_hub_files(upload_dir) == []
    names = {p.name for p in upload_dir.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "README.md",
        "compression_history.json",
        "tokenizer.json",
        *hub.REMOTE_CODE_FILES,
    } <= names
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)
    config = json.loads((upload_dir / "config.json").read_text())
    assert config["state_sizes"] == compressed.config.state_sizes
    assert config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_compressssm_mamba.")
    card = ModelCard.load(upload_dir / "README.md")
    assert card.data.library_name == "transformers" and REPO_ID in card.text


def test_push_to_hub_uploads_the_complete_folder(compressed, monkeypatch):
    """`hub.push_to_hub` with the network calls replaced: one upload of a complete folder to the right repo."""
    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls["created"] = (repo_id, exist_ok)
            return type("Url", (), {"repo_id": repo_id})()

        def upload_folder(self, repo_id, folder_path, commit_message, revision=None, ignore_patterns=None):
            calls["uploaded"] = (repo_id, sorted(os.listdir(folder_path)), ignore_patterns)
            calls["card"] = ModelCard.load(Path(folder_path) / "README.md")
            return type("Info", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/0"})()

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    url = hub.push_to_hub(compressed, REPO_ID, build_byte_tokenizer(), token="hf_fake")
    assert url.endswith("/commit/0") and calls["created"] == (REPO_ID, True) and calls["token"] == "hf_fake"
    repo_id, files, ignore = calls["uploaded"]
    assert repo_id == REPO_ID and "checkpoint-*" in ignore
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json", *hub.REMOTE_CODE_FILES} <= set(files)
    assert "compressssm" in calls["card"].data.tags


def test_upload_refuses_an_incomplete_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="model.safetensors"):
        hub.upload_folder(tmp_path, REPO_ID)


LOAD_FROM_CACHE = r"""
import importlib.util, json, os, sys
repo = os.path.realpath(sys.argv[1])
sys.path[:] = [p for p in sys.path if p not in ("", ".") and os.path.realpath(p) != repo]
# An editable install finds the package through a meta-path finder, not sys.path: drop any finder that sees it.
sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ == "PathFinder" or not hasattr(f, "find_spec")
                    or f.find_spec("hf_compressssm", None) is None]
assert importlib.util.find_spec("hf_compressssm") is None, "hf_compressssm must not be importable here"

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from huggingface_hub import ModelCard

model = AutoModelForCausalLM.from_pretrained(sys.argv[2], trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(sys.argv[2], trust_remote_code=True)
ids = torch.tensor(json.loads(sys.argv[3]))
with torch.no_grad():
    logits = model(ids).logits
print(json.dumps({
    "module": type(model).__module__,
    "sizes": [m.A_log.shape[-1] for m in model.modules() if hasattr(m, "A_log")],
    "logits": logits.flatten().tolist(),
    "vocab": len(tokenizer),
    "tags": ModelCard.load(sys.argv[2]).data.tags,
    "imported": any(name.startswith("hf_compressssm") for name in sys.modules),
}))
"""


@pytest.mark.slow
def test_load_from_hf_cache_offline_without_package(upload_dir, compressed, tmp_path):
    home = tmp_path / "hf_home"
    cache = home / "hub"
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / ("models--" + REPO_ID.replace("/", "--"))
    shutil.copytree(upload_dir, repo_dir / "snapshots" / revision)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(revision)

    ids = random_ids(batch=2, length=10, vocab=256, seed=5)
    with torch.no_grad():
        expected = compressed(ids).logits.flatten()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_TOKEN")}
    env.update(HF_HOME=str(home), HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_FROM_CACHE, str(REPO), REPO_ID, json.dumps(ids.tolist())],
        cwd=str(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Do you wish to run the custom code" not in proc.stdout + proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["module"].startswith("transformers_modules"), out["module"]
    assert not out["imported"]
    assert out["sizes"] == compressed.config.state_sizes
    assert out["vocab"] == 257 and "compressssm" in out["tags"]
    torch.testing.assert_close(torch.tensor(out["logits"]), expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- --push_to_hub checks the Hub first
UNREACHABLE = "http://127.0.0.1:9"  # loopback, nothing listens: the connection is refused at once


def _push_args(out, *extra):
    from compressssm_app import parse_arguments

    return parse_arguments(
        ["--preset", "tiny", "--max_eval_samples", "2", "--disable_tqdm", "true", "--output_dir", str(out)]
        + ["--push_to_hub", *extra]
    )


@pytest.mark.parametrize(
    ("extra", "token", "needle"),
    [
        (["--hub_model_id", "a/b/c"], "hf_fake", "--hub_model_id 'a/b/c' is not a Hub repo id"),
        (["--hub_model_id", "me/tiny"], None, "--push_to_hub needs a Hugging Face token with write access"),
        (["--hub_model_id", "me/tiny"], "hf_fake", f"cannot reach the Hub at {UNREACHABLE} to create me/tiny"),
    ],
    ids=["bad-repo-id", "no-token", "unreachable"],
)
def test_push_to_hub_checks_the_hub_before_training(tmp_path, monkeypatch, extra, token, needle):
    import huggingface_hub
    from huggingface_hub import constants

    from compressssm_app import UsageError, run_training
    from compressssm_app import run as run_module

    monkeypatch.setattr(constants, "ENDPOINT", UNREACHABLE)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)  # no login on this machine
    monkeypatch.setattr(run_module, "build_datasets", lambda *a, **k: pytest.fail("data built before the Hub check"))
    out = tmp_path / "out"
    args = [*extra, *(["--hub_token", token] if token else [])]
    with pytest.raises(UsageError, match=re.escape(needle)):
        run_training(*_push_args(out, *args))
    assert not out.exists()


def test_failed_upload_after_training_says_how_to_retry(tmp_path, monkeypatch, capsys):
    """The Hub answered the check but the upload fails (endpoint gone): the run is saved, the lock released, exit
    1 with one line giving the command that retries the upload alone; that command then uploads the folder."""
    from huggingface_hub import constants

    import hf_compressssm.__main__ as cli
    import hf_compressssm.hub.publish as publish
    from compressssm_app.output_dir import LOCK_FILE

    monkeypatch.setattr(constants, "ENDPOINT", UNREACHABLE)
    monkeypatch.setattr(publish, "check_hub_access", lambda repo_id, **kwargs: repo_id)  # it answered then
    script = importlib.import_module("train")
    out = tmp_path / "out"
    argv = ["--preset", "tiny", "--max_eval_samples", "2", "--disable_tqdm", "true", "--output_dir", str(out)]
    assert script.main([*argv, "--push_to_hub", "--hub_model_id", "me/tiny", "--hub_token", "hf_fake"]) == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if "error:" in line]
    retry = f"python -m hf_compressssm push {out} me/tiny"
    assert len(errors) == 1 and "the upload of" in errors[0] and retry in errors[0], captured.err[-3000:]
    assert "Per-layer state sizes" in captured.out, "the training results are still reported"
    assert hub.missing_hub_files(out) == [] and not (out / LOCK_FILE).exists()

    uploaded = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False):
            return type("Url", (), {"repo_id": repo_id})()

        def upload_folder(self, repo_id, folder_path, commit_message, revision=None, ignore_patterns=None):
            uploaded.update(repo_id=repo_id, files=sorted(os.listdir(folder_path)), ignore=ignore_patterns)
            return type("Info", (), {"commit_url": f"https://hub/{repo_id}/commit/1"})()

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    assert cli.main(["push", str(out), "me/tiny", "--token", "hf_fake"]) == 0
    assert uploaded["repo_id"] == "me/tiny" and "model.safetensors" in uploaded["files"]
    assert ".compressssm-run.lock*" in uploaded["ignore"] and "checkpoint-*" in uploaded["ignore"]
    assert "Uploaded" in capsys.readouterr().out
