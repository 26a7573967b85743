"""The one entry point, ``motioncharacter``. Each stage registers its own subcommands.

Modules listed in COMMAND_MODULES expose ``add_commands(subparsers)``; handlers import
their heavy dependencies lazily so ``--help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from . import __version__

COMMAND_MODULES = [
    "motioncharacter.demo",
    "motioncharacter.stack",
    "motioncharacter.components.prepare.cli",
    "motioncharacter.components.train.cli",
    "motioncharacter.serving.cli",
    "motioncharacter.serving.ui",
    "motioncharacter.pipelines.cli",
    "motioncharacter.model.cli",
    "motioncharacter.model.weights",
    "motioncharacter.components.evaluate.cli",
    "motioncharacter.registry_cli",
    "motioncharacter.images",
]


class UserError(Exception):
    """An error the user can fix; printed without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="motioncharacter",
        description="MotionCharacter MLOps platform: prepare data, train, evaluate, deploy and generate "
        "identity-preserving, motion-controllable human videos.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"motioncharacter {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .stack import load_stack_env

    load_stack_env()
    from .config import ConfigError
    from .storage import StorageError

    try:
        return int(args.func(args) or 0)
    except (UserError, ConfigError, StorageError, FileNotFoundError, ValueError) as e:
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
