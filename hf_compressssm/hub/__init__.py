"""Sharing CompreSSM models: model cards (``model_card``) and uploading a complete folder (``publish``)."""

from .model_card import BASE_TAGS, CARD_FILE, find_template, render_model_card, save_model_card
from .publish import REMOTE_CODE_FILES, missing_hub_files, prepare_folder, push_to_hub, upload_folder


__all__ = [
    "BASE_TAGS",
    "CARD_FILE",
    "REMOTE_CODE_FILES",
    "find_template",
    "missing_hub_files",
    "prepare_folder",
    "push_to_hub",
    "render_model_card",
    "save_model_card",
    "upload_folder",
]
