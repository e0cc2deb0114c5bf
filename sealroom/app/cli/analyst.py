from __future__ import annotations

import argparse

from sealroom.app.cli.common import EXIT_FAILED, EXIT_OK, UsageError, client_for, emit


def cmd_analyst_token(args: argparse.Namespace) -> int:
    from sealroom.auth import generate_token, token_hash

    if not args.name.isidentifier():
        raise UsageError("analyst names must be identifiers (letters, digits, _)")
    token = generate_token()
    line = f'{args.name} = "{token_hash(token)}"'
    if args.json:
        emit({"analyst": args.name, "token": token, "config_line": line})
    else:
        print(f"token for {args.name} (give it to the analyst; it is shown once):\n  {token}")
        print(f"add to the coordinator's configuration, under [analysts]:\n  {line}")
    return EXIT_OK


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
        doc = c.explain_plan(args.sql)
    if args.json:
        emit(doc)
    else:
        print(doc["text"])
    return EXIT_OK


def cmd_submit(args: argparse.Namespace) -> int:
    from sealroom.app.render import render_result, result_document

    with client_for(args) as c:
        handle = c.submit(args.sql)
        if not args.wait:
            st = handle.status()
            if args.json:
                emit(st)
            else:
                print(f"{st['query_id']}: {st['status']}")
            return EXIT_OK if st["status"] != "refused" else EXIT_FAILED
        from sealroom.app.render import ProgressDisplay

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
    from sealroom.app.render import format_table

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
    from sealroom.app.render import render_result, result_document

    with client_for(args) as c:
        result = c.result(args.query_id)
    if args.json:
        emit(result_document(result))
    else:
        print(render_result(result))
    return EXIT_OK if result.status == "released" else EXIT_FAILED
