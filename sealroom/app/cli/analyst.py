"""The analyst's commands: list datasets, explain, submit, follow and fetch queries."""

from __future__ import annotations

import argparse
import os

from sealroom.app.cells import format_table
from sealroom.app.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    Subparsers,
    add_command,
    emit,
    parse_address,
    with_epsilon,
    with_json,
)
from sealroom.app.client import DEFAULT_COORDINATOR, Client, coordinator_address
from sealroom.app.render import ProgressDisplay, result_document
from sealroom.app.result import render_result


def add_parsers(sub: Subparsers) -> None:
    analyst(add_command(sub, "datasets")).set_defaults(handler=cmd_datasets)
    e = with_epsilon(analyst(add_command(sub, "explain")))
    e.add_argument("sql")
    e.set_defaults(handler=cmd_explain)
    s = with_epsilon(analyst(add_command(sub, "submit")))
    s.add_argument("sql")
    s.add_argument("--wait", action="store_true", help="wait for the result and print it")
    s.add_argument("--timeout", type=float, default=600.0)
    s.set_defaults(handler=cmd_submit)
    st = analyst(add_command(sub, "status"))
    st.add_argument("query_id", nargs="?")
    st.set_defaults(handler=cmd_status)
    r = analyst(add_command(sub, "result"))
    r.add_argument("query_id")
    r.set_defaults(handler=cmd_result)


def analyst(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options every analyst command takes: where the coordinator is and who is asking."""
    sp.add_argument(
        "--coordinator", help=f"coordinator address (env SEALROOM_COORDINATOR, default {DEFAULT_COORDINATOR})"
    )
    sp.add_argument(
        "--analyst",
        default=os.environ.get("SEALROOM_ANALYST", ""),
        help="your analyst name (checked against your token where the coordinator authenticates analysts)",
    )
    sp.add_argument("--token", help="your analyst token (env SEALROOM_TOKEN)")
    sp.add_argument("--ca", help="the CA certificate that issued the coordinator's TLS certificate (env SEALROOM_CA)")
    sp.add_argument(
        "--plaintext", action="store_true", help="no TLS: only a coordinator with [tls] plaintext = true on loopback"
    )
    return with_json(sp)


def client_for(args: argparse.Namespace) -> Client:
    """The client an analyst command's flags describe (read here, at the edge)."""
    address = parse_address(coordinator_address(args.coordinator), "coordinator")
    # The client falls back on $SEALROOM_TOKEN and $SEALROOM_CA.
    return Client(address, analyst=args.analyst, token=args.token, ca=args.ca, plaintext=args.plaintext)


def cmd_datasets(args: argparse.Namespace) -> int:
    with client_for(args) as c:
        ds = c.datasets()
    if args.json:
        emit(ds)
    else:
        for d in ds:
            unit = d["policy"].get("privacy_unit") or "rows"
            print(f"{d['dataset']}: {', '.join(d['columns'])}  [unit {unit}, k={d['policy']['min_group_size']}]")
    return EXIT_OK


def cmd_explain(args: argparse.Namespace) -> int:
    with client_for(args) as c:
        doc = c.explain_plan(args.sql, args.epsilon)
    if args.json:
        emit(doc)
    else:
        print(doc["text"])
    return EXIT_OK


def cmd_submit(args: argparse.Namespace) -> int:
    with client_for(args) as c:
        handle = c.submit(args.sql, args.epsilon)
        if not args.wait:
            st = handle.status()
            if args.json:
                emit(st)
            else:
                print(f"{st['query_id']}: {st['status']}")
            return EXIT_OK if st["status"] != "refused" else EXIT_FAILED
        # A terminal gets per-party progress bars on stderr; --json gets nothing but the document.
        progress = None if args.json else ProgressDisplay()
        handle.wait(args.timeout, on_progress=progress)
        result = c.result(handle.query_id)
    if args.json:
        emit(result_document(result, sql=args.sql))
    else:
        print(render_result(result))
    return EXIT_OK if result.status == "released" else EXIT_FAILED


def cmd_status(args: argparse.Namespace) -> int:
    with client_for(args) as c:
        rows = [c.status(args.query_id)] if args.query_id else c.queries()
    if args.json:
        emit(rows if not args.query_id else rows[0])
        return EXIT_OK
    print(
        format_table(
            ["query", "status", "progress", "approved by", "awaiting", "analyst"],
            [
                [
                    r["query_id"],
                    r["status"],
                    r["progress"],
                    ", ".join(r["approved_by"]),
                    ", ".join(r["awaiting"]),
                    r["analyst"],
                ]
                for r in rows
            ],
        )
    )
    for r in rows:
        if args.query_id and r["error"]:
            print(f"\n{r['status']}: {r['error']['message']}")
    return EXIT_OK


def cmd_result(args: argparse.Namespace) -> int:
    with client_for(args) as c:
        result = c.result(args.query_id)
    if args.json:
        emit(result_document(result))
    else:
        print(render_result(result))
    return EXIT_OK if result.status == "released" else EXIT_FAILED
