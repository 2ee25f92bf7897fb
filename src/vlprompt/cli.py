"""The ``vlprompt`` command: thin subcommands over library functions.

Each command module exposes ``register(subparsers)``, which adds its sub-parser(s) and sets
``func`` (called with the parsed arguments, returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Optional, Sequence

from . import __version__

COMMAND_MODULES = [
    "vlprompt.clip.commands",
    "vlprompt.data.commands",
    "vlprompt.engine.commands",
    "vlprompt.protocol_commands",
    "vlprompt.toyworld.commands",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlprompt",
        description="Prompt learning for CLIP-style vision-language models. Start with `vlprompt demo`.")
    parser.add_argument("--version", action="version", version=f"vlprompt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, KeyError, ValueError, RuntimeError) as err:
        # user errors: one clear line, no traceback (use -v for it)
        if args.verbose:
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"vlprompt {args.command}: error: {message} (-v shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
