"""``sealroom budget``: what each ``dp`` dataset's privacy budget has spent and has left, for the
analyst asking (its own scope, and the collaboration's), from the coordinator's log."""

from __future__ import annotations

import argparse

from sealroom.app.cells import format_table
from sealroom.app.cli.analyst import analyst, client_for
from sealroom.app.cli.common import EXIT_OK, Subparsers, add_command, emit

__all__ = ["add_parsers", "budget_table", "cmd_budget"]


def add_parsers(sub: Subparsers) -> None:
    b = analyst(add_command(sub, "budget"))
    b.add_argument("--dataset", metavar="PARTY.DATASET", help="only this dataset")
    b.set_defaults(handler=cmd_budget)


def cmd_budget(args: argparse.Namespace) -> int:
    with client_for(args) as c:
        rows = c.budget(args.dataset)
    if args.json:
        emit(rows)
        return EXIT_OK
    if not rows:
        print("no dataset in dp mode" + (f" named {args.dataset}" if args.dataset else ""))
        return EXIT_OK
    print(budget_table(rows))
    return EXIT_OK


def budget_table(rows: list[dict[str, object]]) -> str:
    """:meth:`sealroom.Client.budget`'s rows as a table, with the note on who decides."""
    table = format_table(
        ["dataset", "scope", "budget", "spent", "left", "refresh", "queries"],
        [
            [
                str(r["dataset"]),
                str(r["scope"]),
                f"{r['epsilon_budget']:g}",
                f"{r['spent']:g}",
                f"{r['left']:g}",
                str(r["refresh"]),
                str(r["charges"]),
            ]
            for r in rows
        ],
    )
    return table + "\nthe owners' agents decide from their own ledgers, which also count approvals in flight"
