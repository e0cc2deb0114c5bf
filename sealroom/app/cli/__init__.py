"""The ``sealroom`` command line. Only :func:`main` exits the process.

Exit status: 0 success (released), 1 refused or failed, 2 unusable arguments. Every command that
prints results has ``--json``: one JSON document on stdout; progress and logs go to stderr.

One module per command group (``serve``, ``analyst``, ``owner``, ``audit``, ``attest``, ``local``),
each adding its own subcommands with ``add_parsers``; this package only assembles them. A run loads
only the module of the command it runs (``sealroom enclave serve`` loads only what the enclave
worker needs, and ``sealroom --help`` loads none): the other commands get just their one line of
help from :data:`~sealroom.app.cli.common.COMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Iterable, Sequence

from sealroom.app.cli.common import COMMANDS, EXIT_FAILED, EXIT_USAGE, UsageError, add_command, emit

__all__ = ["build_parser", "main"]

# The command modules, in the order of their commands in COMMANDS.
GROUPS: tuple[str, ...] = tuple(dict.fromkeys(c.module for c in COMMANDS.values()))


def build_parser(groups: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The whole command line; with ``groups``, only those command modules are loaded and their
    commands defined in full, every other command has only its name and help."""
    loaded = set(GROUPS if groups is None else groups)
    p = argparse.ArgumentParser(prog="sealroom", description="Privacy-preserving joint analytics.")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        if group in loaded:
            importlib.import_module(f"sealroom.app.cli.{group}").add_parsers(sub)
        else:
            for word, command in COMMANDS.items():
                if command.module == group:
                    add_command(sub, word)
    return p


def command_word(argv: Sequence[str]) -> str | None:
    """The command ``argv`` runs: its first word that is neither an option nor ``--log-level``'s
    value (``None`` when there is none, e.g. ``sealroom --help``)."""
    words = iter(argv)
    for word in words:
        if word == "--log-level":
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def parser_for(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The parser that ``argv`` needs: the module of its command, none for the top-level help, and
    every module when the command is not one of ours (argparse then says so, as always)."""
    word = command_word(argv)
    if word is None:
        return build_parser(groups=())
    command = COMMANDS.get(word)
    return build_parser(groups=None if command is None else (command.module,))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser_for(argv).parse_args(argv)
    # Imported once the arguments parse: `sealroom --help` and usage errors need no grpc, which
    # sealroom.errors loads (every command's own module loads it anyway).
    from sealroom.errors import SealroomError

    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        code = args.handler(args)
    except UsageError as err:
        print(f"sealroom: {err}", file=sys.stderr)
        code = EXIT_USAGE
    except SealroomError as err:
        print(f"sealroom: {err.code}: {err.message}", file=sys.stderr)
        if getattr(args, "json", False):
            emit(
                {
                    "status": "refused" if err.code in ("policy_refusal", "invalid_query") else "failed",
                    "reason": err.to_dict(),
                }
            )
        code = EXIT_USAGE if err.code == "config" else EXIT_FAILED
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
