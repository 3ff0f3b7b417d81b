"""Publishing CompreSSM models on the Hugging Face Hub: weights, config, remote-code files, tokenizer and card.

``model.push_to_hub(repo)`` of transformers uploads weights, config and the remote-code files but replaces
``README.md`` with a generic card (or the one already on the Hub). `push_to_hub` here writes the whole folder
(`prepare_folder`: ``save_pretrained`` + tokenizer + our card + compression history) and uploads it in one commit.

`check_hub_access` is what a training run with ``--push_to_hub`` checks before it trains (as the Trainer's own push
creates the repo first): the repo id, a token, and that the endpoint answers and lets the token create or write the
repo. A failed upload raises `HubUploadError`, whose message gives the command that retries the upload alone
(``python -m hf_compressssm push FOLDER REPO_ID``).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from transformers.utils import logging

from .model_card import CARD_FILE, save_model_card


logger = logging.get_logger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_HYBRID_CODE = ("modeling_compressssm_hybrid.py", "modeling_compressssm_common.py")
#: The files ``save_pretrained`` writes next to the weights of each model_type, so the folder loads as remote code.
REMOTE_CODE_FILES_BY_MODEL_TYPE: dict[str, tuple[str, ...]] = {
    "compressssm_mamba": (
        "configuration_compressssm_mamba.py",
        "configuration_compressssm_common.py",
        "modeling_compressssm_mamba.py",
        "modeling_compressssm_common.py",
        "selective_scan.py",
        "kernel_policy.py",
    ),
    "compressssm_mamba2": (
        "configuration_compressssm_mamba2.py",
        "configuration_compressssm_common.py",
        "modeling_compressssm_mamba2.py",
        "modeling_compressssm_common.py",
        "ssd_scan.py",
        "ssd_numba_scan.py",
        "selective_scan.py",
        "kernel_policy.py",
    ),
    **{
        f"compressssm_{host}": (
            f"configuration_compressssm_{host}.py",
            "configuration_compressssm_common.py",
            f"modeling_compressssm_{host}.py",
            *_HYBRID_CODE,
        )
        for host in ("granitemoehybrid", "bamba", "nemotron_h", "zamba2")
    },
}
REMOTE_CODE_FILES = REMOTE_CODE_FILES_BY_MODEL_TYPE["compressssm_mamba"]  # `remote_code_files` gives any folder's
# Folders and files a training output dir may hold that do not belong on the Hub.
_IGNORE_PATTERNS = [
    "checkpoint-*",
    "checkpoint-*/**",
    "runs/**",
    "*.bin",
    "*.pt",
    "*.pth",
    "__pycache__/**",
    ".compressssm-run.lock*",
]


class HubAccessError(ValueError):
    """The Hub cannot take the upload (bad repo id, no token, endpoint unreachable, no write access); the message
    names the problem and the fix."""


class HubUploadError(RuntimeError):
    """An upload failed; the message says how to retry it alone (the local folder is complete and unchanged)."""


def upload_command(directory: str | os.PathLike, repo_id: str) -> str:
    """The shell command that uploads ``directory`` to ``repo_id`` (what `upload_folder` does)."""
    import shlex

    return f"python -m hf_compressssm push {shlex.quote(os.fspath(directory))} {shlex.quote(repo_id)}"


def _connection_problem(err: BaseException) -> bool:
    names = {type(e).__name__ for e in (err, err.__cause__, err.__context__) if e is not None}
    return isinstance(err, (OSError, ConnectionError, TimeoutError)) or any(
        "Connect" in n or "Timeout" in n or "Network" in n for n in names
    )


def check_hub_access(
    repo_id: str, *, token: str | None = None, private: bool | None = None, endpoint: str | None = None
) -> str:
    """Check before training that ``repo_id`` can take an upload, as the Trainer's own push does: a valid id, a
    token, and the endpoint creates the repo (``exist_ok=True``: an existing one the token can write is fine).
    Returns the full repo id (``owner/name``); raises `HubAccessError` with the fix."""
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repo_id = (repo_id or "").strip()
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise HubAccessError(
            f"--hub_model_id {repo_id!r} is not a Hub repo id ({str(err).splitlines()[0].split('. Use `repo_type`')[0]}); "
            "use owner/name."
        ) from err
    if constants.is_offline_mode():
        raise HubAccessError("--push_to_hub needs the Hub but HF_HUB_OFFLINE is set: unset it, or drop --push_to_hub.")
    token = token or get_token()
    if not token:
        raise HubAccessError(
            "--push_to_hub needs a Hugging Face token with write access: run `hf auth login`, set HF_TOKEN, or pass "
            "--hub_token."
        )
    api = HfApi(token=token, endpoint=endpoint)
    try:
        return api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    except HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status == 401:
            why = "the token is not valid there (401): log in again with `hf auth login` or pass another --hub_token"
        elif status in (402, 403):
            why = f"the token may not create or write {repo_id} ({status}): use a write token of its owner"
        else:
            why = f"the Hub answered {status}: {str(err).splitlines()[0]}"
        raise HubAccessError(f"cannot push to {repo_id} on {api.endpoint}: {why}; or drop --push_to_hub.") from err
    except Exception as err:
        if not _connection_problem(err):
            raise
        raise HubAccessError(
            f"cannot reach the Hub at {api.endpoint} to create {repo_id} ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'no answer'}): check the network or HF_ENDPOINT, or drop "
            "--push_to_hub."
        ) from err


def remote_code_files(directory: str | os.PathLike) -> tuple[str, ...]:
    """The remote-code files a saved folder needs, from its ``config.json`` ``model_type`` (Mamba-1 by default)."""
    try:
        model_type = json.loads((Path(directory) / CONFIG_FILE).read_text()).get("model_type")
    except (OSError, ValueError):
        model_type = None
    return REMOTE_CODE_FILES_BY_MODEL_TYPE.get(model_type, REMOTE_CODE_FILES)


def missing_hub_files(directory: str | os.PathLike) -> list[str]:
    """Files a loadable upload needs that ``directory`` lacks (config, safetensors weights, remote code, card).

    Sharded checkpoints count when ``model.safetensors.index.json`` is present.
    """
    folder = Path(directory)
    code = remote_code_files(folder)
    missing = [name for name in (CONFIG_FILE, CARD_FILE, *code) if not (folder / name).is_file()]
    if not (folder / WEIGHTS_FILE).is_file() and not (folder / f"{WEIGHTS_FILE}.index.json").is_file():
        missing.append(WEIGHTS_FILE)
    return missing


def prepare_folder(model: Any, directory: str | os.PathLike, tokenizer: Any = None, **card_kwargs: Any) -> Path:
    """Write everything that goes on the Hub into ``directory``: ``save_pretrained`` (weights, config with
    ``auto_map``, remote-code files, ``compression_history.json``), the tokenizer when given, and ``README.md``."""
    directory = Path(directory)
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
        card_kwargs.setdefault("task", "causal_lm")
    save_model_card(model, directory, **card_kwargs)
    missing = missing_hub_files(directory)
    if missing:
        raise RuntimeError(f"{directory} lacks {missing} after save_pretrained: the upload would not load.")
    return directory


def upload_folder(
    directory: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload CompreSSM Mamba model",
    revision: str | None = None,
) -> str:
    """Create ``repo_id`` if needed and upload ``directory`` (minus checkpoints and logs); returns the commit URL."""
    from huggingface_hub import HfApi

    missing = missing_hub_files(directory)
    if missing:
        raise ValueError(f"{directory} lacks {missing}: save the model with save_pretrained and its card first.")
    api = HfApi(token=token)
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(directory),
            commit_message=commit_message,
            revision=revision,
            ignore_patterns=_IGNORE_PATTERNS,
        )
    except Exception as err:
        first = str(err).splitlines()[0] if str(err) else "no answer"
        raise HubUploadError(
            f"the upload of {directory} to {repo_id} on {getattr(api, 'endpoint', 'the Hub')} failed ({type(err).__name__}: {first}); the "
            f"folder is complete: retry the upload alone with `{upload_command(directory, repo_id)}`."
        ) from err
    logger.info(f"Uploaded {directory} to {repo_id}")
    return str(getattr(info, "commit_url", info))


def push_to_hub(
    model: Any,
    repo_id: str,
    tokenizer: Any = None,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload CompreSSM Mamba model",
    **card_kwargs: Any,
) -> str:
    """Upload ``model`` (+ tokenizer) with its card to ``repo_id``; ``card_kwargs`` go to `render_model_card`."""
    card_kwargs.setdefault("repo_id", repo_id)
    with tempfile.TemporaryDirectory() as tmp:
        prepare_folder(model, tmp, tokenizer, **card_kwargs)
        return upload_folder(tmp, repo_id, token=token, private=private, commit_message=commit_message)


__all__ = [
    "HubAccessError",
    "HubUploadError",
    "REMOTE_CODE_FILES",
    "check_hub_access",
    "missing_hub_files",
    "remote_code_files",
    "REMOTE_CODE_FILES_BY_MODEL_TYPE",
    "prepare_folder",
    "push_to_hub",
    "upload_command",
    "upload_folder",
]
