"""Command line of the package: ``python -m hf_compressssm upgrade FOLDER``.

``upgrade`` rewrites a saved folder's remote-code files and ``config.json`` ``auto_map`` to what the installed package
writes today (see `hf_compressssm.hub.upgrade`). Exit status: 0 on success, 2 on a usage error or a folder that
cannot be upgraded (one line on stderr: the problem and the fix).
"""

from __future__ import annotations

import argparse
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
