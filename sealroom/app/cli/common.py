"""What every command shares: exit codes, the command words, how arguments are checked, and how
output is printed. Loaded by every command, so by ``sealroom enclave serve`` too: it imports no
component and nothing heavy.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from sealroom.app.cells import jsonable

if TYPE_CHECKING:  # an annotation only: parsing arguments must not load grpc (sealroom.errors does)
    from sealroom.errors import SealroomError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

# What ``ArgumentParser.add_subparsers`` returns: argparse has no public name for its type.
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


class UsageError(Exception):
    """Unusable arguments (exit 2)."""


@dataclass(frozen=True)
class Command:
    """A top-level command word: the module under ``sealroom.app.cli`` that defines it, and the one
    line ``sealroom --help`` shows for it."""

    module: str
    help: str


# Every command word in the order ``sealroom --help`` lists them. Each module's ``add_parsers``
# defines its own words in full; the parser of a command that does not run needs only this line.
COMMANDS: dict[str, Command] = {
    "demo": Command("local", "run the whole platform on synthetic data"),
    "local": Command("local", "run one query over your own files"),
    "coordinator": Command("serve", "run the coordinator"),
    "enclave": Command("serve", "run an enclave worker"),
    "party": Command("serve", "run a data owner's party agent"),
    "analyst": Command("serve", "analyst credentials"),
    "attest": Command("attest", "attestation evidence"),
    "dev": Command("attest", "development helpers"),
    "receipt": Command("audit", "release receipts"),
    "audit": Command("audit", "the compliance reviewer's tools"),
    "datasets": Command("analyst", "list registered datasets"),
    "explain": Command("analyst", "show the plan for a query without running it"),
    "submit": Command("analyst", "submit a query"),
    "status": Command("analyst", "show a query's state (or all queries)"),
    "result": Command("analyst", "print a query's released result"),
    "budget": Command("budget", "show what each dp dataset's privacy budget has spent and has left"),
    "pending": Command("owner", "owner: list plans awaiting your decision"),
    "approve": Command("owner", "owner: approve a pending query"),
    "reject": Command("owner", "owner: reject a pending query"),
    "revoke": Command("owner", "owner: revoke your approval before the query runs"),
}


def add_command(sub: Subparsers, word: str) -> argparse.ArgumentParser:
    """The parser of the top-level command ``word``, with its line from :data:`COMMANDS`."""
    return sub.add_parser(word, help=COMMANDS[word].help)


def with_json(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sp.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    return sp


def epsilon_arg(value: str) -> float:
    """``--epsilon E``: a finite number greater than 0 (argparse exits 2 with this message otherwise)."""
    try:
        eps = float(value)
    except ValueError:
        eps = math.nan
    if not math.isfinite(eps) or not eps > 0:
        raise argparse.ArgumentTypeError(
            f"must be a number greater than 0, such as 0.5 (got {value!r}); leave it out for the default"
        )
    return eps


def with_epsilon(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sp.add_argument(
        "--epsilon",
        type=epsilon_arg,
        metavar="E",
        help="what the query spends of the budget of each dataset in dp mode (default 0.5, capped at the "
        "owners' max_query_epsilon); refused for a query over threshold datasets only",
    )
    return sp


def parse_address(value: str, what: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UsageError(f"the {what} address must be HOST:PORT (got {value!r})")
    return value


def emit(doc: Any) -> None:
    print(json.dumps(jsonable(doc), indent=2, sort_keys=False))


def agent_address(given: str | None) -> str:
    """The party agent's address: ``--agent``, else ``$SEALROOM_PARTY_AGENT``."""
    address = given or os.environ.get("SEALROOM_PARTY_AGENT")
    if not address:
        raise UsageError("give the party agent's address with --agent HOST:PORT (or set SEALROOM_PARTY_AGENT)")
    return parse_address(address, "party agent")


def when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def parse_pairs(values: list[str], flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values or []:
        key, sep, val = v.partition("=")
        parts = key.split(".")
        if not sep or not val or len(parts) != 2 or not all(p.isidentifier() for p in parts):
            raise UsageError(f"{flag} expects PARTY.NAME=VALUE with identifier names (got {v!r})")
        if key in out:
            raise UsageError(f"{flag} given twice for {key}")
        out[key] = val
    return out


def read_file(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read the {what} {path}: {exc.strerror}") from None


def report_refusal(err: SealroomError, *, as_json: bool) -> str:
    """Say on stderr (and with ``as_json`` in the JSON document) that verification refused, and
    why; return the check that refused."""
    check = str(err.details.get("check", ""))
    print(f"sealroom: refused ({check}): {err.message}", file=sys.stderr)
    if as_json:
        emit({"verified": False, "check": check, "reason": err.to_dict()})
    return check
