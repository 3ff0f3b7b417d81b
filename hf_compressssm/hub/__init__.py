"""Sharing CompreSSM models: model cards (``model_card``), uploading a complete folder (``publish``) and bringing an
older saved folder's remote code up to date (``upgrade``)."""

from .model_card import BASE_TAGS, CARD_FILE, find_template, render_model_card, save_model_card
from .publish import (
    REMOTE_CODE_FILES,
    HubAccessError,
    HubUploadError,
    check_hub_access,
    missing_hub_files,
    prepare_folder,
    push_to_hub,
    upload_command,
    upload_folder,
)
from .upgrade import UpgradeError, folder_needs_upgrade, upgrade_folder


__all__ = [
    "BASE_TAGS",
    "CARD_FILE",
    "HubAccessError",
    "HubUploadError",
    "REMOTE_CODE_FILES",
    "UpgradeError",
    "check_hub_access",
    "find_template",
    "folder_needs_upgrade",
    "missing_hub_files",
    "prepare_folder",
    "push_to_hub",
    "render_model_card",
    "save_model_card",
    "upgrade_folder",
    "upload_command",
    "upload_folder",
]
