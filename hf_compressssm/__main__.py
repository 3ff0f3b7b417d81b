"""Command line of the package: ``python -m hf_compressssm upgrade FOLDER`` and ``... push FOLDER REPO_ID``.

``upgrade`` rewrites a saved folder's remote-code files and ``config.json`` ``auto_map`` to what the installed package
writes today (see `hf_compressssm.hub.upgrade`). ``push`` uploads a folder written by ``scripts/train.py`` (or
``prepare_folder``) to the Hub in one commit, checkpoints and logs left out (`hf_compressssm.hub.upload_folder`):
how a run whose ``--push_to_hub`` upload failed retries the upload alone. Exit status: 0 on success, 2 on a usage
error, a folder that cannot be upgraded or uploaded, or a Hub that cannot take the upload (one line on stderr: the
problem and the fix).
"""

from __future__ import annotations

import argparse
import os
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hf_compressssm", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    upgrade = commands.add_parser(
        "upgrade",
        help="rewrite a saved folder's remote-code files and auto_map to the installed package's",
        description="Rewrite FOLDER's configuration/modeling files and config.json auto_map to what save_pretrained "
        "of the installed package writes today, so the folder loads with trust_remote_code=True without the "
        "package. Weights and other files are not touched.",
    )
    upgrade.add_argument("folder", metavar="FOLDER", help="a folder written by save_pretrained (holds config.json)")
    push = commands.add_parser(
        "push",
        help="upload a saved model folder to the Hub (checkpoints and logs left out)",
        description="Upload FOLDER (weights, config, remote code, tokenizer, card, history) to the Hub repo REPO_ID "
        "in one commit; checkpoint-N folders, logs and lock files stay local. Uses the token of `hf auth login` / "
        "HF_TOKEN unless --token is given.",
    )
    push.add_argument("folder", metavar="FOLDER", help="a folder written by scripts/train.py or prepare_folder")
    push.add_argument("repo_id", metavar="REPO_ID", help="the Hub repo, owner/name (created if missing)")
    push.add_argument("--token", help="a Hugging Face token with write access")
    push.add_argument("--private", action="store_true", help="create the repo private")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "upgrade":
        from .hub.upgrade import UpgradeError, upgrade_folder

        try:
            changes = upgrade_folder(args.folder)
        except UpgradeError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        for change in changes:
            print(change)
        print(f"{args.folder}: {'upgraded' if changes else 'already up to date'}")
    elif args.command == "push":
        from .hub.publish import HubAccessError, HubUploadError, check_hub_access, missing_hub_files, upload_folder

        missing = missing_hub_files(args.folder) if os.path.isdir(args.folder) else None
        if missing is None or missing:
            what = "is not a folder" if missing is None else f"lacks {', '.join(missing)}"
            print(f"error: {args.folder} {what}: give a folder written by scripts/train.py.", file=sys.stderr)
            return 2
        try:
            repo_id = check_hub_access(args.repo_id, token=args.token, private=args.private or None)
            url = upload_folder(args.folder, repo_id, token=args.token, private=args.private or None)
        except (HubAccessError, HubUploadError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        print(f"Uploaded {args.folder} to {repo_id}: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
