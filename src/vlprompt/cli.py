"""The ``vlprompt`` command: thin subcommands over library functions.

Each command module exposes ``register(subparsers)``, which adds its sub-parser(s) and sets
``func`` (called with the parsed arguments, returning an exit code). Commands that take config
overrides declare an ``overrides`` positional; ``key=value`` words may then appear anywhere on
the line, before or after options, for every such command alike.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Optional, Sequence

from . import __version__

COMMAND_MODULES = [
    "vlprompt.data.commands",
    "vlprompt.engine.commands",
    "vlprompt.protocol_commands",
    "vlprompt.predict_commands",
    "vlprompt.interop.commands",
    "vlprompt.sweep.commands",
    "vlprompt.toyworld.commands",
    "vlprompt.bench_commands",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlprompt",
        description="Prompt learning for CLIP-style vision-language models. Start with `vlprompt demo`.")
    parser.add_argument("--version", action="version", version=f"vlprompt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: $OMP_NUM_THREADS, else the number of "
                             "physical cores)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def parse_args(parser: argparse.ArgumentParser,
               argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Parse ``argv``; ``key=value`` words left over (after options) join ``overrides`` of the
    commands that take them, anything else is an error as usual."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        takes = hasattr(args, "overrides")
        if not takes or any(w.startswith("-") or "=" not in w for w in extra):
            parser.parse_args(argv)  # the standard "unrecognized arguments" error
        args.overrides = list(args.overrides or []) + extra
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        from .runtime import configure_threads

        configure_threads(args.threads)
        return int(args.func(args) or 0)
    except (FileNotFoundError, KeyError, ValueError, RuntimeError, OSError) as err:
        # user errors: one clear line, no traceback (use -v for it)
        if args.verbose:
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        text = str(message).strip().splitlines()[0] if str(message).strip() else type(err).__name__
        print(f"vlprompt {args.command}: error: {text} (-v shows the traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"vlprompt {args.command}: interrupted; rerun the same command to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
