"""Publishing CompreSSM models on the Hugging Face Hub: weights, config, remote-code files, tokenizer and card.

``model.push_to_hub(repo)`` of transformers uploads weights, config and the remote-code files but replaces
``README.md`` with a generic card (or the one already on the Hub). `push_to_hub` here writes the whole folder
(`prepare_folder`: ``save_pretrained`` + tokenizer + our card + compression history) and uploads it in one commit.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from transformers.utils import logging

from ..families import FAMILIES, MambaFamily
from .model_card import CARD_FILE, save_model_card


logger = logging.get_logger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
REMOTE_CODE_FILES = MambaFamily.remote_code_files  # Mamba-1; `remote_code_files` gives any folder's
# Folders and files a training output dir may hold that do not belong on the Hub.
_IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", "runs/**", "*.bin", "*.pt", "*.pth", "__pycache__/**"]


def remote_code_files(directory: str | os.PathLike) -> tuple[str, ...]:
    """The remote-code files a saved folder needs, from its ``config.json`` ``model_type`` (Mamba-1 by default)."""
    try:
        model_type = json.loads((Path(directory) / CONFIG_FILE).read_text()).get("model_type")
    except (OSError, ValueError):
        model_type = None
    for family in FAMILIES:
        if model_type == family.model_type:
            return family.remote_code_files
    return REMOTE_CODE_FILES


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
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(directory),
        commit_message=commit_message,
        revision=revision,
        ignore_patterns=_IGNORE_PATTERNS,
    )
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
    "REMOTE_CODE_FILES",
    "missing_hub_files",
    "remote_code_files",
    "prepare_folder",
    "push_to_hub",
    "upload_folder",
]
